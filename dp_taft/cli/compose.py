"""``dp-taft compose``: one model from several tangent models of the same base (averaged Δw)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .. import model_dir
from ..compose import compose, compose_reports
from ..model_file import MODEL_FILE
from ..privacy.checkpoint import private_dir
from ..tangent import TangentViT
from .options import add_weights, remember_weights, saved_weights
from .record import RECORD_FILE, TrainRecord

__all__ = ["add_parser", "run"]


def add_parser(sub: Any) -> None:
    p = sub.add_parser("compose", help="average the Δw of tangent models trained from the same base",
                       description="Average the Δw of tangent models (taft, taft-head) with the same base fingerprint "
                                   "and classes: exactly their output ensemble, at the cost of one model. The "
                                   "guarantee is the sequential composition of all their training runs, or with "
                                   "--disjoint, their parallel composition.")
    p.add_argument("dirs", type=Path, nargs="+", metavar="DIR", help="model directories to compose (two or more)")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="where the composed model goes")
    p.add_argument("--disjoint", action="store_true",
                   help="declare that the models were trained on disjoint data (no example, and no person, in two "
                        "of them): the guarantee is then the largest member's (parallel composition)")
    add_weights(p)
    p.set_defaults(run=run)


def _check_inputs(dirs: list[Path], out: Path, disjoint: bool) -> None:
    """Refuse a model listed twice, an ``out`` that would overwrite a model, and a ``--disjoint``
    claim that the members' own training records contradict (the same training data)."""
    resolved = [d.resolve() for d in dirs]
    if len(dirs) < 2 or len(set(resolved)) < len(dirs):
        raise ValueError("compose needs two or more different model directories")
    if out.resolve() in resolved or (out / MODEL_FILE).exists() or (out / RECORD_FILE).exists():
        raise ValueError(f"--out {out} already holds a model: choose a new directory for the composed model")
    if disjoint:
        data = [r.data for r in map(TrainRecord.load, dirs) if r is not None]
        if len(set(data)) < len(data):
            raise ValueError("--disjoint declares disjoint training data, but two of these models were trained on the "
                             "same data (their training records say so): compose them without --disjoint")


def run(args: argparse.Namespace) -> int:
    _check_inputs(args.dirs, args.out, args.disjoint)
    members = [model_dir.load(d, weights=saved_weights(d, args.weights)) for d in args.dirs]
    first = members[0].spec
    for d, m in zip(args.dirs, members):
        if not isinstance(m.model, TangentViT):
            raise ValueError(f"{d} holds a {m.spec.method} model; only tangent models (--method taft or taft-head) "
                             "compose by averaging Δw")
        if m.spec.classes != first.classes:
            raise ValueError(f"{d} has classes {list(m.spec.classes)}, {args.dirs[0]} has {list(first.classes)}: "
                             "only models of the same classes compose")
        if m.spec.fingerprint != first.fingerprint:
            raise ValueError(f"{d} was trained around another base (fingerprint {m.spec.fingerprint[:16]}…) than "
                             f"{args.dirs[0]} ({first.fingerprint[:16]}…): only models of the same w0 and k compose")
    reports = [m.report for m in members]
    private = all(r is not None for r in reports)
    report = compose_reports(reports, disjoint=args.disjoint) if private else None
    kind = "parallel (declared disjoint data)" if args.disjoint else "sequential (the data may overlap)"
    notes = [f"Composed from {len(members)} models; {kind} composition of their guarantees."]
    if not private:
        notes.append("At least one member was trained without privacy, so the composed model has no guarantee.")
    out = private_dir(args.out)
    remember_weights(out, saved_weights(args.dirs[0], args.weights))
    model_dir.resave(out, compose([m.model for m in members]), first, report=report, notes=notes,
                     composition=f"{kind} composition of {len(members)} models")
    print(f"composed {len(members)} models: "
          f"{'no privacy guarantee' if report is None else f'({report.epsilon:.4g}, {report.delta:.3g})-DP'}, {kind}"
          f"\nwrote {out}/")
    return 0
