"""Tests for experiments.data: IDX reader, the public/private task, the default ViT, real-data code paths."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import pytest
import timm
import torch
from timm.models import VisionTransformer
from timm.models.vision_transformer import Attention, Block

from experiments import data
from experiments.data import (
    DEFAULT_FMNIST_DIR,
    PUBLIC_MEAN,
    PUBLIC_STD,
    create_backbone,
    default_model,
    default_task,
    load_fashion_mnist,
    load_image_dataset,
    model_normalisation,
    read_idx,
)

FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


@pytest.fixture(scope="module")
def raw() -> data.FashionMNISTArrays:
    return load_fashion_mnist()


@pytest.fixture(scope="module")
def task() -> data.DefaultTask:
    return default_task()


def test_reader_shapes_dtypes_and_class_counts(raw):
    assert raw.train_images.shape == (60_000, 28, 28) and raw.train_images.dtype == torch.uint8
    assert raw.test_images.shape == (10_000, 28, 28) and raw.test_images.dtype == torch.uint8
    assert raw.train_labels.dtype == torch.int64 and raw.test_labels.dtype == torch.int64
    # Fashion-MNIST is exactly balanced: 6,000 training and 1,000 test images per class.
    assert torch.bincount(raw.train_labels).tolist() == [6_000] * 10
    assert torch.bincount(raw.test_labels).tolist() == [1_000] * 10
    assert int(raw.train_images.max()) == 255 and int(raw.train_images.min()) == 0


def _write_gz(path: Path, payload: bytes) -> Path:
    with gzip.open(path, "wb") as f:
        f.write(payload)
    return path


def test_reader_round_trip_and_rejects_malformed_files(tmp_path):
    header = bytes([0, 0, 8, 3]) + (2).to_bytes(4, "big") + (3).to_bytes(4, "big") + (4).to_bytes(4, "big")
    good = _write_gz(tmp_path / "good.gz", header + bytes(range(24)))
    assert read_idx(good, ndim=3).tolist() == torch.arange(24).reshape(2, 3, 4).tolist()
    with pytest.raises(ValueError, match="magic"):
        read_idx(good, ndim=1)  # a 3-d file read as labels
    with pytest.raises(ValueError, match="magic"):
        read_idx(_write_gz(tmp_path / "int.gz", bytes([0, 0, 0x0C, 3]) + header[4:] + bytes(96)), ndim=3)
    with pytest.raises(ValueError, match="payload"):
        read_idx(_write_gz(tmp_path / "short.gz", header + bytes(23)), ndim=3)


def test_missing_data_says_how_to_install(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path)
    monkeypatch.setenv(data.FMNIST_ENV_VAR, str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        default_task()


def test_env_var_overrides_default_root(tmp_path, monkeypatch, raw):
    for name in FILES:
        (tmp_path / f"{name}.gz").symlink_to(DEFAULT_FMNIST_DIR / f"{name}.gz")
    monkeypatch.setenv(data.FMNIST_ENV_VAR, str(tmp_path))
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_fashion_mnist()
    (tmp_path / "t10k-labels-idx1-ubyte.gz").symlink_to(DEFAULT_FMNIST_DIR / "t10k-labels-idx1-ubyte.gz")
    assert torch.equal(load_fashion_mnist().test_labels, raw.test_labels)


def test_task_split_sizes_labels_and_classes(task, raw):
    sizes = [len(d) for d in (task.public_train, task.public_test, task.private_train, task.private_test)]
    assert sizes == [30_000, 5_000, 10_000, 5_000]
    assert task.num_classes == 5
    assert task.class_names == ("Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
    assert task.public_class_names[0] == "T-shirt/top"
    for ds in (task.public_train, task.public_test, task.private_train, task.private_test):
        x, y = ds.tensors
        assert x.dtype == torch.float32 and x.shape[1:] == (1, 28, 28)
        assert y.dtype == torch.int64 and set(y.unique().tolist()) == set(range(5))
    # The private test set is exactly the test images of classes 5-9, labels shifted by 5.
    keep = raw.test_labels >= 5
    x, y = task.private_test.tensors
    assert torch.equal(y, raw.test_labels[keep] - 5)
    assert torch.allclose(x * PUBLIC_STD + PUBLIC_MEAN, raw.test_images[keep].unsqueeze(1) / 255.0, atol=1e-6)
    assert torch.equal(task.public_test.tensors[1], raw.test_labels[raw.test_labels < 5])


def test_normalisation_constants_come_from_public_training_data(raw, task):
    public = raw.train_images[raw.train_labels < 5].double() / 255.0
    assert abs(public.mean().item() - PUBLIC_MEAN) < 1e-4
    assert abs(public.std().item() - PUBLIC_STD) < 1e-4
    x = task.public_train.tensors[0].double()
    assert abs(x.mean().item()) < 1e-3 and abs(x.std().item() - 1.0) < 1e-3


def test_private_subsample_is_seeded():
    a, b, c = default_task(500, seed=1), default_task(500, seed=1), default_task(500, seed=2)
    assert torch.equal(a.private_train.tensors[0], b.private_train.tensors[0])
    assert torch.equal(a.private_train.tensors[1], b.private_train.tensors[1])
    assert not torch.equal(a.private_train.tensors[0], c.private_train.tensors[0])
    assert len(default_task(None).private_train) == 30_000
    for bad in (0, 30_001):
        with pytest.raises(ValueError, match="private_train_size"):
            default_task(bad)


def test_default_model_architecture():
    model = default_model()
    assert type(model) is VisionTransformer
    assert model.patch_embed.grid_size == (4, 4) and model.num_prefix_tokens == 1
    assert model.global_pool == "token" and model.embed_dim == 128 and len(model.blocks) == 6
    assert all(type(b) is Block and type(b.attn) is Attention for b in model.blocks)
    assert all(b.attn.qkv.bias is not None for b in model.blocks)
    # No stochastic layers: every Dropout has p == 0 and drop-path is the identity.
    assert all(m.p == 0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    assert all(type(b.drop_path1) is torch.nn.Identity for b in model.blocks)
    assert 1_150_000 < sum(p.numel() for p in model.parameters()) < 1_250_000
    model.eval()
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 5)
    assert default_model(7)(torch.randn(2, 1, 28, 28)).shape == (2, 7)


TINY = dict(img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3)


def test_create_backbone_loads_local_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # any accidental download attempt fails instead of hanging
    torch.manual_seed(0)
    source = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, **TINY)
    ckpt = tmp_path / "tiny.pt"
    torch.save(source.state_dict(), ckpt)
    loaded = create_backbone("vit_tiny_patch16_224", num_classes=3, pretrained=True, checkpoint_file=ckpt, **TINY)
    ref, got = source.state_dict(), loaded.state_dict()
    for key in ref:
        if not key.startswith("head."):
            assert torch.equal(ref[key], got[key]), key
    assert got["head.weight"].shape == (3, 48)
    fresh = create_backbone("vit_tiny_patch16_224", num_classes=3, pretrained=False, **TINY)
    assert not torch.equal(fresh.state_dict()["blocks.0.attn.qkv.weight"], ref["blocks.0.attn.qkv.weight"])
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        create_backbone("vit_tiny_patch16_224", 3, True, tmp_path / "missing.pt", **TINY)
    with pytest.raises(ValueError, match="pretrained"):
        create_backbone("vit_tiny_patch16_224", 3, False, ckpt, **TINY)


def test_model_normalisation():
    rgb = timm.create_model("vit_tiny_patch16_224", pretrained=False, **TINY)
    assert model_normalisation(rgb, 3) == ((0.5,) * 3, (0.5,) * 3)  # timm's cfg for this ViT
    overlay = dict(mean=(0.2, 0.4, 0.6), std=(0.1, 0.2, 0.3))
    grey = timm.create_model("vit_tiny_patch16_224", pretrained=False, in_chans=1, pretrained_cfg_overlay=overlay,
                             **TINY)
    mean, std = model_normalisation(grey, 1)
    assert mean == pytest.approx((0.4,)) and std == pytest.approx((0.2,))
    with pytest.raises(ValueError, match="1-channel"):
        model_normalisation(grey, 3)


@pytest.fixture(scope="module")
def torchvision_root(tmp_path_factory) -> Path:
    """Decompressed copies of the Debian files in torchvision's FashionMNIST layout."""
    root = tmp_path_factory.mktemp("tv")
    raw_dir = root / "FashionMNIST" / "raw"
    raw_dir.mkdir(parents=True)
    for name in FILES:
        with gzip.open(DEFAULT_FMNIST_DIR / f"{name}.gz", "rb") as src, open(raw_dir / name, "wb") as dst:
            shutil.copyfileobj(src, dst)
    return root


