"""Composition of tangent models: averaging Δw is exactly an output ensemble.

The tangent model is affine in Δw: f_lin(x; Δw) = f(x; w0) + J(x; w0)·Δw. For weights
a_i with Σ a_i = 1,

    f_lin(x; Σ a_i Δw_i) = Σ a_i f(x; w0) + J·Σ a_i Δw_i = Σ a_i f_lin(x; Δw_i),

so one model with the averaged Δw answers exactly like the weighted ensemble of the
models, at the cost of one. This holds only for models linearized around the same w0
with the same structure, which :func:`compose` checks by fingerprint.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch

from .tangent import TangentViT

__all__ = ["compose"]


def compose(models: Sequence[TangentViT], weights: Sequence[float] | None = None) -> TangentViT:
    """A new tangent model whose Δw is the weighted average of ``models``' Δw.

    Args:
        models: one or more :class:`TangentViT` linearized around the same w0 with the
            same ``blocks`` (checked with :meth:`TangentViT.fingerprint`).
        weights: one real weight per model, summing to 1 (|Σ − 1| <= 1e-9); uniform
            when None. The output then equals the same weighted average of the models'
            outputs, exactly up to round-off.

    Returns:
        A fresh model (the inputs are not modified).

    Raises:
        ValueError: empty ``models``, wrong number of weights, weights not summing to 1,
            or models linearized around different w0 / with different structure.
    """
    if not models:
        raise ValueError("compose() needs at least one tangent model")
    for i, m in enumerate(models):
        if not isinstance(m, TangentViT):
            raise ValueError(f"models[{i}] is a {type(m).__name__}; compose() takes TangentViT models (dp_taft.linearize)")
    if weights is None:
        weights = [1.0 / len(models)] * len(models)
    weights = [float(w) for w in weights]
    if len(weights) != len(models):
        raise ValueError(f"got {len(weights)} weights for {len(models)} models; give one weight per model")
    if not all(math.isfinite(w) for w in weights) or abs(math.fsum(weights) - 1.0) > 1e-9:
        raise ValueError(
            f"weights must be finite and sum to 1 (an affine combination), got {weights} "
            f"(sum {math.fsum(weights)}); normalize them, e.g. by shard sizes / total"
        )
    reference = models[0].fingerprint()
    for i, m in enumerate(models[1:], start=1):
        if m.fingerprint() != reference:
            raise ValueError(
                f"models[{i}] was linearized around different pretrained weights w0 or with a "
                f"different structure (blocks={m.num_blocks} vs {models[0].num_blocks}) than "
                "models[0]; only tangent models of the same w0 and blocks compose exactly"
            )
    composed = copy.deepcopy(models[0])
    states = [m.delta_state_dict() for m in models]
    with torch.no_grad():
        for name, delta in composed.deltas().items():
            delta.copy_(sum(w * s[name] for w, s in zip(weights, states)))
    return composed
