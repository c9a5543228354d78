"""Data parallelism on this machine: the DP-SGD epochs of a private TAFT fit, and the per-rank prefix cache.

    python -m experiments.bench_distributed [--n 4000] [--batch 200] [--epochs 2] [--repeats 2]
    python -m experiments.bench_distributed --cache [--n 4000] [--ranks 1 2 4]

Epochs: the same plan (q, σ, T: the privacy report is identical) is trained three ways,
each in fresh processes: one process with 1 thread, one process with 2 threads, and 2 ranks
of 1 thread each under ``torch.distributed.run --standalone --nproc-per-node 2`` (gloo). The
timed part is the DP-SGD epochs (the sum of ``EpochRecord.wall_time_s``), not start-up or
the prefix cache. Prints one JSON line per configuration with the median over repeats and
the speedups relative to 1 process × 2 threads; ratios are measured in this run.

Cache (``--cache``): for each world size in ``--ranks``, that many gloo ranks of 1 thread
each build the TAFT-2 prefix cache of N examples exactly as ``fit`` does (each rank its own
rows); one JSON line per world size gives each rank's rows, bytes, build wall time and CPU
time, and the ratios to the 1-process build. On a machine with fewer cores than ranks the
wall time cannot fall; the CPU seconds per rank (the work each rank does) still show it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import timm
import torch
from torch.utils.data import TensorDataset

_JOB = "DP_TAFT_BENCH_DISTRIBUTED_JOB"
MODEL = dict(img_size=32, patch_size=4, embed_dim=192, depth=6, num_heads=3, num_classes=10)


def _worker(out: Path, n: int, batch: int, epochs: int, threads: int) -> None:
    """One fit; rank 0 (or the only process) writes its epoch time in seconds to ``out``."""
    import dp_taft

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g))
    torch.manual_seed(0)
    model = dp_taft.linearize(timm.models.VisionTransformer(**MODEL), blocks=2)
    result = dp_taft.fit(model, data, epsilon=3.0, delta=1e-5, epochs=epochs, batch_size=batch, lr=0.5, quiet=True)
    if int(os.environ.get("RANK", "0")) == 0:
        out.write_text(json.dumps({"seconds": sum(r.wall_time_s for r in result.history),
                                   "epsilon": result.report.epsilon, "steps": result.steps}))


def _cache_worker(out: Path, n: int) -> None:
    """Build this rank's part of the prefix cache as fit does; write its size and times to ``out/rank<r>.json``."""
    import dp_taft
    from dp_taft.privacy.data import cache_prefix
    from dp_taft.privacy.distributed import current

    torch.set_num_threads(1)
    comm = current(torch.device("cpu"), None)
    data = TensorDataset(torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.zeros(n).long())
    torch.manual_seed(0)
    model = dp_taft.linearize(timm.models.VisionTransformer(**MODEL), blocks=2).eval()
    comm.gather(None)  # start together: concurrent builds, as in a real run
    wall, cpu = time.perf_counter(), time.process_time()
    cache = cache_prefix(model, data, batch_size=256, device=torch.device("cpu"), quiet=True, desc="train", comm=comm)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    (out / f"rank{comm.rank}.json").write_text(json.dumps({"rows": len(cache), "bytes": cache.nbytes,
                                                           "wall_s": wall, "cpu_s": cpu}))


def _cache_table(args: argparse.Namespace) -> None:
    rows = []
    for world in args.ranks:
        with tempfile.TemporaryDirectory() as tmp:
            job = {"kind": "cache", "out": tmp, "n": args.n}
            env = {**os.environ, "OMP_NUM_THREADS": "1", _JOB: json.dumps(job)}
            launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world)]
            subprocess.run([*launcher, __file__], check=True, env=env, capture_output=True)
            ranks = [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(world)]
        rows.append((world, ranks))
    base = rows[0][1][0]
    for world, ranks in rows:
        top = max(ranks, key=lambda r: r["bytes"])
        print(json.dumps({"world": world, "rows_per_rank": [r["rows"] for r in ranks],
                          "mib_per_rank": [round(r["bytes"] / 2**20, 1) for r in ranks],
                          "build_wall_s": [round(r["wall_s"], 2) for r in ranks],
                          "build_cpu_s": [round(r["cpu_s"], 2) for r in ranks],
                          "bytes_vs_1": round(top["bytes"] / base["bytes"], 3),
                          "cpu_vs_1": round(max(r["cpu_s"] for r in ranks) / base["cpu_s"], 3),
                          "n": args.n, "model": "ViT img 32/patch 4/dim 192/depth 6, TAFT-2 prefix (4 blocks)"}))


def _time(config: str, args: argparse.Namespace, out: Path) -> dict:
    threads = {"1 process x 1 thread": 1, "1 process x 2 threads": 2, "2 processes x 1 thread": 1}[config]
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
                if config.startswith("2") else [sys.executable])
    # The worker's settings travel in the environment: torchrun's own parser would claim
    # abbreviated options (e.g. --n for --nnodes) placed after the script.
    job = {"out": str(out), "n": args.n, "batch": args.batch, "epochs": args.epochs, "threads": threads}
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), _JOB: json.dumps(job)}
    subprocess.run([*launcher, __file__], check=True, env=env, capture_output=True)
    return json.loads(out.read_text())


def main() -> None:
    if _JOB in os.environ:
        job = json.loads(os.environ[_JOB])
        if job.get("kind") == "cache":
            return _cache_worker(Path(job["out"]), job["n"])
        return _worker(Path(job["out"]), job["n"], job["batch"], job["epochs"], job["threads"])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=4000, help="synthetic training examples")
    p.add_argument("--batch", type=int, default=200, help="expected Poisson batch size")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2, help="runs per configuration, interleaved; median reported")
    p.add_argument("--cache", action="store_true", help="measure the per-rank prefix cache instead of the epochs")
    p.add_argument("--ranks", nargs="+", type=int, default=[1, 2, 4], help="--cache: world sizes, the first the base")
    args = p.parse_args()
    if args.cache:
        return _cache_table(args)
    configs = ("1 process x 1 thread", "1 process x 2 threads", "2 processes x 1 thread")
    seconds: dict[str, list[float]] = {c: [] for c in configs}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            for c in configs:
                result = _time(c, args, Path(tmp) / "time.json")
                seconds[c].append(result["seconds"])
    base = statistics.median(seconds["1 process x 2 threads"])
    for c in configs:
        median = statistics.median(seconds[c])
        print(json.dumps({"config": c, "median_epoch_seconds": round(median, 2), "runs": seconds[c],
                          "speedup_vs_1x2": round(base / median, 2), "n": args.n, "batch": args.batch,
                          "epochs": args.epochs, "model": "ViT img 32/patch 4/dim 192/depth 6, TAFT-2"}))


if __name__ == "__main__":
    main()
