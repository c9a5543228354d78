"""Speed of `accounting` against Google's dp_accounting on the same cases, in one run.

    python -m experiments.bench_accounting

Prints one JSON line per figure: our time, dp_accounting's time (seconds, best
of ``--repeat`` cold runs: caches cleared before each) and their ratio, plus
both epsilons/sigmas so the comparison is of like with like.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from typing import Callable

import dp_accounting
from dp_accounting import mechanism_calibration
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

import accounting
from accounting import pld, rdp

SIGMA, Q, DELTA = 1.0, 0.01, 1e-5


def _cold() -> None:
    pld._compose.cache_clear()
    pld._step_masses.cache_clear()


def _best(fn: Callable[[], float], repeat: int) -> tuple[float, float]:
    best, value = float("inf"), float("nan")
    for _ in range(repeat):
        _cold()
        start = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - start)
    return best, value


def _event(sigma: float, steps: int) -> dp_accounting.DpEvent:
    return dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(Q, dp_accounting.GaussianDpEvent(sigma)), steps)


def _dp_epsilon(make: Callable[[], dp_accounting.PrivacyAccountant], sigma: float, steps: int) -> float:
    acc = make()
    acc.compose(_event(sigma, steps))
    return acc.get_epsilon(DELTA)


def _line(figure: str, ours: tuple[float, float], theirs: tuple[float, float], **extra: object) -> None:
    print(json.dumps({"figure": figure, "ours_s": round(ours[0], 4), "dp_accounting_s": round(theirs[0], 4),
                      "ratio": round(ours[0] / theirs[0], 3), "ours_value": ours[1], "dp_accounting_value": theirs[1],
                      **extra}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    case = {"noise_multiplier": SIGMA, "sample_rate": Q, "delta": DELTA}

    steps = 100_000
    pld_dp = lambda: pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)  # noqa: E731
    _line("pld_epsilon_T1e5", _best(lambda: accounting.epsilon(SIGMA, Q, steps, DELTA), args.repeat),
          _best(lambda: _dp_epsilon(pld_dp, SIGMA, steps), args.repeat),
          steps=steps, dp_accounting_interval=1e-4, **case)

    orders = list(rdp.DEFAULT_ORDERS)
    rdp_dp = lambda: rdp_privacy_accountant.RdpAccountant(orders)  # noqa: E731
    _line("rdp_epsilon_T1e5", _best(lambda: accounting.epsilon(SIGMA, Q, steps, DELTA, "rdp"), args.repeat),
          _best(lambda: _dp_epsilon(rdp_dp, SIGMA, steps), args.repeat), steps=steps, orders=len(orders), **case)

    steps, target = 10_000, 2.0
    for method, make, interval in (("pld", lambda: pld_privacy_accountant.PLDAccountant(
            value_discretization_interval=1e-3), 1e-3), ("rdp", rdp_dp, None)):
        ours = _best(lambda: accounting.noise_multiplier(target, DELTA, Q, steps, method), 1)
        theirs = _best(lambda: mechanism_calibration.calibrate_dp_mechanism(
            make, lambda s: _event(s, steps), target, DELTA,
            mechanism_calibration.LowerEndpointAndGuess(0.3, 1.0), tol=0.005), 1)
        _line(f"calibrate_sigma_{method}", ours, theirs, steps=steps, target_epsilon=target, sample_rate=Q,
              delta=DELTA, dp_accounting_interval=interval)


if __name__ == "__main__":
    main()
