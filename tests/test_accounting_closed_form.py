"""q = 1: T Gaussian mechanisms compose exactly into a Gaussian with mu = sqrt(T)/sigma."""

import math

import pytest
from scipy import optimize, stats

from accounting import pld, rdp
from accounting.events import Segment

CASES = [(1.0, 1, 1e-5), (1.0, 10, 1e-5), (0.5, 1, 1e-3), (2.0, 100, 1e-6), (5.0, 1000, 1e-10), (20.0, 3, 1e-4),
         (0.8, 50, 1e-8), (3.0, 10000, 1e-5)]


def exact_delta(eps: float, mu: float) -> float:
    """delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2) (Dong, Roth, Su 2019, Cor. 2.13)."""
    return stats.norm.cdf(-eps / mu + mu / 2) - math.exp(eps + stats.norm.logcdf(-eps / mu - mu / 2))


def exact_epsilon(delta: float, mu: float) -> float:
    hi = mu * mu / 2 + mu * math.sqrt(2 * math.log(1 / delta)) + 1  # delta(hi) < delta
    return optimize.brentq(lambda e: exact_delta(e, mu) - delta, 0.0, hi, xtol=1e-13, rtol=1e-13)


@pytest.mark.parametrize("sigma,steps,delta", CASES)
def test_pld_brackets_exact_epsilon(sigma, steps, delta):
    mu = math.sqrt(steps) / sigma
    true = exact_epsilon(delta, mu)
    b = pld.epsilon_bounds([Segment(sigma, 1.0, steps)], delta)
    assert b.lower <= true <= b.epsilon + 1e-9
    assert b.error <= max(0.02 * true, 1e-3)


@pytest.mark.parametrize("sigma,steps,delta", CASES)
def test_pld_delta_is_an_upper_bound(sigma, steps, delta):
    mu = math.sqrt(steps) / sigma
    eps = exact_epsilon(delta, mu)
    got = pld.delta([Segment(sigma, 1.0, steps)], eps)
    assert got >= exact_delta(eps, mu) * (1 - 1e-9)
    assert got <= 1.05 * delta


@pytest.mark.parametrize("sigma,steps,delta", CASES)
def test_rdp_is_above_exact(sigma, steps, delta):
    mu = math.sqrt(steps) / sigma
    assert rdp.epsilon([Segment(sigma, 1.0, steps)], delta) >= exact_epsilon(delta, mu)
    eps = exact_epsilon(delta, mu)
    assert rdp.delta([Segment(sigma, 1.0, steps)], eps) >= exact_delta(eps, mu)
