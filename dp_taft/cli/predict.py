"""``dp-taft predict``: label images with a trained model directory."""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path
from typing import Any

import torch

from .. import model_dir
from ..images import image_files, read_image

__all__ = ["add_parser", "run"]


def add_parser(sub: Any) -> None:
    p = sub.add_parser("predict", help="label images with a trained model",
                       description="Rebuild the model from DIR (base weights checked by fingerprint) and label "
                                   "images; writes path,label,confidence (+ top-k) as CSV.")
    p.add_argument("dir", type=Path, metavar="DIR", help="model directory written by dp-taft train/compose")
    p.add_argument("images", type=Path, nargs="+", metavar="IMAGE_OR_FOLDER",
                   help="image files, or folders searched recursively for images")
    p.add_argument("--weights", type=Path, metavar="FILE",
                   help="the pretrained weights the model was trained from, if not at the path it records")
    p.add_argument("--output", type=Path, metavar="FILE.csv", help="write the CSV here (default: standard output)")
    p.add_argument("--top-k", type=int, default=1, metavar="K", help="also list the K most likely classes (default 1)")
    p.add_argument("--batch-size", type=int, default=64, metavar="B", help="images per forward pass (memory only)")
    p.add_argument("--device", default="cpu", metavar="DEV", help="cpu (default), cuda, ...")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    trained = model_dir.load(args.dir, weights=args.weights)
    classes = trained.spec.classes
    if not 1 <= args.top_k <= len(classes):
        raise ValueError(f"--top-k must be in [1, {len(classes)}] (the model's classes), got {args.top_k}")
    files = image_files(args.images)
    transform = trained.transform()
    model = trained.model.eval().to(args.device)
    header = ["path", "label", "confidence"] + [f"{kind}_{i}" for i in range(2, args.top_k + 1)
                                                for kind in ("label", "confidence")]
    stream = open(args.output, "w", newline="") if args.output else sys.stdout
    try:
        writer = csv.writer(stream)
        writer.writerow(header)
        for start in range(0, len(files), args.batch_size):
            batch = files[start:start + args.batch_size]
            x = torch.stack([transform(read_image(f)) for f in batch]).to(args.device)
            with torch.no_grad():
                conf, idx = model(x).softmax(dim=1).topk(args.top_k, dim=1)
            for f, c, i in zip(batch, conf.tolist(), idx.tolist()):
                writer.writerow([str(f)] + [v for pair in zip((classes[j] for j in i), (f"{p:.6f}" for p in c))
                                            for v in pair])
    finally:
        if args.output:
            stream.close()
    if args.output:
        print(f"labelled {len(files)} images: {args.output}")
    return 0
