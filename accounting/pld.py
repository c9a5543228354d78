"""Privacy-loss-distribution (PLD) accountant for the Poisson-subsampled Gaussian.

Neighbouring relation: add/remove-one. One DP-SGD step with sampling rate q and
noise multiplier s releases, on neighbours D' = D + {z} vs D,

    remove direction:  P = (1-q) N(0, s^2) + q N(1, s^2)  against  Q = N(0, s^2),
    add direction:     the swapped pair (Q, P).

The privacy loss L(x) = log(P(x)/Q(x)) = log(1 - q + q exp((2x - 1) / (2 s^2)))
is increasing in x, so the hockey-stick divergence delta(eps) = E_P[(1 - e^(eps - L))_+]
of both pairs is computed from Gaussian interval masses. For T steps the pair
(D, D') is fixed, so the composition is T remove steps or T add steps: both
directions are composed separately and the larger delta (larger epsilon) is
reported -- exactly what dp_accounting does; taking only one direction can
under-report.

Discretisation (all on the lattice h*Z of privacy-loss values):

* Upper bound -- "connect the dots" (Doroshenko, Ghazi, Kamath, Kumar, Manurangsi
  2022, "Connect the Dots: Tighter Discrete Approximations of Privacy Loss
  Distributions"). The (P, Q)-mass of each loss interval
  (v_i, v_i + h] is split between its two end points so that both P and Q
  masses are preserved; the result is a dominating pair whose delta(eps)
  linearly interpolates the true delta in e^eps (a chord of a convex curve,
  hence an upper bound). P-mass above the top lattice point goes to +inf
  (it counts fully in delta); mass below the bottom point is rounded up.
* Lower bound -- the same intervals merged into one atom each (a
  post-processing, so dominated by the true pair) and rounded to the two end
  points preserving the mean. By Hoeffding's inequality the rounding moves the
  composed loss by more than Delta = h sqrt(T log(1/eta) / 2) with probability
  at most eta, so eps_true(delta) >= eps_low(delta + eta) - Delta
  (the style of error analysis of Gopi, Lee, Wutschitz 2021, "Numerical
  composition of differential privacy").  ``epsilon_bounds`` reports both; the gap is
  the discretisation error.

Composition: one FFT of each per-step PMF, raised to the power T (a single FFT
power, Koskela, Jälkö, Honkela 2020, "Computing tight differential privacy
guarantees using FFT") on a window [a, b] of the composed loss chosen by a
Chernoff bound  P(sum > b) <= exp(-lam b) M(lam)^T  with tail mass ``_TAIL``
on each side. Circular convolution folds the outside mass back into the window
(an over-count, harmless for the upper bound); for the upper bound the 2*_TAIL
of the outside mass is added to delta, for the lower bound it is subtracted.
The lattice step h is chosen from (q, s, T) so that the window has about
``_N_TARGET`` points.  FFT round-off (about 1e-17 per point) is outside the bound; negative
round-off is clipped to 0, which only adds mass.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import fft, signal, special

from accounting import _validate
from accounting.events import Segment

_STEP_TAIL = 1e-24  # per-step P-mass beyond the top lattice point (goes to +inf)
_TAIL = 1e-20  # composed mass allowed outside the FFT window, per side
_N_TARGET = 2**18  # lattice points in the composed window
_K_MAX = 2**18  # lattice points of one step's PMF at most
_COARSE = 2048  # lattice points per step in the pass that sizes the window
_ETA_FRACTION = 1e-3  # Hoeffding failure probability eta, as a fraction of delta


@dataclass(frozen=True)
class EpsilonBounds:
    """PLD epsilon of a history at a delta: ``epsilon`` is the reported upper bound.

    ``lower`` is a rigorous lower bound on the true epsilon, so the true value
    lies in [lower, epsilon] and ``error = epsilon - lower`` is the
    discretisation error.
    """

    epsilon: float
    lower: float
    delta: float

    @property
    def error(self) -> float:
        return self.epsilon - self.lower


@dataclass(frozen=True)
class _StepMasses:
    """(P, Q)-masses of one remove-direction step on the lattice v_i = (start + i) h, i = 0..n.

    Interval i is (v_i, v_{i+1}]; ``log_p``/``log_q`` are its log masses and
    ``d`` = log(P_i / Q_i) - v_i in [0, h] locates its mean loss. ``*_below`` are
    the masses with loss <= v_0, ``*_above`` those with loss > v_n (logs).
    """

    h: float
    start: int
    log_p: np.ndarray
    log_q: np.ndarray
    d: np.ndarray
    log_p_below: float
    log_q_below: float
    log_p_above: float
    log_q_above: float


@dataclass(frozen=True)
class _StepPMF:
    """One step's discrete loss PMF of one direction on lattice indices start..start+len(pmf)-1."""

    start: int
    pmf: np.ndarray
    infinity_mass: float
    steps: int
    h: float


