"""One-run lower bounds on ε from canary guesses (statistics only; no torch).

The game (Steinke, Nasr, Jagielski, *Privacy Auditing with One (1) Training Run*,
NeurIPS 2023, arXiv:2305.08846, Algorithm 1): m canaries, each included in the training
set independently with probability 1/2 (bits S ∈ {0,1}^m); one training run; the auditor
then guesses "in" for some canaries and "out" for others (r guesses in all, abstaining on
the rest) from the trained model alone, and v of its guesses are right. If the run is
(ε, δ)-DP with respect to adding/removing any one canary, many right guesses are unlikely:
a test at level β = 1 − confidence rejects every ε whose bound on P[≥ v right] is ≤ β, and
the largest rejected ε is the lower bound ε_lb. Three bounds on P[≥ v right]:

``"steinke"``
    Steinke et al., Theorem 3.1 (main result): for (ε, δ)-DP,
    P[≥ v right] ≤ F(v) + 2mδ·max_{1≤i≤v} (F(v−i) − F(v))/i with
    F(u) = P[Binomial(r, e^ε/(1+e^ε)) ≥ u]. Holds for any (ε, δ)-DP mechanism
    (made monotone in ε when 2mδ > 1, see :func:`steinke_p_value`).

``"fdp"``
    The one-run f-DP analysis of Mahloujifar, Melis, Chaudhuri (*Auditing f-Differential
    Privacy in One Run*, ICML 2025), applied to the trade-off curve of (ε, δ)-DP,
    f(α) = max(0, 1 − δ − e^ε·α, e^−ε·(1 − δ − α)). Holds for any (ε, δ)-DP mechanism;
    close to "steinke": slightly looser at δ = 0, tighter when 2mδ is not small.

``"gdp"``
    The same analysis with the Gaussian trade-off curve G_μ(α) = Φ(Φ⁻¹(1 − α) − μ):
    the largest μ rejected, μ_lb, is turned into ε_lb = ε of μ_lb-GDP at δ (Dong, Roth,
    Su 2022, Corollary 2.13). It refutes "the run is μ-GDP"; full-batch DP-SGD
    (sample rate 1, T steps, noise σ) is exactly μ-GDP with μ = √T/σ, so there it is a
    sound check of the claimed ε. It is NOT a bound on ε for other mechanisms (e.g.
    Poisson-subsampled DP-SGD, whose trade-off curve is not Gaussian).

The f-DP analysis, re-derived here (the proof is ours; the recursion is theirs). Let G
be the guessed canaries (|G| = r, chosen from the output only) and W the number of right
guesses. Define A_j = E[W·1{W ≥ j}] and B_j = E[(r − W)·1{W ≥ j}]. For canary i, given
the other bits, the test "i ∈ G and at least j − 1 of the OTHER guesses are right" is
a function of the output; in the world where the guess on i is right it fires exactly
when i is guessed right with W ≥ j, in the other world exactly when i is guessed wrong
with W ≥ j − 1. f-DP (both directions: add and remove) bounds its power by 1 − f of its
level; convexity of f (twice: over the guess's sign and over the other bits and i) gives

    A_j/m ≤ 1 − f(B_{j−1}/m),  i.e.  B_{j−1}/m ≥ g(A_j/m),  g(a) = inf{α: 1 − f(α) ≥ a},

and A_{j−1} = A_j + (j−1)·p_{j−1}, B_{j−1} = B_j + (r−j+1)·p_{j−1} with p_j = P[W = j].
Suppose P[W ≥ v] = β' ≥ β. Moving the mass above v down to v lowers A and raises B at
every level ≤ v, and so does moving mass β' − β from level v to level v − 1; both only
relax the constraints (g is nondecreasing) and keep the total probability, so it
suffices to start from A_v = vβ, B_v = (r−v)β. From there the least total probability
meeting every constraint below v is reached greedily from the top (moving mass from a
level to the one below it relaxes every constraint), and A_0 + B_0 = r·(total). So if
the greedy completion needs total probability > 1, then P[W ≥ v] < β: the claim is
rejected at level β. A pointwise smaller g (a weaker claim: larger ε or μ) only relaxes
the constraints, so rejections are nested and the search for the largest rejected
parameter is sound.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from scipy import optimize, special, stats

__all__ = [
    "BOUNDS",
    "epsilon_lower_bound",
    "gdp_mu_lower_bound",
    "gdp_epsilon",
    "steinke_p_value",
    "fdp_rejects",
]

#: Names of the bounds :func:`epsilon_lower_bound` implements (see the module docstring).
BOUNDS = ("steinke", "fdp", "gdp")
# Search ranges: ε in nats, μ in GDP units. A bound at the top of the range is reported
# as the top (still a valid lower bound); 60 nats is beyond any ε worth claiming.
_EPS_MAX, _MU_MAX = 60.0, 40.0
# Bisection steps: the bracket shrinks to 60·2^-50, far below what is printed.
_BISECT = 50
# A total probability counts as "> 1" only beyond this relative margin, so float
# rounding in the recursion can never reject a claim that holds.
_REL_TOL = 1e-9


def steinke_p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """Bound on P[≥ v right out of r guesses] for an (ε, δ)-DP run with m canaries.

    Steinke, Nasr, Jagielski 2023, Theorem 3.1: with F(u) = P[Binomial(r, e^ε/(1+e^ε)) ≥ u]
    (F(u) = 1 for u ≤ 0, so i > v adds nothing) and c = 2mδ,

        F(v) + c·max_{1≤i≤v} (F(v−i) − F(v))/i = max_i [(1 − c/i)·F(v) + (c/i)·F(v−i)].

    Each term is nondecreasing in ε when c/i ≤ 1; a term with c/i > 1 is replaced by the
    larger (c/i)·F(v−i), so the returned bound is always nondecreasing in ε (rejecting ε
    then rejects every smaller ε, which the search for ε_lb relies on) and equals the
    theorem's whenever 2mδ ≤ 1. ``epsilon`` >= 0 in nats, ``delta`` in [0, 1]. Returns a
    probability in [0, 1].
    """
    _check_counts(m, r, v)
    if not (epsilon >= 0 and 0 <= delta <= 1):
        raise ValueError(f"need epsilon >= 0 and delta in [0, 1], got epsilon={epsilon!r}, delta={delta!r}")
    p = special.expit(epsilon)  # accuracy of one ε-DP randomized-response guess
    tail_v = float(stats.binom.sf(v - 1, r, p))
    if delta == 0 or v == 0:
        return min(1.0, tail_v)
    share = 2 * m * delta / np.arange(1, v + 1)  # c/i
    tails = stats.binom.sf(v - np.arange(1, v + 1) - 1, r, p)  # F(v − i)
    return min(1.0, float(np.max(np.maximum(0.0, 1 - share) * tail_v + share * tails)))


def fdp_rejects(m: int, r: int, v: int, beta: float, g: Callable[[float], float]) -> bool:
    """Whether v right guesses out of r (m canaries) reject an f-DP claim at level ``beta``.

    ``g(a)`` = inf{α : 1 − f(α) ≥ a} for the claimed trade-off curve f (nondecreasing in
    a ∈ [0, 1]). Runs the greedy recursion of the module docstring from level v down to 1,
    in units of probability·guesses/m; True when the constraints need total probability > 1.
    """
    correct, wrong = v * beta / m, (r - v) * beta / m  # A_v/m, B_v/m
    budget = r / m * (1 + _REL_TOL)  # A_0 + B_0 = r·P[W ≥ 0] = r
    for j in range(v, 0, -1):
        need = g(correct)
        if need <= wrong:
            # No mass needed at level j−1, so A and B stay put and every lower
            # constraint g(A_j) ≤ B holds too: the greedy completion is finished.
            break
        # p_{j−1} = (need − wrong)·m/(r−j+1) raises A by (j−1)·p_{j−1}.
        correct += (j - 1) / (r - j + 1) * (need - wrong)
        wrong = need
        if correct + wrong > budget:
            return True
    return correct + wrong > budget


def _g_epsilon_delta(epsilon: float, delta: float) -> Callable[[float], float]:
    """g for (ε, δ)-DP: inverse of 1 − f with f(α) = max(0, 1−δ−e^ε·α, e^−ε·(1−δ−α))."""
    e = math.exp(epsilon)
    return lambda a: max(0.0, (a - delta) / e, 1.0 - delta - e * (1.0 - a))


def _g_gaussian(mu: float) -> Callable[[float], float]:
    """g for μ-GDP: 1 − G_μ(α) = Φ(Φ⁻¹(α) + μ), so g(a) = Φ(Φ⁻¹(a) − μ)."""
    return lambda a: float(special.ndtr(special.ndtri(a) - mu)) if a > 0 else 0.0


def _largest_rejected(rejects: Callable[[float], bool], top: float) -> float:
    """Largest x in [0, top] with ``rejects(x)``, for a predicate true on [0, x*) and false after.

    Bisection that only ever returns a point where the claim was rejected (or 0).
    """
    if not rejects(0.0):
        return 0.0
    if rejects(top):
        return top
    low, high = 0.0, top
    for _ in range(_BISECT):
        mid = (low + high) / 2
        low, high = (mid, high) if rejects(mid) else (low, mid)
    return low


def gdp_epsilon(mu: float, delta: float) -> float:
    """ε (nats) of μ-GDP at δ in (0, 1): the root of Φ(−ε/μ + μ/2) − e^ε·Φ(−ε/μ − μ/2) = δ.

    Dong, Roth, Su 2022, Corollary 2.13; 0 when μ-GDP is already (0, δ)-DP.
    """
    if mu <= 0:
        return 0.0

    def excess(eps: float) -> float:  # δ(ε) − δ, decreasing in ε; e^ε·Φ(·) in logs (no overflow)
        return float(special.ndtr(-eps / mu + mu / 2) - math.exp(eps + special.log_ndtr(-eps / mu - mu / 2))) - delta

    if excess(0.0) <= 0:
        return 0.0
    top = mu * mu / 2 + mu * 40  # δ(top) < Φ(−40) < any δ accepted here
    return float(optimize.brentq(excess, 0.0, top, xtol=1e-12))


def gdp_mu_lower_bound(m: int, r: int, v: int, *, confidence: float = 0.95) -> float:
    """Largest μ such that "the run is μ-GDP" is rejected at ``confidence`` (0 if none).

    One-run f-DP analysis (module docstring) with the Gaussian trade-off curve G_μ.
    """
    _check_counts(m, r, v)
    beta = 1 - _check_confidence(confidence)
    return _largest_rejected(lambda mu: fdp_rejects(m, r, v, beta, _g_gaussian(mu)), _MU_MAX)


def epsilon_lower_bound(m: int, r: int, v: int, *, delta: float, confidence: float = 0.95,
                        bound: str = "steinke") -> float:
    """ε_lb (nats): the run is not (ε, δ)-DP for any ε < ε_lb, at the given confidence.

    Args:
        m: number of canaries (>= 1), each included independently with probability 1/2.
        r: guesses made (0 <= r <= m; abstentions excluded).
        v: right guesses (0 <= v <= r).
        delta: δ of the claim tested, in [0, 1) (the run's δ).
        confidence: 1 − β in (0, 1); the probability, over the canaries' coin flips and the
            run's randomness, that a correct (ε, δ)-DP run yields ε_lb < ε is at least this.
        bound: "steinke", "fdp" or "gdp" (see the module docstring; "gdp" reads ε off the
            rejected μ-GDP curve and is a bound on ε only for Gaussian mechanisms such as
            full-batch DP-SGD).

    Returns 0 when nothing is rejected (e.g. v <= r/2).
    """
    _check_counts(m, r, v)
    beta = 1 - _check_confidence(confidence)
    if not (isinstance(delta, (int, float)) and 0 <= delta < 1):
        raise ValueError(f"delta must be a number in [0, 1) (the δ of the claim tested), got {delta!r}")
    bound = _check_bound(bound)
    if bound == "steinke":
        return _largest_rejected(lambda eps: steinke_p_value(m, r, v, eps, delta) <= beta, _EPS_MAX)
    if bound == "fdp":
        return _largest_rejected(lambda eps: fdp_rejects(m, r, v, beta, _g_epsilon_delta(eps, delta)), _EPS_MAX)
    if delta == 0:
        raise ValueError("bound='gdp' needs delta > 0: a μ-GDP run with μ > 0 is not (ε, 0)-DP for any ε")
    return gdp_epsilon(gdp_mu_lower_bound(m, r, v, confidence=confidence), delta)


# --------------------------------------------------------------------------- checks
def _is_int(x: object) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _check_counts(m: int, r: int, v: int) -> None:
    if not (_is_int(m) and _is_int(r) and _is_int(v)):
        raise ValueError(f"m, r, v must be integers (canaries, guesses, right guesses), got {m!r}, {r!r}, {v!r}")
    if not (m >= 1 and 0 <= v <= r <= m):
        raise ValueError(f"need m >= 1 canaries and 0 <= v (right) <= r (guesses) <= m, got m={m}, r={r}, v={v}")


def _check_confidence(confidence: float) -> float:
    if not (isinstance(confidence, (int, float)) and not isinstance(confidence, bool) and 0 < confidence < 1):
        raise ValueError(f"confidence must be in (0, 1), e.g. 0.95, got {confidence!r}")
    return float(confidence)


def _check_bound(bound: str) -> str:
    if bound not in BOUNDS:
        raise ValueError(f"bound must be one of {BOUNDS}, got {bound!r}")
    return bound
