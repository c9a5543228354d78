"""Deterministic non-private pretraining of the default ViT on the public task.

The public task is Fashion-MNIST classes 0-4 (``experiments.data.default_task``);
the private task the experiments fine-tune with DP is classes 5-9, so the
backbone never sees a private image. Run ``python -m experiments.pretrain``
to regenerate the checkpoint (8 epochs of about 30 s each on 2 idle CPU
cores; about 8 CPU-minutes in total, so pass ``--threads 1`` on a busy
machine); the shipped one lives in ``experiments/assets`` (see the README there).

Recipe: AdamW (peak lr 1e-3, weight decay 0.05 on matrices only), linear
warmup for the first epoch then cosine decay to 0, batch 128, label smoothing
0.1, random horizontal flips, gradient-norm clipping at 1. Seeds, data order
and flips all come from one seeded generator and deterministic algorithms
are enforced, so two runs on the same machine and thread count give
bit-identical weights (other CPUs / thread counts may differ in the last bits).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from timm.models import VisionTransformer
from torch.utils.data import TensorDataset

from experiments.data import PUBLIC_CLASSES, default_model, public_split, select_classes

__all__ = [
    "CHECKPOINT_NAME",
    "SHIPPED_CHECKPOINT",
    "SHIPPED_SHA256",
    "default_cache_dir",
    "evaluate",
    "pretrain",
    "pretrained_checkpoint",
    "pretrained_default_model",
    "sha256_file",
    "main",
]

CHECKPOINT_NAME = "fmnist_public_vit_p7_d128_l6.pt"
SHIPPED_CHECKPOINT = Path(__file__).resolve().parent / "assets" / CHECKPOINT_NAME
# sha256 of the shipped file; update together with experiments/assets/README.md
# whenever the checkpoint is regenerated.
SHIPPED_SHA256 = "00521d955cec98195fc28d8aedf3e4ff7716fa98f55942bd506ee2a6fed270c6"
_HEAD_KEYS = ("head.weight", "head.bias")


def _log(msg: str) -> None:
    """Progress goes to stdout, flushed so it shows up promptly when piped."""
    print(msg, flush=True)


def default_cache_dir() -> Path:
    """``${XDG_CACHE_HOME:-~/.cache}/dp_taft``."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dp_taft"


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset: TensorDataset, batch_size: int = 1000) -> float:
    """Top-1 accuracy in [0, 1] of ``model`` on a ``TensorDataset`` of (images, labels)."""
    was_training = model.training
    model.eval()
    images, labels = dataset.tensors
    correct = sum(
        int((model(images[i:i + batch_size]).argmax(1) == labels[i:i + batch_size]).sum())
        for i in range(0, len(labels), batch_size)
    )
    model.train(was_training)
    return correct / max(len(labels), 1)


def _lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warmup from 1/warmup to 1 over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))


def pretrain(
    epochs: int = 8,
    max_train: int | None = None,
    *,
    max_test: int | None = None,
    seed: int = 0,
    batch_size: int = 128,
    lr: float = 1e-3,
    weight_decay: float = 0.05,
    label_smoothing: float = 0.1,
    threads: int | None = None,
    classes: Sequence[int] | None = None,
    data: tuple[TensorDataset, TensorDataset, int] | None = None,
    log: Callable[[str], None] = _log,
) -> tuple[dict[str, torch.Tensor], float]:
    """Train ``default_model`` on the public training images; return (state dict, public test accuracy).

    ``max_train`` / ``max_test`` (>= 1) keep only the first that many public
    training / test images (for quick checks); ``None`` uses all 30,000 /
    5,000. ``threads`` (>= 1) sets torch's intra-op thread count for the run;
    use 1 on a busy machine, where more threads than free cores slow training
    down several-fold. Leaves torch's global RNG, thread count and
    deterministic-algorithms setting as they were. ``classes`` (public labels, a subset
    of 0-4; default all) pretrains on those classes only, with a ``len(classes)``-way
    head and labels renumbered 0.. in the given order; ``experiments.tune`` uses it to
    build a public proxy of the private task (a backbone that never saw the proxy's classes).
    ``data`` = (training set, test set, the head's width): other PUBLIC data to pretrain on
    instead of classes 0-4, labels in 0..width-1 (``experiments.closeness``: classes 0-4 plus
    a public sample of 5-9); not with ``classes``.
    """
    if data is not None and classes is not None:
        raise ValueError("pass classes or data, not both")
    train, test = public_split() if data is None else data[:2]
    num_classes = data[2] if data is not None else len(PUBLIC_CLASSES)
    if classes is not None:
        train, test = select_classes(train, classes), select_classes(test, classes)
        num_classes = len(classes)
    images, labels = train.tensors
    if max_train is not None:
        images, labels = images[:max_train], labels[:max_train]
    n = len(labels)
    steps_per_epoch = math.ceil(n / batch_size)
    total = epochs * steps_per_epoch
    was_deterministic, was_threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = default_model(num_classes)
            gen = torch.Generator().manual_seed(seed)
            # No weight decay on biases, norms, position embedding and class token (standard for ViTs).
            decay = [p for p in model.parameters() if p.ndim >= 2 and p.shape[0] != 1]
            no_decay = [p for p in model.parameters() if not (p.ndim >= 2 and p.shape[0] != 1)]
            opt = torch.optim.AdamW(
                [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr
            )
            sched = torch.optim.lr_scheduler.LambdaLR(
                opt, lambda s: _lr_factor(s, warmup=steps_per_epoch, total=total)
            )
            _train_epochs(model, opt, sched, images, labels, gen, epochs=epochs, batch_size=batch_size,
                          label_smoothing=label_smoothing, log=log)
            acc = evaluate(model, TensorDataset(*(t[:max_test] for t in test.tensors)))
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        torch.set_num_threads(was_threads)
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in model.state_dict().items()}
    return state, acc


