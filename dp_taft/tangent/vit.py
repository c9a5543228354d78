"""The tangent model of a timm VisionTransformer: frozen prefix + dual-stream suffix."""

from __future__ import annotations

import copy
from collections.abc import Mapping

import timm.models.deit as deit
import timm.models.vision_transformer as vit
import torch
import torch.nn as nn

from ..fingerprint import fingerprint
from .base import DeltaLeaf
from .dual import Tangent
from .registry import UnsupportedModelError, describe, require_no_dropout, to_tangent

__all__ = ["TangentViT", "linearize"]

_POOLS = ("token", "avg", "map")

#: Exact model class -> its tangent model class; :func:`linearize` dispatches on it, and
#: other model families (e.g. :mod:`dp_taft.tangent.eva`) register their subclass here.
MODEL_FAMILIES: dict[type[nn.Module], type["TangentViT"]] = {}


class TangentViT(nn.Module):
    r"""First-order Taylor expansion of a timm ViT around its weights w0 (TAFT-k).

        f_lin(x; Δw) = f(x; w0) + J(x; w0)·Δw

    The last ``blocks`` transformer blocks, the final norm, ``fc_norm`` and the head
    are linearized; everything before them (patch and position embedding, class and
    register tokens, earlier blocks) is a frozen prefix evaluated at w0. f(x; w0) and
    J·Δw come out of one forward pass of dual-stream modules. Pooling follows timm: class
    token, mean, or attention pooling (``global_pool='map'``, its latent, projections, norm and
    MLP linearized); a DeiT ``VisionTransformerDistilled`` gives the mean of its two heads on
    the class and distillation tokens, as timm does at eval. The Δw are zero-initialized
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
        pool = getattr(model, "attn_pool", None)
        self.attn_pool = None if pool is None else to_tangent(pool, "attn_pool")
        self.head_dist = None
        if type(model) is deit.VisionTransformerDistilled:
            self.head_dist = to_tangent(model.head_dist, "head_dist")
            self.fc_norm = None  # timm's distilled forward_head reads the tokens without fc_norm

        # The prefix is a copy of the source model whose suffix is cut off; its own
        # forward_features then yields exactly the prefix output, whatever the timm
        # version does before the blocks (pos-embed variants, register tokens, ...).
        prefix = copy.deepcopy(model)
        prefix.blocks = prefix.blocks[:first]
        for name in ("norm", "fc_norm", "head", "head_drop"):
            setattr(prefix, name, nn.Identity())
        for name in ("attn_pool", "head_dist"):
            if isinstance(getattr(prefix, name, None), nn.Module):
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
        if self.head_dist is not None:
            return self._distilled_heads(x, dx)
        if self.attn_pool is not None:
            x, dx = self.attn_pool(self._tokens(x), self._tokens(dx))
        else:
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
        return self._tokens(x).mean(dim=1)

    def _tokens(self, x: Tangent) -> Tangent:
        """The tokens timm pools over: without the prefix tokens unless ``pool_include_prefix``."""
        return x if x is None or self.pool_include_prefix else x[:, self.num_prefix_tokens :]

    def _distilled_heads(self, x: torch.Tensor, dx: Tangent) -> tuple[torch.Tensor, torch.Tensor]:
        """DeiT: (head(x[:, 0]) + head_dist(x[:, 1])) / 2; the tangent of a mean is the mean of tangents."""
        y, dy = self.head(x[:, 0], None if dx is None else dx[:, 0])
        y_dist, dy_dist = self.head_dist(x[:, 1], None if dx is None else dx[:, 1])
        return (y + y_dist) / 2, (dy + dy_dist) / 2

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


MODEL_FAMILIES[vit.VisionTransformer] = TangentViT
MODEL_FAMILIES[deit.VisionTransformerDistilled] = TangentViT


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
    return MODEL_FAMILIES.get(type(model), TangentViT)(model, blocks)


def _optional(module: nn.Module, path: str) -> nn.Module | None:
    return None if isinstance(module, nn.Identity) else to_tangent(module, path)


def _check_supported(model: nn.Module, blocks: int) -> None:
    """Refuse, with a precise message, everything the tangent suffix cannot represent."""
    if type(model) not in MODEL_FAMILIES:
        supported = ", ".join(sorted(f"{c.__module__}.{c.__qualname__}" for c in MODEL_FAMILIES))
        raise UnsupportedModelError(
            f"linearize() takes a timm VisionTransformer or another supported model class ({supported}), "
            f"got {describe(model)} (create it with timm.create_model('vit_...'), or a deit_, beit_, eva02_ "
            "or swin_ model)."
        )
    if getattr(model, "distilled_training", False):
        raise UnsupportedModelError(
            "the model is in distilled training mode (timm returns the two heads' logits separately): "
            "call model.set_distilled_training(False); the tangent model outputs the heads' mean, as timm at eval."
        )
    depth = len(model.blocks)
    if isinstance(blocks, bool) or not isinstance(blocks, int) or not 0 <= blocks <= depth:
        raise ValueError(f"blocks must be an integer in [0, {depth}] (the model's depth), got {blocks!r}")
    if model.global_pool not in _POOLS:
        raise UnsupportedModelError(
            f"global_pool={model.global_pool!r} is not supported: use one of {_POOLS} "
            "(max pooling and 'prr' attention pooling are not linearized)."
        )
    if not isinstance(model.head, nn.Linear):
        raise UnsupportedModelError(
            f"the model needs a linear classifier head (num_classes > 0), got {describe(model.head)}."
        )
    if not isinstance(getattr(model, "head_dist", model.head), nn.Linear):
        raise UnsupportedModelError(f"the distillation head must be linear, got {describe(model.head_dist)}.")
    require_no_dropout(model.head_drop, "head_drop")
