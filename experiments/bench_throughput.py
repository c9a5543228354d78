"""End-to-end DP training throughput: dp_taft's TAFT-k and NLFT-k against plain Opacus on the non-linear model.

    python -m experiments.bench_throughput --device cuda [--model vit_small_patch16_224] [--batch 256] [--steps 20]

Each method trains privately (ε = 3, δ = 1e-5, C = 1, one epoch of ``--steps`` Poisson
batches of expected size ``--batch``) on synthetic images in its own process, so peak
memory is that method's alone:

* ``taft``: ``dp_taft.fit(dp_taft.linearize(vit, k), ...)`` (frozen prefix cached first);
* ``nlft``: ``dp_taft.fit(dp_taft.methods.nlft(vit, k), ...)`` (same cache);
* ``opacus``: Opacus' ``PrivacyEngine.make_private`` on the timm model with its last k
  blocks, final norm and head trainable, every step running the whole network (hooks mode).

Prints one JSON line per method: training images/s (expected images per step × steps /
seconds of the DP-SGD loop), seconds of set-up outside the loop (data checks, σ
calibration, the prefix cache; dp_taft only), peak memory (``torch.cuda.max_memory_allocated``
on CUDA, the process's peak RSS on CPU), and the ratios to ``nlft`` measured in this run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import timm
import torch
from torch.utils.data import DataLoader, TensorDataset

METHODS = ("taft", "nlft", "opacus")
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
                         device=job["device"], quiet=True, physical_batch_size=job["physical"])
    loop = sum(r.wall_time_s for r in result.history)
    return {"train_seconds": loop, "setup_seconds": time.perf_counter() - started - loop, "steps": result.steps}


def _opacus(vit: torch.nn.Module, data: TensorDataset, job: dict) -> dict:
    from opacus import PrivacyEngine
    from opacus.utils.batch_memory_manager import BatchMemoryManager

    device = torch.device(job["device"])
    vit.requires_grad_(False)
    for part in (*vit.blocks[-job["k"]:], vit.norm, vit.head):
        part.requires_grad_(True)
    vit.to(device).train()
    params = [p for p in vit.parameters() if p.requires_grad]
    loader = DataLoader(data, batch_size=job["batch"])
    engine = PrivacyEngine(accountant="prv")
    model, optimizer, loader = engine.make_private_with_epsilon(
        module=vit, optimizer=torch.optim.SGD(params, lr=0.5, momentum=0.9), data_loader=loader, target_epsilon=3.0,
        target_delta=1e-5, epochs=1, max_grad_norm=1.0, poisson_sampling=True)
    criterion = torch.nn.CrossEntropyLoss()
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
    out = _opacus(vit, data, job) if job["method"] == "opacus" else _dp_taft(job["method"], vit, data, job)
    out["images_per_s"] = job["batch"] * out["steps"] / out["train_seconds"]
    out["peak_memory_gib"] = _peak_memory(device)
    print(json.dumps(out), flush=True)


def main() -> None:
    if _JOB in os.environ:
        return _child(json.loads(os.environ[_JOB]))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default="vit_small_patch16_224", help="timm model name")
    p.add_argument("--timm-kwargs", default="{}", help="JSON of extra timm.create_model arguments")
    p.add_argument("--k", type=int, default=2, help="blocks fine-tuned (TAFT-k, NLFT-k)")
    p.add_argument("--batch", type=int, default=256, help="expected Poisson batch size")
    p.add_argument("--physical", type=int, default=0, help="physical batch size (0 = the logical batch)")
    p.add_argument("--steps", type=int, default=20, help="DP-SGD steps (one epoch)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    args = p.parse_args()
    results = {}
    for method in args.methods:
        job = {"method": method, "device": args.device, "model": args.model, "k": args.k, "batch": args.batch,
               "physical": args.physical or None, "steps": args.steps, "timm_kwargs": json.loads(args.timm_kwargs)}
        run = subprocess.run([sys.executable, "-m", "experiments.bench_throughput"], capture_output=True, text=True,
                             env={**os.environ, _JOB: json.dumps(job)})
        if run.returncode != 0:
            print(json.dumps({"method": method, "error": run.stderr[-2000:]}), flush=True)
            continue
        results[method] = json.loads(run.stdout.strip().splitlines()[-1])
    base = results.get("nlft")
    for method, r in results.items():
        ratios = {} if base is None else {
            "throughput_vs_nlft": round(r["images_per_s"] / base["images_per_s"], 3),
            "memory_vs_nlft": round(r["peak_memory_gib"] / base["peak_memory_gib"], 3)}
        print(json.dumps({"method": method, "model": args.model, "device": args.device, "batch": args.batch,
                          **{k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}, **ratios}),
              flush=True)


if __name__ == "__main__":
    main()
