"""Frozen-prefix cache at scale: peak memory and build time against N, the cost of checking a stored
cache against the data, and what bf16 storage costs in accuracy.

    python -m experiments.bench_cache [--sizes 1000 5000 20000 50000 90000] [--dir DIR] [--depth 0]
    python -m experiments.bench_cache --reuse 256 [--depth 10] [--dir DIR]
    python -m experiments.bench_cache --accuracy quick [--seeds 0 1 2 3 4]

The first form builds the prefix cache of a ViT-S/16-shaped tangent model (224 px images,
patch 16, width 384: 197 tokens × 384 per example) over N synthetic images, each
(N, dtype, store) in a fresh subprocess, so its peak resident memory (VmHWM of
/proc/self/status) is that build's alone. Stores: "auto" (what ``fit`` does by default:
RAM when the cache needs at most half the available memory, else a memory-mapped file in
a temporary directory, here ``--dir``), "disk" (always the file) and "list+cat" (the
former implementation: every batch kept in a list, then concatenated; small N only). The
prefix has ``--depth`` blocks (default 0: patch and position embedding only, so the 2-core
CPU affords 90k images; the output shape, hence the cache, is the full ViT-S/16's, and a
block would only add a constant per batch). Sizes whose cache would not fit on ``--dir``'s
disk are skipped, and said so. Prints a Markdown table.

The second form builds the cache of N such images into a ``cache_dir`` (the prefix computed,
every example hashed as it streams through), then builds it again: the stored cache is
reused after one pass that reads and hashes every example. It prints both times, their
ratio, and the time to read the examples alone (synthetic images cost almost nothing to
produce: with real data, decoding adds the same time to both). ``--depth 10`` is TAFT-2's
prefix on ViT-S/16.

The third form trains TAFT-2 at ε = 3 on a sweep profile's task, once with a float32 and
once with a bfloat16 cache, with the same explicit seed (same noise and batches), and
prints the test accuracies.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import timm
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from dp_taft import fit, methods
from dp_taft.privacy.memory import available_memory
from dp_taft.privacy.prefix_cache import RAM_FRACTION, CacheSpec, build_prefix_cache

IMAGE, PATCH, WIDTH, HEADS = 224, 16, 384, 6
TOKENS = (IMAGE // PATCH) ** 2 + 1
_GIB = 1 << 30


class SyntheticImages(Dataset):
    """``n`` images (3, 224, 224): one of 16 fixed random images plus an index-dependent offset, label i % 10.

    Cheap to produce, so the build's time is the prefix and the store, not the data.
    """

    def __init__(self, n: int) -> None:
        self.n = n
        self.bank = torch.randn(16, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.bank[i % 16] + i * 1e-5, i % 10


def _status_kib(field: str) -> int:
    """A /proc/self/status memory field (VmRSS, VmHWM) in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _model(depth: int) -> torch.nn.Module:
    """TAFT-1 of a random ViT-S/16-shaped ViT of ``depth`` + 1 blocks: its prefix holds ``depth`` blocks."""
    torch.manual_seed(0)
    vit = timm.models.VisionTransformer(img_size=IMAGE, patch_size=PATCH, embed_dim=WIDTH, depth=depth + 1,
                                        num_heads=HEADS, num_classes=10)
    return methods.taft(vit, 1).eval()


def _list_and_cat(model: torch.nn.Module, data: Dataset, batch: int) -> TensorDataset:
    """The former cache: every batch's output in a list, then one torch.cat (the comparison point)."""
    hs, ys = [], []
    with torch.no_grad():
        for x, y in DataLoader(data, batch_size=batch):
            hs.append(model.prefix(x))
            ys.append(y)
    return TensorDataset(torch.cat(hs), torch.cat(ys))


def child(n: int, dtype: str, store: str, depth: int, batch: int, directory: Path) -> dict[str, Any]:
    """Build one cache in this process; its figures (seconds, KiB of resident memory, where it went)."""
    model, data = _model(depth), SyntheticImages(n)
    before = _status_kib("VmRSS")
    start = time.perf_counter()
    if store == "list+cat":
        cache, where = _list_and_cat(model, data, batch), "RAM"
    else:
        spec = CacheSpec(store, directory if store == "disk" else None, getattr(torch, dtype))
        cache = build_prefix_cache(model, data, spec, batch_size=batch, device=torch.device("cpu"), quiet=True,
                                   desc="bench")
        where = "RAM" if cache.path is None else "file"
    seconds = time.perf_counter() - start
    return {"n": n, "dtype": dtype, "store": store, "where": where, "seconds": seconds, "rss_before_kib": before,
            "peak_kib": _status_kib("VmHWM"), "len": len(cache)}