def _train_epochs(model: torch.nn.Module, opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler,
                  images: torch.Tensor, labels: torch.Tensor, gen: torch.Generator, *, epochs: int,
                  batch_size: int, label_smoothing: float, log: Callable[[str], None]) -> None:
    """``epochs`` passes over (images, labels) in ``gen``'s order, each image flipped left-right
    with probability 1/2, gradient norm clipped to 1; logs the mean training loss per epoch."""
    n = len(labels)
    model.train()
    start = time.perf_counter()
    for epoch in range(epochs):
        order = torch.randperm(n, generator=gen)
        flips = torch.rand(n, generator=gen) < 0.5
        loss_sum = 0.0
        for i in range(0, n, batch_size):
            idx = order[i:i + batch_size]
            x = images[idx]
            x = torch.where(flips[idx].view(-1, 1, 1, 1), x.flip(-1), x)
            loss = F.cross_entropy(model(x), labels[idx], label_smoothing=label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            loss_sum += float(loss.detach()) * len(idx)
        log(f"epoch {epoch + 1}/{epochs}  train loss {loss_sum / n:.4f}  elapsed {time.perf_counter() - start:.0f} s")


def _save_atomic(state: dict[str, torch.Tensor], path: Path) -> None:
    """Write via a temporary file in the same directory so readers never see a partial checkpoint.

    Serialised through a buffer because ``torch.save`` to a path embeds the
    file name in the archive, which would make the bytes (and sha256) depend
    on the random temporary name.
    """
    buffer = io.BytesIO()
    torch.save(state, buffer)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(buffer.getvalue())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def pretrained_checkpoint(path: Path, *, retrain: bool = False, log: Callable[[str], None] = _log,
                          **pretrain_kwargs: Any) -> Path:
    """``path``, first written by ``pretrain(**pretrain_kwargs)`` (deterministic) if it is absent or
    ``retrain`` is set; progress and the public test accuracy go to ``log``."""
    if retrain or not path.is_file():
        state, acc = pretrain(**pretrain_kwargs, log=log)
        _save_atomic(state, path)
        log(f"pretrained {path.name}: public test accuracy {acc:.4f}, saved {path}")
    return path


def pretrained_default_model(
    num_classes: int = 5,
    *,
    cache_dir: str | Path | None = None,
    retrain: bool = False,
    head_seed: int = 0,
) -> VisionTransformer:
    """The pretrained default ViT with a fresh ``num_classes``-way head.

    Loads the shipped checkpoint (verified against ``SHIPPED_SHA256``). If it
    is missing, or ``retrain`` is set, the checkpoint comes from
    ``cache_dir / CHECKPOINT_NAME`` (default ``default_cache_dir()``), which is
    produced by ``pretrain()`` (a few minutes) when absent or when ``retrain``
    is set. The head is timm's default init (truncated normal, std 0.02, zero
    bias) drawn with ``torch.manual_seed(head_seed)`` inside a forked RNG, so
    it is reproducible and torch's global RNG is left untouched.
    """
    path = SHIPPED_CHECKPOINT
    if retrain or not path.is_file():
        path = pretrained_checkpoint(Path(cache_dir or default_cache_dir()) / CHECKPOINT_NAME, retrain=retrain,
                                     log=lambda msg: print(msg, file=sys.stderr))
    elif sha256_file(path) != SHIPPED_SHA256:
        raise RuntimeError(f"{path} does not match its recorded sha256; restore it or pass retrain=True")
    state = torch.load(path, map_location="cpu", weights_only=True)
    backbone = {k: v for k, v in state.items() if k not in _HEAD_KEYS}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(head_seed)
        model = default_model(num_classes)
    result = model.load_state_dict(backbone, strict=False)
    if result.unexpected_keys or set(result.missing_keys) != set(_HEAD_KEYS):
        raise RuntimeError(f"checkpoint {path} does not fit default_model: {result}")
    return model


def main(argv: Sequence[str] | None = None) -> float:
    """Command line entry point; returns the public test accuracy."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=default_cache_dir() / CHECKPOINT_NAME,
                        help="where to write the state dict (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--max-train", type=int, default=None, help="use only the first N public training images")
    parser.add_argument("--max-test", type=int, default=None, help="evaluate on the first N public test images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--classes", type=int, nargs="+", default=None,
                        help="pretrain on these public classes only (subset of 0-4; default all)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    state, acc = pretrain(args.epochs, args.max_train, max_test=args.max_test, seed=args.seed, threads=args.threads,
                          classes=args.classes)
    _save_atomic(state, args.out)
    print(f"public test accuracy {acc:.4f}  ({time.perf_counter() - start:.0f} s)")
    print(f"saved {args.out}  sha256 {sha256_file(args.out)}  {args.out.stat().st_size} bytes")
    return acc


if __name__ == "__main__":
    main()
