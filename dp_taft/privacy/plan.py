"""The frozen plan of a DP-SGD run (what will run and what it will cost) and its ledger.

A plan is fixed before the first step: sample rate q, steps T, noise multiplier σ
calibrated so that the planned run (after any ``prior`` history) ends at the target ε.
A resumed run must keep the privacy fields of its plan; its σ is the saved one.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import accounting

from .checkpoint import LEDGER_FILE, Ledger

__all__ = ["Plan", "open_ledger"]

# Fields of the plan that fix the privacy guarantee; a resume must not change them.
_PRIVACY_KEYS = ("epsilon", "delta", "sample_rate", "max_grad_norm", "dataset_size", "accountant", "prior",
                 "secure_mode")


@dataclass(frozen=True)
class Plan:
    """What :func:`dp_taft.fit` will run.

    ``epsilon`` None: non-private (σ = 0, no clipping, no ledger). ``sample_rate`` q in (0, 1];
    ``steps_per_epoch`` = round(1/q); ``noise_multiplier`` σ (noise std σ·C per logical batch);
    ``prior``: segments spent earlier on the same data, composed into this run's budget.
    """

    epsilon: float | None
    delta: float | None
    sample_rate: float
    max_grad_norm: float
    dataset_size: int
    accountant: str
    prior: tuple[accounting.Segment, ...]
    epochs: int
    secure_mode: bool
    noise_multiplier: float = 0.0

    @property
    def steps_per_epoch(self) -> int:
        return max(1, round(1 / self.sample_rate))

    @property
    def planned_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    def calibrated(self) -> "Plan":
        """This plan with σ calibrated to end at the target ε (σ = 0 when non-private)."""
        if self.epsilon is None:
            return dataclasses.replace(self, noise_multiplier=0.0)
        sigma = _calibrate(self.epsilon, self.delta, self.sample_rate, self.planned_steps, self.accountant, self.prior)
        return dataclasses.replace(self, noise_multiplier=sigma)

    def resumed(self, saved: dict[str, Any], where: Path) -> "Plan":
        """This plan with the σ of ``saved`` (a checkpoint's plan), refusing changed privacy settings."""
        mine = self.to_dict()
        changed = [f"{k}: saved {saved.get(k)!r}, now {mine[k]!r}" for k in _PRIVACY_KEYS
                   if saved.get(k, False if k == "secure_mode" else None) != mine[k]]
        if changed:
            raise ValueError(
                f"checkpoint_dir {str(where)!r} holds a run with other privacy settings ({'; '.join(changed)}). "
                "Resume with the same epsilon, delta, batch size, max_grad_norm, dataset, accountant and "
                "secure_mode, or start a fresh run in a new checkpoint_dir."
            )
        return dataclasses.replace(self, noise_multiplier=saved["noise_multiplier"])

    def report(self, ledger: Ledger, executed: int, prior_stages: tuple[str, ...],
               stage: str | None) -> accounting.PrivacyReport:
        """The report of every step in ``ledger``, this run's segments merged and labelled by
        ``stage`` (after ``prior_stages``); ``executed``: steps behind the released weights."""
        own = _merged(ledger.entries[len(self.prior):])
        history = (*self.prior, *own)
        stages: tuple[str, ...] = ()
        if stage is not None or self.prior:
            stages = (*(prior_stages or ("prior",) * len(self.prior)), *((stage or "fit",) * len(own)))
        return accounting.PrivacyReport.from_history(
            history, self.delta, method=self.accountant, dataset_size=self.dataset_size,
            max_grad_norm=self.max_grad_norm, target_epsilon=self.epsilon, stages=stages,
            notes=(f"dp_taft.fit: {ledger.steps} steps reserved in the write-ahead ledger (every step that may have "
                   f"drawn noise, those of runs interrupted by a crash included); the released weights result from "
                   f"{executed} of this run's steps"),
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form, as saved in checkpoints."""
        d = dataclasses.asdict(self)
        d["prior"] = [dataclasses.asdict(s) for s in self.prior]
        return d


@functools.lru_cache(maxsize=64)  # a pure function of its arguments, and the costliest call of a short run
def _calibrate(epsilon: float, delta: float, sample_rate: float, steps: int, method: str,
               prior: tuple[accounting.Segment, ...]) -> float:
    try:
        return accounting.noise_multiplier(epsilon, delta, sample_rate, steps, method=method, prior=prior)
    except ValueError as e:
        raise ValueError(
            f"target epsilon={epsilon} (delta={delta:.3g}) is unreachable in T={steps} steps at sample rate "
            f"q={sample_rate:.4g} within the noise-multiplier search bounds ({e}). Raise epsilon, train "
            "fewer epochs or use a smaller batch_size."
        ) from e


def open_ledger(plan: Plan, ckpt_dir: Path | None, saved_ledger_steps: int | None) -> Ledger | None:
    """The run's write-ahead ledger (None when non-private), with ``plan.prior`` recorded first.

    ``saved_ledger_steps``: steps the checkpoint says were reserved when it was written
    (None for a fresh run); a ledger holding fewer was lost or truncated and is refused.
    """
    if plan.epsilon is None:
        return None
    path = ckpt_dir / LEDGER_FILE if ckpt_dir is not None else None
    ledger = Ledger(path, method=plan.accountant, target_epsilon=plan.epsilon, delta=plan.delta)
    if saved_ledger_steps is not None and ledger.steps < saved_ledger_steps:
        raise ValueError(
            f"{path} records {ledger.steps} steps but the checkpoint was written after {saved_ledger_steps} "
            "were reserved: the ledger was lost or truncated, and resuming would under-report the privacy "
            "spent. Restore the ledger or start a fresh run in a new checkpoint_dir."
        )
    if ledger.steps == 0:
        for segment in plan.prior:  # spent before this run: recorded ahead of everything else
            ledger.reserve(segment.noise_multiplier, segment.sample_rate, segment.steps)
    elif tuple(ledger.entries[: len(plan.prior)]) != plan.prior:
        raise ValueError(
            f"{path} does not start with the given prior history; resume with the same prior, or start a "
            "fresh run in a new checkpoint_dir."
        )
    sigma, q, steps = plan.noise_multiplier, plan.sample_rate, plan.planned_steps
    if not plan.prior and accounting.epsilon(sigma, q, steps, plan.delta, method=plan.accountant) <= plan.epsilon:
        ledger.vouch(sigma, q, steps)
    return ledger


def _merged(entries: Sequence[accounting.Segment]) -> list[accounting.Segment]:
    """Consecutive segments with equal (σ, q) joined into one."""
    out: list[accounting.Segment] = []
    for s in entries:
        if out and (out[-1].noise_multiplier, out[-1].sample_rate) == (s.noise_multiplier, s.sample_rate):
            out[-1] = accounting.Segment(s.noise_multiplier, s.sample_rate, out[-1].steps + s.steps)
        else:
            out.append(s)
    return out
