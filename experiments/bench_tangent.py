"""Cost of the tangent model relative to non-linear fine-tuning and to the generic torch.func route.

Prints one JSON line per figure; every figure is a ratio measured in this run (steps
interleaved, median of paired ratios after warm-up), never an absolute time:

1. ``forward``: tangent forward / non-linear forward of the same k blocks and head;
2. ``dp_step_vs_nlft``: Opacus DP step (hooks) on TAFT-k / on NLFT-k (target <= 1.5);
3. ``dp_step_vs_functorch``: TAFT-k DP step / a torch.func step (jvp-linearized model,
   vmap(grad) per-sample gradients, same clipping and noise) (aim <= 1.0);
4. ``peak_memory_ghost_vs_hooks``: peak memory of one DP step in ghost mode / hooks mode,
   batch 256, small ViT (target <= 0.6); each mode in its own process.

All steps start from cached prefix tokens, as training with the frozen-prefix cache does.

    python -m experiments.bench_tangent [--device cuda] [--models small vit_s16] [--pairs 20]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from functools import partial

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from opacus import PrivacyEngine
from torch.func import functional_call, grad, jvp, vmap

import dp_taft
from dp_taft import methods
from dp_taft.privacy.data import FromPrefix

K = 2
MODELS: dict[str, tuple[dict, int]] = {
    # name -> (timm VisionTransformer kwargs, batch size)
    "small": (dict(img_size=32, patch_size=4, embed_dim=192, depth=6, num_heads=3, num_classes=10), 64),
    "vit_s16": (dict(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6, num_classes=10), 8),
    "vit_b16": (dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, num_classes=10), 32),
}
NOISE, CLIP = 1.0, 1.0


def build(name: str, device: str, batch: int | None = None) -> tuple[nn.Module, nn.Module, torch.Tensor, torch.Tensor]:
    """(TAFT-k model, NLFT-k model, prefix tokens, labels) for a random-init ViT."""
    kwargs, default_batch = MODELS[name]
    batch = batch or default_batch
    torch.manual_seed(0)
    model = timm.models.VisionTransformer(**kwargs).to(device).eval()
    tangent = dp_taft.linearize(model, blocks=K).train()
    nonlinear = methods.nlft(model, K).train()
    x = torch.randn(batch, 3, kwargs["img_size"], kwargs["img_size"], device=device)
    y = torch.randint(0, kwargs["num_classes"], (batch,), device=device)
    return tangent, nonlinear, tangent.prefix(x), y


def opacus_step(model: nn.Module, h: torch.Tensor, y: torch.Tensor, mode: str = "hooks") -> Callable[[], None]:
    """A closure running one full Opacus DP-SGD step (forward, backward, clip, noise, update)."""
    view = FromPrefix(model)
    params = [p for p in view.parameters() if p.requires_grad]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(h, y), batch_size=len(h))
    criterion = nn.CrossEntropyLoss()
    wrapped = PrivacyEngine().make_private(
        module=view, optimizer=torch.optim.SGD(params, lr=0.01), data_loader=loader,
        noise_multiplier=NOISE, max_grad_norm=CLIP, poisson_sampling=False,
        grad_sample_mode=mode, criterion=criterion,
    )
    private, opt = wrapped[0], wrapped[1]
    loss_fn = wrapped[2] if mode == "ghost" else criterion

    # As fit does: in hooks mode the tangent's ΔW layers skip the summed gradient.
    skip = nullcontext if mode == "ghost" else partial(dp_taft.tangent.per_sample_gradients_only, model)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with skip():
            loss_fn(private(h), y).backward()
        opt.step()

    return step


def functorch_step(nonlinear: nn.Module, h: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    """The generic route: f_lin by torch.func.jvp of the non-linear suffix, per-sample
    gradients by vmap(grad), then the same clipping, noise and SGD update."""
    view = FromPrefix(nonlinear)
    for module in view.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False  # SDPA has no forward-mode rule
    w0 = {n: p.detach() for n, p in view.named_parameters() if p.requires_grad}
    delta = {n: torch.zeros_like(p) for n, p in w0.items()}

    def loss_one(d: dict, h1: torch.Tensor, y1: torch.Tensor) -> torch.Tensor:
        out, jd = jvp(lambda w: functional_call(view, w, (h1[None],)), (w0,), (d,))
        return F.cross_entropy(out + jd, y1[None])

    per_sample = vmap(grad(loss_one), in_dims=(None, 0, 0))

    def step() -> None:
        grads = per_sample(delta, h, y)
        norms = torch.stack([g.flatten(1).norm(dim=1) for g in grads.values()]).norm(dim=0)
        scale = (CLIP / (norms + 1e-6)).clamp(max=1.0)
        for n, g in grads.items():
            summed = torch.einsum("b,b...->...", scale, g)
            noisy = summed + NOISE * CLIP * torch.randn_like(summed)
            delta[n].sub_(0.01 * noisy / len(h))

    return step


def paired_ratio(a: Callable[[], None], b: Callable[[], None], pairs: int, warmup: int, sync: Callable[[], None]) -> float:
    """Median over interleaved pairs of time(a)/time(b)."""
    ratios = []
    for i in range(warmup + pairs):
        times = []
        for fn in (a, b):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - start)
        if i >= warmup:
            ratios.append(times[0] / times[1])
    return statistics.median(ratios)


def timing_figures(name: str, device: str, pairs: int, warmup: int) -> None:
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    tangent, nonlinear, h, y = build(name, device)
    common = dict(model=name, k=K, batch=len(h), device=device, pairs=pairs)

    def fwd(m: nn.Module) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                m.forward_from_prefix(h)
        return run

    emit("forward", paired_ratio(fwd(tangent), fwd(nonlinear), pairs, warmup, sync), **common)
    taft_step = opacus_step(tangent, h, y)
    nlft_step = opacus_step(nonlinear, h, y)
    emit("dp_step_vs_nlft", paired_ratio(taft_step, nlft_step, pairs, warmup, sync), target="<= 1.5", **common)
    reference = functorch_step(build(name, device, len(h))[1], h, y)
    emit("dp_step_vs_functorch", paired_ratio(taft_step, reference, pairs, warmup, sync), target="<= 1.0", **common)


def memory_child(mode: str, device: str, batch: int) -> None:
    """Run in a fresh process: peak memory added by one DP step (bytes) on the small ViT."""
    tangent, _, h, y = build("small", device, batch)
    step = opacus_step(tangent, h, y, mode)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        base = _rss_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the high-water mark VmHWM to the current RSS
        step()
        peak = (_rss_kib("VmHWM") - base) * 1024
    print(peak)


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_figure(device: str, batch: int) -> None:
    peaks = {}
    for mode in ("hooks", "ghost"):
        out = subprocess.run(
            [sys.executable, "-m", "experiments.bench_tangent", "--memory-child", mode, "--device", device,
             "--memory-batch", str(batch)],
            check=True, capture_output=True, text=True,
        )
        peaks[mode] = int(out.stdout.strip().splitlines()[-1])
    emit("peak_memory_ghost_vs_hooks", peaks["ghost"] / peaks["hooks"], target="<= 0.6", model="small", k=K,
         batch=batch, device=device, hooks_bytes=peaks["hooks"], ghost_bytes=peaks["ghost"])


def emit(figure: str, ratio: float, **fields) -> None:
    print(json.dumps({"figure": figure, "ratio": round(ratio, 4), **fields}), flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", nargs="+", default=["small", "vit_s16"], choices=sorted(MODELS))
    parser.add_argument("--pairs", type=int, default=20, help="paired measurements per figure (>= 20)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--memory-batch", type=int, default=256)
    parser.add_argument("--memory-child", choices=["hooks", "ghost"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        memory_child(args.memory_child, args.device, args.memory_batch)
        return
    for name in args.models:
        timing_figures(name, args.device, args.pairs, args.warmup)
    memory_figure(args.device, args.memory_batch)


if __name__ == "__main__":
    main()
