"""One-run privacy audit (dp_taft.audit): the bounds on their own, then audits through fit."""

from __future__ import annotations

import math

import accounting
import numpy as np
import pytest
import torch
from scipy import special, stats
from torch.utils.data import ConcatDataset, Subset

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
from dp_taft import fit
from dp_taft.methods import nlft, taft
from dp_taft.privacy import engine
from dp_taft.privacy.bookkeeping import make_bk_module
from dp_taft.privacy.randomness import NoiseStream
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
        (dict(m=10, grad_sample_mode="ghost"), "grad_sample_mode must be one of"),
        (dict(m=10, sample_rate=0.0), "sample_rate"),
        (dict(m=10, seed=-1), "seed"),
        (dict(m=10, bound="ε"), "bound must be one of"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            audit_dirac(model, REAL, epsilon=1.0, delta=DELTA, **kwargs)
    assert torch.equal(trainable_vector(model), before)


# --------------------------------------------------------------------------- audits through fit
# (mode passed to the audit, mode fit must have run): "auto" is fit's default path, book-keeping here.
PATHS = {"auto": "bk", "hooks": "hooks"}


@pytest.fixture
def bk_modules(monkeypatch):
    """Counts the book-keeping modules fit builds: proof from outside the audit that "bk" really ran."""
    built = []

    def counting(*args, **kwargs):
        built.append(make_bk_module(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(engine, "make_bk_module", counting)
    return built


@pytest.mark.parametrize("mode", PATHS)
def test_dirac_canaries_reach_the_weights_exactly(mode, bk_modules):
    """Non-private, one full-batch step, plain SGD, no real data: Δw = −lr·Σ rows/N with N = m
    (every canary is a row; an excluded one's is zero, so the divisor ignores the coin flips),
    and the only rows touching anything are the included canaries, each C at its own coordinate."""
    model = taft(tiny_vit(), 1)
    before = trainable_vector(model)
    lr, c, m = 0.7, 0.5, 300
    result = audit_dirac(model, None, m=m, epsilon=None, delta=DELTA, seed=3, epochs=1, lr=lr, momentum=0.0,
                         max_grad_norm=c, physical_batch_size=64, grad_sample_mode=mode)  # several physical batches
    membership = np.array(result.membership)
    assert 0 < membership.sum() < m and result.grad_sample_mode == PATHS[mode]
    assert len(bk_modules) == (mode == "auto")
    np.testing.assert_allclose(result.scores, lr * c / m * membership, rtol=1e-5, atol=1e-9)
    moved = (trainable_vector(model) - before) != 0
    assert int(moved.sum()) == membership.sum() and result.steps == 1 and result.noise_multiplier == 0


@pytest.mark.parametrize("mode", PATHS)
def test_subsampled_canaries_count_only_when_sampled(mode):
    """q < 1, non-private, plain SGD, no real data: an included canary moves its coordinate by
    lr·C/(q·N) each time the Poisson sampler draws its row, so its score is a whole number of
    such units in [0, T], about q·T on average, and an excluded canary's is 0."""
    lr, c, m, q, epochs = 0.5, 1.0, 400, 0.5, 3
    result = audit_dirac(taft(tiny_vit(), 1), None, m=m, epsilon=None, delta=DELTA, seed=4, sample_rate=q,
                         epochs=epochs, lr=lr, momentum=0.0, max_grad_norm=c, grad_sample_mode=mode)
    membership = np.array(result.membership)
    steps = epochs * round(1 / q)
    assert result.steps == steps and result.sample_rate == q
    counts = np.array(result.scores) / (lr * c / (q * m))
    np.testing.assert_allclose(counts, np.round(counts), atol=1e-4)
    counts = np.round(counts)
    assert (counts[~membership] == 0).all() and counts.max() <= steps
    drawn = counts[membership] / steps  # each included canary's share of steps it was drawn in
    assert abs(drawn.mean() - q) < 4 * math.sqrt(q * (1 - q) / (steps * membership.sum()))
    assert len(np.unique(counts[membership])) > 2  # drawn one by one, not as a block


def test_run_constants_ignore_the_coin_flips():
    """Fixed N = real + m: q, σ (hence the claim) are the same whatever the membership draw."""
    runs = [audit_dirac(taft(tiny_vit(), 1), REAL, m=101, epsilon=2.0, delta=DELTA, seed=s, sample_rate=0.3, epochs=1,
                        lr=0.5, momentum=0.0) for s in range(4)]
    assert len({r.included for r in runs}) > 1
    assert len({(r.sample_rate, r.noise_multiplier, r.claimed_epsilon, r.steps) for r in runs}) == 1
    assert runs[0].sample_rate == round(0.3 * (len(REAL) + 101)) / (len(REAL) + 101)


def test_book_keeping_audit_matches_the_per_sample_audit(bk_modules):
    """Same seed, private, q < 1, real data: the book-keeping path (canary rows out of the backward,
    C·e_k added to the clipped sum) ends where Opacus' per-sample path (canary rows overwritten,
    then clipped) does: the canary rows' own gradients reach neither."""
    runs = {mode: _audit("taft", 2.0, seed=8, sample_rate=0.5, grad_sample_mode=mode) for mode in PATHS}
    assert [r.grad_sample_mode for r in runs.values()] == list(PATHS.values()) and len(bk_modules) == 1
    assert runs["auto"].claimed_epsilon == runs["hooks"].claimed_epsilon
    np.testing.assert_allclose(runs["auto"].scores, runs["hooks"].scores, rtol=1e-4, atol=1e-6)
    assert (runs["auto"].r, runs["auto"].v) == (runs["hooks"].r, runs["hooks"].v)


def _audit(method, epsilon, seed, **kwargs):
    build = {"taft": lambda: taft(tiny_vit(), 1), "nlft": lambda: nlft(tiny_vit(), 1)}[method]
    return audit_dirac(build(), REAL, m=M, epsilon=epsilon, delta=DELTA, seed=seed, epochs=4, lr=0.5,
                       momentum=0.0, **kwargs)


# The hooks path at full batch (exactly μ-GDP, so "gdp" applies) and fit's default path,
# book-keeping, Poisson-subsampled at q = 0.5 (8 steps; "gdp" does not apply).
HOOKS_Q1 = dict(grad_sample_mode="hooks", sample_rate=1.0)
DEFAULT_Q05 = dict(sample_rate=0.5)


@pytest.mark.parametrize(("method", "epsilon", "seed", "path"), [
    ("taft", 1.0, 0, HOOKS_Q1), ("taft", 4.0, 1, HOOKS_Q1), ("nlft", 8.0, 2, HOOKS_Q1),
    ("taft", 1.0, 10, DEFAULT_Q05), ("taft", 4.0, 11, DEFAULT_Q05), ("nlft", 8.0, 12, DEFAULT_Q05),
])
def test_correct_private_runs_are_not_refuted(method, epsilon, seed, path):
    result = _audit(method, epsilon, seed, **path)
    assert result.grad_sample_mode == PATHS[path.get("grad_sample_mode", "auto")]
    assert result.claimed_epsilon is not None and result.claimed_epsilon <= epsilon
    bounds = BOUNDS if path["sample_rate"] == 1 else ("steinke", "fdp")
    for bound in bounds:
        lb = result.with_bound(bound)
        assert 0 <= lb.epsilon_lb <= lb.claimed_epsilon, (bound, lb)
        assert not lb.refutes_claim
    # Not vacuous either: white-box canaries find a good part of the claim. Less at q < 1, where
    # a canary misses half the batches and the subsampled worst case is not the typical one; there
    # one run at ε = 1 found 0.05 to 0.5 of the claim over a few seeds, too spread to assert on.
    if path["sample_rate"] == 1:
        assert result.with_bound("gdp").epsilon_lb >= 0.3 * result.claimed_epsilon
    elif epsilon >= 4:
        assert result.with_bound("fdp").epsilon_lb >= 0.1 * result.claimed_epsilon
    assert "does NOT prove it" in result.statement()


@pytest.mark.parametrize("path", [HOOKS_Q1, DEFAULT_Q05], ids=["hooks-q1", "default-q0.5"])
def test_without_noise_the_audit_exceeds_what_the_private_run_claims(path):
    private = _audit("taft", 2.0, seed=5, **path)
    open_run = _audit("taft", None, seed=5, **path)
    assert open_run.claimed_epsilon is None and open_run.noise_multiplier == 0
    assert open_run.grad_sample_mode == private.grad_sample_mode == PATHS[path.get("grad_sample_mode", "auto")]
    assert open_run.epsilon_lb > private.claimed_epsilon > private.epsilon_lb
    assert open_run.v >= 0.98 * open_run.r


@pytest.mark.parametrize("path", [HOOKS_Q1, DEFAULT_Q05], ids=["hooks-q1", "default-q0.5"])
def test_noise_twenty_times_too_small_is_caught(monkeypatch, path):
    """A bug that draws σ/20 while the report still claims the calibrated ε is refuted."""
    draw = NoiseStream.normal

    def too_little(self, std, reference):
        return draw(self, std / 20, reference)

    monkeypatch.setattr(NoiseStream, "normal", too_little)
    result = _audit("nlft", 2.0, seed=6, **path)
    assert result.grad_sample_mode == PATHS[path.get("grad_sample_mode", "auto")]
    assert result.refutes_claim and result.epsilon_lb > result.claimed_epsilon
    assert "REFUTED" in result.statement()


@pytest.mark.parametrize("mode", PATHS)
def test_excluded_input_canaries_are_absent_and_included_ones_plain_examples(mode):
    """Non-private, full batch, plain SGD: the audit's run equals fit on the real data plus the
    included canaries alone, with the learning rate rescaled for the audit's fixed divisor N = real + m."""
    canaries = mislabeled(easy_dataset(200, seed=9), 60, num_classes=3, seed=0)
    model = taft(tiny_vit(), 1)
    lr = 0.5
    result = audit_input(model, REAL, canaries, epsilon=None, delta=DELTA, seed=1, epochs=2, lr=lr, momentum=0.0,
                         grad_sample_mode=mode)
    chosen = Subset(canaries, np.flatnonzero(result.membership).tolist())
    alone = taft(tiny_vit(), 1)
    data = ConcatDataset([REAL, chosen])
    fit(alone, data, epsilon=None, batch_size=len(data), epochs=2, lr=lr * len(data) / (len(REAL) + len(canaries)),
        momentum=0.0, seed=0, quiet=True)
    assert 0 < len(chosen) < len(canaries) and result.grad_sample_mode == PATHS[mode]
    torch.testing.assert_close(trainable_vector(model), trainable_vector(alone), rtol=1e-4, atol=1e-6)


def test_input_canaries_run_through_the_plain_path():
    pool = easy_dataset(200, seed=9)
    canaries = mislabeled(pool, 100, num_classes=3, seed=0)
    images, labels = pool.tensors
    for x, y in canaries:  # every canary is a pool image under a wrong label
        source = int(torch.nonzero((images == x).flatten(1).all(1))[0])
        assert int(y) != int(labels[source])
    result = audit_input(taft(tiny_vit(), 1), REAL, canaries, epsilon=4.0, delta=DELTA, seed=0, epochs=3, lr=0.5)
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


@pytest.mark.parametrize(("extra", "mode", "bounds"), [
    ([], "bk", ("steinke", "gdp")),
    (["--sample-rate", "0.5", "--steps", "4", "--grad-sample-mode", "hooks"], "hooks", ("steinke", "fdp")),
])
def test_experiment_cli_writes_the_table(tmp_path, extra, mode, bounds):
    from experiments import audit as experiment

    code = experiment.main(["--data", "synthetic", "--m", "200", "--real", "20", "--epsilons", "8", "--methods",
                            "taft", "--out", str(tmp_path), "--threads", "1", *extra])
    assert code == 0
    table = (tmp_path / "audit.md").read_text()
    assert f"| TAFT-2 | {mode} |" in table and "| 7.9" in table
    assert all(f"| {b} |" in table for b in bounds)
    rows = list((tmp_path / "audit.csv").read_text().splitlines())
    assert len(rows) == 3 and rows[0].startswith("method,grad_sample_mode,sample_rate,target_epsilon")
    assert "does NOT prove it" in (tmp_path / "statements.txt").read_text()
    with pytest.raises(SystemExit):
        experiment.main(["--sample-rate", "0.5", "--steps", "3"])  # not whole epochs: refused before any work
