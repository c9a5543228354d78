"""Swin Transformer V2: the tangent model equals jvp, per-sample gradients are exact, fit runs privately."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from test_tangent_swin import (  # noqa: F401 -- shared tests, run here with this module's ``make``
    check_matches_jvp,
    images,
    jvp_reference,
    labelled,
    relative_error,
    test_bk_equals_hooks,
    test_ghost_equals_hooks,
    test_hooks_match_vmap_grad,
    test_methods_compute_the_model_at_init,
    test_nlft_bk_equals_hooks,
    test_nlft_hooks_match_vmap_grad,
    test_prefix_cache_gives_the_uncached_result,
    test_private_fit_meets_epsilon,
    test_refuses_unsupported,
)
from torch.func import jvp
from vit_cases import forbid_functorch_fallback, per_example_loss, randomize_deltas  # noqa: F401 -- autouse fixture

import dp_taft
from dp_taft.methods import LinearProbeSwinV2, NLFTSwinV2, linear_probe, nlft
from dp_taft.tangent.swin_v2 import normalize_tangent

# 8x8 patch grid, 2x2 windows: both stages have shifted windows with a mask, and a PatchMerging between them.
SWIN2 = dict(img_size=32, patch_size=4, window_size=2, embed_dim=16, depths=(2, 2), num_heads=(2, 2), num_classes=3,
             drop_path_rate=0.0)
V2 = timm.models.swin_transformer_v2


def make_swin_v2(seed: int = 0, dtype: torch.dtype = torch.float64, **overrides) -> V2.SwinTransformerV2:
    """A random Swin v2: random norms (timm zero-inits the res-post-norms), logit scales, q/v biases and cpb MLP."""
    torch.manual_seed(seed)
    model = V2.SwinTransformerV2(**{**SWIN2, **overrides}).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.3 * torch.randn_like(p))
            elif name.endswith("logit_scale"):
                p.copy_(math.log(10) + 0.5 * torch.randn_like(p))
            elif "cpb_mlp" in name or name.endswith(("q_bias", "v_bias")):
                p.copy_(0.5 * torch.randn_like(p))
    return model.eval()


def test_normalize_tangent_matches_jvp():
    q, dq = torch.randn(2, 5, 4, dtype=torch.float64), torch.randn(2, 5, 4, dtype=torch.float64)
    want = jvp(lambda t: torch.nn.functional.normalize(t, dim=-1), (q,), (dq,))
    for got, ref in zip(normalize_tangent(q, dq), want):
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("blocks", [0, 1, 2, 3, 4])
def test_matches_jvp(blocks):
    check_matches_jvp(make_swin_v2(), blocks, dp_taft.tangent.TangentSwinV2)


def test_clamped_logit_scale_has_no_tangent():
    """Above log 100, timm clamps the logit scale: its Δ then changes nothing, as jvp says."""
    model = make_swin_v2()
    with torch.no_grad():
        model.layers[1].blocks[1].attn.logit_scale[0] = 5.0
    tangent = dp_taft.linearize(model, blocks=1)
    randomize_deltas(tangent)
    assert relative_error(tangent(images()), jvp_reference(model, tangent, images())) <= 1e-9


def test_suffix_names_every_v2_delta():
    names = set(dp_taft.linearize(make_swin_v2(), blocks=3).deltas())
    attn = "layers.0.blocks.1.attn"
    assert {f"{attn}.logit_scale", f"{attn}.q_bias", f"{attn}.v_bias", f"{attn}.cpb_mlp.0.weight",
            f"{attn}.cpb_mlp.0.bias", f"{attn}.cpb_mlp.2.weight", f"{attn}.qkv.weight", f"{attn}.proj.bias"} <= names
    assert {"layers.1.downsample.reduction.weight", "layers.1.downsample.norm.bias"} <= names
    assert not any(n.startswith("layers.0.blocks.0.") for n in names)
    model = make_swin_v2()
    params = dict(model.named_parameters())
    assert all(p.shape == params[n].shape for n, p in dp_taft.linearize(model, blocks=4).deltas().items())


@pytest.fixture
def make():
    """The model factory of the tests imported from test_tangent_swin."""
    return make_swin_v2


@pytest.fixture
def method_types():
    return NLFTSwinV2, LinearProbeSwinV2


def test_nlft_and_probe_train_the_right_parameters():
    names = {n for n, p in nlft(make_swin_v2(), 3).named_parameters() if p.requires_grad}
    assert {"blocks.1.reduction.layer.weight", "blocks.0.attn.logit_scale.weight", "blocks.0.attn.q_bias.weight",
            "blocks.0.attn.cpb_mlp.0.weight", "blocks.0.attn.cpb_mlp.2.weight", "net.head.fc.weight",
            "norm.weight"} <= names
    assert not any(n.startswith("net.layers") for n in names)
    probe = linear_probe(make_swin_v2())
    assert {n for n, p in probe.named_parameters() if p.requires_grad} == {"head.weight", "head.bias"}


def test_delta_state_round_trip_and_fingerprint():
    tangent = dp_taft.linearize(make_swin_v2(), blocks=3)
    randomize_deltas(tangent)
    other = dp_taft.linearize(make_swin_v2(), blocks=3)
    other.load_delta_state_dict(tangent.delta_state_dict())
    assert other.fingerprint() == tangent.fingerprint() != dp_taft.linearize(make_swin_v2(seed=5), blocks=3).fingerprint()
    torch.testing.assert_close(other(images()), tangent(images()), rtol=0, atol=0)
