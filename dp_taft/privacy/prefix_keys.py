"""What identifies a stored prefix cache: what the model's prefix computes, which data, which storage dtype.

:func:`cache_key` names a cache in a ``cache_dir``; a stored cache is reused only under the same key.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
import torch.nn as nn
from torch.utils.data import Dataset, TensorDataset

__all__ = ["cache_key", "prefix_fingerprint", "data_fingerprint", "FORMAT", "FULL_HASH_BYTES", "SAMPLE_EXAMPLES"]

FORMAT = "dp_taft.prefix_cache/1"
#: TensorDatasets up to this size (bytes) are fingerprinted from all their bytes; other data
#: from N and :data:`SAMPLE_EXAMPLES` evenly spaced examples (see :func:`data_fingerprint`).
FULL_HASH_BYTES = 1 << 30
SAMPLE_EXAMPLES = 256


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


def data_fingerprint(dataset: Dataset) -> str:
    """SHA-256 of the examples as the prefix sees them (after the dataset's own transforms).

    A TensorDataset up to :data:`FULL_HASH_BYTES` is hashed whole (it is in RAM: about a
    second per GiB). Anything else is hashed from N and :data:`SAMPLE_EXAMPLES` evenly
    spaced examples, first and last included: reading every example again would cost a
    decode and transform of the whole data set on every reuse. A different split,
    subsample, transform or order changes the sampled examples with near certainty; an
    in-place edit of unsampled examples does not, so give changed data a new cache_dir.
    """
    n = len(dataset)
    digest = hashlib.sha256(f"{type(dataset).__qualname__};n={n}".encode())
    tensors = dataset.tensors if isinstance(dataset, TensorDataset) else None
    if tensors is not None and sum(t.numel() * t.element_size() for t in tensors) <= FULL_HASH_BYTES:
        for t in tensors:
            _hash_tensor(digest, t)
        return digest.hexdigest()
    for i in sorted({round(j * (n - 1) / max(1, SAMPLE_EXAMPLES - 1)) for j in range(min(n, SAMPLE_EXAMPLES))}):
        for value in dataset[i]:
            _hash_tensor(digest, torch.as_tensor(value))
    return digest.hexdigest()


def cache_key(model: nn.Module, dataset: Dataset, dtype: torch.dtype) -> str:
    """32 hex digits naming a stored cache: format, prefix and data fingerprints, storage dtype."""
    blob = json.dumps([FORMAT, prefix_fingerprint(model), data_fingerprint(dataset), str(dtype)])
    return hashlib.sha256(blob.encode()).hexdigest()[:32]
