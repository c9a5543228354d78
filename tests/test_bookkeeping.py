"""Book-keeping clipping (dp_taft.privacy.bookkeeping) equals Opacus' hooks mode exactly."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from opacus import GradSampleModule, PrivacyEngine
from opacus.optimizers import DPOptimizerFastGradientClipping, get_optimizer_class
from torch.func import functional_call, grad, vmap

import dp_taft
import dp_taft.privacy.bk_kernels as bk_kernels
import dp_taft.privacy.bk_rules as bk_rules
import dp_taft.privacy.bookkeeping as bk
from dp_taft import methods
from dp_taft.privacy.data import FromPrefix
from dp_taft.tangent import DeltaLinear, UnsupportedModelError
from vit_cases import (  # noqa: F401 -- forbid_functorch_fallback: an autouse fixture
    VARIANTS, forbid_functorch_fallback, images, make_vit, per_example_loss, randomize_deltas,
)

N = 6


def setup(variant="base", n=N, **model_kw):
    model = make_vit(**VARIANTS[variant], **model_kw)
    tangent = dp_taft.linearize(model, blocks=2).train()
    randomize_deltas(tangent, scale=0.05)
    h = tangent.prefix(images(model, n=n))
    y = torch.arange(n) % model.num_classes
    return tangent, h, y


def trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def hooks_reference(model, h, y, kind):
    """Per-example gradients from Opacus' hooks (sum reduction): {name: (B, *shape)}."""
    gs_model = GradSampleModule(FromPrefix(model), loss_reduction="sum")
    per_example_loss(gs_model(h), y, kind).sum().backward()
    out = {n: p.grad_sample.detach().clone() for n, p in trainable(model).items()}
    gs_model.to_standard_module()
    for p in model.parameters():
        p.grad = None
    return out


def clip_sum(samples, clip):
    """Opacus' flat clipping: c_i = min(1, C / (‖g_i‖ + 1e-6)), then Σ_i c_i g_i."""
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in samples.values()], dim=1).norm(dim=1)
    factors = (clip / (norms + 1e-6)).clamp(max=1.0)
    return {n: torch.einsum("i,i...->...", factors, g) for n, g in samples.items()}, norms, factors


def bk_grads(model, h, y, kind, clip, reduction="mean", method="auto"):
    wrapped = bk.make_bk_module(FromPrefix(model), clip, loss_reduction=reduction, norm_method=method)
    losses = per_example_loss(wrapped(h), y, kind)
    (losses.mean() if reduction == "mean" else losses.sum()).backward()
    out = {n: p.grad.detach().clone() for n, p in trainable(model).items()}
    norms = wrapped.per_sample_gradient_norms
    wrapped.to_standard_module()
    for p in model.parameters():
        p.grad = None
    return out, norms


def assert_close(got: dict, want: dict, rtol: float = 1e-10, floor: float = 1e-6) -> None:
    """Relative error over all parameters, and per parameter against ``floor`` times the total's
    scale (some gradients are exactly zero in exact arithmetic, e.g. a key-norm bias)."""
    flat_want = torch.cat([w.flatten() for w in want.values()])
    flat_got = torch.cat([got[n].flatten() for n in want])
    total = flat_want.norm()
    assert total > 0
    assert ((flat_got - flat_want).norm() / total).item() <= rtol
    for name, w in want.items():
        assert got[name].shape == w.shape, name
        assert (got[name] - w).norm() <= rtol * max(w.norm(), floor * total), name


@pytest.mark.parametrize("kind", ["ce", "square"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_clipped_sum_equals_hooks_mode(variant, kind):
    tangent, h, y = setup(variant)
    check_median_clip_equals_hooks(tangent, h, y, kind)


def check_median_clip_equals_hooks(tangent, h, y, kind, close=None):
    """Book-keeping's clipped sum and norms equal the hooks' at a clip that clips about half the examples."""
    samples = hooks_reference(tangent, h, y, kind)
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in samples.values()], dim=1).norm(dim=1)
    clip = float(norms.median())  # about half the examples are clipped
    want, _, factors = clip_sum(samples, clip)
    assert (factors < 1).any() and (factors == 1).any()
    got, bk_norms = bk_grads(tangent, h, y, kind, clip)
    (close or assert_close)(got, want)
    torch.testing.assert_close(bk_norms, norms, rtol=1e-10, atol=0)


