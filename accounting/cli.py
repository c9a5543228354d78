"""Command line: quick privacy questions, and checking a saved report.

    python -m accounting epsilon --sample-rate Q --noise-multiplier S --steps T --delta D
                                 [--dataset-size N] [--method pld|rdp|all] [--json]
        epsilon of T DP-SGD steps (in the manner of prv_accountant's ``compute-dp-epsilon``).
    python -m accounting noise --epsilon E --sample-rate Q --steps T --delta D
                               [--dataset-size N] [--method pld|rdp] [--json]
        the smallest noise multiplier whose epsilon is <= E.
    python -m accounting verify REPORT.json [--method pld|rdp|all] [--tolerance X] [--json]
        recompute epsilon from a saved PrivacyReport's history at its delta and check
        every epsilon the report states (and that it stayed within its target_epsilon);
        for a ParallelReport (format ``dp_taft.parallel_report/1``), check each member likewise,
        and that its own epsilon and delta are at least every member's.

With ``--json``, ``epsilon`` and ``noise`` print one object with the answer at the top level
and the full report (format ``dp_taft.privacy_report/2``) under ``"report"``::

    {"noise_multiplier": 1.07, "sample_rate": 0.01, "steps": 1000, "delta": 1e-05, "dataset_size": null,
     "method": "pld", "epsilon": 1.99, "epsilons": {"pld": 1.99, "rdp": 2.3}, "target_epsilon": 2.0,
     "report": {...}}

Exit status: 0 on success (for ``verify``: every stated epsilon holds); 1 when ``verify``
finds a stated epsilon (or a parallel report's delta) that the recomputation exceeds; 2 on bad input, with a message
naming the flag to change.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from accounting import _validate
from accounting.accountant import epsilon
from accounting.calibration import noise_multiplier
from accounting.events import Segment
from accounting.parallel import ParallelReport, report_from_dict
from accounting.report import EpsilonCheck, PrivacyReport

_MAX_NOISE = 1e3  # the largest noise multiplier `noise` tries; a target it cannot reach is refused
_ANSWER_KEYS = ("delta", "dataset_size", "method", "epsilon", "epsilons", "target_epsilon")
Report = PrivacyReport | ParallelReport


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m accounting",
                                description="(epsilon, delta) of DP-SGD: Poisson-subsampled Gaussian, add/remove-one.")
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("epsilon", help="epsilon of a DP-SGD run", description="Epsilon of T DP-SGD steps.")
    e.add_argument("--noise-multiplier", type=float, required=True, metavar="S",
                   help="noise multiplier sigma: Gaussian noise std divided by the clipping norm, in (0, inf)")
    e.add_argument("--method", choices=(*_validate.METHODS, "all"), default="pld",
                   help="accountant: pld (tight upper bound, default), rdp (Renyi DP, looser) or all (print both)")
    n = sub.add_parser("noise", help="smallest noise multiplier reaching a target epsilon",
                       description="The smallest noise multiplier whose epsilon is <= --epsilon (within 0.5%).")
    n.add_argument("--epsilon", type=float, required=True, metavar="E", help="target epsilon in nats, in (0, inf)")
    n.add_argument("--method", choices=_validate.METHODS, default="pld",
                   help="accountant to calibrate with: pld (tight upper bound, default) or rdp (Renyi DP, looser)")
    for s in (e, n):
        _add_run_options(s)
    _add_verify(sub)
    return p


def _add_run_options(s: argparse.ArgumentParser) -> None:
    """The options ``epsilon`` and ``noise`` share."""
    s.add_argument("--sample-rate", type=float, required=True, metavar="Q",
                   help="Poisson sampling rate q: the probability that an example is in a step's batch "
                        "(expected batch size / dataset size), in (0, 1]")
    s.add_argument("--steps", type=int, required=True, metavar="T",
                   help="number of DP-SGD steps (optimiser updates) T, an integer >= 1")
    s.add_argument("--delta", type=float, required=True, metavar="D",
                   help="delta of the (epsilon, delta) guarantee, in (0, 1); should be well below 1/N")
    s.add_argument("--dataset-size", type=int, default=None, metavar="N",
                   help="number of training examples N, an integer >= 1 (optional); when given, --delta "
                        "must be below 1/N")
    s.add_argument("--json", action="store_true",
                   help="print one JSON object: the answer at the top level, the full PrivacyReport under 'report'")


def _add_verify(sub: Any) -> None:
    v = sub.add_parser("verify", help="recompute a saved report's epsilon and check the epsilons it states",
                       description="Recompute epsilon from a PrivacyReport's history at its delta and check every "
                                   "epsilon it states. Exit 0 if all hold, 1 if not, 2 on bad input.")
    v.add_argument("report", metavar="REPORT.json",
                   help="path of a PrivacyReport JSON file (PrivacyReport.to_json; format 1 or 2), of the "
                        "--json output of epsilon/noise, or of a ParallelReport (ParallelReport.to_json, or a shard "
                        "set's report)")
    v.add_argument("--method", choices=(*_validate.METHODS, "all"), default=None,
                   help="accountant to recompute with: pld, rdp, or all that the report states an epsilon for "
                        "(default: the report's own method)")
    v.add_argument("--tolerance", type=float, default=1e-9, metavar="X",
                   help="relative slack in [0, inf) for round-off: a stated epsilon holds when recomputed <= "
                        "stated * (1 + X); default 1e-9")
    v.add_argument("--json", action="store_true",
                   help="print {report, holds, delta, tolerance, checks: [{field, method, stated, recomputed, "
                        "holds}], not_checked: [top-level fields of a parallel report that no check covers]} as JSON")


def _check_run_flags(args: argparse.Namespace) -> None:
    """Validate the flags of ``epsilon``/``noise``; each ValueError names the flag to change."""
    _validate.sample_rate(args.sample_rate, "--sample-rate")
    _validate.delta(args.delta, "--delta")
    if args.steps < 1:  # zero steps would print epsilon = 0, which answers no real question
        raise ValueError(f"--steps must be an integer >= 1 (the number of DP-SGD steps), got {args.steps}")
    if args.command == "epsilon":
        _validate.noise_multiplier(args.noise_multiplier, "--noise-multiplier")
    else:
        _validate.epsilon(args.epsilon, "--epsilon")
    n = args.dataset_size
    if n is None:
        return
    if n < 1:
        raise ValueError(f"--dataset-size must be an integer >= 1 (the number of training examples), got {n}")
    if args.delta >= 1.0 / n:
        raise ValueError(f"--delta {args.delta:g} is not below 1/--dataset-size = 1/{n} = {1 / n:.3g}: such a "
                         f"delta allows releasing a few examples outright; use e.g. --delta {1 / (10 * n):.2g} "
                         "(1/(10 N)) or smaller")


def _calibrate(args: argparse.Namespace, method: str) -> float:
    """Noise multiplier for ``--epsilon``, refusing a target that no noise up to _MAX_NOISE reaches."""
    floor = epsilon(_MAX_NOISE, args.sample_rate, args.steps, args.delta, method)
    if floor > args.epsilon:
        raise ValueError(f"--epsilon {args.epsilon:g} is unreachable: even noise multiplier {_MAX_NOISE:g} gives "
                         f"epsilon {floor:.4g} at --delta {args.delta:g} with --sample-rate {args.sample_rate:g} "
                         f"and --steps {args.steps}; raise --epsilon or --delta, or lower --steps or --sample-rate")
    return noise_multiplier(args.epsilon, args.delta, args.sample_rate, args.steps, method,
                            max_noise_multiplier=_MAX_NOISE)


def _run_report(args: argparse.Namespace) -> PrivacyReport:
    """The report of the single segment that the ``epsilon``/``noise`` flags describe."""
    _check_run_flags(args)
    method = "pld" if args.method == "all" else args.method
    if args.command == "epsilon":
        sigma, target = args.noise_multiplier, None
    else:
        sigma, target = _calibrate(args, method), args.epsilon
    return PrivacyReport.from_history((Segment(sigma, args.sample_rate, args.steps),), args.delta, method=method,
                                      dataset_size=args.dataset_size, target_epsilon=target)


def _print_run(args: argparse.Namespace, report: PrivacyReport) -> None:
    if args.json:
        d = report.to_dict()
        print(json.dumps({**d["history"][0], **{k: d[k] for k in _ANSWER_KEYS}, "report": d}))
    elif args.command == "noise":
        print(f"noise_multiplier = {report.history[0].noise_multiplier:.6g}  (epsilon = {report.epsilon:.6g} <= "
              f"{args.epsilon:g} at delta = {args.delta:g}, {report.method.upper()})")
    elif args.method == "all":
        for m, eps in report.epsilons.items():
            print(f"epsilon ({m.upper()}) = {eps:.6g}")
    else:
        print(f"epsilon = {report.epsilon:.6g}  (delta = {args.delta:g}, {report.method.upper()})")


def _load_report(path: str) -> tuple[Report, list[str]]:
    """Read a report file, and the top-level fields it has beyond its format's (a parallel report may carry
    others, e.g. a shard set's, which no check covers); ValueError says whether the file, its JSON or its
    fields are at fault."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"cannot read REPORT.json {path!r}: {err}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); pass a file written by PrivacyReport.to_json") from None
    if isinstance(data, dict) and "report" in data and "history" not in data:
        data = data["report"]  # the --json output of `epsilon` or `noise`: the report is nested
    try:
        report = report_from_dict(data)
    except ValueError as err:
        raise ValueError(f"{path} is not a valid privacy report: {err}") from None
    return report, sorted(set(data) - set(report.to_dict()))


