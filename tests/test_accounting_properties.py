"""Properties over random cases: monotonicity, inverse, composition, calibration."""

import math

import numpy as np
import pytest

import accounting
from accounting import pld, rdp
from accounting.events import Segment

RNG = np.random.default_rng(7)
CASES = [(float(10 ** RNG.uniform(-0.2, 1)), float(10 ** RNG.uniform(-3.5, -0.7)), int(10 ** RNG.uniform(0.5, 4)),
          float(10 ** RNG.uniform(-9, -4))) for _ in range(8)]
METHODS = ["pld", "rdp"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("sigma,q,steps,delta", CASES)
def test_monotone(sigma, q, steps, delta, method):
    e = accounting.epsilon(sigma, q, steps, delta, method)
    assert accounting.epsilon(sigma * 1.1, q, steps, delta, method) < e
    assert accounting.epsilon(sigma, min(1.0, q * 1.5), steps, delta, method) > e
    assert accounting.epsilon(sigma, q, steps * 2, delta, method) > e
    assert accounting.epsilon(sigma, q, steps, delta * 10, method) < e


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("sigma,q,steps,delta", CASES[:5])
def test_epsilon_delta_inverse(sigma, q, steps, delta, method):
    e = accounting.epsilon(sigma, q, steps, delta, method)
    d = accounting.delta(sigma, q, steps, e, method)
    assert d <= delta * (1 + 1e-6)
    assert accounting.epsilon(sigma, q, steps, d, method) == pytest.approx(e, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("sigma,q,steps,delta", CASES[:5])
def test_equal_segments_equal_one_segment(sigma, q, steps, delta):
    split = [Segment(sigma, q, steps), Segment(sigma, q, 2 * steps)]
    whole = [Segment(sigma, q, 3 * steps)]
    assert rdp.epsilon(split, delta) == pytest.approx(rdp.epsilon(whole, delta), rel=1e-12)
    b = pld.epsilon_bounds(whole, delta)
    assert pld.epsilon(split, delta) == pytest.approx(b.epsilon, abs=max(b.error, 1e-9))
    assert pld.epsilon(split, delta) >= b.lower


def test_history_of_different_segments_is_between_its_parts():
    a, b = Segment(1.0, 0.01, 500), Segment(2.0, 0.02, 500)
    both = accounting.epsilon_of_history([a, b], 1e-5)
    assert max(accounting.epsilon_of_history([a], 1e-5), accounting.epsilon_of_history([b], 1e-5)) < both
    assert both < accounting.epsilon_of_history([Segment(1.0, 0.02, 1000)], 1e-5)


def test_pld_is_tighter_than_rdp():
    for sigma, q, steps, delta in CASES:
        assert accounting.epsilon(sigma, q, steps, delta) <= accounting.epsilon(sigma, q, steps, delta, "rdp")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("sigma,q,steps,delta", CASES[:3])
def test_noise_calibration_round_trip(sigma, q, steps, delta, method):
    target = accounting.epsilon(sigma, q, steps, delta, method)
    found = accounting.noise_multiplier(target, delta, q, steps, method)
    eps = accounting.epsilon(found, q, steps, delta, method)
    assert target * 0.995 <= eps <= target
    assert found == pytest.approx(sigma, rel=0.02)


@pytest.mark.parametrize("method", METHODS)
def test_max_steps_round_trip(method):
    sigma, q, delta, target = 1.1, 0.01, 1e-5, 1.5
    t = accounting.max_steps(target, delta, sigma, q, method)
    assert t > 0
    assert accounting.epsilon(sigma, q, t, delta, method) <= target < accounting.epsilon(sigma, q, t + 1, delta, method)


def test_unreachable_target_raises():
    with pytest.raises(ValueError, match="unreachable"):
        accounting.noise_multiplier(1e-4, 1e-10, 0.5, 100000, max_noise_multiplier=2.0)


def test_no_steps_is_free():
    assert accounting.epsilon(1.0, 0.1, 0, 1e-5) == 0.0
    assert accounting.max_steps(0.01, 1e-5, 0.5, 0.5) == 0


def test_events_reduce_to_segments():
    from accounting.events import ComposedEvent, as_segments
    ev = ComposedEvent((accounting.dpsgd_event(1.0, 0.01, 10), accounting.dpsgd_event(2.0, 0.02, 5)))
    assert as_segments(ev) == (Segment(1.0, 0.01, 10), Segment(2.0, 0.02, 5))
    assert Segment(1.0, 0.01, 10).event == accounting.dpsgd_event(1.0, 0.01, 10)
    assert accounting.epsilon_of_history(ev, 1e-5) == accounting.epsilon_of_history(as_segments(ev), 1e-5)
    assert math.isclose(accounting.epsilon_of_history([accounting.GaussianEvent(2.0)], 1e-5),
                        accounting.epsilon(2.0, 1.0, 1, 1e-5))


def test_accountant_records_and_round_trips():
    acc = accounting.PrivacyAccountant()
    for _ in range(3):
        acc.record(1.0, 0.01)
    acc.record(1.0, 0.01, steps=7)
    acc.record(2.0, 0.01, steps=5)
    assert acc.history == (Segment(1.0, 0.01, 10), Segment(2.0, 0.01, 5)) and acc.steps == 15
    e = acc.epsilon(1e-5)
    assert e == accounting.epsilon_of_history(acc.history, 1e-5)
    assert acc.delta(e) <= 1e-5 * (1 + 1e-6)
    assert set(acc.epsilons(1e-5)) == {"pld", "rdp"}
    import json
    state = json.loads(json.dumps(acc.state_dict()))
    again = accounting.PrivacyAccountant.from_state_dict(state)
    assert again.history == acc.history and again.method == acc.method
    fresh = accounting.PrivacyAccountant("rdp")
    fresh.load_state_dict(state)
    assert fresh.epsilon(1e-5) == e
    assert accounting.PrivacyAccountant().epsilon(1e-5) == 0.0


@pytest.mark.parametrize("method", ["pld", "rdp"])
def test_calibration_after_a_prior_history(method):
    prior = (accounting.Segment(1.5, 0.02, 300),)
    sigma = accounting.noise_multiplier(3.0, 1e-5, 0.05, 200, method, prior=prior)
    total = accounting.epsilon_of_history((*prior, accounting.Segment(sigma, 0.05, 200)), 1e-5, method)
    assert 0.995 * 3.0 <= total <= 3.0
    assert sigma > accounting.noise_multiplier(3.0, 1e-5, 0.05, 200, method)  # the prior left less budget
    spent = accounting.epsilon_of_history(prior, 1e-5, method)
    with pytest.raises(ValueError, match="unreachable"):
        accounting.noise_multiplier(spent * 0.99, 1e-5, 0.05, 200, method, prior=prior)
