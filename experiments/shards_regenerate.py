"""Recompute the published shard experiment's privacy reports from each row's recorded mechanism.

``python -m experiments.shards_regenerate docs/shards docs/shards-recheck``

The reports of those runs were written by older code: before the removal, so that they
did not cover the retrained shard's second model (from which ``accuracy_after_removal``
comes), and with the public partition key 0. Re-running costs about 40 CPU-minutes per
seed, but a released model's privacy report is a function of its mechanism, which the row
records: target ε, δ, batch per shard, each shard's size, epochs, and (in the original
report) the accountant and clipping norm. For every private row this recomputes, with the
calibration :func:`dp_taft.fit` uses (``Plan.calibrated``, a ledger, ``Plan.report``), each
shard's first training on its recorded size (and checks σ, q and steps against the original
report), the retrained shard's second training on one example less, and composes them
(:class:`dp_taft.shards.ShardPrivacyReport`). It rewrites ``reports/<run_id>.json`` and the
CSV's privacy columns, labelled as recomputed; accuracies and times stay the original runs'.
The key-0 partition was public, so the CSV loses ``shard_sizes``, ``sample_rate`` and
``removed_id``; the reports keep each shard's mechanism (its size included) for reference, and
for 2 or more shards their ε is void (null; ∞ in the CSV): those sizes, published with a public
partition, tell whether a candidate is in. One shard has no partition to leak.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import accounting

from dp_taft.privacy.checkpoint import Ledger
from dp_taft.privacy.plan import Plan
from dp_taft.shards import ShardPrivacyReport
from experiments import results as res
from experiments.shards import COLUMNS, CSV_NAME, write_outputs
from experiments.shards_privacy import privacy_columns

__all__ = ["mechanism_report", "regenerate", "main"]

#: Columns of the old key-0 CSVs that publish per-shard sizes of a public partition, or an example.
DROPPED = ("removed_id", "shard_sizes", "sample_rate")
#: Rows from before the ``randomness`` column (code of 2026-11-27): every stream derived from the
#: row's public seed, and ``forget`` retrained a shard with the same seed, replaying its noise.
SEEDED_NOTE = (
    "These runs drew all training randomness from the public seed of their row and retrained the removed "
    "example's shard with the same seed, replaying its noise: no epsilon holds for their models (epsilon = inf "
    "in results.csv). per_shard and replaced give each training's mechanism as calibrated, for reference only."
)
#: Rows with 2 or more shards under the public key 0: the reports publish each shard's size, from
#: which anyone who knows the other examples places a candidate (tests/test_shard_membership.py).
PUBLIC_KEY_NOTE = (
    "The partition key was the public 0 and every shard's size is published (per_shard: dataset_size, sample "
    "rate): anyone who knows the other examples computes a candidate's shard and reads off the sizes whether it "
    "is in, so no epsilon holds for these models against the stated adversary (epsilon = inf in results.csv). "
    "per_shard and replaced give each training's mechanism as calibrated, for reference only."
)
SECRET_NOTE = (
    "Training randomness was secret (seeds from the OS CSPRNG), fresh for the retraining; the noise came from "
    "torch's CPU generator, which keeps 32 bits of its seed (full 128-bit keys since)."
)


def mechanism_report(target: float, delta: float, batch: int, size: int, epochs: int, method: str,
                     max_grad_norm: float, note: str) -> accounting.PrivacyReport:
    """The report :func:`dp_taft.fit` gives a run of ``epochs`` at expected batch ``batch``
    on ``size`` examples calibrated to ``target`` (every planned step run), noted ``note``."""
    plan = Plan(epsilon=target, delta=delta, sample_rate=batch / size, max_grad_norm=max_grad_norm,
                dataset_size=size, accountant=method, prior=(), epochs=epochs, secure_mode=False).calibrated()
    ledger = Ledger(None, method=method, target_epsilon=target, delta=delta)
    ledger.reserve(plan.noise_multiplier, plan.sample_rate, plan.planned_steps)
    return dataclasses.replace(plan.report(ledger, plan.planned_steps, (), None), notes=note)


def _rounds(row: dict[str, str], original: Sequence[accounting.PrivacyReport], on: str
            ) -> list[list[accounting.PrivacyReport]]:
    """Every training round's report of each shard: the first recomputed and checked against
    the original report, the retrained shard's second on one example less."""
    sizes = [int(n) for n in row["shard_sizes"].split(";")]
    retrained = int(row["retrained_shard"])
    first = original[0]
    note = f"recomputed on {on} from the recorded mechanism with dp_taft's calibration"

    def report(size: int, which: str) -> accounting.PrivacyReport:
        return mechanism_report(float(row["target_epsilon"]), float(row["delta"]), int(row["batch_size_per_shard"]),
                                size, int(row["epochs"]), first.method, first.max_grad_norm, f"{which}; {note}")

    rounds = [[report(n, "first training")] for n in sizes]
    for s, (mine, theirs) in enumerate(zip(rounds, original)):
        (a,), (b,) = mine[0].history, theirs.history
        if (a.sample_rate, a.steps, theirs.dataset_size) != (b.sample_rate, b.steps, sizes[s]) or not math.isclose(
                a.noise_multiplier, b.noise_multiplier, rel_tol=1e-9):
            raise ValueError(f"{row['run_id']} shard {s}: recomputed {a} but the original report has {b}")
    rounds[retrained].append(report(sizes[retrained] - 1, "retraining after the removal of one example"))
    return rounds


