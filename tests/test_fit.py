"""End-to-end DP-SGD through dp_taft.fit on tiny ViTs and easy synthetic data."""

from __future__ import annotations

import math

import accounting
import opacus.optimizers.optimizer as opacus_optimizer
import pytest
import torch
from opacus.data_loader import DPDataLoader
from scipy import stats

import dp_taft
from dp_taft.privacy.randomness import NoiseStream
from dp_taft.methods import linear_probe, nlft, taft
from fit_cases import easy_dataset, tiny_vit, trainable_state

TRAIN, TEST = easy_dataset(96, seed=0), easy_dataset(60, seed=1)
DELTA = 1e-3  # < 1/N = 1/96


@pytest.fixture(scope="module")
def private_run():
    """TAFT-1, epsilon=3, 2 epochs of 6 steps, recording what Opacus clipped and the noise it drew."""
    clipped, noise = [], []
    clip = opacus_optimizer.DPOptimizer.clip_and_accumulate
    draw = NoiseStream.normal

    def recording_clip(self):
        per_sample = [g.reshape(len(g), -1) for g in self.grad_samples]
        before = [torch.zeros_like(p) if p.summed_grad is None else p.summed_grad.clone() for p in self.params]
        clip(self)
        added = torch.cat([(p.summed_grad - b).reshape(-1) for p, b in zip(self.params, before)])
        clipped.append((torch.cat(per_sample, dim=1), added, self.max_grad_norm))

    def recording_noise(self, std, reference):
        z = draw(self, std, reference)
        noise.append((std, z.reshape(-1).clone()))
        return z

    model = taft(tiny_vit(), 1)
    before = trainable_state(model)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(opacus_optimizer.DPOptimizer, "clip_and_accumulate", recording_clip)
        mp.setattr(NoiseStream, "normal", recording_noise)
        # lr = 0: the run spends budget and draws noise but must not move the weights;
        # C = 0.05 is far below the per-sample gradient norms, so clipping is active.
        result = dp_taft.fit(model, TRAIN, epsilon=3.0, delta=DELTA, epochs=2, batch_size=16, max_grad_norm=0.05,
                             lr=0.0, eval_set=TEST, quiet=True, grad_sample_mode="hooks")
    return result, before, clipped, noise


def test_report_epsilon_is_at_and_below_target(private_run):
    result = private_run[0]
    report = result.report
    assert result.steps == 12 and result.sample_rate == pytest.approx(16 / 96)
    assert 0.97 * 3.0 <= report.epsilon <= 3.0
    assert report.delta == DELTA
    # The report's (q, σ, T) recompute to the same ε with the accounting library.
    assert [(s.noise_multiplier, s.sample_rate, s.steps) for s in report.history] == [
        (result.noise_multiplier, result.sample_rate, 12)
    ]
    recomputed = accounting.epsilon(result.noise_multiplier, result.sample_rate, result.steps, DELTA)
    assert recomputed == pytest.approx(report.epsilon, rel=1e-9)
    assert [r.epsilon_spent for r in result.history][-1] == pytest.approx(report.epsilon, rel=1e-9)
    assert [r.steps for r in result.history] == [6, 12]
    assert all(0 <= r.eval_accuracy <= 1 and math.isfinite(r.eval_loss) for r in result.history)


def test_lr_zero_leaves_parameters_unchanged(private_run):
    result, before, _, noise = private_run
    assert noise, "no noise was drawn: the run did not train"
    after = trainable_state(result.model)
    assert after.keys() == before.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k


def test_clipped_per_sample_gradients_have_norm_at_most_c(private_run):
    clipped = private_run[2]
    assert len(clipped) >= 12  # one per physical batch; Poisson batches above 16 are split
    was_clipped = 0
    for per_sample, added, c in clipped:
        norms = per_sample.norm(dim=1)
        factor = (c / (norms + 1e-6)).clamp(max=1.0)
        # What Opacus accumulated is the sum of the clipped per-sample gradients ...
        torch.testing.assert_close(added, (factor[:, None] * per_sample).sum(0), rtol=1e-4, atol=1e-7)
        # ... and each clipped gradient has norm <= C.
        assert torch.all(factor * norms <= c * (1 + 1e-6))
        was_clipped += int((norms > c).sum())
    assert was_clipped > 0, "C is too large for this test to check clipping"


