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
import json
import shutil
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .. import model_dir
from ..backbone import BackboneSpec, data_config, eval_transform
from ..config import TrainConfig
from ..images import ImageDataset, load_images
from ..inference import evaluate_model
from ..model_file import ModelSpec
from ..privacy.checkpoint import discard_keys, private_dir
from ..recipes import finetune
from ..shards import fit_shards
from ..tangent import linearize
from .record import TrainRecord

__all__ = ["add_parser", "run"]

METHODS = ("taft", "taft-head", "nlft", "probe")
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
                   help="extra timm.create_model arguments, e.g. '{\"img_size\": 224}'")
    p.add_argument("--method", choices=METHODS,
                   help="taft (default): tangent fine-tuning of the last k blocks; taft-head: the same around "
                        "a privately trained head; nlft: ordinary fine-tuning of the last k blocks; probe: head only")
    p.add_argument("--blocks", type=int, metavar="K", help="k, the blocks fine-tuned (default 2)")
    p.add_argument("--epsilon", required=True, type=_epsilon, metavar="E",
                   help="target epsilon > 0; 'inf' trains without privacy")
    p.add_argument("--delta", type=float, metavar="D", help="target delta, below 1/N; default 1/(10 N)")
    p.add_argument("--config", type=Path, metavar="FILE.toml",
                   help="training options: tables [method] [privacy] [optim] [data] [run] over the tuned preset")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="one training option, e.g. lr=0.5 or optim.epochs=5 (repeatable; applied last)")
    p.add_argument("--shards", type=int, metavar="N",
                   help="train N tangent models on disjoint shards and compose them (removal: dp-taft forget)")
    p.add_argument("--device", metavar="DEV", help="cpu (default), cuda, cuda:1, ...")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="model directory (made owner-only)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=run)


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e}): write e.g. '{{\"img_size\": 224}}'") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"img_size\": 224}}', got {text}")
    return value


def _epsilon(text: str) -> float | None:
    if text.strip().lower() in ("inf", "none"):
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0 or 'inf' (no privacy), got {text!r}") from None


def training_config(args: argparse.Namespace, out: Path) -> TrainConfig:
    """The tuned preset of the method, then ``--config``, then ``--set``, then the flags; the
    checkpoints and the prefix cache go to DIR's private sub-directories."""
    table = _read_toml(args.config) if args.config else {}
    method = args.method or table.get("method", {}).get("name", "taft")
    config = TrainConfig.preset(method, private=args.epsilon is not None)
    config = config.with_values({f"{group}.{k}": v for group, values in table.items() for k, v in values.items()})
    config = config.with_sets(args.set)
    flags = {"method.name": method, "privacy.epsilon": args.epsilon, "run.checkpoint_dir": str(out / CHECKPOINTS),
             "data.cache_dir": str(out / CACHE), "run.quiet": args.quiet}
    flags.update({name: value for name, value in (("privacy.delta", args.delta), ("method.blocks", args.blocks),
                                                  ("run.device", args.device)) if value is not None})
    return config.replace(**flags)


def _read_toml(path: Path) -> dict[str, dict[str, Any]]:
    with open(path, "rb") as f:
        table = tomllib.load(f)
    loose = [k for k, v in table.items() if not isinstance(v, dict)]
    if loose:
        raise ValueError(f"{path}: {loose} must sit in a table ([method], [privacy], [optim], [data] or [run])")
    return table


def run(args: argparse.Namespace) -> int:
    out = private_dir(args.out)
    config = training_config(args, out)
    train_classes = load_images(args.data).classes  # every training image is opened and checked here
    weights = None if args.weights is None else str(args.weights.resolve())  # predict may run elsewhere
    spec = BackboneSpec(args.model, len(train_classes), weights=weights, model_kwargs=args.model_kwargs)
    record = TrainRecord(str(args.data.resolve()), None if args.eval_data is None else str(args.eval_data.resolve()),
                         spec.to_dict(), config.to_dict(), args.shards)
    if _already_done(record, out):
        return 0
    record.save(out)
    backbone = spec.create()
    transform = eval_transform(data_config(backbone))
    train = load_images(args.data, transform, verify=False)
    evals = None if args.eval_data is None else load_images(args.eval_data, transform, classes=train.classes)
    if args.shards is None:
        model, report, history = _train_one(backbone, train, evals, config)
    else:
        model, report, history = _train_shards(backbone, train, config, args.shards, out)
    accuracy = _accuracy(model, history, evals, train.classes, config.run.device)
    composition = None if args.shards is None else f"parallel over {args.shards} disjoint shards"
    model_dir.save(out, model, ModelSpec(spec, config.method.name, model.num_blocks, train.classes,
                                         data_config(backbone), composition=composition),
                   report=report, history=history, eval_accuracy=accuracy, train_size=len(train))
    for private in (CHECKPOINTS, SHARDS):  # the finished run's secret keys must not outlive it; ledgers stay
        discard_keys(out / private)
    shutil.rmtree(out / CACHE, ignore_errors=True)  # features of the private images
    TrainRecord(**{**record.__dict__, "finished": True}).save(out)
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
    """True when ``out`` holds this very run, finished; refuses a different run in ``out``."""
    before = TrainRecord.load(out)
    if before is None:
        return False
    changes = record.changes_from(before)
    if changes:
        raise ValueError(f"{out} holds another training run ({'; '.join(changes)}); run the same command to resume "
                         "it, or choose a new --out")
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
    options = config.fit_options()
    for name in ("checkpoint_dir", "distributed"):  # fit_shards keeps each shard's own under out_dir
        options.pop(name, None)
    seed = options.pop("seed", None)
    if options.get("delta") is None:  # one δ for every shard, from N: a shard's own 1/(10 N_s) would publish min N_s
        options["delta"] = 1.0 / (10 * len(train))
    shard_set = fit_shards(linearize(backbone, config.method.blocks), train, n_shards, ids=train.ids, seed=seed,
                           out_dir=out / SHARDS, **options)
    return shard_set.composed, shard_set.report, ()


def _summary(out: Path, report: Any, accuracy: float | None, n: int) -> None:
    guarantee = "no privacy guarantee (trained with --epsilon inf)" if report is None else (
        f"({report.epsilon:.4g}, {report.delta:.3g})-DP")
    shown = "" if accuracy is None else f", eval accuracy {100 * accuracy:.2f} %"
    print(f"trained on {n} images: {guarantee}{shown}\nwrote {out}/: {model_dir.MODEL_FILE}, privacy_report.json, "
          "model_card.md, history.csv, training.svg")
