"""The convex toolbox of fit: LR schedules, iterate averaging and automatic clipping."""

from __future__ import annotations

import math

import opacus.optimizers.optimizer as opacus_optimizer
import pytest
import torch

import dp_taft
from dp_taft.methods import linear_probe
from dp_taft.schedules import lr_factor
from fit_cases import easy_dataset, interrupt_after, tiny_vit, trainable_state

DATA = easy_dataset(48)
T = 6  # q = 1 (batch_size = N): one step per epoch, 6 epochs


def constant_gradient(indices, params):
    """Every example's gradient is 1 in every coordinate: the step is exactly −lr_t·1."""
    for p in params:
        p.grad_sample.fill_(1.0)


def moves(**kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """(head bias before, after) a non-private run of T steps with the constant gradient."""
    model = linear_probe(tiny_vit())
    before = model.head.bias.detach().clone()
    dp_taft.fit(model, DATA, epsilon=None, epochs=T, batch_size=len(DATA), lr=0.1, momentum=0.0, quiet=True,
                grad_sample_hook=constant_gradient, seed=0, **kwargs)
    return before, model.head.bias.detach()


def test_lr_factor_shapes():
    assert [lr_factor(t, 10, "constant", 0.0) for t in (0, 9)] == [1.0, 1.0]
    assert [lr_factor(t, 10, "linear", 0.2) for t in range(4)] == [0.5, 1.0, 1.0, 1 - 1 / 8]
    assert lr_factor(2, 10, "cosine", 0.2) == 1.0 and lr_factor(6, 10, "cosine", 0.2) == pytest.approx(0.5)
    assert lr_factor(10, 10, "cosine", 0.0) == pytest.approx(0.0, abs=1e-12)


COSINE = [0.5 * (1 + math.cos(math.pi * t / T)) for t in range(T)]
LINEAR_HALF_WARM = [1 / 3, 2 / 3, 1.0, 1.0, 2 / 3, 1 / 3]  # 3 warm-up steps, then 1 − s for s = 0, 1/3, 2/3


@pytest.mark.parametrize(("schedule", "warmup", "factors"),
                         [("constant", 0.0, [1.0] * T), ("cosine", 0.0, COSINE), ("linear", 0.5, LINEAR_HALF_WARM)])
def test_schedule_sets_each_steps_learning_rate(schedule, warmup, factors):
    before, after = moves(lr_schedule=schedule, warmup=warmup)
    expected = 0.1 * sum(factors)
    torch.testing.assert_close(before - after, torch.full_like(before, expected), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["tail", "ema"])
def test_averaging_returns_the_average_of_the_iterates(kind):
    before, after = moves(averaging=kind, tail_fraction=0.5, ema_decay=0.8)
    steps = [0.1 * t for t in range(1, T + 1)]  # iterate t moved by 0.1·t
    if kind == "tail":
        expected = sum(steps[T // 2:]) / (T - T // 2)
    else:
        weights = [0.2 * 0.8 ** (T - t) for t in range(1, T + 1)]
        expected = sum(w * s for w, s in zip(weights, steps)) / (1 - 0.8 ** T)
    torch.testing.assert_close(before - after, torch.full_like(before, expected), rtol=1e-5, atol=1e-6)


def test_averaging_is_post_processing_the_report_does_not_change():
    def run(**kwargs):
        return dp_taft.fit(linear_probe(tiny_vit()), DATA, epsilon=2.0, delta=1e-3, epochs=2, batch_size=12, lr=0.1,
                           quiet=True, seed=3, **kwargs)

    plain, averaged = run(), run(averaging="ema", lr_schedule="cosine", warmup=0.25)
    assert averaged.report.history == plain.report.history
    assert averaged.report.epsilon == plain.report.epsilon
    a, b = trainable_state(plain.model), trainable_state(averaged.model)
    assert not all(torch.equal(a[k], b[k]) for k in a)


def test_automatic_clipping_normalises_each_example_then_opacus_clips_nothing(monkeypatch):
    raw, seen = [], []
    clip = opacus_optimizer.DPOptimizer.clip_and_accumulate

    def record_raw(indices, params):
        raw.append(torch.cat([p.grad_sample.reshape(len(indices), -1) for p in params], 1).norm(dim=1))

    def record_clipped(self):
        seen.append(torch.cat([g.reshape(len(g), -1) for g in self.grad_samples], 1).norm(dim=1))
        clip(self)

    monkeypatch.setattr(opacus_optimizer.DPOptimizer, "clip_and_accumulate", record_clipped)
    result = dp_taft.fit(linear_probe(tiny_vit()), DATA, epsilon=2.0, delta=1e-3, epochs=1, batch_size=12,
                         max_grad_norm=0.5, clipping="automatic", clipping_gamma=0.01, quiet=True,
                         grad_sample_hook=record_raw)
    assert raw and len(raw) == len(seen)
    for before, after in zip(raw, seen):
        torch.testing.assert_close(after, 0.5 * before / (before + 0.01))  # Bu et al. 2023, eq. 4
        assert (after < 0.5).all()  # sensitivity C: Opacus' min(1, C/‖g‖) is then 1
    flat = dp_taft.fit(linear_probe(tiny_vit()), DATA, epsilon=2.0, delta=1e-3, epochs=1, batch_size=12,
                       max_grad_norm=0.5, quiet=True)
    assert result.report.epsilon == flat.report.epsilon and result.noise_multiplier == flat.noise_multiplier


def test_more_steps_at_the_same_epsilon_take_more_noise():
    short, long = (dp_taft.fit(linear_probe(tiny_vit()), DATA, epsilon=2.0, delta=1e-3, epochs=e, batch_size=24,
                               quiet=True) for e in (1, 8))
    assert long.steps == 8 * short.steps and long.noise_multiplier > short.noise_multiplier
    assert max(short.report.epsilon, long.report.epsilon) <= 2.0


def test_schedule_and_average_resume_exactly(tmp_path, monkeypatch):
    kwargs = dict(epsilon=None, epochs=T, batch_size=12, lr=0.1, quiet=True, seed=0, lr_schedule="cosine",
                  warmup=0.2, averaging="tail", checkpoint_every=3)
    straight = trainable_state(dp_taft.fit(linear_probe(tiny_vit()), DATA, **kwargs).model)
    with monkeypatch.context() as mp:
        interrupt_after(mp, 10, KeyboardInterrupt)
        with pytest.raises(KeyboardInterrupt):
            dp_taft.fit(linear_probe(tiny_vit()), DATA, checkpoint_dir=tmp_path, **kwargs)
    resumed = trainable_state(dp_taft.fit(linear_probe(tiny_vit()), DATA, checkpoint_dir=tmp_path, **kwargs).model)
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [(dict(lr_schedule="step"), "unknown lr_schedule"), (dict(warmup=1.0), r"warmup must be in \[0, 1\)"),
     (dict(clipping="adaptive"), "unknown clipping"), (dict(clipping="automatic", grad_sample_mode="ghost"),
                                                       "clipping='automatic' needs grad_sample_mode='hooks'"),
     (dict(averaging="swa"), "unknown averaging"), (dict(tail_fraction=0.0), "tail_fraction must be"),
     (dict(ema_decay=1.0), r"ema_decay must be in \(0, 1\)"), (dict(clipping_gamma=0.0), "clipping_gamma")],
)
def test_bad_toolbox_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dp_taft.fit(linear_probe(tiny_vit()), DATA, epsilon=2.0, delta=1e-3, quiet=True, **kwargs)
