"""Tangent of LayerNorm over the last dimension."""

from __future__ import annotations

import timm.layers
import torch
import torch.nn as nn

from .base import DeltaLeaf, frozen
from .dual import Tangent
from .registry import UnsupportedModelError, describe, register_tangent

__all__ = ["TangentLayerNorm"]


class _NormalizeTangent(torch.autograd.Function):
    """dx ↦ γ0 ⊙ (∂x̂/∂x) dx, with both directions as one fused LayerNorm-backward kernel.

    ∂x̂/∂x is symmetric, so its product with a vector is exactly what
    ``native_layer_norm_backward`` computes for a weight-less LayerNorm; the VJP of
    dx ↦ γ0 ⊙ J dx is g ↦ J (γ0 ⊙ g), the same kernel with weight γ0. This replaces a
    chain of about ten elementwise ops (forward and backward) by two kernels.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(dx, x, mean, rstd, weight0, shape):
        j_dx = torch.ops.aten.native_layer_norm_backward(dx, x, shape, mean, rstd, None, None, [True, False, False])[0]
        return j_dx * weight0

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, x, mean, rstd, weight0, shape = inputs
        ctx.save_for_backward(x, mean, rstd, weight0)
        ctx.shape = shape

    @staticmethod
    def backward(ctx, grad):
        x, mean, rstd, weight0 = ctx.saved_tensors
        grad_dx = torch.ops.aten.native_layer_norm_backward(
            grad, x, ctx.shape, mean, rstd, weight0, None, [True, False, False]
        )[0]
        return grad_dx, None, None, None, None, None


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
    from one fused ``native_layer_norm`` call on the primal; the γ0 ⊙ dx̂ term is one
    fused kernel each way (:class:`_NormalizeTangent`).
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
        # Under autocast the primal or the tangent may arrive in bf16: normalisation runs in the
        # parameters' dtype (fp32), as autocast runs layer_norm itself, and the fused kernels
        # need one dtype for all their inputs.
        x = x.to(self.weight0.dtype)
        y, mean, rstd = torch.native_layer_norm(x, self.normalized_shape, self.weight0, self.bias0, self.eps)
        if dx is None:
            return y, self.delta(x)
        d_norm = _NormalizeTangent.apply(dx.to(x.dtype), x, mean, rstd, self.weight0, self.normalized_shape)
        return y, d_norm.add_(self.delta(x))  # in place on a fresh, unsaved tensor
