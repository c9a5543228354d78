"""The owner-only record of a ``dp-taft train`` run, kept in its DIR.

It names the training data (paths of private images), the backbone and every training
option, so that re-running the same command resumes the same run, a different command
into the same DIR is refused (it would mix two runs' checkpoints and budgets), and
``dp-taft forget`` can retrain shards exactly as they were trained. Private: 0600.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..privacy.checkpoint import write_private_text

__all__ = ["RECORD_FILE", "TrainRecord"]

RECORD_FILE = "train_record.json"
#: Options a resumed run may change: where and how it runs, never what it computes.
_RESUMABLE = frozenset({"physical_batch_size", "num_workers", "cache_dir", "grad_sample_mode"})


@dataclass(frozen=True)
class TrainRecord:
    """``data``/``eval_data``: absolute paths; ``backbone``: ``BackboneSpec.to_dict()``;
    ``config``: ``TrainConfig.to_dict()``; ``shards``: N of ``--shards`` or None; ``classes``:
    the training classes (label i is ``classes[i]``); ``weights``: the absolute path of the
    pretrained weights file (the shareable model file keeps only its name); ``finished``: the
    model directory was written (its secret keys are deleted next)."""

    data: str
    eval_data: str | None
    backbone: dict[str, Any]
    config: dict[str, Any]
    shards: int | None
    classes: list[str]
    weights: str | None = None
    finished: bool = False

    def save(self, out: Path) -> None:
        write_private_text(out / RECORD_FILE, json.dumps(dataclasses.asdict(self), indent=1))

    @classmethod
    def load(cls, out: Path) -> "TrainRecord | None":
        """The record in ``out``, or None when there is none (a new run)."""
        path = out / RECORD_FILE
        if not path.exists():
            return None
        return cls(**json.loads(path.read_text()))

    def changes_from(self, other: "TrainRecord") -> list[str]:
        """What differs from ``other`` besides where and how it runs (the ``run`` group and
        :data:`_RESUMABLE`, which a resume may change), as ``"name: before -> now"`` lines."""
        def fields(r: TrainRecord) -> dict[str, Any]:
            options = {f"{group}.{k}": v for group, values in r.config.items() for k, v in values.items()
                       if group != "run" and k not in _RESUMABLE}
            return {"--data": r.data, "--eval-data": r.eval_data, "backbone": r.backbone, "--shards": r.shards,
                    "classes": r.classes, "--weights": r.weights, **options}

        mine, theirs = fields(self), fields(other)
        return [f"{k}: {theirs.get(k)!r} -> {mine.get(k)!r}" for k in sorted(mine.keys() | theirs.keys())
                if mine.get(k) != theirs.get(k)]
