"""Opacus per-sample gradients of Δw are exact, in hooks and ghost mode, with no fallback."""

from __future__ import annotations

import copy

import pytest
import torch
from opacus import GradSampleModule, PrivacyEngine
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from torch.func import functional_call, grad, vmap

import dp_taft
from dp_taft.privacy.data import FromPrefix
from vit_cases import (  # noqa: F401 -- forbid_functorch_fallback: an autouse fixture
    VARIANTS, forbid_functorch_fallback, images, make_vit, per_example_loss, randomize_deltas,
)


def opacus_grad_samples(model, x, y, kind):
    gs_model = GradSampleModule(model, loss_reduction="sum")
    per_example_loss(gs_model(x), y, kind).sum().backward()
    return gs_model


def vmap_grad_samples(model, h, y, kind):
    """Per-example gradients {name: (B, *shape)} of the trainable parameters by vmap(grad) on the prefix ``h``."""
    view = FromPrefix(model)
    trainable = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    def loss_ref(params, h1, y1):
        logits = functional_call(view, {f"model.{k}": v for k, v in params.items()}, (h1[None],), strict=False)
        return per_example_loss(logits, y1[None], kind).sum()

    return vmap(grad(loss_ref), in_dims=(None, 0, 0))(trainable, h, y)


def perturbed_tangent_batch(model, x):
    """TAFT-2 of ``model`` at small random Δ (train mode), the prefix of the images ``x`` and labels for them."""
    tangent = dp_taft.linearize(model, blocks=2).train()
    randomize_deltas(tangent, scale=0.05)
    return tangent, tangent.prefix(x), torch.arange(x.shape[0]) % model.num_classes


def relative_error(a, b):
    return ((a - b).norm() / b.norm()).item()


def assert_grads_close(got: dict, want: dict, rtol: float = 1e-8) -> None:
    """Relative error over all parameters together, and per parameter.

    Some gradients are exactly zero in exact arithmetic (e.g. a key-norm bias: adding
    a constant to every key shifts each score row uniformly, which softmax ignores), so
    a parameter's own norm is only a meaningful scale above round-off of the total.
    """
    total = torch.cat([w.flatten() for w in want.values()]).norm()
    assert relative_error(torch.cat([got[n].flatten() for n in want]), torch.cat([w.flatten() for w in want.values()])) <= rtol
    for name in want:
        assert (got[name] - want[name]).norm() <= rtol * max(want[name].norm(), 1e-6 * total), name


@pytest.mark.parametrize("kind", ["ce", "square"])
@pytest.mark.parametrize("variant", ["base", "layer_scale", "qk_norm", "no_class_token_avg", "registers", "scale_norms"])
def test_hooks_match_vmap_grad(variant, kind):
    model = make_vit(**VARIANTS[variant])
    tangent, h, y = perturbed_tangent_batch(model, images(model, n=6))

    names = {id(p): n for n, p in tangent.named_parameters()}
    trainable = {n: p.detach() for n, p in tangent.named_parameters() if p.requires_grad}
    reference = vmap_grad_samples(tangent, h, y, kind)
    gs_model = opacus_grad_samples(FromPrefix(tangent), h, y, kind)  # on cached prefix tokens, as fit does
    got = {names[id(p)]: p.grad_sample for p in tangent.parameters() if p.requires_grad}
    assert all(got[n].shape == (6, *trainable[n].shape) for n in got)
    assert_grads_close(got, reference)
    del gs_model


@pytest.mark.parametrize("kind", ["ce", "square"])
@pytest.mark.parametrize("variant", ["base", "layer_scale", "qk_norm", "no_class_token_avg"])
def test_zero_delta_grads_equal_nonlinear_model(variant, kind):
    """At Δw = 0, ∂L/∂Δw is the ordinary gradient ∂L/∂w at w0 (Opacus on the original model)."""
    blocks = 2
    model = make_vit(**VARIANTS[variant])
    tangent = dp_taft.linearize(model, blocks=blocks).train()
    x = images(model, n=5)
    y = torch.arange(5) % model.num_classes

    nonlinear = copy.deepcopy(model).train()
    depth = len(nonlinear.blocks)
    trainable = set(tangent.deltas())
    for name, p in nonlinear.named_parameters():
        p.requires_grad_(name in trainable)
    assert {n for n, p in nonlinear.named_parameters() if p.requires_grad} == trainable
    assert all(n.startswith((f"blocks.{depth - 2}", f"blocks.{depth - 1}", "norm", "fc_norm", "head")) for n in trainable)

    opacus_grad_samples(nonlinear, x, y, kind)
    opacus_grad_samples(tangent, x, y, kind)
    params = dict(nonlinear.named_parameters())
    assert_grads_close(
        {name: delta.grad_sample for name, delta in tangent.deltas().items()},
        {name: params[name].grad_sample for name in trainable},
    )


