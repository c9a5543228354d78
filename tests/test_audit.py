"""One-run privacy audit (dp_taft.audit): the bounds on their own, then audits through fit."""

from __future__ import annotations

import math

import accounting
import numpy as np
import pytest
import torch
from scipy import special, stats

from dp_taft.audit import (
    BOUNDS,
    audit_dirac,
    audit_input,
    best_guesses,
    epsilon_lower_bound,
    gdp_epsilon,
    mislabeled,
    steinke_p_value,
)
from dp_taft.audit.bounds import fdp_rejects
from dp_taft.audit.canaries import trainable_vector
from dp_taft.privacy.randomness import NoiseStream
from dp_taft.methods import nlft, taft
from fit_cases import easy_dataset, tiny_vit

BETA = 0.05
DELTA = 1e-5
M = 1000  # canaries per training audit: each run takes about a second on one core
REAL = easy_dataset(30, seed=0)  # a few real examples, so canaries share the run with real data


def _rejects(bound: str, m: int, r: int, v: int, eps: float, delta: float) -> bool:
    """Whether (ε, δ) is rejected at level BETA (for "gdp": whether μ-GDP at ε's μ is)."""
    return epsilon_lower_bound(m, r, v, delta=delta, confidence=1 - BETA, bound=bound) > eps


# --------------------------------------------------------------------------- the bounds
def test_steinke_p_value_is_the_binomial_tail_at_delta_zero_and_grows_with_delta():
    for r, v, eps in [(100, 80, 1.0), (1000, 990, 4.0), (50, 50, 2.5)]:
        tail = stats.binom.sf(v - 1, r, math.exp(eps) / (1 + math.exp(eps)))
        assert steinke_p_value(r, r, v, eps, 0.0) == pytest.approx(tail, rel=1e-12)
        assert steinke_p_value(10 * r, r, v, eps, 1e-4) > tail


def test_all_right_guesses_give_the_closed_form_at_delta_zero():
    # P[Binomial(r, p) >= r] = p^r = β  <=>  ε = logit(β^(1/r)).
    for r in (10, 200, 5000):
        expected = special.logit(BETA ** (1 / r))
        assert epsilon_lower_bound(r, r, r, delta=0.0, confidence=1 - BETA) == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("bound", BOUNDS)
def test_half_right_or_worse_proves_nothing(bound):
    for r, v in [(100, 50), (100, 10), (1000, 500), (7, 0), (0, 0)]:
        assert epsilon_lower_bound(1000, r, v, delta=DELTA, bound=bound) == 0.0


@pytest.mark.parametrize("bound", BOUNDS)
def test_bound_is_monotone(bound):
    m, r = 2000, 400
    by_v = [epsilon_lower_bound(m, r, v, delta=DELTA, bound=bound) for v in range(300, r + 1, 20)]
    assert all(a <= b for a, b in zip(by_v, by_v[1:])) and by_v[-1] > by_v[0] > 0
    by_confidence = [epsilon_lower_bound(m, r, 380, delta=DELTA, confidence=c, bound=bound) for c in (0.5, 0.9, 0.99)]
    assert by_confidence[0] > by_confidence[1] > by_confidence[2] > 0
    by_delta = [epsilon_lower_bound(m, r, 380, delta=d, bound=bound) for d in (1e-7, 1e-5, 1e-4)]
    assert by_delta[0] >= by_delta[1] >= by_delta[2]


@pytest.mark.parametrize("bound", ["steinke", "fdp"])
@pytest.mark.parametrize(("eps", "delta"), [(0.5, 0.0), (1.0, 0.0), (2.0, 0.0), (1.0, 1e-3), (3.0, 1e-3)])
def test_randomized_response_is_rejected_at_most_beta_of_the_time(bound, eps, delta):
    """An (ε, δ)-DP guesser: each guess is right w.p. δ + (1 − δ)·e^ε/(1 + e^ε), independently.

    With δ = 0 this is ε-DP randomized response, the extreme case of the pure-DP bound,
    so the exact rejection rate comes close to β: any optimism in the bound shows.
    """
    m, r = 1000, 400
    p = delta + (1 - delta) * special.expit(eps)
    rejected = np.array([_rejects(bound, m, r, v, eps, delta) for v in range(r + 1)])
    exact = float(stats.binom.pmf(np.arange(r + 1), r, p)[rejected].sum())
    assert exact <= BETA
    if delta == 0 and bound == "steinke":
        assert exact >= 0.6 * BETA  # and it is not vacuous: it does reject near the limit
    draws = np.random.default_rng(0).binomial(r, p, size=20_000)  # Monte Carlo, 3 standard errors of slack
    assert rejected[draws].mean() <= BETA + 3 * math.sqrt(BETA * (1 - BETA) / len(draws))


