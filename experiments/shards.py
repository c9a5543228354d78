"""Shard experiment: accuracy of composed TAFT-k shard models, and the cost of removing one example.

``python -m experiments.shards`` trains, for every (number of shards, target ε, seed) of
``experiments/shards.toml``, one private TAFT-k model per disjoint shard of the default
task's private training set (:func:`dp_taft.shards.fit_shards`), evaluates the composed
model on the private test set, then forgets one random training example (seeded) and
times that against retraining every shard. Data sizes, δ, the accountant and the TAFT
hyperparameters come from ``experiments/sweep.toml`` (profile ``sweep_profile``), so the
two experiments share one configuration. The partition key is secret: drawn once per
output directory from the OS CSPRNG and kept owner-only, so every configuration of a shard
count uses one partition and a resumed run keeps it. Outputs, in ``--out`` (default
``results/shards-<timestamp>/``):

* ``results.csv``: one row per configuration (see :data:`COLUMNS`), appended and fsynced
  as it ends; rerunning with the same ``--out`` skips finished configurations (failed ones
  too, unless ``--retry-failed``). A configuration killed midway restarts from scratch
  (shard runs keep no checkpoints; with the same seeds the replay is identical);
* ``reports/<run_id>.json``: the privacy statement, every shard's reports (also of the model
  its retraining replaced) and ``all_releases_epsilon``, written after the removal;
* ``private/partition_key``: the partition key (owner-only; never publish it;
  :mod:`experiments.shards_privacy`);
* ``summary.md``: accuracy mean ± std over seeds (rows: shards, columns: target ε) and
  the removal-time table (mean ± std over ε and seeds);
* ``shards.png``: accuracy against the number of shards, one line per ε;
* ``prefix_cache/``: each shard's frozen-prefix features, computed once and reused across ε
  and seeds (private data: never publish it).

Batch size per shard is ``round(batch_size / n_shards)``, which keeps each shard's sample
rate q = batch / N_shard equal to the unsharded run's and, with the same epochs, the same
number of steps (see ``shards.toml``). A row's ``epsilon`` covers everything it releases,
the composed models from before and after the removal: the max over its shards (parallel
composition) of each shard's rounds composed (:class:`dp_taft.shards.ShardPrivacyReport`'s
``all_releases_epsilon``), above the target when the retrained shard's two rounds compose.

Workers: ``--workers W`` trains W shards at once in spawned processes (each with
cores // W threads). On 2 CPU cores this gains little: torch already uses both cores for
one shard, and the processes pay start-up and copying costs. It also inflates the
"removal vs full retrain" comparison's baseline, which sums the shards' training times.
On a machine shared with other jobs, ``--threads 1`` is far faster for these small
batches (seen: 8 s instead of 73 s per 1-shard quick configuration at load ~5 on 2 cores).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import random
import sys
import time
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from dp_taft import methods
from dp_taft.privacy.distributed import current as distributed_comm
from dp_taft.shards import ShardAssignment, content_ids, fit_shards
from dp_taft.train import evaluate
from experiments import results as res
from experiments import sweep as sw
from experiments import sweep_config as sc
from experiments.config import read_profiled
from experiments.plots import plot_curves
from experiments.shards_privacy import partition_key, privacy_columns, save_partition_key
from experiments.sweep_outputs import randomness_notes
from experiments.task import Task, build_task, default_task_args

__all__ = ["COLUMNS", "DEFAULT_CONFIG", "load_config", "main", "write_outputs"]

DEFAULT_CONFIG = Path(__file__).with_name("shards.toml")
SHARD_KEYS = frozenset({"sweep_profile", "blocks", "n_shards", "epsilons", "seeds"})
INHERITED_KEYS = frozenset({"delta", "accountant", "private_train_size", "test_size", "data_seed", "reproducible"})
#: results.csv schema, one row per configuration attempt (the last row of a run_id counts). No
#: example ids (a content id is an unsalted hash of a private example). Shard sizes (shard_sizes;
#: sample_rate = batch / size) are published only because the partition key is secret: given N,
#: their distribution is the same whoever is in; under a known key they would reveal membership.
COLUMNS = (
    "run_id", "n_shards", "seed", "randomness", "target_epsilon", "epsilon", "per_shard_epsilon", "delta",
    "accuracy", "accuracy_after_removal", "train_wall_time_s", "removal_wall_time_s", "full_retrain_time_s",
    "speedup", "retrained_shard", "shard_sizes", "batch_size_per_shard", "sample_rate", "steps",
    "status", "error", "k", "n_train", "n_test", "epochs", "batch_size", "lr", "workers", "settings", "finished_at",
)
CSV_NAME, SUMMARY_NAME, PLOT_NAME = "results.csv", "summary.md", "shards.png"


# --------------------------------------------------------------------------- config
def load_config(path: str | Path, profile: str, sweep_config: str | Path = sc.DEFAULT_CONFIG
                ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(settings, TAFT hyperparameters, TAFT non-private overrides) of ``profile`` in ``path``.

    ``settings`` holds the shard keys and the data/privacy keys inherited from
    ``sweep_config``'s profile ``sweep_profile``.
    """
    cfg, prof = read_profiled(path, ("shards",), profile)
    prof_hp = prof.pop("hparams", {})
    settings = dict(cfg.get("shards", {}))
    for where, table in ((f"{path} [shards]", settings), (f"{path} [profiles.{profile}]", prof)):
        unknown = set(table) - SHARD_KEYS - INHERITED_KEYS
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}; known: {sorted(SHARD_KEYS | INHERITED_KEYS)}")
    settings.update(prof)
    missing = SHARD_KEYS - set(settings)
    if missing:
        raise ValueError(f"{path}: missing setting(s) {sorted(missing)}")
    sweep, hparams, nonprivate = sc.load_config(sweep_config, settings["sweep_profile"])
    settings = {**{k: sweep[k] for k in INHERITED_KEYS}, **settings}
    shared, per = sc.split_hparams(prof_hp, f"[profiles.{profile}.hparams]")
    if set(per) - {"taft"}:
        raise ValueError(f"[profiles.{profile}.hparams]: only a [.taft] sub-table makes sense here, got {sorted(per)}")
    profile_hp = {**shared, **per.get("taft", {})}  # this profile's scale holds for the ε = ∞ runs too
    return settings, {**hparams["taft"], **profile_hp}, {**nonprivate["taft"], **profile_hp}


