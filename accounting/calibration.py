"""Calibration: the noise for a target epsilon, the steps a budget allows.

Both search over the accountants of :mod:`accounting.accountant`; RDP (an upper
bound on the PLD epsilon up to discretisation) gives the starting bracket.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

from accounting import _validate
from accounting.accountant import epsilon_of_history
from accounting.events import Segment, as_segments

_RTOL = 0.005  # the returned sigma's epsilon lies in [target (1 - _RTOL), target]
_MIN_NOISE = 1e-2
_MAX_STEPS = 10**9


def noise_multiplier(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    method: str = "pld",
    *,
    max_noise_multiplier: float = 1e3,
    prior: Sequence[Segment] = (),
) -> float:
    """Smallest noise multiplier (to within 0.5% in epsilon) whose epsilon is <= ``target_epsilon``.

    With ``prior`` (segments already run on the same data, e.g. an earlier training
    stage), the epsilon is that of the whole history ``prior`` + ``steps`` new steps, so
    the new segment spends exactly what the prior left of the budget.

    Bracketing then regula falsi on log(sigma); epsilon decreases in sigma. The result's epsilon
    lies in [0.995 target, target]. Raises ValueError when even
    ``max_noise_multiplier`` does not reach the target (in particular when ``prior`` alone
    already spends it).
    """
    target = _validate.epsilon(target_epsilon, "target_epsilon")
    d = _validate.delta(delta)
    q = _validate.sample_rate(sample_rate)
    t = _validate.steps(steps)
    _validate.method(method)
    top = _validate.noise_multiplier(max_noise_multiplier, "max_noise_multiplier")
    before = tuple(as_segments(prior))
    if t == 0:
        return _MIN_NOISE

    def eps(sigma: float) -> float:
        return epsilon_of_history((*before, Segment(sigma, q, t)), d, method)

    hint = 1.0
    if method == "pld":  # the RDP epsilon bounds the PLD one from above: its sigma is a near-upper bracket
        try:
            hint = noise_multiplier(target, d, q, t, "rdp", max_noise_multiplier=top, prior=before)
        except ValueError:
            hint = top
    lo = hi = min(hint, top)
    if eps(hi) > target:  # expand upwards
        while eps(hi) > target:
            if hi >= top:
                raise ValueError(
                    f"target_epsilon={target} is unreachable: epsilon={eps(top):.4g} even with "
                    f"noise_multiplier=max_noise_multiplier={top} (sample_rate={q}, steps={t}, delta={d})")
            lo, hi = hi, min(2 * hi, top)
    else:  # expand downwards
        while eps(lo) <= target:
            hi, lo = lo, lo / 2
            if lo < _MIN_NOISE:
                return hi
    return _refine(eps, lo, hi, target)


def _refine(eps: Callable[[float], float], lo: float, hi: float, target: float) -> float:
    """Shrink [lo, hi] (eps(lo) > target >= eps(hi)) until eps(hi) >= target (1 - _RTOL).

    Regula falsi with the Illinois modification on g(x) = log eps(e^x) - log goal,
    goal = target (1 - _RTOL/2): epsilon is close to a power law in sigma, so this
    needs a handful of evaluations where bisection needs about ten.
    """
    goal = math.log(target * (1 - _RTOL / 2))
    x_lo, x_hi = math.log(lo), math.log(hi)
    g_lo, g_hi = math.log(eps(lo)) - goal, math.log(max(eps(hi), 1e-300)) - goal
    side = 0
    for _ in range(200):
        if g_hi + goal >= math.log(target * (1 - _RTOL)) or x_hi - x_lo < 1e-12:
            break
        x = x_hi - g_hi * (x_hi - x_lo) / (g_hi - g_lo)
        if not x_lo < x < x_hi:
            x = (x_lo + x_hi) / 2
        e = eps(math.exp(x))
        g = math.log(max(e, 1e-300)) - goal
        if e <= target:
            x_hi, g_hi = x, g
            if side == 1:
                g_lo /= 2  # Illinois: the lo end was kept twice, halve its weight
            side = 1
        else:
            x_lo, g_lo = x, g
            if side == -1:
                g_hi /= 2
            side = -1
    return math.exp(x_hi)


def max_steps(
    target_epsilon: float, delta: float, noise_multiplier: float, sample_rate: float, method: str = "pld"
) -> int:
    """Largest number of steps whose epsilon is <= ``target_epsilon`` (0 if none; capped at 10**9)."""
    target = _validate.epsilon(target_epsilon, "target_epsilon")
    d = _validate.delta(delta)
    sigma = _validate.noise_multiplier(noise_multiplier)
    q = _validate.sample_rate(sample_rate)
    _validate.method(method)

    def ok(t: int) -> bool:
        return epsilon_of_history((Segment(sigma, q, t),), d, method) <= target

    lo = max_steps(target, d, sigma, q, "rdp") if method == "pld" else 0
    if lo == 0 and not ok(1):
        return 0
    lo = max(lo, 1)
    hi = 2 * lo
    while ok(hi):
        lo, hi = hi, 2 * hi
        if lo >= _MAX_STEPS:
            return _MAX_STEPS
    # Invariant: ok(lo) and not ok(hi).
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return lo
