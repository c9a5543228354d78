"""Tangent of LayerScale (per-channel scaling), and the Δ module it owns; also the Δ of a
layer scale or bias held as a bare parameter of its layer (BEiT's and EVA's ``gamma_1``,
``q_bias``...), both channel scales."""

from __future__ import annotations

import timm.layers
import torch
import torch.nn as nn

from .base import DeltaLeaf, frozen
from .dual import Tangent
from .registry import register_tangent

__all__ = ["DeltaScale", "TangentBias", "TangentGamma", "TangentLayerScale", "constant_ones", "gamma_tangent",
           "layer_scale"]


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


class TangentGamma(TangentLayerScale):
    """The tangent of ``γ ⊙ x`` for a layer-scale vector held as a bare parameter of its block
    (BEiT's and EVA's ``gamma_1``, ``gamma_2``); the rule is :class:`TangentLayerScale`'s."""

    def __init__(self, gamma: nn.Parameter, path: str, name: str) -> None:
        DeltaLeaf.__init__(self, path)
        self.delta_names = {"weight": name}
        self.gamma0 = frozen(gamma)
        self.delta = DeltaScale(gamma.shape[-1], device=gamma.device, dtype=gamma.dtype)


def gamma_tangent(block: nn.Module, name: str, path: str) -> TangentGamma | None:
    """:class:`TangentGamma` of ``block.<name>``, its Δ named ``<path>.<name>``; None where the block has none."""
    gamma = getattr(block, name, None)
    return None if gamma is None else TangentGamma(gamma, path, name)


def constant_ones(x: torch.Tensor, dim: int) -> torch.Tensor:
    """A stride-0 tensor of ones of shape (*x.shape[:-1], dim): the constant feature a bias scales."""
    return x.new_ones(()).expand(*x.shape[:-1], dim)


class TangentBias(DeltaLeaf):
    r"""The Δ of a bias held as a bare parameter of its layer (BEiT's and EVA's ``q_bias``, ``v_bias``).

    Derivation: y = z + b is affine in b, so dy = dz + Δb. Δb is a channel scale of the
    constant feature 1, ``Δb = 1 ⊙ Δb``: a :class:`DeltaScale` applied to
    :func:`constant_ones`, whose registered per-sample gradient Σ_tokens ∂L/∂y ⊙ 1 (and
    book-keeping rule) is exactly the per-sample gradient of the bias.
    """

    def __init__(self, bias: nn.Parameter, path: str, name: str) -> None:
        super().__init__(path)
        self.delta_names = {"weight": name}
        self.delta = DeltaScale(bias.shape[-1], device=bias.device, dtype=bias.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Δb broadcast over the leading dimensions of ``x`` (B, N, ·)."""
        return self.delta(constant_ones(x, self.delta.weight.shape[0]))


def layer_scale(values: torch.Tensor) -> timm.layers.LayerScale:
    """A trainable timm ``LayerScale`` holding a copy of ``values`` (dim,): for non-linear
    fine-tuning, a bare layer-scale or bias parameter as a layer Opacus samples exactly."""
    scale = timm.layers.LayerScale(values.shape[-1], device=values.device, dtype=values.dtype)
    with torch.no_grad():
        scale.gamma.copy_(values)
    return scale
