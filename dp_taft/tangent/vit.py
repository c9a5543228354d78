"""The tangent model of a timm VisionTransformer: frozen prefix + dual-stream suffix."""

from __future__ import annotations

import copy
from collections.abc import Mapping

import timm.models.vision_transformer as vit
import torch
import torch.nn as nn

from ..fingerprint import fingerprint
from .base import DeltaLeaf
from .dual import Tangent
from .registry import UnsupportedModelError, describe, require_no_dropout, to_tangent

__all__ = ["TangentViT", "linearize"]

_POOLS = ("token", "avg")


class TangentViT(nn.Module):
    r"""First-order Taylor expansion of a timm ViT around its weights w0 (TAFT-k).

        f_lin(x; Δw) = f(x; w0) + J(x; w0)·Δw

    The last ``blocks`` transformer blocks, the final norm, ``fc_norm`` and the head
    are linearized; everything before them (patch and position embedding, class and
    register tokens, earlier blocks) is a frozen prefix evaluated at w0. f(x; w0) and
    J·Δw come out of one forward pass of dual-stream modules. The Δw are zero-initialized
    ``nn.Parameter``s and the only trainable parameters; their per-sample gradients are
    computed by Opacus' hooks in the ordinary backward pass.

    Build it with :func:`linearize`. The frozen prefix always runs in eval mode (it is
    a fixed feature map), whatever ``train()`` is called with; the tangent suffix has no
    stochastic layers, so train and eval modes compute the same function.
    """

    def __init__(self, model: vit.VisionTransformer, blocks: int) -> None:
        super().__init__()
        _check_supported(model, blocks)
        depth = len(model.blocks)
        first = depth - blocks
        self.num_blocks = blocks
        self.num_classes = model.num_classes
        self.global_pool = model.global_pool
        self.num_prefix_tokens = model.num_prefix_tokens
        self.pool_include_prefix = getattr(model, "pool_include_prefix", False)

        self.blocks = nn.ModuleList(
            to_tangent(model.blocks[i], f"blocks.{i}") for i in range(first, depth)
        )
        self.norm = _optional(model.norm, "norm")
        self.fc_norm = _optional(model.fc_norm, "fc_norm")
        self.head = to_tangent(model.head, "head")

        # The prefix is a copy of the source model whose suffix is cut off; its own
        # forward_features then yields exactly the prefix output, whatever the timm
        # version does before the blocks (pos-embed variants, register tokens, ...).
        prefix = copy.deepcopy(model)
        prefix.blocks = prefix.blocks[:first]
        for name in ("norm", "fc_norm", "head", "head_drop"):
            setattr(prefix, name, nn.Identity())
        prefix.requires_grad_(False)
        self.frozen_prefix = prefix.eval()

    # ----------------------------------------------------------------- modes
    def train(self, mode: bool = True) -> "TangentViT":
        super().train(mode)
        self.frozen_prefix.eval()
        return self

    # ------------------------------------------------------------ forward paths
    @torch.no_grad()
    def prefix(self, x: torch.Tensor) -> torch.Tensor:
        """Frozen-prefix output for images ``x`` (B, C, H, W): tokens (B, N, D) at w0.

        Cache it once per example and train with :meth:`forward_from_prefix`.
        """
        return self.frozen_prefix.forward_features(x)

    def forward_dual(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(f(x; w0), J(x; w0)·Δw)`` from prefix tokens ``h`` (B, N, D); logits (B, classes)."""
        x, dx = h, None
        for block in self.blocks:
            x, dx = block(x, dx)
        if self.norm is not None:
            x, dx = self.norm(x, dx)
        x, dx = self._pool(x), self._pool(dx)
        if self.fc_norm is not None:
            x, dx = self.fc_norm(x, dx)
        return self.head(x, dx)

    def forward_from_prefix(self, h: torch.Tensor) -> torch.Tensor:
        """f_lin from cached prefix tokens ``h``; equals ``forward`` on the images."""
        y, dy = self.forward_dual(h)
        return y + dy

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """f_lin(x; Δw) = f(x; w0) + J(x; w0)·Δw, logits (B, num_classes)."""
        return self.forward_from_prefix(self.prefix(x))

    def _pool(self, x: Tangent) -> Tangent:
        # Token selection and the mean are linear, so the tangent pools the same way.
        if x is None:
            return None
        if self.global_pool == "token":
            return x[:, 0]
        return (x if self.pool_include_prefix else x[:, self.num_prefix_tokens :]).mean(dim=1)

    # ---------------------------------------------------------------- the Δw
    def deltas(self) -> dict[str, nn.Parameter]:
        """Δ parameters keyed by the ORIGINAL model's names, e.g. ``"blocks.11.attn.qkv.weight"``."""
        out: dict[str, nn.Parameter] = {}
        for module in self.modules():
            if isinstance(module, DeltaLeaf):
                out.update(module.named_deltas())
        return out

    def delta_state_dict(self) -> dict[str, torch.Tensor]:
        """Detached copies of Δw, keyed by original parameter names (what to save)."""
        return {name: p.detach().clone() for name, p in self.deltas().items()}

    @torch.no_grad()
    def load_delta_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load Δw saved by :meth:`delta_state_dict`; keys and shapes must match exactly."""
        deltas = self.deltas()
        missing, unexpected = deltas.keys() - state.keys(), state.keys() - deltas.keys()
        if missing or unexpected:
            raise KeyError(
                f"delta state does not match this tangent model: missing {sorted(missing)}, "
                f"unexpected {sorted(unexpected)}. Was it saved from a model linearized "
                f"with the same blocks={self.num_blocks}?"
            )
        for name, p in deltas.items():
            if state[name].shape != p.shape:
                raise ValueError(f"shape of '{name}': saved {tuple(state[name].shape)}, model {tuple(p.shape)}")
            p.copy_(state[name])

    def fingerprint(self) -> str:
        """SHA-256 of w0 (every frozen tensor and buffer) and of the tangent structure:
        :func:`dp_taft.fingerprint.fingerprint` of this model, the one a model file records.

        Two tangent models can be composed (their Δw averaged) only when fingerprints
        match: same pretrained weights, same linearized blocks, same layer shapes and dtypes.
        """
        return fingerprint(self)


def linearize(model: vit.VisionTransformer, blocks: int = 2) -> TangentViT:
    """Tangent model of ``model`` around its current weights, linearizing the last ``blocks``.

    Args:
        model: a timm ``VisionTransformer`` (pretrained or not, any ``num_classes`` >= 1).
            It is copied; later changes to ``model`` do not affect the tangent model.
        blocks: k in [0, depth]; the last k blocks, the final norm(s) and the head are
            linearized (TAFT-k). ``blocks=0`` linearizes only the head (and final norms).

    Raises:
        UnsupportedModelError: a layer in the linearized part has no exact tangent rule.
    """
    return TangentViT(model, blocks)


def _optional(module: nn.Module, path: str) -> nn.Module | None:
    return None if isinstance(module, nn.Identity) else to_tangent(module, path)


def _check_supported(model: nn.Module, blocks: int) -> None:
    """Refuse, with a precise message, everything the tangent suffix cannot represent."""
    if type(model) is not vit.VisionTransformer:
        raise UnsupportedModelError(
            f"linearize() takes a timm VisionTransformer, got {describe(model)} "
            "(create it with timm.create_model('vit_...'))."
        )
    depth = len(model.blocks)
    if isinstance(blocks, bool) or not isinstance(blocks, int) or not 0 <= blocks <= depth:
        raise ValueError(f"blocks must be an integer in [0, {depth}] (the model's depth), got {blocks!r}")
    if model.global_pool not in _POOLS:
        raise UnsupportedModelError(
            f"global_pool={model.global_pool!r} is not supported: use one of {_POOLS} "
            "(max pooling and attention pooling are not linearized)."
        )
    if getattr(model, "attn_pool", None) is not None:
        raise UnsupportedModelError("attention pooling ('map') is not supported; use global_pool='token' or 'avg'.")
    if not isinstance(model.head, nn.Linear):
        raise UnsupportedModelError(
            f"the model needs a linear classifier head (num_classes > 0), got {describe(model.head)}."
        )
    require_no_dropout(model.head_drop, "head_drop")