def _regenerate_row(directory: Path, row: dict[str, str], on: str) -> dict[str, Any]:
    """The row with its privacy columns recomputed (and its report rewritten when private)."""
    seeded = "randomness" not in row
    note = (f"Privacy columns and reports/ recomputed on {on} by experiments/shards_regenerate.py from the recorded "
            f"mechanism; accuracies and times are from the original run of {row['finished_at'][:10]}. Partition key "
            "0 (public): the shard sizes in reports/ tell whether a candidate example is in, and are dropped from "
            f"results.csv. {SEEDED_NOTE if seeded else SECRET_NOTE}")
    new: dict[str, Any] = {**{k: v for k, v in row.items() if k not in DROPPED},
                           "randomness": "seeded" if seeded else row["randomness"], "recomputed": note}
    if row["status"] != "ok" or math.isinf(float(row["target_epsilon"])):
        return new
    path = directory / "reports" / f"{row['run_id']}.json"
    original = [accounting.PrivacyReport.from_dict(d) for d in json.loads(path.read_text())["per_shard"]]
    report = ShardPrivacyReport.of(_rounds(row, original, on), key_drawn=False)
    published = {"recomputed": {"on": on, "note": note}, **report.to_dict()}
    columns = {k: v for k, v in privacy_columns(report, len(original)).items() if k not in DROPPED}
    # No guarantee: without fresh secret noise, or with a public partition whose sizes are published.
    void = SEEDED_NOTE if seeded else PUBLIC_KEY_NOTE if len(original) > 1 else None
    if void is not None:
        published.update(statement=void, epsilon=None, current_models_epsilon=None, all_releases_epsilon=None,
                         all_releases_per_shard=None)
        columns.update(epsilon=math.inf, per_shard_epsilon=";".join(["inf"] * len(original)))
    path.write_text(json.dumps(published, indent=1))
    return {**new, **columns}


def regenerate(directory: Path, on: str) -> None:
    """Rewrite ``directory``'s results.csv, reports/ and summary (see the module doc)."""
    original = res.read_rows(directory / CSV_NAME)
    if "recomputed" in original[0]:
        raise ValueError(f"{directory / CSV_NAME} was already recomputed (its per-shard sizes are gone)")
    rows = [_regenerate_row(directory, row, on) for row in original]
    columns = [c for c in COLUMNS if c in rows[0]] + [c for c in rows[0] if c not in COLUMNS]
    tmp = directory / f".{CSV_NAME}.tmp"
    tmp.unlink(missing_ok=True)
    for row in rows:
        res.append_row(tmp, row, columns)
    os.replace(tmp, directory / CSV_NAME)
    write_outputs(directory)


def main(argv: Sequence[str] | None = None) -> int:
    """Recompute every directory given (``argv``, default the command line); 2 without one."""
    dirs = [Path(d) for d in (sys.argv[1:] if argv is None else argv)]
    if not dirs:
        print("usage: python -m experiments.shards_regenerate DIR [DIR ...]", file=sys.stderr)
        return 2
    on = datetime.date.today().isoformat()
    for directory in dirs:
        regenerate(directory, on)
        print(f"{directory}: results.csv, reports/ and summary.md recomputed ({on})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