def _log_normal_intervals(z: np.ndarray) -> np.ndarray:
    """log(Phi(z[i+1]) - Phi(z[i])) for increasing z, accurate in both tails."""
    log_cdf, log_sf = special.log_ndtr(z), special.log_ndtr(-z)
    with np.errstate(divide="ignore", invalid="ignore"):
        upper = log_sf[:-1] + np.log1p(-np.exp(log_sf[1:] - log_sf[:-1]))  # both ends above 0
        lower = log_cdf[1:] + np.log1p(-np.exp(log_cdf[:-1] - log_cdf[1:]))  # both ends below 0
        middle = np.log(-np.expm1(np.logaddexp(log_sf[1:], log_cdf[:-1])))
    za, zb = z[:-1], z[1:]
    out = np.where(za >= 0, upper, np.where(zb <= 0, lower, middle))
    return np.where(zb > za, out, -np.inf)


def _loss_to_x(v: np.ndarray, q: float, sigma: float) -> np.ndarray:
    """Inverse of L(x) = log(1 - q + q exp((2x-1)/(2 s^2))); -inf where v <= log(1-q)."""
    if q == 1.0:
        return sigma**2 * v + 0.5
    # log(e^v - (1 - q)) without forming e^v, which overflows for v > 709 (tiny sigma) and
    # would collapse the loss distribution's tail onto one point: an under-reported epsilon.
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        log_t = v + np.log1p(-(1.0 - q) * np.exp(-v))
    return np.where(v > math.log1p(-q), sigma**2 * (log_t - math.log(q)) + 0.5, -np.inf)


def _loss_range(q: float, sigma: float) -> tuple[float, float]:
    """Per-step loss values outside which the P-mass (or, for q=1, either tail) is below _STEP_TAIL."""
    z = -special.ndtri(_STEP_TAIL)
    x_hi = 1.0 + sigma * z
    top = float(np.logaddexp(math.log1p(-q) if q < 1 else -np.inf, math.log(q) + (2 * x_hi - 1) / (2 * sigma**2)))
    bottom = math.log1p(-q) if q < 1 else -top
    return bottom, top


@functools.lru_cache(maxsize=64)
def _step_masses(q: float, sigma: float, h: float) -> _StepMasses:
    bottom, top = _loss_range(q, sigma)
    start, stop = math.floor(bottom / h), math.ceil(top / h)
    v = np.arange(start, stop + 1) * h
    x = _loss_to_x(v, q, sigma)
    log_q = _log_normal_intervals(x / sigma)
    log_n1 = _log_normal_intervals((x - 1) / sigma)  # mass of N(1, s^2)
    log_p = np.logaddexp(math.log1p(-q) + log_q, math.log(q) + log_n1) if q < 1 else log_n1
    with np.errstate(invalid="ignore"):
        d = np.clip(log_p - log_q - v[:-1], 0.0, h)
    d = np.where(np.isfinite(log_p), d, 0.0)
    x_lo, x_hi = x[0], x[-1]
    return _StepMasses(
        h=h,
        start=start,
        log_p=log_p,
        log_q=log_q,
        d=d,
        log_p_below=float(special.log_ndtr((x_lo - 1) / sigma)) if q == 1 else -np.inf,
        log_q_below=float(special.log_ndtr(x_lo / sigma)) if q == 1 else -np.inf,
        log_p_above=float(np.logaddexp(math.log1p(-q) + special.log_ndtr(-x_hi / sigma) if q < 1 else -np.inf,
                                       math.log(q) + special.log_ndtr(-(x_hi - 1) / sigma))),
        log_q_above=float(special.log_ndtr(-x_hi / sigma)),
    )


