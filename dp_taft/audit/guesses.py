"""From canary scores to guesses and ε_lb, with the guess counts declared before looking.

The guesser ranks the m canaries by score (higher = more likely included), guesses "in"
for the k top-ranked and "out" for the k bottom-ranked, and abstains on the rest, for
each declared fraction r/m = 2k/m in ``fractions``. Every fraction is one hypothesis test,
so each is run at level β/len(fractions) (union bound) and the largest ε_lb is reported:
a correct run exceeds it with probability at most β overall. The fractions are fixed up
front (never chosen from the answers), and ties in score are broken by a fixed random
order so equal scores cannot be resolved with the answers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .bounds import _check_bound, _check_confidence, epsilon_lower_bound

__all__ = ["DEFAULT_FRACTIONS", "Guesses", "best_guesses"]

#: Default guessed fractions r/m, declared before any run: a small set spanning the
#: regimes (few very confident guesses pay at large ε, many guesses at small ε).
DEFAULT_FRACTIONS = (0.02, 0.05, 0.1, 0.2, 1.0)


@dataclass(frozen=True)
class Guesses:
    """The winning hypothesis: ``epsilon_lb`` (nats) from ``r`` guesses (``k_in`` "in", ``k_out`` "out"),
    ``v`` of them right, tested at level β/``hypotheses``."""

    epsilon_lb: float
    r: int
    v: int
    k_in: int
    k_out: int
    hypotheses: int


def best_guesses(scores: Sequence[float] | np.ndarray, included: Sequence[bool] | np.ndarray, *, delta: float,
                 confidence: float = 0.95, bound: str = "steinke",
                 fractions: Sequence[float] = DEFAULT_FRACTIONS, tie_seed: int = 0) -> Guesses:
    """ε_lb of the best declared guess count (union bound over ``fractions``).

    Args:
        scores: one finite score per canary; higher means "more likely included".
        included: the canaries' true membership bits (same length m >= 1).
        delta, confidence, bound: as in :func:`~dp_taft.audit.bounds.epsilon_lower_bound`.
        fractions: distinct guessed fractions r/m in (0, 1], declared before the run.
        tie_seed: seed of the fixed random order that breaks ties in ``scores``.
    """
    scores = np.asarray(scores, dtype=np.float64)
    included = np.asarray(included)
    _check_inputs(scores, included, fractions)
    confidence = _check_confidence(confidence)
    bound = _check_bound(bound)
    m = len(scores)
    # Rank by score, ties broken by a random order drawn before reading `included`.
    tiebreak = np.random.default_rng(tie_seed).permutation(m)
    order = np.lexsort((tiebreak, -scores))  # descending score
    right_if_in = included[order].astype(bool)
    level = (1 - confidence) / len(fractions)
    best = Guesses(0.0, 0, 0, 0, 0, len(fractions))
    for fraction in sorted(fractions):
        k = max(1, int(round(fraction * m / 2)))
        k_in = min(k, m)
        k_out = min(k, m - k_in)  # the two ends meet when r/m reaches 1
        v = int(right_if_in[:k_in].sum() + (~right_if_in[m - k_out:]).sum())
        r = k_in + k_out
        eps = epsilon_lower_bound(m, r, v, delta=delta, confidence=1 - level, bound=bound)
        if eps > best.epsilon_lb:
            best = Guesses(eps, r, v, k_in, k_out, len(fractions))
    return best


def _check_inputs(scores: np.ndarray, included: np.ndarray, fractions: Sequence[float]) -> None:
    if scores.ndim != 1 or len(scores) == 0:
        raise ValueError(f"scores must be a non-empty 1-D sequence (one per canary), got shape {scores.shape}")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores must be finite: a NaN or inf score cannot be ranked (did training diverge?)")
    if included.shape != scores.shape or not np.isin(included, (0, 1)).all():
        raise ValueError(f"included must hold one 0/1 (or bool) membership bit per score ({len(scores)}), "
                         f"got shape {included.shape}")
    fractions = list(fractions)
    if not fractions or len(set(fractions)) != len(fractions) or not all(
            isinstance(f, (int, float)) and not isinstance(f, bool) and 0 < f <= 1 for f in fractions):
        raise ValueError(f"fractions must be distinct numbers in (0, 1] (guessed share of the canaries), "
                         f"got {fractions}")
