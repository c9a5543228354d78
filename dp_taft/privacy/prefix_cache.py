"""The frozen-prefix cache: every example's prefix output, computed once, in RAM or memory-mapped on disk.

The store is N × T × D values (50,000 × 197 × 384 float32 ≈ 14 GiB for ViT-S/16 at 224), so it is
written batch by batch into a preallocated tensor or file (no list + concatenation, which needs
twice the store); held in RAM when it fits (below :data:`RAM_FRACTION` of the available memory),
else memory-mapped from a file the OS pages in and out; optionally stored in 16 bits; and, under
a named directory, kept for reuse, marked complete by a metadata file written atomically after
the data (a crash mid-build is never reused). A stored cache is reused only for the same prefix,
dtype, compute precision, rank layout and data, every example of it: see
:func:`build_prefix_cache` for what that check costs.

16-bit storage rounds each value: bfloat16 to 8 significant bits (relative error ≤ 2⁻⁸ ≈ 0.4 %),
float16 to 11 (≤ 2⁻¹¹ ≈ 0.05 %; values beyond its range, |x| > 65504, are refused). Training
then sees rounded activations and is no longer exactly the uncached run (float32 storage is);
rounding is a fixed per-example map, so the privacy guarantee is unchanged.

The cache holds features of the private data: protect or delete a ``cache_dir`` like the data
itself. A cache directory (and any parent it creates) is 0700 and its files 0600, whatever
the umask; file names are hashes keyed with a secret salt kept in the directory
(:mod:`.prefix_keys`), and the log names the directory only. A cache of data since changed or
deleted stays in the directory (it cannot be told from another data set's cache) until the
directory is deleted.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import shutil
import socket
import tempfile
import warnings
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .checkpoint import atomic_save, fsync_dir, open_private, private_dir
from .data import collate_examples
from .distributed import Comm
from .memory import available_memory
from .precision import autocast
from .prefix_keys import FORMAT, CacheKey, HashedExamples, load_salt, stream_digest, tensor_digest
from .rank_rows import own_rows, part_tag

__all__ = ["PrefixCache", "CacheSpec", "build_prefix_cache", "STORAGE_DTYPES", "RAM_FRACTION"]

_LOG = logging.getLogger(__name__)
#: Accepted ``cache_dtype`` names; None means float32 (exact).
STORAGE_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                  "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
#: "auto" keeps the cache in RAM only below this fraction of the available memory: training
#: itself (per-sample gradients, activations) needs the rest.
RAM_FRACTION = 0.5
_GIB = 1 << 30
#: numpy dtype of each storage dtype's bits (numpy has no bfloat16: its bits are read as uint16).
_NUMPY = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.uint16}


# --------------------------------------------------------------------------- arguments
@dataclass(frozen=True)
class CacheSpec:
    """Where and how to cache: ``mode`` "auto" | "ram" | "disk", ``directory`` (None: RAM or a
    temporary directory deleted with the cache), ``dtype`` of the stored values."""

    mode: str = "auto"
    directory: Path | None = None
    dtype: torch.dtype = torch.float32

    @classmethod
    def parse(cls, cache_prefix: bool | str, cache_dir: str | os.PathLike | None,
              cache_dtype: str | torch.dtype | None) -> "CacheSpec | None":
        """``fit``'s cache arguments checked; None when caching is off (``cache_prefix=False``)."""
        modes = {True: "ram", "ram": "ram", "auto": "auto", "disk": "disk"}
        if not (cache_prefix is False or (isinstance(cache_prefix, (bool, str)) and cache_prefix in modes)):
            raise ValueError(f"cache_prefix must be 'auto' (default: RAM when it fits, else a memory-mapped file), "
                             f"True or 'ram', 'disk', or False (no cache), got {cache_prefix!r}")
        if not (cache_dir is None or isinstance(cache_dir, (str, os.PathLike))):
            raise ValueError(f"cache_dir must be a directory path or None, got {type(cache_dir).__name__}")
        known = isinstance(cache_dtype, (str, torch.dtype)) and (cache_dtype in STORAGE_DTYPES
                                                                 or cache_dtype in STORAGE_DTYPES.values())
        if not (cache_dtype is None or known):
            raise ValueError(f"cache_dtype must be None (float32), one of {sorted(STORAGE_DTYPES)} or the torch "
                             f"dtype, got {cache_dtype!r}")
        if cache_prefix is False and (cache_dir is not None or cache_dtype is not None):
            raise ValueError("cache_dir and cache_dtype configure the prefix cache, which cache_prefix=False "
                             "turns off: drop them or use cache_prefix='auto'")
        if cache_prefix is False:
            return None
        mode = modes[cache_prefix]
        if mode == "ram" and cache_dir is not None:
            raise ValueError("cache_prefix=True/'ram' keeps the cache in memory and never reads cache_dir: use "
                             "cache_prefix='auto' or 'disk' to store it there (and reuse it)")
        dtype = STORAGE_DTYPES.get(cache_dtype, cache_dtype) if cache_dtype is not None else torch.float32
        return cls(mode, None if cache_dir is None else Path(cache_dir), dtype)


