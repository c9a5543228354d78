"""The tangent model equals torch.func.jvp of the original timm model (float64)."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call, jvp

import dp_taft
from vit_cases import VARIANTS, images, make_vit, randomize_deltas


def jvp_reference(model, tangent, x):
    """f(x; w0) + J(x; w0)·Δw by forward-mode AD on the original model."""
    for blk in model.blocks:
        blk.attn.fused_attn = False  # SDPA has no forward-mode rule
    params = dict(model.named_parameters())
    deltas = {k: v.detach() for k, v in tangent.deltas().items()}
    primals = {k: params[k].detach() for k in deltas}

    def f(sub):
        return functional_call(model, {**params, **sub}, (x,))

    out, jdw = jvp(f, (primals,), (deltas,))
    return out + jdw


def relative_error(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("blocks", [0, 2])
def test_matches_jvp(variant, blocks):
    model = make_vit(**VARIANTS[variant])
    check_matches_jvp(model, dp_taft.linearize(model, blocks=blocks))


def check_matches_jvp(model, tangent):
    """At random Δ, the tangent model equals the jvp of ``model`` (in relative error), and the Δ move the output."""
    randomize_deltas(tangent)
    x = images(model)
    got = tangent(x)
    want = jvp_reference(model, tangent, x)
    assert relative_error(got, want) <= 1e-9
    # The perturbation must actually move the output, or the check above is vacuous.
    assert relative_error(model(x), want) > 1e-3


def test_all_blocks_linearized():
    model = make_vit(depth=2)
    tangent = dp_taft.linearize(model, blocks=2)
    randomize_deltas(tangent)
    x = images(model)
    assert relative_error(tangent(x), jvp_reference(model, tangent, x)) <= 1e-9


@pytest.mark.parametrize("variant", ["base", "no_class_token_avg", "layer_scale", "qk_norm"])
def test_zero_delta_is_the_model(variant):
    model = make_vit(**VARIANTS[variant])
    tangent = dp_taft.linearize(model, blocks=2)
    x = images(model)
    torch.testing.assert_close(tangent(x), model(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("fused", [True, False])
def test_independent_of_fused_attention(fused):
    """The tangent suffix never uses SDPA; the prefix may, with the same result."""
    model = make_vit(depth=4)
    for blk in model.blocks:
        blk.attn.fused_attn = fused
    tangent = dp_taft.linearize(model, blocks=2)
    randomize_deltas(tangent)
    x = images(model)
    reference = jvp_reference(make_vit(depth=4), tangent, x)
    assert relative_error(tangent(x), reference) <= 1e-9


def test_float32_close_to_float64():
    model64 = make_vit()
    tangent64 = dp_taft.linearize(model64, blocks=2)
    randomize_deltas(tangent64)
    tangent32 = dp_taft.linearize(make_vit().float(), blocks=2)
    tangent32.load_delta_state_dict({k: v.float() for k, v in tangent64.delta_state_dict().items()})
    x = images(model64)
    assert relative_error(tangent32(x.float()).double(), tangent64(x)) <= 1e-5
