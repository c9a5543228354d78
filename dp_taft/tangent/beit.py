"""The tangent model of a timm BEiT (``timm.models.beit.Beit``): its attention with a relative
position bias (the bias table layer is Swin's :class:`~dp_taft.tangent.swin.PositionTable`),
and NLFT's sampled attention. Its block, with bare layer scales, is
:class:`~dp_taft.tangent.block.TangentGammaBlock`, shared with EVA."""

from __future__ import annotations

import timm.models.beit as beit
import torch
import torch.nn as nn

from .attention import TangentAttention, TangentBiasedQKV
from .base import DeltaLeaf, frozen
from .block import TangentGammaBlock
from .layerscale import constant_ones, layer_scale
from .registry import register_tangent, require_no_dropout, to_tangent
from .swin import PositionTable, position_bias
from .vit import MODEL_FAMILIES, TangentViT

__all__ = ["SampledBeitAttention", "TangentBeit", "TangentBeitAttention"]


def _split_heads(t: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, N, 3·H·D) -> q, k, v each (B, H, N, D), as timm splits them."""
    b, n, _ = t.shape
    return t.reshape(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)


class _RelPosBias(DeltaLeaf):
    """Owner of the bias table Δ (named as BEiT's ``attn.relative_position_bias_table``)."""

    delta_names = {"weight": "relative_position_bias_table"}

    def __init__(self, attn: beit.Attention, path: str) -> None:
        super().__init__(path)
        self.delta = PositionTable(torch.zeros_like(attn.relative_position_bias_table))


@register_tangent(beit.Attention)
class TangentBeitAttention(TangentAttention):
    r"""Linearization of BEiT attention ``O = softmax(s·Q Kᵀ + P) V`` (per head), then proj.

    P is the logit bias: the own table ``T[index]`` (permuted to (H, N, N)) plus the
    model's shared bias, if any (frozen: it belongs to the stem). Q, K, V come from
    ``x W_qkvᵀ + (b_q, 0, b_v)`` (:class:`~dp_taft.tangent.attention.TangentBiasedQKV`).
    The rule is :class:`TangentAttention`'s with the logit-bias tangent dP = ΔT[index]
    (P is linear in T, the index fixed). ΔT is a :class:`~dp_taft.tangent.swin.PositionTable`
    (one copy of the table per example, gathered by the index after it, as for Swin)
    applied to the primal x: its input is Δ-free, so Opacus' hooks give exact per-sample
    gradients.
    """

    def __init__(self, source_layer: beit.Attention, path: str) -> None:
        nn.Module.__init__(self)  # TangentAttention.__init__ reads timm ViT's attention layout
        require_no_dropout(source_layer.attn_drop, f"{path}.attn_drop")
        require_no_dropout(source_layer.proj_drop, f"{path}.proj_drop")
        self.num_heads = source_layer.num_heads
        self.scale = source_layer.scale
        self.attn_dim = source_layer.proj.in_features
        self.head_dim = self.attn_dim // self.num_heads
        self.qkv = TangentBiasedQKV(source_layer, path)
        self.q_norm = self.k_norm = self.norm = None
        self.proj = to_tangent(source_layer.proj, f"{path}.proj")
        self.rel_pos, self.logit_bias0 = None, None
        if source_layer.relative_position_bias_table is not None:
            self.rel_pos = _RelPosBias(source_layer, path)
            self.register_buffer("relative_position_index", source_layer.relative_position_index.clone())
            table0 = source_layer.relative_position_bias_table
            self.logit_bias0 = frozen(position_bias(table0, self.relative_position_index))

    def add_shared_bias(self, bias: torch.Tensor) -> None:
        """Add the model's shared relative position bias (H, N, N) at w0 to the frozen logit bias P."""
        self.logit_bias0 = frozen(bias if self.logit_bias0 is None else self.logit_bias0 + bias)

    def _logit_bias(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """P at w0 (own table and shared bias) and dP = ΔT[index] (None without an own table)."""
        if self.rel_pos is None:
            return self.logit_bias0, None
        return self.logit_bias0, position_bias(self.rel_pos.delta(x), self.relative_position_index)


class SampledBeitAttention(nn.Module):
    """timm's BEiT attention (non-fused path, same maths) with every parameter in a layer
    Opacus samples exactly, for non-linear fine-tuning (NLFT): ``qkv``/``proj`` ``nn.Linear``,
    q/v biases as timm ``LayerScale`` layers applied to constant ones (as the tangent model's
    :class:`~dp_taft.tangent.layerscale.TangentBias`) and the bias table as a
    :class:`PositionTable` applied to the input x. ``forward(x, shared_rel_pos_bias)`` as timm's;
    the source layer's qkv and proj are taken over (not copied), and the pretrained biases copied.
    """

    def __init__(self, source_layer: beit.Attention) -> None:
        super().__init__()
        self.num_heads = source_layer.num_heads
        self.scale = source_layer.scale
        self.qkv, self.proj = source_layer.qkv, source_layer.proj
        self.attn_drop, self.proj_drop = source_layer.attn_drop, source_layer.proj_drop
        has_bias, table = source_layer.q_bias is not None, source_layer.relative_position_bias_table
        self.q_bias = layer_scale(source_layer.q_bias) if has_bias else None
        self.v_bias = layer_scale(source_layer.v_bias) if has_bias else None
        self.relative_position_bias_table = None if table is None else PositionTable(table)
        if table is not None:
            self.register_buffer("relative_position_index", source_layer.relative_position_index.clone())

    def forward(self, x: torch.Tensor, shared_rel_pos_bias: torch.Tensor | None = None) -> torch.Tensor:
        b, n, _ = x.shape
        qkv = self.qkv(x)
        if self.q_bias is not None:
            ones = constant_ones(x, self.q_bias.gamma.shape[0])
            q_bias = self.q_bias(ones)
            qkv = qkv + torch.cat((q_bias, torch.zeros_like(q_bias), self.v_bias(ones)), dim=-1)
        q, k, v = _split_heads(qkv, self.num_heads)
        scores = (q * self.scale) @ k.transpose(-2, -1)
        if self.relative_position_bias_table is not None:
            # The table reads only x's shape; x itself requires grad here, and a module's full
            # backward hook (Opacus) waits for the gradient of such an input, never formed: detach.
            table = self.relative_position_bias_table(x.detach())
            scores = scores + position_bias(table, self.relative_position_index)
        if shared_rel_pos_bias is not None:
            scores = scores + shared_rel_pos_bias
        out = self.attn_drop(torch.softmax(scores, dim=-1)) @ v
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, n, -1)))


register_tangent(beit.Block)(TangentGammaBlock)


class TangentBeit(TangentViT):
    r"""First-order Taylor expansion of a timm BEiT around w0 (TAFT-k), as :class:`TangentViT`.

    Same prefix/suffix split, pooling (``token``, or ``avg`` over the patch tokens then
    ``fc_norm``) and head as a ViT; the last ``blocks`` BEiT blocks are linearized, with
    a Δ for every parameter they hold (Linear and LayerNorm weights, q/v biases, γ1/γ2
    and the relative position bias table). The model's *shared* relative position bias
    (``use_shared_rel_pos_bias=True``) belongs to the stem: like the embeddings it stays
    at w0, and its value is added to each linearized block's frozen logit bias.
    """

    def __init__(self, model: beit.Beit, blocks: int) -> None:
        super().__init__(model, blocks)
        if model.rel_pos_bias is not None:
            with torch.no_grad():
                shared = model.rel_pos_bias()
            for block in self.blocks:
                block.attn.add_shared_bias(shared)


MODEL_FAMILIES[beit.Beit] = TangentBeit
