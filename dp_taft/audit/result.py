"""What an audit returns: :class:`AuditResult`, with the scores kept for re-analysis."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .bounds import BOUNDS
from .guesses import best_guesses

__all__ = ["AuditResult"]

_BOUND_NAMES = {
    "steinke": "Steinke-Nasr-Jagielski 2023, Thm 3.1 (binomial tail + δ term); any (ε, δ)-DP mechanism",
    "fdp": "one-run f-DP analysis (Mahloujifar-Melis-Chaudhuri 2025) with the (ε, δ)-DP trade-off curve; "
           "any (ε, δ)-DP mechanism",
    "gdp": "one-run f-DP analysis (Mahloujifar-Melis-Chaudhuri 2025) with Gaussian trade-off curves, "
           "ε read off the rejected μ-GDP curve; a bound on ε only for Gaussian mechanisms (full-batch DP-SGD)",
}
_CANARY_NAMES = {
    "dirac": "white-box Dirac gradient canaries (every canary row replaced: clipped gradient C·e_k if included, "
             "0 if not; score = −Δw_k)",
    "input": "input-space canaries (examples in the training set, an excluded one's row replaced by 0; "
             "score = −loss of the trained model)",
}
# How each of fit's modes replaces a canary row.
_MODE_NAMES = {
    "hooks": "grad_sample_mode 'hooks' (Opacus' per-sample gradients: a replaced row's is overwritten before Opacus "
             "clips it)",
    "bk": "grad_sample_mode 'bk' (book-keeping, fit's default path: a replaced row skips the backward and its "
          "clipped gradient is added to the book-keeping clipped sum)",
}


@dataclass(frozen=True)
class AuditResult:
    """One one-run audit: the empirical lower bound ``epsilon_lb`` beside the claimed ε.

    ``epsilon_lb``: nats, >= 0; with probability >= ``confidence`` a run that is
    (ε, ``delta``)-DP gives ``epsilon_lb`` < ε (for ``bound="gdp"``: a run that is μ-GDP
    gives ``epsilon_lb`` below the ε of μ-GDP at ``delta``).
    ``claimed_epsilon``: the run's reported ε (None for a non-private run, whose
    ``target_epsilon`` is None too). ``m`` canaries, ``included`` of them in the training
    set; ``r`` guesses (``k_in`` "in", ``k_out`` "out"), ``v`` right, the best of
    ``fractions`` (each tested at level (1 − confidence)/len(fractions)).
    ``noise_multiplier`` σ, ``sample_rate`` q and ``steps`` T of the run; ``grad_sample_mode``:
    the path fit ran, "bk" (book-keeping, fit's default where it applies) or "hooks";
    ``wall_time_s``: seconds for the whole audit (data, training, scoring, bound).
    ``scores``/``membership``: per canary, kept so that :meth:`with_bound` can re-analyse.
    """

    epsilon_lb: float
    claimed_epsilon: float | None
    target_epsilon: float | None
    delta: float
    confidence: float
    bound: str
    canary: str
    m: int
    included: int
    r: int
    v: int
    k_in: int
    k_out: int
    fractions: tuple[float, ...]
    noise_multiplier: float
    sample_rate: float
    steps: int
    grad_sample_mode: str
    wall_time_s: float
    scores: tuple[float, ...] = dataclasses.field(repr=False)
    membership: tuple[bool, ...] = dataclasses.field(repr=False)
    tie_seed: int = dataclasses.field(default=0, repr=False)

    @property
    def refutes_claim(self) -> bool:
        """True when ε_lb exceeds the claimed ε: the claim is refuted at ``confidence``."""
        return self.claimed_epsilon is not None and self.epsilon_lb > self.claimed_epsilon

    def with_bound(self, bound: str) -> "AuditResult":
        """The same run's scores analysed with another bound (one of :data:`~dp_taft.audit.bounds.BOUNDS`).

        Each bound holds at ``confidence`` on its own; reporting the larger of two is not
        covered by that confidence (it would need a union bound).
        """
        if bound == "gdp" and self.sample_rate != 1:
            raise ValueError("bound='gdp' needs a full-batch run (sample rate 1, exactly μ-GDP); this one had "
                             f"q={self.sample_rate:.4g}: use 'steinke' or 'fdp'")
        best = best_guesses(self.scores, self.membership, delta=self.delta, confidence=self.confidence,
                            bound=bound, fractions=self.fractions, tie_seed=self.tie_seed)
        return dataclasses.replace(self, bound=bound, epsilon_lb=best.epsilon_lb, r=best.r, v=best.v,
                                   k_in=best.k_in, k_out=best.k_out)

    def statement(self) -> str:
        """Plain-language account of what this audit shows and what it cannot show."""
        lines = [
            f"One-run privacy audit: {self.m} {_CANARY_NAMES[self.canary]}, each included with probability 1/2 "
            f"({self.included} were); one training run of {self.steps} DP-SGD steps at sample rate "
            f"{self.sample_rate:.4g}, noise multiplier {self.noise_multiplier:.4g}; "
            f"{_MODE_NAMES[self.grad_sample_mode]}.",
            f"Guesses: {self.r} ({self.k_in} 'in', {self.k_out} 'out'), {self.v} right; the best of "
            f"{len(self.fractions)} guess counts declared in advance, union-bounded.",
            f"Bound: {_BOUND_NAMES[self.bound]}.",
            f"Result: with confidence {self.confidence:.0%}, the run is not (ε, {self.delta:.3g})-DP for any "
            f"ε < ε_lb = {self.epsilon_lb:.3f}." if self.bound != "gdp" else
            f"Result: with confidence {self.confidence:.0%}, the run is not μ-GDP for any μ whose ε at "
            f"δ = {self.delta:.3g} is below ε_lb = {self.epsilon_lb:.3f}.",
        ]
        if self.claimed_epsilon is None:
            lines.append("The run was not private (no claim to compare with).")
        elif self.refutes_claim:
            lines.append(
                f"ε_lb > claimed ε = {self.claimed_epsilon:.3f}: the claim is REFUTED at this confidence. Either "
                "the noise, clipping, sampling or accounting is wrong, or an event of probability at most "
                f"{1 - self.confidence:.0%} occurred; rerun with a fresh seed to tell them apart.")
        else:
            ratio = self.epsilon_lb / self.claimed_epsilon
            lines.append(
                f"ε_lb ≤ claimed ε = {self.claimed_epsilon:.3f} (ratio {ratio:.2f}): "
                "the audit fails to refute the claim. It does NOT prove it: a lower bound only reports what this "
                "attack could show in one run, and the true ε may lie anywhere at or above ε_lb.")
        lines.append(_LIMITS[self.canary])
        return "\n".join(lines)

    def __post_init__(self) -> None:
        if self.bound not in BOUNDS or self.canary not in _CANARY_NAMES or self.grad_sample_mode not in _MODE_NAMES:
            raise ValueError(f"unknown bound {self.bound!r}, canary kind {self.canary!r} or grad_sample_mode "
                             f"{self.grad_sample_mode!r}")


_LIMITS = {
    "dirac": ("What it covers: Poisson sampling, the summing of the clipped gradients over physical batches, "
              "the noise actually added, the divisor and the accountant's ε for this (q, σ, T); in 'hooks' mode "
              "also Opacus' clipping of the canary rows. What it cannot see: how real examples' per-sample "
              "gradients and norms are computed (the canaries' are replaced; in 'bk' mode they are added already "
              "clipped), leaks outside the trained weights, and privacy of configurations other than this one."),
    "input": ("What it covers: the whole pipeline end to end, as an outside attacker sees it. It is weak: "
              "input canaries' influence on the final loss is far from the worst case, so a small ε_lb says "
              "little about the true ε."),
}
