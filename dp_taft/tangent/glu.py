"""Tangents of timm's gated MLPs: ``SwiGLU`` (split fc1) and ``GluMlp`` (packed fc1, e.g. ``SwiGLUPacked``)."""

from __future__ import annotations

import timm.layers
import torch

from .dual import Tangent, add_tangents
from .mlp import MlpOutput
from .registry import register_tangent, to_tangent

__all__ = ["TangentGluMlp", "TangentSwiGLU", "gated_product"]


def gated_product(
    gate: tuple[torch.Tensor, Tangent], value: tuple[torch.Tensor, Tangent]
) -> tuple[torch.Tensor, Tangent]:
    r"""The pair ``(a ⊙ b, d(a ⊙ b))`` from the pairs ``(a, da)`` and ``(b, db)``.

    Derivation: the product rule, d(a ⊙ b) = da ⊙ b + a ⊙ db (the elementwise product is
    bilinear); a None tangent is zero and its term is skipped.
    """
    (a, da), (b, db) = gate, value
    return a * b, add_tangents(None if da is None else da * b, None if db is None else a * db)


@register_tangent(timm.layers.SwiGLU)
class TangentSwiGLU(MlpOutput):
    r"""Linearization of timm's ``SwiGLU``: ``fc2(norm(act(fc1_g(x)) ⊙ fc1_x(x)))``.

    Derivation: with g = fc1_g(x), u = fc1_x(x) and a = act(g) (SiLU in timm's SwiGLU
    ViTs; any activation with a registered tangent),

        dg = W0_g dx + (ΔW_g x + Δb_g),   du = W0_x dx + (ΔW_x x + Δb_x)   (:class:`TangentLinear`)
        da = act'(g) ⊙ dg,   e.g. silu'(g) = s + g·s·(1 − s), s = sigmoid(g)   (:class:`TangentSiLU`)
        d(a ⊙ u) = da ⊙ u + a ⊙ du                                          (:func:`gated_product`)

    then the chain through the optional norm (Δγ, Δβ) and fc2 (:class:`MlpOutput`). Every
    Δ is a Linear or LayerNorm Δ applied to a primal input, so Opacus' samplers and the
    book-keeping rules cover it unchanged.
    """

    def __init__(self, source_layer: timm.layers.SwiGLU, path: str) -> None:
        super().__init__()
        self.fc1_g = to_tangent(source_layer.fc1_g, f"{path}.fc1_g")
        self.fc1_x = to_tangent(source_layer.fc1_x, f"{path}.fc1_x")
        self.act = to_tangent(source_layer.act, f"{path}.act")
        self._convert_output(source_layer, path)

    def forward(self, x: torch.Tensor, dx: Tangent) -> tuple[torch.Tensor, torch.Tensor]:
        gate = self.act(*self.fc1_g(x, dx))
        return self._output(*gated_product(gate, self.fc1_x(x, dx)))


@register_tangent(timm.layers.GluMlp)
class TangentGluMlp(MlpOutput):
    r"""Linearization of timm's ``GluMlp``: ``fc2(norm(x1 ⊙ act(x2)))``, (x1, x2) = halves of fc1(x).

    With ``gate_last=False`` (as in ``SwiGLUPacked``, act = SiLU) the gate is the first
    half instead: ``act(x1) ⊙ x2``.

    Derivation: h = fc1(x) has the tangent dh = W0 dx + (ΔW x + Δb) (:class:`TangentLinear`);
    splitting the last dimension in two is linear, so (dx1, dx2) are the halves of dh. The
    gate's tangent is act'(·) ⊙ its half, and d(a ⊙ b) = da ⊙ b + a ⊙ db
    (:func:`gated_product`); then the chain through the optional norm and fc2
    (:class:`MlpOutput`). The convolutional form (``use_conv=True``) is refused: its fc1
    is an ``nn.Conv2d``, which has no tangent rule.
    """

    def __init__(self, source_layer: timm.layers.GluMlp, path: str) -> None:
        super().__init__()
        self.gate_last = source_layer.gate_last
        self.fc1 = to_tangent(source_layer.fc1, f"{path}.fc1")
        self.act = to_tangent(source_layer.act, f"{path}.act")
        self._convert_output(source_layer, path)

    def forward(self, x: torch.Tensor, dx: Tangent) -> tuple[torch.Tensor, torch.Tensor]:
        h, dh = self.fc1(x, dx)
        first, second = zip(h.chunk(2, dim=-1), dh.chunk(2, dim=-1))
        if self.gate_last:
            return self._output(*gated_product(self.act(*second), first))
        return self._output(*gated_product(self.act(*first), second))