def _discretise(log_a: np.ndarray, d: np.ndarray, h: float, log_a_below: float, log_a_above: float,
                log_b_above: float, top: float, pessimistic: bool) -> tuple[np.ndarray, float]:
    """PMF on n+1 lattice points of a pair (A, B) given its n interval masses; returns (pmf, infinity mass).

    ``d`` = log(A_i / B_i) - v_i in [0, h]; ``top`` is the highest lattice value.
    Pessimistic: connect-the-dots split (preserves A and B masses). Otherwise:
    mean-preserving split of the merged atom, mass below dropped, mass above
    rounded down to ``top``.
    """
    a = np.exp(log_a)
    pmf = np.zeros(a.size + 1)
    if pessimistic:
        scale = 1.0 / math.expm1(h)
        pmf[:-1] += a * np.expm1(h - d) * scale
        pmf[1:] += a * -np.expm1(-d) * math.exp(h) * scale
        pmf[0] += math.exp(log_a_below)
        # Above the top: B-mass stays at `top` (ratio e^top), the A-mass in excess of it goes to +inf.
        with np.errstate(invalid="ignore"):
            excess = top + log_b_above - log_a_above
        pmf[-1] += math.exp(top + log_b_above)
        infinity = math.exp(log_a_above) * -math.expm1(min(excess, 0.0)) if np.isfinite(log_a_above) else 0.0
        return pmf, infinity
    frac = d / h
    pmf[:-1] += a * (1.0 - frac)
    pmf[1:] += a * frac
    pmf[-1] += math.exp(log_a_above)
    return pmf, 0.0


def _step_pmfs(seg: Segment, h: float, pessimistic: bool) -> tuple[_StepPMF, _StepPMF]:
    """Per-step PMFs of the remove and add directions of ``seg`` on lattice h."""
    m = _step_masses(seg.sample_rate, seg.noise_multiplier, h)
    n = m.log_p.size
    top_remove = (m.start + n) * h
    rem, rem_inf = _discretise(m.log_p, m.d, h, m.log_p_below, m.log_p_above, m.log_q_above, top_remove, pessimistic)
    # Add direction = the pair (Q, P): losses negated, intervals reversed, d -> h - d.
    top_add = -m.start * h
    add, add_inf = _discretise(m.log_q[::-1], h - m.d[::-1], h, m.log_q_above, m.log_q_below, m.log_p_below,
                               top_add, pessimistic)
    return (_StepPMF(m.start, rem, rem_inf, seg.steps, h), _StepPMF(-(m.start + n), add, add_inf, seg.steps, h))


def _logsumexp_rows(x: np.ndarray) -> np.ndarray:
    top = np.max(x, axis=1, keepdims=True)
    return np.log(np.sum(np.exp(x - top), axis=1)) + top[:, 0]


