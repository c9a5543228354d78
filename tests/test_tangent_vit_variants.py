"""DeiT distilled ViTs and MAP (SigLIP) attention pooling: tangent, per-sample gradients, BK, baselines, fit."""

from __future__ import annotations

from itertools import product

import pytest
import timm
import timm.layers
import torch
import torch.nn as nn
from fit_cases import NUM_CLASSES, easy_dataset
from test_bookkeeping import hooks_reference as hooks_samples
from test_bookkeeping import trainable
from test_tangent_grad_samples import vmap_grad_samples
from timm.models.deit import VisionTransformerDistilled
from torch.func import functional_call, jvp
from vit_cases import (  # noqa: F401 -- forbid_functorch_fallback: an autouse fixture
    BASE,
    forbid_functorch_fallback,
    per_example_loss,
    randomize_deltas,
)

import dp_taft
import dp_taft.privacy.bookkeeping as bk
from dp_taft.methods import linear_probe, nlft, taft
from dp_taft.privacy.data import FromPrefix
from dp_taft.privacy.validate import require_exact_layers, resolve_grad_sample_mode
from dp_taft.tangent import ParameterAdd, UnsupportedModelError
from dp_taft.tangent.pooling import LatentQueryPool

N = 6


def _pool(**kwargs) -> timm.layers.AttentionPoolLatent:
    return timm.layers.AttentionPoolLatent(BASE["embed_dim"], num_heads=2, norm_layer=nn.LayerNorm, **kwargs)


# name -> (model class, VisionTransformer kwargs, replacement attention pool or None)
CASES = {
    "distilled": (VisionTransformerDistilled, {}, None),
    "distilled_layer_scale_qk_norm": (VisionTransformerDistilled, dict(init_values=0.3, qk_norm=True), None),
    "map_siglip": (timm.models.VisionTransformer, dict(global_pool="map", class_token=False), None),
    "map_class_token_registers": (timm.models.VisionTransformer, dict(global_pool="map", reg_tokens=2), None),
    "map_pool_options": (
        timm.models.VisionTransformer, dict(global_pool="map", class_token=False),
        lambda: _pool(latent_len=3, pool_type="avg", qk_norm=True, pos_embed="abs", feat_size=16,
                      act_layer=timm.layers.GELUTanh),
    ),
    "map_no_q_proj": (timm.models.VisionTransformer, dict(global_pool="map", class_token=False),
                      lambda: _pool(q_proj=False, latent_len=2)),
}


def make_model(case: str, seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Module:
    """A small random model of ``case`` with random LayerNorm affine parameters, math attention."""
    cls, kwargs, pool = CASES[case]
    torch.manual_seed(seed)
    model = cls(**{**BASE, **kwargs})
    if pool is not None:
        model.attn_pool = pool()
    model = model.to(dtype)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.copy_(1 + 0.3 * torch.randn_like(m.weight))
                m.bias.copy_(0.2 * torch.randn_like(m.bias))
            if hasattr(m, "fused_attn"):
                m.fused_attn = False  # SDPA has no forward-mode rule (jvp reference)
    return model.eval()


def images(n: int = N, seed: int = 1, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def jvp_reference(model: nn.Module, tangent: dp_taft.TangentViT, x: torch.Tensor) -> torch.Tensor:
    """f(x; w0) + J(x; w0)·Δw by forward-mode AD on the original model."""
    params = dict(model.named_parameters())
    deltas = {k: v.detach() for k, v in tangent.deltas().items()}
    out, jdw = jvp(lambda sub: functional_call(model, {**params, **sub}, (x,)),
                   ({k: params[k].detach() for k in deltas},), (deltas,))
    return out + jdw


@pytest.mark.parametrize("blocks", [0, 2])
@pytest.mark.parametrize("case", sorted(CASES))
def test_tangent_matches_jvp(case, blocks):
    model = make_model(case)
    tangent = dp_taft.linearize(model, blocks=blocks)
    x = images()
    torch.testing.assert_close(tangent(x), model(x), rtol=1e-12, atol=1e-12)  # Δw = 0: the model itself
    randomize_deltas(tangent)
    want = jvp_reference(model, tangent, x)
    assert relative_error(tangent(x), want) <= 1e-9
    assert relative_error(model(x), want) > 1e-3  # the perturbation moves the output


def test_deltas_are_named_and_shaped_as_the_source():
    for case in ("distilled", "map_pool_options"):
        model = make_model(case)
        params = dict(model.named_parameters())
        deltas = dp_taft.linearize(model, blocks=1).deltas()
        assert all(params[n].shape == d.shape for n, d in deltas.items())
        extra = {"head_dist.weight"} if case == "distilled" else {"attn_pool.latent", "attn_pool.pos_embed"}
        assert extra <= deltas.keys()


def assert_close(got: dict, want: dict, rtol: float) -> None:
    """Relative error over all parameters, and per parameter above round-off of the total."""
    total = torch.cat([w.flatten() for w in want.values()]).norm()
    assert total > 0
    assert torch.cat([(got[n] - w).flatten() for n, w in want.items()]).norm() <= rtol * total
    for name, w in want.items():
        assert got[name].shape == w.shape, name
        assert (got[name] - w).norm() <= rtol * max(w.norm(), 1e-6 * total), name


NLFT_REFUSED = {("map_pool_options", "nlft")}  # a pool position embedding (see test_refusals)


def build(case: str, method: str) -> nn.Module:
    model = make_model(case)
    built = {"taft": lambda: taft(model, 2), "nlft": lambda: nlft(model, 1), "probe": lambda: linear_probe(model)}
    out = built[method]().train()
    if method == "taft":
        randomize_deltas(out, scale=0.05)
    return out


@pytest.mark.parametrize("kind", ["ce", "square"])
@pytest.mark.parametrize(("case", "method"), [(c, m) for c, m in product(sorted(CASES), ["taft", "nlft", "probe"])
                                              if (c, m) not in NLFT_REFUSED])
def test_hooks_match_vmap_grad(case, method, kind):
    model = build(case, method)
    h = model.prefix(images())
    y = torch.arange(N) % model.num_classes
    assert_close(hooks_samples(model, h, y, kind), vmap_grad_samples(model, h, y, kind), rtol=1e-9)


def clipped_sum(samples: dict, clip: float) -> dict:
    """Opacus' flat clipping: c_i = min(1, C / (‖g_i‖ + 1e-6)), then Σ_i c_i g_i."""
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in samples.values()], dim=1).norm(dim=1)
    factors = (clip / (norms + 1e-6)).clamp(max=1.0)
    assert (factors < 1).any() and (factors == 1).any()
    return {n: torch.einsum("i,i...->...", factors, g) for n, g in samples.items()}


