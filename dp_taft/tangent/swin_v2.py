"""The tangent model of a timm SwinTransformerV2, reusing the Swin v1 pieces of :mod:`.swin`.

What Swin v2 changes, and how each change is linearized (derivations in the classes):

* cosine attention: q and k are L2-normalised and the logits scaled per head by
  s = exp(clamp(logit_scale, max=log 100)), logit_scale trainable;
* continuous position bias: a two-layer MLP (``cpb_mlp``) maps a FIXED table of log-spaced
  relative coordinates to a bias table, then 16·sigmoid; its Δ are parameters of layers whose
  input is not per-example;
* q/v biases held as bare parameters (``q_bias``, zero ``k_bias``, ``v_bias``);
* res-post-norm blocks, ``x + norm1(attn(x))``, ``x + norm2(mlp(x))``;
* PatchMerging v2, ``norm(reduction(merge(x)))``.

Per-example gradients: every Δ acts on a batch-first input. A Δ whose contribution is shared
by all examples (the cpb MLP on the fixed coordinates, logit_scale) is applied to a per-example
copy of its input (a stride-0 expansion, :class:`~dp_taft.tangent.swin.PositionTable` for a bare
parameter): autograd then contracts each example's own logit gradient with the Jacobian of
that Δ, which is that example's gradient, and Opacus' hooks / the book-keeping rules of those
Δ kinds (``DeltaLinear``, ``PositionTable``) read it off exactly.
"""

from __future__ import annotations

import math

import timm.models.swin_transformer_v2 as swin2
import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import TangentBiasedQKV, attention_tangent, softmax_attention
from .base import DeltaLeaf, frozen
from .dual import Tangent, add_tangents
from .registry import (
    UnsupportedModelError,
    describe,
    register_tangent,
    to_tangent,
)
from .swin import (
    PositionTable,
    TangentPatchMerging,
    TangentSwin,
    _batch_first,
    _check_head,
    _init_window_attention,
    _merge_heads,
    _split_heads,
    _window_mask,
    _window_proj,
    _window_qkv,
    _WindowedBlock,
    position_bias,
)
from .vit import MODEL_FAMILIES

__all__ = ["BatchFirstWindowAttentionV2", "TangentPatchMergingV2", "TangentSwinBlockV2", "TangentSwinV2",
           "TangentWindowAttentionV2", "batch_first_v2", "check_swin_v2"]

Pair = tuple[torch.Tensor, torch.Tensor]
MAX_LOGIT_SCALE = math.log(1.0 / 0.01)  # timm's clamp


def normalize_tangent(q: torch.Tensor, dq: torch.Tensor) -> Pair:
    r"""``q̂ = q / ‖q‖`` over the last dim (F.normalize) and its tangent.

    Derivation: d(q/n) = dq/n − q·dn/n², dn = q̂·dq, so dq̂ = (dq − q̂ (q̂·dq)) / n
    (F.normalize divides by max(n, 1e-12); the tangent holds wherever n > 1e-12).
    """
    n = q.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    q_hat = q / n
    return q_hat, (dq - q_hat * (q_hat * dq).sum(-1, keepdim=True)) / n


def _coords(attn: nn.Module) -> torch.Tensor:
    """timm's fixed relative coordinate table (1, 2Wh−1, 2Ww−1, 2) as rows (T, 2)."""
    return attn.relative_coords_table.reshape(-1, 2)