@pytest.mark.parametrize("variant", ["base", "layer_scale", "qk_norm"])
def test_every_trainable_layer_has_exact_samplers(variant):
    tangent = dp_taft.linearize(make_vit(**VARIANTS[variant]), blocks=2)
    hooks, ghost = GradSampleModule.GRAD_SAMPLERS, GradSampleModuleFastGradientClipping.NORM_SAMPLERS
    for name, module in tangent.named_modules():
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            assert type(module) in hooks, name
            assert type(module) in ghost, name


def dp_update(model, x, y, mode, clip):
    """One DP-SGD step with noise off, through PrivacyEngine.make_private; returns the update."""
    torch.manual_seed(0)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=len(x))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    engine = PrivacyEngine()
    criterion = torch.nn.CrossEntropyLoss()
    out = engine.make_private(
        module=model, optimizer=opt, data_loader=loader, noise_multiplier=0.0, max_grad_norm=clip,
        poisson_sampling=False, grad_sample_mode=mode, criterion=criterion,
    )
    private_model, private_opt, *rest = out
    criterion = rest[0] if mode == "ghost" else criterion  # ghost returns (model, opt, criterion, loader)
    private_opt.zero_grad()
    criterion(private_model(x), y).backward()
    private_opt.step()
    return {n: before[n] - p.detach() for n, p in model.named_parameters() if p.requires_grad}


def test_ghost_equals_hooks():
    model = make_vit(init_values=0.3, qk_norm=True)
    x = images(model, n=8)
    y = torch.arange(8) % model.num_classes
    results = {}
    for mode in ("hooks", "ghost"):
        tangent = dp_taft.linearize(model, blocks=2)
        randomize_deltas(tangent, scale=0.05)
        results[mode] = dp_update(tangent.train(), x, y, mode, clip=1e-3)
    assert torch.cat([u.flatten() for u in results["hooks"].values()]).norm() > 0
    assert_grads_close(results["ghost"], results["hooks"])


def test_per_sample_only_mode_skips_summed_grad_and_keeps_grad_samples():
    model = make_vit(init_values=0.3)
    x = images(model, n=6)
    y = torch.arange(6) % model.num_classes
    runs = {}
    for skip in (False, True):
        tangent = dp_taft.linearize(model, blocks=2).train()
        randomize_deltas(tangent, scale=0.05)
        gs_model = GradSampleModule(tangent, loss_reduction="sum")
        if skip:
            with dp_taft.tangent.per_sample_gradients_only(tangent):
                per_example_loss(gs_model(x), y, "ce").sum().backward()
        else:
            per_example_loss(gs_model(x), y, "ce").sum().backward()
        runs[skip] = {n: (p.grad, p.grad_sample) for n, p in tangent.named_parameters() if p.requires_grad}
        delta_linear = [m for m in tangent.modules() if isinstance(m, dp_taft.tangent.DeltaLinear)]
        assert delta_linear and all(m.summed_grad for m in delta_linear)  # restored on exit
    assert_grads_close({n: v[1] for n, v in runs[True].items()}, {n: v[1] for n, v in runs[False].items()}, rtol=1e-12)
    for name, (summed, _) in runs[True].items():
        is_linear = name.endswith((".qkv.delta.weight", ".qkv.delta.bias", ".proj.delta.weight", ".proj.delta.bias",
                                   ".fc1.delta.weight", ".fc1.delta.bias", ".fc2.delta.weight", ".fc2.delta.bias",
                                   "head.delta.weight", "head.delta.bias"))
        assert (summed is None) == is_linear, name
        assert runs[False][name][0] is not None, name


def test_hooks_dp_step_same_with_per_sample_only():
    model = make_vit()
    x = images(model, n=8)
    y = torch.arange(8) % model.num_classes
    updates = []
    for skip in (False, True):
        tangent = dp_taft.linearize(model, blocks=2).train()
        randomize_deltas(tangent, scale=0.05)
        if skip:
            with dp_taft.tangent.per_sample_gradients_only(tangent):
                updates.append(dp_update(tangent, x, y, "hooks", clip=1e-3))
        else:
            updates.append(dp_update(tangent, x, y, "hooks", clip=1e-3))
    assert_grads_close(updates[1], updates[0], rtol=1e-12)
