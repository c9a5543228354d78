"""What names a stored prefix cache, under a secret salt: the prefix, every example of the data, the dtype.

Every name in a ``cache_dir`` is an HMAC-SHA256 keyed with :data:`SALT_BYTES` random bytes
kept owner-only in that directory (:func:`load_salt`): the names depend on private data,
and without the salt an adversary who knows all examples but one cannot test guesses of the
last against them. :class:`CacheKey` names the caches of one prefix, size N, dtype and compute
precision (its ``group``), the rows one rank holds (its ``layout``) and, within it, the one of
one data set (:meth:`CacheKey.name` of its digest).
A data set's digest covers every example: :func:`tensor_digest` hashes a plain
TensorDataset's tensors whole; other data sets are hashed example by example as they are
read (:class:`HashedExamples`, :func:`stream_digest`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.utils.data import Dataset, TensorDataset

from .checkpoint import fsync_dir

__all__ = ["CacheKey", "HashedExamples", "load_salt", "prefix_fingerprint", "stream_digest", "tensor_digest",
           "FORMAT", "SALT_FILE", "SALT_BYTES"]

FORMAT = "dp_taft.prefix_cache/3"
SALT_FILE = "salt"
SALT_BYTES = 32


def _hash_tensor(digest: Any, t: torch.Tensor) -> None:
    t = t.detach().to("cpu").contiguous()
    digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
    digest.update(t.reshape(-1).view(torch.uint8).numpy())


def _prefix_part(model: nn.Module) -> tuple[str, nn.Module, tuple[str, ...]]:
    """(what the prefix computes, the module holding it, its submodules the prefix never runs)."""
    from ..methods import LinearProbe, NLFTViT
    from ..tangent import TangentViT

    # TAFT-k and NLFT-k both run timm's forward_features over the first depth-k blocks, so
    # they share one cache; the head (a per-seed initialisation) never enters it.
    unused = ("head", "head_drop", "fc_norm")
    if isinstance(model, TangentViT):
        return "vit.forward_features", model.frozen_prefix, unused
    if isinstance(model, NLFTViT):
        return "vit.forward_features", model.net, unused
    if isinstance(model, LinearProbe):
        return "vit.pooled_features", model.net, ()
    return f"{type(model).__module__}.{type(model).__qualname__}", model, ()


def _config(module: nn.Module) -> str:
    """A module's plain settings (eps, strides, num_prefix_tokens, ...), which shape what it computes."""
    plain = (bool, int, float, str, tuple, type(None))
    items = sorted((k, v) for k, v in vars(module).items() if not k.startswith("_") and k != "training"
                   and isinstance(v, plain))
    return repr(items)


def prefix_fingerprint(model: nn.Module) -> str:
    """SHA-256 of what ``model.prefix`` computes: its module tree, settings, parameters and buffers.

    Narrower than ``TangentViT.fingerprint()`` (which also covers the head and the
    linearized blocks' w0): runs differing only in their head, such as the seeds of a
    sweep or the second stage of ``fit_head_first``, and TAFT-k / NLFT-k of one backbone,
    get the same key. k is covered: the prefix holds the first depth - k blocks. A model
    may define ``prefix_fingerprint()`` itself; an unknown one is hashed whole.
    """
    own = getattr(model, "prefix_fingerprint", None)
    if callable(own):
        return str(own())
    kind, part, unused = _prefix_part(model)
    digest = hashlib.sha256(kind.encode())
    for name, module in part.named_modules():
        if name.split(".")[0] in unused:
            continue
        digest.update(f"|{name}:{type(module).__module__}.{type(module).__qualname__}:{_config(module)}".encode())
        for pname, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            digest.update(pname.encode())
            _hash_tensor(digest, t)
    return digest.hexdigest()


def load_salt(directory: Path) -> bytes:
    """``directory``'s secret salt (:data:`SALT_BYTES` bytes), created at first use, mode 0600.

    Written whole to a private temporary file, then hard-linked to :data:`SALT_FILE`; the
    link fails when another process (a torchrun rank, a shard worker) got there first, so
    every process sharing the directory reads the same salt and none a half-written one.
    """
    path = directory / SALT_FILE
    if not path.exists():
        fd, tmp = tempfile.mkstemp(prefix=f".{SALT_FILE}.", dir=directory)
        try:
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), 0o600)  # mkstemp's 0600 less the umask: owner-only whatever the umask
                f.write(os.urandom(SALT_BYTES))
                f.flush()
                os.fsync(f.fileno())
            os.link(tmp, path)
            fsync_dir(directory)
        except FileExistsError:  # another process linked its salt first: read that one
            pass
        finally:
            os.unlink(tmp)
    salt = path.read_bytes()
    if len(salt) != SALT_BYTES:
        raise RuntimeError(f"{path} holds {len(salt)} bytes, not a {SALT_BYTES}-byte prefix-cache salt: delete "
                           f"{directory} (its caches cannot be named without their salt)")
    return salt


