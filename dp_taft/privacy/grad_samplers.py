"""Per-sample gradient and norm samplers registered with Opacus.

Importing this module registers, keyed by exact layer class (Opacus matches classes
exactly; an unregistered subclass silently falls back to functorch):

* :class:`~dp_taft.tangent.layerscale.DeltaScale` (the tangent model's Δγ of LayerScale)
  and timm's ``LayerScale`` (its γ, for the non-linear NLFT baseline);
* timm's ``LayerNorm`` subclass, with Opacus' own ``nn.LayerNorm`` sampler (same maths);
* :class:`~dp_taft.tangent.linear.DeltaLinear` (the tangent model's ΔW, Δb), with Opacus'
  own ``nn.Linear`` grad and ghost-norm samplers (same parameters, same maths);
* :class:`~dp_taft.tangent.pooling.ParameterAdd` (Δ of a parameter added to an activation:
  the latent query and position embedding of MAP attention pooling, and NLFT's latent);
* :class:`~dp_taft.tangent.swin.PositionTable` (a Swin relative position bias table: the
  tangent model's ΔP, and P itself for NLFT);
* norm samplers for all of the above and for ``nn.LayerNorm``, so that
  ``grad_sample_mode="ghost"`` has a registered rule for every trainable layer.

"""

from __future__ import annotations

from collections.abc import Callable

import timm.layers
import torch
import torch.nn as nn
from opacus.grad_sample import register_grad_sampler, register_norm_sampler
from opacus.grad_sample.layer_norm import compute_layer_norm_grad_sample
from opacus.grad_sample.linear import compute_linear_grad_sample, compute_linear_norm_sample
from opacus.utils.tensor_utils import sum_over_all_but_batch_and_last_n

from ..tangent.layerscale import DeltaScale
from ..tangent.linear import DeltaLinear
from ..tangent.pooling import ParameterAdd, per_example_sum
from ..tangent.swin import PositionTable

__all__ = ["compute_scale_grad_sample"]

GradSamples = dict[nn.Parameter, torch.Tensor]
Sampler = Callable[[nn.Module, list[torch.Tensor], torch.Tensor], GradSamples]


def _scale_parameter(layer: nn.Module) -> nn.Parameter:
    return layer.weight if isinstance(layer, DeltaScale) else layer.gamma


@register_grad_sampler([DeltaScale, timm.layers.LayerScale])
def compute_scale_grad_sample(
    layer: nn.Module, activations: list[torch.Tensor], backprops: torch.Tensor
) -> GradSamples:
    """Per-sample gradient of a channel scale y = x ⊙ s: Σ over all but batch and channel of g ⊙ x.

    Shapes: activations[0] and backprops (B, ..., C); result (B, C).
    """
    param = _scale_parameter(layer)
    if not param.requires_grad:
        return {}
    x = activations[0].to(backprops.dtype)
    return {param: sum_over_all_but_batch_and_last_n(backprops * x, 1)}


register_grad_sampler(timm.layers.LayerNorm)(compute_layer_norm_grad_sample)
register_grad_sampler(DeltaLinear)(compute_linear_grad_sample)
register_norm_sampler(DeltaLinear)(compute_linear_norm_sample)


def _norm_sampler_from(grad_sampler: Sampler) -> Sampler:
    """Norm sampler that materializes the (small, per-channel) per-sample gradient.

    For scales and LayerNorm affine parameters the per-sample gradient has only C
    entries per example, so computing it and taking its norm is as cheap as any
    ghost trick and exactly equal to it.
    """

    def norm_sampler(layer: nn.Module, activations: list[torch.Tensor], backprops: torch.Tensor) -> GradSamples:
        return {
            p: g.reshape(g.shape[0], -1).norm(2, dim=1)
            for p, g in grad_sampler(layer, activations, backprops).items()
        }

    return norm_sampler


register_norm_sampler([DeltaScale, timm.layers.LayerScale])(_norm_sampler_from(compute_scale_grad_sample))
register_norm_sampler([nn.LayerNorm, timm.layers.LayerNorm])(_norm_sampler_from(compute_layer_norm_grad_sample))


@register_grad_sampler(PositionTable)
def compute_position_table_grad_sample(
    layer: PositionTable, activations: list[torch.Tensor], backprops: torch.Tensor
) -> GradSamples:
    """Per-sample gradient of a Swin relative position bias table: the backprops themselves.

    The layer hands each example its own copy of the table (B, T, heads) and the gather by
    the relative position index happens after it, so ∂L_i/∂table = backprops[i].
    """
    return {layer.weight: backprops} if layer.weight.requires_grad else {}


register_norm_sampler(PositionTable)(_norm_sampler_from(compute_position_table_grad_sample))


@register_grad_sampler(ParameterAdd)
def compute_parameter_add_grad_sample(
    layer: ParameterAdd, activations: list[torch.Tensor], backprops: torch.Tensor
) -> GradSamples:
    """Per-sample gradient of w in y = x + w (a latent query, a position embedding): the output
    gradient summed over the dimensions w is broadcast along (:func:`per_example_sum`)."""
    return {layer.weight: per_example_sum(backprops, layer.weight.shape)} if layer.weight.requires_grad else {}


register_norm_sampler(ParameterAdd)(_norm_sampler_from(compute_parameter_add_grad_sample))
