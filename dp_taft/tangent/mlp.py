"""Tangent of timm's two-layer MLP, and the output stage its gated variants share."""

from __future__ import annotations

import timm.layers
import torch
import torch.nn as nn

from .dual import Tangent
from .registry import register_tangent, require_no_dropout, to_tangent

__all__ = ["MlpOutput", "TangentMlp"]


class MlpOutput(nn.Module):
    r"""Base of the MLP tangents: the stage ``fc2(norm(h))`` after the hidden activation h.

    timm's ``Mlp``, ``SwiGLU`` and ``GluMlp`` all end with ``drop1``, an optional ``norm``
    (``scale_mlp_norm``) and ``fc2``, ``drop2``; the tangent of that stage is the chain
    of :class:`TangentLayerNorm` and :class:`TangentLinear` tangents. Subclasses convert
    their first stage, then call :meth:`_convert_output` (so that parameters keep the
    source's order), and end ``forward`` with :meth:`_output`.
    """

    norm: nn.Module | None
    fc2: nn.Module

    def _convert_output(self, source_layer: nn.Module, path: str) -> None:
        require_no_dropout(source_layer.drop1, f"{path}.drop1")
        require_no_dropout(source_layer.drop2, f"{path}.drop2")
        self.norm = (
            None if isinstance(source_layer.norm, nn.Identity) else to_tangent(source_layer.norm, f"{path}.norm")
        )
        self.fc2 = to_tangent(source_layer.fc2, f"{path}.fc2")

    def _output(self, x: torch.Tensor, dx: Tangent) -> tuple[torch.Tensor, torch.Tensor]:
        if self.norm is not None:
            x, dx = self.norm(x, dx)
        return self.fc2(x, dx)


@register_tangent(timm.layers.Mlp)
class TangentMlp(MlpOutput):
    r"""Linearization of ``fc2(norm(act(fc1(x))))`` by the chain rule.

    Derivation: d(f∘g)(x)[dx] = f'(g(x))[g'(x)[dx]] — each stage maps the pair
    (activation, tangent) to the next pair, so the MLP's tangent is the composition
    of :class:`TangentLinear`, :class:`TangentGELU` (and, with timm's
    ``scale_mlp_norm``, :class:`TangentLayerNorm`) tangents.
    """

    def __init__(self, source_layer: timm.layers.Mlp, path: str) -> None:
        super().__init__()
        self.fc1 = to_tangent(source_layer.fc1, f"{path}.fc1")
        self.act = to_tangent(source_layer.act, f"{path}.act")
        self._convert_output(source_layer, path)

    def forward(self, x: torch.Tensor, dx: Tangent) -> tuple[torch.Tensor, torch.Tensor]:
        return self._output(*self.act(*self.fc1(x, dx)))