@register_tangent(swin2.WindowAttention)
class TangentWindowAttentionV2(DeltaLeaf):
    r"""Linearization of Swin v2 window attention around w0; the Δ owned here is logit_scale's.

    Per window and head, with q̂, k̂ the normalised queries and keys, s = exp(clamp(λ)) and
    P = 16·σ(T[idx]), T = cpb(c) = W2 relu(W1 c + b1) on the fixed coordinates c:

        S = s·q̂ k̂ᵀ + P + M,  O = softmax_rows(S) V
        dS = s·(dq̂ k̂ᵀ + q̂ dk̂ᵀ) + ds·q̂ k̂ᵀ + dP
        ds = s·1[λ ≤ log 100]·Δλ                        (d exp = exp; clamp passes below its max)
        dP = 16 σ(1−σ) ⊙ dT[idx],  dT = ΔW2 h + W2 (1[z>0] ⊙ (ΔW1 c + Δb1)),  z = W1 c + b1, h = relu(z)

    and dO follows from dS by :func:`~dp_taft.tangent.attention.attention_tangent` (the
    ds and dP terms passed as the logit-bias tangent). dq̂, dk̂ by :func:`normalize_tangent`;
    q, k, v and their tangents from :class:`~dp_taft.tangent.attention.TangentBiasedQKV`.
    Δλ is a :class:`PositionTable` (B, heads, 1, 1) and ΔW1, Δb1, ΔW2 act on the coordinates
    and h expanded to (B, T, ·): per-example copies, so their per-sample gradients are exact.
    """

    delta_names = {"weight": "logit_scale"}

    def __init__(self, source_layer: swin2.WindowAttention, path: str) -> None:
        super().__init__(path)
        _init_window_attention(self, source_layer, path)
        self.logit_scale0 = frozen(source_layer.logit_scale)
        self.register_buffer("coords", _coords(source_layer).clone(), persistent=False)
        self.qkv = TangentBiasedQKV(source_layer, path)
        self.cpb1 = to_tangent(source_layer.cpb_mlp[0], f"{path}.cpb_mlp.0")
        self.cpb2 = to_tangent(source_layer.cpb_mlp[2], f"{path}.cpb_mlp.2")
        self.proj = to_tangent(source_layer.proj, f"{path}.proj")
        self.delta = PositionTable(torch.zeros_like(source_layer.logit_scale))

    def _position_bias(self, batch: int) -> Pair:
        """P (heads, N, N) at w0 and dP (B, 1, heads, N, N), from the cpb MLP's Δ (derivation above)."""
        z = F.linear(self.coords, self.cpb1.weight0, self.cpb1.bias0)
        h = F.relu(z)
        table = torch.sigmoid(F.linear(h, self.cpb2.weight0))
        dz = self.cpb1.delta(self.coords.expand(batch, *self.coords.shape)) * (z > 0)
        d_table = F.linear(dz, self.cpb2.weight0) + self.cpb2.delta(h.expand(batch, *h.shape))
        bias = position_bias(16 * table, self.index)
        return bias, position_bias(16 * table * (1 - table) * d_table, self.index).unsqueeze(1)

    def forward(self, x: torch.Tensor, dx: Tangent, mask: torch.Tensor | None) -> Pair:
        b = x.shape[0]
        (q, k, v), (dq, dk, dv) = _window_qkv(self.qkv, x, dx, self.num_heads)
        q, dq = normalize_tangent(q, dq)
        k, dk = normalize_tangent(k, dk)
        live = self.logit_scale0 <= MAX_LOGIT_SCALE
        scale = self.logit_scale0.clamp(max=MAX_LOGIT_SCALE).exp()
        d_scale = (self.delta(x) * (scale * live)).unsqueeze(1)  # ds (B, 1, heads, 1, 1)
        bias, d_bias = self._position_bias(b)
        d_bias = torch.addcmul(d_bias, d_scale, q @ k.transpose(-2, -1))  # + ds·q̂ k̂ᵀ
        out, d_out = attention_tangent(q, k, v, dq, dk, dv, scale, bias, d_bias, _window_mask(mask))
        return _window_proj(self.proj, out, d_out)


@register_tangent(swin2.SwinTransformerV2Block)
class TangentSwinBlockV2(_WindowedBlock):
    r"""Linearization of the res-post-norm block ``x + norm1(attn(x))`` then ``x + norm2(mlp(x))``.

    Derivation: d(x + n(g(x))) = dx + n'(g(x))[g'(x)[dx]] (+ the Δ terms of n and g), the
    window re-indexing R around attention being linear: d(R⁻¹ attn(R x)) = R⁻¹ attn'(R x)[R dx]
    (:class:`~dp_taft.tangent.swin._Windows` on both streams). Maps are (B, H·W, C) inside.
    """

    def __init__(self, source_layer: swin2.SwinTransformerV2Block, path: str) -> None:
        super().__init__(source_layer, path, "SwinTransformerV2", ("attn", "norm1", "mlp", "norm2"))

    def forward(self, x: torch.Tensor, dx: Tangent) -> Pair:
        x, dx, (b, h, w, c) = self.rows(x, dx)
        dy = None if dx is None else self.windows.split(dx, h, w)
        y, dy = self.attn(self.windows.split(x, h, w), dy, self.attn_mask)
        y, dy = self.norm1(self.windows.join(y, h, w), self.windows.join(dy, h, w))
        x, dx = x + y, add_tangents(dx, dy)
        y, dy = self.norm2(*self.mlp(x, dx))
        return (x + y).view(b, h, w, c), add_tangents(dx, dy).view(b, h, w, c)


