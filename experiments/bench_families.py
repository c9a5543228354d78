"""Cost of TAFT on each ViT family: tangent forward / non-linear forward, and DP step / non-private step.

``python -m experiments.bench_families [--device cuda] [--families deit siglip ...] [--pairs 20]``
builds one small random model per family through ``timm.create_model`` (no weights), and
prints one JSON line per figure, each a ratio measured in this run (median of interleaved
pairs after warm-up, as :mod:`experiments.bench_tangent`):

1. ``forward``: TAFT-k forward / NLFT-k forward of the same blocks and head, from the cached prefix;
2. ``dp_step_vs_nonprivate``: one TAFT-k DP-SGD step in the mode ``fit``'s ``grad_sample_mode="auto"``
   picks (book-keeping where every trainable layer has a rule, else Opacus hooks) / one
   non-private TAFT-k SGD step.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import timm
import torch
import torch.nn as nn

import dp_taft
from dp_taft import methods
from dp_taft.privacy.validate import resolve_grad_sample_mode
from experiments.bench_tangent import bk_step, emit, forward_figure, nonprivate_step, opacus_step, paired_ratio

K = 2
_SMALL = dict(img_size=32, embed_dim=192, depth=6, num_heads=3, num_classes=10)
#: family -> (timm model name, create_model arguments shrinking it for a CPU); batch 64 of 32x32 images.
FAMILIES: dict[str, tuple[str, dict]] = {
    "vit": ("vit_small_patch16_224", dict(_SMALL, patch_size=4)),
    "deit_distilled": ("deit_small_distilled_patch16_224", dict(_SMALL, patch_size=4)),
    "siglip_map": ("vit_base_patch16_siglip_224", dict(_SMALL, patch_size=4)),
    "clip_quickgelu": ("vit_base_patch32_clip_quickgelu_224", dict(_SMALL, patch_size=4)),
    "eva02": ("eva02_small_patch14_224", dict(_SMALL, patch_size=4, ref_feat_shape=(8, 8))),
    "beit": ("beit_base_patch16_224", dict(_SMALL, patch_size=4)),
    "swin": ("swin_tiny_patch4_window7_224", dict(img_size=32, patch_size=4, window_size=4, embed_dim=48,
                                                 depths=(2, 2, 2), num_heads=(3, 6, 12), num_classes=10, drop_path_rate=0.0)),
    "swin_v2": ("swinv2_tiny_window8_256", dict(img_size=32, patch_size=4, window_size=4, embed_dim=48,
                                              depths=(2, 2, 2), num_heads=(3, 6, 12), num_classes=10,
                                              drop_path_rate=0.0)),
}


def build(family: str, device: str, batch: int) -> tuple[nn.Module, nn.Module, torch.Tensor, torch.Tensor]:
    """(TAFT-k, NLFT-k, prefix tokens, labels) of the family's small random model."""
    name, kwargs = FAMILIES[family]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs).to(device).eval()
    tangent = dp_taft.linearize(model, blocks=K).train()
    nonlinear = methods.nlft(model, K).train()
    x = torch.randn(batch, 3, kwargs["img_size"], kwargs["img_size"], device=device)
    y = torch.randint(0, kwargs["num_classes"], (batch,), device=device)
    return tangent, nonlinear, tangent.prefix(x), y


def family_figures(family: str, device: str, batch: int, pairs: int, warmup: int) -> None:
    sync: Callable[[], None] = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    tangent, nonlinear, h, y = build(family, device, batch)
    mode = resolve_grad_sample_mode(tangent, "auto", per_sample_needed=False)
    common = dict(family=family, model=FAMILIES[family][0], k=K, batch=batch, device=device, pairs=pairs)
    forward_figure(tangent, nonlinear, h, common, pairs, warmup, sync)
    dp = bk_step(tangent, h, y) if mode == "bk" else opacus_step(tangent, h, y, mode)
    emit("dp_step_vs_nonprivate", paired_ratio(dp, nonprivate_step(tangent, h, y), pairs, warmup, sync),
         grad_sample_mode=mode, **common)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--pairs", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    a = p.parse_args(argv)
    for family in a.families:
        family_figures(family, a.device, a.batch, a.pairs, a.warmup)


if __name__ == "__main__":
    main()
