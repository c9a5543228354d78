"""What the shard experiment publishes about privacy, and the secret it keeps.

The experiment's partition key is drawn once per output directory (128 bits from the OS
CSPRNG) and kept owner-only in ``private/partition_key``: the per-shard sizes it publishes
(``shard_sizes``, ``sample_rate``, every per-shard report's ``dataset_size``) are safe to
publish only while that key is secret (see :class:`dp_taft.shards.ShardPrivacyReport`).
A row's privacy columns cover everything the row releases (:func:`privacy_columns`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from dp_taft.privacy.checkpoint import private_dir, write_private_text
from dp_taft.privacy.randomness import secret_seed
from dp_taft.shards import ShardPrivacyReport

__all__ = ["KEY_FILE", "partition_key", "save_partition_key", "privacy_columns"]

KEY_FILE = Path("private") / "partition_key"  #: under the experiment's --out; owner-only


def partition_key(out: Path) -> int:
    """The partition key of the experiment in ``out``: the saved one, or 128 fresh bits from
    the OS CSPRNG (kept by :func:`save_partition_key` once the run is under way)."""
    path = out / KEY_FILE
    return int(path.read_text()) if path.exists() else secret_seed()


def save_partition_key(out: Path, key: int) -> None:
    """Keep ``key`` in ``out/private/partition_key``, owner-only (0700 directory, 0600 file)."""
    write_private_text(private_dir(out / KEY_FILE.parent) / KEY_FILE.name, str(key))


def privacy_columns(report: ShardPrivacyReport | None, n_shards: int) -> dict[str, Any]:
    """results.csv's privacy columns of a row whose shards' report, after the removal, is
    ``report`` (None: non-private). ``epsilon`` covers everything the row releases, the composed
    models from before and after the removal (``accuracy`` and ``accuracy_after_removal``);
    ``per_shard_epsilon`` likewise per shard; ``sample_rate`` and ``steps`` are each shard's
    first round's (a retrained shard's second round has one example less)."""
    if report is None:
        return {"epsilon": math.inf, "per_shard_epsilon": ";".join(["inf"] * n_shards)}
    first = [rounds[0] for rounds in report.released]
    return {"epsilon": report.all_releases_epsilon, "delta": report.delta,
            "per_shard_epsilon": ";".join(f"{e:.4g}" for e in report.all_releases_per_shard),
            "sample_rate": ";".join(f"{r.history[0].sample_rate:.4g}" for r in first),
            "steps": ";".join(str(r.steps) for r in first)}
