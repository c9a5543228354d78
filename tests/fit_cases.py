"""Tiny ViTs and easy synthetic image sets shared by the fit/methods/checkpoint tests."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import timm
import torch
from torch.utils.data import TensorDataset

NUM_CLASSES = 3


def tiny_vit(seed: int = 0, **overrides) -> timm.models.VisionTransformer:
    """16x16 images, 4x4 patches, width 32, depth 2, 3 classes; deterministic init."""
    torch.manual_seed(seed)
    kwargs = dict(img_size=16, patch_size=4, in_chans=3, embed_dim=32, depth=2, num_heads=2, num_classes=NUM_CLASSES)
    return timm.models.VisionTransformer(**{**kwargs, **overrides})


def easy_dataset(n: int, seed: int = 0, noise: float = 0.5) -> TensorDataset:
    """Class c is a fixed random template (same for every seed) plus Gaussian pixel noise.

    Linearly separable with a wide margin, so a few epochs reach far above chance (1/3).
    """
    templates = torch.randn(NUM_CLASSES, 3, 16, 16, generator=torch.Generator().manual_seed(1234))
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % NUM_CLASSES
    x = templates[y] + noise * torch.randn(n, 3, 16, 16, generator=g)
    return TensorDataset(x, y)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the trainable parameters, by name."""
    return {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}


def interrupt_after(monkeypatch, steps: int, error: type[BaseException]) -> None:
    """Make the engine raise ``error`` when asked for a physical batch after ``steps`` executed
    DP-SGD steps: a crash after the next step was reserved, before its noise (any grad_sample_mode)."""
    from dp_taft.privacy.engine import PrivateEngine

    physical_step = PrivateEngine.physical_step

    def crash(self, *args):
        if self.executed == steps:
            raise error
        return physical_step(self, *args)

    monkeypatch.setattr(PrivateEngine, "physical_step", crash)


def permission_modes(root: Path) -> dict[str, set[int]]:
    """Permission bits of ``root`` and of every directory and file under it, by kind
    ({"dirs": {...}, "files": {...}}): owner-only private data reads {0o700} and {0o600}."""
    root = Path(root)
    paths = [root, *root.rglob("*")]
    return {"dirs": {p.stat().st_mode & 0o777 for p in paths if p.is_dir()},
            "files": {p.stat().st_mode & 0o777 for p in paths if p.is_file()}}


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    """Run the block under the process umask ``mask``, restoring the previous one after."""
    before = os.umask(mask)
    try:
        yield
    finally:
        os.umask(before)