@pytest.mark.parametrize("kind", ["ce", "square"])
@pytest.mark.parametrize("variant", ["base", "qk_norm", "layer_scale", "registers", "no_class_token_avg", "scale_norms"])
def test_norms_equal_vmap_grad(variant, kind):
    tangent, h, y = setup(variant)
    view = FromPrefix(tangent)
    params = {n: p.detach() for n, p in trainable(tangent).items()}

    def loss_one(ps, h1, y1):
        logits = functional_call(view, {f"model.{k}": v for k, v in ps.items()}, (h1[None],), strict=False)
        return per_example_loss(logits, y1[None], kind).sum()

    reference = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, h, y)
    want = torch.stack([g.flatten(1).norm(dim=1) for g in reference.values()], dim=1).norm(dim=1)
    _, norms = bk_grads(tangent, h, y, kind, clip=1.0)
    torch.testing.assert_close(norms, want, rtol=1e-10, atol=0)


@pytest.mark.parametrize("variant", ["base", "shape", "no_qkv_bias"])
def test_ghost_and_direct_norms_agree(variant, monkeypatch):
    tangent, h, y = setup(variant)
    results = {m: bk_grads(tangent, h, y, "ce", clip=0.05, method=m) for m in bk.NORM_METHODS}
    monkeypatch.setattr(bk_kernels, "CHUNK_ELEMENTS", 1)  # one example per chunk, every loop path
    chunked = {m: bk_grads(tangent, h, y, "ce", clip=0.05, method=m) for m in ("ghost", "direct")}
    for grads, norms in [*results.values(), *chunked.values()]:
        torch.testing.assert_close(norms, results["auto"][1], rtol=1e-12, atol=0)
        assert_close(grads, results["auto"][0], rtol=1e-12)


def test_norm_method_picks_cheaper():
    assert bk_kernels.norm_method(1, 768, 10) == "ghost"  # pooled head: ‖a‖²‖g‖²
    assert bk_kernels.norm_method(197, 768, 2304) == "ghost"  # ViT-B/16 qkv
    assert bk_kernels.norm_method(17, 24, 24) == "direct"  # tiny layer, many tokens
    assert bk_kernels.norm_method(4096, 64, 64) == "direct"


def test_auto_uses_both_branches(monkeypatch):
    """The tests' tiny ViT has both kinds of layer, so the exactness tests cover both."""
    chosen = []
    original = bk_rules.norm_method
    monkeypatch.setattr(bk_rules, "norm_method", lambda *a: chosen.append(original(*a)) or chosen[-1])
    tangent, h, y = setup("base")
    bk_grads(tangent, h, y, "ce", clip=1.0)
    assert set(chosen) == {"ghost", "direct"}


def test_sum_reduction_equals_mean_reduction():
    tangent, h, y = setup("layer_scale")
    mean, norms_mean = bk_grads(tangent, h, y, "square", clip=0.1, reduction="mean")
    total, norms_sum = bk_grads(tangent, h, y, "square", clip=0.1, reduction="sum")
    assert_close(total, mean, rtol=1e-12)
    torch.testing.assert_close(norms_sum, norms_mean, rtol=1e-12, atol=0)


def make_dp_optimizer(model, clip, noise=0.0, expected=N, seed=0):
    params = list(trainable(model).values())
    cls = get_optimizer_class(clipping="flat", distributed=False, grad_sample_mode="ghost")
    assert cls is DPOptimizerFastGradientClipping
    return cls(torch.optim.SGD(params, lr=1.0), noise_multiplier=noise, max_grad_norm=clip,
               expected_batch_size=expected, loss_reduction="mean", generator=torch.Generator().manual_seed(seed))


def bk_update(model, batches, clip, noise=0.0, expected=N):
    """One logical DP-SGD step over physical ``batches`` as fit runs it; returns before - after."""
    before = {n: p.detach().clone() for n, p in trainable(model).items()}
    wrapped = bk.make_bk_module(FromPrefix(model), clip)
    opt = make_dp_optimizer(model, clip, noise, expected)
    for i, (h, y) in enumerate(batches):
        opt.signal_skip_step(do_skip=i < len(batches) - 1)  # as BatchMemoryManager does
        if len(y) == 0:  # fit's empty Poisson batch: still a (noise-only) step
            for p in opt.params:
                p.grad = torch.zeros_like(p)
        else:
            F.cross_entropy(wrapped(h), y).backward()
        opt.step()
        opt.zero_grad()
    wrapped.to_standard_module()
    return {n: before[n] - p.detach() for n, p in trainable(model).items()}