def test_noise_has_the_calibrated_standard_deviation(private_run):
    result, _, _, noise = private_run
    c = 0.05
    expected = result.noise_multiplier * c
    assert all(std == pytest.approx(expected, rel=1e-12) for std, _ in noise)
    z = torch.cat([z for _, z in noise]).double()
    m = z.numel()
    # sum(z²)/s² ~ chi²(m) and mean(z) ~ N(0, s²/m) if the noise is N(0, s²).
    # Two-sided acceptance regions of probability 1 - 1e-6 each: false-failure rate <= 2e-6.
    chi2 = float((z**2).sum()) / expected**2
    assert stats.chi2.ppf(5e-7, m) <= chi2 <= stats.chi2.isf(5e-7, m)
    assert abs(float(z.mean())) <= stats.norm.isf(5e-7) * expected / math.sqrt(m)


@pytest.mark.parametrize(("build", "lr"), [(lambda m: taft(m, 1), 0.01), (lambda m: nlft(m, 1), 0.01), (linear_probe, 0.1)],
                         ids=["taft", "nlft", "probe"])
def test_methods_learn_the_easy_task_non_privately(build, lr):
    model = build(tiny_vit())
    result = dp_taft.fit(model, TRAIN, epsilon=None, epochs=3, batch_size=16, optimizer="adam", lr=lr,
                         eval_set=TEST, quiet=True, seed=0)  # a fixed draw: the threshold is not a coin flip
    assert result.report is None and result.noise_multiplier == 0.0
    assert result.model is model
    # Chance is 1/3; by chance alone P(>= 36 of 60 correct) < 1e-5.
    assert result.history[-1].eval_accuracy >= 0.6
    assert result.history[-1].epsilon_spent is None


def test_same_seed_same_result_other_seed_other_result():
    def run(seed):
        model = taft(tiny_vit(), 1)
        dp_taft.fit(model, TRAIN, epsilon=2.0, delta=DELTA, epochs=1, batch_size=32, lr=0.1, seed=seed, quiet=True)
        return trainable_state(model)

    a, b, c = run(3), run(3), run(4)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("build", [lambda m: taft(m, 1), lambda m: nlft(m, 1)], ids=["taft", "nlft"])
def test_prefix_cache_gives_the_uncached_result(build):
    def run(cache):
        model = build(tiny_vit())
        result = dp_taft.fit(model, TRAIN, epsilon=2.0, delta=DELTA, epochs=1, batch_size=32, lr=0.1,
                             cache_prefix=cache, quiet=True, eval_set=TEST, seed=0)
        return trainable_state(model), result.history[-1]

    (cached, rec_c), (plain, rec_p) = run(True), run(False)
    for k in cached:
        torch.testing.assert_close(cached[k], plain[k], rtol=1e-4, atol=1e-6)
    assert rec_c.eval_loss == pytest.approx(rec_p.eval_loss, rel=1e-4)


