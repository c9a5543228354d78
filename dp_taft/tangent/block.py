"""Tangent of timm's pre-norm residual transformer block."""

from __future__ import annotations

import timm.models.vision_transformer as vit
import torch
import torch.nn as nn

from .dual import Tangent, add_tangents
from .layerscale import gamma_tangent
from .registry import register_tangent, require_no_dropout, to_tangent

__all__ = ["TangentBlock", "TangentGammaBlock"]


@register_tangent(vit.Block)
class TangentBlock(nn.Module):
    r"""Linearization of ``x + ls1(attn(norm1(x)))`` then ``x + ls2(mlp(norm2(x)))``.

    Derivation: the tangent of a residual sum is the sum of tangents,
    d(x + g(x)) = dx + g'(x)[dx]; each branch is the chain of its layers' tangents.
    """

    def __init__(self, source_layer: vit.Block, path: str) -> None:
        super().__init__()
        require_no_dropout(source_layer.drop_path1, f"{path}.drop_path1")
        require_no_dropout(source_layer.drop_path2, f"{path}.drop_path2")
        self.norm1 = to_tangent(source_layer.norm1, f"{path}.norm1")
        self.attn = to_tangent(source_layer.attn, f"{path}.attn")
        self.ls1 = self._scale(source_layer.ls1, f"{path}.ls1")
        self.norm2 = to_tangent(source_layer.norm2, f"{path}.norm2")
        self.mlp = to_tangent(source_layer.mlp, f"{path}.mlp")
        self.ls2 = self._scale(source_layer.ls2, f"{path}.ls2")

    @staticmethod
    def _scale(module: nn.Module, path: str) -> nn.Module | None:
        return None if isinstance(module, nn.Identity) else to_tangent(module, path)

    def _branch(self, x: torch.Tensor, dx: Tangent, norm, layer, scale) -> tuple[torch.Tensor, torch.Tensor]:
        h, dh = layer(*norm(x, dx))
        if scale is not None:
            h, dh = scale(h, dh)
        return x + h, add_tangents(dx, dh)

    def forward(self, x: torch.Tensor, dx: Tangent) -> tuple[torch.Tensor, torch.Tensor]:
        x, dx = self._branch(x, dx, self.norm1, self.attn, self.ls1)
        return self._branch(x, dx, self.norm2, self.mlp, self.ls2)


class TangentGammaBlock(TangentBlock):
    """Linearization of ``x + γ1 ⊙ attn(norm1(x))`` then ``x + γ2 ⊙ mlp(norm2(x))`` (BEiT, EVA):
    :class:`TangentBlock`'s residual rule, the layer scales being bare block parameters
    ``gamma_1``/``gamma_2`` (None without layer scale) rather than LayerScale modules."""

    def __init__(self, source_layer: nn.Module, path: str) -> None:
        nn.Module.__init__(self)  # TangentBlock.__init__ reads timm ViT's ls1/ls2 modules
        require_no_dropout(source_layer.drop_path1, f"{path}.drop_path1")
        require_no_dropout(source_layer.drop_path2, f"{path}.drop_path2")
        self.norm1 = to_tangent(source_layer.norm1, f"{path}.norm1")
        self.attn = to_tangent(source_layer.attn, f"{path}.attn")
        self.ls1 = gamma_tangent(source_layer, "gamma_1", path)
        self.norm2 = to_tangent(source_layer.norm2, f"{path}.norm2")
        self.mlp = to_tangent(source_layer.mlp, f"{path}.mlp")
        self.ls2 = gamma_tangent(source_layer, "gamma_2", path)