def _check(settings: dict[str, Any]) -> None:
    def ints(name: str, low: int) -> None:
        v = settings[name]
        if not (isinstance(v, list) and v and all(isinstance(x, int) and not isinstance(x, bool) and x >= low
                                                  for x in v)):
            raise ValueError(f"{name} must be a non-empty list of integers >= {low}, got {v!r}")

    ints("n_shards", 1)
    ints("seeds", 0)
    sc.check_sweep({**settings, "methods": ["taft"], "blocks": [settings["blocks"]]})  # ε, δ, sizes


def _delta_error(settings: dict[str, Any], ids: Sequence[int], key: int) -> str | None:
    """Why δ is too large for the smallest shard of any planned partition (None if fine)."""
    n = len(ids)
    for n_shards in settings["n_shards"]:
        smallest = min(ShardAssignment.create(ids, n_shards, key).sizes)
        if smallest < 2 or not settings["delta"] < 1 / smallest:
            return (f"delta={settings['delta']:g} is not below 1/N_shard = 1/{smallest} for the smallest of "
                    f"{n_shards} shards of N={n}; use a smaller --delta, fewer shards or more data")
    return None


def run_id(n_shards: int, epsilon: float, seed: int) -> str:
    return f"shards{n_shards}_eps{sw.eps_name(epsilon)}_seed{seed}"


