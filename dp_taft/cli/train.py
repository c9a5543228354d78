"""``dp-taft train``: privately fine-tune a timm ViT on a folder or CSV of images.

The Python API does the same in a few lines (README, "Your own data")::

    spec = BackboneSpec(model, num_classes, weights=file)        # dp_taft.backbone
    vit = spec.create(); transform = eval_transform(data_config(vit))
    train = load_images(folder, transform)                         # dp_taft.images
    result = finetune(vit, train, TrainConfig.preset("taft").replace(epsilon=3.0))
    save(out, result.model, ...)                                   # dp_taft.model_dir
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .. import model_dir
from ..backbone import BackboneSpec, data_config, eval_transform
from ..config import METHODS, TrainConfig, option_name, parse_assignment
from ..images import ImageDataset, load_images
from ..inference import evaluate_model
from ..model_file import ModelSpec
from ..privacy.checkpoint import LEDGER_FILE, discard_keys, private_dir
from ..recipes import finetune
from ..shards import fit_shards
from ..tangent import linearize
from .options import WEIGHTS_PATH_FILE, check_device, positive_int, remember_weights, shard_options
from .record import RECORD_FILE, TrainRecord

__all__ = ["add_parser", "run"]

#: Private sub-directories of DIR: fit's checkpoints (secret key, ledger), the prefix cache
#: (features of the private images) and the shard set (partition key, ids, shard models).
CHECKPOINTS, CACHE, SHARDS = "checkpoints", "cache", "shards"


def add_parser(sub: Any) -> None:
    p = sub.add_parser("train", help="privately fine-tune a timm ViT on your images",
                       description="Privately fine-tune a timm ViT (DP-SGD) and write a model directory. "
                                   "Running the same command again resumes an interrupted run.")
    p.add_argument("--data", required=True, type=Path, metavar="TRAIN",
                   help="training images: a folder with one sub-folder per class, or a CSV with columns "
                        "path,label[,id] (paths relative to the CSV; id: a stable name for removal)")
    p.add_argument("--eval-data", type=Path, metavar="EVAL",
                   help="images evaluated after each epoch, same layouts (not covered by the guarantee)")
    p.add_argument("--model", required=True, metavar="NAME", help="timm model name, e.g. vit_small_patch16_224")
    p.add_argument("--weights", type=Path, metavar="FILE",
                   help="local pretrained weights (.safetensors, .pth, .pt, .bin) loaded as timm does; "
                        "default: timm's pretrained download (network)")
    p.add_argument("--model-kwargs", type=_json_object, default={}, metavar="JSON",
                   help="extra timm.create_model arguments, e.g. '{\"img_size\": 224}', or @FILE holding them")
    p.add_argument("--method", choices=METHODS,
                   help="taft (default): tangent fine-tuning of the last k blocks; taft-head: the same around "
                        "a privately trained head; nlft: ordinary fine-tuning of the last k blocks; probe: head only")
    p.add_argument("--blocks", type=int, metavar="K", help="k, the blocks fine-tuned (default 2; 0 to depth)")
    p.add_argument("--epsilon", required=True, type=_epsilon, metavar="E",
                   help="target epsilon > 0; 'inf' trains without privacy")
    p.add_argument("--delta", type=float, metavar="D", help="target delta, below 1/N; default 1/(10 N)")
    p.add_argument("--config", type=Path, metavar="FILE.toml",
                   help="training options: tables [method] [privacy] [optim] [data] [run] over the tuned preset")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="one training option, e.g. lr=0.5 or optim.epochs=5 (repeatable; applied last)")
    p.add_argument("--shards", type=positive_int, metavar="N",
                   help="train N tangent models on disjoint shards and compose them (removal: dp-taft forget)")
    p.add_argument("--device", metavar="DEV", help="cpu (default), cuda, cuda:1, ...")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="model directory (made owner-only)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=run)


def _json_object(text: str) -> dict[str, Any]:
    """argparse type: a JSON object, given inline or as ``@FILE``."""
    if text.startswith("@"):
        try:
            text = Path(text[1:]).read_text()
        except OSError as e:
            raise argparse.ArgumentTypeError(f"cannot read {text[1:]!r}: {e.strerror}") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e}): write e.g. '{{\"img_size\": 224}}'") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"img_size\": 224}}', got {text}")
    return value


def _epsilon(text: str) -> float | None:
    """argparse type: ε > 0, finite, or 'inf' for no privacy (None)."""
    if text.strip().lower() == "inf":
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a number > 0, or 'inf' to train without privacy; got {text!r}")
    return value


#: Options the command sets itself, with what to use instead.
_OWNED = {"epsilon": "--epsilon", "checkpoint_dir": "--out (DIR/checkpoints)", "cache_dir": "--out (DIR/cache)",
          "seed": "nothing: dp-taft train always draws its randomness secretly (a written seed voids the "
                  "guarantee; seeded runs are for experiments, through the Python API)",
          "distributed": "torchrun with the Python API"}


def training_config(args: argparse.Namespace, out: Path, n_train: int) -> TrainConfig:
    """The tuned preset of the method, then ``--config``, then ``--set``, then the flags given;
    δ defaults to 1/(10 N); the checkpoints and the prefix cache go to DIR's private folders."""
    table = _read_toml(args.config) if args.config else {}
    given = {option_name(k): v for k, v in [*table.items(), *map(parse_assignment, args.set)]}
    owned = sorted(set(given) & set(_OWNED))
    if owned:
        raise ValueError("; ".join(f"{k} is set by the command, not by --config/--set: use {_OWNED[k]}" for k in owned))
    method = args.method or given.get("name", "taft")
    if method not in METHODS:
        raise ValueError(f"method name {method!r} is not one of {list(METHODS)}")
    config = TrainConfig.preset(method, private=args.epsilon is not None).with_values(table).with_sets(args.set)
    flags = {"name": args.method, "blocks": args.blocks, "delta": args.delta, "device": args.device,
             "quiet": args.quiet or None}
    config = config.replace(epsilon=args.epsilon, checkpoint_dir=str(out / CHECKPOINTS), cache_dir=str(out / CACHE),
                            **{k: v for k, v in flags.items() if v is not None})
    if config.privacy.epsilon is not None and config.privacy.delta is None:
        config = config.replace(delta=1.0 / (10 * n_train))  # written down, so a resume or forget reuses it
    return config.validate()


