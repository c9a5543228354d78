"""Tangent of timm's multi-head self-attention."""

from __future__ import annotations

import timm.layers
import torch
import torch.nn as nn

from .base import frozen
from .dual import Tangent
from .layerscale import TangentBias
from .registry import UnsupportedModelError, register_tangent, require_no_dropout, to_tangent

__all__ = ["TangentAttention", "TangentBiasedQKV", "attention_tangent", "softmax_attention"]


def softmax_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
    bias: torch.Tensor | None = None, mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, O) of ``A = softmax(s·Q Kᵀ + bias + mask)``, ``O = A V`` over the last two dimensions.

    ``bias`` and ``mask`` are additive logit terms broadcast against the scores (either may
    be None). Explicit matmuls: fused SDPA has no forward-mode rule, and A is needed.
    """
    scores = (q * scale) @ k.transpose(-2, -1)
    if bias is not None:
        scores = scores + bias
    if mask is not None:
        scores = scores + mask
    attn = torch.softmax(scores, dim=-1)
    return attn, attn @ v


def attention_tangent(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor,
    scale: float, bias: torch.Tensor | None = None, d_bias: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""``O = softmax(s·Q Kᵀ + P + M) V`` and its tangent dO, per head: q (..., L, D), k, v (..., N, D).

    Derivation, with S = s·Q Kᵀ + P + M (P an additive logit ``bias``, M a constant ``mask``),
    A = softmax_rows(S), O = A V:

        dS = s·(dQ Kᵀ + Q dKᵀ) + dP                (``d_bias``; M has no tangent)
        dA = A ⊙ (dS − rowsum(A ⊙ dS))             (softmax Jacobian, row-wise)
        dO = dA V + A dV = (A ⊙ dS) V + A dV − rowsum(A ⊙ dS) ⊙ O

    The last form reuses O, so the tangent costs four matmuls on top of the primal's two and
    never forms an N×N×N object. The queries (L) and keys (N) may differ in number. O is
    stored token-major ((..., L, H, D) memory behind a (..., H, L, D) view), so that merging
    the heads afterwards is a view: autograd then saves O once, not once per layout.
    """
    attn, out = softmax_attention(q, k, v, scale, bias, mask)
    out = out.transpose(-3, -2).contiguous().transpose(-3, -2)
    # Two matmuls rather than one on concatenations: autograd then saves only q and k,
    # which live on anyway, instead of two fresh copies.
    d_scores = (dq @ k.transpose(-2, -1)).add_(q @ dk.transpose(-2, -1)).mul_(scale)
    if d_bias is not None:
        d_scores = d_scores + d_bias
    a_ds = attn * d_scores
    return out, torch.addcmul(a_ds @ v + attn @ dv, a_ds.sum(-1, keepdim=True), out, value=-1.0)


def _optional(module: nn.Module, path: str) -> nn.Module | None:
    """Tangent of an optional sub-layer, or None where timm put an identity."""
    return None if isinstance(module, nn.Identity) else to_tangent(module, path)


@register_tangent(timm.layers.Attention)
class TangentAttention(nn.Module):
    r"""Linearization of softmax attention ``O = softmax(s·Q Kᵀ) V`` (per head).

    The softmax-attention tangent is :func:`attention_tangent` (derivation there). Q, K, V
    and their tangents come from the tangent qkv projection (and tangent q/k LayerNorms
    when timm's ``qk_norm`` is on); the output goes through the optional ``scale_norm``
    LayerNorm and the tangent output projection.
    """

    def __init__(self, source_layer: timm.layers.Attention, path: str) -> None:
        super().__init__()
        if source_layer.gate is not None:
            raise UnsupportedModelError(
                f"'{path}': gated attention (timm Attention(gated=True)) is not supported."
            )
        require_no_dropout(source_layer.attn_drop, f"{path}.attn_drop")
        require_no_dropout(source_layer.proj_drop, f"{path}.proj_drop")
        self.num_heads = source_layer.num_heads
        self.head_dim = source_layer.head_dim
        self.attn_dim = source_layer.attn_dim
        self.scale = source_layer.scale
        self.qkv = to_tangent(source_layer.qkv, f"{path}.qkv")
        self.q_norm = _optional(source_layer.q_norm, f"{path}.q_norm")
        self.k_norm = _optional(source_layer.k_norm, f"{path}.k_norm")
        self.norm = _optional(source_layer.norm, f"{path}.norm")
        self.proj = to_tangent(source_layer.proj, f"{path}.proj")

    def _heads(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, N, 3·H·D) -> q, k, v each (B, H, N, D), as timm splits them."""
        b, n, _ = t.shape
        return t.reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)

    def _logit_bias(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The additive logit bias P at w0 and its tangent dP (none here; BEiT's relative position bias)."""
        return None, None

    def forward(self, x: torch.Tensor, dx: Tangent) -> tuple[torch.Tensor, torch.Tensor]:
        b, n, _ = x.shape
        qkv, dqkv = self.qkv(x, dx)
        q, k, v = self._heads(qkv)
        dq, dk, dv = self._heads(dqkv)
        if self.q_norm is not None:
            q, dq = self.q_norm(q, dq)
            k, dk = self.k_norm(k, dk)

        out, d_out = attention_tangent(q, k, v, dq, dk, dv, self.scale, *self._logit_bias(x))
        out, d_out = (t.transpose(1, 2).reshape(b, n, self.attn_dim) for t in (out, d_out))
        if self.norm is not None:
            out, d_out = self.norm(out, d_out)
        return self.proj(out, d_out)


class TangentBiasedQKV(nn.Module):
    r"""BEiT's and EVA's q, k, v projection as one (B, N, 3·H·D) pair, in the layout TangentAttention splits.

    Derivation: fused, qkv = W x + (q_bias, 0, v_bias) (the k bias is a zero buffer), so
    dqkv = W0 dx + ΔW x + (Δq_bias, 0, Δv_bias): a :class:`TangentLinear` plus two
    :class:`~dp_taft.tangent.layerscale.TangentBias`. Unfused (EVA's ``qkv_fused=False``),
    the three tangent projections are concatenated, which is the same split into heads.
    """

    def __init__(self, attn: nn.Module, path: str) -> None:
        super().__init__()
        names = ("qkv",) if getattr(attn, "qkv", None) is not None else ("q_proj", "k_proj", "v_proj")
        self.projections = nn.ModuleList(to_tangent(getattr(attn, n), f"{path}.{n}") for n in names)
        self.bias0 = None if attn.q_bias is None else frozen(torch.cat((attn.q_bias, attn.k_bias, attn.v_bias)))
        self.q_bias = None if attn.q_bias is None else TangentBias(attn.q_bias, path, "q_bias")
        self.v_bias = None if attn.v_bias is None else TangentBias(attn.v_bias, path, "v_bias")

    def forward(self, x: torch.Tensor, dx: Tangent) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = [projection(x, dx) for projection in self.projections]
        if len(pairs) == 1:
            y, dy = pairs[0]
        else:
            y, dy = (torch.cat(stream, dim=-1) for stream in zip(*pairs))
        if self.bias0 is None:
            return y, dy
        dq_bias, dv_bias = self.q_bias(x), self.v_bias(x)
        return y + self.bias0, dy + torch.cat((dq_bias, torch.zeros_like(dq_bias), dv_bias), dim=-1)