@pytest.mark.parametrize("build", [lambda m: taft(m, 2), lambda m: nlft(m, 1)], ids=["taft", "nlft"])
def test_ghost_bk_default_and_small_physical_batches_match_hooks(build):
    def run(**kwargs):
        model = build(tiny_vit())
        dp_taft.fit(model, TRAIN, epsilon=2.0, delta=DELTA, epochs=1, batch_size=32, lr=0.1, quiet=True, seed=0,
                    **kwargs)
        return trainable_state(model)

    hooks = run(grad_sample_mode="hooks")
    for other in (run(grad_sample_mode="ghost"), run(grad_sample_mode="bk"), run(), run(physical_batch_size=7)):
        for k in hooks:
            torch.testing.assert_close(other[k], hooks[k], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mode", ["hooks", "ghost", "bk"])
def test_square_loss_adam_and_empty_poisson_batches(mode):
    # q = 1/32: about 37% of the logical batches are empty and must still be noisy steps.
    data = easy_dataset(32)
    model = linear_probe(tiny_vit())
    before = trainable_state(model)
    result = dp_taft.fit(model, data, epsilon=4.0, delta=1e-3, epochs=1, batch_size=1, loss="square",
                         optimizer="adam", lr=0.01, grad_sample_mode=mode, quiet=True)
    assert result.steps == 32 and result.report.epsilon <= 4.0
    assert not torch.equal(before["head.weight"], result.model.head.weight)


def test_accepts_an_opacus_dp_data_loader_rdp_and_default_delta():
    loader = DPDataLoader(TRAIN, sample_rate=0.25)
    result = dp_taft.fit(linear_probe(tiny_vit()), loader, epsilon=2.0, epochs=1, accountant="rdp", quiet=True)
    assert result.sample_rate == 0.25 and result.steps == 4
    assert result.report.delta == pytest.approx(1 / (10 * 96))  # default delta = 1/(10 N)
    assert result.report.epsilon <= 2.0
    assert result.report.epsilon == pytest.approx(
        accounting.epsilon(result.noise_multiplier, 0.25, 4, 1 / 960, method="rdp"), rel=1e-12
    )


def test_budget_guard_stops_resumed_run_with_more_epochs(tmp_path):
    kwargs = dict(epsilon=2.0, delta=DELTA, batch_size=32, lr=0.1, quiet=True, checkpoint_dir=tmp_path)
    first = dp_taft.fit(linear_probe(tiny_vit()), TRAIN, epochs=1, **kwargs)
    assert first.steps == 3
    with pytest.warns(UserWarning, match="privacy budget"):
        more = dp_taft.fit(linear_probe(tiny_vit()), TRAIN, epochs=50, **kwargs)
    assert 3 <= more.steps < 150
    assert more.report.epsilon <= 2.0
    assert sum(s.steps for s in more.report.history) == more.steps


def test_prior_history_is_composed_into_one_budget(tmp_path):
    """A second stage on the same data spends only what the first left: one report covers both."""
    first = dp_taft.fit(linear_probe(tiny_vit()), easy_dataset(60), epsilon=1.0, delta=1e-3, epochs=1, batch_size=20, lr=0.1, quiet=True)
    prior = first.report.history
    second = dp_taft.fit(linear_probe(tiny_vit()), easy_dataset(60), epsilon=2.0, delta=1e-3, epochs=1, batch_size=20, lr=0.1,
                         quiet=True, prior=prior, checkpoint_dir=tmp_path)
    report = second.report
    assert report.history[0] == prior[0]
    assert report.steps == first.steps + second.steps
    total = accounting.epsilon_of_history(report.history, 1e-3)
    assert total == pytest.approx(report.epsilon) and 0.97 * 2.0 <= total <= 2.0
    # resuming the finished run with another prior is refused, not silently mis-accounted
    with pytest.raises(ValueError, match="prior"):
        dp_taft.fit(linear_probe(tiny_vit()), easy_dataset(60), epsilon=2.0, delta=1e-3, epochs=1, batch_size=20, lr=0.1,
                    quiet=True, prior=(), checkpoint_dir=tmp_path)


def test_prior_needs_a_target_and_segments():
    with pytest.raises(ValueError, match="needs a target epsilon"):
        dp_taft.fit(linear_probe(tiny_vit()), easy_dataset(60), epsilon=None, prior=(accounting.Segment(1.0, 0.1, 5),), quiet=True)
    with pytest.raises(ValueError, match="accounting.Segment"):
        dp_taft.fit(linear_probe(tiny_vit()), easy_dataset(60), epsilon=1.0, delta=1e-3, prior=[(1.0, 0.1, 5)], quiet=True)


@pytest.mark.parametrize("show", [False, True])
def test_training_loss_is_printed_only_on_request_and_labelled(capfd, show):
    """The training loss is a noiseless statistic of the private data: by default neither the
    epoch lines nor the progress bar show it; show_train_loss=True shows it, labelled."""
    result = dp_taft.fit(taft(tiny_vit(), 1), TRAIN, epsilon=3.0, delta=DELTA, epochs=2, batch_size=32, lr=0.5,
                         eval_set=TEST, seed=0, show_train_loss=show)
    printed = "".join(capfd.readouterr())
    losses = [f"{r.train_loss:.4f}" for r in result.history]
    assert "epoch 2/2" in printed and "eps" in printed  # progress is still shown
    assert all((loss in printed) == show for loss in losses), printed
    assert ("(not private)" in printed) == show and ("train loss" in printed) == show


def test_show_train_loss_must_be_a_flag():
    with pytest.raises(ValueError, match="show_train_loss must be True or False"):
        dp_taft.fit(taft(tiny_vit(), 1), TRAIN, epsilon=3.0, delta=DELTA, show_train_loss="yes")
