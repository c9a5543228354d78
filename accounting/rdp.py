"""Rényi-DP accountant for the Poisson-subsampled Gaussian mechanism.

Neighbouring relation: add/remove-one. For the Poisson-subsampled Gaussian the
remove direction D_a(P || Q), P = (1-q) N(0, s^2) + q N(1, s^2), Q = N(0, s^2),
is the larger of the two (Mironov, Talwar, Zhang 2019, "Rényi Differential
Privacy of the Sampled Gaussian Mechanism", arXiv:1908.10530, Sec. 3), so the
RDP of one step at order a is

    rdp(a) = log(A_a) / (a - 1),    A_a = E_{z ~ Q}[(P(z) / Q(z))^a].

``A_a`` is evaluated in log space with the two series of that paper:

* integer a (Sec. 3.2, eq. (3)):  A_a = sum_{k=0}^{a} C(a,k) (1-q)^(a-k) q^k exp((k^2 - k) / (2 s^2));
* fractional a (Sec. 3.3): A_a = A_a0 + A_a1, the integrals over z <= z0 and
  z > z0, z0 = s^2 log(1/q - 1) + 1/2, each expanded as a binomial series whose
  terms carry a Gaussian tail factor erfc(.)/2.  Terms are summed with |C(a,i)|,
  which can only increase A_a (so the bound stays valid) and is what the
  authors' reference implementation (and dp_accounting) computes.  For i > a
  the signed terms alternate, so the remainder dropped by the stopping rule is
  smaller than the first dropped term, far below what the dropped signs add.
  An order whose series has not converged after ``_MAX_TERMS`` terms is
  reported as +inf, i.e. dropped from the minimum over orders.

Composition adds RDP order by order. Conversion to (epsilon, delta) uses the
tight bound of Balle, Barthe, Gaboardi, Hsu, Sato 2020, "Hypothesis testing
interpretations and Rényi differential privacy", Thm 21 (also Canonne, Kamath,
Steinke 2020, Prop. 12 -- the conversion of Opacus and dp_accounting):

    epsilon = rdp(a) + log(1 - 1/a) - (log(delta) + log(a)) / (a - 1),

minimised over the orders, together with delta <= sqrt(1 - exp(-rdp(a))), the
Bretagnolle-Huber bound on total variation (KL <= D_a), which makes epsilon = 0
when delta is that large.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy import special

from accounting import _validate
from accounting.events import Segment

#: Dense default grid of orders: step 0.05 on (1, 11), every integer up to 64,
#: then integers up to 4096 for very small epsilons (large sigma, small q).
DEFAULT_ORDERS: np.ndarray = np.concatenate(
    [
        np.round(np.arange(1.05, 11.0, 0.05), 2),
        np.arange(11, 64, dtype=float),
        np.array([64, 72, 80, 96, 112, 128, 160, 192, 256, 320, 384, 512, 768, 1024, 2048, 4096], dtype=float),
    ]
)

_MAX_TERMS = 4096  # series terms per fractional order before giving up (order -> +inf)
_CHUNK = 128  # fractional series terms evaluated per vectorised pass
_CONVERGED = 30.0  # stop once new terms are below exp(-30) ~ 1e-13 of the running sum


def _log_comb(n: np.ndarray, k: np.ndarray) -> np.ndarray:
    """log |C(n, k)| for real n and integer k >= 0 (gammaln returns log |Gamma|)."""
    return special.gammaln(n + 1) - special.gammaln(k + 1) - special.gammaln(n - k + 1)


def _log_a_int(q: float, sigma: float, order: int) -> float:
    """log A_a for integer a >= 2 (Mironov et al. 2019, eq. (3))."""
    k = np.arange(order + 1, dtype=float)
    terms = (
        _log_comb(np.float64(order), k)
        + k * math.log(q)
        + (order - k) * math.log1p(-q)
        + (k * k - k) / (2.0 * sigma**2)
    )
    return float(special.logsumexp(terms))


def _log_a_frac(q: float, sigma: float, orders: np.ndarray) -> np.ndarray:
    """log A_a for an array of fractional orders (Mironov et al. 2019, Sec. 3.3).

    Term i of both series is added until, for the first time, both series are
    decreasing and their larger term is below exp(-_CONVERGED) times the running
    sum (the stopping rule of the paper's reference implementation).
    """
    z0 = sigma**2 * math.log(1.0 / q - 1.0) + 0.5
    log_q, log_1mq = math.log(q), math.log1p(-q)
    total = np.full(orders.shape, -np.inf)
    prev0 = np.full(orders.shape, np.inf)  # last terms of the previous chunk
    prev1 = np.full(orders.shape, np.inf)
    active = np.ones(orders.shape, dtype=bool)
    for start in range(0, _MAX_TERMS, _CHUNK):
        idx = np.flatnonzero(active)
        a = orders[idx, None]
        i = np.arange(start, start + _CHUNK, dtype=float)[None, :]
        j = a - i
        log_coef = _log_comb(a, i)
        # log(erfc(x)/2) = log_ndtr(-sqrt(2) x): accurate far into the tail.
        s0 = log_coef + i * log_q + j * log_1mq + (i * i - i) / (2 * sigma**2) + special.log_ndtr((z0 - i) / sigma)
        s1 = log_coef + j * log_q + i * log_1mq + (j * j - j) / (2 * sigma**2) + special.log_ndtr((j - z0) / sigma)
        running = np.logaddexp.accumulate(np.logaddexp(s0, s1), axis=1)
        running = np.logaddexp(total[idx, None], running)
        before0 = np.concatenate([prev0[idx, None], s0[:, :-1]], axis=1)
        before1 = np.concatenate([prev1[idx, None], s1[:, :-1]], axis=1)
        stop = (s0 < before0) & (s1 < before1) & (np.maximum(s0, s1) < running - _CONVERGED)
        done = stop.any(axis=1)
        first = np.argmax(stop, axis=1)
        total[idx] = np.where(done, running[np.arange(idx.size), first], running[:, -1])
        prev0[idx], prev1[idx] = s0[:, -1], s1[:, -1]
        active[idx[done]] = False
        if not active.any():
            break
    total[active] = np.inf  # not converged: drop these orders (never under-report)
    return total


def rdp_subsampled_gaussian(
    sample_rate: float, noise_multiplier: float, orders: Sequence[float] = DEFAULT_ORDERS
) -> np.ndarray:
    """RDP (in nats) of one step of the Poisson-subsampled Gaussian at each order.

    Args:
      sample_rate: Poisson sampling probability q in (0, 1].
      noise_multiplier: noise std over L2 sensitivity, in (0, inf).
      orders: Rényi orders, each > 1.

    Returns:
      Array of RDP values, +inf for an order whose series did not converge.
    """
    q = _validate.sample_rate(sample_rate)
    sigma = _validate.noise_multiplier(noise_multiplier)
    alphas = _orders(orders)
    if q == 1.0:  # plain Gaussian mechanism: D_a = a / (2 s^2)
        return alphas / (2 * sigma**2)
    log_a = np.empty_like(alphas)
    is_int = alphas == np.floor(alphas)
    for n, a in enumerate(alphas):
        if is_int[n]:
            log_a[n] = _log_a_int(q, sigma, int(a))
    log_a[~is_int] = _log_a_frac(q, sigma, alphas[~is_int])
    return log_a / (alphas - 1)


def _orders(orders: Sequence[float]) -> np.ndarray:
    alphas = np.asarray(orders, dtype=float).reshape(-1)
    if alphas.size == 0 or not np.all(alphas > 1) or not np.all(np.isfinite(alphas)):
        raise ValueError(f"orders must be finite numbers in (1, inf), got {orders!r}")
    return alphas


def rdp_of_history(segments: Sequence[Segment], orders: Sequence[float] = DEFAULT_ORDERS) -> np.ndarray:
    """RDP of the composition of ``segments`` (RDP adds up over independent steps)."""
    total = np.zeros_like(_orders(orders))
    for seg in segments:
        if seg.steps:
            total = total + seg.steps * rdp_subsampled_gaussian(seg.sample_rate, seg.noise_multiplier, orders)
    return total


def epsilon_from_rdp(orders: Sequence[float], rdp: Sequence[float], delta: float) -> tuple[float, float]:
    """Smallest epsilon over ``orders`` for ``delta`` (Balle et al. 2020, Thm 21); returns (epsilon, order)."""
    d = _validate.delta(delta)
    a, r = _orders(orders), np.asarray(rdp, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        eps = r + np.log1p(-1.0 / a) - (math.log(d) + np.log(a)) / (a - 1)
        eps = np.where(d * d + np.expm1(-r) > 0, 0.0, eps)  # delta >= sqrt(1 - exp(-KL)): epsilon = 0
    eps = np.where(np.isnan(eps), np.inf, eps)
    best = int(np.argmin(eps))
    return max(0.0, float(eps[best])), float(a[best])


def delta_from_rdp(orders: Sequence[float], rdp: Sequence[float], epsilon: float) -> tuple[float, float]:
    """Smallest delta over ``orders`` for ``epsilon`` (Balle et al. 2020, Thm 21 inverted); returns (delta, order)."""
    e = _validate.epsilon(epsilon)
    a, r = _orders(orders), np.asarray(rdp, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        log_delta = (a - 1) * (r - e + np.log1p(-1.0 / a)) - np.log(a)
        log_delta = np.minimum(log_delta, 0.5 * np.log(-np.expm1(-r)))  # Bretagnolle-Huber
    log_delta = np.where(np.isnan(log_delta), np.inf, log_delta)
    best = int(np.argmin(log_delta))
    return min(1.0, math.exp(min(float(log_delta[best]), 0.0))), float(a[best])


def epsilon(segments: Sequence[Segment], delta: float, orders: Sequence[float] = DEFAULT_ORDERS) -> float:
    """RDP epsilon of the composed history ``segments`` at ``delta`` in (0, 1)."""
    return epsilon_from_rdp(orders, rdp_of_history(segments, orders), delta)[0]


def delta(segments: Sequence[Segment], epsilon: float, orders: Sequence[float] = DEFAULT_ORDERS) -> float:
    """RDP delta of the composed history ``segments`` at ``epsilon`` in (0, inf)."""
    return delta_from_rdp(orders, rdp_of_history(segments, orders), epsilon)[0]
