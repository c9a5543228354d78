"""Tangent of LayerScale (per-channel scaling), and the Δ module it owns."""

from __future__ import annotations

import timm.layers
import torch
import torch.nn as nn

from .base import DeltaLeaf, frozen
from .dual import Tangent
from .registry import register_tangent

__all__ = ["DeltaScale", "TangentLayerScale"]


class DeltaScale(nn.Module):
    """``x ↦ x ⊙ weight`` over the last dimension, weight of shape (dim,), zero at init.

    Its per-sample gradient Σ_tokens (∂L/∂y) ⊙ x is registered with Opacus in
    :mod:`dp_taft.privacy.grad_samplers`.
    """

    def __init__(self, dim: int, *, device=None, dtype=None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


@register_tangent(timm.layers.LayerScale)
class TangentLayerScale(DeltaLeaf):
    r"""Linearization of ``y = γ ⊙ x`` around γ0.

    Derivation: y is bilinear in (γ, x), so dy = γ0 ⊙ dx + Δγ ⊙ x, the second term
    being a :class:`DeltaScale` applied to the primal x.
    """

    delta_names = {"weight": "gamma"}

    def __init__(self, source_layer: timm.layers.LayerScale, path: str) -> None:
        super().__init__(path)
        g = source_layer.gamma
        self.gamma0 = frozen(g)
        self.delta = DeltaScale(g.shape[-1], device=g.device, dtype=g.dtype)

    def forward(self, x: torch.Tensor, dx: Tangent) -> tuple[torch.Tensor, torch.Tensor]:
        if dx is None:
            return x * self.gamma0, self.delta(x)
        return x * self.gamma0, (dx * self.gamma0).add_(self.delta(x))  # in place on a fresh tensor
