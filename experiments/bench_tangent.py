"""Cost of the tangent model relative to non-linear fine-tuning and to the generic torch.func route.

Prints one JSON line per figure; every figure is a ratio measured in this run (steps
interleaved, median of paired ratios after warm-up), never an absolute time:

1. ``forward``: tangent forward / non-linear forward of the same k blocks and head;
2. ``dp_step_vs_nlft``: Opacus DP step (hooks) on TAFT-k / on NLFT-k (target <= 1.5);
3. ``dp_step_vs_functorch``: TAFT-k DP step / a torch.func step (jvp-linearized model,
   vmap(grad) per-sample gradients, same clipping and noise) (aim <= 1.0);
4. ``bk_step_vs_nonprivate``: TAFT-k DP step with book-keeping clipping
   (:mod:`dp_taft.privacy.bookkeeping`, Opacus' DPOptimizerFastGradientClipping adding the
   noise) / a non-private TAFT-k step (plain autograd and SGD) (target <= 1.15);
5. ``bk_step_vs_nlft_hooks``: the same bk step / Opacus DP step of NLFT-k in hooks mode
   (target <= 1.2);
6. peak memory of one step, batch 256 (``--memory-batch``), each mode in its own process:
   ``peak_memory_ghost_vs_hooks`` (target <= 0.6), ``peak_memory_bk_vs_nonprivate``
   (target <= 1.15) and ``peak_memory_bk_vs_hooks`` (target <= 0.5), on ``--memory-model``.

All steps start from cached prefix tokens, as training with the frozen-prefix cache does.

    python -m experiments.bench_tangent [--device cuda] [--models small vit_s16] [--pairs 20]
    python -m experiments.bench_tangent --figures bk memory            # the book-keeping figures only
    python -m experiments.bench_tangent --device cuda --model vit_base_patch16_224 --batch 64 \
        --memory-model vit_base_patch16_224 --memory-batch 256
"""

from __future__ import annotations

import argparse
import json
import os
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
from opacus.optimizers import get_optimizer_class
from torch.func import functional_call, grad, jvp, vmap
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import dp_taft
from dp_taft import methods
from dp_taft.privacy.bookkeeping import make_bk_module
from dp_taft.privacy.randomness import NoiseStream, noise_optimizer_class, secret_seed
from dp_taft.privacy.data import FromPrefix

K = 2
MODELS: dict[str, tuple[dict, int]] = {
    # name -> (timm VisionTransformer kwargs, batch size)
    "small": (dict(img_size=32, patch_size=4, embed_dim=192, depth=6, num_heads=3, num_classes=10), 64),
    "vit_s16": (dict(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6, num_classes=10), 8),
    "vit_b16": (dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, num_classes=10), 32),
}
ALIASES = {"vit_small_patch16_224": "vit_s16", "vit_base_patch16_224": "vit_b16"}  # timm names
FIGURES = ("forward", "dp_step_vs_nlft", "dp_step_vs_functorch", "bk", "memory")
MEMORY_MODES = ("hooks", "ghost", "bk", "nonprivate")
NOISE, CLIP = 1.0, 1.0


def build(name: str, device: str, batch: int | None = None) -> tuple[nn.Module, nn.Module, torch.Tensor, torch.Tensor]:
    """(TAFT-k model, NLFT-k model, prefix tokens, labels) for a random-init ViT."""
    kwargs, default_batch = MODELS[ALIASES.get(name, name)]
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