def _read_toml(path: Path) -> dict[str, Any]:
    """The "group.name" options of a ``--config`` file (tables [method] [privacy] [optim] [data] [run])."""
    try:
        with open(path, "rb") as f:
            table = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"--config {path}: not TOML ({e})") from None
    loose = [k for k, v in table.items() if not isinstance(v, dict)]
    if loose:
        raise ValueError(f"--config {path}: {loose} must sit in a table ([method], [privacy], [optim], [data], [run])")
    return {f"{group}.{k}": v for group, values in table.items() for k, v in values.items()}


def run(args: argparse.Namespace) -> int:
    check_device(args.device)
    out = args.out.resolve()
    train = load_images(args.data)  # every training image is opened and checked here; transform set below
    config = training_config(args, out, len(train))
    spec = BackboneSpec(args.model, len(train.classes), weights=None if args.weights is None else args.weights.name,
                        model_kwargs=args.model_kwargs)
    record = TrainRecord(str(args.data.resolve()), None if args.eval_data is None else str(args.eval_data.resolve()),
                         spec.to_dict(), config.to_dict(), args.shards, list(train.classes),
                         None if args.weights is None else str(args.weights.resolve()))
    if _already_done(record, private_dir(out)):
        return 0
    record.save(out)
    remember_weights(out, record.weights)
    backbone = spec.create(record.weights)
    inputs = data_config(backbone)
    train.transform = transform = eval_transform(inputs)
    evals = None if args.eval_data is None else load_images(args.eval_data, transform, classes=train.classes)
    if args.shards is None:
        model, report, history = _train_one(backbone, train, evals, config)
    else:
        model, report, history = _train_shards(backbone, train, config, args.shards, out)
    accuracy = _accuracy(model, history, evals, train.classes, config.run.device)
    composition = None if args.shards is None else f"parallel over {args.shards} disjoint shards"
    model_dir.save(out, model, ModelSpec(spec, config.method.name, model.num_blocks, train.classes, inputs,
                                         composition=composition),
                   report=report, history=history, eval_accuracy=accuracy, train_size=len(train))
    # Finished before the keys go: a crash from here on must not let a rerun train again on a
    # ledger that is spent (it would replace this model with an untrained one).
    dataclasses.replace(record, finished=True).save(out)
    for private in (CHECKPOINTS, SHARDS):  # the finished run's secret keys must not outlive it; ledgers stay
        discard_keys(out / private)
    shutil.rmtree(out / CACHE, ignore_errors=True)  # features of the private images
    _summary(out, report, accuracy, len(train))
    return 0


