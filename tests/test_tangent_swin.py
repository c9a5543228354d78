"""Swin Transformer: the tangent model equals jvp, per-sample gradients are exact, fit runs privately."""

from __future__ import annotations

import pytest
import timm
import torch
from torch.func import functional_call, jvp
from torch.utils.data import TensorDataset

import dp_taft
import dp_taft.privacy.bookkeeping as bk
from dp_taft.methods import LinearProbeSwin, NLFTSwin, linear_probe, nlft
from dp_taft.privacy.validate import resolve_grad_sample_mode
from dp_taft.tangent import UnsupportedModelError
from test_bookkeeping import assert_close, bk_grads, clip_sum, hooks_reference
from test_tangent_grad_samples import assert_grads_close, dp_update, vmap_grad_samples
from vit_cases import forbid_functorch_fallback, per_example_loss, randomize_deltas  # noqa: F401 -- autouse fixture

# 8x8 patch grid, 2x2 windows: both stages have shifted windows with a mask, and a PatchMerging between them.
SWIN = dict(img_size=32, patch_size=4, window_size=2, embed_dim=16, depths=(2, 2), num_heads=(2, 2), num_classes=3,
            drop_path_rate=0.0)


def make_swin(seed: int = 0, dtype: torch.dtype = torch.float64, **overrides) -> timm.models.SwinTransformer:
    """A random Swin with random LayerNorm affine parameters and a non-trivial bias table."""
    torch.manual_seed(seed)
    model = timm.models.SwinTransformer(**{**SWIN, **overrides}).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.3 * torch.randn_like(p))
            elif name.endswith("relative_position_bias_table"):
                p.copy_(0.5 * torch.randn_like(p))
        for module in model.modules():
            if isinstance(module, timm.models.swin_transformer.WindowAttention):
                module.fused_attn = False  # SDPA has no forward-mode rule
    return model.eval()


@pytest.fixture
def make():
    """The model factory of the tests below, which test_tangent_swin_v2 imports with its own ``make``."""
    return make_swin


@pytest.fixture
def method_types():
    """The classes nlft and linear_probe build for this module's models."""
    return NLFTSwin, LinearProbeSwin


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


@pytest.mark.parametrize("blocks", [0, 1, 3, 4])
def test_matches_jvp(blocks):
    check_matches_jvp(make_swin(), blocks, dp_taft.tangent.TangentSwin)


def check_matches_jvp(model, blocks, family):
    tangent = dp_taft.linearize(model, blocks=blocks)
    assert isinstance(tangent, family)
    x = images()
    torch.testing.assert_close(tangent(x), model(x), rtol=1e-12, atol=1e-12)  # Δw = 0: the model itself
    randomize_deltas(tangent)
    want = jvp_reference(model, tangent, x)
    assert relative_error(tangent(x), want) <= 1e-9
    assert relative_error(model(x), want) > 1e-3


def test_suffix_counts_blocks_over_stages_with_merging_between():
    names = set(dp_taft.linearize(make_swin(), blocks=3).deltas())
    assert "layers.1.downsample.reduction.weight" in names and "layers.1.downsample.norm.bias" in names
    assert "layers.0.blocks.1.attn.relative_position_bias_table" in names
    assert not any(n.startswith("layers.0.blocks.0.") for n in names)
    assert "layers.1.downsample.reduction.weight" not in dp_taft.linearize(make_swin(), blocks=2).deltas()
    assert {"head.fc.weight", "head.fc.bias", "norm.weight", "norm.bias"} <= names


@pytest.mark.parametrize("overrides, match", [
    (dict(dynamic_img_size=True), r"'layers\.1\.blocks\.1': dynamic attention masks"),
    (dict(global_pool="max"), r"'head\.global_pool' \(timm\..*SelectAdaptivePool2d, pool_type='max'\)"),
    (dict(drop_path_rate=0.1), r"'layers\.1\.blocks\.1\.drop_path1' is a stochastic layer"),
])
def test_refuses_unsupported(make, overrides, match):
    with pytest.raises(UnsupportedModelError, match=match):
        dp_taft.linearize(make(**overrides), blocks=1)


def test_unregistered_layer_is_refused_by_path_and_type():
    model = make_swin()
    model.layers[1].blocks[1].mlp.act = torch.nn.Softplus()
    with pytest.raises(UnsupportedModelError, match=r"'layers\.1\.blocks\.1\.mlp\.act' of type torch\.nn.*Softplus"):
        dp_taft.linearize(model, blocks=1)
    dp_taft.linearize(model, blocks=0)  # in the frozen prefix it is fine


def test_refuses_bad_block_count():
    with pytest.raises(ValueError, match=r"\[0, 4\]"):
        dp_taft.linearize(make_swin(), blocks=5)


def labelled(model, n: int = 6):
    return model.prefix(images(n)), torch.arange(n) % 3


@pytest.mark.parametrize("kind", ["ce", "square"])
@pytest.mark.parametrize("blocks", [1, 3])
def test_hooks_match_vmap_grad(make, blocks, kind):
    tangent = dp_taft.linearize(make(), blocks=blocks).train()
    randomize_deltas(tangent, scale=0.05)
    h, y = labelled(tangent)
    got = hooks_reference(tangent, h, y, kind)
    want = vmap_grad_samples(tangent, h, y, kind)
    assert got.keys() == want.keys()
    assert_grads_close(got, want, rtol=1e-9)


