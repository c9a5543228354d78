"""A typed, serialisable record of one run's privacy guarantee."""

from __future__ import annotations

import dataclasses
import json
import math
import platform
from dataclasses import dataclass, field
from importlib import metadata
from typing import Optional, Sequence

import numpy
import scipy

from accounting import _validate, pld
from accounting.accountant import epsilon_of_history
from accounting.events import Segment, as_segments


def library_versions() -> dict[str, str]:
    """Versions of the code that produced a report."""
    try:
        ours = metadata.version("dp_taft")
    except metadata.PackageNotFoundError:
        ours = "unknown"
    return {"accounting": ours, "numpy": numpy.__version__, "scipy": scipy.__version__,
            "python": platform.python_version()}


@dataclass(frozen=True)
class PrivacyReport:
    """The (epsilon, delta) guarantee of one DP-SGD run.

    ``epsilon`` is computed with ``method`` (an upper bound on the true value);
    ``epsilons`` holds the value of every available method. Neighbouring
    datasets differ by adding or removing one example; sampling is Poisson.
    """

    epsilon: float
    delta: float
    method: str
    epsilons: dict[str, float]
    history: tuple[Segment, ...]
    dataset_size: Optional[int] = None
    max_grad_norm: Optional[float] = None
    sampling: str = "poisson"
    versions: dict[str, str] = field(default_factory=library_versions)
    target_epsilon: Optional[float] = None
    notes: str = ""
    #: PLD only: width of [rigorous lower bound, epsilon] on the true epsilon (see accounting.pld.epsilon_bounds).
    epsilon_error: Optional[float] = None

    def __post_init__(self) -> None:
        _validate.method(self.method)
        _validate.delta(self.delta)
        if self.sampling != "poisson":
            raise ValueError(f"sampling must be 'poisson' (the only sampling accounted for), got {self.sampling!r}")
        if self.dataset_size is not None and _validate.steps(self.dataset_size, "dataset_size") == 0:
            raise ValueError("dataset_size must be a positive integer or None, got 0")
        if self.max_grad_norm is not None:
            _validate.noise_multiplier(self.max_grad_norm, "max_grad_norm")
        object.__setattr__(self, "history", as_segments(self.history))

    @classmethod
    def from_history(
        cls,
        history: Sequence[Segment],
        delta: float,
        *,
        method: str = "pld",
        dataset_size: Optional[int] = None,
        max_grad_norm: Optional[float] = None,
        target_epsilon: Optional[float] = None,
        notes: str = "",
    ) -> "PrivacyReport":
        """Compute epsilon at ``delta`` with every method and record it with the run's metadata."""
        segments = as_segments(history)
        epsilons = {m: epsilon_of_history(segments, delta, m) for m in _validate.METHODS}
        error = pld.epsilon_bounds(segments, delta).error if _validate.method(method) == "pld" else None
        return cls(epsilon=epsilons[method], delta=delta, method=method, epsilons=epsilons,
                   history=segments, dataset_size=dataset_size, max_grad_norm=max_grad_norm,
                   target_epsilon=target_epsilon, notes=notes, epsilon_error=error)

    @property
    def steps(self) -> int:
        return sum(s.steps for s in self.history)

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d["history"] = [[s.noise_multiplier, s.sample_rate, s.steps] for s in self.history]
        d["epsilon"] = _json_float(self.epsilon)
        d["epsilons"] = {k: _json_float(v) for k, v in self.epsilons.items()}
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "PrivacyReport":
        d = json.loads(text)
        d["history"] = tuple(Segment(*row) for row in d["history"])
        d["epsilon"] = float(d["epsilon"])
        d["epsilons"] = {k: float(v) for k, v in d["epsilons"].items()}
        return cls(**d)

    def _mechanism(self) -> str:
        parts = [f"{s.steps} steps with Poisson sampling rate {s.sample_rate:.4g} and noise multiplier "
                 f"{s.noise_multiplier:.4g}" for s in self.history]
        return "; then ".join(parts) if parts else "no steps"

    def statement(self) -> str:
        """One paragraph saying what the guarantee covers and what it does not."""
        data = f" on a dataset of {self.dataset_size} examples" if self.dataset_size else ""
        clip = (f", each example's gradient clipped to L2 norm {self.max_grad_norm:.4g}"
                if self.max_grad_norm is not None else "")
        others = ", ".join(f"{m.upper()} {e:.4g}" for m, e in self.epsilons.items() if m != self.method)
        small_delta = ""
        if self.dataset_size and self.delta >= 1.0 / self.dataset_size:
            small_delta = (f" Note that delta={self.delta:.3g} is not below 1/n={1 / self.dataset_size:.3g}, "
                           "which permits releasing a few examples outright.")
        return (
            f"DP-SGD was run{data}{clip}: {self._mechanism()}. "
            f"The trained model satisfies ({self.epsilon:.4g}, {self.delta:.3g})-differential privacy "
            f"(epsilon computed with the {self.method.upper()} accountant as an upper bound"
            f"{f', discretisation error at most {self.epsilon_error:.2g}' if self.epsilon_error is not None else ''}"
            f"{'; ' + others if others else ''}) at the level of a single training example, "
            "for neighbouring datasets that differ by adding or removing one example: the released "
            "parameters (final and intermediate) reveal little about whether any one example was used. "
            "It assumes every batch was drawn by Poisson sampling at the stated rate, that the noise was "
            "added as stated, and that the model (with its public architecture and public pretrained "
            "weights) is all that is released from the private data. It does not cover hyperparameter "
            "tuning, model selection or repeated runs on the same data, the data used for pretraining "
            "(assumed public), nor a person who contributes several examples (group privacy: epsilon grows "
            f"about linearly with the number of examples per person).{small_delta}"
        )

    def __str__(self) -> str:
        return (f"(epsilon={self.epsilon:.4g}, delta={self.delta:.3g}) by {self.method.upper()} after "
                f"{self.steps} steps in {len(self.history)} segment(s), add/remove-one, Poisson sampling")


def _json_float(x: float) -> float | str:
    """inf is not JSON; store it as the string 'inf'."""
    return x if math.isfinite(x) else str(x)