# --------------------------------------------------------------------------- one configuration
def run_one(run: sw.Run, n_shards: int, task: Task, settings: dict[str, Any], out: Path | None, *,
            ids: Sequence[int], key: int, workers: int, device: str, quiet: bool) -> dict[str, Any]:
    """Train the shards, evaluate the composition, forget one example; returns the CSV row.

    ``ids``: stable ids of ``task.train``'s examples (their content ids: deleting one example
    moves no other between shards, which positions would); ``key``: the secret partition key.
    ``out`` None: a torchrun rank other than 0, which trains its shards and writes nothing."""
    hp = sc.fit_values(dict(run.hparams))
    rid = run_id(n_shards, run.epsilon, run.seed)
    n = len(task.train)
    batch = max(1, round(hp["batch_size"] / n_shards))
    sizes = ShardAssignment.create(ids, n_shards, key).sizes  # public only because the key is secret
    row: dict[str, Any] = {
        "run_id": rid, "n_shards": n_shards, "seed": run.seed, "randomness": sw.randomness(settings),
        "target_epsilon": run.epsilon, "k": run.k,
        "n_train": n, "n_test": len(task.test), "epochs": hp["epochs"], "batch_size": hp["batch_size"],
        "lr": hp["lr"], "workers": workers, "batch_size_per_shard": batch,
        "shard_sizes": ";".join(map(str, sizes)), "settings": _settings(run, n_shards, task, settings),
    }
    private = math.isfinite(run.epsilon)
    physical = hp.pop("physical_batch_size", 0) or None
    hp["batch_size"] = batch
    details: dict[str, Any] = {"run_id": rid, "hparams": hp, "task": task.info, "settings": settings}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            model = methods.taft(task.backbone(run.seed), run.k)
            start = time.perf_counter()
            shards = fit_shards(
                model, task.train, n_shards, ids=ids, key=key,
                seed=run.seed if settings["reproducible"] else None, workers=workers,
                cache_dir=None if out is None else out / sw.PREFIX_CACHE_DIR,  # each shard's prefix once
                epsilon=run.epsilon if private else None, delta=settings["delta"] if private else None,
                accountant=settings["accountant"], physical_batch_size=physical, device=device, quiet=quiet, **hp,
            )
            row["train_wall_time_s"] = round(time.perf_counter() - start, 3)
            row["accuracy"] = accuracy(shards.composed, task.test, device)
            # A simulated request: the same example for every shard count of a seed, a public choice
            # by design. Its id is written nowhere (a real request is private: fit_shards keeps it
            # only in memory and in an owner-only removed.json).
            forgot = shards.forget([ids[random.Random(f"forget:{run.seed}").randrange(n)]])
            row.update(retrained_shard=";".join(map(str, forgot.retrained_shards)),
                       removal_wall_time_s=round(forgot.wall_time_s, 3),
                       full_retrain_time_s=round(forgot.full_retrain_time_s, 3), speedup=forgot.speedup,
                       accuracy_after_removal=accuracy(shards.composed, task.test, device), status="ok", error="")
            report = shards.report  # after the removal: it covers the models from before and after it
            row.update(privacy_columns(report, n_shards))
            if report is not None and out is not None:
                (out / "reports").mkdir(parents=True, exist_ok=True)
                (out / "reports" / f"{rid}.json").write_text(json.dumps(report.to_dict(), indent=1))
        except Exception as e:  # noqa: BLE001 -- a failed configuration is recorded and the experiment goes on
            row.update(status="failed", error=f"{type(e).__name__}: {e}".replace("\n", " ")[:1000])
            details["traceback"] = traceback.format_exc()
    row["finished_at"] = datetime.datetime.now().isoformat(timespec="seconds")
    details["warnings"] = sorted({f"{w.category.__name__}: {w.message}" for w in caught})
    details["row"] = {k: res.format_number(v) for k, v in row.items()}
    if out is not None:
        (out / "runs").mkdir(parents=True, exist_ok=True)
        (out / "runs" / f"{rid}.json").write_text(json.dumps(details, indent=1, default=str))
    return row


def accuracy(model: nn.Module, data: Any, device: str) -> float:
    model.to(device)
    return evaluate(model, data, nn.CrossEntropyLoss(), 500, torch.device(device))[1]


def _settings(run: sw.Run, n_shards: int, task: Task, settings: dict[str, Any]) -> str:
    """sweep.settings_hash of the run, with the shard partition and accountant settings folded in."""
    extra = (("partition", "secret key"), ("n_shards", n_shards))
    return sw.settings_hash(sw.Run(run.method, run.k, run.seed, run.epsilon, run.hparams + extra), task,
                            {k: settings[k] for k in ("delta", "accountant", "reproducible")})