@pytest.mark.parametrize("mu", [0.5, 1.5, 3.0])
def test_gaussian_canaries_rarely_reject_their_own_mu(mu):
    """m canaries with scores N(μ·s, 1) (each canary's view is exactly μ-GDP), top/bottom guesses."""
    rng, m, k, trials = np.random.default_rng(1), 400, 40, 500
    g = lambda a: float(special.ndtr(special.ndtri(a) - mu)) if a > 0 else 0.0  # noqa: E731
    violations = 0
    for _ in range(trials):
        s = rng.integers(0, 2, m).astype(bool)
        order = np.argsort(-rng.normal(mu * s, 1.0))
        v = int(s[order[:k]].sum() + (~s[order[-k:]]).sum())
        violations += fdp_rejects(m, 2 * k, v, BETA, g)
    assert violations / trials <= BETA


def test_gdp_epsilon_matches_the_full_batch_accountant():
    # Full-batch DP-SGD is the Gaussian mechanism: T steps of noise σ are √T/σ-GDP, and
    # the PLD accountant (pessimistic discretization) lands on or just above that ε.
    for sigma, steps in [(1.2, 4), (3.0, 10), (8.0, 4)]:
        exact = gdp_epsilon(math.sqrt(steps) / sigma, DELTA)
        pld = accounting.epsilon(sigma, 1.0, steps, DELTA)
        assert exact <= pld * (1 + 1e-9) and pld == pytest.approx(exact, rel=2e-2)


def test_union_bound_over_declared_fractions():
    rng = np.random.default_rng(2)
    s = rng.integers(0, 2, 2000).astype(bool)
    scores = rng.normal(2.0 * s, 1.0)
    one = best_guesses(scores, s, delta=DELTA, fractions=(0.1,))
    alone = epsilon_lower_bound(2000, one.r, one.v, delta=DELTA, confidence=1 - BETA)
    assert one.epsilon_lb == pytest.approx(alone) and one.r == 200
    many = best_guesses(scores, s, delta=DELTA, fractions=(0.02, 0.1, 0.5))
    # The 0.1 hypothesis alone, tested at β/3, is one candidate of the three.
    at_third = epsilon_lower_bound(2000, one.r, one.v, delta=DELTA, confidence=1 - BETA / 3)
    assert many.hypotheses == 3 and many.epsilon_lb >= at_third and at_third < one.epsilon_lb


