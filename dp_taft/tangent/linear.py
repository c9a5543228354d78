"""Tangent of an affine layer."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import DeltaLeaf, frozen
from .dual import Tangent, add_tangents
from .registry import register_tangent

__all__ = ["TangentLinear"]


@register_tangent(nn.Linear)
class TangentLinear(DeltaLeaf):
    r"""Linearization of ``y = W x + b`` around (W0, b0).

    Derivation: with W = W0 + ΔW and b = b0 + Δb, the output is bilinear in (W, x),
    so its first-order expansion in (ΔW, dx) is

        y  = W0 x + b0
        dy = W0 dx + (ΔW x + Δb)

    The second term is exactly an ``nn.Linear`` with weights (ΔW, Δb) applied to the
    *primal* input x. Holding Δ in such a child is what lets Opacus' built-in Linear
    grad sampler produce the exact per-sample gradient of ΔW, namely
    Σ_tokens (∂L/∂dy) ⊗ x, from the ordinary backward pass; W0 acts on the tangent
    through ``F.linear``. Cost: three matmuls (W0 x, ΔW x, W0 dx), two when dx = 0.
    """

    delta_names = {"weight": "weight", "bias": "bias"}

    def __init__(self, source_layer: nn.Linear, path: str) -> None:
        super().__init__(path)
        self.weight0 = frozen(source_layer.weight)
        self.bias0 = None if source_layer.bias is None else frozen(source_layer.bias)
        w = source_layer.weight
        self.delta = nn.Linear(
            source_layer.in_features,
            source_layer.out_features,
            bias=source_layer.bias is not None,
            device=w.device,
            dtype=w.dtype,
        )
        with torch.no_grad():
            for p in self.delta.parameters():
                p.zero_()

    def forward(self, x: torch.Tensor, dx: Tangent) -> tuple[torch.Tensor, torch.Tensor]:
        y = F.linear(x, self.weight0, self.bias0)
        dy = add_tangents(None if dx is None else F.linear(dx, self.weight0), self.delta(x))
        return y, dy
