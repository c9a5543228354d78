"""Command line for quick questions (in the manner of prv_accountant's ``compute-dp-epsilon``).

    python -m accounting epsilon --sample-rate Q --noise-multiplier S --steps T --delta D [--method pld|rdp|all] [--json]
    python -m accounting noise --epsilon E --delta D --sample-rate Q --steps T [--method pld|rdp] [--json]
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from accounting import _validate
from accounting.calibration import noise_multiplier
from accounting.events import Segment
from accounting.report import PrivacyReport


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m accounting",
                                description="(epsilon, delta) of DP-SGD: Poisson-subsampled Gaussian, add/remove-one.")
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("epsilon", help="epsilon of a DP-SGD run")
    e.add_argument("--noise-multiplier", type=float, required=True)
    e.add_argument("--method", choices=(*_validate.METHODS, "all"), default="pld")
    n = sub.add_parser("noise", help="smallest noise multiplier reaching a target epsilon")
    n.add_argument("--epsilon", type=float, required=True)
    n.add_argument("--method", choices=_validate.METHODS, default="pld")
    for s in (e, n):
        s.add_argument("--sample-rate", type=float, required=True)
        s.add_argument("--steps", type=int, required=True)
        s.add_argument("--delta", type=float, required=True)
        s.add_argument("--dataset-size", type=int, default=None)
        s.add_argument("--json", action="store_true", help="print the full PrivacyReport as JSON")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "epsilon":
            sigma, target = args.noise_multiplier, None
        else:
            target = args.epsilon
            sigma = noise_multiplier(target, args.delta, args.sample_rate, args.steps, args.method)
        method = "pld" if args.method == "all" else args.method
        report = PrivacyReport.from_history((Segment(sigma, args.sample_rate, args.steps),), args.delta,
                                            method=method, dataset_size=args.dataset_size, target_epsilon=target)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(report.to_json())
    elif args.command == "noise":
        print(f"noise_multiplier = {sigma:.6g}  (epsilon = {report.epsilon:.6g} <= {target:g} at delta = {args.delta:g}"
              f", {method.upper()})")
    elif args.method == "all":
        for m, eps in report.epsilons.items():
            print(f"epsilon ({m.upper()}) = {eps:.6g}")
    else:
        print(f"epsilon = {report.epsilon:.6g}  (delta = {args.delta:g}, {method.upper()})")
    return 0