def _measure(n: int, dtype: str, store: str, args: argparse.Namespace) -> dict[str, Any] | None:
    """Runs :func:`child` in a fresh interpreter with a fresh directory under ``--dir`` (removed after)."""
    work = Path(tempfile.mkdtemp(prefix="bench_cache_", dir=args.dir))
    command = [sys.executable, "-m", "experiments.bench_cache", "--child", str(n), dtype, store,
               "--depth", str(args.depth), "--batch", str(args.batch), "--dir", str(work)]
    env = {**os.environ, "TMPDIR": str(work)}  # where "auto" puts a cache that does not fit in RAM
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if done.returncode != 0:
        print(f"N={n} {dtype} {store}: failed ({done.returncode}): {done.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def _row(r: dict[str, Any]) -> str:
    itemsize = torch.finfo(getattr(torch, r["dtype"])).bits // 8
    cache_gib = r["n"] * TOKENS * WIDTH * itemsize / _GIB
    peak, before = r["peak_kib"] / (1 << 20), r["rss_before_kib"] / (1 << 20)
    return (f"| {r['n']:,} | {r['dtype']} | {r['store']} | {r['where']} | {cache_gib:.2f} | {r['seconds']:.0f} | "
            f"{r['n'] / r['seconds']:.0f} | {peak:.2f} | {peak - before:.2f} | {(peak - before) / cache_gib:.2f} |")


def _plan(args: argparse.Namespace) -> list[tuple[int, str, str]]:
    """(N, dtype, store) to measure: every size and dtype with "auto", plus the comparisons."""
    runs = [(n, dtype, "auto") for n in args.sizes for dtype in args.dtypes]
    runs += [(n, "float32", "disk") for n in args.sizes if n <= args.compare_up_to]
    runs += [(n, "float32", "list+cat") for n in args.sizes if n <= args.compare_up_to]
    return sorted(runs, key=lambda r: (r[0], r[2], r[1]))


def benchmark(args: argparse.Namespace) -> None:
    """Measures every planned build and prints the table (sizes that do not fit on disk skipped)."""
    args.dir.mkdir(parents=True, exist_ok=True)
    avail = available_memory()
    print(f"prefix: {TOKENS} tokens x {WIDTH} (ViT-S/16 at {IMAGE} px), {args.depth} block(s) before it; "
          f"batch {args.batch}; torch threads {torch.get_num_threads()}; "
          f"available memory {avail / _GIB if avail else float('nan'):.1f} GiB (auto: RAM up to "
          f"{RAM_FRACTION:.0%} of it); disk {args.dir} ({shutil.disk_usage(args.dir).free / _GIB:.0f} GiB free)",
          flush=True)
    lines = ["| N | dtype | store | went to | cache GiB | build s | images/s | peak RSS GiB | peak − before GiB "
             "| (peak − before) / cache |", "|---:|:---|:---|:---|" + "---:|" * 6]
    for n, dtype, store in _plan(args):
        needed = n * TOKENS * WIDTH * torch.finfo(getattr(torch, dtype)).bits // 8
        free = shutil.disk_usage(args.dir).free
        if store != "list+cat" and needed > free - (1 << 30):
            print(f"N={n:,} {dtype} {store}: skipped, the cache needs {needed / _GIB:.1f} GiB and {args.dir} has "
                  f"{free / _GIB:.1f} GiB free", flush=True)
            continue
        result = _measure(n, dtype, store, args)
        if result is not None:
            lines.append(_row(result))
            print(lines[-1], flush=True)
    print("\n".join(lines))


def _seconds(work: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = work()
    return time.perf_counter() - start, result


def reuse(n: int, depth: int, batch: int, directory: Path, repeats: int = 3) -> None:
    """Times a build into a fresh cache_dir under ``directory``, then ``repeats`` times, interleaved,
    the verified reuse that follows and reading the examples alone (medians, seconds: the machine
    may be shared); prints them as a Markdown table."""
    model, data = _model(depth), SyntheticImages(n)
    work = Path(tempfile.mkdtemp(prefix="bench_reuse_", dir=directory))
    spec = CacheSpec("disk", work / "cache")

    def cache() -> Any:
        return build_prefix_cache(model, data, spec, batch_size=batch, device=torch.device("cpu"), quiet=True,
                                  desc="bench")

    try:
        build, built = _seconds(cache)
        inode = built.path.stat().st_ino  # a rebuild would rename a new file into place
        reuses, reads = [], []
        for _ in range(repeats):
            seconds, reused = _seconds(cache)
            reuses.append(seconds)
            reads.append(_seconds(lambda: [data[i] for i in range(n)])[0])
            if reused.path.stat().st_ino != inode:
                raise RuntimeError("the stored cache was built again, not reused")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    again, read = statistics.median(reuses), statistics.median(reads)
    gb = n * 3 * IMAGE * IMAGE * 4 / 1e9  # the float32 images read and hashed
    print(f"| N | prefix blocks | build s | verified reuse s | reuse / build | read alone s | verified GB/s |\n"
          f"|---:|---:|---:|---:|---:|---:|---:|\n| {n:,} | {depth} | {build:.2f} | {again:.2f} | {again / build:.3f} "
          f"| {read:.2f} | {gb / again:.2f} |")


def accuracy(profile: str, seeds: list[int], epsilon: float) -> None:
    """TAFT-2 at ``epsilon`` on ``profile``'s task with float32 and bfloat16 caches, same seeds."""
    from experiments import sweep, sweep_config
    from experiments.task import build_task

    settings, hparams, _ = sweep_config.load_config(sweep_config.DEFAULT_CONFIG, profile)
    task = build_task(sweep.parse_args(["--profile", profile]), settings)
    hp = dict(hparams["taft"])
    physical = hp.pop("physical_batch_size", 0) or None
    print("| seed | float32 cache | bfloat16 cache | max |Δw_bf16 − Δw_fp32| / max |Δw_fp32| |")
    print("|---:|---:|---:|---:|")
    for seed in seeds:
        accs, deltas = [], []
        for dtype in (None, "bf16"):
            model = methods.taft(task.backbone(seed), 2)
            result = fit(model, task.train, epsilon=epsilon, delta=settings["delta"], eval_set=task.test, seed=seed,
                         accountant=settings["accountant"], physical_batch_size=physical, quiet=True, cache_dtype=dtype,
                         **hp)
            accs.append(100 * result.history[-1].eval_accuracy)
            deltas.append(torch.cat([p.reshape(-1) for p in model.delta_state_dict().values()]))
        change = float((deltas[1] - deltas[0]).abs().max() / deltas[0].abs().max())
        print(f"| {seed} | {accs[0]:.2f} % | {accs[1]:.2f} % | {change:.2e} |", flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 20000, 50000, 90000])
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16", "float16"])
    p.add_argument("--compare-up-to", type=int, default=5000, help="largest N also built as 'disk' and 'list+cat'")
    p.add_argument("--depth", type=int, default=0, help="transformer blocks inside the prefix")
    p.add_argument("--batch", type=int, default=128, help="images per prefix batch")
    p.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()), help="where file caches are written")
    p.add_argument("--reuse", type=int, metavar="N", help="time a build and its verified reuse over N images")
    p.add_argument("--accuracy", metavar="PROFILE", help="compare float32 and bf16 caches on this sweep profile")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epsilon", type=float, default=3.0)
    p.add_argument("--child", nargs=3, metavar=("N", "DTYPE", "STORE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        n, dtype, store = args.child
        print(json.dumps(child(int(n), dtype, store, args.depth, args.batch, args.dir)))
    elif args.reuse:
        args.dir.mkdir(parents=True, exist_ok=True)
        reuse(args.reuse, args.depth, args.batch, args.dir)
    elif args.accuracy:
        accuracy(args.accuracy, args.seeds, args.epsilon)
    else:
        benchmark(args)


if __name__ == "__main__":
    main()
