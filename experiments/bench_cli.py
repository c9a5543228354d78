"""What the command line adds to training: ``dp-taft train`` against the same ``finetune`` call.

``python -m experiments.bench_cli`` writes a practitioner's PNG folders and .safetensors
weights (:mod:`experiments.practitioner`), then in one process and one run

1. runs ``dp-taft train`` on them (in-process: :func:`dp_taft.cli.main`), and
2. runs the very same training configuration through :func:`dp_taft.finetune` on the same
   images already decoded and transformed into tensors (the cost of a user who did all the
   glue by hand, with the prefix cache as the CLI uses it),

and prints both wall times, the time spent decoding the images for (2), and the ratios.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from dp_taft.backbone import BackboneSpec, data_config, eval_transform
from dp_taft.cli import main as dp_taft_main
from dp_taft.cli import parser
from dp_taft.cli.train import training_config
from dp_taft.images import load_images
from dp_taft.recipes import finetune
from experiments.practitioner import CLASSES, MODEL, MODEL_KWARGS, make_workspace


def _decoded(folder: Path, transform, classes=None) -> TensorDataset:
    data = load_images(folder, transform, classes=classes, verify=False)
    xs, ys = zip(*[(x, torch.as_tensor(y)) for x, y in DataLoader(data, batch_size=256)])
    return TensorDataset(torch.cat(xs), torch.cat(ys))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--per-class", type=int, default=400, help="training images per class (5 classes)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier timings on a shared machine)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    root = Path(tempfile.mkdtemp(prefix="dp_taft_bench_cli_"))
    ws = make_workspace(root, train_per_class=a.per_class, eval_per_class=100, manifest_per_class=1)
    argv = ["train", "--data", str(ws.train), "--eval-data", str(ws.eval), *ws.model_args(), "--epsilon", "8",
            "--set", f"optim.epochs={a.epochs}", "--quiet", "--out", str(root / "cli")]
    started = time.perf_counter()
    dp_taft_main(argv)
    cli_s = time.perf_counter() - started

    started = time.perf_counter()
    spec = BackboneSpec(MODEL, len(CLASSES), weights=str(ws.weights), model_kwargs=MODEL_KWARGS)
    backbone = spec.create()
    transform = eval_transform(data_config(backbone))
    train = _decoded(ws.train, transform)
    evals = _decoded(ws.eval, transform, classes=sorted(CLASSES.values()))
    decode_s = time.perf_counter() - started
    # the very configuration the command line trained with (preset, --set, δ = 1/(10 N), cache)
    config = training_config(parser().parse_args([*argv[:-1], str(root / "api")]), root / "api", len(train))
    started = time.perf_counter()
    finetune(backbone, train, config, eval_set=evals)
    fit_s = time.perf_counter() - started
    print(f"{len(train)} training and {len(evals)} eval images, {MODEL} {MODEL_KWARGS['depth']} blocks, "
          f"{a.epochs} epochs, {a.threads} thread(s)")
    print(f"dp-taft train (all of it: checks, decoding, training with the prefix cache, model directory): {cli_s:.1f} s")
    print(f"by hand: backbone + decoding {decode_s:.1f} s, then finetune on tensors {fit_s:.1f} s")
    print(f"ratio CLI / (decode + finetune): {cli_s / (decode_s + fit_s):.2f}; CLI / finetune alone: "
          f"{cli_s / fit_s:.2f}")


if __name__ == "__main__":
    main()
