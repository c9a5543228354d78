"""Data sets and backbones for the experiments.

Two layers:

* Offline default (no network, ever): Fashion-MNIST read from Debian's
  ``dataset-fashion-mnist`` package, split into a *public* task (classes 0-4,
  used for non-private pretraining) and a *private* task (classes 5-9,
  fine-tuned with DP through a fresh 5-way head), plus the small timm ViT
  architecture pretrained on the public task (see ``experiments.pretrain``).
* Real data sets: torchvision CIFAR-10/100 and Fashion-MNIST resized to a
  timm model's input size (Fashion-MNIST falls back to the Debian files when
  torchvision's are absent; the others need ``--download`` or local files),
  and ``create_backbone``/``model_normalisation``, thin uses of
  :mod:`dp_taft.backbone` (a local weights file instead of timm's download).
"""

from __future__ import annotations

import functools
import gzip
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
from PIL import Image
from timm.models import VisionTransformer
from torch.utils.data import Dataset, TensorDataset

from dp_taft import backbone

__all__ = [
    "DEFAULT_FMNIST_DIR",
    "FMNIST_CLASS_NAMES",
    "FMNIST_ENV_VAR",
    "PUBLIC_CLASSES",
    "PRIVATE_CLASSES",
    "PUBLIC_MEAN",
    "PUBLIC_STD",
    "DefaultTask",
    "FashionMNISTArrays",
    "create_backbone",
    "default_model",
    "default_task",
    "load_fashion_mnist",
    "load_image_dataset",
    "model_normalisation",
    "normalise",
    "private_indices",
    "public_split",
    "read_idx",
    "select_classes",
]

DEFAULT_FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FMNIST_ENV_VAR = "DP_TAFT_FMNIST_DIR"
FMNIST_CLASS_NAMES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
PUBLIC_CLASSES: tuple[int, ...] = (0, 1, 2, 3, 4)
PRIVATE_CLASSES: tuple[int, ...] = (5, 6, 7, 8, 9)

# Mean and std of the pixel values (scaled to [0, 1]) over the 30,000 *public*
# training images (classes 0-4), rounded to 4 decimals. Derived from public
# data only, so normalising the private images leaks nothing about them;
# tests/test_experiments_data.py recomputes them from the files.
PUBLIC_MEAN = 0.3139
PUBLIC_STD = 0.3626

_IDX_FILES = {
    ("train", "images"): "train-images-idx3-ubyte.gz",
    ("train", "labels"): "train-labels-idx1-ubyte.gz",
    ("test", "images"): "t10k-images-idx3-ubyte.gz",
    ("test", "labels"): "t10k-labels-idx1-ubyte.gz",
}
_INSTALL_HINT = (
    "Install Debian's Fashion-MNIST package with `sudo apt-get install dataset-fashion-mnist` "
    f"(files land in {DEFAULT_FMNIST_DIR}), or point the environment variable {FMNIST_ENV_VAR} "
    "at a directory holding train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
    "t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz."
)
# IDX magic number: two zero bytes, a type code (0x08 = unsigned byte), and the
# number of dimensions (3 for images N x rows x cols, 1 for labels N).
_IDX_UBYTE = 0x08


@dataclass(frozen=True)
class FashionMNISTArrays:
    """Raw Fashion-MNIST: images uint8 [N, 28, 28] in 0..255, labels int64 in 0..9."""

    train_images: torch.Tensor  # [60000, 28, 28] uint8
    train_labels: torch.Tensor  # [60000] int64
    test_images: torch.Tensor  # [10000, 28, 28] uint8
    test_labels: torch.Tensor  # [10000] int64


