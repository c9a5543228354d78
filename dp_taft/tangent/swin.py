"""The tangent model of a timm SwinTransformer: frozen prefix + dual-stream suffix.

Shifted-window attention only re-indexes tokens (cyclic shift, padding, window
partition and reverse, the 2x2 concatenation of PatchMerging): every such map is
linear and parameter-free, so the tangent stream goes through exactly the same
re-indexing as the primal one. What is new compared with the ViT is the trainable
relative position bias table, which enters the attention logits.
"""

from __future__ import annotations

import copy

import timm.models.swin_transformer as swin
import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import attention_tangent, softmax_attention
from .base import DeltaLeaf, frozen
from .dual import Tangent, add_tangents
from .registry import UnsupportedModelError, describe, register_tangent, require_no_dropout, to_tangent
from .vit import MODEL_FAMILIES, TangentViT

__all__ = ["BatchFirstWindowAttention", "PositionTable", "TangentPatchMerging", "TangentSwin", "TangentSwinBlock",
           "TangentWindowAttention", "TokenRows", "batch_first", "check_swin", "cut_swin", "position_bias"]

Pair = tuple[torch.Tensor, torch.Tensor]


class PositionTable(nn.Module):
    """A relative position bias table ``weight`` (T, heads), handed out once per example.

    ``forward(x)`` returns ``weight`` expanded to (B, T, heads) for an input whose first
    dimension is the batch B and which does not require grad (a full backward hook would
    otherwise wait for its gradient, which never comes). The gather by the relative
    position index happens outside, so autograd itself scatter-adds the logits' gradient
    into each example's copy, and the per-example gradient is exactly the gradient of the
    output: the Opacus grad sampler and the book-keeping rule of this class only read the
    backprops.
    """

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(table.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight.expand(x.shape[0], *self.weight.shape)


def position_bias(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Logit bias from a table (..., T, heads) and the index (N, N): (..., heads, N, N), as timm gathers it."""
    n = index.shape[0]
    return table[..., index.reshape(-1), :].unflatten(-2, (n, n)).movedim(-1, -3)


def _window_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """timm's shift mask (windows, N, N) broadcast against batch-first scores (B, windows, heads, N, N)."""
    return None if mask is None else mask.unsqueeze(1)


def _split_heads(t: torch.Tensor, windows: int, heads: int) -> tuple[torch.Tensor, ...]:
    """(B, windows·N, 3·heads·D) -> q, k, v each (B, windows, heads, N, D), as timm splits them."""
    b, m, _ = t.shape
    return t.reshape(b, windows, m // windows, 3, heads, -1).permute(3, 0, 1, 4, 2, 5).unbind(0)


def _merge_heads(t: torch.Tensor) -> torch.Tensor:
    """(B, windows, heads, N, D) -> (B, windows·N, heads·D)."""
    b, w, h, n, d = t.shape
    return t.permute(0, 1, 3, 2, 4).reshape(b, w * n, h * d)


def _init_window_attention(module: nn.Module, source_layer: nn.Module, path: str) -> None:
    """What every window attention here takes from timm's (v1 or v2): no dropout, heads, relative position index."""
    require_no_dropout(source_layer.attn_drop, f"{path}.attn_drop")
    require_no_dropout(source_layer.proj_drop, f"{path}.proj_drop")
    module.num_heads = source_layer.num_heads
    module.register_buffer("index", source_layer.relative_position_index.clone(), persistent=False)


def _window_qkv(qkv: nn.Module, x: torch.Tensor, dx: Tangent, heads: int) -> tuple[tuple[torch.Tensor, ...], ...]:
    """The tangent ``qkv`` on windows (B, windows, N, C), split: ((q, k, v), (dq, dk, dv)) each (B, windows, heads, N, D)."""
    b, w, n, c = x.shape
    t, dt = qkv(x.reshape(b, w * n, c), None if dx is None else dx.reshape(b, w * n, c))
    return _split_heads(t, w, heads), _split_heads(dt, w, heads)


def _window_proj(proj: nn.Module, out: torch.Tensor, d_out: torch.Tensor) -> Pair:
    """The tangent ``proj`` of the heads' outputs (B, windows, heads, N, D), back to windows (B, windows, N, C)."""
    b, w, _, n, _ = out.shape
    y, dy = proj(_merge_heads(out), _merge_heads(d_out))
    return y.view(b, w, n, -1), dy.view(b, w, n, -1)


@register_tangent(swin.WindowAttention)
class TangentWindowAttention(DeltaLeaf):
    r"""Linearization of window attention with a relative position bias table P around P0.

    Derivation, per window and head, with S = s·Q Kᵀ + P[idx] + M (M the constant shift
    mask), A = softmax_rows(S), O = A V: :func:`~dp_taft.tangent.attention.attention_tangent`
    with the logit-bias tangent ΔP[idx] (the gather P ↦ P[idx] is linear; M has no tangent).
    ΔP lives in a :class:`PositionTable` applied per example. Inputs are batch-first (B, windows, N, C)
    so that qkv and proj see (B, windows·N, C): their Δ then get per-example, not
    per-window, gradients.
    """

    delta_names = {"weight": "relative_position_bias_table"}

    def __init__(self, source_layer: swin.WindowAttention, path: str) -> None:
        super().__init__(path)
        _init_window_attention(self, source_layer, path)
        self.scale = source_layer.scale
        self.table0 = frozen(source_layer.relative_position_bias_table)
        self.qkv = to_tangent(source_layer.qkv, f"{path}.qkv")
        self.proj = to_tangent(source_layer.proj, f"{path}.proj")
        self.delta = PositionTable(torch.zeros_like(source_layer.relative_position_bias_table))

    def forward(self, x: torch.Tensor, dx: Tangent, mask: torch.Tensor | None) -> Pair:
        (q, k, v), (dq, dk, dv) = _window_qkv(self.qkv, x, dx, self.num_heads)
        d_bias = position_bias(self.delta(x), self.index).unsqueeze(1)
        out, d_out = attention_tangent(q, k, v, dq, dk, dv, self.scale, position_bias(self.table0, self.index),
                                       d_bias, _window_mask(mask))
        return _window_proj(self.proj, out, d_out)


class BatchFirstWindowAttention(nn.Module):
    """timm's WindowAttention (the same maths, non-fused) for NON-linear fine-tuning under DP.

    timm applies qkv and proj to (B·windows, N, C) and owns its bias table directly, so
    per-sample gradient hooks would see B·windows "examples". Here the source's qkv and
    proj see (B, windows·N, C) and the table is a :class:`PositionTable` (parameter
    ``table.weight``), so Opacus and book-keeping get per-example gradients. It keeps
    timm's call signature ``(x (B·windows, N, C), mask)``.
    """

    def __init__(self, source_layer: swin.WindowAttention, windows: int, path: str) -> None:
        super().__init__()
        _init_window_attention(self, source_layer, path)
        self.windows = windows
        self.scale = source_layer.scale
        self.qkv, self.proj = source_layer.qkv, source_layer.proj
        self.table = PositionTable(source_layer.relative_position_bias_table)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        bw, n, c = x.shape
        x = x.reshape(bw // self.windows, self.windows * n, c)
        q, k, v = _split_heads(self.qkv(x), self.windows, self.num_heads)
        # Detached: the table's output does not depend on x, and a backward hook on a module whose
        # input requires grad waits for that input's gradient, which would never come.
        bias = position_bias(self.table(x.detach()), self.index).unsqueeze(1)
        _, out = softmax_attention(q, k, v, self.scale, bias, _window_mask(mask))
        return self.proj(_merge_heads(out)).view(bw, n, -1)


class TokenRows(nn.Module):
    """A token-wise ``layer`` applied to a map (B, ..., C) as rows (B, tokens, C).

    Same result; Opacus' ghost-norm sampler of ``nn.Linear`` handles only 2-D and 3-D inputs.
    """

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x.flatten(1, -2)).view(*x.shape[:-1], -1)


def batch_first(module: nn.Module, path: str) -> nn.Module:
    """``module`` changed in place for per-example gradients: a Swin block gets a
    :class:`BatchFirstWindowAttention`, a PatchMerging its reduction as :class:`TokenRows`."""
    return _batch_first(module, path, swin.SwinTransformerBlock, swin.PatchMerging, BatchFirstWindowAttention,
                        "SwinTransformer")


def _batch_first(module: nn.Module, path: str, block: type, merging: type, attention: type, model: str) -> nn.Module:
    """:func:`batch_first` for the given block and merging classes, ``attention`` replacing a block's."""
    if isinstance(module, block):
        _refuse_dynamic_mask(module, path, model)
        (h, w), (wh, ww) = module.input_resolution, module.window_size
        module.attn = attention(module.attn, -(-h // wh) * -(-w // ww), f"{path}.attn")
    elif isinstance(module, merging):
        module.reduction = TokenRows(module.reduction)
    return module


def _refuse_dynamic_mask(block: nn.Module, path: str, model: str = "SwinTransformer") -> None:
    if block.dynamic_mask:
        raise UnsupportedModelError(
            f"'{path}': dynamic attention masks ({model}(strict_img_size=False) or "
            "dynamic_img_size=True) are not supported; create the model with a fixed image size."
        )


class _WindowedBlock(nn.Module):
    """What the tangent Swin blocks (v1 and v2) share: checks, the window re-indexing, the shift mask,
    and the tangents of the sublayers ``layers`` (in that order, timm's)."""

    def __init__(self, source_layer: nn.Module, path: str, model: str, layers: tuple[str, ...]) -> None:
        super().__init__()
        _refuse_dynamic_mask(source_layer, path, model)
        require_no_dropout(source_layer.drop_path1, f"{path}.drop_path1")
        require_no_dropout(source_layer.drop_path2, f"{path}.drop_path2")
        self.windows = _Windows(tuple(source_layer.window_size), tuple(source_layer.shift_size))
        mask = source_layer.attn_mask
        self.register_buffer("attn_mask", None if mask is None else mask.clone(), persistent=False)
        for name in layers:
            setattr(self, name, to_tangent(getattr(source_layer, name), f"{path}.{name}"))

    @staticmethod
    def rows(x: torch.Tensor, dx: Tangent) -> tuple[torch.Tensor, Tangent, tuple[int, ...]]:
        """A map (B, H, W, C) and its tangent as rows (B, H·W, C), and the map's shape."""
        b, h, w, c = x.shape
        return x.reshape(b, h * w, c), None if dx is None else dx.reshape(b, h * w, c), x.shape


class _Windows:
    """The re-indexing of a Swin block around attention, for H x W maps stored as (B, H·W, C).

    ``split``: cyclic shift by −s, zero-pad to whole windows, partition to (B, windows,
    N, C); ``join`` undoes it (reverse partition, crop, shift by +s). Both are linear
    and parameter-free, hence their own tangents.
    """

    def __init__(self, window: tuple[int, int], shift: tuple[int, int]) -> None:
        self.window, self.shift = window, shift

    def split(self, t: torch.Tensor, h: int, w: int) -> torch.Tensor:
        (wh, ww), (sh, sw) = self.window, self.shift
        t = t.unflatten(1, (h, w))
        if sh or sw:
            t = torch.roll(t, shifts=(-sh, -sw), dims=(1, 2))
        b, h, w, c = t.shape
        t = F.pad(t, (0, 0, 0, (ww - w % ww) % ww, 0, (wh - h % wh) % wh))
        hp, wp = t.shape[1], t.shape[2]
        t = t.view(b, hp // wh, wh, wp // ww, ww, c).permute(0, 1, 3, 2, 4, 5)
        return t.reshape(b, (hp // wh) * (wp // ww), wh * ww, c)

    def join(self, t: torch.Tensor, h: int, w: int) -> torch.Tensor:
        (wh, ww), (sh, sw) = self.window, self.shift
        b, c = t.shape[0], t.shape[-1]
        hp, wp = -(-h // wh) * wh, -(-w // ww) * ww
        t = t.view(b, hp // wh, wp // ww, wh, ww, c).permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, c)
        t = t[:, :h, :w]
        return (torch.roll(t, shifts=(sh, sw), dims=(1, 2)) if sh or sw else t).reshape(b, h * w, c)


@register_tangent(swin.SwinTransformerBlock)
class TangentSwinBlock(_WindowedBlock):
    r"""Linearization of ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))`` on (B, H, W, C) maps.

    Derivation: residual sums add tangents, d(x + g(x)) = dx + g'(x)[dx]; the window
    re-indexing R around attention is linear, so d(R⁻¹ attn(R h)) = R⁻¹ attn'(R h)[R dh]
    (:class:`_Windows` applied to both streams). The shift mask is a constant of the block.
    Inside, maps are (B, H·W, C), as timm's MLP sees them: every Δ layer then gets a
    3-D input, which Opacus' ghost-norm samplers require.
    """

    def __init__(self, source_layer: swin.SwinTransformerBlock, path: str) -> None:
        super().__init__(source_layer, path, "SwinTransformer", ("norm1", "attn", "norm2", "mlp"))

    def forward(self, x: torch.Tensor, dx: Tangent) -> Pair:
        x, dx, (b, h, w, c) = self.rows(x, dx)
        y, dy = self.norm1(x, dx)
        y, dy = self.attn(self.windows.split(y, h, w), self.windows.split(dy, h, w), self.attn_mask)
        x, dx = x + self.windows.join(y, h, w), add_tangents(dx, self.windows.join(dy, h, w))
        y, dy = self.mlp(*self.norm2(x, dx))
        return (x + y).view(b, h, w, c), add_tangents(dx, dy).view(b, h, w, c)


def _merge_2x2(t: torch.Tensor) -> torch.Tensor:
    """PatchMerging's re-indexing: pad to even H, W, concatenate 2x2 neighbours -> (B, H/2·W/2, 4C)."""
    b, h, w, c = t.shape
    t = F.pad(t, (0, 0, 0, w % 2, 0, h % 2))
    h, w = t.shape[1], t.shape[2]
    return t.reshape(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 4, 2, 5).reshape(b, (h // 2) * (w // 2), 4 * c)


@register_tangent(swin.PatchMerging)
class TangentPatchMerging(nn.Module):
    r"""Linearization of ``reduction(norm(merge(x)))``.

    Derivation: ``merge`` (padding and concatenation of 2x2 neighbours) is linear and
    parameter-free, so d merge(x)[dx] = merge(dx); then the LayerNorm and Linear
    tangents by the chain rule.
    """

    layers = ("norm", "reduction")  # applied in this order after the merge

    def __init__(self, source_layer: nn.Module, path: str) -> None:
        super().__init__()
        for name in self.layers:
            setattr(self, name, to_tangent(getattr(source_layer, name), f"{path}.{name}"))

    def forward(self, x: torch.Tensor, dx: Tangent) -> Pair:
        b, h, w, _ = x.shape
        y, dy = _merge_2x2(x), None if dx is None else _merge_2x2(dx)
        for name in self.layers:
            y, dy = getattr(self, name)(y, dy)
        shape = (b, (h + 1) // 2, (w + 1) // 2, -1)  # the (B, H·W, C) layout of the Δ layers, back to a map
        return y.view(shape), dy.view(shape)


def cut_swin(net: swin.SwinTransformer, blocks: int) -> list[tuple[str, nn.Module]]:
    """Remove the suffix from ``net`` in place and return it as ``(path, module)`` in order.

    The suffix is the last ``blocks`` SwinTransformerBlocks counted over all stages, and
    every PatchMerging between two of them; afterwards ``net.forward_features`` (with its
    norm) runs only the prefix: patch embedding and the earlier blocks and mergings.
    """
    depth = sum(len(stage.blocks) for stage in net.layers)
    if isinstance(blocks, bool) or not isinstance(blocks, int) or not 0 <= blocks <= depth:
        raise ValueError(f"blocks must be an integer in [0, {depth}] (the model's total depth), got {blocks!r}")
    first = depth - blocks
    suffix: list[tuple[str, nn.Module]] = []
    seen = 0
    for s, stage in enumerate(net.layers):
        if seen > first and not isinstance(stage.downsample, nn.Identity):
            suffix.append((f"layers.{s}.downsample", stage.downsample))
            stage.downsample = nn.Identity()
        keep = max(0, min(len(stage.blocks), first - seen))
        suffix += [(f"layers.{s}.blocks.{j}", stage.blocks[j]) for j in range(keep, len(stage.blocks))]
        seen += len(stage.blocks)
        stage.blocks = stage.blocks[:keep]
    return suffix


def check_swin(model: nn.Module, caller: str) -> None:
    """Refuse a Swin model whose head the suffix cannot represent (average-pooled linear classifier)."""
    if type(model) is not swin.SwinTransformer:
        raise UnsupportedModelError(f"{caller}() takes a timm SwinTransformer here, got {describe(model)}.")
    head = model.head
    _check_head(head, isinstance(head, swin.ClassifierHead) and isinstance(head.fc, nn.Linear), caller)


def _check_head(head: nn.Module, linear: bool, caller: str) -> None:
    """Refuse a head that is not (``linear``) a linear classifier after average pooling."""
    if not linear:
        raise UnsupportedModelError(
            f"{caller}() needs a linear classifier head (num_classes > 0), got {describe(head)} at 'head'."
        )
    pool = head.global_pool
    if head.use_conv or getattr(pool, "pool_type", None) != "avg" or not isinstance(head.flatten, nn.Identity):
        raise UnsupportedModelError(
            f"'head.global_pool' ({describe(pool)}, pool_type={getattr(pool, 'pool_type', None)!r}) is not "
            "supported: only global_pool='avg' with a linear head is."
        )
    require_no_dropout(head.drop, "head.drop")


class TangentSwin(TangentViT):
    r"""First-order Taylor expansion of a timm SwinTransformer around w0 (TAFT-k).

        f_lin(x; Δw) = f(x; w0) + J(x; w0)·Δw

    The last ``blocks`` Swin blocks (counted over all stages), the PatchMergings between
    them, the final norm and the head's linear classifier are linearized; the patch
    embedding and earlier blocks form a frozen prefix at w0, whose output (B, H, W, C) is
    what a prefix cache stores. Δ bookkeeping, state dicts, modes and fingerprint are
    those of :class:`~dp_taft.tangent.vit.TangentViT`; built by :func:`dp_taft.linearize`.
    """

    _check = staticmethod(check_swin)

    def __init__(self, model: swin.SwinTransformer, blocks: int) -> None:
        nn.Module.__init__(self)  # TangentViT's own constructor builds a ViT suffix
        self._check(model, "linearize")
        prefix = copy.deepcopy(model)
        suffix = cut_swin(prefix, blocks)
        self.num_blocks = blocks
        self.num_classes = model.num_classes
        self.blocks = nn.ModuleList(to_tangent(module, path) for path, module in suffix)
        self.norm = to_tangent(model.norm, "norm")
        self.head = to_tangent(model.head.fc, "head.fc")
        prefix.norm = nn.Identity()
        prefix.head = nn.Identity()
        prefix.requires_grad_(False)
        self.frozen_prefix = prefix.eval()

    def forward_dual(self, h: torch.Tensor) -> Pair:
        """``(f(x; w0), J(x; w0)·Δw)`` from the prefix map ``h`` (B, H, W, C); logits (B, classes)."""
        x, dx = h, None
        for block in self.blocks:
            x, dx = block(x, dx)
        x, dx = self.norm(x, dx)
        # Average pooling over the NHWC map is linear: the tangent is pooled the same way.
        return self.head(x.mean(dim=(1, 2)), dx.mean(dim=(1, 2)))


MODEL_FAMILIES[swin.SwinTransformer] = TangentSwin
