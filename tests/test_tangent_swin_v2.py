"""Swin Transformer V2: the tangent model equals jvp, per-sample gradients are exact, fit runs privately."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from test_bookkeeping import assert_close, bk_grads, clip_sum, hooks_reference
from test_tangent_grad_samples import assert_grads_close, dp_update
from torch.func import functional_call, grad, jvp, vmap
from torch.utils.data import TensorDataset
from vit_cases import forbid_functorch_fallback, per_example_loss, randomize_deltas  # noqa: F401 -- autouse fixture

import dp_taft
import dp_taft.privacy.bookkeeping as bk
from dp_taft.methods import LinearProbeSwinV2, NLFTSwinV2, linear_probe, nlft
from dp_taft.privacy.data import FromPrefix
from dp_taft.privacy.validate import resolve_grad_sample_mode
from dp_taft.tangent import UnsupportedModelError
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


def images(n: int = 4, seed: int = 1, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def jvp_reference(model, tangent, x):
    params = dict(model.named_parameters())
    deltas = {k: v.detach() for k, v in tangent.deltas().items()}
    primals = {k: params[k].detach() for k in deltas}
    out, jdw = jvp(lambda sub: functional_call(model, {**params, **sub}, (x,)), (primals,), (deltas,))
    return out + jdw


def test_normalize_tangent_matches_jvp():
    q, dq = torch.randn(2, 5, 4, dtype=torch.float64), torch.randn(2, 5, 4, dtype=torch.float64)
    want = jvp(lambda t: torch.nn.functional.normalize(t, dim=-1), (q,), (dq,))
    for got, ref in zip(normalize_tangent(q, dq), want):
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("blocks", [0, 1, 2, 3, 4])
def test_matches_jvp(blocks):
    model = make_swin_v2()
    tangent = dp_taft.linearize(model, blocks=blocks)
    assert isinstance(tangent, dp_taft.tangent.TangentSwinV2)
    x = images()
    torch.testing.assert_close(tangent(x), model(x), rtol=1e-12, atol=1e-12)  # Δw = 0: the model itself
    randomize_deltas(tangent)
    want = jvp_reference(model, tangent, x)
    assert relative_error(tangent(x), want) <= 1e-9
    assert relative_error(model(x), want) > 1e-3


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


@pytest.mark.parametrize("overrides, match", [
    (dict(dynamic_img_size=True), r"'layers\.1\.blocks\.1': dynamic attention masks"),
    (dict(global_pool="max"), r"'head\.global_pool' \(timm\..*SelectAdaptivePool2d, pool_type='max'\)"),
    (dict(drop_path_rate=0.1), r"'layers\.1\.blocks\.1\.drop_path1' is a stochastic layer"),
])
def test_refuses_unsupported(overrides, match):
    with pytest.raises(UnsupportedModelError, match=match):
        dp_taft.linearize(make_swin_v2(**overrides), blocks=1)


def vmap_reference(model, h, y, kind):
    """Per-example gradients {name: (B, *shape)} by vmap(grad) through the prefix protocol."""
    view = FromPrefix(model)
    trainable = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    def loss(params, h1, y1):
        logits = functional_call(view, {f"model.{k}": v for k, v in params.items()}, (h1[None],), strict=False)
        return per_example_loss(logits, y1[None], kind).sum()

    return vmap(grad(loss), in_dims=(None, 0, 0))(trainable, h, y)


def labelled(model, n: int = 6):
    return model.prefix(images(n)), torch.arange(n) % 3


@pytest.mark.parametrize("kind", ["ce", "square"])
@pytest.mark.parametrize("blocks", [1, 3])
def test_hooks_match_vmap_grad(blocks, kind):
    tangent = dp_taft.linearize(make_swin_v2(), blocks=blocks).train()
    randomize_deltas(tangent, scale=0.05)
    h, y = labelled(tangent)
    got = hooks_reference(tangent, h, y, kind)
    want = vmap_reference(tangent, h, y, kind)
    assert got.keys() == want.keys()
    assert_grads_close(got, want, rtol=1e-9)


@pytest.mark.parametrize("blocks", [1, 3])
def test_nlft_hooks_match_vmap_grad(blocks):
    method = nlft(make_swin_v2(), blocks).train()
    h, y = labelled(method)
    assert_grads_close(hooks_reference(method, h, y, "ce"), vmap_reference(method, h, y, "ce"), rtol=1e-9)


@pytest.mark.parametrize("blocks", [1, 3])
def test_bk_equals_hooks(blocks):
    tangent = dp_taft.linearize(make_swin_v2(), blocks=blocks).train()
    randomize_deltas(tangent, scale=0.05)
    h, y = labelled(tangent)
    assert resolve_grad_sample_mode(tangent, "auto", per_sample_needed=False) == "bk"
    bk.require_bk_layers(tangent)
    want, norms, _ = clip_sum(hooks_reference(tangent, h, y, "ce"), clip=1e-3)
    got, bk_norms = bk_grads(tangent, h, y, "ce", clip=1e-3, reduction="sum")
    assert_close(got, want)
    torch.testing.assert_close(bk_norms, norms, rtol=1e-10, atol=0)


def test_nlft_bk_equals_hooks():
    method = nlft(make_swin_v2(), 3).train()
    h, y = labelled(method)
    assert resolve_grad_sample_mode(method, "auto", per_sample_needed=False) == "bk"
    want, norms, _ = clip_sum(hooks_reference(method, h, y, "ce"), clip=1e-3)
    got, bk_norms = bk_grads(method, h, y, "ce", clip=1e-3, reduction="sum")
    assert_close(got, want)
    torch.testing.assert_close(bk_norms, norms, rtol=1e-10, atol=0)


@pytest.mark.parametrize("build", [lambda m: nlft(m, 1), lambda m: nlft(m, 3), lambda m: nlft(m, 0), linear_probe],
                         ids=["nlft1", "nlft3", "nlft0", "probe"])
def test_methods_compute_the_model_at_init(build):
    model = make_swin_v2()
    method = build(model).train()
    assert isinstance(method, (NLFTSwinV2, LinearProbeSwinV2))
    x = images()
    h = method.prefix(x)
    assert not h.requires_grad
    torch.testing.assert_close(method.forward_from_prefix(h), model(x), rtol=1e-12, atol=1e-12)


def test_nlft_and_probe_train_the_right_parameters():
    names = {n for n, p in nlft(make_swin_v2(), 3).named_parameters() if p.requires_grad}
    assert {"blocks.1.reduction.layer.weight", "blocks.0.attn.logit_scale.weight", "blocks.0.attn.q_bias.weight",
            "blocks.0.attn.cpb_mlp.0.weight", "blocks.0.attn.cpb_mlp.2.weight", "net.head.fc.weight",
            "norm.weight"} <= names
    assert not any(n.startswith("net.layers") for n in names)
    probe = linear_probe(make_swin_v2())
    assert {n for n, p in probe.named_parameters() if p.requires_grad} == {"head.weight", "head.bias"}


def easy_images(n: int) -> TensorDataset:
    """Class c is a fixed random template plus pixel noise (float32)."""
    templates = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1234))
    y = torch.arange(n) % 3
    return TensorDataset(templates[y] + 0.5 * torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(0)), y)


@pytest.mark.parametrize("mode", ["auto", "hooks"])
@pytest.mark.parametrize("build", [lambda m: dp_taft.linearize(m, blocks=1), lambda m: nlft(m, 1)],
                         ids=["taft1", "nlft1"])
def test_private_fit_meets_epsilon(build, mode):
    model = build(make_swin_v2(dtype=torch.float32))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    result = dp_taft.fit(model, easy_images(48), epsilon=2.0, delta=1e-5, epochs=2, batch_size=16, lr=0.5,
                         max_grad_norm=0.1, seed=0, quiet=True, grad_sample_mode=mode)
    assert result.report.epsilon <= 2.0
    after = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    assert any(not torch.equal(before[n], after[n]) for n in before)


@pytest.mark.parametrize("method", ["taft", "nlft"])
def test_ghost_equals_hooks(method):
    x, y = images(8), torch.arange(8) % 3
    updates = {}
    for mode in ("hooks", "ghost"):
        if method == "taft":
            model = dp_taft.linearize(make_swin_v2(), blocks=3)
            randomize_deltas(model, scale=0.05)
        else:
            model = nlft(make_swin_v2(), 3)
        updates[mode] = dp_update(model.train(), x, y, mode, clip=1e-3)
    assert torch.cat([u.flatten() for u in updates["hooks"].values()]).norm() > 0
    assert_grads_close(updates["ghost"], updates["hooks"])


@pytest.mark.parametrize("build", [lambda m: dp_taft.linearize(m, blocks=3), lambda m: nlft(m, 3), linear_probe],
                         ids=["taft3", "nlft3", "probe"])
def test_prefix_cache_gives_the_uncached_result(build):
    def run(cache):
        model = build(make_swin_v2(dtype=torch.float32))
        dp_taft.fit(model, easy_images(32), epsilon=2.0, delta=1e-5, epochs=1, batch_size=16, lr=0.5,
                    max_grad_norm=0.1, seed=0, quiet=True, cache_prefix=cache)
        return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    cached, plain = run(True), run(False)
    for name in plain:
        torch.testing.assert_close(cached[name], plain[name], rtol=1e-4, atol=1e-6)


def test_delta_state_round_trip_and_fingerprint():
    tangent = dp_taft.linearize(make_swin_v2(), blocks=3)
    randomize_deltas(tangent)
    other = dp_taft.linearize(make_swin_v2(), blocks=3)
    other.load_delta_state_dict(tangent.delta_state_dict())
    assert other.fingerprint() == tangent.fingerprint() != dp_taft.linearize(make_swin_v2(seed=5), blocks=3).fingerprint()
    torch.testing.assert_close(other(images()), tangent(images()), rtol=0, atol=0)
