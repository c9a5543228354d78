"""Tangent of timm's EVA / EVA-02 (``timm.models.eva.Eva``): rotary attention, raw-parameter
biases and layer scales, pre- and post-norm blocks.

Everything EVA shares with the ViT is reused: the softmax-attention tangent of
:class:`~dp_taft.tangent.attention.TangentAttention`, the residual branches of
:class:`~dp_taft.tangent.block.TangentBlock`, and the frozen prefix, pooling and Δ
book-keeping of :class:`~dp_taft.tangent.vit.TangentViT`. What differs is where EVA keeps
its parameters (``q_bias``/``v_bias`` on the attention, ``gamma_1``/``gamma_2`` on the
block, instead of in child layers) and the rotary position embedding (RoPE).
"""

from __future__ import annotations

import timm.models.eva as eva
import torch
import torch.nn as nn
from timm.layers import RotaryEmbeddingCat, apply_rot_embed_cat

from .attention import TangentAttention, TangentBiasedQKV, _optional
from .block import TangentBlock, TangentGammaBlock
from .dual import Tangent
from .registry import UnsupportedModelError, describe, register_tangent, require_no_dropout, to_tangent
from .vit import MODEL_FAMILIES, TangentViT

__all__ = ["TangentEva", "TangentEvaAttention", "TangentEvaBlockPostNorm", "TangentRope", "check_eva"]


