"""Tangent of timm's multi-head self-attention."""

from __future__ import annotations

import timm.layers
import torch
import torch.nn as nn

from .dual import Tangent
from .registry import UnsupportedModelError, register_tangent, require_no_dropout, to_tangent

__all__ = ["TangentAttention"]


def _optional(module: nn.Module, path: str) -> nn.Module | None:
    """Tangent of an optional sub-layer, or None where timm put an identity."""
    return None if isinstance(module, nn.Identity) else to_tangent(module, path)


@register_tangent(timm.layers.Attention)
class TangentAttention(nn.Module):
    r"""Linearization of softmax attention ``O = softmax(s·Q Kᵀ) V`` (per head).

    Derivation, with S = s·Q Kᵀ, A = softmax_rows(S), O = A V:

        dS = s·(dQ Kᵀ + Q dKᵀ)
        dA = A ⊙ (dS − rowsum(A ⊙ dS))            (softmax Jacobian, row-wise)
        dO = dA V + A dV
           = (A ⊙ dS) V + A dV − rowsum(A ⊙ dS) ⊙ O

    The last form reuses the primal output O, so the tangent costs four N×N×D matmuls
    on top of the primal's two and never forms an N×N×N object. Q, K, V and their
    tangents come from the tangent qkv projection (and tangent q/k LayerNorms when
    timm's ``qk_norm`` is on); the output goes through the optional ``scale_norm``
    LayerNorm and the tangent output projection. The primal is computed with explicit
    matmuls rather than fused SDPA, which has no forward-mode rule and whose A we need.
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

    def forward(self, x: torch.Tensor, dx: Tangent) -> tuple[torch.Tensor, torch.Tensor]:
        b, n, _ = x.shape
        qkv, dqkv = self.qkv(x, dx)
        q, k, v = self._heads(qkv)
        dq, dk, dv = self._heads(dqkv)
        if self.q_norm is not None:
            q, dq = self.q_norm(q, dq)
            k, dk = self.k_norm(k, dk)

        attn = torch.softmax((q * self.scale) @ k.transpose(-2, -1), dim=-1)
        # O in the (B, N, H·D) layout the projection takes, and a (B, H, N, D) view of that
        # same storage for the tangent: autograd saves O once, not once per layout.
        out = (attn @ v).transpose(1, 2).reshape(b, n, self.attn_dim)
        out_heads = out.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        # Two matmuls rather than one on concatenations: autograd then saves only q and k,
        # which live on anyway, instead of two fresh (B, H, N, 2D) copies.
        d_scores = (dq @ k.transpose(-2, -1)).add_(q @ dk.transpose(-2, -1)).mul_(self.scale)
        a_ds = attn * d_scores
        d_out = torch.addcmul(a_ds @ v + attn @ dv, a_ds.sum(-1, keepdim=True), out_heads, value=-1.0)
        d_out = d_out.transpose(1, 2).reshape(b, n, self.attn_dim)
        if self.norm is not None:
            out, d_out = self.norm(out, d_out)
        return self.proj(out, d_out)