def test_noiseless_step_equals_hooks_mode_update():
    model = make_vit(init_values=0.3, qk_norm=True)
    x, y = images(model, n=8), torch.arange(8) % model.num_classes
    updates = {}
    for mode in ("hooks", "bk"):
        tangent = dp_taft.linearize(model, blocks=2).train()
        randomize_deltas(tangent, scale=0.05)
        h = tangent.prefix(x)
        if mode == "bk":
            updates[mode] = bk_update(tangent, [(h, y)], clip=1e-3, expected=8)
            continue
        before = {n: p.detach().clone() for n, p in trainable(tangent).items()}
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(h, y), batch_size=8)
        private, opt, _ = PrivacyEngine().make_private(
            module=FromPrefix(tangent), optimizer=torch.optim.SGD(list(trainable(tangent).values()), lr=1.0),
            data_loader=loader, noise_multiplier=0.0, max_grad_norm=1e-3, poisson_sampling=False,
        )
        F.cross_entropy(private(h), y).backward()
        opt.step()
        updates[mode] = {n: before[n] - p.detach() for n, p in trainable(tangent).items()}
    assert_close(updates["bk"], updates["hooks"])


def test_physical_batches_accumulate_into_one_step():
    tangent, h, y = setup("layer_scale", n=7)
    state = {n: p.detach().clone() for n, p in trainable(tangent).items()}
    whole = bk_update(tangent, [(h, y)], clip=0.01, expected=7)
    tangent.load_state_dict(state, strict=False)
    split = bk_update(tangent, [(h[:3], y[:3]), (h[3:3], y[3:3]), (h[3:], y[3:])], clip=0.01, expected=7)
    assert_close(split, whole, rtol=1e-12)


def test_empty_batch_is_a_noise_only_step():
    tangent, h, y = setup("base")
    update = bk_update(tangent, [(h[:0], y[:0])], clip=1.0, noise=1.0, expected=4)
    flat = torch.cat([u.flatten() for u in update.values()])
    assert torch.isfinite(flat).all() and flat.std().item() == pytest.approx(1.0 / 4, rel=0.1)


def test_empty_forward_gives_zero_clipped_sum():
    tangent, h, y = setup("base")
    grads, norms = bk_grads(tangent, h[:0], y[:0], "ce", clip=1.0, reduction="sum")
    assert norms.shape == (0,) and all(torch.equal(g, torch.zeros_like(g)) for g in grads.values())


def test_nlft_matches_hooks_mode():
    model = make_vit(init_values=0.3)
    nlft = methods.nlft(model, 2).train()
    h, y = nlft.prefix(images(model, n=N)), torch.arange(N) % model.num_classes
    samples = hooks_reference(nlft, h, y, "ce")
    want, norms, _ = clip_sum(samples, clip=0.1)
    got, bk_norms = bk_grads(nlft, h, y, "ce", clip=0.1)
    assert_close(got, want)
    torch.testing.assert_close(bk_norms, norms, rtol=1e-10, atol=0)


def test_refuses_layer_without_rule():
    tangent, _, _ = setup("base")
    tangent.frozen_prefix.cls_token.requires_grad_(True)
    with pytest.raises(UnsupportedModelError, match=r"'model\.frozen_prefix' \(timm\.models\.vision_transformer"):
        bk.make_bk_module(FromPrefix(tangent), 1.0)
    with pytest.raises(UnsupportedModelError, match="torch.nn.modules.conv.Conv1d.*register_bk_rule"):
        bk.require_bk_layers(nn.Sequential(nn.Linear(3, 3), nn.Conv1d(3, 3, 1)))