def _verify(args: argparse.Namespace) -> int:
    """Run ``verify``: 0 when every stated epsilon holds, 1 when one does not."""
    tolerance = _validate.tolerance(args.tolerance, "--tolerance")
    report, unchecked = _load_report(args.report)
    if args.method in _validate.METHODS and args.method not in report.methods:
        raise ValueError(f"--method {args.method}: the report states no {args.method.upper()} epsilon; use "
                         f"--method {' or '.join(report.methods)}")
    methods = report.methods if args.method == "all" else None if args.method is None else (args.method,)
    checks = report.verify(methods, tolerance)
    holds = all(c.holds for c in checks)
    if args.json:
        print(json.dumps({"report": args.report, "holds": holds, "delta": report.delta, "tolerance": tolerance,
                          "checks": [c.to_dict() for c in checks], "not_checked": unchecked}))
    else:
        _print_checks(args.report, report, checks, tolerance, unchecked)
    return 0 if holds else 1


def _print_checks(path: str, report: Report, checks: Sequence[EpsilonCheck], tolerance: float,
                  unchecked: Sequence[str]) -> None:
    print(f"{path}: {report}")
    for c in checks:
        verdict = "holds" if c.holds else "DOES NOT HOLD"
        print(f"  {c.field:<15} {c.method.upper()}: stated {c.stated:.10g}, recomputed {c.recomputed:.10g}  {verdict}")
    if unchecked:
        print(f"  not checked (beyond the parallel report format): {', '.join(unchecked)}")
    failed = [c.field for c in checks if not c.holds]
    if failed:
        print(f"FAILED: the epsilon recomputed from the history (for a parallel report's own epsilon and delta: "
              f"the members' maximum) exceeds {', '.join(failed)} "
              f"(relative tolerance {tolerance:g})")
    else:
        print(f"OK: every stated epsilon holds (relative tolerance {tolerance:g})")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line on ``argv`` (default ``sys.argv[1:]``); returns the exit status 0, 1 or 2."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "verify":
            return _verify(args)
        report = _run_report(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    _print_run(args, report)
    return 0