@pytest.mark.parametrize(("case", "method"), [(c, m) for c, m in product(sorted(CASES), ["taft", "nlft"])
                                              if (c, m) not in NLFT_REFUSED])
def test_bk_equals_hooks(case, method):
    model = build(case, method)
    assert resolve_grad_sample_mode(model, "auto", per_sample_needed=False) == "bk"
    h = model.prefix(images())
    y = torch.arange(N) % model.num_classes
    samples = hooks_samples(model, h, y, "ce")
    clip = float(torch.stack([g.flatten(1).norm(dim=1) for g in samples.values()], 1).norm(dim=1).median())
    wrapped = bk.make_bk_module(FromPrefix(model), clip)
    per_example_loss(wrapped(h), y, "ce").mean().backward()
    got = {n: p.grad.detach().clone() for n, p in trainable(model).items()}
    wrapped.to_standard_module()
    assert_close(got, clipped_sum(samples, clip), rtol=1e-10)


def test_auto_falls_back_to_hooks_without_a_bk_rule(monkeypatch):
    """Without the ParameterAdd BK rule, "auto" runs Opacus' hooks (the grad sampler is exact)
    and "bk" refuses, naming the layer."""
    model = build("map_siglip", "taft")
    monkeypatch.delitem(bk.BK_RULES, ParameterAdd)
    assert resolve_grad_sample_mode(model, "auto", per_sample_needed=False) == "hooks"
    require_exact_layers(model, "hooks")
    require_exact_layers(model, "ghost")
    with pytest.raises(UnsupportedModelError, match=r"attn_pool\.latent\.delta.*ParameterAdd"):
        resolve_grad_sample_mode(model, "bk", per_sample_needed=False)


def test_baselines_follow_timm():
    """NLFT and the probe compute the model's own function; each trains its extra head or pool."""
    for case in ("distilled", "map_siglip"):
        model = make_model(case)
        x = images()
        for method in (nlft(model, 1), linear_probe(model)):
            torch.testing.assert_close(method.train()(x), model(x), rtol=1e-12, atol=1e-12)
        probe = linear_probe(model)
        assert probe.prefix(x).shape == ((N, 2, BASE["embed_dim"]) if case == "distilled" else (N, BASE["embed_dim"]))
        names = trainable(nlft(model, 1))
        assert ("net.head_dist.weight" if case == "distilled" else "net.attn_pool.latent.weight") in names


def test_refusals():
    model = make_model("distilled")
    model.set_distilled_training(True)
    with pytest.raises(UnsupportedModelError, match="set_distilled_training"):
        dp_taft.linearize(model, blocks=1)
    with pytest.raises(UnsupportedModelError, match="set_distilled_training"):
        nlft(model, 1)
    model = make_model("map_siglip")
    model.attn_pool.pool = ""
    with pytest.raises(UnsupportedModelError, match=r"'attn_pool' \(timm\.layers\..*AttentionPoolLatent\): pool_type"):
        dp_taft.linearize(model, blocks=1)
    with pytest.raises(UnsupportedModelError, match="pos_embed"):
        nlft(make_model("map_pool_options"), 1)
    with pytest.raises(UnsupportedModelError, match="prr"):
        dp_taft.linearize(timm.models.VisionTransformer(**BASE, global_pool="prr"), blocks=1)
    assert isinstance(nlft(make_model("map_siglip"), 0).net.attn_pool, LatentQueryPool)


@pytest.mark.parametrize("method", ["taft", "nlft"])
@pytest.mark.parametrize("case", ["distilled", "map_siglip"])
def test_private_fit_reports_at_most_the_target(case, method):
    torch.manual_seed(0)
    cls, kwargs, _ = CASES[case]
    model = cls(**{**BASE, **kwargs, "num_classes": NUM_CLASSES})
    built = taft(model, 1) if method == "taft" else nlft(model, 1)
    result = dp_taft.fit(built, easy_dataset(48), epsilon=3.0, delta=1e-3, epochs=1, batch_size=16,
                         max_grad_norm=1.0, lr=0.1, quiet=True)
    assert result.steps == 3
    assert 0.9 * 3.0 <= result.report.epsilon <= 3.0
    assert all(torch.isfinite(p).all() for p in built.parameters())