# --------------------------------------------------------------------------- the dataset
class PrefixCache(Dataset):
    """Prefix outputs ``h`` (N, *shape) in their storage dtype and labels ``y`` (N,).

    ``self[i]`` is ``(a float32 copy of h[i], y[i])``. ``path``: the memory-mapped file, or None when
    ``h`` is in RAM. A mapped cache pickles as its path: DataLoader workers map it again.
    """

    def __init__(self, h: torch.Tensor, y: torch.Tensor, path: Path | None = None) -> None:
        self.h, self.y, self.path = h, y, path

    @classmethod
    def mapped(cls, path: Path, y: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> "PrefixCache":
        """The cache stored in ``path`` (raw values, C order), paged in on access.

        The mapping is shared and read-only: a private writable one (``torch.from_file``'s
        default) is charged to the process' memory commitment, which Linux refuses beyond
        RAM size, the very case a file is for.
        """
        array = np.memmap(path, dtype=_NUMPY[dtype], mode="r", shape=(len(y), *shape))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            h = torch.from_numpy(array)
        return cls(h.view(dtype), y, path)

    @property
    def nbytes(self) -> int:
        return self.h.numel() * self.h.element_size()

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.h[i].to(torch.float32, copy=True), self.y[i]  # a copy: a mapped store is read-only

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        if self.path is None:
            return PrefixCache, (self.h, self.y)
        return PrefixCache.mapped, (self.path, self.y, tuple(self.h.shape[1:]), self.h.dtype)


# --------------------------------------------------------------------------- memory
def _choose(spec: CacheSpec, needed: int, share: int) -> tuple[bool, str]:
    """(keep in RAM?, why, for the one-line report) for a cache of ``needed`` bytes, built while
    ``share`` ranks on this machine build theirs (each may take 1/share of the room)."""
    avail = available_memory()
    room = "available memory unknown" if avail is None else f"{avail / _GIB:.1f} GiB available"
    if share > 1:
        room = f"this rank's 1/{share} of {room}"
    fits = avail is None or needed <= RAM_FRACTION * avail / share
    share = f"{'within' if fits else 'over'} {RAM_FRACTION:.0%} of {room}"
    if spec.mode == "ram":
        return True, f"in RAM as asked (cache_prefix=True; {share})"
    if spec.mode == "disk":
        return False, f"memory-mapped file as asked (cache_prefix='disk'; {share})"
    if spec.directory is not None:
        paging = "the OS keeps it in its page cache" if fits else "pages are read from disk as needed"
        return False, f"memory-mapped file kept for reuse ({share}: {paging})"
    return fits, f"in RAM ({share})" if fits else f"memory-mapped file ({share})"


# --------------------------------------------------------------------------- building
Batch = tuple[int, torch.Tensor, torch.Tensor]  # (position of its first example, prefix outputs on CPU, labels)


@torch.no_grad()
def _prefix_batches(model: nn.Module, dataset: Dataset, batch_size: int, device: torch.device, quiet: bool,
                    desc: str, precision: str) -> Iterator[Batch]:
    start = 0
    for x, y in tqdm(DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_examples),
                     desc=f"caching prefix ({desc})", disable=quiet, leave=False):
        with autocast(device, precision):
            h = model.prefix(x.to(device)).cpu()
        yield start, h, torch.as_tensor(y)
        start += len(h)