def test_refuses_bad_arguments_and_tied_layer():
    layer = nn.Linear(3, 3).double()
    for kwargs in (dict(loss_reduction="none"), dict(norm_method="fast")):
        with pytest.raises(ValueError):
            bk.make_bk_module(layer, 1.0, **kwargs)
    with pytest.raises(ValueError, match="max_grad_norm"):
        bk.make_bk_module(layer, 0.0)
    tied = bk.make_bk_module(nn.Sequential(layer, layer), 1.0)
    with pytest.raises(NotImplementedError, match="parameter tying"):
        tied(torch.randn(2, 3, dtype=torch.float64))


def test_hooks_only_in_training_with_grad_and_removed_cleanly():
    tangent, h, y = setup("base")
    wrapped = bk.make_bk_module(FromPrefix(tangent), 1.0)
    deltas = [m for m in tangent.modules() if isinstance(m, DeltaLinear)]
    with torch.no_grad():
        wrapped(h)
    wrapped.eval()
    wrapped(h)
    assert not wrapped._pass.inputs
    wrapped.train()
    out = wrapped(h)
    assert len(wrapped._pass.inputs) > 0 and all(m.summed_grad for m in deltas)  # restored after forward
    F.cross_entropy(out, y).backward()
    assert not wrapped._pass.inputs and not wrapped._pass.states
    assert all(p.grad is not None for p in trainable(tangent).values())
    assert wrapped.to_standard_module() is wrapped._module
    for p in tangent.parameters():
        p.grad = None
    F.cross_entropy(FromPrefix(tangent)(h), y).backward()  # plain autograd again: summed gradients
    assert all(p.grad is not None for p in trainable(tangent).values()) and wrapped.per_sample_gradient_norms.shape == (N,)


def test_plain_forwards_of_the_wrapped_model_are_not_booked():
    """Only forwards through the wrapper are booked: a plain step in between changes nothing."""
    tangent, h, y = setup("layer_scale")
    wrapped = bk.make_bk_module(FromPrefix(tangent), 0.05)
    results = []
    for _ in range(2):
        F.cross_entropy(FromPrefix(tangent)(h), y).backward()  # ordinary autograd, summed gradients
        assert not wrapped._pass.inputs and not wrapped._pass.states
        F.cross_entropy(wrapped(h), y).backward()
        results.append({n: p.grad.clone() for n, p in trainable(tangent).items()})
    wrapped.to_standard_module()
    assert_close(results[1], results[0], rtol=1e-14)
    for p in tangent.parameters():
        p.grad = None
    want, _ = bk_grads(tangent, h, y, "ce", clip=0.05)
    assert_close(results[0], want, rtol=1e-14)


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


# (cpu, float64) is test_clipped_sum_equals_hooks_mode itself
@pytest.mark.parametrize(("device", "dtype"), [("cpu", torch.float32), pytest.param("cuda", torch.float64, marks=CUDA),
                                               pytest.param("cuda", torch.float32, marks=CUDA)])
def test_devices_and_dtypes_match_hooks_mode(device, dtype):
    """Against the float64 CPU reference: exact in float64 on any device, float32 to its round-off."""
    tangent, h, y = setup("layer_scale", n=8, qk_norm=True)
    want, norms, _ = clip_sum(hooks_reference(tangent, h, y, "ce"), clip=0.05)
    tangent = tangent.to(device, dtype)
    got, bk_norms = bk_grads(tangent, h.to(device, dtype), y.to(device), "ce", clip=0.05)
    rtol, floor = (1e-10, 1e-6) if dtype == torch.float64 else (1e-4, 1e-2)
    assert_close({n: g.cpu().double() for n, g in got.items()}, want, rtol=rtol, floor=floor)
    torch.testing.assert_close(bk_norms.cpu().double(), norms, rtol=rtol, atol=0)


def test_zero_gradient_rows_dropped_exactly(monkeypatch):
    """Token pooling: the last block's proj/fc1/fc2 keep the class-token row only, same result."""
    tangent, h, y = setup("base")
    kept = []
    original = bk.BookKeepingModule.nonzero_rows

    def spy(self, layer, a, g):
        out = original(self, layer, a, g)
        if not self._probing:  # the real batch, not the public dummy pass that finds the rows
            kept.append(out[1].shape[1])
        return out

    monkeypatch.setattr(bk.BookKeepingModule, "nonzero_rows", spy)
    dropped = bk_grads(tangent, h, y, "square", clip=0.05)
    assert sorted(kept).count(1) == 4  # head (pooled) + the last block's proj, fc1, fc2
    monkeypatch.setattr(bk.BookKeepingModule, "nonzero_rows", lambda self, layer, a, g: (a, g))
    dense = bk_grads(tangent, h, y, "square", clip=0.05)
    assert_close(dropped[0], dense[0], rtol=1e-12)
    torch.testing.assert_close(dropped[1], dense[1], rtol=1e-12, atol=0)


