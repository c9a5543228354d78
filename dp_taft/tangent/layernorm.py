"""Tangent of LayerNorm over the last dimension."""

from __future__ import annotations

import timm.layers
import torch
import torch.nn as nn

from .base import DeltaLeaf, frozen
from .dual import Tangent, add_tangents
from .registry import UnsupportedModelError, describe, register_tangent

__all__ = ["TangentLayerNorm"]


@register_tangent(nn.LayerNorm, timm.layers.LayerNorm)
class TangentLayerNorm(DeltaLeaf):
    r"""Linearization of ``y = γ ⊙ x̂ + β``, ``x̂ = (x − μ(x)) / σ(x)``, around (γ0, β0).

    Derivation (n = normalized size, σ = sqrt(var(x) + eps), means over the last dim):
    the normalization has the symmetric Jacobian
    ∂x̂/∂x = (1/σ)(I − 11ᵀ/n − x̂x̂ᵀ/n), so with t = dx/σ

        dx̂ = t − mean(t) − x̂ ⊙ mean(x̂ ⊙ t)

    and the output tangent is

        dy = γ0 ⊙ dx̂ + (Δγ ⊙ x̂ + Δβ).

    The second term is an ``nn.LayerNorm`` with affine parameters (Δγ, Δβ) applied to
    the primal x, which Opacus' LayerNorm grad sampler handles exactly. x̂ and 1/σ come
    from one fused ``native_layer_norm`` call on the primal.
    """

    delta_names = {"weight": "weight", "bias": "bias"}

    def __init__(self, source_layer: nn.LayerNorm, path: str) -> None:
        super().__init__(path)
        shape = tuple(source_layer.normalized_shape)
        if (
            len(shape) != 1
            or source_layer.weight is None
            or source_layer.bias is None
        ):
            raise UnsupportedModelError(
                f"'{path}' ({describe(source_layer)}) must normalize the last dimension only "
                "and have both an affine weight and a bias (Opacus' LayerNorm sampler needs "
                f"the bias); got normalized_shape={shape}, weight="
                f"{source_layer.weight is not None}, bias={source_layer.bias is not None}."
            )
        self.normalized_shape = shape
        self.eps = source_layer.eps
        self.weight0 = frozen(source_layer.weight)
        self.bias0 = frozen(source_layer.bias)
        w = source_layer.weight
        self.delta = nn.LayerNorm(shape, eps=self.eps, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            self.delta.weight.zero_()
            self.delta.bias.zero_()

    def forward(self, x: torch.Tensor, dx: Tangent) -> tuple[torch.Tensor, torch.Tensor]:
        x_hat, _, rstd = torch.native_layer_norm(x, self.normalized_shape, None, None, self.eps)
        y = torch.addcmul(self.bias0, x_hat, self.weight0)
        d_hat = None
        if dx is not None:
            t = dx * rstd
            d_hat = t - t.mean(-1, keepdim=True) - x_hat * (x_hat * t).mean(-1, keepdim=True)
            d_hat = d_hat * self.weight0
        return y, add_tangents(d_hat, self.delta(x))