def read_idx(path: str | Path, ndim: int) -> torch.Tensor:
    """Read a (possibly gzipped) IDX file of unsigned bytes with ``ndim`` dimensions.

    Raises ``ValueError`` when the magic number, dimension count or payload size
    does not match, so a truncated or wrong file fails loudly instead of
    yielding garbage tensors.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 + 4 * ndim:
        raise ValueError(f"{path}: too short for an IDX header ({len(raw)} bytes)")
    if raw[0] != 0 or raw[1] != 0 or raw[2] != _IDX_UBYTE or raw[3] != ndim:
        raise ValueError(
            f"{path}: bad IDX magic {raw[:4].hex()}, expected 0000{_IDX_UBYTE:02x}{ndim:02x} "
            f"(unsigned bytes, {ndim} dimensions)"
        )
    shape = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    expected = 1
    for d in shape:
        expected *= d
    if len(raw) - offset != expected:
        raise ValueError(f"{path}: header says shape {shape} ({expected} bytes), payload has {len(raw) - offset}")
    # bytearray makes the buffer writable, which torch.frombuffer wants.
    return torch.frombuffer(bytearray(raw[offset:]), dtype=torch.uint8).reshape(shape)


def _fmnist_root(root: str | Path | None) -> Path:
    if root is not None:
        return Path(root)
    return Path(os.environ.get(FMNIST_ENV_VAR) or DEFAULT_FMNIST_DIR)


def load_fashion_mnist(root: str | Path | None = None) -> FashionMNISTArrays:
    """Load Fashion-MNIST from gzipped IDX files.

    ``root`` defaults to ``$DP_TAFT_FMNIST_DIR`` if set, else
    ``/usr/share/datasets/fashion-mnist`` (Debian's ``dataset-fashion-mnist``).
    Raises ``FileNotFoundError`` explaining how to install the data when a file
    is missing, and ``ValueError`` when a file is malformed or the image and
    label counts disagree. Parsed once per directory and cached, so the
    returned tensors are shared: do not modify them in place.
    """
    base = _fmnist_root(root).resolve()
    missing = [name for name in _IDX_FILES.values() if not (base / name).is_file()]
    if missing:
        raise FileNotFoundError(f"Fashion-MNIST not found in {base} (missing {', '.join(missing)}). {_INSTALL_HINT}")
    return _read_fashion_mnist(base)


@functools.lru_cache(maxsize=2)
def _read_fashion_mnist(base: Path) -> FashionMNISTArrays:
    """Decompress and parse once per directory (about 2 s); callers only read the tensors."""
    parts: dict[str, torch.Tensor] = {}
    for split in ("train", "test"):
        images = read_idx(base / _IDX_FILES[(split, "images")], ndim=3)
        labels = read_idx(base / _IDX_FILES[(split, "labels")], ndim=1).long()
        if images.shape[1:] != (28, 28) or images.shape[0] != labels.shape[0]:
            raise ValueError(f"{base}: {split} images {tuple(images.shape)} vs labels {tuple(labels.shape)}")
        if labels.numel() and int(labels.max()) > 9:
            raise ValueError(f"{base}: {split} labels outside 0..9")
        parts[f"{split}_images"], parts[f"{split}_labels"] = images, labels
    return FashionMNISTArrays(**parts)


@dataclass(frozen=True)
class DefaultTask:
    """The offline public/private split of Fashion-MNIST.

    Every data set yields ``(image, label)`` with image float32 [1, 28, 28]
    normalised as ``(pixel / 255 - PUBLIC_MEAN) / PUBLIC_STD`` and label int64
    in 0..4 (original class minus 0 for public, minus 5 for private).
    """

    public_train: TensorDataset  # 30,000 training images of classes 0-4
    public_test: TensorDataset  # 5,000 test images of classes 0-4
    private_train: TensorDataset  # seeded subsample of the 30,000 training images of classes 5-9
    private_test: TensorDataset  # all 5,000 test images of classes 5-9
    num_classes: int  # 5, for both tasks
    class_names: tuple[str, ...]  # names of the private classes, index = remapped label
    public_class_names: tuple[str, ...]


def normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 28, 28] -> float32 [N, 1, 28, 28] normalised with the public statistics."""
    return ((images.float() / 255.0 - PUBLIC_MEAN) / PUBLIC_STD).unsqueeze(1)


def _subset(images: torch.Tensor, labels: torch.Tensor, classes: Sequence[int]) -> TensorDataset:
    keep = torch.isin(labels, torch.tensor(classes))
    return TensorDataset(normalise(images[keep]), labels[keep] - min(classes))


def public_split(root: str | Path | None = None) -> tuple[TensorDataset, TensorDataset]:
    """(training, test) images of the public classes 0-4 only, as in :class:`DefaultTask`: for
    code that must not hold a private example (pretraining, the tuning proxy)."""
    raw = load_fashion_mnist(root)
    return (_subset(raw.train_images, raw.train_labels, PUBLIC_CLASSES),
            _subset(raw.test_images, raw.test_labels, PUBLIC_CLASSES))


def private_indices(private_train_size: int | None = 10_000, seed: int = 0,
                    root: str | Path | None = None) -> torch.Tensor:
    """Indices (int64, ascending) into the 60,000 Fashion-MNIST training images of the private
    training set of :func:`default_task` with the same arguments.

    ``private_train_size`` in 1..30,000 draws that many of the training images of classes 5-9
    uniformly without replacement with a ``torch.Generator`` seeded by ``seed``; ``None`` keeps
    all 30,000. The draw takes the first ``private_train_size`` of one seeded permutation, so
    for one seed a smaller set is contained in every larger one.
    """
    raw = load_fashion_mnist(root)
    pool = torch.isin(raw.train_labels, torch.tensor(PRIVATE_CLASSES)).nonzero().squeeze(1)
    if private_train_size is None:
        return pool
    if not 1 <= private_train_size <= pool.numel():
        raise ValueError(f"private_train_size must be in 1..{pool.numel()}, got {private_train_size}")
    pick = torch.randperm(pool.numel(), generator=torch.Generator().manual_seed(seed))[:private_train_size]
    return pool[pick.sort().values]


def default_task(private_train_size: int | None = 10_000, seed: int = 0, root: str | Path | None = None) -> DefaultTask:
    """Build the public (classes 0-4) and private (classes 5-9) tasks.

    ``private_train_size`` in 1..30,000 draws that many private training images
    uniformly without replacement with a ``torch.Generator`` seeded by ``seed``
    (kept in file order, so the subset depends only on the seed); ``None``
    keeps all 30,000. ``root`` as in ``load_fashion_mnist``.
    """
    raw = load_fashion_mnist(root)
    private_pool = private_indices(private_train_size, seed, root)
    offset = min(PRIVATE_CLASSES)
    public_train, public_test = public_split(root)
    return DefaultTask(
        public_train=public_train,
        public_test=public_test,
        private_train=TensorDataset(
            normalise(raw.train_images[private_pool]), raw.train_labels[private_pool] - offset
        ),
        private_test=_subset(raw.test_images, raw.test_labels, PRIVATE_CLASSES),
        num_classes=len(PRIVATE_CLASSES),
        class_names=tuple(FMNIST_CLASS_NAMES[c] for c in PRIVATE_CLASSES),
        public_class_names=tuple(FMNIST_CLASS_NAMES[c] for c in PUBLIC_CLASSES),
    )


def select_classes(dataset: TensorDataset, classes: Sequence[int]) -> TensorDataset:
    """The examples of ``dataset`` (image, label) whose label is in ``classes``, relabelled
    by position in ``classes`` (``classes[i]`` becomes i), in data set order."""
    if not classes or len(set(classes)) != len(classes):
        raise ValueError(f"classes must be a non-empty list of distinct labels, got {list(classes)!r}")
    images, labels = dataset.tensors
    keep = torch.isin(labels, torch.tensor(list(classes)))
    if not bool(keep.any()):
        raise ValueError(f"no example has a label in {list(classes)}")
    renumbered = torch.zeros_like(labels)
    for i, c in enumerate(classes):
        renumbered[labels == c] = i
    return TensorDataset(images[keep], renumbered[keep])


def default_model(num_classes: int = 5) -> VisionTransformer:
    """The default backbone: a plain timm ViT for 1x28x28 images, about 1.19M parameters.

    Patch 7 gives a 4x4 grid = 16 patch tokens plus one class token; width
    128, depth 6, 4 heads of 32 dims, MLP ratio 4; classification from the
    class token. All dropout / drop-path rates are 0 so the network is a
    deterministic function (required for the tangent model and for DP-SGD's
    per-sample gradients). Initialisation draws from torch's global RNG.
    """
    return VisionTransformer(
        img_size=28,
        patch_size=7,
        in_chans=1,
        num_classes=num_classes,
        global_pool="token",
        class_token=True,
        embed_dim=128,
        depth=6,
        num_heads=4,
        mlp_ratio=4.0,
        qkv_bias=True,
        drop_rate=0.0,
        pos_drop_rate=0.0,
        patch_drop_rate=0.0,
        proj_drop_rate=0.0,
        attn_drop_rate=0.0,
        drop_path_rate=0.0,
    )


# ----------------------------------------------------------------------------
# Real data sets and timm backbones (need network unless files are local).
# ----------------------------------------------------------------------------

DatasetName = Literal["cifar10", "cifar100", "fashion-mnist"]
_GREYSCALE = {"cifar10": False, "cifar100": False, "fashion-mnist": True}
# Normalisation when none is passed: maps [0, 1] to [-1, 1].
_FALLBACK_MEAN, _FALLBACK_STD = 0.5, 0.5


def model_normalisation(model: torch.nn.Module, in_chans: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel (mean, std) of ``dp_taft.backbone.data_config(model)`` (timm's, for the channels
    the model was built with: a 3-channel statistic averaged for a 1-channel model; ImageNet's
    when the model declares none). ``in_chans`` must be the model's input channels."""
    config = backbone.data_config(model)
    if config["input_size"][0] != in_chans:
        raise ValueError(f"in_chans={in_chans}, but the model takes {config['input_size'][0]}-channel images")
    return config["mean"], config["std"]


class _GreyImages(Dataset):
    """uint8 images [N, H, W] and labels as torchvision's FashionMNIST yields them: (transform(PIL "L" image), int)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Any) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        return self.transform(Image.fromarray(self.images[i].numpy())), int(self.labels[i])


def load_image_dataset(
    name: DatasetName,
    root: str | Path,
    image_size: int,
    in_chans: int,
    train: bool,
    download: bool,
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Dataset:
    """A torchvision data set resized to ``image_size`` x ``image_size`` pixels with ``in_chans`` channels.

    ``in_chans`` must be 1 or 3; grey images are replicated to RGB and RGB
    images converted to grey as needed. Pixels are scaled to [0, 1] and
    normalised with ``mean`` / ``std`` (length ``in_chans``; pass
    ``model_normalisation(model, in_chans)``), default 0.5 / 0.5. Fashion-MNIST
    not under ``root`` (and no ``download``) is read from the Debian files
    (``load_fashion_mnist``), nothing downloaded. Raises ``FileNotFoundError``,
    naming ``--data-root`` and ``--download``, when no copy is found.
    """
    from torchvision import datasets, transforms

    if name not in _GREYSCALE:
        raise ValueError(f"unknown data set {name!r}; choose one of {sorted(_GREYSCALE)}")
    if in_chans not in (1, 3):
        raise ValueError(f"in_chans must be 1 or 3, got {in_chans}")
    mean = tuple(mean) if mean is not None else (_FALLBACK_MEAN,) * in_chans
    std = tuple(std) if std is not None else (_FALLBACK_STD,) * in_chans
    steps: list[Any] = [transforms.Resize(image_size, antialias=True)]
    if _GREYSCALE[name] or in_chans == 1:
        steps.append(transforms.Grayscale(num_output_channels=in_chans))
    steps += [transforms.ToTensor(), transforms.Normalize(mean, std)]
    cls = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100, "fashion-mnist": datasets.FashionMNIST}[name]
    try:
        return cls(root=str(root), train=train, transform=transforms.Compose(steps), download=download)
    except RuntimeError as err:
        if download or "not found" not in str(err).lower():
            raise
        missing = (f"{name} not found under {root} (torchvision layout; torchvision said: {err}). Pass --data-root DIR "
                   "(the folder holding it) or --download (needs network)")
        if name != "fashion-mnist":
            raise FileNotFoundError(missing + ".") from err
        try:
            raw = load_fashion_mnist()
        except FileNotFoundError as no_debian:
            raise FileNotFoundError(f"{missing}; nor are the Debian files there: {no_debian}") from err
    images, labels = (raw.train_images, raw.train_labels) if train else (raw.test_images, raw.test_labels)
    return _GreyImages(images, labels, transforms.Compose(steps))


def create_backbone(
    model_name: str,
    num_classes: int,
    pretrained: bool,
    checkpoint_file: str | Path | None = None,
    **timm_kwargs: Any,
) -> torch.nn.Module:
    """``dp_taft.backbone.create_backbone`` with the sweep's arguments: a ``num_classes``-way
    timm model in eval mode, its weights from ``checkpoint_file`` (a fresh head when its class
    count differs) or, with ``pretrained`` and no file, timm's download (network); extra
    ``timm_kwargs`` (``img_size``, ``in_chans``, ``depth``...) go to ``timm.create_model``."""
    return backbone.create_backbone(model_name, num_classes, weights=checkpoint_file, model_kwargs=timm_kwargs,
                                    pretrained=pretrained)
