"""End-to-end DP training throughput and memory: dp_taft's TAFT-k and NLFT-k against plain Opacus.

    python -m experiments.bench_throughput --device cuda          # the GPU table of the README
    python -m experiments.bench_throughput --device cpu --models vit_tiny_patch16_224 --timm-kwargs '{"img_size": 64}' \
        --batch 32 --steps 3 --ks 1                               # a quick run on a CPU

For every model of ``--models`` and k of ``--ks``, each method trains privately (ε = 3,
δ = 1e-5, C = 1, one epoch of ``--steps`` Poisson batches of expected size ``--batch``) on
synthetic images in its own process, so peak memory is that configuration's alone:

* ``taft``: ``dp_taft.fit(dp_taft.linearize(vit, k), ...)`` (frozen prefix cached first),
  in each precision of ``--precisions`` (fp32; bf16: ``fit(precision="bf16")``);
* ``nlft``: ``dp_taft.fit(dp_taft.methods.nlft(vit, k), ...)`` (same cache), likewise;
* ``opacus-hooks`` / ``opacus-ghost``: Opacus' ``PrivacyEngine`` on the timm model with its
  last k blocks, final norm and head trainable, every step running the whole network, fp32.

Prints one JSON line per configuration: training images/s (expected images per step ×
steps / seconds of the DP-SGD loop), seconds of set-up outside the loop (data checks, σ
calibration, the prefix cache; dp_taft only), peak memory (``torch.cuda.max_memory_allocated``
on CUDA, the process's peak RSS on CPU), and the ratios to fp32 NLFT-k (images/s, memory)
measured in this run; then the same as one markdown table, with the date and device.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

import timm
import torch
from torch.utils.data import DataLoader, TensorDataset

METHODS = ("taft", "nlft", "opacus-hooks", "opacus-ghost")
PRECISIONS = ("fp32", "bf16")
_JOB = "DP_TAFT_BENCH_THROUGHPUT_JOB"


def _data(model: torch.nn.Module, n: int) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    size = model.patch_embed.img_size
    return TensorDataset(torch.randn(n, 3, *size, generator=g), torch.randint(0, model.num_classes, (n,), generator=g))


def _peak_memory(device: torch.device) -> float:
    """GiB: CUDA allocator peak, or this process's peak resident set (VmHWM) on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))
    return kib / 2**20


def _dp_taft(method: str, vit: torch.nn.Module, data: TensorDataset, job: dict) -> dict:
    import dp_taft

    model = dp_taft.linearize(vit, job["k"]) if method == "taft" else dp_taft.methods.nlft(vit, job["k"])
    started = time.perf_counter()
    result = dp_taft.fit(model, data, epsilon=3.0, delta=1e-5, epochs=1, batch_size=job["batch"], lr=0.5,
                         device=job["device"], quiet=True, physical_batch_size=job["physical"],
                         precision=job["precision"])
    loop = sum(r.wall_time_s for r in result.history)
    return {"train_seconds": loop, "setup_seconds": time.perf_counter() - started - loop, "steps": result.steps}


def _opacus(vit: torch.nn.Module, data: TensorDataset, job: dict) -> dict:
    from opacus import PrivacyEngine
    from opacus.utils.batch_memory_manager import BatchMemoryManager

    device, mode = torch.device(job["device"]), job["method"].removeprefix("opacus-")
    vit.requires_grad_(False)
    for part in (*vit.blocks[-job["k"]:], vit.norm, vit.head):
        part.requires_grad_(True)
    vit.to(device).train()
    params = [p for p in vit.parameters() if p.requires_grad]
    criterion = torch.nn.CrossEntropyLoss()
    private = PrivacyEngine(accountant="prv").make_private_with_epsilon(
        module=vit, optimizer=torch.optim.SGD(params, lr=0.5, momentum=0.9),
        data_loader=DataLoader(data, batch_size=job["batch"]), target_epsilon=3.0, target_delta=1e-5, epochs=1,
        max_grad_norm=1.0, poisson_sampling=True, grad_sample_mode=mode,
        **({"criterion": criterion} if mode == "ghost" else {}))
    model, optimizer, loader = private[:2] + private[-1:]
    criterion = private[2] if mode == "ghost" else criterion  # ghost: a loss that runs the second backward
    started = time.perf_counter()
    with BatchMemoryManager(data_loader=loader, max_physical_batch_size=job["physical"] or job["batch"],
                            optimizer=optimizer) as batches:
        for x, y in batches:
            criterion(model(x.to(device)), y.to(device)).backward()
            optimizer.step()
            optimizer.zero_grad()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return {"train_seconds": time.perf_counter() - started, "setup_seconds": 0.0, "steps": len(loader)}


