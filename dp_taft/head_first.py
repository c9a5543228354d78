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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import accounting
import timm.models.vision_transformer as vit
import torch
from torch.utils.data import Dataset

from .config import TrainConfig
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
    config: TrainConfig | None = None,
    *,
    eval_set: Dataset | None = None,
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
    **options: Any,
) -> FitResult:
    """Private linear probe for ``head_epochs``, then TAFT-``blocks`` around that head for ``epochs``.

    The budget is split by steps: both stages use the same sample rate q = batch_size/N
    and one noise multiplier σ, calibrated for the T1 + T2 steps of both stages together
    (stage 1 targets the ε of its T1 steps at that σ; stage 2 is calibrated with stage 1's
    history as prior, which lands on the same σ), so the composed history reaches ε.

    Args:
        model: a timm VisionTransformer (copied, never modified).
        blocks: k of TAFT-k (the config's ``blocks`` is not read).
        config, **options: the :class:`~dp_taft.config.TrainConfig` of both stages, and flat
            options overriding it, as :func:`dp_taft.fit` takes them; ``epsilon`` and ``delta``
            are the target of the WHOLE procedure (δ defaults to 1/(10·N); ε None trains both
            stages non-privately), and ``accountant`` also splits the budget. From the method
            group: ``head_epochs`` (epochs of the probe stage) and ``head_lr`` (its learning
            rate; None: ``lr``). ``seed`` None (default): secret randomness; an integer gives
            each stage its own derived seed (reproducible; voids the guarantee if published).
            ``checkpoint_dir``: stage checkpoints go to its ``head/`` and ``taft/`` subfolders.
        eval_set, augment: as :func:`dp_taft.fit`, for both stages.

    Returns:
        Stage 2's :class:`FitResult` (the tangent model, around the trained head) with
        ``steps`` counting both stages, as its ``report`` does (segments labelled "head" and
        "taft"); ``history`` is stage 2's.
    """
    config = (config or TrainConfig()).replace(**options)
    fit_options = config.fit_options()  # refuses a missing epsilon before any work
    epsilon, delta, head_epochs = fit_options["epsilon"], fit_options["delta"], config.method.head_epochs
    n = len(train_set)
    # The stages' parent is private too (0700): fit only makes its own stage directory owner-only.
    stage_dirs: tuple[Path | None, Path | None] = (None, None)
    if fit_options["checkpoint_dir"] is not None:
        root = private_dir(fit_options["checkpoint_dir"])
        stage_dirs = (root / "head", root / "taft")
    seed = fit_options["seed"]
    # Explicitly seeded runs give each stage its own stream: reusing one seed would draw
    # the same noise in both stages, which the composed accounting does not cover.
    seeds = (None, None) if seed is None else (derive_seed(seed, 1), derive_seed(seed, 2))
    head_epsilon = None
    if epsilon is not None:
        delta = 1.0 / (10 * n) if delta is None else delta
        q = fit_options["batch_size"] / n
        per_epoch = max(1, round(1 / q))
        method = fit_options["accountant"]
        sigma = accounting.noise_multiplier(epsilon, delta, q, (head_epochs + fit_options["epochs"]) * per_epoch,
                                            method=method)
        head_epsilon = accounting.epsilon(sigma, q, head_epochs * per_epoch, delta, method=method)
    common = dict(eval_set=eval_set, augment=augment, delta=delta)
    probe = linear_probe(model)
    head_lr = fit_options["lr"] if config.method.head_lr is None else config.method.head_lr
    first = fit(probe, train_set, config, epsilon=head_epsilon, epochs=head_epochs, lr=head_lr,
                checkpoint_dir=stage_dirs[0], seed=seeds[0], stage="head", **common)
    backbone = copy.deepcopy(model)
    backbone.head.load_state_dict(probe.head.state_dict())
    second = fit(linearize(backbone, blocks), train_set, config, checkpoint_dir=stage_dirs[1], seed=seeds[1],
                 stage="taft", prior=first.report if first.report is not None else (), **common)
    return dataclasses.replace(second, steps=first.steps + second.steps)