def _accuracy(model: Any, history: Sequence[Any], evals: ImageDataset | None, classes: Sequence[str],
              device: str) -> float | None:
    """Eval accuracy of the returned model: the last epoch's (fit evaluated exactly this model, from
    the prefix cache), else (a composed shard model) one pass over the eval images."""
    if evals is None:
        return None
    if history:
        return history[-1].eval_accuracy
    return evaluate_model(model, evals, classes, device=device).accuracy


def _already_done(record: TrainRecord, out: Path) -> bool:
    """True when ``out`` holds this very run, finished. A different run is refused once it has
    spent privacy (its ledger holds steps); before that, it is replaced (e.g. after bad input)."""
    before = TrainRecord.load(out)
    if before is None:
        return False
    changes = record.changes_from(before)
    if changes and any(p.stat().st_size for p in out.rglob(LEDGER_FILE)):
        what = "a finished model of" if before.finished else "an unfinished run (run its command again to resume it) of"
        raise ValueError(f"{out} holds {what} another training run, which has spent privacy ({'; '.join(changes)}); "
                         "choose a new --out")
    if changes:
        for unspent in (CHECKPOINTS, SHARDS, CACHE):
            shutil.rmtree(out / unspent, ignore_errors=True)
        return False
    if before.finished:
        print(f"{out} already holds this finished model; nothing to do (choose a new --out to train again)")
    return before.finished


def _train_one(backbone: Any, train: ImageDataset, evals: ImageDataset | None, config: TrainConfig) -> tuple:
    result = finetune(backbone, train, config, eval_set=evals)
    return result.model, result.report, result.history


def _train_shards(backbone: Any, train: ImageDataset, config: TrainConfig, n_shards: int, out: Path) -> tuple:
    if config.method.name != "taft":
        raise ValueError(f"--shards trains tangent models, which compose by averaging: use --method taft "
                         f"(got {config.method.name})")
    shard_set = fit_shards(linearize(backbone, config.method.blocks), train, n_shards, ids=train.ids,
                           out_dir=out / SHARDS, **shard_options(config))
    return shard_set.composed, shard_set.report, ()


def _summary(out: Path, report: Any, accuracy: float | None, n: int) -> None:
    guarantee = "no privacy guarantee (trained with --epsilon inf)" if report is None else (
        f"({report.epsilon:.4g}, {report.delta:.3g})-DP")
    shown = "" if accuracy is None else f", eval accuracy {100 * accuracy:.2f} %"
    files = [f.name for f in sorted(out.iterdir()) if f.is_file() and f.name not in (RECORD_FILE, WEIGHTS_PATH_FILE)]
    print(f"trained on {n} images: {guarantee}{shown}\nwrote {out}/: {', '.join(files)}")
