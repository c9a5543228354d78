"""Training losses selected by name: cross-entropy and the rescaled square loss.

Both are convex in the logits, hence convex in Δw for the tangent model (whose logits
are affine in Δw). Every loss is an ``nn.Module`` with a ``reduction`` attribute
("mean", "sum" or "none") because Opacus' ghost clipping switches it to "none" to get
per-example losses.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["LOSSES", "RescaledSquareLoss", "make_loss"]


class RescaledSquareLoss(nn.Module):
    r"""Per example: mean over classes of (f(x) − κ·onehot(y))²; then ``reduction`` over the batch.

    The rescaled square loss of Hui & Belkin (2021), used by the TAFT paper with κ = 15:
    a target scale κ > 1 keeps the square loss competitive with cross-entropy.
    """

    def __init__(self, kappa: float = 15.0, reduction: str = "mean") -> None:
        super().__init__()
        self.kappa = kappa
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        onehot = F.one_hot(target, logits.shape[-1]).to(logits.dtype)
        per_example = (logits - self.kappa * onehot).pow(2).mean(dim=-1)
        if self.reduction == "none":
            return per_example
        return per_example.sum() if self.reduction == "sum" else per_example.mean()


#: name -> factory(kappa) of the loss module.
LOSSES: dict[str, Callable[[float], nn.Module]] = {
    "ce": lambda kappa: nn.CrossEntropyLoss(),
    "square": lambda kappa: RescaledSquareLoss(kappa),
}


def make_loss(name: str, kappa: float = 15.0) -> nn.Module:
    """The loss module called ``name`` (one of :data:`LOSSES`); ``kappa`` (> 0) is used by "square"."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}: use one of {sorted(LOSSES)}")
    if name == "square" and not kappa > 0:
        raise ValueError(f"kappa must be > 0 (target scale of the square loss), got {kappa}")
    return LOSSES[name](kappa)
