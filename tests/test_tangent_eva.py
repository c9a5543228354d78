"""EVA / EVA-02 (timm.models.eva.Eva): tangent model, per-sample gradients, book-keeping, NLFT, probe, fit."""

from __future__ import annotations

import pytest
import timm
import torch
from opacus import GradSampleModule
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from torch.func import functional_call, grad, vmap

import dp_taft
from dp_taft import methods
from dp_taft.privacy.data import FromPrefix
from dp_taft.privacy.validate import resolve_grad_sample_mode
from dp_taft.tangent import TangentEva, UnsupportedModelError
from fit_cases import easy_dataset
from test_bookkeeping import assert_close, bk_grads, clip_sum, hooks_reference
from test_tangent_exactness import jvp_reference, relative_error
from test_tangent_grad_samples import assert_grads_close, opacus_grad_samples, perturbed_tangent_batch, vmap_grad_samples
from vit_cases import (  # noqa: F401 -- forbid_functorch_fallback: an autouse fixture
    forbid_functorch_fallback, per_example_loss, randomize_deltas,
)

BASE = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, use_rot_pos_emb=True,
            ref_feat_shape=(4, 4), init_values=0.1, num_classes=3)
# name -> Eva kwargs; each differs from BASE in one supported feature ("swiglu" is EVA-02's MLP).
VARIANTS: dict[str, dict] = {
    "base": {},
    "swiglu": dict(swiglu_mlp=True, mlp_ratio=4 * 2 / 3),
    "swiglu_scale_mlp": dict(swiglu_mlp=True, scale_mlp=True),
    "unfused_qkv": dict(qkv_fused=False),
    "qk_norm": dict(qk_norm=True),
    "no_qkv_bias": dict(qkv_bias=False),
    "no_rope": dict(use_rot_pos_emb=False),
    "rotate_half": dict(rope_rotate_half=True),
    "registers_token_pool": dict(num_reg_tokens=2, global_pool="token"),
    "scale_attn_inner": dict(scale_attn_inner=True),
    "post_norm": dict(use_post_norm=True),
    "no_layer_scale": dict(init_values=None),
}


def make_eva(seed: int = 0, dtype: torch.dtype = torch.float64, **overrides) -> timm.models.eva.Eva:
    """A random Eva whose norms, layer scales, q/v biases and head are random too (timm
    initialises them to constants or, for the head, to 1e-3 of the usual scale)."""
    torch.manual_seed(seed)
    model = timm.models.eva.Eva(**{**BASE, **overrides}).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm1.weight", "norm2.weight", "norm.weight", "gamma_1", "gamma_2")):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif name.endswith(("norm1.bias", "norm2.bias", "norm.bias", "q_bias", "v_bias", "head.bias")):
                p.copy_(0.2 * torch.randn_like(p))
            elif name == "head.weight":
                p.copy_(torch.randn_like(p) / p.shape[1] ** 0.5)
    return model.eval()


def eva_images(model: timm.models.eva.Eva, n: int = 4, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 16, 16, generator=g, dtype=model.patch_embed.proj.weight.dtype)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("blocks", [0, 1, 2])
def test_matches_jvp(variant, blocks):
    model = make_eva(**VARIANTS[variant])
    tangent = dp_taft.linearize(model, blocks=blocks)
    assert type(tangent) is TangentEva
    randomize_deltas(tangent)
    x = eva_images(model)
    want = jvp_reference(model, tangent, x)
    assert relative_error(tangent(x), want) <= 1e-9
    assert relative_error(model(x), want) > 1e-3  # the perturbation moves the output


@pytest.mark.parametrize("variant", ["base", "swiglu", "registers_token_pool", "qk_norm"])
def test_zero_delta_is_the_model(variant):
    model = make_eva(**VARIANTS[variant])
    x = eva_images(model)
    torch.testing.assert_close(dp_taft.linearize(model, blocks=2)(x), model(x), rtol=1e-12, atol=1e-12)