def _child(job: dict) -> None:
    device = torch.device(job["device"])
    torch.manual_seed(0)
    vit = timm.create_model(job["model"], pretrained=False, num_classes=10, **job["timm_kwargs"])
    if job["model"].startswith("vit") and hasattr(vit, "set_fused_attn"):
        vit.set_fused_attn(False)  # the tangent model has no fused attention; keep the comparison like for like
    data = _data(vit, job["batch"] * job["steps"])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    out = _opacus(vit, data, job) if job["method"].startswith("opacus") else _dp_taft(job["method"], vit, data, job)
    out["images_per_s"] = job["batch"] * out["steps"] / out["train_seconds"]
    out["peak_memory_gib"] = _peak_memory(device)
    print(json.dumps(out), flush=True)


def _jobs(args: argparse.Namespace) -> list[dict]:
    """One job per (model, k, method, precision); Opacus runs in fp32 only."""
    return [{"method": method, "precision": precision, "device": args.device, "model": model, "k": k,
             "batch": args.batch, "physical": args.physical or None, "steps": args.steps,
             "timm_kwargs": json.loads(args.timm_kwargs)}
            for model in args.models for k in args.ks for method in args.methods
            for precision in (("fp32",) if method.startswith("opacus") else args.precisions)]


def _run(job: dict) -> dict:
    run = subprocess.run([sys.executable, "-m", "experiments.bench_throughput"], capture_output=True, text=True,
                         env={**os.environ, _JOB: json.dumps(job)})
    if run.returncode != 0:
        return {"error": run.stderr.strip().splitlines()[-1][-300:] if run.stderr.strip() else f"exit {run.returncode}"}
    return json.loads(run.stdout.strip().splitlines()[-1])


def _table(rows: list[dict], device: str) -> str:
    name = torch.cuda.get_device_name() if device.startswith("cuda") and torch.cuda.is_available() else device
    lines = [f"{datetime.date.today()}, {name}, torch {torch.__version__}", "",
             "| model | k | method | precision | images/s | peak GiB | images/s vs NLFT fp32 | memory vs NLFT fp32 |",
             "|:---|---:|:---|:---|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['k']} | {r['method']} | {r['precision']} | failed: {r['error']} ||||")
        else:
            lines.append(f"| {r['model']} | {r['k']} | {r['method']} | {r['precision']} | {r['images_per_s']:.1f} | "
                         f"{r['peak_memory_gib']:.2f} | {r.get('throughput_vs_nlft', '—')} | {r.get('memory_vs_nlft', '—')} |")
    return "\n".join(lines)


def main() -> None:
    if _JOB in os.environ:
        return _child(json.loads(os.environ[_JOB]))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", nargs="+", default=["vit_small_patch16_224", "vit_base_patch16_224"],
                   help="timm model names")
    p.add_argument("--timm-kwargs", default="{}", help="JSON of extra timm.create_model arguments")
    p.add_argument("--ks", nargs="+", type=int, default=[1, 2], help="blocks fine-tuned (TAFT-k, NLFT-k)")
    p.add_argument("--batch", type=int, default=256, help="expected Poisson batch size")
    p.add_argument("--physical", type=int, default=0, help="physical batch size (0 = the logical batch)")
    p.add_argument("--steps", type=int, default=20, help="DP-SGD steps (one epoch)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS),
                   help="precisions of the dp_taft methods")
    args = p.parse_args()
    rows = []
    for job in _jobs(args):  # each line as it ends: a run cut short keeps what it measured
        rows.append({**{k: job[k] for k in ("model", "k", "method", "precision", "device", "batch")}, **_run(job)})
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in rows[-1].items()}), flush=True)
    for r in rows:
        base = next((b for b in rows if (b["model"], b["k"], b["method"], b["precision"]) ==
                     (r["model"], r["k"], "nlft", "fp32") and "error" not in b), None)
        if base is not None and "error" not in r:
            r["throughput_vs_nlft"] = round(r["images_per_s"] / base["images_per_s"], 3)
            r["memory_vs_nlft"] = round(r["peak_memory_gib"] / base["peak_memory_gib"], 3)
    print(_table(rows, args.device))


if __name__ == "__main__":
    main()
