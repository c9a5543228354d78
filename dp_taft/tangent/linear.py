"""Tangent of an affine layer."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import DeltaLeaf, frozen
from .dual import Tangent
from .registry import register_tangent

__all__ = ["DeltaLinear", "TangentLinear", "per_sample_gradients_only"]


class _NoSummedGrad(torch.autograd.Function):
    """F.linear whose backward produces nothing.

    Used only while Opacus' hooks compute per-sample gradients: the module's backward
    hook still receives ∂L/∂y (it fires on the output, the input needing no grad),
    while autograd skips the summed ΔW gradient that DP-SGD would overwrite anyway
    with the clipped, noised sum — one of the six matmul passes of a tangent layer.
    """

    @staticmethod
    def forward(x, weight, bias):
        return F.linear(x, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return None, None, None


class DeltaLinear(nn.Module):
    """The Δ of an affine layer, ``y = x ΔWᵀ + Δb``, zero at init.

    It behaves as ``nn.Linear`` (same parameters, same maths, and Opacus' Linear
    samplers registered for it in :mod:`dp_taft.privacy.grad_samplers`), with one
    switch: ``summed_grad = False`` stops autograd from also computing the summed
    ``.grad`` — see :func:`per_sample_gradients_only`.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, *, device=None, dtype=None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
        self.summed_grad = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.summed_grad:
            return F.linear(x, self.weight, self.bias)
        return _NoSummedGrad.apply(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


@contextmanager
def per_sample_gradients_only(model: nn.Module) -> Iterator[None]:
    """Within this block, backward leaves ``.grad`` of every :class:`DeltaLinear` unset.

    For DP-SGD with Opacus in ``grad_sample_mode="hooks"`` only: the optimizer builds
    ``.grad`` from the per-sample gradients (clip, sum, add noise), so the summed
    gradient autograd would compute is wasted work. Do NOT use it with ghost clipping
    (its second backward needs ``.grad``), torch.func, or a non-private optimizer.
    """
    layers = [m for m in model.modules() if isinstance(m, DeltaLinear)]
    for layer in layers:
        layer.summed_grad = False
    try:
        yield
    finally:
        for layer in layers:
            layer.summed_grad = True


@register_tangent(nn.Linear)
class TangentLinear(DeltaLeaf):
    r"""Linearization of ``y = W x + b`` around (W0, b0).

    Derivation: with W = W0 + ΔW and b = b0 + Δb, the output is bilinear in (W, x),
    so its first-order expansion in (ΔW, dx) is

        y  = W0 x + b0
        dy = W0 dx + (ΔW x + Δb)

    The second term is exactly a linear layer with weights (ΔW, Δb) applied to the
    *primal* input x (:class:`DeltaLinear`). Holding Δ in such a child is what lets
    Opacus' Linear grad sampler produce the exact per-sample gradient of ΔW, namely
    Σ_tokens (∂L/∂dy) ⊗ x, from the ordinary backward pass; W0 acts on the tangent
    through ``F.linear``. Cost: three matmuls (W0 x, ΔW x, W0 dx), two when dx = 0.
    """

    delta_names = {"weight": "weight", "bias": "bias"}

    def __init__(self, source_layer: nn.Linear, path: str) -> None:
        super().__init__(path)
        self.weight0 = frozen(source_layer.weight)
        self.bias0 = None if source_layer.bias is None else frozen(source_layer.bias)
        w = source_layer.weight
        self.delta = DeltaLinear(
            source_layer.in_features,
            source_layer.out_features,
            bias=source_layer.bias is not None,
            device=w.device,
            dtype=w.dtype,
        )

    def forward(self, x: torch.Tensor, dx: Tangent) -> tuple[torch.Tensor, torch.Tensor]:
        y = F.linear(x, self.weight0, self.bias0)
        if dx is None:
            return y, self.delta(x)
        # In place on the fresh W0·dx (nothing saved it): one (B, N, out) buffer fewer at peak.
        return y, F.linear(dx, self.weight0).add_(self.delta(x))