def test_rope_is_applied_to_the_tangent_stream():
    """Without RoPE on the suffix the tangent model would differ: the rotation matters here."""
    model = make_eva()
    tangent = dp_taft.linearize(model, blocks=2)
    randomize_deltas(tangent)
    x = eva_images(model)
    without = dp_taft.linearize(model, blocks=2)
    without.load_delta_state_dict(tangent.delta_state_dict())
    for block in without.blocks:
        block.attn.q_norm = block.attn.k_norm = None
    assert relative_error(without(x), tangent(x)) > 1e-3


def test_deltas_are_named_as_the_source_parameters():
    model = make_eva(qkv_fused=True)
    deltas = dp_taft.linearize(model, blocks=1).deltas()
    source = {n for n, _ in model.named_parameters()}
    assert set(deltas) <= source
    assert {"blocks.1.attn.q_bias", "blocks.1.attn.v_bias", "blocks.1.gamma_1", "blocks.1.gamma_2"} <= set(deltas)
    assert set(deltas) == {n for n in source if n.startswith(("blocks.1.", "fc_norm", "head"))}


@pytest.mark.parametrize("kind", ["ce", "square"])
@pytest.mark.parametrize("variant", ["base", "swiglu", "swiglu_scale_mlp", "unfused_qkv", "qk_norm", "post_norm"])
def test_hooks_match_vmap_grad(variant, kind):
    model = make_eva(**VARIANTS[variant])
    tangent, h, y = perturbed_tangent_batch(model, eva_images(model, n=6))
    want = vmap_grad_samples(tangent, h, y, kind)
    opacus_grad_samples(FromPrefix(tangent), h, y, kind)
    got = {n: p.grad_sample for n, p in tangent.named_parameters() if p.requires_grad}
    assert_grads_close(got, want, rtol=1e-9)


@pytest.mark.parametrize("variant", ["base", "swiglu"])
def test_zero_delta_grads_equal_the_source_model_grads(variant):
    """At Δw = 0, ∂L_i/∂Δw is the per-example gradient ∂L_i/∂w of the source model at w0."""
    model = make_eva(**VARIANTS[variant])
    tangent = dp_taft.linearize(model, blocks=1).train()
    x, y = eva_images(model, n=5), torch.arange(5) % model.num_classes
    for blk in model.blocks:
        blk.attn.fused_attn = False
    params = {n: p.detach() for n, p in model.named_parameters()}
    deltas = tangent.deltas()

    def loss_one(sub, x1, y1):
        return per_example_loss(functional_call(model, {**params, **sub}, (x1[None],)), y1[None], "ce").sum()

    want = vmap(grad(loss_one), in_dims=(None, 0, 0))({n: params[n] for n in deltas}, x, y)
    opacus_grad_samples(tangent, x, y, "ce")
    assert_grads_close({n: d.grad_sample for n, d in deltas.items()}, want, rtol=1e-9)


@pytest.mark.parametrize("variant", ["base", "swiglu", "unfused_qkv", "post_norm"])
def test_every_trainable_layer_has_exact_samplers_and_bk_rules(variant):
    tangent = dp_taft.linearize(make_eva(**VARIANTS[variant]), blocks=2).train()
    hooks, ghost = GradSampleModule.GRAD_SAMPLERS, GradSampleModuleFastGradientClipping.NORM_SAMPLERS
    for name, module in tangent.named_modules():
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            assert type(module) in hooks and type(module) in ghost, name
    assert resolve_grad_sample_mode(tangent, "auto", per_sample_needed=False) == "bk"


@pytest.mark.parametrize("kind", ["ce", "square"])
@pytest.mark.parametrize("variant", ["base", "swiglu", "unfused_qkv", "registers_token_pool"])
def test_bk_clipped_sum_equals_hooks_mode(variant, kind):
    model = make_eva(**VARIANTS[variant])
    tangent = dp_taft.linearize(model, blocks=2).train()
    randomize_deltas(tangent, scale=0.05)
    h, y = tangent.prefix(eva_images(model, n=6)), torch.arange(6) % model.num_classes
    samples = hooks_reference(tangent, h, y, kind)
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in samples.values()], dim=1).norm(dim=1)
    want, _, factors = clip_sum(samples, float(norms.median()))
    assert (factors < 1).any() and (factors == 1).any()
    got, bk_norms = bk_grads(tangent, h, y, kind, float(norms.median()))
    assert_close(got, want)
    torch.testing.assert_close(bk_norms, norms, rtol=1e-10, atol=0)


