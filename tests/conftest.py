"""Fixtures shared by the experiment tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def backbone_file(tmp_path_factory) -> Path:
    """A randomly initialised default ViT saved as a local checkpoint (no pretraining needed)."""
    from experiments.data import default_model

    path = tmp_path_factory.mktemp("ckpt") / "random_default_vit.pt"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        torch.save(default_model(5).state_dict(), path)
    return path
