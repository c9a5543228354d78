"""``dp-taft forget``: remove examples from a shard-trained model by retraining their shards."""

from __future__ import annotations

import argparse
import datetime
import shutil
from pathlib import Path
from typing import Any

from .. import model_dir
from ..config import TrainConfig
from ..images import example_id, load_images
from ..inference import evaluate_model
from ..privacy.checkpoint import discard_keys
from ..shards import load_shards
from .record import TrainRecord
from .train import CACHE, SHARDS
from .options import add_weights, saved_weights, shard_options

__all__ = ["add_parser", "run"]


def add_parser(sub: Any) -> None:
    p = sub.add_parser("forget", help="remove examples from a model trained with --shards",
                       description="Retrain, from the pretrained weights and with fresh noise, only the shards that "
                                   "held the given examples, recompose, and rewrite the model, report and card.")
    p.add_argument("dir", type=Path, metavar="DIR", help="model directory written by dp-taft train --shards N")
    p.add_argument("--ids", required=True, type=Path, metavar="FILE",
                   help="one example per line: its CSV id, or its path relative to the training folder/CSV "
                        "(e.g. cat/001.png)")
    add_weights(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=run)


def _names(path: Path) -> list[str]:
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not names:
        raise ValueError(f"{path} lists no examples: write one id or relative path per line")
    return names


def run(args: argparse.Namespace) -> int:
    record = TrainRecord.load(args.dir)
    if record is None or record.shards is None:
        raise ValueError(f"{args.dir} was not trained with --shards (or is not a dp-taft train directory): removal "
                         "retrains shards, so train with `dp-taft train ... --shards N`")
    names = _names(args.ids)
    trained = model_dir.load(args.dir, weights=saved_weights(args.dir, args.weights))
    config = TrainConfig.from_dict(record.config).replace(quiet=args.quiet)
    # the training classes, pinned: class folders added or emptied since must not re-index the labels
    train = load_images(Path(record.data), trained.transform(), classes=record.classes, verify=False)
    shard_set = load_shards(args.dir / SHARDS, trained.model, train, ids=train.ids, **shard_options(config))
    known = set(shard_set.assignment.ids)
    unknown = [n for n in names if example_id(n) not in known]
    if unknown:
        raise ValueError(f"{len(unknown)} name(s) in {args.ids} were not in the training data, e.g. {unknown[:3]}: "
                         "give the CSV id or the path relative to the training folder, as in training")
    result = shard_set.forget(example_id(n) for n in names)
    discard_keys(args.dir / SHARDS)  # the retrained rounds' secret keys
    shutil.rmtree(args.dir / CACHE, ignore_errors=True)  # the retrained shards' features of private images
    accuracy = None
    if record.eval_data is not None:
        evals = load_images(Path(record.eval_data), trained.transform(), classes=trained.spec.classes)
        accuracy = evaluate_model(shard_set.composed, evals, trained.spec.classes, device=config.run.device).accuracy
    when = datetime.date.today().isoformat()
    remaining = len(shard_set.assignment.ids) - len(shard_set.removed)
    model_dir.resave(args.dir, shard_set.composed, trained.spec, report=shard_set.report, eval_accuracy=accuracy,
                     train_size=remaining,
                     notes=[f"{len(shard_set.removed)} example(s) removed in all, {len(result.removed_ids)} of them on "
                            f"{when}, each by retraining with fresh noise the shards that held it."])
    print(f"removed {len(result.removed_ids)} example(s): retrained {len(result.retrained_shards)} of "
          f"{len(shard_set.models)} shards in {result.wall_time_s:.1f} s; retraining every shard took "
          f"{result.full_retrain_time_s:.1f} s ({result.speedup:.1f}x)\nrewrote {args.dir}/")
    return 0
