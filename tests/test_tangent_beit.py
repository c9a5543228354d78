"""BEiT (timm.models.beit.Beit): tangent exactness, per-sample gradients, book-keeping, NLFT/probe, fit."""

from __future__ import annotations

import pytest
import timm.models.beit as beit
import torch

import dp_taft
from dp_taft.methods import linear_probe, nlft
from dp_taft.privacy.data import FromPrefix
from dp_taft.privacy.validate import resolve_grad_sample_mode
from fit_cases import easy_dataset
from test_bookkeeping import assert_close, bk_grads, clip_sum, hooks_reference
from test_tangent_exactness import jvp_reference, relative_error
from test_tangent_grad_samples import assert_grads_close, opacus_grad_samples, perturbed_tangent_batch, vmap_grad_samples
from vit_cases import (  # noqa: F401 -- forbid_functorch_fallback: an autouse fixture
    forbid_functorch_fallback, images, per_example_loss, randomize_deltas,
)

BASE = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=3, head_init_scale=1.0)
VARIANTS: dict[str, dict] = {
    "rel_pos_layer_scale": dict(use_rel_pos_bias=True, init_values=0.1),
    "shared_rel_pos": dict(use_shared_rel_pos_bias=True, use_abs_pos_emb=False),
    "token_no_qkv_bias": dict(use_rel_pos_bias=True, global_pool="token", qkv_bias=False, init_values=0.1),
    "shared_and_own": dict(use_rel_pos_bias=True, use_shared_rel_pos_bias=True, init_values=0.1, depth=3),
    "scale_mlp_4_heads": dict(use_rel_pos_bias=True, scale_mlp=True, num_heads=4),
}