def _hmac(salt: bytes, start: bytes) -> Any:
    # SHA-256 rather than BLAKE2b: with the SHA extensions of current CPUs it is the faster of the two
    # (measured here: 1.2 vs 1.1 GB/s on an idle core, 0.9 vs 0.5 under load)
    return hmac.new(salt, start, hashlib.sha256)


def _keyed(salt: bytes, fields: list[Any]) -> str:
    return _hmac(salt, json.dumps(fields).encode()).hexdigest()[:32]


@dataclass(frozen=True, repr=False)  # no repr: the salt is secret, N may be
class CacheKey:
    """Names of the caches of one prefix, size N, storage dtype and compute precision in a
    directory whose salt is ``salt``; ``part`` says which rows a cache holds (``w<world>r<rank>``:
    rank r's block of positions in a data-parallel run; ``w1r0``: all of them)."""

    salt: bytes
    fields: tuple[str, str, int, str, str]  # (FORMAT, prefix fingerprint, N, dtype, precision)
    part: str = "w1r0"

    @classmethod
    def of(cls, salt: bytes, model: nn.Module, n: int, dtype: torch.dtype, precision: str = "fp32",
           part: str = "w1r0") -> "CacheKey":
        return cls(salt, (FORMAT, prefix_fingerprint(model), n, str(dtype), precision), part)

    @property
    def group(self) -> str:
        """16 hex digits that every cache of this prefix, N, dtype and precision begins with (data
        sets and rank layouts apart)."""
        return _keyed(self.salt, list(self.fields))[:16]

    @property
    def layout(self) -> str:
        """``group-part``: what every cache of these rows begins with (data sets apart)."""
        return f"{self.group}-{self.part}"

    def name(self, data_digest: str) -> str:
        """``group-part-`` and 32 hex digits: the cache of these rows over the data of ``data_digest``."""
        return f"{self.layout}-{_keyed(self.salt, [*self.fields, self.part, data_digest])}"

    def stored_parts(self, directory: Path) -> list[str]:
        """The ``part`` of every complete cache of this prefix, N, dtype and precision in
        ``directory`` (whatever its rank layout), read back from the names :meth:`name` gives."""
        start = f"{self.group}-"
        return sorted({p.name[len(start):].split("-", 1)[0] for p in directory.glob(f"{start}w*.meta.pt")})


def tensor_digest(dataset: Dataset, salt: bytes) -> str | None:
    """Keyed digest of a plain TensorDataset from all its tensors' bytes (in RAM: about a second
    per GiB, no pass over the examples); None for any other data set, subclasses included
    (their ``__getitem__`` may transform)."""
    if type(dataset) is not TensorDataset:
        return None
    digest = _hmac(salt, b"tensors")
    for t in dataset.tensors:
        _hash_tensor(digest, t)
    return digest.hexdigest()


def _hash_example(digest: Any, example: Iterable[Any]) -> None:
    for value in example:  # (image, label), as the data set returns them
        _hash_tensor(digest, torch.as_tensor(value))


class HashedExamples(Dataset):
    """``dataset`` whose examples are hashed, keyed with ``salt``, as they are read in order 0, 1, ..., N - 1.

    ``hexdigest()`` is then the digest of the whole data set, the one :func:`stream_digest`
    computes: of what the prefix saw, read once. Read it in this process (a DataLoader without
    workers, unshuffled): the hash state lives here.
    """

    def __init__(self, dataset: Dataset, salt: bytes) -> None:
        self.dataset, self._digest, self._next = dataset, _hmac(salt, b"examples"), 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Any:
        if i != self._next:  # the digest is of the examples in order
            raise RuntimeError(f"HashedExamples read example {i} where {self._next} was next")
        example = self.dataset[i]
        _hash_example(self._digest, example)
        self._next += 1
        return example

    def hexdigest(self) -> str:
        if self._next != len(self):
            raise RuntimeError(f"{self._next} of {len(self)} examples hashed: the digest would not cover them all")
        return self._digest.hexdigest()


def stream_digest(dataset: Dataset, salt: bytes, progress: Callable[[Iterable[int]], Iterable[int]]) -> str:
    """Keyed digest of every example of ``dataset`` (as :class:`HashedExamples` computes it), each
    read (decoded, transformed) and hashed once, no prefix computed; ``progress`` wraps the
    positions (a progress bar)."""
    hashed = HashedExamples(dataset, salt)
    for i in progress(range(len(hashed))):
        _ = hashed[i]  # reading is hashing
    return hashed.hexdigest()