@pytest.mark.parametrize("variant", ["base", "swiglu_scale_mlp", "post_norm", "no_qkv_bias"])
def test_nlft_is_the_model_with_exact_per_sample_gradients(variant):
    model = make_eva(**VARIANTS[variant])
    nlft = methods.nlft(model, 2)
    assert type(nlft) is methods.NLFTEva
    x, y = eva_images(model, n=6), torch.arange(6) % model.num_classes
    torch.testing.assert_close(nlft.eval()(x), model(x), rtol=1e-12, atol=1e-12)
    n_source = sum(p.numel() for n, p in model.named_parameters() if n.startswith(("blocks", "norm", "fc_norm", "head")))
    assert sum(p.numel() for p in nlft.parameters() if p.requires_grad) == n_source
    nlft.train()
    h = nlft.prefix(x)
    assert resolve_grad_sample_mode(nlft, "auto", per_sample_needed=False) == "bk"
    samples = hooks_reference(nlft, h, y, "ce")
    assert_grads_close(samples, vmap_grad_samples(nlft, h, y, "ce"), rtol=1e-9)
    want, norms, _ = clip_sum(samples, clip=0.1)
    got, bk_norms = bk_grads(nlft, h, y, "ce", clip=0.1)
    assert_close(got, want)
    torch.testing.assert_close(bk_norms, norms, rtol=1e-10, atol=0)


def test_linear_probe_is_the_model():
    model = make_eva(**VARIANTS["swiglu"])
    probe = methods.linear_probe(model)
    x = eva_images(model)
    torch.testing.assert_close(probe.eval()(x), model(x), rtol=1e-12, atol=1e-12)
    assert {n for n, p in probe.named_parameters() if p.requires_grad} == {"head.weight", "head.bias"}


@pytest.mark.parametrize("overrides, match", [
    (dict(attn_type="rope"), r"'blocks\.1\.attn' of type timm\.layers\.attention\.AttentionRope"),
    (dict(dynamic_img_size=True), r"dynamic_img_size=True"),
    (dict(rope_type="mixed"), r"RotaryEmbeddingMixed"),
    (dict(drop_path_rate=0.1), r"stochastic layer"),
    (dict(global_pool="max"), r"global_pool='max'"),
    (dict(global_pool="map"), r"global_pool='map'"),
])
def test_refuses_unsupported_options(overrides, match):
    with pytest.raises(UnsupportedModelError, match=match):
        dp_taft.linearize(make_eva(**overrides), blocks=1)


@pytest.mark.parametrize("build", [lambda m: methods.taft(m, 1), lambda m: methods.nlft(m, 1)], ids=["taft1", "nlft1"])
@pytest.mark.parametrize("mode", ["auto", "hooks"])
def test_private_fit_meets_the_target(build, mode):
    torch.manual_seed(0)
    model = build(make_eva(dtype=torch.float32, swiglu_mlp=True))
    result = dp_taft.fit(model, easy_dataset(48), epsilon=3.0, delta=1e-3, epochs=1, batch_size=16,
                         max_grad_norm=0.5, lr=0.1, quiet=True, grad_sample_mode=mode)
    assert 0.9 * 3.0 <= result.report.epsilon <= 3.0 and result.steps == 3
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("name", ["eva02_tiny_patch14_224", "eva02_base_patch14_224"])
def test_registered_eva02_configurations(name):
    """timm's own eva02 configurations (SwiGLU; base: unfused qkv and SwiGLU's inner norm), made small."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, img_size=28, embed_dim=32, num_heads=2, depth=2,
                              num_classes=3).double().eval()
    tangent = dp_taft.linearize(model, blocks=2)
    randomize_deltas(tangent)
    x = torch.randn(2, 3, 28, 28, dtype=torch.float64)
    want = jvp_reference(model, tangent, x)
    assert relative_error(tangent(x), want) <= 1e-9
    assert relative_error(model(x), want) > 1e-3
