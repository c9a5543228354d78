"""Privacy-utility sweep: linear probe (FC), TAFT-k and NLFT-k at several target ε, over seeds.

``python -m experiments.sweep`` runs the default grid (see ``experiments/sweep.toml``) on
the offline default task (Fashion-MNIST classes 5-9 fine-tuned from a ViT pretrained on
classes 0-4), each method with the settings ``python -m experiments.tune`` chose for it on
a public proxy (``dp_taft/presets/tuned.toml``), and writes, in ``--out`` (default
``results/<timestamp>/``):

* ``results.csv``: one row per run (see :data:`experiments.sweep_outputs.COLUMNS`), appended and fsynced as each
  run ends; rerunning with the same ``--out`` skips finished runs (failed ones too,
  unless ``--retry-failed``) and appends. A run killed midway resumes from its
  checkpoint under ``checkpoints/<run_id>/``, whose write-ahead privacy ledger counts
  the steps of the killed attempt; a finished run's checkpoints (every stage's: they hold
  its secret key) are deleted as it ends, and only its ledgers stay;
* ``reports/<run_id>.json``: the run's :class:`accounting.PrivacyReport` (private runs);
* ``runs/<run_id>.json``: hyperparameters, per-epoch history, warnings, error traceback;
* ``summary.md``: mean ± std test accuracy (%) over seeds, rows methods, columns ε, and
  TAFT-k − NLFT-k paired by seed with 95% t intervals;
* ``prefix_cache/``: each distinct frozen-prefix output (train and test), computed once and
  mapped by every run that shares it (``--no-prefix-reuse``: none). It holds features of
  the private data: delete it when the sweep is done;
* ``privacy_utility.png``: accuracy against ε per method, ∞ (non-private) apart.

``--quick`` (every method and ε once, on less data) and ``--smoke`` (tests) pick other
profiles of the config file. A run that fails (e.g. an ε unreachable for its settings)
is recorded with its error and the sweep goes on.

Real data sets (need network unless the files are local): ``--dataset cifar10|cifar100|
fashion-mnist --model <timm name> --pretrained [--checkpoint FILE]``; images are resized
to the model's input size.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import math
import sys
import time
import traceback
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from dp_taft import FitResult
from dp_taft.privacy.checkpoint import discard_keys
from dp_taft.recipes import finetune
from experiments import results as res
from experiments.sweep_config import (
    DEFAULT_CONFIG, METHODS, apply_sets, check_hparams, check_sweep, load_config, method_hparams, run_config,
)
from experiments.sweep_outputs import COLUMNS, CSV_NAME, PLOT_NAME, SUMMARY_NAME, write_outputs
from experiments.task import DATASETS, Task, build_task

__all__ = ["PREFIX_CACHE_DIR", "Run", "eps_name", "main", "plan_runs", "randomness", "run_one", "settings_hash",
           "train_method"]

#: Prefix caches shared by the runs (features of the private data: delete it with the checkpoints).
PREFIX_CACHE_DIR = "prefix_cache"


# --------------------------------------------------------------------------- runs
def eps_name(epsilon: float) -> str:
    """'inf' or the shortest decimal form ('1', '0.5', '8')."""
    return "inf" if math.isinf(epsilon) else f"{epsilon:g}"


@dataclass(frozen=True)
class Run:
    """One training run of the grid; ``epsilon`` = inf means non-private."""

    method: str
    k: int  # blocks trained (0 for fc)
    seed: int
    epsilon: float
    hparams: tuple[tuple[str, Any], ...]

    @property
    def label(self) -> str:
        if self.method == "fc":
            return "FC"
        if self.method == "taft_head":
            return f"TAFT-{self.k} (head first)"
        return f"{self.method.upper()}-{self.k}"

    @property
    def run_id(self) -> str:
        name = self.method if self.method == "fc" else f"{self.method}{self.k}"
        return f"{name}_eps{eps_name(self.epsilon)}_seed{self.seed}"


def plan_runs(sweep: dict[str, Any], hparams: dict[str, dict[str, Any]],
              nonprivate: dict[str, dict[str, Any]] | None = None) -> list[Run]:
    """The grid, seed-major (a partial sweep has whole seeds), then method, k, ε.

    Non-private runs (ε = inf) use ``hparams[method]`` updated with ``nonprivate[method]``.
    """
    runs = []
    for seed in sweep["seeds"]:
        for method in METHODS:
            if method not in sweep["methods"]:
                continue
            for k in ([0] if method == "fc" else sorted(set(sweep["blocks"]))):
                for eps in sorted({float(e) for e in sweep["epsilons"]}):
                    hp = method_hparams(hparams, nonprivate, method, private=math.isfinite(eps))
                    runs.append(Run(method, k, seed, eps, tuple(sorted(hp.items()))))
    return runs


def train_method(method: str, k: int, backbone: nn.Module, train_set: Dataset, *, eval_set: Dataset | None = None,
                 **options: Any) -> FitResult:
    """Build ``method`` (a label) from ``backbone`` and train it (dp_taft.finetune): ``options`` are
    hyperparameters and run options as :func:`experiments.sweep_config.run_config` takes them."""
    return finetune(backbone, train_set, run_config(method, k, options), eval_set=eval_set)


# --------------------------------------------------------------------------- one run
def settings_hash(run: Run, task: Task, sweep: dict[str, Any]) -> str:
    """Short hash of everything that fixes a run's result besides its key (method, k, seed, ε)."""
    blob = json.dumps({"task": task.info, "hparams": dict(run.hparams), "delta": sweep["delta"],
                       "accountant": sweep["accountant"], "randomness": randomness(sweep)},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def randomness(sweep: dict[str, Any]) -> str:
    """How a run's noise and batches were drawn: "secret" (the default) or "seeded"."""
    return "seeded" if sweep["reproducible"] else "secret"


def run_one(run: Run, task: Task, sweep: dict[str, Any], out: Path, *, device: str, quiet: bool) -> dict[str, Any]:
    """Train and evaluate one run; returns its CSV row (status "failed" with the error if it raised)."""
    hp = dict(run.hparams)
    row: dict[str, Any] = {
        "run_id": run.run_id, "method": run.method, "k": run.k, "label": run.label, "seed": run.seed,
        "randomness": randomness(sweep), "target_epsilon": run.epsilon, "dataset": task.info["dataset"], "model": task.info["model"],
        "n_train": task.info["n_train"], "n_test": task.info["n_test"],
        **{c: hp.get(c) for c in ("epochs", "batch_size", "lr", "optimizer", "max_grad_norm", "loss")},
        "settings": settings_hash(run, task, sweep),
    }
    details: dict[str, Any] = {"run_id": run.run_id, "hparams": hp, "task": task.info, "sweep_delta": sweep["delta"]}
    physical = hp.pop("physical_batch_size", 0) or None
    private = math.isfinite(run.epsilon)
    started = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = train_method(
                run.method, run.k, task.backbone(run.seed), task.train, epsilon=run.epsilon if private else None,
                delta=sweep["delta"] if private else None, eval_set=task.test, physical_batch_size=physical,
                accountant=sweep["accountant"], device=device, seed=run.seed if sweep["reproducible"] else None,
                checkpoint_dir=out / "checkpoints" / run.run_id, quiet=quiet,
                cache_dir=out / PREFIX_CACHE_DIR if task.reuse_prefix else None, **hp,
            )
            row.update(sigma=result.noise_multiplier, sample_rate=result.sample_rate, steps=result.steps,
                       accuracy=result.history[-1].eval_accuracy, status="ok", error="")
            discard_keys(out / "checkpoints" / run.run_id)
            if result.report is not None:
                rel = Path("reports") / f"{run.run_id}.json"
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                (out / rel).write_text(result.report.to_json())
                row.update(epsilon=result.report.epsilon, delta=result.report.delta, report=str(rel))
            else:
                row.update(epsilon=math.inf)
            # The training loss is a noiseless statistic of the private data, outside the
            # guarantee: it stays out of this shareable file.
            details["history"] = [{k: v for k, v in dataclasses.asdict(r).items() if k != "train_loss"}
                                  for r in result.history]
        except Exception as e:  # noqa: BLE001 -- a failed run is recorded and the sweep goes on
            row.update(status="failed", error=f"{type(e).__name__}: {e}".replace("\n", " ")[:1000])
            details["traceback"] = traceback.format_exc()
    row["wall_time_s"] = round(time.perf_counter() - started, 2)
    row["finished_at"] = datetime.datetime.now().isoformat(timespec="seconds")
    details["warnings"] = sorted({f"{w.category.__name__}: {w.message}" for w in caught})
    details["row"] = {k: res.format_number(v) for k, v in row.items()}
    (out / "runs").mkdir(parents=True, exist_ok=True)
    (out / "runs" / f"{run.run_id}.json").write_text(json.dumps(details, indent=1, default=str))
    return row


# --------------------------------------------------------------------------- CLI
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line of the sweep (argparse exits with a message on a bad one)."""
    p = argparse.ArgumentParser(prog="python -m experiments.sweep", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="TOML config file")
    prof = p.add_mutually_exclusive_group()
    prof.add_argument("--profile", default="default", help="profile of the config file")
    prof.add_argument("--quick", dest="profile", action="store_const", const="quick",
                      help="profile 'quick': every method and ε once, on less data (<= 3 min)")
    prof.add_argument("--smoke", dest="profile", action="store_const", const="smoke",
                      help="profile 'smoke': tiny, for tests")
    p.add_argument("--out", type=Path, default=None, help="output directory (default results/<timestamp>/); "
                   "an existing one is resumed")
    p.add_argument("--methods", nargs="+", choices=METHODS, help="override the config's methods")
    p.add_argument("--blocks", nargs="+", type=int, help="k for TAFT-k and NLFT-k, e.g. --blocks 1 2 4")
    p.add_argument("--epsilons", nargs="+", type=float, help="target ε values; inf = non-private")
    p.add_argument("--seeds", nargs="+", type=int, help="replicates; each seeds its head initialisation (and, "
                   "with --reproducible, the training randomness)")
    p.add_argument("--reproducible", action="store_const", const=True, default=None,
                   help="seed noise and batches with the run's seed (experiments only: the seeds are written in the "
                        "outputs, so the runs' privacy guarantees do not hold against readers of them)")
    p.add_argument("--private-train-size", type=int, help="private training examples (0 = all)")
    p.add_argument("--test-size", type=int, help="test examples (0 = all)")
    p.add_argument("--delta", type=float)
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="[nonprivate.][METHOD.]KEY=VALUE",
                   help="hyperparameter override, e.g. --set taft.lr=1.0 --set epochs=5 --set nonprivate.lr=0.1 "
                        "(repeatable, in order; without nonprivate. it holds for the method's ε = inf runs too, "
                        "nonprivate.* for those only)")
    p.add_argument("--dataset", choices=DATASETS, default="default",
                   help="'default' = offline Fashion-MNIST 5-9 task; others via torchvision")
    p.add_argument("--data-root", type=Path, default=Path("data"), help="torchvision data directory")
    p.add_argument("--download", action="store_true", help="let torchvision download the data set (network)")
    p.add_argument("--model", default="default", help="timm model name, or 'default' (the offline ViT)")
    p.add_argument("--pretrained", action="store_true", help="timm pretrained weights (download unless --checkpoint)")
    p.add_argument("--checkpoint", type=Path, help="local weights file (state dict) instead of a download")
    p.add_argument("--timm-kwargs", help="JSON dict of extra timm.create_model arguments, e.g. '{\"img_size\": 64}'")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    p.add_argument("--retry-failed", action="store_true", help="rerun runs recorded as failed")
    p.add_argument("--no-prefix-reuse", action="store_true",
                   help=f"compute the frozen prefix in every run instead of storing it once under OUT/{PREFIX_CACHE_DIR}/")
    p.add_argument("--quiet", action="store_true", help="no per-run progress bars")
    p.add_argument("--no-progress", action="store_true", help="no progress bars at all")
    p.add_argument("--report-only", action="store_true", help="only rewrite summary.md and the plot from results.csv")
    args = p.parse_args(argv)
    if args.checkpoint is not None and args.model != "default" and not args.pretrained:
        p.error("--checkpoint holds pretrained weights: pass --pretrained with it")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the sweep; returns 0 (failed runs are recorded, not fatal), 2 on a bad configuration."""
    args = parse_args(argv)
    out = args.out or Path("results") / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    if args.report_only:
        return res.rewrite_outputs(args.out, write_outputs, (CSV_NAME, SUMMARY_NAME, PLOT_NAME))
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        sweep, hparams, nonprivate = load_config(args.config, args.profile)
        for key in ("methods", "blocks", "epsilons", "seeds", "private_train_size", "test_size", "delta",
                    "reproducible"):
            if getattr(args, key) is not None:
                sweep[key] = getattr(args, key)
        apply_sets(hparams, args.sets, nonprivate)
        check_sweep(sweep)
        check_hparams(hparams, nonprivate)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    try:
        task = build_task(args, sweep)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n = len(task.train)
    if not sweep["delta"] < 1 / n:
        print(f"error: delta={sweep['delta']:g} is not below 1/N = {1 / n:.3g} for N={n} private training "
              "examples; use a smaller delta (e.g. --delta 1e-6) or more data", file=sys.stderr)
        return 2
    runs = plan_runs(sweep, hparams, nonprivate)
    out.mkdir(parents=True, exist_ok=True)
    done = res.latest(res.read_rows(out / CSV_NAME), ("run_id",))
    conflicts = [r.run_id for r in runs
                 if (r.run_id,) in done and done[(r.run_id,)]["settings"] != settings_hash(r, task, sweep)]
    if conflicts:
        print(f"error: {out} holds runs made with other settings ({', '.join(conflicts[:5])}"
              f"{', ...' if len(conflicts) > 5 else ''}): rerun with the same config, profile and options "
              "to resume, or use a new --out", file=sys.stderr)
        return 2

    def finished(r: Run) -> bool:
        prev = done.get((r.run_id,))
        return prev is not None and (prev["status"] == "ok" or not args.retry_failed)

    pending = [r for r in runs if not finished(r)]
    with open(out / "invocations.jsonl", "a") as f:
        f.write(json.dumps({"at": datetime.datetime.now().isoformat(timespec="seconds"),
                            "argv": list(argv) if argv is not None else sys.argv[1:], "profile": args.profile,
                            "sweep": sweep, "hparams": hparams,
                            "nonprivate": nonprivate, "task": task.info,
                            "runs": len(runs), "pending": len(pending)}, default=str) + "\n")
    print(f"sweep: {len(runs)} runs ({len(runs) - len(pending)} already done), profile {args.profile!r}, "
          f"N = {n}, test {len(task.test)}, out {out}", flush=True)
    bar = tqdm(total=len(runs), initial=len(runs) - len(pending), desc="sweep", unit="run",
               disable=args.no_progress, dynamic_ncols=True)
    failures = 0
    try:
        for run in pending:
            bar.set_postfix_str(run.run_id)
            row = run_one(run, task, sweep, out, device=args.device, quiet=args.quiet or args.no_progress)
            res.append_row(out / CSV_NAME, row, COLUMNS)
            if row["status"] == "ok":
                eps = "∞" if not math.isfinite(run.epsilon) else f"{row['epsilon']:.3f}"
                msg = f"{run.run_id}: accuracy {100 * row['accuracy']:.1f}%, ε {eps}, {row['wall_time_s']:.0f} s"
            else:
                failures += 1
                msg = f"{run.run_id}: FAILED ({row['error'][:200]})"
            bar.update(1)
            tqdm.write(msg) if not args.no_progress else print(msg, flush=True)
    finally:
        bar.close()
        write_outputs(out)
    print(f"done: {out / CSV_NAME}, {out / SUMMARY_NAME}, {out / PLOT_NAME}"
          + (f"; {failures} run(s) failed (see summary.md)" if failures else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
