"""Small timm ViTs covering every variant the tangent conversion supports."""

from __future__ import annotations

import opacus.grad_sample.grad_sample_module as gsm_module
import opacus.grad_sample.grad_sample_module_fast_gradient_clipping as ghost_module
import pytest
import timm
import torch
import torch.nn.functional as F

# name -> VisionTransformer kwargs; each differs from BASE in one supported feature.
BASE = dict(img_size=16, patch_size=4, in_chans=3, embed_dim=24, depth=3, num_heads=2, num_classes=5)
VARIANTS: dict[str, dict] = {
    "base": {},
    "no_class_token_avg": dict(class_token=False, global_pool="avg"),
    "avg_pool_fc_norm": dict(global_pool="avg"),
    "no_qkv_bias": dict(qkv_bias=False),
    "qk_norm": dict(qk_norm=True),
    "layer_scale": dict(init_values=0.3),
    "registers": dict(reg_tokens=2),
    "mlp_ratio": dict(mlp_ratio=2.5),
    "gelu_tanh": dict(act_layer="gelu_tanh"),
    "scale_norms": dict(scale_attn_norm=True, scale_mlp_norm=True),
    "shape": dict(img_size=20, patch_size=5, embed_dim=32, num_heads=4, depth=4, num_classes=3),
}


def make_vit(seed: int = 0, dtype: torch.dtype = torch.float64, **overrides) -> timm.models.VisionTransformer:
    """A randomly initialised ViT whose LayerNorm affine params are also random.

    timm initialises LayerNorm to (1, 0) and LayerScale to a constant; randomising them
    makes the tests sensitive to every tangent term, not just the ones that survive at
    the textbook init.
    """
    torch.manual_seed(seed)
    model = timm.models.VisionTransformer(**{**BASE, **overrides}).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm1.weight", "norm2.weight", "norm.weight", "gamma")):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif name.endswith(("norm1.bias", "norm2.bias", "norm.bias")):
                p.copy_(0.2 * torch.randn_like(p))
    return model.eval()


def images(model: timm.models.VisionTransformer, n: int = 4, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    c = model.patch_embed.proj.in_channels
    h, w = model.patch_embed.img_size
    return torch.randn(n, c, h, w, generator=g, dtype=model.cls_token.dtype if model.cls_token is not None else torch.float64)


def randomize_deltas(tangent, scale: float = 0.1, seed: int = 2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tangent.deltas().values():
            p.copy_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


KAPPA = 15.0


def per_example_loss(logits: torch.Tensor, y: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-example CE or rescaled square loss (mean over classes of (f − κ·onehot)²)."""
    if kind == "ce":
        return F.cross_entropy(logits, y, reduction="none")
    classes = torch.arange(logits.shape[-1], device=logits.device)
    target = KAPPA * (classes == y[:, None]).to(logits.dtype)  # one-hot that vmap accepts
    return ((logits - target) ** 2).mean(-1)


@pytest.fixture(autouse=True)
def forbid_functorch_fallback(monkeypatch):
    """Any layer without an exact registered sampler would route to functorch: make that fail.
    Autouse in every test module that imports it."""

    def refuse(layer, *_):
        raise AssertionError(f"functorch fallback for {type(layer).__name__}")

    monkeypatch.setattr(gsm_module, "ft_compute_per_sample_gradient", refuse)
    monkeypatch.setattr(ghost_module, "ft_compute_per_sample_gradient", refuse)
