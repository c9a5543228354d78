"""Book-keeping rules: per layer class, what one layer's Δ keeps until the clip factors are known.

A rule ``rule(layer, A, G, owner)`` gets the layer's input A and output gradient G (already in
the parameters' precision) and returns a state with each example's squared gradient norm and,
given the clip weights, the layer's share of the clipped sum (:mod:`dp_taft.privacy.bookkeeping`
calls them; :func:`register_bk_rule` adds one, as Opacus' ``register_grad_sampler``). Linear Δ
(ΔW, Δb, and ``nn.Linear`` for NLFT) never materialize per-example gradients
(:mod:`.bk_kernels`); LayerNorm affine, LayerScale, a Swin/BEiT relative position bias table
(:class:`~dp_taft.tangent.swin.PositionTable`) and a parameter added to an activation
(:class:`~dp_taft.tangent.pooling.ParameterAdd`) have small per-example gradients,
materialized in the hook.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import timm.layers
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..tangent.layerscale import DeltaScale
from ..tangent.linear import DeltaLinear
from ..tangent.pooling import ParameterAdd, per_example_sum
from ..tangent.swin import PositionTable
from .bk_kernels import by_chunks, direct_sq, flat, ghost_sq, norm_method, weighted_gram

if TYPE_CHECKING:
    from .bookkeeping import BookKeepingModule

__all__ = ["BK_RULES", "BookState", "Rule", "register_bk_rule"]


@dataclass
class _LinearState:
    """What a linear Δ keeps until the clip factors are known: A, G (flattened to (B, M, d))."""

    a: torch.Tensor | None  # None when the weight is frozen
    g: torch.Tensor | None
    g_sum: torch.Tensor | None  # Σ_t G_t (B, d_out), for the bias; None without a trainable bias
    weight: nn.Parameter
    bias: nn.Parameter | None
    sq_norms: torch.Tensor  # (B,) squared per-example norm of this layer's gradient

    def clipped_sum(self, w: torch.Tensor) -> Iterator[tuple[nn.Parameter, torch.Tensor]]:
        if self.a is not None:
            yield self.weight, weighted_gram(self.g, self.a, w).view_as(self.weight)
        if self.g_sum is not None:
            yield self.bias, w @ self.g_sum


@dataclass
class _SampledState:
    """Small per-example gradients (C entries each), materialized in the hook."""

    grads: dict[nn.Parameter, torch.Tensor]  # param -> (B, *param.shape)
    sq_norms: torch.Tensor

    def clipped_sum(self, w: torch.Tensor) -> Iterator[tuple[nn.Parameter, torch.Tensor]]:
        for p, gs in self.grads.items():
            yield p, torch.tensordot(w, gs, dims=1)


BookState = _LinearState | _SampledState
Rule = Callable[[nn.Module, torch.Tensor, torch.Tensor, "BookKeepingModule"], BookState]
#: Exact layer class -> rule(layer, input A, output gradient G, the BookKeepingModule) -> state.
BK_RULES: dict[type[nn.Module], Rule] = {}


def register_bk_rule(*classes: type[nn.Module]) -> Callable[[Rule], Rule]:
    """Register a BK rule for layers of exactly these classes (subclasses are not matched)."""

    def decorate(rule: Rule) -> Rule:
        for cls in classes:
            BK_RULES[cls] = rule
        return rule

    return decorate


@register_bk_rule(DeltaLinear, nn.Linear)
def _linear_rule(layer: nn.Module, a: torch.Tensor, g: torch.Tensor, owner: "BookKeepingModule") -> _LinearState:
    a, g = owner.nonzero_rows(layer, flat(a.to(g.dtype)), flat(g))
    b, m, d_in = a.shape
    parts = []
    keep = layer.weight.requires_grad
    if keep:
        use = norm_method(m, d_in, g.shape[2]) if owner.norm_method == "auto" else owner.norm_method
        chunk_size = 2 * m * m if use == "ghost" else d_in * g.shape[2]  # temporaries per example
        parts.append(by_chunks(ghost_sq if use == "ghost" else direct_sq, chunk_size, a, g))
    bias = layer.bias if layer.bias is not None and layer.bias.requires_grad else None
    g_sum = g.sum(dim=1) if bias is not None else None
    if g_sum is not None:
        parts.append(torch.linalg.vecdot(g_sum, g_sum))
    sq = parts[0] if len(parts) == 1 else parts[0] + parts[1]
    return _LinearState(a if keep else None, g if keep else None, g_sum, layer.weight, bias, sq)


def _sampled(grads: dict[nn.Parameter | None, Callable[[], torch.Tensor]], batch: int) -> _SampledState:
    """Per-example gradients of the trainable params: ``make()`` summed over all but batch and param dims."""
    out = {p: (full := make()).reshape(batch, math.prod(full.shape[1:]) // p.numel(), *p.shape).sum(dim=1)
           for p, make in grads.items() if p is not None and p.requires_grad}
    return _SampledState(out, torch.stack([torch.linalg.vecdot(g.flatten(1), g.flatten(1)) for g in out.values()]).sum(0))


@register_bk_rule(nn.LayerNorm, timm.layers.LayerNorm)
def _layer_norm_rule(layer: nn.LayerNorm, a: torch.Tensor, g: torch.Tensor, owner: "BookKeepingModule") -> _SampledState:
    x_hat = lambda: F.layer_norm(a.to(g.dtype), layer.normalized_shape, eps=layer.eps) * g  # noqa: E731
    return _sampled({layer.weight: x_hat, layer.bias: lambda: g}, g.shape[0])


@register_bk_rule(DeltaScale, timm.layers.LayerScale)
def _scale_rule(layer: nn.Module, a: torch.Tensor, g: torch.Tensor, owner: "BookKeepingModule") -> _SampledState:
    param = layer.weight if isinstance(layer, DeltaScale) else layer.gamma
    return _sampled({param: lambda: a.to(g.dtype) * g}, g.shape[0])


@register_bk_rule(PositionTable)
def _position_table_rule(layer: PositionTable, a: torch.Tensor, g: torch.Tensor,
                         owner: "BookKeepingModule") -> _SampledState:
    """G (B, T, heads) is the per-example gradient of the table: each example has its own copy."""
    return _sampled({layer.weight: lambda: g}, g.shape[0])


@register_bk_rule(ParameterAdd)
def _parameter_add_rule(layer: ParameterAdd, a: torch.Tensor, g: torch.Tensor,
                        owner: "BookKeepingModule") -> _SampledState:
    """G summed over the dimensions the parameter is broadcast along (booked only while it is trainable)."""
    grad = per_example_sum(g, layer.weight.shape)
    return _SampledState({layer.weight: grad}, torch.linalg.vecdot(grad.flatten(1), grad.flatten(1)))
