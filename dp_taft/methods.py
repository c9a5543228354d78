"""The three fine-tuning methods compared under one DP-SGD pipeline (:func:`dp_taft.fit`).

Each builder copies the user's timm ``VisionTransformer`` (so methods never alias each
other) and returns a module with the prefix protocol of :class:`~dp_taft.TangentViT`:

* ``prefix(x)``: the frozen part, run without grad and in eval mode (cacheable);
* ``forward_from_prefix(h)``: the trainable part;
* ``forward(x) == forward_from_prefix(prefix(x))``;
* attributes ``num_classes`` and ``num_blocks``.

Only the trainable part has ``requires_grad=True`` parameters, all in layers whose
per-sample gradients Opacus computes exactly (``nn.Linear``, timm's ``LayerNorm`` and
``LayerScale``, registered in :mod:`dp_taft.privacy.grad_samplers`).
"""

from __future__ import annotations

import copy

import timm.layers
import timm.models.beit as beit
import timm.models.deit as deit
import timm.models.eva as eva
import timm.models.swin_transformer as swin
import timm.models.swin_transformer_v2 as swin2
import timm.models.vision_transformer as vit
import torch
import torch.nn as nn

from .tangent import TangentViT, UnsupportedModelError, linearize
from .tangent.beit import SampledBeitAttention
from .tangent.eva import check_eva
from .tangent.layerscale import layer_scale
from .tangent.pooling import LatentQueryPool
from .tangent.swin import batch_first, check_swin, cut_swin
from .tangent.swin_v2 import batch_first_v2, check_swin_v2

__all__ = ["NLFTViT", "LinearProbe", "NLFTSwin", "LinearProbeSwin", "NLFTSwinV2", "LinearProbeSwinV2", "NLFTEva",
           "NLFTBeit", "taft", "nlft",
           "linear_probe"]