@register_tangent(swin2.PatchMerging)
class TangentPatchMergingV2(TangentPatchMerging):
    r"""Linearization of ``norm(reduction(merge(x)))``: merge is linear and parameter-free
    (d merge(x)[dx] = merge(dx)), then the Linear and LayerNorm tangents by the chain rule."""

    layers = ("reduction", "norm")


def check_swin_v2(model: nn.Module, caller: str) -> None:
    """Refuse a Swin v2 model whose head the suffix cannot represent (average-pooled linear classifier)."""
    if type(model) is not swin2.SwinTransformerV2:
        raise UnsupportedModelError(f"{caller}() takes a timm SwinTransformerV2 here, got {describe(model)}.")
    _check_head(model.head, isinstance(getattr(model.head, "fc", None), nn.Linear), caller)


class TangentSwinV2(TangentSwin):
    r"""First-order Taylor expansion of a timm SwinTransformerV2 around w0 (TAFT-k).

    As :class:`~dp_taft.tangent.swin.TangentSwin` (same suffix cut, final norm, average
    pooling and head; its constructor and ``forward_dual``), with the v2 blocks and mergings above.
    """

    _check = staticmethod(check_swin_v2)


MODEL_FAMILIES[swin2.SwinTransformerV2] = TangentSwinV2


class BatchFirstWindowAttentionV2(nn.Module):
    """timm's v2 WindowAttention (same maths, non-fused) for NON-linear fine-tuning under DP.

    qkv and proj see (B, windows·N, C); the bare parameters become per-example layers:
    ``q_bias``, ``v_bias`` and ``logit_scale`` :class:`PositionTable` s (per-example copies), and
    the cpb MLP runs on the fixed coordinates expanded to (B, T, 2). Keeps timm's call
    signature ``(x (B·windows, N, C), mask)``.
    """

    def __init__(self, source_layer: swin2.WindowAttention, windows: int, path: str) -> None:
        super().__init__()
        _init_window_attention(self, source_layer, path)
        self.windows = windows
        self.register_buffer("coords", _coords(source_layer).clone(), persistent=False)
        self.qkv, self.proj, self.cpb_mlp = source_layer.qkv, source_layer.proj, source_layer.cpb_mlp
        # The first cpb layer's output gradient is zero on the coordinates where its ReLU is off,
        # a pattern its training moves: book-keeping must not drop those rows once for all.
        self.cpb_mlp[0].bk_every_row = True
        self.q_bias = None if source_layer.q_bias is None else PositionTable(source_layer.q_bias)
        self.v_bias = None if source_layer.v_bias is None else PositionTable(source_layer.v_bias)
        self.logit_scale = PositionTable(source_layer.logit_scale)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        bw, n, c = x.shape
        x = x.reshape(bw // self.windows, self.windows * n, c)
        b, const = x.shape[0], x.detach()  # the PositionTables' input: its batch size only
        qkv = self.qkv(x)
        if self.q_bias is not None:
            qb, vb = self.q_bias(const), self.v_bias(const)
            qkv = qkv + torch.cat((qb, torch.zeros_like(qb), vb), dim=-1).unsqueeze(1)
        q, k, v = _split_heads(qkv, self.windows, self.num_heads)
        scale = self.logit_scale(const).clamp(max=MAX_LOGIT_SCALE).exp().unsqueeze(1)
        hidden = F.relu(self.cpb_mlp[0](self.coords.expand(b, *self.coords.shape)))
        bias = position_bias(16 * torch.sigmoid(self.cpb_mlp[2](hidden)), self.index).unsqueeze(1)
        _, out = softmax_attention(F.normalize(q, dim=-1), F.normalize(k, dim=-1), v, scale, bias, _window_mask(mask))
        return self.proj(_merge_heads(out)).view(bw, n, -1)


def batch_first_v2(module: nn.Module, path: str) -> nn.Module:
    """``module`` changed in place for per-example gradients: a v2 block gets a
    :class:`BatchFirstWindowAttentionV2`, a v2 PatchMerging its reduction as :class:`TokenRows`."""
    return _batch_first(module, path, swin2.SwinTransformerV2Block, swin2.PatchMerging, BatchFirstWindowAttentionV2,
                        "SwinTransformerV2")
