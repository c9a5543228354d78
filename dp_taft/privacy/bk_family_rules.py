"""Book-keeping rules for the Δ kinds of the model families beyond the plain ViT.

Registered in :data:`dp_taft.privacy.bookkeeping.BK_RULES` on import (by
:mod:`dp_taft.privacy`, as the Opacus grad samplers are): a Swin/BEiT relative position
bias table (:class:`~dp_taft.tangent.swin.PositionTable`) and a parameter added to an
activation (:class:`~dp_taft.tangent.pooling.ParameterAdd`, MAP pooling's latent and
position embedding). Both have small per-example gradients, materialized in the hook.
"""

from __future__ import annotations

import torch

from ..tangent.pooling import ParameterAdd, per_example_sum
from ..tangent.swin import PositionTable
from .bookkeeping import BookKeepingModule, _sampled, _SampledState, register_bk_rule

__all__: list[str] = []


@register_bk_rule(PositionTable)
def _position_table_rule(layer: PositionTable, a: torch.Tensor, g: torch.Tensor,
                         owner: BookKeepingModule) -> _SampledState:
    """G (B, T, heads) is the per-example gradient of the table: each example has its own copy."""
    return _sampled({layer.weight: lambda: g}, g.shape[0])


@register_bk_rule(ParameterAdd)
def _parameter_add_rule(layer: ParameterAdd, a: torch.Tensor, g: torch.Tensor,
                        owner: BookKeepingModule) -> _SampledState:
    """G summed over the dimensions the parameter is broadcast along (booked only while it is trainable)."""
    grad = per_example_sum(g, layer.weight.shape)
    return _SampledState({layer.weight: grad}, torch.linalg.vecdot(grad.flatten(1), grad.flatten(1)))