class _SplitViT(nn.Module):
    """Frozen prefix + trainable suffix; modules with nothing to train always run in eval mode."""

    num_classes: int
    num_blocks: int

    def train(self, mode: bool = True) -> "_SplitViT":
        super().train(mode)
        # Frozen layers are a fixed feature map: dropout / patch-drop there must stay
        # off. Trainable layers keep `mode`, since Opacus only hooks training modules.
        for module in self.modules():
            if not any(p.requires_grad for p in module.parameters()):
                module.eval()
        return self

    def prefix(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_from_prefix(self, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes) for images ``x`` (B, C, H, W)."""
        return self.forward_from_prefix(self.prefix(x))


class NLFTViT(_SplitViT):
    """Ordinary (non-linear) fine-tuning of the last ``blocks`` blocks, the final norm(s) and the head.

    The prefix is patch/position embedding and the first ``depth - blocks`` blocks at
    the pretrained weights; its output is the token sequence (B, N, D).
    """

    def __init__(self, model: vit.VisionTransformer, blocks: int) -> None:
        super().__init__()
        _check_vit(model, "nlft")
        depth = len(model.blocks)
        if isinstance(blocks, bool) or not isinstance(blocks, int) or not 0 <= blocks <= depth:
            raise ValueError(f"blocks must be an integer in [0, {depth}] (the model's depth), got {blocks!r}")
        net = copy.deepcopy(model)
        first = depth - blocks
        self.num_classes = net.num_classes
        self.num_blocks = blocks
        # The suffix modules are moved out of `net`; what stays in `net` (embeddings,
        # first blocks, fc_norm and head) is reused through its own forward_features /
        # forward_head, so pooling follows whatever the timm version implements.
        self.blocks = nn.Sequential(*list(net.blocks)[first:])
        self.norm = net.norm
        net.blocks = nn.Sequential(*list(net.blocks)[:first])
        net.norm = nn.Identity()
        net.requires_grad_(False)
        for part in (self.blocks, self.norm, net.fc_norm, net.head):
            part.requires_grad_(True)
        _train_pool_and_distillation_head(net)
        self.net = net
        _refuse_dropout(self.blocks, "blocks")
        _refuse_dropout(net.head_drop, "head_drop")
        self.train(model.training)

    @torch.no_grad()
    def prefix(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens (B, N, D) after the frozen blocks, for images ``x`` (B, C, H, W)."""
        return self.net.forward_features(x)

    def forward_from_prefix(self, h: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes) from prefix tokens ``h`` (B, N, D)."""
        return self.net.forward_head(self.norm(self.blocks(h)))


class LinearProbe(_SplitViT):
    """Trains the classifier head only; the prefix is the whole backbone up to the pooled,
    ``fc_norm``'ed features (B, D), so a prefix cache is one vector per example. For a DeiT
    ``VisionTransformerDistilled`` the prefix is the class and distillation tokens' features
    (B, 2, D) and both heads are trained, their logits averaged as timm does at eval."""

    distilled = False  # DeiT: a second head, ``head_dist``, on the distillation token

    def __init__(self, model: vit.VisionTransformer) -> None:
        super().__init__()
        _check_vit(model, "linear_probe")
        net = copy.deepcopy(model)
        self.num_classes = net.num_classes
        self.num_blocks = 0
        self.head = net.head
        net.head = nn.Identity()
        self.distilled = isinstance(net, deit.VisionTransformerDistilled)
        if self.distilled:
            self.head_dist, net.head_dist = net.head_dist, nn.Identity()
        net.requires_grad_(False)
        self.head.requires_grad_(True)
        if self.distilled:
            self.head_dist.requires_grad_(True)
        self.net = net
        self.train(model.training)

    @torch.no_grad()
    def prefix(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features (B, D) for images ``x`` (B, C, H, W); DeiT distilled: the two tokens' (B, 2, D)."""
        if self.distilled:
            return self.net.forward_features(x)[:, :2]
        return self.net(x)

    def forward_from_prefix(self, h: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes) from pooled features ``h`` (B, D) (DeiT distilled: (B, 2, D))."""
        if self.distilled:
            return (self.head(h[:, 0]) + self.head_dist(h[:, 1])) / 2
        return self.head(h)


class NLFTSwin(NLFTViT):
    """NLFT-k of a timm SwinTransformer: the last ``blocks`` Swin blocks (over all stages), the
    PatchMergings between them, the final norm and the head's classifier are trained.

    The prefix output is the (B, H, W, C) map after the frozen blocks. Each trained block's
    window attention is a :class:`~dp_taft.tangent.swin.BatchFirstWindowAttention` (same
    maths as timm's), so every trainable layer sees the batch first.
    """

    _check, _batch_first = staticmethod(check_swin), staticmethod(batch_first)

    def __init__(self, model: swin.SwinTransformer, blocks: int) -> None:
        _SplitViT.__init__(self)
        self._check(model, "nlft")
        net = copy.deepcopy(model)
        self.num_classes = net.num_classes
        self.num_blocks = blocks
        self.blocks = nn.Sequential(*(self._batch_first(module, path) for path, module in cut_swin(net, blocks)))
        self.norm = net.norm
        net.norm = nn.Identity()
        net.requires_grad_(False)
        for part in (self.blocks, self.norm, net.head):
            part.requires_grad_(True)
        self.net = net
        _refuse_dropout(self.blocks, "blocks")
        self.train(model.training)


class LinearProbeSwin(LinearProbe):
    """Linear probe of a timm SwinTransformer: the prefix is the whole backbone up to the
    average-pooled, normed features (B, D); only ``head.fc`` is trained."""

    _check = staticmethod(check_swin)

    def __init__(self, model: swin.SwinTransformer) -> None:
        _SplitViT.__init__(self)
        self._check(model, "linear_probe")
        net = copy.deepcopy(model)
        self.num_classes = net.num_classes
        self.num_blocks = 0
        self.head = net.head.fc
        net.head.fc = nn.Identity()
        net.requires_grad_(False)
        self.head.requires_grad_(True)
        self.net = net
        self.train(model.training)


class NLFTSwinV2(NLFTSwin):
    """NLFT-k of a timm SwinTransformerV2, as :class:`NLFTSwin`; the trained blocks' attention is a
    :class:`~dp_taft.tangent.swin_v2.BatchFirstWindowAttentionV2` (q/v biases, logit scale and the
    position-bias MLP as per-example layers)."""

    _check, _batch_first = staticmethod(check_swin_v2), staticmethod(batch_first_v2)


class LinearProbeSwinV2(LinearProbeSwin):
    """Linear probe of a timm SwinTransformerV2, as :class:`LinearProbeSwin`."""

    _check = staticmethod(check_swin_v2)


class NLFTEva(NLFTViT):
    """NLFT-k of a timm Eva (EVA, EVA-02): as :class:`NLFTViT`, the trained blocks also
    receiving the model's rotary embedding.

    EVA keeps some parameters outside child layers, where Opacus cannot sample them; the
    trained blocks are rewritten with the same maths so that every parameter sits in an
    exactly sampled layer: ``gamma_1``/``gamma_2`` become timm ``LayerScale`` layers after the
    attention and the MLP, and a fused ``qkv`` with ``q_bias``/``v_bias`` becomes separate
    q, k, v ``nn.Linear`` layers (EVA's own ``qkv_fused=False`` path). Parameter names of
    those layers differ from the source model's accordingly.
    """

    def __init__(self, model: eva.Eva, blocks: int) -> None:
        check_eva(model)
        super().__init__(model, blocks)
        for block in self.blocks:
            _split_qkv(block.attn)
            _scale_branches(block)
        self.train(model.training)

    def forward_from_prefix(self, h: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes) from prefix tokens ``h`` (B, N, D)."""
        rope = None if self.net.rope is None else self.net.rope.get_embed()  # frozen, eval: the fixed table
        for block in self.blocks:
            h = block(h, rope=rope)
        return self.net.forward_head(self.norm(h))


class _ScaledBranch(nn.Module):
    """``γ ⊙ layer(x, ...)``: an EVA residual branch with its layer scale as a timm ``LayerScale``."""

    def __init__(self, layer: nn.Module, gamma: nn.Parameter) -> None:
        super().__init__()
        self.layer = layer
        self.scale = layer_scale(gamma)

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.scale(self.layer(x, **kwargs))


def _scale_branches(block: nn.Module) -> None:
    """Wrap a BEiT/EVA block's attention and MLP in a :class:`_ScaledBranch` holding its bare
    ``gamma_1``/``gamma_2`` (set to None, so that the block no longer scales them itself)."""
    for name, branch in (("gamma_1", "attn"), ("gamma_2", "mlp")):
        gamma = getattr(block, name, None)
        if gamma is not None:
            setattr(block, branch, _ScaledBranch(getattr(block, branch), gamma))
            setattr(block, name, None)


def _split_qkv(attn: nn.Module) -> None:
    """Replace EVA's fused ``qkv`` (+ ``q_bias``, zero ``k_bias``, ``v_bias``) by q/k/v ``nn.Linear``s."""
    if getattr(attn, "qkv", None) is None:
        return
    weight, width = attn.qkv.weight, attn.qkv.out_features // 3
    biases = (attn.q_bias, None, attn.v_bias) if attn.q_bias is not None else (None, None, None)
    for name, w, b in zip(("q_proj", "k_proj", "v_proj"), weight.split(width), biases):
        layer = nn.Linear(weight.shape[1], width, bias=b is not None, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(w)
            if b is not None:
                layer.bias.copy_(b)
        setattr(attn, name, layer)
    attn.qkv = attn.q_bias = attn.k_bias = attn.v_bias = None


class NLFTBeit(NLFTViT):
    """NLFT-k of a timm BEiT: as :class:`NLFTViT`, the trained blocks also receiving the
    model's shared relative position bias (frozen: it belongs to the stem).

    BEiT keeps parameters outside child layers, where Opacus cannot sample them; the trained
    blocks are rewritten with the same maths so that every parameter sits in an exactly
    sampled layer: the attention becomes a :class:`~dp_taft.tangent.beit.SampledBeitAttention`
    (q/v biases and bias table as layers) and ``gamma_1``/``gamma_2`` timm ``LayerScale``
    layers after the attention and the MLP. Those parameters' names differ accordingly.
    """

    def __init__(self, model: beit.Beit, blocks: int) -> None:
        super().__init__(model, blocks)
        for block in self.blocks:
            block.attn = SampledBeitAttention(block.attn)
            _scale_branches(block)
        self.train(model.training)

    def forward_from_prefix(self, h: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes) from prefix tokens ``h`` (B, N, D)."""
        shared = None if self.net.rel_pos_bias is None else self.net.rel_pos_bias()  # frozen, at w0
        for block in self.blocks:
            h = block(h, shared_rel_pos_bias=shared)
        return self.net.forward_head(self.norm(h))


def taft(model: vit.VisionTransformer, k: int) -> TangentViT:
    """TAFT-k: the tangent model of ``model`` linearized in its last ``k`` blocks (see :func:`dp_taft.linearize`)."""
    return linearize(model, blocks=k)


def nlft(model: vit.VisionTransformer, k: int) -> NLFTViT:
    """NLFT-k: non-linear fine-tuning of the last ``k`` blocks, final norm(s) and head of a copy of ``model``."""
    if type(model) is swin.SwinTransformer:
        return NLFTSwin(model, k)
    if type(model) is swin2.SwinTransformerV2:
        return NLFTSwinV2(model, k)
    if type(model) is eva.Eva:
        return NLFTEva(model, k)
    if type(model) is beit.Beit:
        return NLFTBeit(model, k)
    return NLFTViT(model, k)


def linear_probe(model: vit.VisionTransformer) -> LinearProbe:
    """Linear probing: only the head of a copy of ``model`` is trained."""
    if type(model) is swin.SwinTransformer:
        return LinearProbeSwin(model)
    if type(model) is swin2.SwinTransformerV2:
        return LinearProbeSwinV2(model)
    return LinearProbe(model)


def _train_pool_and_distillation_head(net: vit.VisionTransformer) -> None:
    """NLFT trains every layer after the blocks: also DeiT's distillation head and MAP attention
    pooling, whose latent query moves into a per-example :class:`~dp_taft.tangent.pooling.LatentQueryPool`."""
    if isinstance(net, deit.VisionTransformerDistilled):
        if net.distilled_training:
            raise UnsupportedModelError(
                "nlft() needs one output per example: call model.set_distilled_training(False) (the two heads' "
                "logits are then averaged, as timm does at eval)."
            )
        net.head_dist.requires_grad_(True)
    if isinstance(getattr(net, "attn_pool", None), timm.layers.AttentionPoolLatent):  # BEiT has none
        _refuse_dropout(net.attn_pool, "attn_pool")
        net.attn_pool = LatentQueryPool(net.attn_pool, "attn_pool").requires_grad_(True)


def _check_vit(model: nn.Module, method: str) -> None:
    if not isinstance(model, (vit.VisionTransformer, eva.Eva, beit.Beit)):
        raise UnsupportedModelError(
            f"{method}() takes a timm VisionTransformer, got {type(model).__qualname__} "
            "(create it with timm.create_model('vit_...'))."
        )
    if not isinstance(model.head, nn.Linear):
        raise UnsupportedModelError(
            f"{method}() needs a linear classifier head: create the model with num_classes > 0."
        )


def _refuse_dropout(part: nn.Module, path: str) -> None:
    """Stochastic layers in the trainable part would be active in train mode; refuse them.

    Opacus' per-sample gradients would still be exact, but DP-SGD results would then
    depend on dropout noise the tangent method does not have, so comparisons are unfair.
    """
    for name, m in part.named_modules():
        if isinstance(m, nn.Dropout):
            rate = m.p
        elif isinstance(m, timm.layers.DropPath):
            rate = m.drop_prob
        else:
            continue
        if rate > 0:
            where = f"{path}.{name}" if name else path
            raise UnsupportedModelError(
                f"'{where}' is a stochastic layer ({type(m).__qualname__}, rate {rate}) in the trainable part. "
                "Create the timm model with drop_rate=0, proj_drop_rate=0, attn_drop_rate=0 and drop_path_rate=0."
            )
