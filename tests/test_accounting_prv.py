"""Agreement with Microsoft's prv_accountant (test-only dependency)."""

import pytest

from accounting import pld
from accounting.events import Segment

prv_accountant = pytest.importorskip("prv_accountant")
from prv_accountant.privacy_random_variables import PoissonSubsampledGaussianMechanism  # noqa: E402

# Moderate T keeps prv_accountant's own run short.
CASES = [(0.8, 0.001, 1000, 1e-5), (1.0, 0.01, 2000, 1e-6), (2.0, 0.05, 500, 1e-8), (0.6, 0.2, 50, 1e-5),
         (5.0, 0.3, 3000, 1e-10), (1.2, 1e-3, 10000, 1e-5)]


@pytest.mark.parametrize("sigma,q,steps,delta", CASES)
def test_pld_inside_prv_bracket(sigma, q, steps, delta):
    acc = prv_accountant.PRVAccountant(
        prvs=[PoissonSubsampledGaussianMechanism(noise_multiplier=sigma, sampling_probability=q)],
        max_self_compositions=[steps], eps_error=0.01, delta_error=delta / 1000)
    low, _, high = acc.compute_epsilon(delta, [steps])
    ours = pld.epsilon_bounds([Segment(sigma, q, steps)], delta)
    assert low - ours.error <= ours.epsilon <= high + ours.error
    # Our own bracket must overlap theirs: both contain the true epsilon.
    assert ours.lower <= high and low <= ours.epsilon
