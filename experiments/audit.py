"""Privacy audit experiment: empirical ε_lb beside the claimed ε for TAFT-k and NLFT-k.

``python -m experiments.audit`` runs, for every method and target ε, one one-run audit
with white-box Dirac gradient canaries (:func:`dp_taft.audit.audit_dirac`): m canaries,
each included with probability 1/2, next to a small subsample of real private data,
trained ONCE through :func:`dp_taft.fit` (plain SGD), then scored and turned into ε_lb at
the stated confidence by each requested bound. Defaults: the offline default task
(Fashion-MNIST classes 5-9, the shipped ViT pretrained on classes 0-4), TAFT-2 and
NLFT-2, ε ∈ {1, 2, 4, 8}, δ = 1e-5, m = 10,000, 1,000 real examples, fit's default
grad_sample_mode ("auto": book-keeping for these models), full batch (q = 1), 3 steps,
bounds "steinke" and "gdp" (q = 1) or "steinke" and "fdp" (q < 1, where "gdp" does not
apply; see :mod:`dp_taft.audit.bounds`). ``--sample-rate`` sets the Poisson rate q and
``--grad-sample-mode hooks`` audits Opacus' per-sample path instead. About 10 s per run on
one CPU core on the default path, 1.5 to 2.5 min in hooks mode (every canary row then goes
through the forward and backward). ``--data synthetic`` uses a tiny random ViT on synthetic
images instead (no data files; seconds per run).

Outputs in ``--out`` (default ``results/audit-<timestamp>/``): ``audit.csv`` (one row per
run and bound), ``audit.md`` (the same as a markdown table, with the settings) and
``statements.txt`` (each run's :meth:`~dp_taft.audit.AuditResult.statement`). Each run
uses seed ``--seed`` + its index, so the runs' memberships and noise are independent;
the seeds are written out, so these runs' privacy holds only against the auditor's view
of them (they are audits, not releases).
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn as nn
from torch.utils.data import Dataset, TensorDataset

from dp_taft import methods
from dp_taft.audit import AUDIT_MODES, BOUNDS, AuditResult, audit_dirac
from experiments import results as res

__all__ = ["COLUMNS", "main", "markdown"]

COLUMNS = ("method", "grad_sample_mode", "sample_rate", "target_epsilon", "claimed_epsilon", "epsilon_lb", "ratio",
           "m", "r", "v", "confidence", "bound", "delta", "noise_multiplier", "steps", "real_examples", "seed",
           "wall_time_s")
BUILDERS = {"taft": methods.taft, "nlft": methods.nlft}


def load_data(kind: str, real: int, data_seed: int) -> tuple[nn.Module, Dataset]:
    """(backbone with a fresh 5-way head, ``real`` private training examples) for ``kind``.

    "default": the shipped ViT pretrained on Fashion-MNIST 0-4 and a seeded subsample of
    the private classes 5-9. "synthetic": a tiny random ViT (16x16 images, width 32,
    depth 2) and class templates plus noise, for smoke runs without data files.
    """
    if kind == "default":
        from experiments.data import default_task
        from experiments.pretrain import pretrained_default_model

        return pretrained_default_model(5), default_task(private_train_size=real, seed=data_seed).private_train
    generator = torch.Generator().manual_seed(data_seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(data_seed)
        vit = timm.models.VisionTransformer(img_size=16, patch_size=4, in_chans=3, embed_dim=32, depth=2,
                                            num_heads=2, num_classes=5)
    templates = torch.randn(5, 3, 16, 16, generator=generator)
    labels = torch.arange(real) % 5
    return vit, TensorDataset(templates[labels] + 0.5 * torch.randn(real, 3, 16, 16, generator=generator), labels)


def run_one(method: str, k: int, epsilon: float, backbone: nn.Module, real: Dataset, args: argparse.Namespace,
            seed: int) -> AuditResult:
    """One audit of ``method``-``k`` at target ``epsilon`` (the backbone is copied by the method builder)."""
    model = BUILDERS[method](backbone, k)
    return audit_dirac(model, real, m=args.m, epsilon=epsilon, delta=args.delta, confidence=args.confidence,
                       bound=args.bounds[0], seed=seed, sample_rate=args.sample_rate, epochs=args.epochs, lr=args.lr,
                       momentum=0.0, max_grad_norm=1.0, physical_batch_size=args.physical_batch_size,
                       grad_sample_mode=args.grad_sample_mode, quiet=not args.progress)


def rows_of(result: AuditResult, label: str, bounds: Sequence[str], real: int, seed: int) -> list[dict[str, Any]]:
    """One CSV row per bound; every bound reads the same run's scores."""
    rows = []
    for bound in bounds:
        b = result.with_bound(bound)
        rows.append({
            "method": label, "grad_sample_mode": b.grad_sample_mode, "sample_rate": b.sample_rate,
            "target_epsilon": b.target_epsilon, "claimed_epsilon": b.claimed_epsilon,
            "epsilon_lb": b.epsilon_lb, "ratio": b.epsilon_lb / b.claimed_epsilon, "m": b.m, "r": b.r, "v": b.v,
            "confidence": b.confidence, "bound": bound, "delta": b.delta, "noise_multiplier": b.noise_multiplier,
            "steps": b.steps, "real_examples": real, "seed": seed, "wall_time_s": b.wall_time_s,
        })
    return rows


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The table of the README: one line per run and bound."""
    lines = ["| method | mode | q | steps | claimed ε | ε_lb | ε_lb / ε | canaries m | guesses r | right v "
             "| confidence | bound | wall time (s) |",
             "|:---|:---|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---|---:|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['grad_sample_mode']} | {r['sample_rate']:.3g} | {r['steps']} "
                     f"| {r['claimed_epsilon']:.3f} | {r['epsilon_lb']:.3f} | {r['ratio']:.2f} "
                     f"| {r['m']} | {r['r']} | {r['v']} | {r['confidence']:.0%} | {r['bound']} "
                     f"| {r['wall_time_s']:.1f} |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.audit", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--methods", nargs="+", choices=sorted(BUILDERS), default=["taft", "nlft"])
    p.add_argument("--blocks", type=int, default=2, help="k of TAFT-k and NLFT-k")
    p.add_argument("--epsilons", nargs="+", type=float, default=[1.0, 2.0, 4.0, 8.0], help="target ε of the runs")
    p.add_argument("--delta", type=float, default=1e-5, help="δ of the runs and of the bounds")
    p.add_argument("--m", type=int, default=10_000, help="Dirac canaries per run")
    p.add_argument("--real", type=int, default=1000, help="real private training examples beside the canaries")
    p.add_argument("--steps", type=int, default=3, help="DP-SGD steps T, a multiple of round(1/q) (steps per epoch)")
    p.add_argument("--sample-rate", type=float, default=1.0, help="Poisson rate q in (0, 1] (1: full batch)")
    p.add_argument("--grad-sample-mode", choices=AUDIT_MODES, default="auto",
                   help="fit's path: auto (fit's default: book-keeping where it applies), bk or hooks")
    p.add_argument("--lr", type=float, default=0.5)
    p.add_argument("--confidence", type=float, default=0.95)
    p.add_argument("--bounds", nargs="+", choices=BOUNDS, default=None,
                   help="default: steinke and gdp at q = 1, steinke and fdp at q < 1 (gdp needs q = 1)")
    p.add_argument("--data", choices=("default", "synthetic"), default="default")
    p.add_argument("--physical-batch-size", type=int, default=500, help="rows per forward/backward (memory)")
    p.add_argument("--seed", type=int, default=0, help="run i uses seed + i")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the real subsample (synthetic: also the ViT)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--out", type=Path, default=None, help="output directory (default results/audit-<timestamp>/)")
    p.add_argument("--progress", action="store_true", help="show fit's progress bars")
    args = p.parse_args(argv)
    if not 0 < args.sample_rate <= 1:
        p.error(f"--sample-rate must be in (0, 1], got {args.sample_rate}")
    per_epoch = max(1, round(1 / args.sample_rate))  # fit's steps per epoch
    if args.steps < 1 or args.steps % per_epoch:
        p.error(f"--steps must be a positive multiple of round(1/q) = {per_epoch} (fit runs whole epochs)")
    args.epochs = args.steps // per_epoch
    args.bounds = args.bounds or (["steinke", "gdp"] if args.sample_rate == 1 else ["steinke", "fdp"])
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run every (method, ε) audit, print the table and write the outputs; 0 on success."""
    args = parse_args(argv)
    command = " ".join(["python -m experiments.audit", *(sys.argv[1:] if argv is None else argv)])
    begun = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or Path("results") / datetime.datetime.now().strftime("audit-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    backbone, real = load_data(args.data, args.real, args.data_seed)
    started, rows, statements = time.perf_counter(), [], []
    for i, (method, epsilon) in enumerate((mt, e) for mt in args.methods for e in args.epsilons):
        label = f"{method.upper()}-{args.blocks}"
        result = run_one(method, args.blocks, epsilon, backbone, real, args, args.seed + i)
        for row in rows_of(result, label, args.bounds, args.real, args.seed + i):
            res.append_row(out / "audit.csv", row, COLUMNS)
            rows.append(row)
            print(f"{label} ε={epsilon:g} [{row['bound']}]: ε_lb {row['epsilon_lb']:.3f} of claimed "
                  f"{row['claimed_epsilon']:.3f} (r={row['r']}, v={row['v']}), {row['wall_time_s']:.0f} s", flush=True)
        statements.append(f"## {label}, target ε = {epsilon:g}, seed {args.seed + i}\n\n{result.statement()}\n")
    total = time.perf_counter() - started
    table = markdown(rows)
    settings = (f"`{command}` (started {begun}). Data: {args.data}, {args.real} real examples; m = {args.m} Dirac "
                f"canaries; grad_sample_mode {args.grad_sample_mode}; Poisson rate q = {args.sample_rate:g}, "
                f"{args.steps} steps, SGD lr {args.lr}, no momentum, C = 1; δ = {args.delta:g}; confidence "
                f"{args.confidence:.0%}; guess fractions declared up front and union-bounded. "
                f"Total wall time {total:.0f} s.")
    (out / "audit.md").write_text(f"{settings}\n\n{table}\n")
    (out / "statements.txt").write_text("\n".join(statements))
    print(f"\n{settings}\n\n{table}\n\nwritten to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
