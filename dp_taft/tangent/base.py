"""Common ground of the tangent leaves: frozen w0 and the Δ they own."""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn as nn

__all__ = ["DeltaLeaf", "frozen"]


def frozen(tensor: torch.Tensor) -> nn.Parameter:
    """A copy of a pretrained tensor as a parameter that is never trained (w0).

    w0 lives as a frozen parameter of the *parent* tangent module, never inside the
    module holding Δ: Opacus refuses trainable layers that carry buffers, and its
    hooks only attach to modules with parameters that require grad.
    """
    return nn.Parameter(tensor.detach().clone(), requires_grad=False)


class DeltaLeaf(nn.Module):
    """A tangent module that owns Δ parameters in a child named ``delta``.

    Subclasses set ``delta`` to a module of a class Opacus can sample exactly
    (:class:`~dp_taft.tangent.linear.DeltaLinear`, ``nn.LayerNorm`` or
    :class:`~dp_taft.tangent.layerscale.DeltaScale`)
    and ``delta_names``: Δ parameter name in ``delta`` -> parameter name in the
    source layer. ``source`` is the source layer's path in the original model.
    """

    delta: nn.Module
    delta_names: dict[str, str]

    def __init__(self, source: str) -> None:
        super().__init__()
        self.source = source

    def named_deltas(self) -> Iterator[tuple[str, nn.Parameter]]:
        """``(original parameter name, Δ parameter)`` pairs, e.g. ``("head.bias", Δb)``."""
        for name, param in self.delta.named_parameters():
            yield f"{self.source}.{self.delta_names[name]}", param