def test_torchvision_fashion_mnist_matches_reader(torchvision_root, raw):
    same = load_image_dataset("fashion-mnist", torchvision_root, 28, 1, train=False, download=False,
                              mean=(0.0,), std=(1.0,))
    assert len(same) == 10_000
    for i in (0, 1234, 9999):
        x, y = same[i]
        assert y == int(raw.test_labels[i])
        assert torch.allclose(x, raw.test_images[i].unsqueeze(0) / 255.0)
    rgb = load_image_dataset("fashion-mnist", torchvision_root, 32, 3, train=True, download=False)
    assert len(rgb) == 60_000
    x, y = rgb[5]
    assert x.shape == (3, 32, 32) and y == int(raw.train_labels[5])
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])  # grey replicated to RGB
    assert -1.0 <= float(x.min()) and float(x.max()) <= 1.0  # default 0.5 / 0.5 maps [0, 1] to [-1, 1]


def test_fashion_mnist_falls_back_to_the_debian_files(tmp_path, raw):
    data = load_image_dataset("fashion-mnist", tmp_path, 28, 1, train=False, download=False, mean=(0.0,), std=(1.0,))
    assert len(data) == 10_000
    for i in (0, 4321, 9999):
        x, y = data[i]
        assert y == int(raw.test_labels[i]) and torch.allclose(x, raw.test_images[i].unsqueeze(0) / 255.0)
    assert len(load_image_dataset("fashion-mnist", tmp_path, 32, 3, train=True, download=False)) == 60_000


def test_missing_real_dataset_gives_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv(data.FMNIST_ENV_VAR, str(tmp_path / "no-debian-files"))
    for name in ("cifar10", "cifar100", "fashion-mnist"):
        with pytest.raises(FileNotFoundError, match="--data-root DIR.*--download"):
            load_image_dataset(name, tmp_path, 224, 3, train=True, download=False)
    with pytest.raises(ValueError, match="unknown"):
        load_image_dataset("mnist", tmp_path, 28, 1, train=True, download=False)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="in_chans"):
        load_image_dataset("cifar10", tmp_path, 32, 2, train=True, download=False)
