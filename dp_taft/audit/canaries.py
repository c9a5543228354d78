"""Canaries: the training set with every canary in it, the canary-row hook, scores.

All m canaries are rows of the run's training set, whatever their membership bits (real
examples first, then canary j at row ``first_row + j``), so N = real + m, hence q = B/N,
the calibrated σ and the divisor q·N, are constants of the audit fixed before the coin
flips. An excluded canary's row is zeroed (:class:`CanaryRows`): a row whose clipped
gradient is 0 changes nothing in DP-SGD with a fixed divisor, so the run is exactly
DP-SGD with the same constants on the real data plus the included canaries, and the
claimed add/remove-one guarantee at (q, σ, T) covers each canary. (Putting only the
included canaries in the set would let the coin flips move N, hence q, σ and the divisor
of every step: not the mechanism that was accounted.)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import timm.layers
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import ConcatDataset, DataLoader, Dataset, TensorDataset

__all__ = ["CanaryRows", "canary_image", "quiet_coordinates", "mislabeled", "loss_scores", "with_canaries",
           "trainable_vector", "dirac_scores"]


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


def with_canaries(train_set: Dataset | None, canaries: Dataset) -> Dataset:
    """``train_set`` followed by every canary, in canary order (membership is applied by :class:`CanaryRows`)."""
    if isinstance(train_set, DataLoader):
        raise ValueError("pass the real training examples as a Dataset (the audit builds the run's Poisson loader)")
    return canaries if train_set is None else ConcatDataset([train_set, canaries])


@dataclass(frozen=True)
class CanaryRows:
    """:func:`dp_taft.fit`'s grad-sample hook for the m canary rows (rows ``first_row + j``).

    Canary j's row is *replaced* when ``replaced[j]``: its own gradient is discarded and its
    clipped gradient becomes ``norm``·e_{k_j} (k_j = ``coordinates[j]`` >= 0, a flat index
    into the trainable parameters in ``model.parameters()`` order, requires_grad only; ``norm``
    = the clipping norm C, so clipping leaves it whole) or 0 (k_j = −1). Other rows are
    untouched. Both of fit's modes (a :class:`~dp_taft.privacy.engine.ClippedSumHook`):

    * "hooks": ``__call__`` overwrites the replaced rows' per-sample gradients before Opacus
      clips them (C·e_k is clipped by Opacus, to C·(1 − ~1e-6));
    * "bk" (book-keeping): the replaced rows are claimed, so they skip the forward and
      backward, and :meth:`add_clipped` adds C·e_k per sampled row to the clipped sum.

    Use :meth:`dirac` (white-box canaries) or :meth:`excluded` (input-space canaries).
    """

    first_row: int
    replaced: np.ndarray  # bool (m,)
    coordinates: np.ndarray  # int (m,); −1: the replacement is the zero gradient
    norm: float
    shapes: tuple[torch.Size, ...]  # the trainable parameters', in order

    @classmethod
    def dirac(cls, coordinates: np.ndarray, included: np.ndarray, *, norm: float, first_row: int,
              shapes: tuple[torch.Size, ...]) -> "CanaryRows":
        """Dirac canaries (Steinke et al. 2023, white-box): every canary row replaced, by C·e_{k_j} if
        canary j is included, else by 0 (its image and label never matter)."""
        return cls(first_row, np.ones(len(included), dtype=bool), np.where(included, coordinates, -1), norm, shapes)

    @classmethod
    def excluded(cls, included: np.ndarray, *, first_row: int, shapes: tuple[torch.Size, ...]) -> "CanaryRows":
        """Input-space canaries: the excluded ones' rows replaced by 0; the included ones train as they are."""
        return cls(first_row, ~np.asarray(included, dtype=bool), np.full(len(included), -1), 0.0, shapes)

    def _rows(self, indices: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(positions in the batch of the replaced canary rows, their canary ids)."""
        positions = indices.cpu().numpy()
        rows = np.flatnonzero(positions >= self.first_row)
        ids = positions[rows] - self.first_row
        keep = self.replaced[ids]
        return rows[keep], ids[keep]

    def _targets(self, ids: np.ndarray, params: Sequence[nn.Parameter]
                 ) -> Iterator[tuple[nn.Parameter, np.ndarray, tuple[torch.Tensor, ...]]]:
        """Per parameter holding some k_j of ``ids``: (it, which of ``ids`` it holds, their index in it)."""
        if tuple(p.shape for p in params) != self.shapes:
            raise RuntimeError("the hook got other trainable parameters than the audit chose coordinates in")
        flat = self.coordinates[ids]
        starts = np.cumsum([0] + [s.numel() for s in self.shapes])
        owner = np.where(flat >= 0, np.searchsorted(starts, flat, side="right") - 1, -1)
        for i, p in enumerate(params):
            mine = owner == i
            if mine.any():
                where = np.unravel_index(flat[mine] - starts[i], tuple(p.shape))
                yield p, mine, tuple(torch.as_tensor(w, device=p.device) for w in where)

    def __call__(self, indices: torch.Tensor, params: Sequence[nn.Parameter]) -> None:
        """"hooks" mode: overwrite the replaced rows' per-sample gradients in place."""
        rows, ids = self._rows(indices)
        if rows.size == 0:
            return
        for p in params:
            p.grad_sample[torch.as_tensor(rows, device=p.device)] = 0  # the canary's own gradient is discarded
        for p, mine, where in self._targets(ids, params):
            p.grad_sample[(torch.as_tensor(rows[mine], device=p.device), *where)] = self.norm

    def claims(self, indices: torch.Tensor) -> torch.Tensor:
        """"bk" mode: the replaced rows of the batch (bool (B,)); fit leaves them out of the backward."""
        claimed = np.zeros(len(indices), dtype=bool)
        claimed[self._rows(indices)[0]] = True
        return torch.from_numpy(claimed)

    def add_clipped(self, indices: torch.Tensor, params: Sequence[nn.Parameter]) -> None:
        """"bk" mode: add C·e_{k_j} to the clipped sum ``p.grad`` for each claimed row (``indices``)."""
        _, ids = self._rows(indices)
        for p, mine, where in self._targets(ids, params):
            p.grad.index_put_(where, p.grad.new_full((int(mine.sum()),), self.norm), accumulate=True)


def dirac_scores(coordinates: np.ndarray, before: torch.Tensor, after: torch.Tensor) -> np.ndarray:
    """Score per Dirac canary = −(w_T − w_0) at its coordinate k_j: descent moves against C·e_k."""
    k = torch.as_tensor(coordinates)
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
