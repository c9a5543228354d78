"""fit(precision="bf16"): the model under autocast, the DP-SGD arithmetic in float32.

The guarantee rests on what is actually summed: each example's clipped contribution is
read off Opacus' accumulated sum itself (one example per physical batch), in the run's
own code path, and must have norm <= C·(1 + CLIP_TOLERANCE); the noise must have std σ·C
and everything the optimizer touches must stay float32. CPU autocast runs the same code
as CUDA autocast, so these tests hold on the machine that runs CI.
"""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn as nn
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer_fast_gradient_clipping import DPOptimizerFastGradientClipping

import dp_taft
from dp_taft.methods import nlft, taft
from dp_taft.privacy.distributed import Comm
from dp_taft.privacy.engine import PrivateEngine
from dp_taft.privacy.precision import CLIP_TOLERANCE
from dp_taft.privacy.randomness import NoiseStream
from dp_taft.tangent.linear import DeltaLinear
from fit_cases import easy_dataset, tiny_vit, trainable_state
from test_model_file import FAMILIES

C = 1e-3  # far below every per-sample gradient norm here: every contribution is clipped
BASE = dict(epsilon=8.0, delta=1e-3, epochs=1, batch_size=20, lr=0.5, max_grad_norm=C, physical_batch_size=1,
            seed=0, quiet=True)


def record_contributions(monkeypatch) -> list[tuple[float, set[torch.dtype]]]:
    """(norm, dtypes) of what each physical batch adds to Opacus' clipped sum ``p.summed_grad``,
    in hooks mode (``clip_and_accumulate``) and book-keeping mode (``accumulate`` of ``p.grad``)."""
    seen: list[tuple[float, set[torch.dtype]]] = []
    for cls, name in ((DPOptimizer, "clip_and_accumulate"), (DPOptimizerFastGradientClipping, "accumulate")):
        def wrapped(self, _original=getattr(cls, name)):
            before = [None if p.summed_grad is None else p.summed_grad.clone() for p in self.params]
            _original(self)
            added = [p.summed_grad if b is None else p.summed_grad - b for p, b in zip(self.params, before)]
            norm = sum(float(a.double().square().sum()) for a in added) ** 0.5
            seen.append((norm, {p.summed_grad.dtype for p in self.params}))

        monkeypatch.setattr(cls, name, wrapped)
    return seen


def record_linear_dtypes(model: nn.Module) -> set[torch.dtype]:
    """Output dtypes of the model's trained linear layers (ΔW for TAFT) during training: bf16 under autocast."""
    dtypes: set[torch.dtype] = set()
    for m in model.modules():
        if isinstance(m, (nn.Linear, DeltaLinear)) and m.weight.requires_grad:
            m.register_forward_hook(lambda _m, _i, out: dtypes.add(out.dtype) if torch.is_grad_enabled() else None)
    return dtypes


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
@pytest.mark.parametrize("method, mode", [(taft, "bk"), (taft, "hooks"), (nlft, "bk"), (nlft, "hooks")])
def test_every_clipped_contribution_has_norm_at_most_c(monkeypatch, method, mode, precision):
    seen = record_contributions(monkeypatch)
    model = method(tiny_vit(), 1)
    linear_dtypes = record_linear_dtypes(model)
    result = dp_taft.fit(model, easy_dataset(60), grad_sample_mode=mode, precision=precision, **BASE)
    assert linear_dtypes == {torch.bfloat16 if precision == "bf16" else torch.float32}
    norms = [n for n, _ in seen if n > 0]  # empty Poisson batches add nothing
    assert len(norms) >= 30 and all(dtypes == {torch.float32} for _, dtypes in seen)
    assert max(norms) <= C * (1 + CLIP_TOLERANCE)
    assert min(norms) >= C * (1 - 1e-3)  # clipping binds: each is C up to the 1e-6 of Opacus' factor
    assert all(p.dtype == torch.float32 for p in trainable_state(result.model).values())


@pytest.mark.parametrize("method", [taft, nlft])
def test_automatic_clipping_in_bf16_rescales_every_contribution_to_c_in_fp32(monkeypatch, method):
    # Automatic clipping rescales the per-sample gradients themselves (C·g/(‖g‖ + γ)): in fp32,
    # as they are formed from float32 casts. Opacus' min(1, C/‖g‖) that follows caps each at C, so
    # a rescale rounded to bf16 (±2⁻⁹) shows as contributions below C(1 − 1e-3) (checked: it fails).
    seen = record_contributions(monkeypatch)
    dp_taft.fit(method(tiny_vit(), 1), easy_dataset(60), precision="bf16", clipping="automatic",
                clipping_gamma=1e-8, **BASE)  # γ ≪ ‖g‖: each contribution is C to ~1e-7, no margin
    norms = [n for n, _ in seen if n > 0]
    assert len(norms) >= 30 and all(dtypes == {torch.float32} for _, dtypes in seen)
    assert max(norms) <= C * (1 + CLIP_TOLERANCE) and min(norms) >= C * (1 - 1e-3)


