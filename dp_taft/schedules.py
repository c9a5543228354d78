"""Learning-rate schedules sized to the planned number of DP-SGD steps.

The factor multiplies ``lr`` at step t (0-based) of a plan of T steps with W = round(warmup·T)
warm-up steps: (t + 1)/W during warm-up, then

* ``"constant"``: 1;
* ``"cosine"``: (1 + cos(π·s))/2 with s = (t − W)/(T − W) (Loshchilov and Hutter, SGDR, ICLR 2017);
* ``"linear"``: 1 − s.

The schedule depends only on the public plan, so it costs no privacy.
"""

from __future__ import annotations

import math

import torch

__all__ = ["SCHEDULES", "lr_factor", "make_scheduler"]

SCHEDULES = ("constant", "cosine", "linear")


def lr_factor(step: int, planned_steps: int, schedule: str, warmup: float) -> float:
    """Multiplier of the base learning rate at 0-based ``step`` (steps past the plan keep the last value)."""
    warm = round(warmup * planned_steps)
    if step < warm:
        return (step + 1) / warm
    if schedule == "constant" or planned_steps <= warm:
        return 1.0
    s = min(1.0, (step - warm) / (planned_steps - warm))
    return 0.5 * (1 + math.cos(math.pi * s)) if schedule == "cosine" else 1.0 - s


def make_scheduler(optimizer: torch.optim.Optimizer, planned_steps: int, schedule: str,
                   warmup: float) -> torch.optim.lr_scheduler.LambdaLR:
    """A scheduler to ``step()`` once after every DP-SGD step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: lr_factor(t, planned_steps, schedule, warmup))