# --------------------------------------------------------------------------- outputs
def write_outputs(out: Path) -> list[dict[str, str]]:
    """(Re)write summary.md and shards.png from results.csv; returns the counted rows."""
    rows = list(res.latest(res.read_rows(out / CSV_NAME), ("run_id",)).values())
    if not rows:
        return []
    seeds = sorted({r["seed"] for r in rows}, key=int)
    shard_order = sorted({r["n_shards"] for r in rows}, key=int)
    eps_order = sorted({r["target_epsilon"] for r in rows}, key=float)
    one = lambda c: ", ".join(sorted({r[c] for r in rows if r[c]})) or "—"  # noqa: E731
    # removal table: one long-format row per (configuration, quantity), so markdown_table aggregates over ε and seeds
    quantities = {"train_wall_time_s": "train all shards (s)", "removal_wall_time_s": "remove 1 example (s)",
                  "full_retrain_time_s": "retrain all shards (s)", "speedup": "speedup (×)",
                  "accuracy_after_removal": "accuracy after removal (%)"}
    long = [{"n_shards": r["n_shards"], "status": r["status"], "quantity": q,
             "value": str(100 * res.to_float(r[q])) if q.startswith("accuracy") and r[q] else r[q]}
            for r in rows for q in quantities]
    lines = [
        "# Shard composition and removal (TAFT)",
        "",
        f"Test accuracy (%) of the composed TAFT-{one('k')} model, mean ± std over seeds {', '.join(seeds)} "
        f"(sample std; n shown where fewer runs succeeded). N = {one('n_train')} private training examples "
        f"split by a keyed hash into n shards, {one('n_test')} test examples, δ = "
        f"{', '.join(sorted({r['delta'] for r in rows if r['delta']})) or '—'}, {one('epochs')} epoch(s); batch "
        f"{one('batch_size')} unsharded, round(batch / n) per shard (same sample rate and steps per shard). "
        "Columns are the target ε of every shard's training; results.csv's epsilon covers everything a row "
        "releases, the composed models from before and after the removal (see reports/).",
        "",
        res.markdown_table(rows, row="n_shards", col="target_epsilon", value="accuracy", row_order=shard_order,
                           col_order=eps_order, col_label=res.epsilon_label, corner="shards", scale=100, digits=1,
                           expected_n=len(seeds)),
        "Removing one training example (seeded random id) retrains only its shard; \"retrain all shards\" is the "
        "sum of the shards' training times (what a full retrain costs on one worker). Mean ± std over ε and seeds:",
        "",
        res.markdown_table(long, row="n_shards", col="quantity", value="value", row_order=shard_order,
                           col_order=list(quantities), col_label=quantities.get, corner="shards", digits=2),
        *randomness_notes(rows),
        *[f"{note}\n" for note in sorted({r.get("recomputed", "") for r in rows} - {""})],
    ]
    failed = [r for r in rows if r["status"] != "ok"]
    if failed:
        lines += ["Failed runs:", ""] + [f"- `{r['run_id']}`: {r['error']}" for r in failed] + [""]
    (out / SUMMARY_NAME).write_text("\n".join(lines))
    plot_curves(out / PLOT_NAME, rows, x="n_shards", y="accuracy", group="target_epsilon", group_order=eps_order,
                group_label=res.epsilon_label, xlabel="number of shards (log scale)", ylabel="test accuracy (%)",
                scale=100, title=f"Composed TAFT-{one('k')} shards (N = {one('n_train')}, "
                + (f"mean ± std over {len(seeds)} seeds)" if len(seeds) > 1 else "1 seed)"))
    return rows