def make_beit(seed: int = 0, dtype: torch.dtype = torch.float64, **overrides) -> beit.Beit:
    """A random BEiT whose norms, layer scales, q/v biases and bias tables are random too
    (timm initializes the biases and tables to zero, which would hide their tangent terms)."""
    torch.manual_seed(seed)
    model = beit.Beit(**{**BASE, **overrides}).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm1.weight", "norm2.weight", "norm.weight", "gamma_1", "gamma_2")):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif name.endswith(("norm1.bias", "norm2.bias", "norm.bias", "q_bias", "v_bias")):
                p.copy_(0.2 * torch.randn_like(p))
            elif name.endswith("relative_position_bias_table"):
                p.copy_(0.5 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("blocks", [0, 1, 2])
def test_matches_jvp(variant, blocks):
    model = make_beit(**VARIANTS[variant])
    tangent = dp_taft.linearize(model, blocks=blocks)
    assert type(tangent) is dp_taft.tangent.TangentBeit
    randomize_deltas(tangent)
    x = images(model)
    want = jvp_reference(model, tangent, x)
    assert relative_error(tangent(x), want) <= 1e-9
    assert relative_error(model(x), want) > 1e-3


@pytest.mark.skipif("timm.layers.mlp.SwiGLU" not in dp_taft.tangent.supported_types(),
                    reason="no SwiGLU tangent rule registered")
def test_swiglu_mlp_matches_jvp():
    model = make_beit(use_rel_pos_bias=True, swiglu_mlp=True, init_values=0.1)
    tangent = dp_taft.linearize(model, blocks=2)
    randomize_deltas(tangent)
    x = images(model)
    assert relative_error(tangent(x), jvp_reference(model, tangent, x)) <= 1e-9


def test_every_beit_parameter_of_the_suffix_has_a_delta():
    model = make_beit(**VARIANTS["rel_pos_layer_scale"])
    tangent = dp_taft.linearize(model, blocks=1)
    suffix = {n for n, _ in model.named_parameters() if n.startswith(("blocks.1.", "norm.", "fc_norm.", "head."))}
    assert set(tangent.deltas()) == suffix
    assert {"blocks.1.gamma_1", "blocks.1.attn.q_bias", "blocks.1.attn.relative_position_bias_table"} <= suffix


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_zero_delta_is_the_model(variant):
    model = make_beit(**VARIANTS[variant])
    tangent = dp_taft.linearize(model, blocks=2)
    x = images(model)
    torch.testing.assert_close(tangent(x), model(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["ce", "square"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_hooks_match_vmap_grad(variant, kind):
    model = make_beit(**VARIANTS[variant])
    tangent, h, y = perturbed_tangent_batch(model, images(model, n=6))
    view = FromPrefix(tangent)
    names = {id(p): n for n, p in tangent.named_parameters()}
    trainable = {n: p.detach() for n, p in tangent.named_parameters() if p.requires_grad}
    reference = vmap_grad_samples(tangent, h, y, kind)
    opacus_grad_samples(view, h, y, kind)
    got = {names[id(p)]: p.grad_sample for p in tangent.parameters() if p.requires_grad}
    assert all(got[n].shape == (6, *trainable[n].shape) for n in got)
    assert_grads_close(got, reference, rtol=1e-9)


@pytest.mark.parametrize("kind", ["ce", "square"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("method", ["taft", "nlft"])
def test_bk_clipped_sum_equals_hooks_mode(method, variant, kind):
    model = make_beit(**VARIANTS[variant])
    if method == "taft":
        trained = dp_taft.linearize(model, blocks=2).train()
        randomize_deltas(trained, scale=0.05)
    else:
        trained = nlft(model, 2).train()
    assert resolve_grad_sample_mode(trained, "auto", per_sample_needed=False) == "bk"
    h = trained.prefix(images(model, n=6))
    y = torch.arange(6) % model.num_classes
    samples = hooks_reference(trained, h, y, kind)
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in samples.values()], dim=1).norm(dim=1)
    clip = float(norms.median())
    want, _, factors = clip_sum(samples, clip)
    assert (factors < 1).any() and (factors == 1).any()
    got, bk_norms = bk_grads(trained, h, y, kind, clip)
    assert_close(got, want)
    torch.testing.assert_close(bk_norms, norms, rtol=1e-10, atol=0)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_nlft_is_the_model_and_its_grads_are_exact(variant):
    model = make_beit(**VARIANTS[variant])
    method = nlft(model, 2).train()
    x = images(model, n=5)
    y = torch.arange(5) % model.num_classes
    torch.testing.assert_close(method(x), model(x), rtol=1e-12, atol=1e-12)
    depth = len(model.blocks)
    suffix = [p for n, p in model.named_parameters() if n.startswith((f"blocks.{depth - 2}.", f"blocks.{depth - 1}."))]
    assert sum(p.numel() for p in method.blocks.parameters() if p.requires_grad) == sum(p.numel() for p in suffix)
    h = method.prefix(x)
    names = {id(p): n for n, p in method.named_parameters()}
    reference = vmap_grad_samples(method, h, y, "ce")
    opacus_grad_samples(FromPrefix(method), h, y, "ce")
    assert_grads_close({names[id(p)]: p.grad_sample for p in method.parameters() if p.requires_grad}, reference,
                       rtol=1e-9)


def test_linear_probe_caches_pooled_features():
    model = make_beit(**VARIANTS["rel_pos_layer_scale"])
    probe = linear_probe(model)
    x = images(model, n=3)
    assert probe.prefix(x).shape == (3, 32)
    torch.testing.assert_close(probe(x), model(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kwargs, where", [(dict(attn_drop_rate=0.1), "blocks.1.attn.attn_drop"),
                                           (dict(drop_path_rate=0.5), "blocks.1.drop_path1")])
def test_refuses_stochastic_layers_with_their_path(kwargs, where):
    with pytest.raises(dp_taft.UnsupportedModelError, match=where):
        dp_taft.linearize(make_beit(use_rel_pos_bias=True, **kwargs), blocks=1)


@pytest.mark.parametrize("build", [lambda m: dp_taft.linearize(m, blocks=1), lambda m: nlft(m, 1)],
                         ids=["taft1", "nlft1"])
def test_private_fit_stays_within_epsilon(build):
    torch.manual_seed(0)
    model = beit.Beit(**{**BASE, **VARIANTS["rel_pos_layer_scale"]}).eval()
    result = dp_taft.fit(build(model), easy_dataset(48), epsilon=2.0, delta=1e-3, epochs=1, batch_size=16,
                         lr=0.1, quiet=True, seed=0)
    assert result.steps > 0
    assert 0 < result.report.epsilon <= 2.0