def _log_mgf_bounds(part: _StepPMF, lams: np.ndarray, bin_width: float) -> tuple[np.ndarray, np.ndarray]:
    """Upper bounds on log E[exp(lam L)] and log E[exp(-lam L)] (finite part) for lam > 0.

    The PMF is moved onto a coarser lattice of spacing about ``bin_width`` by
    splitting each mass between the two neighbouring nodes, preserving its
    mean; e^(+-lam v) is convex, so this can only increase both moments (by at
    most a factor exp(lam^2 bin_width^2 / 8), Hoeffding's lemma).
    """
    width = max(1, int(bin_width / part.h))
    i = np.arange(part.pmf.size)
    frac = (i % width) / width
    mass = np.bincount(i // width, weights=part.pmf * (1 - frac), minlength=part.pmf.size // width + 2)
    mass += np.bincount(i // width + 1, weights=part.pmf * frac, minlength=mass.size)
    nodes = (part.start + np.arange(mass.size) * width) * part.h
    keep = mass > 0
    log_mass, nodes = np.log(mass[keep]), nodes[keep]
    up = _logsumexp_rows(log_mass[None, :] + lams[:, None] * nodes[None, :])
    down = _logsumexp_rows(log_mass[None, :] - lams[:, None] * nodes[None, :])
    return up, down


def _window(parts: Sequence[_StepPMF], width_hint: float = 0.0) -> tuple[float, float]:
    """Loss values [a, b] with P(sum < a), P(sum > b) <= _TAIL each (Chernoff bound).

    With ``width_hint`` (an estimate of b - a), the moments are bounded on a
    coarser lattice chosen to widen the window by about 0.1% at the typical
    Chernoff parameter; 0 uses the PMFs as they are.
    """
    var = 0.0
    for p in parts:
        v = (p.start + np.arange(p.pmf.size)) * p.h
        total = p.pmf.sum()
        mu = float(p.pmf @ v) / total
        var += p.steps * float(p.pmf @ (v - mu) ** 2) / total
    log_tail = math.log(_TAIL)
    lam0 = math.sqrt(-2 * log_tail / max(var, 1e-300))
    lams = lam0 * np.geomspace(1e-3, 1e2, 41)
    steps = sum(p.steps for p in parts)
    bin_width = math.sqrt(8e-3 * width_hint / (steps * lam0))
    up = np.zeros_like(lams)
    down = np.zeros_like(lams)
    for p in parts:
        u, d = _log_mgf_bounds(p, lams, bin_width)
        up += p.steps * u
        down += p.steps * d
    b = float(np.min((up - log_tail) / lams))
    a = float(np.max(-(down - log_tail) / lams))
    b = min(b, sum(p.steps * (p.start + p.pmf.size - 1) * p.h for p in parts))
    a = max(a, sum(p.steps * p.start * p.h for p in parts))
    return a, b


@dataclass(frozen=True)
class ComposedPLD:
    """Composed loss PMF of one direction on lattice values (start + t) h, t = 0..len(pmf)-1.

    ``delta(eps) = sum_t pmf[t] (1 - e^(eps - v_t))_+ + delta_offset`` where the
    offset holds the +inf mass and the out-of-window allowance.
    """

    h: float
    start: int
    pmf: np.ndarray
    delta_offset: float

    @functools.cached_property
    def _curves(self) -> tuple[np.ndarray, np.ndarray]:
        # Prepend one empty point so every epsilon below the window has a bracket.
        w = np.concatenate([[0.0], self.pmf])
        above = np.concatenate([np.cumsum(w[::-1])[::-1][1:], [0.0]])  # S_t = mass strictly above v_t
        # delta_t = e^-h delta_{t+1} + (1 - e^-h) S_t: a recursion with positive terms only.
        r = math.exp(-self.h)
        finite = signal.lfilter([1.0 - r], [1.0, -r], above[::-1])[::-1]
        return above, np.minimum(finite, above)

    def delta(self, epsilon: float) -> float:
        above, finite = self._curves
        t = int(np.clip(math.floor(epsilon / self.h) - (self.start - 1), 0, above.size - 1))
        v_t = (self.start - 1 + t) * self.h
        value = finite[t] - math.expm1(epsilon - v_t) * (above[t] - finite[t])
        return float(min(1.0, max(0.0, value + self.delta_offset)))

    def epsilon(self, delta: float) -> float:
        """Smallest epsilon >= 0 with delta(epsilon) <= delta (inf if none)."""
        target = delta - self.delta_offset
        if target <= 0:
            return math.inf
        above, finite = self._curves
        t = int(np.searchsorted(-finite, -target, side="left"))  # first t with finite[t] <= target
        j = max(t - 1, 0)
        gap = above[j] - finite[j]
        if gap <= 0:
            return max(0.0, (self.start - 1 + j) * self.h)
        arg = (finite[j] - target) / gap
        eps = (self.start - 1 + j) * self.h + (math.log1p(arg) if arg > -1 else -math.inf)
        return max(0.0, eps)


def _span(seg: Segment) -> float:
    bottom, top = _loss_range(seg.sample_rate, seg.noise_multiplier)
    return top - bottom


def _choose_h(segments: Sequence[Segment]) -> tuple[float, float]:
    """Lattice step h and an estimate of the composed window width (loss units).

    The window is sized from a coarse pass (each step on its own lattice of
    _COARSE points); h gives that window about _N_TARGET points, and each step's
    PMF at most _K_MAX points. The window actually used is recomputed on the
    fine PMFs.
    """
    coarse = [_step_pmfs(seg, _span(seg) / _COARSE, True) for seg in segments]
    width = max(b - a for a, b in (_window([c[k] for c in coarse]) for k in (0, 1)))
    return max(width / _N_TARGET, max(_span(s) for s in segments) / _K_MAX), width


@functools.lru_cache(maxsize=8)
def _compose(segments: tuple[Segment, ...], pessimistic: bool) -> tuple[ComposedPLD, ComposedPLD]:
    """Composed (remove, add) PLDs of ``segments`` (non-empty, steps > 0)."""
    h, width = _choose_h(segments)
    per_step = [_step_pmfs(seg, h, pessimistic) for seg in segments]
    out = []
    for direction in (0, 1):
        parts = [p[direction] for p in per_step]
        a, b = _window(parts, width)
        start = math.floor(a / h)
        n = fft.next_fast_len(math.ceil(b / h) - start + 1, real=True)
        spectrum = np.ones(n // 2 + 1, dtype=complex)
        log_finite = 0.0
        for p in parts:
            # Reduction mod n commutes with convolution, so a step PMF wider than the window is fine.
            folded = np.bincount((p.start + np.arange(p.pmf.size)) % n, weights=p.pmf, minlength=n)
            spectrum *= fft.rfft(folded) ** p.steps
            log_finite += p.steps * math.log1p(-p.infinity_mass)
        composed = np.roll(fft.irfft(spectrum, n), -(start % n))  # index t <-> loss (start + t) h
        composed = np.maximum(composed, 0.0)  # FFT round-off; clipping only adds mass
        if pessimistic:
            offset = -math.expm1(log_finite) + 2 * _TAIL
        else:
            offset = -2 * _TAIL
        out.append(ComposedPLD(h, start, composed, offset))
    return out[0], out[1]


def _history(segments: Sequence[Segment]) -> tuple[Segment, ...]:
    return tuple(s for s in segments if s.steps > 0)


def epsilon(segments: Sequence[Segment], delta: float) -> float:
    """Upper bound on the epsilon (nats) of the composed ``segments`` at ``delta`` in (0, 1)."""
    d = _validate.delta(delta)
    history = _history(segments)
    if not history:
        return 0.0
    return max(pld.epsilon(d) for pld in _compose(history, True))


def delta(segments: Sequence[Segment], epsilon: float) -> float:
    """Upper bound on the delta of the composed ``segments`` at ``epsilon`` in (0, inf)."""
    e = _validate.epsilon(epsilon)
    history = _history(segments)
    if not history:
        return 0.0
    return max(pld.delta(e) for pld in _compose(history, True))


def epsilon_bounds(segments: Sequence[Segment], delta: float) -> EpsilonBounds:
    """Upper bound (reported) and rigorous lower bound on the true epsilon at ``delta``.

    The lower bound is eps_low(delta + eta) - Delta with eta = 1e-3 delta and
    Delta = h sqrt(T log(1/eta) / 2) (see the module docstring).
    """
    d = _validate.delta(delta)
    history = _history(segments)
    if not history:
        return EpsilonBounds(0.0, 0.0, d)
    upper = max(pld.epsilon(d) for pld in _compose(history, True))
    low_plds = _compose(history, False)
    eta = _ETA_FRACTION * d
    steps = sum(s.steps for s in history)
    shift = low_plds[0].h * math.sqrt(steps * math.log(1 / eta) / 2)
    lower = max(pld.epsilon(min(d + eta, 1.0)) for pld in low_plds) - shift
    return EpsilonBounds(upper, max(0.0, min(lower, upper)), d)