def test_noise_has_std_sigma_c_in_float32_under_bf16():
    """All per-sample gradients erased, q = 1, SGD lr 1, one step: Δw = −noise/(q·N)."""
    def erase(indices, params):
        for p in params:
            p.grad_sample.zero_()

    model = taft(tiny_vit(), 1)
    before = trainable_state(model)
    result = dp_taft.fit(model, easy_dataset(96), epsilon=2.0, delta=1e-3, epochs=1, batch_size=96, lr=1.0,
                         momentum=0.0, max_grad_norm=0.5, precision="bf16", grad_sample_hook=erase, quiet=True)
    after = trainable_state(result.model)
    assert {v.dtype for v in after.values()} == {torch.float32}
    moved = torch.cat([(after[k] - before[k]).flatten() for k in before])
    assert moved.numel() > 3000  # relative sd of the estimate < 2%
    assert float(moved.std()) * 96 == pytest.approx(result.noise_multiplier * 0.5, rel=0.08)


def test_bf16_reaches_the_accuracy_of_fp32_on_the_easy_task():
    settings = dict(epsilon=8.0, delta=1e-4, epochs=3, batch_size=40, lr=0.5, seed=3, quiet=True,
                    eval_set=easy_dataset(150, seed=1))
    accuracy = {p: dp_taft.fit(taft(tiny_vit(), 1), easy_dataset(400), precision=p, **settings)
                .history[-1].eval_accuracy for p in ("fp32", "bf16")}
    assert accuracy["fp32"] >= 0.75 and abs(accuracy["bf16"] - accuracy["fp32"]) <= 0.05


def test_ghost_clipping_and_fp16_are_refused_with_what_to_use():
    model, data = taft(tiny_vit(), 1), easy_dataset(20)
    with pytest.raises(ValueError, match="grad_sample_mode='bk' or 'hooks'"):
        dp_taft.fit(model, data, epsilon=1.0, precision="bf16", grad_sample_mode="ghost", quiet=True)
    with pytest.raises(ValueError, match="precision"):
        dp_taft.fit(model, data, epsilon=1.0, precision="fp16", quiet=True)


def test_a_bf16_prefix_cache_is_not_reused_by_an_fp32_run(tmp_path):
    data, settings = easy_dataset(40), dict(epsilon=None, epochs=1, batch_size=20, seed=0, quiet=True,
                                            cache_dir=tmp_path)
    dp_taft.fit(taft(tiny_vit(), 1), data, precision="bf16", **settings)
    dp_taft.fit(taft(tiny_vit(), 1), data, precision="fp32", **settings)
    assert len(list(tmp_path.glob("*.meta.pt"))) == 2  # one cache per compute precision


@pytest.mark.parametrize("method", [taft, nlft])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_trains_in_bf16_with_contributions_within_c(monkeypatch, family, method):
    """Each family's tangent and NLFT layers under autocast (grad_sample_mode 'auto': book-keeping)."""
    name, kwargs = FAMILIES[family]
    torch.manual_seed(0)
    model = method(timm.create_model(name, pretrained=False, num_classes=3, **kwargs), 1)
    linear_dtypes = record_linear_dtypes(model)
    seen = record_contributions(monkeypatch)
    dp_taft.fit(model, easy_dataset(30), precision="bf16", **{**BASE, "physical_batch_size": 1, "batch_size": 10})
    assert torch.bfloat16 in linear_dtypes
    norms = [n for n, _ in seen if n > 0]
    assert norms and C * (1 - 1e-3) <= min(norms) and max(norms) <= C * (1 + CLIP_TOLERANCE)


def clipped_sums(monkeypatch, mode: str, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
    """What each batch adds to Opacus' clipped sum (one flat vector per batch), through the engine fit builds."""
    added: list[torch.Tensor] = []
    for cls, name in ((DPOptimizer, "clip_and_accumulate"), (DPOptimizerFastGradientClipping, "accumulate")):
        def wrapped(self, _original=getattr(cls, name)):
            _original(self)
            added.append(torch.cat([p.summed_grad.double().flatten() for p in self.params]))

        monkeypatch.setattr(cls, name, wrapped)
    model = taft(tiny_vit(), 1)
    params = [p for p in model.parameters() if p.requires_grad]
    noise = NoiseStream(torch.device("cpu"), secure=False)
    noise.seed(0)
    engine = PrivateEngine.build(model, model, torch.optim.SGD(params, lr=0.0), nn.CrossEntropyLoss(),
                                 grad_sample_mode=mode, noise_multiplier=0.0, max_grad_norm=C, expected_batch_size=1.0,
                                 noise=noise, hook=None, comm=Comm(), precision="bf16")
    with engine.training():
        for x, y in batches:
            engine.physical_step(x, y, torch.arange(len(y)))
    return added


@pytest.mark.parametrize("mode", ["bk", "hooks"])
def test_in_bf16_one_example_joining_a_batch_leaves_the_others_contributions(monkeypatch, mode):
    """Sensitivity C needs the other examples' clipped gradients to be the same with or without
    one more example in their batch: a mean loss's 1/B rounded in bf16 moved them by ~2e-2·C at
    B = 32; the summed loss leaves them (tested to 1e-4·C)."""
    x, y = easy_dataset(33).tensors
    others, joined, alone = clipped_sums(monkeypatch, mode, [(x[:32], y[:32]), (x, y), (x[32:], y[32:])])
    assert float((joined - alone - others).norm()) <= 1e-4 * C
    assert float(others.norm()) > C  # 32 clipped contributions, not an empty sum