class TangentRope(nn.Module):
    r"""EVA's rotary position embedding of q and k, the same fixed map on both streams.

    Derivation: RoPE rotates each pair of channels of a patch token by an angle that
    depends only on the token's grid position, ``rope(q) = q ⊙ cos + rot(q) ⊙ sin`` with
    ``rot`` a fixed signed permutation; prefix (class, register) tokens are left alone. It
    is linear in q and has no parameters, so d(rope(q)) = rope(dq). ``embed`` is the
    concatenated (sin, cos) table of the source model's ``rope.get_embed()`` in eval mode
    (the frozen, unaugmented grid), shared by every linearized block.
    """

    def __init__(self, embed: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("embed", embed.detach().clone())

    def rotate(self, t: torch.Tensor, num_prefix_tokens: int, half: bool) -> torch.Tensor:
        """timm's ``EvaAttention`` rotation of ``t`` (B, H, N, D): patch tokens only."""
        rotated = apply_rot_embed_cat(t[:, :, num_prefix_tokens:], self.embed, half=half)
        return torch.cat([t[:, :, :num_prefix_tokens], rotated], dim=2).type_as(t)


class _RotaryNorm(nn.Module):
    """The q (or k) slot of :class:`TangentAttention`: the optional tangent q/k norm, then RoPE.

    EVA normalizes q and k per head before rotating them; both maps act on each stream
    in turn, so their tangent is the chain rule of the two (RoPE being linear, see
    :class:`TangentRope`).
    """

    def __init__(self, norm: nn.Module | None, rope: TangentRope, num_prefix_tokens: int, half: bool) -> None:
        super().__init__()
        self.norm = norm
        self.rope = rope
        self.num_prefix_tokens = num_prefix_tokens
        self.half = half

    def forward(self, x: torch.Tensor, dx: Tangent) -> tuple[torch.Tensor, Tangent]:
        if self.norm is not None:
            x, dx = self.norm(x, dx)
        rotated = self.rope.rotate(x, self.num_prefix_tokens, self.half)
        return rotated, None if dx is None else self.rope.rotate(dx, self.num_prefix_tokens, self.half)


@register_tangent(eva.EvaAttention)
class TangentEvaAttention(TangentAttention):
    """Linearization of EVA's attention: :class:`TangentAttention`'s softmax rule on q, k, v
    from :class:`~dp_taft.tangent.attention.TangentBiasedQKV`, with RoPE applied after the
    q/k norms (:class:`_RotaryNorm`).

    RoPE is a property of the whole model (``Eva.rope``), passed to the blocks at call
    time; :class:`TangentEva` attaches it with :meth:`attach_rope`. Without it the
    attention is EVA's without rotary embedding (``use_rot_pos_emb=False``).
    """

    def __init__(self, source_layer: eva.EvaAttention, path: str) -> None:
        nn.Module.__init__(self)
        if source_layer.gate is not None:
            raise UnsupportedModelError(f"'{path}': gated attention (gated_attn=True) is not supported.")
        require_no_dropout(source_layer.attn_drop, f"{path}.attn_drop")
        require_no_dropout(source_layer.proj_drop, f"{path}.proj_drop")
        self.num_heads = source_layer.num_heads
        self.head_dim = source_layer.head_dim
        self.attn_dim = source_layer.num_heads * source_layer.head_dim
        self.scale = source_layer.scale
        self.num_prefix_tokens = source_layer.num_prefix_tokens
        self.rotate_half = source_layer.rotate_half
        self.qkv = TangentBiasedQKV(source_layer, path)
        self.q_norm = _optional(source_layer.q_norm, f"{path}.q_norm")
        self.k_norm = _optional(source_layer.k_norm, f"{path}.k_norm")
        self.norm = _optional(source_layer.norm, f"{path}.norm")
        self.proj = to_tangent(source_layer.proj, f"{path}.proj")

    def attach_rope(self, rope: TangentRope) -> None:
        """Rotate q and k (after their norms) by the model's fixed rotary embedding."""
        self.q_norm = _RotaryNorm(self.q_norm, rope, self.num_prefix_tokens, self.rotate_half)
        self.k_norm = _RotaryNorm(self.k_norm, rope, self.num_prefix_tokens, self.rotate_half)


register_tangent(eva.EvaBlock)(TangentGammaBlock)


def _identity(x: torch.Tensor, dx: Tangent) -> tuple[torch.Tensor, Tangent]:
    return x, dx


@register_tangent(eva.EvaBlockPostNorm)
class TangentEvaBlockPostNorm(TangentBlock):
    """Linearization of the post-norm ``x + norm1(attn(x))`` then ``x + norm2(mlp(x))``.

    Derivation: as :class:`TangentBlock` (the tangent of a residual sum is the sum of
    tangents), each branch being the chain layer-then-norm instead of norm-then-layer.
    """

    def __init__(self, source_layer: eva.EvaBlockPostNorm, path: str) -> None:
        nn.Module.__init__(self)
        require_no_dropout(source_layer.drop_path1, f"{path}.drop_path1")
        require_no_dropout(source_layer.drop_path2, f"{path}.drop_path2")
        self.attn = to_tangent(source_layer.attn, f"{path}.attn")
        self.norm1 = to_tangent(source_layer.norm1, f"{path}.norm1")
        self.mlp = to_tangent(source_layer.mlp, f"{path}.mlp")
        self.norm2 = to_tangent(source_layer.norm2, f"{path}.norm2")

    def forward(self, x: torch.Tensor, dx: Tangent) -> tuple[torch.Tensor, torch.Tensor]:
        x, dx = self._branch(x, dx, _identity, self.attn, self.norm1)
        return self._branch(x, dx, _identity, self.mlp, self.norm2)


class TangentEva(TangentViT):
    r"""First-order Taylor expansion of a timm ``Eva`` (EVA, EVA-02) around its weights w0.

    As :class:`TangentViT` (frozen prefix, linearized last ``blocks`` blocks, final
    norm(s) and head), with the model's rotary embedding, a fixed table, attached to
    every linearized attention. Build it with :func:`dp_taft.linearize`.
    """

    def __init__(self, model: eva.Eva, blocks: int) -> None:
        check_eva(model)
        super().__init__(model, blocks)
        if model.rope is not None:
            rope = TangentRope(self.frozen_prefix.rope.get_embed())  # the prefix copy is in eval mode
            for block in self.blocks:
                block.attn.attach_rope(rope)


MODEL_FAMILIES[eva.Eva] = TangentEva


def check_eva(model: eva.Eva) -> None:
    """Refuse the EVA options the tangent model does not represent exactly: a rotary embedding
    that is not one fixed table, and attention pooling."""
    if model.dynamic_img_size:
        raise UnsupportedModelError(
            "Eva(dynamic_img_size=True) is not supported: its rotary embedding depends on the input "
            "size; create the model with a fixed img_size."
        )
    if model.attn_pool is not None:
        raise UnsupportedModelError(
            "Eva(global_pool='map') is not supported: EVA's attention pooling also attends to the prefix "
            "tokens, unlike the ViT's; use global_pool='avg' (every eva02_* model) or 'token'."
        )
    if model.rope is not None and type(model.rope) is not RotaryEmbeddingCat:
        raise UnsupportedModelError(
            f"the rotary embedding 'rope' ({describe(model.rope)}) is not supported; the tangent model "
            "supports rope_type='cat' (timm.layers.RotaryEmbeddingCat, as in every eva02_* model)."
        )
