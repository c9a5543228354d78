"""Composition under DP: TAFT shards averaged in Δw against NLFT shards, weight-averaged or ensembled.

``python -m experiments.composition`` splits the default task's private training set into
``--shards`` disjoint shards (the content-hash partition of :mod:`dp_taft.shards`), trains
one private model per shard at target ε (default 8; parallel composition: the shards see
disjoint data, so every combination of them is (ε, δ)-DP) for TAFT-k and NLFT-k with the
sweep's tuned settings (batch per shard = round(batch / shards), as in
:mod:`experiments.shards`: same q, steps and σ as the unsharded run), and evaluates:

* TAFT-k, Δw averaged (:func:`dp_taft.compose`): one model, exactly the output ensemble;
* TAFT-k output ensemble (mean of the shard models' logits; equal to the above, checked);
* NLFT-k, weights averaged (the trained blocks and head averaged; a non-linear model, so
  not an ensemble);
* NLFT-k output ensemble (mean of the logits: n forward passes per prediction).

Outputs in ``--out`` (default ``results/composition/``): ``results.csv`` (one row per
seed × method × combination, appended as each seed/method ends; resumable), ``summary.md``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Subset

from dp_taft import compose
from dp_taft.shards import ShardAssignment, content_ids
from experiments import results as res
from experiments import sweep as sw
from experiments import sweep_config as sc
from experiments.task import Task, build_task, default_task_args

__all__ = ["COLUMNS", "main"]

COLUMNS = ("method", "combination", "seed", "n_shards", "target_epsilon", "epsilon", "accuracy",
           "shard_accuracy_mean", "status", "error", "finished_at")
COMBINATIONS = {"taft": ("average Δw", "output ensemble"), "nlft": ("average weights", "output ensemble")}


@torch.no_grad()
def _logits(model: nn.Module, data: Any) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x) for x, _ in DataLoader(data, batch_size=500)])


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(1) == labels).float().mean())


def average_weights(models: Sequence[nn.Module]) -> nn.Module:
    """A copy of ``models[0]`` whose trainable parameters are the mean of the models' (frozen ones are shared)."""
    out = copy.deepcopy(models[0])
    with torch.no_grad():
        for name, p in out.named_parameters():
            if p.requires_grad:
                p.copy_(torch.stack([dict(m.named_parameters())[name] for m in models]).mean(0))
    return out


def train_shards(method: str, task: Task, seed: int, settings: dict[str, Any], hparams: dict[str, Any],
                 out: Path) -> tuple[list[nn.Module], float]:
    """One private model per shard; returns the models and the largest reported ε among them."""
    ids = content_ids(task.train)
    assignment = ShardAssignment.create(ids, settings["n_shards"], key=0)
    hp = {**hparams, "batch_size": max(1, round(hparams["batch_size"] / settings["n_shards"]))}
    hp.pop("physical_batch_size", None)
    models, eps = [], 0.0
    for shard in range(settings["n_shards"]):
        result = sw.train_method(
            method, settings["k"], task.backbone(seed), Subset(task.train, assignment.positions(shard)),
            epsilon=settings["epsilon"], delta=settings["delta"], accountant=settings["accountant"], quiet=True,
            cache_dir=out / sw.PREFIX_CACHE_DIR, **hp)
        models.append(result.model)
        eps = max(eps, result.report.epsilon)
    return models, eps