def test_bad_input_is_refused_with_clear_messages():
    cases = [
        (lambda: epsilon_lower_bound(0, 0, 0, delta=DELTA), "m >= 1"),
        (lambda: epsilon_lower_bound(10, 5, 6, delta=DELTA), "v \\(right\\) <= r"),
        (lambda: epsilon_lower_bound(10, 11, 5, delta=DELTA), "r \\(guesses\\) <= m"),
        (lambda: epsilon_lower_bound(10, 5, 2.5, delta=DELTA), "integers"),
        (lambda: epsilon_lower_bound(10, 5, 5, delta=DELTA, confidence=1.0), "confidence"),
        (lambda: epsilon_lower_bound(10, 5, 5, delta=1.0), "delta"),
        (lambda: epsilon_lower_bound(10, 5, 5, delta=DELTA, bound="nope"), "bound must be one of"),
        (lambda: epsilon_lower_bound(10, 5, 5, delta=0.0, bound="gdp"), "delta > 0"),
        (lambda: best_guesses([0.1, float("nan")], [1, 0], delta=DELTA), "finite"),
        (lambda: best_guesses([0.1, 0.2], [1], delta=DELTA), "membership bit per score"),
        (lambda: best_guesses([0.1, 0.2], [1, 0], delta=DELTA, fractions=(0.5, 0.5)), "distinct"),
        (lambda: best_guesses([0.1, 0.2], [1, 0], delta=DELTA, fractions=(0.0,)), "fractions"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


def test_bad_audit_arguments_are_refused_before_training():
    model = taft(tiny_vit(), 1)
    before = trainable_vector(model)
    size = before.numel()
    cases = [
        (dict(m=size + 1), "one distinct trainable coordinate per Dirac canary"),
        (dict(m=0), "m must be"),
        (dict(m=10, batch_size=5), "pass sample_rate instead of batch_size"),
        (dict(m=10, grad_sample_mode="ghost"), "grad_sample_mode='hooks'"),
        (dict(m=10, sample_rate=0.0), "sample_rate"),
        (dict(m=10, seed=-1), "seed"),
        (dict(m=10, bound="ε"), "bound must be one of"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            audit_dirac(model, REAL, epsilon=1.0, delta=DELTA, **kwargs)
    assert torch.equal(trainable_vector(model), before)


# --------------------------------------------------------------------------- audits through fit
def test_dirac_canaries_reach_the_weights_exactly():
    """Non-private, one full-batch step, plain SGD: Δw = −lr·Σ rows/N, and the only rows
    touching anything are the included canaries, each C at its own coordinate."""
    model = taft(tiny_vit(), 1)
    before = trainable_vector(model)
    lr, c = 0.7, 0.5
    result = audit_dirac(model, None, m=300, epsilon=None, delta=DELTA, seed=3, epochs=1, lr=lr, momentum=0.0,
                         max_grad_norm=c, physical_batch_size=64)  # several physical batches, one step
    membership = np.array(result.membership)
    expected = lr * c / membership.sum() * membership
    np.testing.assert_allclose(result.scores, expected, rtol=1e-5, atol=1e-9)
    moved = (trainable_vector(model) - before) != 0
    assert int(moved.sum()) == membership.sum() and result.steps == 1 and result.noise_multiplier == 0


def _audit(method, epsilon, seed, **kwargs):
    build = {"taft": lambda: taft(tiny_vit(), 1), "nlft": lambda: nlft(tiny_vit(), 1)}[method]
    return audit_dirac(build(), REAL, m=M, epsilon=epsilon, delta=DELTA, seed=seed, epochs=4, lr=0.5,
                       momentum=0.0, **kwargs)


@pytest.mark.parametrize(("method", "epsilon", "seed"), [("taft", 1.0, 0), ("taft", 4.0, 1), ("nlft", 8.0, 2)])
def test_correct_private_runs_are_not_refuted(method, epsilon, seed):
    result = _audit(method, epsilon, seed)
    assert result.claimed_epsilon is not None and result.claimed_epsilon <= epsilon
    for bound in BOUNDS:
        lb = result.with_bound(bound)
        assert 0 <= lb.epsilon_lb <= lb.claimed_epsilon, (bound, lb)
        assert not lb.refutes_claim
    # Not vacuous either: white-box canaries find a good part of the claim.
    assert result.with_bound("gdp").epsilon_lb >= 0.3 * result.claimed_epsilon
    assert "does NOT prove it" in result.statement()


def test_without_noise_the_audit_exceeds_what_the_private_run_claims():
    private = _audit("taft", 2.0, seed=5)
    open_run = _audit("taft", None, seed=5)
    assert open_run.claimed_epsilon is None and open_run.noise_multiplier == 0
    assert open_run.epsilon_lb > private.claimed_epsilon > private.epsilon_lb
    assert open_run.v >= 0.99 * open_run.r


def test_noise_twenty_times_too_small_is_caught(monkeypatch):
    """A bug that draws σ/20 while the report still claims the calibrated ε is refuted."""
    draw = NoiseStream.normal

    def too_little(self, std, reference):
        return draw(self, std / 20, reference)

    monkeypatch.setattr(NoiseStream, "normal", too_little)
    result = _audit("nlft", 2.0, seed=6)
    assert result.refutes_claim and result.epsilon_lb > result.claimed_epsilon
    assert "REFUTED" in result.statement()


def test_input_canaries_run_through_the_plain_path():
    pool = easy_dataset(200, seed=9)
    canaries = mislabeled(pool, 100, num_classes=3, seed=0)
    images, labels = pool.tensors
    for x, y in canaries:  # every canary is a pool image under a wrong label
        source = int(torch.nonzero((images == x).flatten(1).all(1))[0])
        assert int(y) != int(labels[source])
    result = audit_input(taft(tiny_vit(), 1), REAL, canaries, epsilon=4.0, delta=DELTA, seed=0, epochs=3, lr=0.5,
                         grad_sample_mode="ghost")
    assert result.canary == "input" and result.m == 100 and len(result.scores) == 100
    assert 0 <= result.epsilon_lb <= result.claimed_epsilon
    assert "input-space canaries" in result.statement()


def test_gdp_is_refused_for_subsampled_runs():
    with pytest.raises(ValueError, match="full-batch"):
        audit_dirac(taft(tiny_vit(), 1), REAL, m=10, epsilon=1.0, delta=DELTA, bound="gdp", sample_rate=0.5)
    result = _audit("taft", 4.0, seed=7, sample_rate=0.5)
    assert result.sample_rate == pytest.approx(0.5, abs=0.01) and result.epsilon_lb <= result.claimed_epsilon
    with pytest.raises(ValueError, match="full-batch"):
        result.with_bound("gdp")


def test_experiment_cli_writes_the_table(tmp_path):
    from experiments import audit as experiment

    code = experiment.main(["--data", "synthetic", "--m", "200", "--real", "20", "--epsilons", "8", "--methods",
                            "taft", "--out", str(tmp_path), "--threads", "1"])
    assert code == 0
    table = (tmp_path / "audit.md").read_text()
    assert "| TAFT-2 | 7.9" in table and "| steinke |" in table and "| gdp |" in table
    rows = list((tmp_path / "audit.csv").read_text().splitlines())
    assert len(rows) == 3 and rows[0].startswith("method,target_epsilon,claimed_epsilon,epsilon_lb")
    assert "does NOT prove it" in (tmp_path / "statements.txt").read_text()