def bk_step(model: nn.Module, h: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    """One DP-SGD step with book-keeping clipping, as fit would run it (grad_sample_mode="bk")."""
    wrapped = make_bk_module(FromPrefix(model), CLIP)
    params = [p for p in model.parameters() if p.requires_grad]
    # The noise as fit draws it: a keyed PCG64DXSM stream on CPU, torch's Philox on CUDA.
    noise = NoiseStream(h.device, secure=False)
    noise.seed(secret_seed())
    base = get_optimizer_class(clipping="flat", distributed=False, grad_sample_mode="ghost")
    opt = (base if noise.kind == "cuda" else noise_optimizer_class(base))(
        torch.optim.SGD(params, lr=0.01), noise_multiplier=NOISE, max_grad_norm=CLIP,
        expected_batch_size=len(h), loss_reduction="mean", generator=noise.generator,
    )
    opt.noise_stream = noise
    return _sgd_step(wrapped, opt, h, y)


def nonprivate_step(model: nn.Module, h: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    """One ordinary (non-private) SGD step of the same model: plain autograd, no clipping, no noise."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    return _sgd_step(FromPrefix(model), opt, h, y)


def _sgd_step(module: nn.Module, opt: torch.optim.Optimizer, h: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    """The timed step: cross-entropy of ``module(h)``, backward, ``opt.step()``, gradients cleared."""
    criterion = nn.CrossEntropyLoss()

    def step() -> None:
        criterion(module(h), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

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


def timing_figures(name: str, device: str, pairs: int, warmup: int, figures: set[str], batch: int | None) -> None:
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    tangent, nonlinear, h, y = build(name, device, batch)
    common = dict(model=name, k=K, batch=len(h), device=device, pairs=pairs)
    if "bk" in figures:
        bk_figures(tangent, nonlinear, h, y, common, pairs, warmup, sync)
    if "forward" in figures:
        forward_figure(tangent, nonlinear, h, common, pairs, warmup, sync)
    if figures & {"dp_step_vs_nlft", "dp_step_vs_functorch"}:
        taft_step = opacus_step(tangent, h, y)
    if "dp_step_vs_nlft" in figures:
        nlft_step = opacus_step(nonlinear, h, y)
        emit("dp_step_vs_nlft", paired_ratio(taft_step, nlft_step, pairs, warmup, sync), target="<= 1.5", **common)
    if "dp_step_vs_functorch" in figures:
        reference = functorch_step(build(name, device, len(h))[1], h, y)
        emit("dp_step_vs_functorch", paired_ratio(taft_step, reference, pairs, warmup, sync), target="<= 1.0", **common)


def bk_figures(tangent: nn.Module, nonlinear: nn.Module, h: torch.Tensor, y: torch.Tensor, common: dict,
               pairs: int, warmup: int, sync: Callable[[], None]) -> None:
    """bk step / non-private step and bk step / NLFT hooks step, the three steps interleaved."""
    steps = {"bk": bk_step(tangent, h, y), "nonprivate": nonprivate_step(tangent, h, y),
             "nlft_hooks": opacus_step(nonlinear, h, y)}
    times = interleaved_times(steps, pairs, warmup, sync)
    ratios = {other: statistics.median(b / o for b, o in zip(times["bk"], times[other])) for other in steps if other != "bk"}
    emit("bk_step_vs_nonprivate", ratios["nonprivate"], target="<= 1.15", **common)
    emit("bk_step_vs_nlft_hooks", ratios["nlft_hooks"], target="<= 1.2", **common)
    bound = statistics.median(n / o for n, o in zip(times["nonprivate"], times["nlft_hooks"]))
    emit("taft_nonprivate_vs_nlft_hooks", bound, note="bk_step_vs_nlft_hooks if book-keeping cost nothing over non-private training", **common)


def interleaved_times(steps: dict[str, Callable[[], None]], rounds: int, warmup: int,
                      sync: Callable[[], None]) -> dict[str, list[float]]:
    """Seconds per step of each closure, run in turn every round (warm-up rounds dropped)."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(warmup + rounds):
        for name, fn in steps.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def forward_figure(tangent: nn.Module, nonlinear: nn.Module, h: torch.Tensor, common: dict, pairs: int, warmup: int,
                   sync: Callable[[], None]) -> None:
    def fwd(m: nn.Module) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                m.forward_from_prefix(h)
        return run

    emit("forward", paired_ratio(fwd(tangent), fwd(nonlinear), pairs, warmup, sync), **common)


def memory_child(mode: str, device: str, batch: int, name: str, metric: str) -> None:
    """Run in a fresh process: peak memory added by one step (bytes) of TAFT-k in ``mode``.

    ``metric``: "device" is ``torch.cuda.max_memory_allocated`` on CUDA and the resident-set
    high-water mark on CPU, where :func:`memory_figure` runs the child with glibc's
    ``MALLOC_MMAP_THRESHOLD_`` at 128 KiB so that freed blocks return to the OS and the
    mark measures live memory rather than the allocator's history (with glibc's default
    dynamic threshold the same step reads 10-20 % apart from run to run);
    "tensors" is the peak of live tensor storage allocated during the step, tracked op by op
    (CPU's analogue of max_memory_allocated; slower, same memory).
    """
    tangent, _, h, y = build(name, device, batch)
    if mode == "bk":
        step = bk_step(tangent, h, y)
    elif mode == "nonprivate":
        step = nonprivate_step(tangent, h, y)
    else:
        step = opacus_step(tangent, h, y, mode)
    if metric == "tensors":
        with _LiveTensors() as live:
            step()
        peak = live.peak
    elif device.startswith("cuda"):
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


class _LiveTensors(TorchDispatchMode):
    """Peak bytes of tensor storage created (not aliased) by the ops run under this mode and still alive."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for key, (ref, size) in list(self.live.items()):
            if ref.expired():
                del self.live[key]
                self.current -= size
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key not in inputs and key not in self.live and storage.nbytes() > 0:
                    self.live[key] = (StorageWeakRef(storage), storage.nbytes())
                    self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        return out


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


#: Every allocation of 128 KiB or more is its own mapping, unmapped when freed (CPU peak = live memory).
_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def memory_figure(device: str, batch: int, name: str, repeats: int, metric: str) -> None:
    """Peak of each mode: the median over ``repeats`` fresh processes, modes interleaved."""
    samples: dict[str, list[int]] = {mode: [] for mode in MEMORY_MODES}
    for _ in range(repeats):
        for mode in MEMORY_MODES:
            out = subprocess.run(
                [sys.executable, "-m", "experiments.bench_tangent", "--memory-child", mode, "--device", device,
                 "--memory-batch", str(batch), "--memory-model", name, "--memory-metric", metric],
                check=True, capture_output=True, text=True, env={**os.environ, **_MALLOC_ENV},
            )
            samples[mode].append(int(out.stdout.strip().splitlines()[-1]))
    peaks = {mode: int(statistics.median(v)) for mode, v in samples.items()}
    spread = {mode: round(max(v) / min(v) - 1, 4) for mode, v in samples.items()}
    common = dict(model=name, k=K, batch=batch, device=device, metric=metric, repeats=repeats, spread=spread,
                  **{f"{mode}_bytes": peak for mode, peak in peaks.items()})
    emit("peak_memory_ghost_vs_hooks", peaks["ghost"] / peaks["hooks"], target="<= 0.6", **common)
    emit("peak_memory_bk_vs_nonprivate", peaks["bk"] / peaks["nonprivate"], target="<= 1.15", **common)
    emit("peak_memory_bk_vs_hooks", peaks["bk"] / peaks["hooks"], target="<= 0.5", **common)
    emit("peak_memory_nonprivate_vs_hooks", peaks["nonprivate"] / peaks["hooks"],
         note="lower bound of bk/hooks: bk holds what non-private training saves, plus output gradients", **common)


def emit(figure: str, ratio: float, **fields) -> None:
    print(json.dumps({"figure": figure, "ratio": round(ratio, 4), **fields}), flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    names = sorted([*MODELS, *ALIASES])
    parser.add_argument("--models", "--model", nargs="+", default=["small", "vit_s16"], choices=names)
    parser.add_argument("--batch", type=int, help="timing batch size (default: per model, see MODELS)")
    parser.add_argument("--figures", nargs="+", default=list(FIGURES), choices=FIGURES)
    parser.add_argument("--pairs", type=int, default=20, help="paired measurements per figure (>= 20)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--memory-batch", type=int, default=256)
    parser.add_argument("--memory-model", default="small", choices=names)
    parser.add_argument("--memory-repeats", type=int, default=3, help="fresh processes per mode (median)")
    parser.add_argument("--memory-metric", default="device", choices=["device", "tensors"],
                        help="device: CUDA max_memory_allocated / CPU resident set; tensors: live tensor bytes")
    parser.add_argument("--memory-child", choices=MEMORY_MODES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        memory_child(args.memory_child, args.device, args.memory_batch, args.memory_model, args.memory_metric)
        return
    figures = set(args.figures)
    for name in args.models:
        timing_figures(name, args.device, args.pairs, args.warmup, figures, args.batch)
    if "memory" in figures:
        memory_figure(args.device, args.memory_batch, args.memory_model, args.memory_repeats, args.memory_metric)


if __name__ == "__main__":
    main()
