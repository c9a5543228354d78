"""A practitioner's files, for the command-line tests and benchmark: PNG folders and a CSV
manifest of Fashion-MNIST images of the private classes 5-9 (Debian's dataset-fashion-mnist),
and a ViT's pretrained weights saved as .safetensors (the shipped backbone, pretrained on the
public classes 0-4), with the timm name and arguments that rebuild it."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
from PIL import Image

from experiments.data import PUBLIC_MEAN, PUBLIC_STD, load_fashion_mnist
from experiments.pretrain import SHIPPED_CHECKPOINT

#: The private classes 5-9, by name (the backbone never saw them).
CLASSES = {5: "sandal", 6: "shirt", 7: "sneaker", 8: "bag", 9: "ankle_boot"}
#: timm's name and arguments for the shipped backbone; its own normalisation and no crop margin.
MODEL_KWARGS = {"img_size": 28, "patch_size": 7, "in_chans": 1, "embed_dim": 128, "depth": 6, "num_heads": 4,
                "pretrained_cfg_overlay": {"input_size": [1, 28, 28], "mean": [PUBLIC_MEAN], "std": [PUBLIC_STD],
                                           "crop_pct": 1.0}}
MODEL = "vit_small_patch16_224"


@dataclass(frozen=True)
class Workspace:
    root: Path
    weights: Path      # the backbone's pretrained weights (.safetensors)
    other_weights: Path  # the same architecture, other weights (fingerprint refusal)
    train: Path        # folder: one sub-folder per class
    eval: Path         # folder, same classes
    manifest: Path     # CSV path,label,id with its images next to it

    def model_args(self, weights: Path | None = None) -> list[str]:
        return ["--model", MODEL, "--weights", str(weights or self.weights), "--model-kwargs", json.dumps(MODEL_KWARGS)]


def _png(path: Path, pixels: torch.Tensor) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.numpy().astype(np.uint8), mode="L").save(path)


def _folder(root: Path, images: torch.Tensor, labels: torch.Tensor, per_class: int) -> None:
    for label, name in CLASSES.items():
        picked = (labels == label).nonzero().flatten()[:per_class]
        for i in picked.tolist():
            _png(root / name / f"{i:05d}.png", images[i])


def _manifest(root: Path, images: torch.Tensor, labels: torch.Tensor, per_class: int) -> Path:
    rows = []
    for label, name in CLASSES.items():
        for i in (labels == label).nonzero().flatten()[-per_class:].tolist():
            _png(root / "img" / f"{i:05d}.png", images[i])
            rows.append((f"img/{i:05d}.png", name, f"person-{i}"))
    path = root / "manifest.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "id"])
        writer.writerows(rows)
    return path


def make_workspace(root: Path, train_per_class: int = 60, eval_per_class: int = 20,
                   manifest_per_class: int = 40) -> Workspace:
    data = load_fashion_mnist()
    state = torch.load(SHIPPED_CHECKPOINT, map_location="cpu", weights_only=True)
    weights = root / "vit_fmnist_public.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, str(weights))
    other = root / "vit_other.safetensors"
    safetensors.torch.save_file({k: (v + 0.01 if k == "blocks.0.mlp.fc1.weight" else v).contiguous()
                                 for k, v in state.items()}, str(other))
    _folder(root / "train", data.train_images, data.train_labels, train_per_class)
    _folder(root / "eval", data.test_images, data.test_labels, eval_per_class)
    manifest = _manifest(root / "csv", data.train_images, data.train_labels, manifest_per_class)
    return Workspace(root, weights, other, root / "train", root / "eval", manifest)


def main() -> None:
    """``python -m experiments.practitioner DIR``: an offline example for the README's commands."""
    import argparse

    p = argparse.ArgumentParser(description="Write an offline example of a practitioner's files into DIR: "
                                            "train/ and eval/ PNG folders, csv/manifest.csv with ids, the "
                                            "pretrained weights (.safetensors), model_kwargs.json and remove.txt.")
    p.add_argument("dir", type=Path)
    p.add_argument("--per-class", type=int, default=600, help="training images per class, in train/ and in csv/")
    a = p.parse_args()
    a.dir.mkdir(parents=True, exist_ok=True)
    ws = make_workspace(a.dir, train_per_class=a.per_class, eval_per_class=100, manifest_per_class=a.per_class)
    (a.dir / "model_kwargs.json").write_text(json.dumps(MODEL_KWARGS))
    with open(ws.manifest) as f:
        ids = [row["id"] for row in csv.DictReader(f)][:2]
    (a.dir / "remove.txt").write_text("".join(f"{i}\n" for i in ids))
    print(f"wrote {a.dir}/: train/ eval/ (folders), csv/manifest.csv, {ws.weights.name}, model_kwargs.json "
          f"(model {MODEL}), remove.txt")


if __name__ == "__main__":
    main()
