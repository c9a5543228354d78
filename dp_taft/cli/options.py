"""What several ``dp-taft`` sub-commands share: options declared once, and their checks."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from ..config import TrainConfig
from ..privacy.checkpoint import write_private_text

__all__ = ["WEIGHTS_PATH_FILE", "add_weights", "add_compute", "check_device", "positive_int", "remember_weights",
           "saved_weights", "shard_options"]


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def add_weights(p: argparse.ArgumentParser) -> None:
    """``--weights``: where the pretrained weights of a saved model are, if they moved."""
    p.add_argument("--weights", type=Path, metavar="FILE",
                   help="the pretrained weights the model was trained from (default: the file its training "
                        "recorded, when DIR holds that record)")


def add_compute(p: argparse.ArgumentParser) -> None:
    """``--batch-size`` and ``--device`` of inference (memory and speed only, never the answer)."""
    p.add_argument("--batch-size", type=positive_int, default=64, metavar="B",
                   help="images per forward pass (memory only)")
    p.add_argument("--device", default="cpu", metavar="DEV", help="cpu (default), cuda, cuda:1, ...")


def check_device(name: str | None) -> None:
    """ValueError naming ``name`` unless torch knows the device and this machine has it."""
    if name is None:
        return
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {name!r} is not a torch device: write cpu, cuda, cuda:1, ...") from None
    if device.type == "cuda" and (not torch.cuda.is_available()
                                  or (device.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                         "use --device cpu or another index")


#: In a model directory written by ``train`` or ``compose``: the absolute path of the pretrained
#: weights file, owner-only (the shareable model file keeps only the file's name).
WEIGHTS_PATH_FILE = "weights_path.txt"


def remember_weights(directory: Path, weights: str | Path | None) -> None:
    """Keep where ``weights`` are for the later commands on ``directory`` (nothing for timm's download)."""
    if weights is not None:
        write_private_text(directory / WEIGHTS_PATH_FILE, str(Path(weights).resolve()))


def saved_weights(directory: Path, given: Path | None) -> Path | None:
    """The weights to rebuild the model in ``directory`` with: ``given``, else the file remembered
    there by :func:`remember_weights`, else None (the model file's own: timm's, or its file name)."""
    if given is not None:
        return given
    path = directory / WEIGHTS_PATH_FILE
    return Path(path.read_text()) if path.is_file() else None


def shard_options(config: TrainConfig) -> dict[str, Any]:
    """``config``'s fit options as :func:`dp_taft.shards.fit_shards` and ``load_shards`` take them:
    each shard keeps its own checkpoints and randomness under the shard set's folder."""
    options = config.fit_options()
    for name in ("checkpoint_dir", "distributed", "seed"):
        options.pop(name)
    return options
