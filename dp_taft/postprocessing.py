"""Per-step post-processing of a run's iterates for :func:`dp_taft.fit`: LR schedule and averaging."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from .averaging import IterateAverage
from .privacy.engine import PrivateEngine
from .privacy.plan import Plan
from .schedules import make_scheduler

__all__ = ["StepPostProcessing"]


@dataclass
class StepPostProcessing:
    """What happens after each DP-SGD step to the released iterate: the LR schedule and the
    iterate average. Both only post-process released values, so they cost no privacy."""

    scheduler: torch.optim.lr_scheduler.LambdaLR
    average: IterateAverage | None

    @classmethod
    def build(cls, engine: PrivateEngine, params: list[nn.Parameter], plan: Plan, schedule: str, warmup: float,
              averaging: str | None, tail_fraction: float, ema_decay: float) -> "StepPostProcessing":
        scheduler = make_scheduler(engine.optimizer.original_optimizer, plan.planned_steps, schedule, warmup)
        average = None if averaging is None else IterateAverage(
            params, averaging, plan.planned_steps, tail_fraction=tail_fraction, ema_decay=ema_decay)
        return cls(scheduler, average)

    def after_step(self) -> None:
        self.scheduler.step()
        if self.average is not None:
            self.average.update()

    def evaluated(self) -> Any:
        """Context in which the model holds what :meth:`finish` will return."""
        return nullcontext() if self.average is None else self.average.applied()

    def finish(self) -> None:
        if self.average is not None:
            self.average.apply()

    def state_dict(self) -> dict[str, Any]:
        return {"scheduler": self.scheduler.state_dict(),
                "average": None if self.average is None else self.average.state_dict()}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if state is None:  # a checkpoint from before schedules and averaging: constant lr, no average
            return
        self.scheduler.load_state_dict(state["scheduler"])
        if self.average is not None and state["average"] is not None:
            self.average.load_state_dict(state["average"])