def run_seed(method: str, task: Task, seed: int, settings: dict[str, Any], hparams: dict[str, Any],
             out: Path) -> list[dict[str, Any]]:
    """Train the shards of one (method, seed) and return one row per combination."""
    base = {"method": method, "seed": seed, "n_shards": settings["n_shards"], "target_epsilon": settings["epsilon"]}
    try:
        models, eps = train_shards(method, task, seed, settings, hparams, out)
        labels = torch.cat([y for _, y in DataLoader(task.test, batch_size=500)])
        logits = [_logits(m, task.test) for m in models]
        ensemble = _accuracy(torch.stack(logits).mean(0), labels)
        single = compose(models) if method == "taft" else average_weights(models)
        averaged = _accuracy(_logits(single, task.test), labels)
        shard_mean = sum(_accuracy(lg, labels) for lg in logits) / len(logits)
        if method == "taft" and abs(averaged - ensemble) > 1e-3:
            raise RuntimeError(f"composed TAFT ({averaged}) differs from its output ensemble ({ensemble})")
        accs = dict(zip(COMBINATIONS[method], (averaged, ensemble)))
        return [{**base, "combination": c, "epsilon": eps, "accuracy": a, "shard_accuracy_mean": shard_mean,
                 "status": "ok", "error": ""} for c, a in accs.items()]
    except Exception as e:  # noqa: BLE001 -- recorded; the other methods and seeds go on
        return [{**base, "combination": c, "status": "failed", "error": f"{type(e).__name__}: {e}"[:500]}
                for c in COMBINATIONS[method]]


def write_summary(out: Path) -> None:
    rows = list(res.latest(res.read_rows(out / "results.csv"), ("method", "combination", "seed")).values())
    if not rows:
        return
    for r in rows:
        r["name"] = f"{r['method'].upper()}: {r['combination']}"
    n, eps = rows[0]["n_shards"], rows[0]["target_epsilon"]
    lines = [f"# Composition of {n} private shard models (target ε = {eps} each, disjoint shards)", "",
             "Test accuracy (%) on the private task, mean ± std over seeds, of each combination of the shard "
             "models, then of one shard model alone (mean over the shards).", "",
             res.markdown_table(rows, row="name", col="n_shards", value="accuracy", corner="combination", scale=100),
             res.markdown_table([r for r in rows if r["combination"] == "output ensemble"], row="method",
                                col="n_shards", value="shard_accuracy_mean", corner="one shard model", scale=100,
                                row_label=str.upper)]
    pairs = [("TAFT: average Δw", "NLFT: average weights"), ("TAFT: average Δw", "NLFT: output ensemble")]
    lines += ["Paired differences (percentage points, same seed, 95% t interval):", ""]
    for a, b in pairs:
        d = res.paired_differences(rows, a, b, group="name", by="n_shards", pair="seed", value="accuracy")
        lines.append(f"- {a} − {b}: " + (d[n].text(100) if n in d else "—"))
    (out / "summary.md").write_text("\n".join(lines) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.composition", description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--epsilon", type=float, default=8.0)
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--profile", default="default", help="profile of experiments/sweep.toml (data, δ, settings)")
    p.add_argument("--out", type=Path, default=Path("results") / "composition")
    args = p.parse_args(argv)
    if not (args.shards >= 1 and 0 < args.epsilon < math.inf):
        p.error("--shards must be >= 1 and --epsilon finite and > 0")
    sweep, hparams, _ = sc.load_config(sc.DEFAULT_CONFIG, args.profile)
    task = build_task(default_task_args(), {**sweep, "seeds": args.seeds})
    settings = {"n_shards": args.shards, "epsilon": args.epsilon, "k": args.blocks, "delta": sweep["delta"],
                "accountant": sweep["accountant"]}
    done = {(r["method"], r["seed"]) for r in res.read_rows(args.out / "results.csv")}
    for seed in args.seeds:
        for method in COMBINATIONS:
            if (method, str(seed)) in done:
                continue
            for row in run_seed(method, task, seed, settings, hparams[method], args.out):
                row["finished_at"] = datetime.datetime.now().isoformat(timespec="seconds")
                res.append_row(args.out / "results.csv", row, COLUMNS)
                print(f"{method} seed {seed} {row['combination']}: "
                      + (f"{100 * row['accuracy']:.1f}%" if row["status"] == "ok" else row["error"]), flush=True)
    write_summary(args.out)
    print(f"done: {args.out / 'summary.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
