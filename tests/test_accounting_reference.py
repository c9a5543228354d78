"""Agreement with Google's dp_accounting (test-only dependency) on a grid spanning
q in [1e-4, 0.5], sigma in [0.5, 20], T in [1, 1e5], delta in [1e-10, 1e-3]."""

import math
import warnings

import numpy as np
import pytest

from accounting import pld, rdp
from accounting.events import Segment

dp_accounting = pytest.importorskip("dp_accounting")
from dp_accounting.pld import privacy_loss_distribution  # noqa: E402
from dp_accounting.rdp import rdp_privacy_accountant  # noqa: E402


def grid(n: int, seed: int) -> list[tuple[float, float, int, float]]:
    """Log-uniform random cases plus the corners of the ranges."""
    rng = np.random.default_rng(seed)
    cases = [(0.5, 1e-4, 1, 1e-10), (20.0, 0.5, 100000, 1e-3), (20.0, 1e-4, 100000, 1e-10), (0.5, 0.5, 1, 1e-3),
             (20.0, 0.5, 1, 1e-10), (0.5, 1e-4, 100000, 1e-3)]
    while len(cases) < n:
        cases.append((
            float(10 ** rng.uniform(math.log10(0.5), math.log10(20))),
            float(10 ** rng.uniform(-4, math.log10(0.5))),
            int(round(10 ** rng.uniform(0, 5))),
            float(10 ** rng.uniform(-10, -3)),
        ))
    return cases


RDP_CASES = grid(110, seed=1)
# PLD: dp_accounting's own PLD becomes slow when epsilon is in the hundreds; DP-SGD
# configurations of interest have epsilon well below 64, so cases above that are skipped.
PLD_CASES = [c for c in grid(140, seed=2) if rdp.epsilon([Segment(c[0], c[1], c[2])], c[3]) <= 64][:110]


def test_grids_are_large_enough():
    assert len(RDP_CASES) >= 100 and len(PLD_CASES) >= 100


@pytest.mark.parametrize("sigma,q,steps,delta", RDP_CASES)
def test_rdp_matches_dp_accounting(sigma, q, steps, delta):
    orders = rdp.DEFAULT_ORDERS
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = steps * rdp_privacy_accountant._compute_rdp_poisson_subsampled_gaussian(q, sigma, orders)
    ours = rdp.rdp_of_history([Segment(sigma, q, steps)], orders)
    finite = np.isfinite(theirs)
    assert np.all(np.isfinite(ours[finite]))  # never drop an order they can evaluate
    np.testing.assert_allclose(ours[finite], theirs[finite], rtol=1e-6)
    eps_theirs = rdp_privacy_accountant.compute_epsilon(orders[finite], theirs[finite], delta)[0]
    assert rdp.epsilon([Segment(sigma, q, steps)], delta) <= eps_theirs * (1 + 1e-6) + 1e-12
    assert rdp.epsilon_from_rdp(orders[finite], ours[finite], delta)[0] == pytest.approx(eps_theirs, rel=1e-6)


def dp_accounting_pld(sigma: float, q: float, steps: int, delta: float, interval: float, pessimistic: bool) -> float:
    """dp_accounting's PLD epsilon: connect-the-dots upper bound, or privacy-buckets lower bound."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pmf = privacy_loss_distribution.from_gaussian_mechanism(
            sigma, pessimistic_estimate=pessimistic, use_connect_dots=pessimistic,
            value_discretization_interval=interval, sampling_prob=q)
        return pmf.self_compose(steps).get_epsilon_for_delta(delta)


@pytest.mark.parametrize("sigma,q,steps,delta", PLD_CASES)
def test_pld_matches_dp_accounting(sigma, q, steps, delta):
    # dp_accounting's slack grows with T and with interval / (per-step loss), so its interval
    # shrinks for long runs and tiny epsilons.
    scale = rdp.epsilon([Segment(sigma, q, steps)], delta)
    interval = min(1e-4 if steps > 1000 else 1e-3, max(scale / 300, 1e-5))
    theirs = dp_accounting_pld(sigma, q, steps, delta, interval, pessimistic=True)
    # Their value minus their discretisation error: the optimistic estimate, a lower bound on the truth.
    theirs_lower = dp_accounting_pld(sigma, q, steps, delta, 1e-3, pessimistic=False)
    bounds = pld.epsilon_bounds([Segment(sigma, q, steps)], delta)
    assert bounds.epsilon >= theirs_lower - 1e-9
    assert abs(bounds.epsilon - theirs) <= max(0.02 * theirs, 0.01)
    assert bounds.lower <= bounds.epsilon <= scale * (1 + 1e-9) + 1e-9  # and never above RDP
