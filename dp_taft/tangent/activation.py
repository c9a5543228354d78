"""Tangent of the GELU activations (exact erf form and tanh approximation)."""

from __future__ import annotations

import timm.layers
import torch
import torch.nn as nn
import torch.nn.functional as F

from .dual import Tangent
from .registry import register_tangent

__all__ = ["TangentGELU"]


class _GeluTangent(torch.autograd.Function):
    """dx ↦ gelu'(x) ⊙ dx, saving only x for backward.

    The map is linear in dx with the diagonal Jacobian gelu'(x), so its VJP is
    g ↦ gelu'(x) ⊙ g: the same fused ``gelu_backward`` kernel. Autograd's generic
    rule for ``gelu_backward`` would also save dx (for the x-derivative, which the
    tangent stream never needs), doubling the MLP's saved activations.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(dx, x, approximate):
        return torch.ops.aten.gelu_backward(dx, x, approximate=approximate)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, x, approximate = inputs
        ctx.save_for_backward(x)
        ctx.approximate = approximate

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return torch.ops.aten.gelu_backward(grad, x, approximate=ctx.approximate), None, None

_APPROXIMATE: dict[type[nn.Module], str] = {
    timm.layers.GELU: "none",
    timm.layers.GELUTanh: "tanh",
}


@register_tangent(nn.GELU, timm.layers.GELU, timm.layers.GELUTanh)
class TangentGELU(nn.Module):
    r"""Linearization of the pointwise GELU (no parameters): dy = gelu'(x) ⊙ dx.

    Derivation: exact GELU is x·Φ(x), so gelu'(x) = Φ(x) + x·φ(x) (Φ, φ the standard
    normal cdf and pdf). The tanh form is 0.5·x·(1 + tanh(u)), u = c·(x + a·x³),
    c = √(2/π), a = 0.044715, so gelu'(x) = 0.5·(1 + tanh u) + 0.5·x·(1 − tanh²u)·c·(1 + 3a·x²).

    ``gelu_backward(dx, x)`` evaluates exactly ``gelu'(x) ⊙ dx`` for either form in one
    fused kernel (it is GELU's own backward); :class:`_GeluTangent` differentiates it in
    dx only, which is all the tangent stream needs: x never depends on Δw.
    """

    def __init__(self, source_layer: nn.Module, path: str) -> None:
        super().__init__()
        self.source = path
        self.approximate = (
            source_layer.approximate if type(source_layer) is nn.GELU else _APPROXIMATE[type(source_layer)]
        )

    def forward(self, x: torch.Tensor, dx: Tangent) -> tuple[torch.Tensor, Tangent]:
        y = F.gelu(x, approximate=self.approximate)
        if dx is None:
            return y, None
        return y, _GeluTangent.apply(dx, x, self.approximate)
