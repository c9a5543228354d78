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
import timm.models.vision_transformer as vit
import torch
import torch.nn as nn

from .tangent import TangentViT, UnsupportedModelError, linearize

__all__ = ["NLFTViT", "LinearProbe", "taft", "nlft", "linear_probe"]


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
    ``fc_norm``'ed features (B, D), so a prefix cache is one vector per example."""

    def __init__(self, model: vit.VisionTransformer) -> None:
        super().__init__()
        _check_vit(model, "linear_probe")
        net = copy.deepcopy(model)
        self.num_classes = net.num_classes
        self.num_blocks = 0
        self.head = net.head
        net.head = nn.Identity()
        net.requires_grad_(False)
        self.head.requires_grad_(True)
        self.net = net
        self.train(model.training)

    @torch.no_grad()
    def prefix(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features (B, D) for images ``x`` (B, C, H, W)."""
        return self.net(x)

    def forward_from_prefix(self, h: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes) from pooled features ``h`` (B, D)."""
        return self.head(h)


def taft(model: vit.VisionTransformer, k: int) -> TangentViT:
    """TAFT-k: the tangent model of ``model`` linearized in its last ``k`` blocks (see :func:`dp_taft.linearize`)."""
    return linearize(model, blocks=k)


def nlft(model: vit.VisionTransformer, k: int) -> NLFTViT:
    """NLFT-k: non-linear fine-tuning of the last ``k`` blocks, final norm(s) and head of a copy of ``model``."""
    return NLFTViT(model, k)


def linear_probe(model: vit.VisionTransformer) -> LinearProbe:
    """Linear probing: only the head of a copy of ``model`` is trained."""
    return LinearProbe(model)


def _check_vit(model: nn.Module, method: str) -> None:
    if not isinstance(model, vit.VisionTransformer):
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
