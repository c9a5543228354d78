"""Tangent of timm's attention pooling with a learned latent query (SigLIP's ``global_pool='map'``)."""

from __future__ import annotations

import timm.layers
import torch
import torch.nn as nn
from torch.func import functional_call

from .attention import _optional, attention_tangent
from .base import DeltaLeaf, frozen
from .dual import Tangent, add_tangents
from .registry import (
    UnsupportedModelError,
    describe,
    register_tangent,
    require_no_dropout,
    to_tangent,
)

__all__ = ["LatentQueryPool", "ParameterAdd", "TangentAddedParameter", "TangentAttentionPool", "per_example_sum"]

_POOL_TYPES = ("token", "avg")


class ParameterAdd(nn.Module):
    """``x ↦ x + weight``, weight broadcast from the right (as numpy), zero at init.

    The Δ of a bare parameter added to an activation (a latent query, a position
    embedding). The per-example gradient of ``weight`` is the output gradient summed over
    the dimensions ``weight`` is broadcast along (:func:`per_example_sum`); it is
    registered with Opacus in :mod:`dp_taft.privacy.grad_samplers` and has a book-keeping
    rule in :mod:`dp_taft.privacy.bk_rules`.
    """

    def __init__(self, shape: torch.Size, *, device=None, dtype=None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(shape, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.weight


def per_example_sum(grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Per-example gradient (B, *shape) of w in ``y = x + w`` from ∂L/∂y of shape (B, *rest).

    w is aligned with y from the right; its missing leading dimensions and its size-1
    dimensions are broadcast, so its gradient sums ∂L/∂y over them, example by example.
    A w with as many dimensions as y has size 1 at the batch dimension (e.g. timm's
    latent (1, L, D)).
    """
    padded = (1,) * (grad.dim() - len(shape)) + tuple(shape)
    if len(padded) != grad.dim() or padded[0] != 1:
        raise ValueError(f"a parameter of shape {tuple(shape)} is not broadcast over the batch of {tuple(grad.shape)}")
    return grad.sum_to_size(grad.shape[0], *padded[1:]).reshape(grad.shape[0], *shape)


class TangentAddedParameter(DeltaLeaf):
    r"""Linearization of ``y = x + p`` in the parameter p, around p0.

    Derivation: y is affine in (x, p), so dy = dx + Δp. Δp is a :class:`ParameterAdd`
    applied to the incoming tangent dx (to zeros of x's shape when dx = 0): its output has
    the batch dimension, so Opacus' hooks see the per-example output gradient, and Δp's
    per-example gradient is that gradient summed over the broadcast dimensions (it does not
    depend on the module's input at all).

    ``source`` is the owning layer's path and ``name`` the parameter's name in it, so that
    :meth:`named_deltas` yields e.g. ``("attn_pool.latent", Δlatent)``.
    """

    def __init__(self, param: torch.Tensor, source: str, name: str) -> None:
        super().__init__(source)
        self.delta_names = {"weight": name}
        self.param0 = frozen(param)
        self.delta = ParameterAdd(param.shape, device=param.device, dtype=param.dtype)

    def forward(self, x: torch.Tensor, dx: Tangent) -> tuple[torch.Tensor, torch.Tensor]:
        return x + self.param0, self.delta(torch.zeros_like(x) if dx is None else dx)


@register_tangent(timm.layers.AttentionPoolLatent)
class TangentAttentionPool(nn.Module):
    r"""Linearization of timm's ``AttentionPoolLatent`` (multi-head attention from a learned query).

    timm computes, for tokens x (B, N, C) and the latent ℓ (1, L, d):

        x ← x + pos (optional)       q = q_norm(heads(W_q ℓ + b_q))      k, v = heads(W_kv x + b_kv)
        o = proj(merge(softmax(s·q kᵀ) v))      o ← o + mlp(norm(o))      y = o[:, 0] or mean_L(o)

    Derivation: every stage is a layer with its own tangent rule, chained: the latent and
    the position embedding are parameters added to an input (:class:`TangentAddedParameter`,
    the latent added to zeros: dℓ = Δℓ), q, kv and proj are :class:`TangentLinear`, the
    q/k norms and ``norm`` are :class:`TangentLayerNorm`, the MLP is :class:`TangentMlp`,
    the attention is :func:`~dp_taft.tangent.attention.attention_tangent`, and the residual sum, head split/merge and
    token pooling are linear, so their tangents are the same maps applied to dx.
    """

    def __init__(self, source_layer: timm.layers.AttentionPoolLatent, path: str) -> None:
        super().__init__()
        if source_layer.pool not in _POOL_TYPES:
            raise UnsupportedModelError(
                f"'{path}' ({describe(source_layer)}): pool_type={source_layer.pool!r} is not supported; "
                f"use one of {_POOL_TYPES}."
            )
        require_no_dropout(source_layer.proj_drop, f"{path}.proj_drop")
        self.num_heads, self.head_dim, self.scale = source_layer.num_heads, source_layer.head_dim, source_layer.scale
        self.pool = source_layer.pool
        self.latent_shape = tuple(source_layer.latent.shape[1:])
        pos = source_layer.pos_embed
        self.pos_embed = None if pos is None else TangentAddedParameter(pos, path, "pos_embed")
        self.latent = TangentAddedParameter(source_layer.latent, path, "latent")
        self.q = _optional(source_layer.q, f"{path}.q")
        self.kv = to_tangent(source_layer.kv, f"{path}.kv")
        self.q_norm = _optional(source_layer.q_norm, f"{path}.q_norm")
        self.k_norm = _optional(source_layer.k_norm, f"{path}.k_norm")
        self.proj = _optional(source_layer.proj, f"{path}.proj")
        self.norm = _optional(source_layer.norm, f"{path}.norm")
        self.mlp = None if source_layer.mlp is None else to_tangent(source_layer.mlp, f"{path}.mlp")

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        """(B, M, H·D) -> (B, H, M, D)."""
        b, m, _ = t.shape
        return t.reshape(b, m, self.num_heads, self.head_dim).transpose(1, 2)

    def _query(self, b: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Query heads (B, H, L, D) and their tangent, from the latent (and q, q_norm)."""
        q, dq = self.latent(like.new_zeros(b, *self.latent_shape), None)
        if self.q is not None:
            q, dq = self.q(q, dq)
        q, dq = self._heads(q), self._heads(dq)
        return (q, dq) if self.q_norm is None else self.q_norm(q, dq)

    def _keys_values(self, x: torch.Tensor, dx: Tangent) -> tuple[torch.Tensor, ...]:
        """k, dk, v, dv, each (B, H, N, D), as timm splits ``kv(x)``."""
        kv, dkv = self.kv(x, dx)
        b, n, _ = x.shape
        k, v = kv.reshape(b, n, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        dk, dv = dkv.reshape(b, n, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if self.k_norm is not None:
            k, dk = self.k_norm(k, dk)
        return k, dk, v, dv

    def forward(self, x: torch.Tensor, dx: Tangent) -> tuple[torch.Tensor, torch.Tensor]:
        b, _, c = x.shape
        if self.pos_embed is not None:
            x, dx = self.pos_embed(x, dx)
        q, dq = self._query(b, x)
        k, dk, v, dv = self._keys_values(x, dx)
        out, d_out = attention_tangent(q, k, v, dq, dk, dv, self.scale)
        latents = q.shape[2]
        out, d_out = (t.transpose(1, 2).reshape(b, latents, c) for t in (out, d_out))
        if self.proj is not None:
            out, d_out = self.proj(out, d_out)
        if self.mlp is not None:
            h, dh = self.mlp(*(self.norm(out, d_out) if self.norm is not None else (out, d_out)))
            out, d_out = out + h, add_tangents(d_out, dh)
        if self.pool == "token":
            return out[:, 0], d_out[:, 0]
        return out.mean(1), d_out.mean(1)


class LatentQueryPool(nn.Module):
    """timm's ``AttentionPoolLatent`` run by its own forward, its latent query held by a :class:`ParameterAdd`.

    For non-linear fine-tuning under DP (:class:`dp_taft.methods.NLFTViT`): Opacus computes a
    layer's per-example gradients from the layer's input and output gradient only, which for a
    parameter used deep inside the pool's forward is not enough. Here the latent is a
    :class:`ParameterAdd` applied to zeros (B, L, d), whose output is the latent repeated per
    example, with an exact per-example gradient; timm's forward receives that tensor in place of
    its (1, L, d) parameter through ``torch.func.functional_call`` (its ``latent.expand(B, -1, -1)``
    is then the identity), so the maths is timm's own. The pool's other layers (q, kv, proj,
    norm, MLP) are ordinary Linear/LayerNorm layers with registered samplers. It takes over
    ``pool`` (a copy owned by the caller), whose latent parameter it removes.
    """

    def __init__(self, pool: timm.layers.AttentionPoolLatent, path: str) -> None:
        super().__init__()
        if type(pool) is not timm.layers.AttentionPoolLatent or pool.pos_embed is not None:
            raise UnsupportedModelError(
                f"'{path}' ({describe(pool)}): only timm's AttentionPoolLatent without a position embedding "
                "(pos_embed='', as in every timm ViT with global_pool='map') can be fine-tuned non-linearly."
            )
        self.latent = ParameterAdd(pool.latent.shape, device=pool.latent.device, dtype=pool.latent.dtype)
        with torch.no_grad():
            self.latent.weight.copy_(pool.latent)
        del pool.latent
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        latent = self.latent(x.new_zeros(x.shape[0], *self.latent.weight.shape[1:]))
        return functional_call(self.pool, {"latent": latent}, (x,), strict=False)
