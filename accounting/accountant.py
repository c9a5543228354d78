"""Epsilon/delta of a training history, and the class-based accountant.

Both accountants (``"pld"``, the default and tight one, and ``"rdp"``) consume
the same events; neighbouring datasets differ by adding or removing one example.
No central-limit (GDP/CLT) approximation is ever used: it under-reports epsilon.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from accounting import _validate, pld, rdp
from accounting.events import Segment, as_segments


def epsilon_of_history(segments: Sequence[Segment], delta: float, method: str = "pld") -> float:
    """Epsilon (nats, an upper bound) of the composed ``segments`` at ``delta`` in (0, 1)."""
    _validate.method(method)
    _validate.delta(delta)
    history = as_segments(segments)
    return pld.epsilon(history, delta) if method == "pld" else rdp.epsilon(history, delta)


def delta_of_history(segments: Sequence[Segment], epsilon: float, method: str = "pld") -> float:
    """Delta (an upper bound) of the composed ``segments`` at ``epsilon`` in (0, inf)."""
    _validate.method(method)
    _validate.epsilon(epsilon)
    history = as_segments(segments)
    return pld.delta(history, epsilon) if method == "pld" else rdp.delta(history, epsilon)


def epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float, method: str = "pld") -> float:
    """Epsilon of ``steps`` DP-SGD steps (Poisson rate ``sample_rate`` in (0, 1], noise ``noise_multiplier`` > 0)."""
    return epsilon_of_history((Segment(noise_multiplier, sample_rate, steps),), delta, method)


def delta(noise_multiplier: float, sample_rate: float, steps: int, epsilon: float, method: str = "pld") -> float:
    """Delta of ``steps`` DP-SGD steps at ``epsilon`` > 0."""
    return delta_of_history((Segment(noise_multiplier, sample_rate, steps),), epsilon, method)


class PrivacyAccountant:
    """Records the DP-SGD steps of a run and answers epsilon(delta) / delta(epsilon) at any point.

    The neighbouring relation is add/remove-one; sampling is Poisson. Designed to
    be delegated to (e.g. by an Opacus ``IAccountant``): call
    ``record(noise_multiplier, sample_rate)`` once per optimiser step.
    """

    def __init__(self, method: str = "pld") -> None:
        self.method = _validate.method(method)
        self._history: list[Segment] = []

    def record(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        """Append ``steps`` steps; merged into the last segment when (sigma, q) are equal."""
        seg = Segment(noise_multiplier, sample_rate, steps)
        if seg.steps == 0:
            return
        last = self._history[-1] if self._history else None
        if last and (last.noise_multiplier, last.sample_rate) == (seg.noise_multiplier, seg.sample_rate):
            self._history[-1] = Segment(last.noise_multiplier, last.sample_rate, last.steps + seg.steps)
        else:
            self._history.append(seg)

    @property
    def history(self) -> tuple[Segment, ...]:
        return tuple(self._history)

    @property
    def steps(self) -> int:
        return sum(s.steps for s in self._history)

    def epsilon(self, delta: float) -> float:
        """Epsilon so far at ``delta`` with this accountant's method (0 before any step)."""
        return epsilon_of_history(self._history, delta, self.method)

    def delta(self, epsilon: float) -> float:
        """Delta so far at ``epsilon`` with this accountant's method."""
        return delta_of_history(self._history, epsilon, self.method)

    def epsilons(self, delta: float) -> dict[str, float]:
        """Epsilon at ``delta`` by every method, e.g. ``{"pld": 0.30, "rdp": 0.42}``."""
        return {m: epsilon_of_history(self._history, delta, m) for m in _validate.METHODS}

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state: method and history as [noise_multiplier, sample_rate, steps] rows."""
        return {
            "method": self.method,
            "history": [[s.noise_multiplier, s.sample_rate, s.steps] for s in self._history],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace the method and history by those of ``state`` (validated)."""
        method = _validate.method(state["method"])
        history = [Segment(*row) for row in state["history"]]
        self.method, self._history = method, [s for s in history if s.steps]

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> "PrivacyAccountant":
        acc = cls(state["method"])
        acc.load_state_dict(state)
        return acc

    def __repr__(self) -> str:
        return f"PrivacyAccountant(method={self.method!r}, steps={self.steps}, segments={len(self._history)})"