@pytest.mark.parametrize("blocks", [1, 3])
def test_nlft_hooks_match_vmap_grad(make, blocks):
    method = nlft(make(), blocks).train()
    h, y = labelled(method)
    assert_grads_close(hooks_reference(method, h, y, "ce"), vmap_grad_samples(method, h, y, "ce"), rtol=1e-9)


@pytest.mark.parametrize("blocks", [1, 3])
def test_bk_equals_hooks(make, blocks):
    tangent = dp_taft.linearize(make(), blocks=blocks).train()
    randomize_deltas(tangent, scale=0.05)
    h, y = labelled(tangent)
    assert resolve_grad_sample_mode(tangent, "auto", per_sample_needed=False) == "bk"
    bk.require_bk_layers(tangent)
    want, norms, _ = clip_sum(hooks_reference(tangent, h, y, "ce"), clip=1e-3)
    got, bk_norms = bk_grads(tangent, h, y, "ce", clip=1e-3, reduction="sum")
    assert_close(got, want)
    torch.testing.assert_close(bk_norms, norms, rtol=1e-10, atol=0)


def test_nlft_bk_equals_hooks(make):
    method = nlft(make(), 3).train()
    h, y = labelled(method)
    assert resolve_grad_sample_mode(method, "auto", per_sample_needed=False) == "bk"
    want, norms, _ = clip_sum(hooks_reference(method, h, y, "ce"), clip=1e-3)
    got, bk_norms = bk_grads(method, h, y, "ce", clip=1e-3, reduction="sum")
    assert_close(got, want)
    torch.testing.assert_close(bk_norms, norms, rtol=1e-10, atol=0)


@pytest.mark.parametrize("build", [lambda m: nlft(m, 1), lambda m: nlft(m, 3), lambda m: nlft(m, 0), linear_probe],
                         ids=["nlft1", "nlft3", "nlft0", "probe"])
def test_methods_compute_the_model_at_init(make, method_types, build):
    model = make()
    method = build(model).train()
    assert isinstance(method, method_types)
    x = images()
    h = method.prefix(x)
    assert not h.requires_grad
    torch.testing.assert_close(method.forward_from_prefix(h), model(x), rtol=1e-12, atol=1e-12)


def test_nlft_and_probe_train_the_right_parameters():
    names = {n for n, p in nlft(make_swin(), 3).named_parameters() if p.requires_grad}
    assert "blocks.1.reduction.layer.weight" in names and "blocks.0.attn.table.weight" in names
    assert "net.head.fc.weight" in names and "norm.weight" in names
    assert not any(n.startswith("net.layers") for n in names)
    probe = linear_probe(make_swin())
    assert {n for n, p in probe.named_parameters() if p.requires_grad} == {"head.weight", "head.bias"}


def easy_images(n: int) -> TensorDataset:
    """Class c is a fixed random template plus pixel noise (float32)."""
    templates = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1234))
    y = torch.arange(n) % 3
    return TensorDataset(templates[y] + 0.5 * torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(0)), y)


@pytest.mark.parametrize("mode", ["auto", "hooks"])
@pytest.mark.parametrize("build", [lambda m: dp_taft.linearize(m, blocks=1), lambda m: nlft(m, 1)],
                         ids=["taft1", "nlft1"])
def test_private_fit_meets_epsilon(make, build, mode):
    model = build(make(dtype=torch.float32))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    result = dp_taft.fit(model, easy_images(48), epsilon=2.0, delta=1e-5, epochs=2, batch_size=16, lr=0.5,
                         max_grad_norm=0.1, seed=0, quiet=True, grad_sample_mode=mode)
    assert result.report.epsilon <= 2.0
    after = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    assert any(not torch.equal(before[n], after[n]) for n in before)


@pytest.mark.parametrize("method", ["taft", "nlft"])
def test_ghost_equals_hooks(make, method):
    x, y = images(8), torch.arange(8) % 3
    updates = {}
    for mode in ("hooks", "ghost"):
        if method == "taft":
            model = dp_taft.linearize(make(), blocks=3)
            randomize_deltas(model, scale=0.05)
        else:
            model = nlft(make(), 3)
        updates[mode] = dp_update(model.train(), x, y, mode, clip=1e-3)
    assert torch.cat([u.flatten() for u in updates["hooks"].values()]).norm() > 0
    assert_grads_close(updates["ghost"], updates["hooks"])


@pytest.mark.parametrize("build", [lambda m: dp_taft.linearize(m, blocks=3), lambda m: nlft(m, 3), linear_probe],
                         ids=["taft3", "nlft3", "probe"])
def test_prefix_cache_gives_the_uncached_result(make, build):
    def run(cache):
        model = build(make(dtype=torch.float32))
        dp_taft.fit(model, easy_images(32), epsilon=2.0, delta=1e-5, epochs=1, batch_size=16, lr=0.5,
                    max_grad_norm=0.1, seed=0, quiet=True, cache_prefix=cache)
        return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    cached, plain = run(True), run(False)
    for name in plain:
        torch.testing.assert_close(cached[name], plain[name], rtol=1e-4, atol=1e-6)
