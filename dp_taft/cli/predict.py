"""``dp-taft predict``: label images with a trained model directory."""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path
from typing import Any

from .. import model_dir
from ..images import ImageFiles, image_files
from ..inference import predict_probabilities
from .options import add_compute, add_weights, check_device, positive_int, saved_weights

__all__ = ["add_parser", "run"]


def add_parser(sub: Any) -> None:
    p = sub.add_parser("predict", help="label images with a trained model",
                       description="Rebuild the model from DIR (base weights checked by fingerprint) and label "
                                   "images; writes path,label,confidence (+ top-k) as CSV.")
    p.add_argument("dir", type=Path, metavar="DIR", help="model directory written by dp-taft train/compose")
    p.add_argument("images", type=Path, nargs="+", metavar="IMAGE_OR_FOLDER",
                   help="image files, or folders searched recursively for images")
    add_weights(p)
    p.add_argument("--output", type=Path, metavar="FILE.csv", help="write the CSV here (default: standard output)")
    p.add_argument("--top-k", type=positive_int, default=1, metavar="K", help="also list the K most likely classes (default 1)")
    add_compute(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    check_device(args.device)
    trained = model_dir.load(args.dir, weights=saved_weights(args.dir, args.weights))
    classes = trained.spec.classes
    if not 1 <= args.top_k <= len(classes):
        raise ValueError(f"--top-k must be in [1, {len(classes)}] (the model's classes), got {args.top_k}")
    files = image_files(args.images)
    probs, _ = predict_probabilities(trained.model, ImageFiles(files, trained.transform()),
                                     batch_size=args.batch_size, device=args.device)
    confidence, index = probs.topk(args.top_k, dim=1)
    header = ["path", "label", "confidence"] + [f"{kind}_{i}" for i in range(2, args.top_k + 1)
                                                for kind in ("label", "confidence")]
    stream = open(args.output, "w", newline="") if args.output else sys.stdout
    try:
        writer = csv.writer(stream)
        writer.writerow(header)
        for f, c, i in zip(files, confidence.tolist(), index.tolist()):
            writer.writerow([str(f), *(v for j, p in zip(i, c) for v in (classes[j], f"{p:.6f}"))])
    finally:
        if args.output:
            stream.close()
    if args.output:
        print(f"labelled {len(files)} images: {args.output}")
    return 0
