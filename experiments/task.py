"""The sweep's task: private train/test sets and the backbones to fine-tune, from the command line's choices.

:func:`build_task` makes the :class:`Task` of ``--dataset``/``--model`` (the offline default
task and ViT, or a torchvision data set and a timm model); experiments that reuse the
sweep's task pass :func:`default_task_args`.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

__all__ = ["DATASETS", "NUM_CLASSES", "Task", "build_task", "default_task_args", "load_default_checkpoint",
           "subsample"]

#: --dataset choices, and their number of classes.
DATASETS = ("default", "cifar10", "cifar100", "fashion-mnist")
NUM_CLASSES = {"default": 5, "cifar10": 10, "cifar100": 100, "fashion-mnist": 10}


@dataclass
class Task:
    """Private train/test sets and a backbone factory ``backbone(seed)`` (head initialised from ``seed``).

    ``reuse_prefix``: runs store their prefix caches under ``<out>/prefix_cache/`` and map
    the ones an earlier run (or an earlier invocation) computed for the same frozen prefix
    and data, so each distinct prefix is computed once; False recomputes it in every run.
    """

    train: Dataset
    test: Dataset
    num_classes: int
    backbone: Callable[[int], nn.Module]
    info: dict[str, Any]  # identifies data and model, part of every run's settings hash
    reuse_prefix: bool = True


def load_default_checkpoint(path: Path, num_classes: int, seed: int) -> nn.Module:
    """``default_model(num_classes)`` with the backbone of the state dict at ``path`` and a fresh head drawn with ``seed``."""
    from experiments.data import default_model

    state = torch.load(path, map_location="cpu", weights_only=True)
    head = ("head.weight", "head.bias")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = default_model(num_classes)
    result = model.load_state_dict({k: v for k, v in state.items() if k not in head}, strict=False)
    if result.unexpected_keys or not set(result.missing_keys) <= set(head):
        raise ValueError(f"{path} is not a state dict of experiments.data.default_model: {result}")
    return model


def _backbone_factory(args: argparse.Namespace, num_classes: int) -> Callable[[int], nn.Module]:
    cache: dict[int, nn.Module] = {}
    timm_kwargs = json.loads(args.timm_kwargs) if args.timm_kwargs else {}

    def make(seed: int) -> nn.Module:
        if seed not in cache:
            if args.model == "default":
                if args.checkpoint is not None:
                    cache[seed] = load_default_checkpoint(Path(args.checkpoint), num_classes, seed)
                else:
                    from experiments.pretrain import pretrained_default_model

                    cache[seed] = pretrained_default_model(num_classes, head_seed=seed)
            else:
                from experiments.data import create_backbone

                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed)
                    cache[seed] = create_backbone(args.model, num_classes, args.pretrained, args.checkpoint,
                                                  **timm_kwargs)
            cache[seed].eval()
        return cache[seed]  # dp_taft.methods copy it, so runs never share trained weights

    return make


def subsample(ds: Dataset, size: int, seed: int) -> Dataset:
    """``size`` examples drawn without replacement with ``seed`` (kept in index order); 0 = all."""
    if size == 0 or size >= len(ds):
        if size > len(ds):
            raise ValueError(f"asked for {size} examples, the data set has {len(ds)}")
        return ds
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:size].sort().values
    if isinstance(ds, TensorDataset):
        return TensorDataset(*(t[idx] for t in ds.tensors))
    return Subset(ds, idx.tolist())


def _materialise(ds: Dataset, limit_bytes: int = 1 << 30) -> Dataset:
    """Apply lazy transforms once (a TensorDataset) when the result fits in ``limit_bytes``."""
    if isinstance(ds, TensorDataset) or len(ds) == 0:
        return ds
    x0, _ = ds[0]
    if len(ds) * x0.numel() * x0.element_size() > limit_bytes:
        return ds
    xs, ys = [], []
    for x, y in DataLoader(ds, batch_size=256, shuffle=False):
        xs.append(x)
        ys.append(torch.as_tensor(y))
    return TensorDataset(torch.cat(xs), torch.cat(ys).long())


def _weights_sha256(args: argparse.Namespace) -> str | None:
    """sha256 of the local weights file the backbone came from (None for timm's own download)."""
    from experiments.pretrain import CHECKPOINT_NAME, SHIPPED_CHECKPOINT, default_cache_dir, sha256_file

    path = args.checkpoint
    if path is None and args.model == "default":
        path = SHIPPED_CHECKPOINT if SHIPPED_CHECKPOINT.is_file() else default_cache_dir() / CHECKPOINT_NAME
    return sha256_file(path) if path is not None and Path(path).is_file() else None


def default_task_args(checkpoint: Path | None = None) -> argparse.Namespace:
    """The command-line fields :func:`build_task` reads, for the offline default task and ViT
    (``checkpoint``: other weights for it), for experiments that build the sweep's task."""
    return argparse.Namespace(dataset="default", model="default", pretrained=True, checkpoint=checkpoint,
                              timm_kwargs=None, data_root=Path("data"), download=False)


def build_task(args: argparse.Namespace, sweep: dict[str, Any]) -> Task:
    """The :class:`Task` of ``args`` (--dataset, --model, ...; see :func:`default_task_args`) with the data
    sizes and data seed of the sweep settings ``sweep``."""
    num_classes = NUM_CLASSES[args.dataset]
    backbone = _backbone_factory(args, num_classes)
    n_train, n_test, data_seed = sweep["private_train_size"], sweep["test_size"], sweep["data_seed"]
    if args.dataset == "default":
        from experiments.data import default_task

        task = default_task(private_train_size=n_train or None, seed=data_seed)
        train, test = task.private_train, task.private_test
    else:
        from experiments.data import PUBLIC_MEAN, PUBLIC_STD, load_image_dataset, model_normalisation

        probe = backbone(sweep["seeds"][0])
        embed = probe.patch_embed
        size, in_chans = int(embed.img_size[0]), int(embed.proj.in_channels)
        if args.model == "default":
            mean, std = (PUBLIC_MEAN,), (PUBLIC_STD,)
        else:
            mean, std = model_normalisation(probe, in_chans)

        def load(train: bool) -> Dataset:
            try:
                return load_image_dataset(args.dataset, args.data_root, size, in_chans, train=train,
                                          download=args.download, mean=mean, std=std)
            except FileNotFoundError:  # said in command-line terms: the sweep's user has no Python call to make
                raise ValueError(f"--dataset {args.dataset}: not found under --data-root {args.data_root} "
                                 "(torchvision's layout): pass --data-root DIR where the files are, or add --download "
                                 "(needs network); --dataset default runs offline") from None
        train = _materialise(subsample(load(True), n_train, data_seed))
        test = load(False)
    test = _materialise(subsample(test, n_test, data_seed + 1))
    backbone(sweep["seeds"][0])  # fail (or pretrain the default ViT) before the first run
    info = {
        "dataset": args.dataset, "model": args.model,
        "pretrained": True if args.model == "default" else bool(args.pretrained),
        "checkpoint": str(args.checkpoint) if args.checkpoint else None,
        "weights_sha256": _weights_sha256(args),
        "timm_kwargs": json.loads(args.timm_kwargs) if args.timm_kwargs else {},
        "n_train": len(train), "n_test": len(test), "data_seed": data_seed,
    }
    # experiments.shards builds its own args, without this sweep option
    return Task(train, test, num_classes, backbone, info, reuse_prefix=not getattr(args, "no_prefix_reuse", False))

