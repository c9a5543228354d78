"""Canaries: the training set with the included ones, Dirac gradient injection, scores.

Both kinds of canary are ordinary rows of one training set (real examples first, then the
included canaries in canary order); an excluded canary is simply absent, so the claimed
add/remove-one guarantee covers each canary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import timm.layers
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset, TensorDataset

__all__ = ["DiracCanaries", "canary_image", "quiet_coordinates", "mislabeled", "loss_scores", "with_canaries",
           "trainable_vector"]


def trainable_vector(model: nn.Module) -> torch.Tensor:
    """All trainable parameters flattened in ``model.parameters()`` order (a detached CPU copy)."""
    return torch.cat([p.detach().reshape(-1).cpu() for p in model.parameters() if p.requires_grad])


def canary_image(model: nn.Module, train_set: Dataset | None) -> torch.Tensor:
    """An all-zero image of the model's input shape (C, H, W): from ``train_set[0]`` or its timm PatchEmbed."""
    if train_set is not None and len(train_set) > 0:
        return torch.zeros_like(torch.as_tensor(train_set[0][0]), dtype=torch.float32)
    embed = next((m for m in model.modules() if isinstance(m, timm.layers.PatchEmbed)), None)
    if embed is None:
        raise ValueError("cannot tell the model's input shape: pass a train_set with at least one example")
    return torch.zeros(embed.proj.in_channels, *embed.img_size)


def with_canaries(train_set: Dataset | None, canaries: Dataset, membership: np.ndarray) -> Dataset:
    """``train_set`` followed by the canaries whose membership bit is 1, in canary order."""
    if isinstance(train_set, DataLoader):
        raise ValueError("pass the real training examples as a Dataset (the audit builds the run's Poisson loader)")
    chosen = Subset(canaries, np.flatnonzero(membership).tolist())
    return chosen if train_set is None else ConcatDataset([train_set, chosen])


@dataclass(frozen=True)
class DiracCanaries:
    """m gradient canaries: canary j's per-sample gradient becomes C·e_{k_j} before clipping.

    ``coordinates[j]`` = k_j, distinct flat indices into the trainable parameters
    (``model.parameters()`` order, requires_grad only); ``norm`` = C, the clipping norm,
    so clipping leaves the canary whole. ``first_row`` = number of real examples: rows at
    positions >= it are the included canaries, in the order of ``included`` (canary ids).
    """

    coordinates: np.ndarray
    norm: float
    first_row: int
    included: np.ndarray
    shapes: tuple[torch.Size, ...]

    def __call__(self, indices: torch.Tensor, params: Sequence[nn.Parameter]) -> None:
        """The grad-sample hook (see :func:`dp_taft.fit`): overwrite the canary rows in place."""
        if tuple(p.shape for p in params) != self.shapes:
            raise RuntimeError("the hook got other trainable parameters than the audit chose coordinates in")
        positions = indices.cpu().numpy()
        rows = np.flatnonzero(positions >= self.first_row)
        if rows.size == 0:
            return
        flat = self.coordinates[self.included[positions[rows] - self.first_row]]
        starts = np.cumsum([0] + [s.numel() for s in self.shapes])
        owner = np.searchsorted(starts, flat, side="right") - 1  # parameter holding each coordinate
        for i, p in enumerate(params):
            gs = p.grad_sample
            row_index = torch.as_tensor(rows, device=gs.device)
            gs[row_index] = 0  # the canary's own gradient is discarded entirely
            mine = owner == i
            if mine.any():
                where = np.unravel_index(flat[mine] - starts[i], tuple(p.shape))
                index = (torch.as_tensor(rows[mine], device=gs.device),
                         *(torch.as_tensor(w, device=gs.device) for w in where))
                gs[index] = self.norm

    def scores(self, before: torch.Tensor, after: torch.Tensor) -> np.ndarray:
        """Score per canary = −(w_T − w_0) at its coordinate: descent moves against C·e_k."""
        k = torch.as_tensor(self.coordinates)
        return -(after[k] - before[k]).double().numpy()


def quiet_coordinates(model: nn.Module, train_set: Dataset | None, m: int, rng: np.random.Generator,
                      batch_size: int = 256) -> np.ndarray:
    """m distinct trainable coordinates where the real data's summed gradient at w0 is smallest.

    Real examples move every coordinate they touch, which blurs a canary's score there;
    the ranking (by the cross-entropy gradient, whatever loss the run uses: it only guides
    the choice) reads only the real data and the auditor's randomness, never the canaries'
    membership, so it does not affect soundness. Ties (and no real data) are broken at random.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    size = sum(p.numel() for p in params)
    if not 1 <= m <= size:
        raise ValueError(f"m must be in [1, {size}] (one distinct trainable coordinate per Dirac canary), got {m}")
    noise = rng.permutation(size)  # random order among equal magnitudes
    if train_set is None or len(train_set) == 0:
        return noise[:m]
    device = params[0].device
    total = torch.zeros(size, dtype=torch.float64)
    was_training = model.training
    model.eval()
    try:
        for x, y in DataLoader(train_set, batch_size=batch_size, shuffle=False):
            loss = F.cross_entropy(model(x.to(device)), y.to(device), reduction="sum")
            grads = torch.autograd.grad(loss, params)
            total += torch.cat([g.reshape(-1) for g in grads]).double().cpu()
    finally:
        model.train(was_training)
    order = np.lexsort((noise, total.abs().numpy()))
    return rng.permutation(order[:m])


def mislabeled(pool: Dataset, m: int, num_classes: int, seed: int | None = None) -> TensorDataset:
    """m input-space canaries: m random examples of ``pool`` (NOT in the training set) with a wrong label.

    The wrong label is the true one plus a uniform offset in [1, num_classes − 1], mod
    num_classes, so the model can only fit it by memorizing the canary.
    """
    if num_classes < 2:
        raise ValueError(f"mislabeled canaries need num_classes >= 2, got {num_classes}")
    if not 1 <= m <= len(pool):
        raise ValueError(f"m must be in [1, {len(pool)}] (examples available in the pool), got {m}")
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(pool), size=m, replace=False)
    x = torch.stack([torch.as_tensor(pool[int(i)][0]) for i in pick])
    y = torch.tensor([int(pool[int(i)][1]) for i in pick])
    shift = torch.as_tensor(rng.integers(1, num_classes, size=m))
    return TensorDataset(x, (y + shift) % num_classes)


@torch.no_grad()
def loss_scores(model: nn.Module, canaries: Dataset, batch_size: int = 256) -> np.ndarray:
    """Score per input canary = −cross-entropy of the trained model on it (fitting it lowers the loss)."""
    device = next(model.parameters()).device
    model.eval()
    out = [F.cross_entropy(model(x.to(device)), y.to(device), reduction="none").double().cpu()
           for x, y in DataLoader(canaries, batch_size=batch_size, shuffle=False)]
    return -torch.cat(out).numpy()
