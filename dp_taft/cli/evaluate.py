"""``dp-taft evaluate``: accuracy, per-class accuracy and a confusion-matrix picture."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .. import model_dir
from ..images import load_images
from ..inference import evaluate_model
from ..plots import confusion_svg
from .options import add_compute, add_weights, check_device, saved_weights

__all__ = ["add_parser", "run"]


def add_parser(sub: Any) -> None:
    p = sub.add_parser("evaluate", help="accuracy of a trained model on labelled images",
                       description="Accuracy, per-class accuracy and confusion matrix of the model in DIR on "
                                   "labelled images (a folder of class sub-folders, or a CSV path,label).")
    p.add_argument("dir", type=Path, metavar="DIR", help="model directory written by dp-taft train/compose")
    p.add_argument("--data", required=True, type=Path, metavar="EVAL", help="labelled images; classes of the model")
    add_weights(p)
    p.add_argument("--report-dir", type=Path, metavar="OUT",
                   help="where evaluation.json and confusion_matrix.svg go (default: DIR)")
    add_compute(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    check_device(args.device)
    trained = model_dir.load(args.dir, weights=saved_weights(args.dir, args.weights))
    data = load_images(args.data, trained.transform(), classes=trained.spec.classes)
    result = evaluate_model(trained.model, data, trained.spec.classes, batch_size=args.batch_size, device=args.device)
    out = args.report_dir or args.dir
    out.mkdir(parents=True, exist_ok=True)
    (out / "evaluation.json").write_text(json.dumps(result.to_dict(), indent=1))
    (out / "confusion_matrix.svg").write_text(confusion_svg(result.matrix, result.classes,
                                                            title=f"{args.data.name}: accuracy "
                                                                  f"{100 * result.accuracy:.1f} %"))
    print(result.table())
    print(f"wrote {out / 'evaluation.json'} and {out / 'confusion_matrix.svg'}")
    return 0