@pytest.mark.parametrize("deferred", [False, True])
def test_cached_rows_are_checked_every_pass(deferred):
    """Rows are found by the dummy pass and cached; a later batch whose dropped row is not
    zero (here: a NaN there) raises, at once (CPU: nothing written) or at the next forward
    (as on CUDA, where the check avoids a host sync), and the cache is rebuilt."""
    tangent, h, y = setup("base")
    wrapped = bk.make_bk_module(FromPrefix(tangent), 0.05)
    wrapped.defer_row_checks = deferred
    grads = []
    for _ in range(2):  # the second pass uses the cache: same result
        F.cross_entropy(wrapped(h), y).backward()
        grads.append({n: p.grad.clone() for n, p in trainable(tangent).items()})
    assert_close(grads[1], grads[0], rtol=1e-14)
    sparse = [layer for layer, (_, rows, _) in wrapped._rows.items() if rows is not None]
    assert len(sparse) == 3
    fc2 = tangent.blocks[-1].mlp.fc2.delta
    def poison(module, inputs, out):  # runs before BK's hook, so BK sees the NaN row
        out.register_hook(lambda g: g.index_fill(1, torch.tensor([1]), float("nan")))

    handle = fc2.register_forward_hook(poison, prepend=True)
    for p in tangent.parameters():
        p.grad = None
    if deferred:
        F.cross_entropy(wrapped(h), y).backward()  # the dropped NaN row is not in the (finite) update
        assert all(torch.isfinite(p.grad).all() for p in trainable(tangent).values())
        handle.remove()
        with pytest.raises(RuntimeError, match="still differentially private"):
            wrapped(h)
    else:
        with pytest.raises(RuntimeError, match="nothing was written"):
            F.cross_entropy(wrapped(h), y).backward()
        assert all(p.grad is None for p in trainable(tangent).values())
        handle.remove()
    assert not wrapped._rows
    F.cross_entropy(wrapped(h), y).backward()
    assert_close({n: p.grad for n, p in trainable(tangent).items()}, grads[0], rtol=1e-14)
    wrapped.to_standard_module()


def test_rows_are_structural_so_no_first_batch_can_make_a_later_one_raise():
    """The rows to drop come from a public dummy pass, not from the first batch: a first batch
    whose output gradient vanishes on every row (here: a zero loss) must not make the rows it
    leaves at zero droppable, and the next, ordinary batch is exact instead of raising."""
    tangent, h, y = setup("base")
    wrapped = bk.make_bk_module(FromPrefix(tangent), 0.05)
    (0.0 * wrapped(h).sum()).backward()  # every row of every output gradient is zero
    assert all(torch.count_nonzero(p.grad) == 0 for p in trainable(tangent).values())
    sparse = [len(rows) for _, rows, _ in wrapped._rows.values() if rows is not None]
    assert sparse == [1, 1, 1]  # the last block's proj, fc1, fc2: the class token only, as the structure says
    for p in tangent.parameters():
        p.grad = None
    F.cross_entropy(wrapped(h), y).backward()
    got = {n: p.grad.clone() for n, p in trainable(tangent).items()}
    wrapped.to_standard_module()
    for p in tangent.parameters():
        p.grad = None
    want, _ = bk_grads(tangent, h, y, "ce", clip=0.05)
    assert_close(got, want, rtol=1e-14)


def test_dummy_pass_leaves_no_trace_and_draws_no_global_randomness():
    tangent, h, y = setup("base")
    wrapped = bk.make_bk_module(FromPrefix(tangent), 0.05)
    state = torch.get_rng_state()
    wrapped._find_rows((h,), {})
    assert torch.equal(torch.get_rng_state(), state)
    assert all(p.grad is None for p in trainable(tangent).values())
    assert wrapped.per_sample_gradient_norms is None and wrapped._rows_found
    wrapped.to_standard_module()
