"""TAFT around a privately trained head: two DP-SGD stages under one (ε, δ) budget.

The tangent model's block Jacobians reach the logits only through the head W0
(f_lin = f(x; w0) + J·Δw, and every block's J is multiplied by W0). Around a freshly
initialised head for a new task, the Δ of the blocks therefore move the logits along
random directions and TAFT behaves much like a linear probe. Linearizing around a head
that was trained first (a private linear probe on the same data) gives the block
tangents meaningful directions. Both stages touch the private data, so their privacy
composes: stage 2 is calibrated with stage 1's history as ``prior`` and its report
covers both.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import accounting
import timm.models.vision_transformer as vit
from torch.utils.data import Dataset

from .methods import linear_probe
from .privacy.checkpoint import private_dir
from .privacy.randomness import derive_seed
from .tangent import linearize
from .train import FitResult, fit

__all__ = ["fit_head_first"]


def fit_head_first(
    model: vit.VisionTransformer,
    blocks: int,
    train_set: Dataset,
    *,
    epsilon: float | None,
    delta: float | None = None,
    head_epochs: int = 1,
    head_lr: float | None = None,
    epochs: int = 1,
    batch_size: int = 256,
    lr: float = 0.1,
    checkpoint_dir: str | Path | None = None,
    **fit_kwargs: Any,
) -> FitResult:
    """Private linear probe for ``head_epochs``, then TAFT-``blocks`` around that head for ``epochs``.

    The budget is split by steps: both stages use the same sample rate q = batch_size/N
    and one noise multiplier σ, calibrated for the T1 + T2 steps of both stages together
    (stage 1 targets the ε of its T1 steps at that σ; stage 2 is calibrated with stage 1's
    history as prior, which lands on the same σ), so the composed history reaches ε.

    Args:
        model: a timm VisionTransformer (copied, never modified).
        blocks: k of TAFT-k.
        epsilon, delta: the target of the WHOLE procedure (δ defaults to 1/(10·N)); None
            trains both stages non-privately.
        head_epochs: epochs of the probe stage (>= 1); head_lr: its learning rate (default ``lr``).
        epochs, batch_size, lr, **fit_kwargs: as :func:`dp_taft.fit`, for both stages (its
            ``accountant`` also splits the budget). ``seed`` None (default): secret randomness;
            an integer gives each stage its own derived seed (reproducible; voids the guarantee
            if published).
        checkpoint_dir: stage checkpoints go to its ``head/`` and ``taft/`` subfolders.

    Returns:
        Stage 2's :class:`FitResult` (the tangent model, around the trained head) with
        ``steps`` counting both stages, as its ``report`` does (segments labelled "head" and
        "taft"); ``history`` is stage 2's.
    """
    n = len(train_set)
    # The stages' parent is private too (0700): fit only makes its own stage directory owner-only.
    stage_dirs: tuple[Path | None, Path | None] = (None, None)
    if checkpoint_dir is not None:
        root = private_dir(checkpoint_dir)
        stage_dirs = (root / "head", root / "taft")
    seed = fit_kwargs.pop("seed", None)
    # Explicitly seeded runs give each stage its own stream: reusing one seed would draw
    # the same noise in both stages, which the composed accounting does not cover.
    seeds = (None, None) if seed is None else (derive_seed(seed, 1), derive_seed(seed, 2))
    common = dict(batch_size=batch_size, **fit_kwargs)
    head_epsilon = None
    if epsilon is not None:
        delta = 1.0 / (10 * n) if delta is None else delta
        q = batch_size / n
        per_epoch = max(1, round(1 / q))
        method = fit_kwargs.get("accountant", "pld")
        sigma = accounting.noise_multiplier(epsilon, delta, q, (head_epochs + epochs) * per_epoch, method=method)
        head_epsilon = accounting.epsilon(sigma, q, head_epochs * per_epoch, delta, method=method)
    probe = linear_probe(model)
    first = fit(probe, train_set, epsilon=head_epsilon, delta=delta if epsilon is not None else None,
                epochs=head_epochs, lr=lr if head_lr is None else head_lr, checkpoint_dir=stage_dirs[0],
                seed=seeds[0], stage="head", **common)
    backbone = copy.deepcopy(model)
    backbone.head.load_state_dict(probe.head.state_dict())
    second = fit(linearize(backbone, blocks), train_set, epsilon=epsilon, delta=delta if epsilon is not None else None,
                 epochs=epochs, lr=lr, checkpoint_dir=stage_dirs[1], seed=seeds[1], stage="taft",
                 prior=first.report if first.report is not None else (), **common)
    return dataclasses.replace(second, steps=first.steps + second.steps)
