"""Tests for experiments.pretrain: the script runs, is deterministic, and the shipped checkpoint is useful."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from experiments import pretrain as pt
from experiments.data import default_model, default_task

REPO = Path(__file__).resolve().parents[1]
# One thread: fast enough for these tiny runs, and immune to the several-fold
# slowdown that oversubscribed cores cause on a busy CI machine.
QUICK = dict(epochs=1, max_train=256, max_test=500, threads=1)
QUICK_ARGS = ["--epochs", "1", "--max-train", "256", "--max-test", "500", "--threads", "1"]


@pytest.fixture(scope="module")
def task():
    return default_task(private_train_size=1)


@pytest.fixture(scope="module")
def cli_checkpoint(tmp_path_factory) -> Path:
    """A checkpoint written by a very short run of the command line script."""
    out = tmp_path_factory.mktemp("ckpt") / "quick.pt"
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.pretrain", *QUICK_ARGS, "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "public test accuracy" in proc.stdout and "epoch 1/1" in proc.stdout
    return out


def test_script_writes_loadable_checkpoint(cli_checkpoint):
    state = torch.load(cli_checkpoint, weights_only=True)
    assert all(v.dtype == torch.float32 for v in state.values())
    default_model().load_state_dict(state)  # strict: every key and shape matches


def test_same_seed_gives_identical_weights_and_leaves_global_state(cli_checkpoint):
    rng, threads = torch.get_rng_state(), torch.get_num_threads()
    state, acc = pt.pretrain(**QUICK, log=lambda msg: None)
    assert torch.equal(torch.get_rng_state(), rng)
    assert not torch.are_deterministic_algorithms_enabled() and torch.get_num_threads() == threads
    assert 0.0 <= acc <= 1.0
    saved = torch.load(cli_checkpoint, weights_only=True)
    assert saved.keys() == state.keys()
    assert all(torch.equal(saved[k], state[k]) for k in state)
    other, _ = pt.pretrain(**QUICK, seed=1, log=lambda msg: None)
    assert not torch.equal(other["blocks.0.attn.qkv.weight"], state["blocks.0.attn.qkv.weight"])


def test_shipped_checkpoint_is_small_recorded_and_accurate(task):
    path = pt.SHIPPED_CHECKPOINT
    assert path.is_file() and path.stat().st_size <= 5_000_000
    assert pt.sha256_file(path) == pt.SHIPPED_SHA256
    assert pt.SHIPPED_SHA256 in (path.parent / "README.md").read_text()
    model = default_model()
    model.load_state_dict(torch.load(path, weights_only=True))
    images, labels = task.public_test.tensors
    sub = torch.utils.data.TensorDataset(images[:500], labels[:500])
    assert pt.evaluate(model, sub) > 0.8  # chance is 0.2


@torch.no_grad()
def _features(model, images):
    model.eval()
    return model.forward_head(model.forward_features(images), pre_logits=True)


def test_pretrained_default_model_has_fresh_head_and_useful_features(task):
    rng = torch.get_rng_state()
    model = pt.pretrained_default_model(3)
    again = pt.pretrained_default_model(3)
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.head.weight.shape == (3, 128)
    assert torch.equal(model.head.weight, again.head.weight)  # seeded head
    assert not torch.equal(model.head.weight, pt.pretrained_default_model(3, head_seed=1).head.weight)
    shipped = torch.load(pt.SHIPPED_CHECKPOINT, weights_only=True)
    assert torch.equal(model.state_dict()["blocks.5.mlp.fc2.weight"], shipped["blocks.5.mlp.fc2.weight"])
    # Nearest-class-mean on the backbone's features beats chance by a wide margin.
    (xtr, ytr), (xte, yte) = task.public_train.tensors, task.public_test.tensors
    ftr, fte = _features(model, xtr[:300]), _features(model, xte[:200])
    means = torch.stack([ftr[ytr[:300] == c].mean(0) for c in range(5)])
    acc = (torch.cdist(fte, means).argmin(1) == yte[:200]).float().mean().item()
    assert acc > 0.6  # chance is 0.2


def test_checksum_mismatch_is_refused(monkeypatch):
    monkeypatch.setattr(pt, "SHIPPED_SHA256", "0" * 64)
    with pytest.raises(RuntimeError, match="sha256"):
        pt.pretrained_default_model()


def test_missing_shipped_checkpoint_falls_back_to_cache(tmp_path, monkeypatch, cli_checkpoint):
    monkeypatch.setattr(pt, "SHIPPED_CHECKPOINT", tmp_path / "absent.pt")
    quick = torch.load(cli_checkpoint, weights_only=True)
    calls = []

    def fake_pretrain(**kwargs):
        calls.append(kwargs)
        return quick, 0.5

    monkeypatch.setattr(pt, "pretrain", fake_pretrain)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    model = pt.pretrained_default_model()  # cache empty: trains and caches
    cached = tmp_path / "xdg" / "dp_taft" / pt.CHECKPOINT_NAME
    assert len(calls) == 1 and cached.is_file()
    assert torch.equal(model.pos_embed, quick["pos_embed"])
    pt.pretrained_default_model()  # cache hit: no training
    assert len(calls) == 1
    pt.pretrained_default_model(retrain=True)
    assert len(calls) == 2
    pt.pretrained_default_model(cache_dir=tmp_path / "other")
    assert len(calls) == 3 and (tmp_path / "other" / pt.CHECKPOINT_NAME).is_file()


def test_shipped_checkpoint_loads_through_create_backbone(monkeypatch):
    """The checkpoint is a plain timm state dict: timm's own loader takes it for a registered ViT name."""
    from experiments.data import create_backbone

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = create_backbone(
        "vit_tiny_patch16_224", num_classes=5, pretrained=True, checkpoint_file=pt.SHIPPED_CHECKPOINT,
        img_size=28, patch_size=7, in_chans=1, embed_dim=128, depth=6, num_heads=4,
    )
    shipped = torch.load(pt.SHIPPED_CHECKPOINT, weights_only=True)
    got = model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in shipped.items() if not k.startswith("head."))


def test_class_subset_pretraining_sees_only_those_classes(task, monkeypatch):
    from experiments.data import select_classes

    sub = select_classes(task.public_train, [2, 0])
    labels = task.public_train.tensors[1]
    assert len(sub) == int(((labels == 0) | (labels == 2)).sum())
    assert torch.equal(sub.tensors[1], torch.where(labels[(labels == 0) | (labels == 2)] == 2, 0, 1))
    with pytest.raises(ValueError, match="distinct"):
        select_classes(task.public_train, [1, 1])
    seen = []
    real = pt.F.cross_entropy
    monkeypatch.setattr(pt.F, "cross_entropy", lambda logits, y, **kw: seen.append(y.clone()) or real(logits, y, **kw))
    state, _ = pt.pretrain(**QUICK, classes=[0, 1, 2], log=lambda msg: None)
    assert state["head.weight"].shape[0] == 3 and set(torch.cat(seen).tolist()) == {0, 1, 2}
    assert len(torch.cat(seen)) == 256  # max_train counts within the chosen classes
