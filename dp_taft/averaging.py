"""Iterate averaging of the trained parameters: free in privacy, the remedy for SGD's noise floor.

Averaging the iterates of (noisy) SGD on a convex problem, such as TAFT's loss in Δw,
reduces the variance that the last iterate keeps at a constant step size (Polyak and
Juditsky, "Acceleration of stochastic approximation by averaging", SIAM J. Control Optim.
1992; tail averaging: Jain, Kakade, Kidambi, Netrapalli, Sidford, JMLR 2018). It only
post-processes the released iterates, so the privacy report does not change.

* ``"tail"``: uniform average of the iterates of the last ``tail_fraction`` of the planned steps;
* ``"ema"``: exponential moving average with decay d per step, bias-corrected (the weights
  sum to one): avg_t = Σ_s (1 − d) d^(t−s) w_s / (1 − d^t).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn as nn

__all__ = ["AVERAGING", "IterateAverage"]

AVERAGING = ("tail", "ema")


class IterateAverage:
    """Running average of ``params`` over DP-SGD steps; :meth:`update` after each step.

    Args:
        params: the trained parameters (their current values are the iterates).
        kind: "tail" or "ema".
        planned_steps: T of the plan; "tail" averages the steps after ceil((1 − f)·T).
        tail_fraction: f in (0, 1]; ema_decay: d in (0, 1).
    """

    def __init__(self, params: Sequence[nn.Parameter], kind: str, planned_steps: int, *,
                 tail_fraction: float = 0.5, ema_decay: float = 0.99) -> None:
        self.params = list(params)
        self.kind = kind
        self.start = math.ceil((1 - tail_fraction) * planned_steps) if kind == "tail" else 0
        self.decay = ema_decay
        self.sums = [torch.zeros_like(p, dtype=torch.float64) for p in self.params]
        self.count = 0  # steps averaged so far
        self.seen = 0  # steps taken so far

    @torch.no_grad()
    def update(self) -> None:
        """Fold the parameters after one more step into the average."""
        self.seen += 1
        if self.seen <= self.start:
            return
        self.count += 1
        for total, p in zip(self.sums, self.params):
            if self.kind == "tail":
                total.add_(p.detach().double())
            else:
                total.mul_(self.decay).add_(p.detach().double(), alpha=1 - self.decay)

    def _average(self, total: torch.Tensor) -> torch.Tensor:
        if self.kind == "tail":
            return total / self.count
        return total / (1 - self.decay ** self.count)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The averaged values in the parameters within the block, the iterates restored after
        (nothing changes before the first averaged step)."""
        saved = [p.detach().clone() for p in self.params]
        self.apply()
        try:
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(self.params, saved):
                    p.copy_(s)

    @torch.no_grad()
    def apply(self) -> None:
        """Write the average into the parameters (no-op before the first averaged step)."""
        if self.count == 0:
            return
        for total, p in zip(self.sums, self.params):
            p.copy_(self._average(total).to(p.dtype))

    def state_dict(self) -> dict[str, Any]:
        return {"sums": [t.cpu() for t in self.sums], "count": self.count, "seen": self.seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sums = [t.to(p.device) for t, p in zip(state["sums"], self.params)]
        self.count, self.seen = state["count"], state["seen"]