def _to_storage(h: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    stored = h.to(dtype)
    if dtype != h.dtype and not torch.isfinite(stored).all() and torch.isfinite(h).all():
        raise ValueError(f"prefix outputs up to {float(h.abs().max()):.4g} overflow cache_dtype {dtype} (largest "
                         f"finite {torch.finfo(dtype).max:.5g}): use cache_dtype='bf16' (float32's range) or None")
    return stored


def _fill(first: Batch, rest: Iterator[Batch], n: int, write: Callable[[int, torch.Tensor], None]) -> torch.Tensor:
    """Hands every batch's outputs to ``write(start, h)``; returns the labels (N,)."""
    y = torch.empty(n, dtype=first[2].dtype)
    end = 0
    for start, h, labels in itertools.chain([first], rest):
        write(start, h)
        y[start:start + len(h)] = labels
        end = start + len(h)
    if end != n:
        raise RuntimeError(f"the data set yielded {end} examples, its len() is {n}")
    return y


def _in_ram(first: Batch, rest: Iterator[Batch], n: int, dtype: torch.dtype) -> PrefixCache:
    h = torch.empty((n, *first[1].shape[1:]), dtype=dtype)

    def write(start: int, batch: torch.Tensor) -> None:
        h[start:start + len(batch)] = _to_storage(batch, dtype)

    return PrefixCache(h, _fill(first, rest, n, write))


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        written = os.pwrite(fd, data, offset)
        data, offset = data[written:], offset + written


def _remove_stale_parts(directory: Path, stem: str) -> None:
    """Delete this host's partial files ``stem.<host>.<pid>.part`` whose builder process is gone (killed mid-build)."""
    host = socket.gethostname()
    for part in directory.glob(f"{stem}.{host}.*.part"):
        pid = int(part.name.rsplit(".", 2)[1])
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            part.unlink(missing_ok=True)
        except PermissionError:  # alive, another user's
            pass


def _in_file(first: Batch, rest: Iterator[Batch], n: int, dtype: torch.dtype, directory: Path, stem: str,
             name: Callable[[], str]) -> PrefixCache:
    """Writes ``directory/<name()>.bin`` (raw values, C order) through the partial file
    ``<stem>.<host>.<pid>.part``, then the completion marker ``<name()>.meta.pt`` (labels, shape,
    dtype), each atomically and 0600; maps the result. ``name()`` is asked once every example
    is written: it may be a hash of the data, taken as the examples stream through."""
    shape = tuple(first[1].shape[1:])
    nbytes = n * math.prod(shape) * dtype.itemsize
    free = shutil.disk_usage(directory).free
    if nbytes > free:
        raise OSError(f"the prefix cache needs {nbytes / _GIB:.2f} GiB and {directory} has {free / _GIB:.2f} GiB "
                      "free: name a cache_dir on a larger disk (without one, set TMPDIR), or use cache_dtype='bf16'")
    _remove_stale_parts(directory, stem)
    # Host and pid make concurrent builders (e.g. ranks sharing a file system) write apart.
    part = directory / f"{stem}.{socket.gethostname()}.{os.getpid()}.part"
    fd = open_private(part, os.O_WRONLY | os.O_TRUNC)  # features of private data: owner only
    try:
        if hasattr(os, "posix_fallocate"):
            os.posix_fallocate(fd, 0, nbytes)  # a full disk fails here, not with SIGBUS or mid-build

        def write(start: int, batch: torch.Tensor) -> None:
            raw = _to_storage(batch, dtype).contiguous().reshape(-1).view(torch.uint8).numpy()
            _pwrite_all(fd, memoryview(raw), start * (nbytes // n))

        y = _fill(first, rest, n, write)
        os.fsync(fd)
        key = name()
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)
    data, meta = directory / f"{key}.bin", directory / f"{key}.meta.pt"
    os.replace(part, data)
    fsync_dir(directory)  # the data's name is on disk before the marker that vouches for it
    atomic_save({"format": FORMAT, "key": key, "shape": shape, "dtype": str(dtype).removeprefix("torch."),
                 "labels": y}, meta)
    return PrefixCache.mapped(data, y, shape, dtype)


def _open_stored(directory: Path, key: str) -> PrefixCache | None:
    """The complete cache ``key`` in ``directory``, or None (absent, unfinished or damaged)."""
    data = directory / f"{key}.bin"
    try:
        meta = torch.load(directory / f"{key}.meta.pt", map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 -- no readable completion marker: build it again
        return None
    if not (isinstance(meta, dict) and meta.get("format") == FORMAT and meta.get("key") == key):
        return None
    dtype, shape, y = STORAGE_DTYPES[meta["dtype"]], tuple(meta["shape"]), meta["labels"]
    if not data.is_file() or data.stat().st_size != len(y) * math.prod(shape) * dtype.itemsize:
        return None
    return PrefixCache.mapped(data, y, shape, dtype)


def _say(message: str, quiet: bool) -> None:
    _LOG.info(message)
    if not quiet:
        tqdm.write(message)


Store = tuple[str, Callable[[], str]]  # (stem of the partial file, the cache's name once every example is in)


def _build(model: nn.Module, dataset: Dataset, spec: CacheSpec, store: Store | None, *, batch_size: int,
           device: torch.device, quiet: bool, desc: str, precision: str, share: int) -> PrefixCache:
    """Computes the cache: in RAM, in ``spec.directory`` under ``store``'s name, or in a temporary directory."""
    n = len(dataset)
    batches = _prefix_batches(model, dataset, batch_size, device, quiet, desc, precision)
    first = next(batches)
    needed = n * first[1][0].numel() * spec.dtype.itemsize
    in_ram, why = _choose(spec, needed, share)
    size = f"{n} x {tuple(first[1].shape[1:])} {str(spec.dtype).removeprefix('torch.')}, {needed / _GIB:.2f} GiB"
    if in_ram:
        _say(f"prefix cache ({desc}): {size}, {why}", quiet)
        return _in_ram(first, batches, n, spec.dtype)
    if store is not None:
        _say(f"prefix cache ({desc}): {size}, {why}, in {spec.directory}", quiet)
        return _in_file(first, batches, n, spec.dtype, spec.directory, *store)
    tmp = private_dir(tempfile.mkdtemp(prefix="dp_taft_prefix_"))  # mkdtemp's 0700 is less the umask
    _say(f"prefix cache ({desc}): {size}, {why}, in {tmp} (deleted after use; name a cache_dir to keep it)", quiet)
    try:
        cache = _in_file(first, batches, n, spec.dtype, tmp, "prefix", lambda: "prefix")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    weakref.finalize(cache, shutil.rmtree, tmp, True)  # the mapping itself stays valid until the tensor is freed
    return cache


def build_prefix_cache(model: nn.Module, dataset: Dataset, spec: CacheSpec, *, batch_size: int,
                       device: torch.device, quiet: bool, desc: str, precision: str = "fp32",
                       comm: Comm = Comm()) -> PrefixCache:
    """``model.prefix`` of every example of ``dataset`` (batches of ``batch_size`` on ``device``,
    under ``precision``'s autocast), stored per ``spec``; in a data-parallel run (``comm``), of
    this rank's examples only (its block of positions: :func:`~.rank_rows.own_rows`), in
    order, so each rank computes and stores 1/world of the cache; "auto" gives each of
    the ranks on one machine (``LOCAL_WORLD_SIZE``) an equal share of its memory.

    With ``spec.directory``, a complete cache of the same prefix, N, dtype, precision, rows
    and data is reused (no prefix computed) and a new one is kept there. Ranks sharing a
    directory (a common file system) build their parts at once: each writes its own partial
    file and its own completion marker, and reads the shared salt. A part is reused by the
    same rank of a run with the same world size; with another world size, each rank's part is
    computed again (the log says so) and the old parts stay until the directory is deleted.
    The data must match in every example, labels included. A plain TensorDataset's tensors
    are hashed whole, without a pass over the examples. Any other data set is hashed example
    by example during the pass that computes the prefix. When the directory holds caches of
    these rows, reusing one takes a pass that reads (decodes, transforms) and hashes every
    example, without the prefix forward and the write: 3-5 % of a build of TAFT-2's prefix on
    ViT-S/16, 24-43 % for a patch-embedding-only prefix, on a shared 2-core CPU reading and
    hashing 0.04-0.14 GB/s of float32 images (``python -m experiments.bench_cache --reuse``); on a GPU
    the prefix is faster and the share larger. A data set that reads differently every
    time (random transforms) is never reused. One line (logger
    ``dp_taft.privacy.prefix_cache``, and printed unless ``quiet``) says what was chosen
    and why; it names the directory only.
    """
    n = len(dataset)
    if n == 0:
        raise ValueError(f"cannot cache the prefix of an empty data set ({desc})")
    rows = own_rows(dataset, comm)
    if comm.distributed:
        desc = f"{desc}, rank {comm.rank} of {comm.world}: {len(rows)} of {n} examples"
    # Ranks on one machine (torchrun's LOCAL_WORLD_SIZE) build at once, each seeing the same free memory.
    share = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if comm.distributed else 1
    kwargs = dict(batch_size=batch_size, device=device, quiet=quiet, desc=desc, precision=precision, share=share)
    if spec.directory is None:
        return _build(model, rows, spec, None, **kwargs)
    private_dir(spec.directory)  # features, labels and the salt: owner-only, whatever the umask
    key = CacheKey.of(load_salt(spec.directory), model, n, spec.dtype, precision, part_tag(comm))
    tensors = tensor_digest(rows, key.salt)
    held = any(spec.directory.glob(f"{key.layout}-*.meta.pt"))  # caches of these rows
    digest = tensors
    if digest is None and held:
        digest = stream_digest(rows, key.salt, lambda positions: tqdm(
            positions, desc=f"verifying prefix cache ({desc})", disable=quiet, leave=False))
    found = None if digest is None else _open_stored(spec.directory, key.name(digest))
    if found is not None:
        how = "its tensors hashed" if tensors is not None else "each one read and hashed"
        _say(f"prefix cache ({desc}): reusing the cache in {spec.directory} ({found.nbytes / _GIB:.2f} GiB), "
             f"verified against every example of the data ({how}); no prefix computed", quiet)
        return found
    _say_why_not_reused(spec.directory, key, held, desc, quiet)
    if tensors is not None:
        return _build(model, rows, spec, (key.layout, lambda: key.name(tensors)), **kwargs)
    # Named by what the build pass itself read: data that changed since the check cannot slip in.
    hashed = HashedExamples(rows, key.salt)
    return _build(model, hashed, spec, (key.layout, lambda: key.name(hashed.hexdigest())), **kwargs)


def _say_why_not_reused(directory: Path, key: CacheKey, held: bool, desc: str, quiet: bool) -> None:
    """Say why a stored cache of this prefix is not reused: other data, or another rank layout."""
    if held:
        _say(f"prefix cache ({desc}): the caches of this prefix in {directory} did not match the data (they "
             "hold other data, or an earlier version of it): computing it again", quiet)
        return
    layouts = key.stored_parts(directory)
    if layouts:
        _say(f"prefix cache ({desc}): {directory} holds caches of this prefix for other rank layouts "
             f"({', '.join(layouts)}; w<world size>r<rank>), not for this one ({key.part}): computing this "
             "rank's rows again", quiet)