# --------------------------------------------------------------------------- CLI
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.shards", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="TOML config file of this experiment")
    p.add_argument("--sweep-config", type=Path, default=sc.DEFAULT_CONFIG,
                   help="the sweep's TOML config (data sizes, δ, TAFT hyperparameters)")
    prof = p.add_mutually_exclusive_group()
    prof.add_argument("--profile", default="default", help="profile of the config file")
    prof.add_argument("--quick", dest="profile", action="store_const", const="quick",
                      help="profile 'quick': 2k examples, shards 1/2/4, 1 seed, 1 epoch (~3 min)")
    prof.add_argument("--smoke", dest="profile", action="store_const", const="smoke", help="profile 'smoke': tests")
    p.add_argument("--out", type=Path, default=None, help="output directory (default results/shards-<timestamp>/); "
                   "an existing one is resumed")
    p.add_argument("--n-shards", nargs="+", type=int, help="override the config's shard counts")
    p.add_argument("--epsilons", nargs="+", type=float, help="target ε values; inf = non-private")
    p.add_argument("--seeds", nargs="+", type=int)
    p.add_argument("--blocks", type=int, help="k of TAFT-k")
    p.add_argument("--private-train-size", type=int, help="private training examples (0 = all)")
    p.add_argument("--test-size", type=int, help="test examples (0 = all)")
    p.add_argument("--delta", type=float)
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="[nonprivate.]KEY=VALUE",
                   help="TAFT hyperparameter override, e.g. --set lr=1.0 --set epochs=5 (repeatable)")
    p.add_argument("--workers", type=int, default=1, help="shards trained in parallel (processes); see module doc")
    p.add_argument("--checkpoint", type=Path, help="weights of the default ViT (state dict) instead of the shipped "
                   "pretrained one")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    p.add_argument("--retry-failed", action="store_true", help="rerun configurations recorded as failed")
    p.add_argument("--quiet", action="store_true", help="no per-shard progress bars")
    p.add_argument("--report-only", action="store_true", help="only rewrite summary.md and the plot from results.csv")
    args = p.parse_args(argv)
    if args.workers < 1:
        p.error("--workers must be >= 1")
    vars(args).update(vars(default_task_args(args.checkpoint)))  # the default task and ViT only
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the experiment; returns 0 (failed configurations are recorded, not fatal), 2 on a bad configuration."""
    args = parse_args(argv)
    out = args.out or Path("results") / f"shards-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    if args.report_only:
        return res.rewrite_outputs(args.out, write_outputs, (CSV_NAME, SUMMARY_NAME, PLOT_NAME))
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        settings, hp, nonprivate = load_config(args.config, args.profile, args.sweep_config)
        for key in ("n_shards", "epsilons", "seeds", "blocks", "private_train_size", "test_size", "delta"):
            if getattr(args, key) is not None:
                settings[key] = getattr(args, key)
        hparams = {m: dict(hp) for m in sc.METHODS}
        nonpriv = {m: dict(nonprivate) for m in sc.METHODS}
        sc.apply_sets(hparams, args.sets, nonpriv)
        sc.check_hparams(hparams, nonpriv)
        _check(settings)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    comm = distributed_comm(torch.device(args.device), None)  # under torchrun: shards spread over the ranks
    task = build_task(args, settings)
    n = len(task.train)
    ids = content_ids(task.train)
    partition = comm.broadcast(partition_key(out) if comm.main else None)  # one partition on every rank
    err = _delta_error(settings, ids, partition)
    if err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    base_runs = sw.plan_runs({**settings, "methods": ["taft"], "blocks": [settings["blocks"]]}, hparams, nonpriv)
    plan = [(r, s) for seed in settings["seeds"] for s in settings["n_shards"] for r in base_runs if r.seed == seed]
    out.mkdir(parents=True, exist_ok=True)
    done = res.latest(res.read_rows(out / CSV_NAME), ("run_id",))
    key = lambda r, s: (run_id(s, r.epsilon, r.seed),)  # noqa: E731
    conflicts = [k[0] for r, s in plan if (k := key(r, s)) in done
                 and done[k]["settings"] != _settings(r, s, task, settings)]
    if conflicts:
        print(f"error: {out} holds runs made with other settings ({', '.join(conflicts[:5])}): rerun with the same "
              "config, profile and options to resume, or use a new --out", file=sys.stderr)
        return 2
    pending = comm.broadcast([(r, s) for r, s in plan  # every rank runs rank 0's list, in step
                              if not ((prev := done.get(key(r, s))) and (prev["status"] == "ok" or not args.retry_failed))])
    if not comm.main:
        for run, s in pending:
            run_one(run, s, task, settings, None, ids=ids, key=partition, workers=args.workers, device=args.device,
                    quiet=True)
        return 0
    save_partition_key(out, partition)
    with open(out / "invocations.jsonl", "a") as f:
        f.write(json.dumps({"at": datetime.datetime.now().isoformat(timespec="seconds"),
                            "argv": list(argv) if argv is not None else sys.argv[1:], "profile": args.profile,
                            "settings": settings, "hparams": hp, "nonprivate": nonprivate, "task": task.info,
                            "workers": args.workers, "runs": len(plan), "pending": len(pending)}, default=str) + "\n")
    print(f"shards: {len(plan)} configurations ({len(plan) - len(pending)} already done), profile {args.profile!r}, "
          f"N = {n}, test {len(task.test)}, out {out}", flush=True)
    started, failures = time.perf_counter(), 0
    try:
        for i, (run, s) in enumerate(pending, 1):
            row = run_one(run, s, task, settings, out, ids=ids, key=partition, workers=args.workers,
                          device=args.device, quiet=args.quiet)
            res.append_row(out / CSV_NAME, row, COLUMNS)
            if row["status"] == "ok":
                eps = "∞" if math.isinf(row["epsilon"]) else f"{row['epsilon']:.3f}"
                msg = (f"[{i}/{len(pending)}] {row['run_id']}: accuracy {100 * row['accuracy']:.1f}%, ε {eps}, "
                       f"train {row['train_wall_time_s']:.1f} s, removal {row['removal_wall_time_s']:.1f} s "
                       f"vs {row['full_retrain_time_s']:.1f} s ({row['speedup']:.1f}×)")
            else:
                failures += 1
                msg = f"[{i}/{len(pending)}] {row['run_id']}: FAILED ({row['error'][:200]})"
            print(msg, flush=True)
    finally:
        write_outputs(out)
    print(f"done in {time.perf_counter() - started:.0f} s: {out / CSV_NAME}, {out / SUMMARY_NAME}, {out / PLOT_NAME}"
          + (f"; {failures} configuration(s) failed (see summary.md)" if failures else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
