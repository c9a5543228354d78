"""The fingerprint of the base (w0 and structure) a trained method module moved from.

One function, :func:`fingerprint`, used wherever two models must share a base: a model file
loads only onto it (:mod:`dp_taft.model_file`), tangent models compose only with it
(:func:`dp_taft.compose.compose`, through :meth:`dp_taft.TangentViT.fingerprint`), and a shard
set reloads only around it (``shards.json``). It imports nothing from dp_taft, so every
module, the tangent model included, can use it without an import cycle.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

__all__ = ["fingerprint"]


def fingerprint(model: nn.Module) -> str:
    """SHA-256 (64 hex digits) of a trained method module's structure and frozen tensors.

    Hashes the module type, k, the pooling, the name, dtype and shape of every parameter and
    buffer, and the bytes of every frozen one (parameters with ``requires_grad=False`` and all
    buffers): w0 as the trained function uses it, for TAFT including the head w0. Trainable
    values are left out, so the fingerprint is that of the base the training moved from: two
    models compose, and a model file loads, only onto an equal fingerprint. Device-independent.
    """
    pool = getattr(model, "global_pool", getattr(getattr(model, "net", None), "global_pool", None))
    digest = hashlib.sha256(f"{type(model).__qualname__};blocks={getattr(model, 'num_blocks', None)};"
                            f"pool={pool}".encode())
    frozen = [(name, p, not p.requires_grad) for name, p in model.named_parameters()]
    frozen += [(f"buffer:{name}", b, True) for name, b in model.named_buffers()]
    for name, tensor, is_frozen in frozen:
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}:{'frozen' if is_frozen else 'trained'};".encode())
        if is_frozen:
            digest.update(_raw_bytes(tensor))
    return digest.hexdigest()


def _raw_bytes(tensor: torch.Tensor) -> bytes:
    """The tensor's elements as stored (any dtype, bfloat16 too), in row-major order."""
    return tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
