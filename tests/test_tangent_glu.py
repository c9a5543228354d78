"""QuickGELU, SiLU/sigmoid gates and timm's gated MLPs (SwiGLU, GluMlp, SwiGLUPacked) linearize exactly."""

from __future__ import annotations

import pytest
import timm
import torch

import dp_taft
from dp_taft.methods import nlft, taft
from dp_taft.privacy.bk_rules import BK_RULES
from dp_taft.privacy.bookkeeping import trainable_layers
from dp_taft.privacy.data import FromPrefix
from dp_taft.privacy.validate import resolve_grad_sample_mode
from fit_cases import easy_dataset, tiny_vit
from test_bookkeeping import check_median_clip_equals_hooks
from test_bookkeeping import assert_close as assert_bk_close
from test_tangent_exactness import check_matches_jvp
from test_tangent_grad_samples import assert_grads_close, opacus_grad_samples, vmap_grad_samples
from vit_cases import (  # noqa: F401 -- forbid_functorch_fallback: an autouse fixture
    forbid_functorch_fallback, images, make_vit, per_example_loss, randomize_deltas,
)

L = timm.layers
# name -> VisionTransformer kwargs. ViT passes its act_layer to the MLP (default GELU),
# overriding SwiGLUPacked's own SiLU: the SwiGLU forms name act_layer="silu" as timm's models do.
GLU_VARIANTS: dict[str, dict] = {
    "quick_gelu": dict(act_layer="quick_gelu"),
    "quick_gelu_class": dict(act_layer=L.QuickGELU),
    "silu_mlp": dict(act_layer="silu"),
    "swiglu": dict(mlp_layer=L.SwiGLU, act_layer="silu"),
    "swiglu_norm": dict(mlp_layer=L.SwiGLU, act_layer="silu", scale_mlp_norm=True),
    "swiglu_packed": dict(mlp_layer=L.SwiGLUPacked, act_layer="silu"),
    "swiglu_packed_norm": dict(mlp_layer=L.SwiGLUPacked, act_layer="silu", scale_mlp_norm=True, mlp_ratio=3),
    "geglu_gate_last": dict(mlp_layer=L.GluMlp),
    "glu_sigmoid": dict(mlp_layer=L.GluMlp, act_layer="sigmoid"),
    "glu_quick_gelu": dict(mlp_layer=L.GluMlp, act_layer=L.QuickGELU),
}


def make_glu_vit(variant: str, **kwargs) -> timm.models.VisionTransformer:
    """:func:`make_vit` with random MLP input layers too: timm's gated MLPs initialise the
    gate's weights near zero (bias 1), which would make the gate's tangent terms vanish."""
    model = make_vit(**GLU_VARIANTS[variant], **kwargs)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".mlp.fc1" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


@pytest.mark.parametrize("variant", sorted(GLU_VARIANTS))
@pytest.mark.parametrize("blocks", [1, 3])
def test_matches_jvp(variant, blocks):
    model = make_glu_vit(variant)
    check_matches_jvp(model, dp_taft.linearize(model, blocks=blocks))


@pytest.mark.parametrize("variant", ["swiglu", "swiglu_packed", "quick_gelu"])
def test_zero_delta_is_the_model(variant):
    model = make_glu_vit(variant)
    tangent = dp_taft.linearize(model, blocks=2)
    x = images(model)
    torch.testing.assert_close(tangent(x), model(x), rtol=1e-12, atol=1e-12)


def test_deltas_named_like_the_original():
    model = make_glu_vit("swiglu_norm")
    deltas = dp_taft.linearize(model, blocks=1).deltas()
    params = dict(model.named_parameters())
    assert {n for n in deltas if ".mlp." in n} == {n for n in params if n.startswith("blocks.2.mlp.")}
    assert all(deltas[n].shape == params[n].shape for n in deltas)


@pytest.mark.parametrize("kind", ["ce", "square"])
@pytest.mark.parametrize("variant", ["quick_gelu", "swiglu", "swiglu_norm", "swiglu_packed_norm", "glu_sigmoid"])
def test_hooks_match_vmap_grad(variant, kind):
    model = make_glu_vit(variant)
    tangent = dp_taft.linearize(model, blocks=2).train()
    randomize_deltas(tangent, scale=0.05)
    h = tangent.prefix(images(model, n=6))
    y = torch.arange(6) % model.num_classes
    names = {id(p): n for n, p in tangent.named_parameters()}
    reference = vmap_grad_samples(tangent, h, y, kind)
    opacus_grad_samples(FromPrefix(tangent), h, y, kind)
    got = {names[id(p)]: p.grad_sample for p in tangent.parameters() if p.requires_grad}
    assert_grads_close(got, reference, rtol=1e-9)


@pytest.mark.parametrize("kind", ["ce", "square"])
@pytest.mark.parametrize("variant", ["quick_gelu", "swiglu_norm", "swiglu_packed", "geglu_gate_last"])
def test_bookkeeping_clipped_sum_equals_hooks(variant, kind):
    model = make_glu_vit(variant)
    tangent = dp_taft.linearize(model, blocks=2).train()
    assert all(type(m) in BK_RULES for _, m in trainable_layers(tangent))  # only Linear/LayerNorm Δ
    assert resolve_grad_sample_mode(tangent, "auto", per_sample_needed=False) == "bk"
    randomize_deltas(tangent, scale=0.05)
    h = tangent.prefix(images(model, n=6))
    y = torch.arange(6) % model.num_classes
    check_median_clip_equals_hooks(tangent, h, y, kind, close=assert_bk_close)


@pytest.mark.parametrize("method", [taft, nlft], ids=["taft1", "nlft1"])
@pytest.mark.parametrize("variant", ["quick_gelu", "swiglu", "swiglu_packed"])
def test_private_fit_runs_within_budget(variant, method):
    model = method(tiny_vit(**GLU_VARIANTS[variant]), 1)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    result = dp_taft.fit(model, easy_dataset(48), epsilon=2.0, delta=1e-3, epochs=1, batch_size=16, lr=0.1,
                         quiet=True, seed=0)
    assert result.steps == 3
    assert result.report.epsilon <= 2.0
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters() if p.requires_grad)


class UnregisteredSiLU(torch.nn.SiLU):
    """A subclass has no tangent rule (the registry matches exact classes)."""


@pytest.mark.parametrize("mlp_layer", [L.SwiGLU, L.GluMlp])
def test_gate_activation_without_rule_is_refused_by_path(mlp_layer):
    match = r"'blocks\.2\.mlp\.act' of type \S*UnregisteredSiLU"
    with pytest.raises(dp_taft.tangent.UnsupportedModelError, match=match):
        dp_taft.linearize(make_vit(mlp_layer=mlp_layer, act_layer=UnregisteredSiLU), blocks=1)
