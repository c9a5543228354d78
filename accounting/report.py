"""A typed, serialisable record of one run's privacy guarantee.

:meth:`PrivacyReport.to_json` writes the self-describing format ``dp_taft.privacy_report/2``::

    {"format": "dp_taft.privacy_report/2", "neighbouring": "add/remove-one", "sampling": "poisson",
     "epsilon": 2.98, "delta": 1e-05, "method": "pld", "epsilons": {"pld": 2.98, "rdp": 3.41},
     "epsilon_error": 0.004,
     "history": [{"noise_multiplier": 4.0, "sample_rate": 0.05, "steps": 60, "stage": "head"},
                 {"noise_multiplier": 1.1, "sample_rate": 0.05, "steps": 300, "stage": "taft"}],
     "dataset_size": 50000, "max_grad_norm": 1.0, "target_epsilon": 3.0, "notes": "",
     "versions": {"accounting": "0.1.0", "numpy": "2.2.0", "scipy": "1.15.0", "python": "3.12.3"}}

Epsilons are in nats; an infinite one is written as the string ``"inf"``. Segments are
in order of execution; ``"stage"`` is on every segment or on none. :meth:`PrivacyReport.from_json`
also reads format 1: no ``"format"``/``"neighbouring"`` keys and ``"history"`` as
``[noise_multiplier, sample_rate, steps]`` rows.
"""

from __future__ import annotations

import itertools
import json
import math
import platform
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Mapping, Optional, Sequence

import numpy
import scipy

from accounting import _validate, pld
from accounting.accountant import epsilon_of_history
from accounting.events import Segment, as_segments, history_items

FORMAT = "dp_taft.privacy_report/2"
NEIGHBOURING = "add/remove-one"
_REQUIRED = ("epsilon", "delta", "method", "epsilons", "history")
_OPTIONAL = ("dataset_size", "max_grad_norm", "sampling", "versions", "target_epsilon", "notes", "epsilon_error")
_SEGMENT_FIELDS = ("noise_multiplier", "sample_rate", "steps")


def library_versions() -> dict[str, str]:
    """Versions of the code that produced a report."""
    try:
        ours = metadata.version("dp_taft")
    except metadata.PackageNotFoundError:
        ours = "unknown"
    return {"accounting": ours, "numpy": numpy.__version__, "scipy": scipy.__version__,
            "python": platform.python_version()}


@dataclass(frozen=True)
class EpsilonCheck:
    """One epsilon a report states, against the epsilon recomputed from its history at its delta.

    ``field`` is the JSON field checked: ``"epsilon"``, ``"epsilons.<method>"`` or
    ``"target_epsilon"`` (the run stayed within its budget). ``holds`` when
    ``recomputed <= stated * (1 + tolerance)``. Epsilons in nats, in [0, inf]. A parallel report
    (:class:`accounting.parallel.ParallelReport`) prefixes its members' fields with ``members[i].``
    and adds ``"epsilon"`` and ``"delta"`` with method ``"parallel"``: stated against the members' maximum.
    """

    field: str
    method: str
    stated: float
    recomputed: float
    holds: bool

    def to_dict(self) -> dict[str, Any]:
        return {"field": self.field, "method": self.method, "stated": _json_float(self.stated),
                "recomputed": _json_float(self.recomputed), "holds": self.holds}


@dataclass(frozen=True)
class PrivacyReport:
    """The (epsilon, delta) guarantee of one DP-SGD run.

    ``epsilon`` is computed with ``method`` (an upper bound on the true value);
    ``epsilons`` holds the value of every available method. Neighbouring
    datasets differ by adding or removing one example; sampling is Poisson.
    ``stages`` names the training stage of each segment of ``history`` (e.g.
    ``("head", "taft")``), or is empty.
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
    #: One label per item of ``history`` as given; stored as one per (non-empty) segment.
    stages: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _validate.method(self.method)
        _validate.delta(self.delta)
        if self.sampling != "poisson":
            raise ValueError(f"sampling must be 'poisson' (the only sampling accounted for), got {self.sampling!r}")
        self._check_epsilons()
        if self.dataset_size is not None and _validate.steps(self.dataset_size, "dataset_size") == 0:
            raise ValueError("dataset_size must be a positive integer or None, got 0")
        if self.max_grad_norm is not None:
            _validate.noise_multiplier(self.max_grad_norm, "max_grad_norm")
        if not isinstance(self.notes, str):
            raise ValueError(f"notes must be a string, got {self.notes!r}")
        if not isinstance(self.versions, dict):
            raise ValueError(f"versions must map a library name to its version, got {self.versions!r}")
        history, stages = _labelled_segments(self.history, self.stages)
        object.__setattr__(self, "history", history)
        object.__setattr__(self, "stages", stages)

    def _check_epsilons(self) -> None:
        """Stated epsilons in [0, inf] (nats), keyed by known methods; a target in (0, inf)."""
        _validate.epsilon_bound(self.epsilon)
        if not isinstance(self.epsilons, Mapping):
            raise ValueError(f"epsilons must map a method to its epsilon, e.g. {{'pld': 2.9}}, got {self.epsilons!r}")
        for m, value in self.epsilons.items():
            _validate.method(m, "each key of epsilons")
            _validate.epsilon_bound(value, f"epsilons[{m!r}]")
        if self.target_epsilon is not None:
            _validate.epsilon(self.target_epsilon, "target_epsilon")
        if self.epsilon_error is not None:
            _validate.epsilon_bound(self.epsilon_error, "epsilon_error")

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
        stages: Sequence[str] = (),
    ) -> "PrivacyReport":
        """Compute epsilon at ``delta`` with every method and record it with the run's metadata.

        ``stages``: empty, or one label per item of ``history`` (a segment or an event); an event
        that flattens into several segments labels each of them; zero-step items are dropped
        with their label.
        """
        items = history_items(history)  # once: ``history`` may be a one-shot iterator
        segments = as_segments(items)
        epsilons = {m: epsilon_of_history(segments, delta, m) for m in _validate.METHODS}
        error = None
        if _validate.method(method) == "pld":
            bounds = pld.epsilon_bounds(segments, delta)
            error = bounds.error if math.isfinite(bounds.epsilon) else None  # inf - inf is no error bound
        return cls(epsilon=epsilons[method], delta=delta, method=method, epsilons=epsilons,
                   history=items, stages=stages, dataset_size=dataset_size, max_grad_norm=max_grad_norm,
                   target_epsilon=target_epsilon, notes=notes, epsilon_error=error)

    @property
    def steps(self) -> int:
        return sum(s.steps for s in self.history)

    @property
    def methods(self) -> tuple[str, ...]:
        """The methods the report states an epsilon for (its own and those in ``epsilons``)."""
        return tuple(m for m in _validate.METHODS if m == self.method or m in self.epsilons)

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data in format ``FORMAT`` (see the module docstring)."""
        history: list[dict[str, Any]] = [{k: getattr(s, k) for k in _SEGMENT_FIELDS} for s in self.history]
        for row, label in zip(history, self.stages):
            row["stage"] = label
        return {
            "format": FORMAT, "neighbouring": NEIGHBOURING, "sampling": self.sampling,
            "epsilon": _json_float(self.epsilon), "delta": self.delta, "method": self.method,
            "epsilons": {k: _json_float(v) for k, v in self.epsilons.items()},
            "epsilon_error": None if self.epsilon_error is None else _json_float(self.epsilon_error),
            "history": history, "dataset_size": self.dataset_size, "max_grad_norm": self.max_grad_norm,
            "target_epsilon": self.target_epsilon, "notes": self.notes, "versions": dict(self.versions),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PrivacyReport":
        """Read :meth:`to_dict` output or a format-1 report; ValueError says which field is wrong."""
        d = _known_fields(data)
        history, stages = _read_history(d["history"])
        if not isinstance(d["epsilons"], Mapping):
            raise ValueError(f"epsilons must be an object such as {{\"pld\": 2.9}}, got {d['epsilons']!r}")
        error = d.get("epsilon_error")
        return cls(
            epsilon=_read_float(d["epsilon"], "epsilon"), delta=d["delta"], method=d["method"],
            epsilons={k: _read_float(v, f"epsilons.{k}") for k, v in d["epsilons"].items()},
            history=history, stages=stages, dataset_size=d.get("dataset_size"),
            max_grad_norm=d.get("max_grad_norm"), sampling=d.get("sampling", "poisson"),
            versions=d.get("versions", {}),  # unknown rather than this machine's versions
            target_epsilon=d.get("target_epsilon"), notes=d.get("notes", ""),
            epsilon_error=None if error is None else _read_float(error, "epsilon_error"),
        )

    @classmethod
    def from_json(cls, text: str) -> "PrivacyReport":
        return cls.from_dict(json.loads(text))

    def verify(self, methods: Optional[Sequence[str]] = None, tolerance: float = 1e-9) -> tuple[EpsilonCheck, ...]:
        """Recompute epsilon from ``history`` at ``delta`` and compare it with every epsilon the report states.

        ``methods``: accountants to recompute with, each one of ``self.methods`` (default: the
        report's own method). ``tolerance``: relative slack in [0, inf) for round-off. Checks
        ``epsilon`` and ``epsilons[m]`` for each method, and ``target_epsilon`` with the report's
        own method. This shows the stated epsilon follows from the stated history and delta;
        it cannot show that the history is what the training did.
        """
        tol = _validate.tolerance(tolerance)
        chosen = (self.method,) if methods is None else tuple(methods)
        for m in chosen:
            if m not in self.methods:
                raise ValueError(f"the report states no epsilon by method {m!r}; it states one by {self.methods}")
        checks = []
        for m in chosen:
            recomputed = epsilon_of_history(self.history, self.delta, m)
            stated = {"epsilon": self.epsilon} if m == self.method else {}
            if m in self.epsilons:
                stated[f"epsilons.{m}"] = self.epsilons[m]
            if m == self.method and self.target_epsilon is not None:
                stated["target_epsilon"] = self.target_epsilon
            checks += [EpsilonCheck(name, m, value, recomputed, recomputed <= value * (1 + tol))
                       for name, value in stated.items()]
        return tuple(checks)

    def _stage_names(self) -> list[str]:
        """Labels of the consecutive runs of equally labelled segments, in order."""
        return [label for label, _ in itertools.groupby(self.stages)]

    def _mechanism(self) -> str:
        """The composed mechanism in words, stage by stage when the segments are labelled."""
        if not self.history:
            return "no steps"
        if not self.stages:
            return "; then ".join(_segment_words(s) for s in self.history)
        groups = itertools.groupby(zip(self.stages, self.history), key=lambda pair: pair[0])
        return "; then ".join(f"stage {label!r}: " + ", then ".join(_segment_words(s) for _, s in group)
                              for label, group in groups)

    def statement(self) -> str:
        """One paragraph saying what the guarantee covers and what it does not, then the notes (if any):
        they say e.g. that the history is a sequential composition of several models' training."""
        data = f" on a dataset of {self.dataset_size} examples" if self.dataset_size else ""
        clip = (f", each example's gradient clipped to L2 norm {self.max_grad_norm:.4g}"
                if self.max_grad_norm is not None else "")
        n_stages = len(self._stage_names())
        staged = f" in {n_stages} stage{'s' if n_stages > 1 else ''} on the same private data" if self.stages else ""
        together = ", all stages composed together" if self.stages else ""
        others = ", ".join(f"{m.upper()} {e:.4g}" for m, e in self.epsilons.items() if m != self.method)
        small_delta = ""
        if self.dataset_size and self.delta >= 1.0 / self.dataset_size:
            small_delta = (f" Note that delta={self.delta:.3g} is not below 1/n={1 / self.dataset_size:.3g}, "
                           "which permits releasing a few examples outright.")
        return (
            f"DP-SGD was run{data}{staged}{clip}: {self._mechanism()}. "
            f"The trained model satisfies ({self.epsilon:.4g}, {self.delta:.3g})-differential privacy "
            f"(epsilon computed with the {self.method.upper()} accountant as an upper bound{together}"
            f"{f', discretisation error at most {self.epsilon_error:.2g}' if self.epsilon_error is not None else ''}"
            f"{'; ' + others if others else ''}) at the level of a single training example, "
            "for neighbouring datasets that differ by adding or removing one example: the released "
            "parameters (final and intermediate) reveal little about whether any one example was used. "
            "It assumes every batch was drawn by Poisson sampling at the stated rate, that the noise was "
            "added as stated, and that the model (with its public architecture and public pretrained "
            "weights) is all that is released from the private data. The dataset size, which sets the "
            "sample rate and the constant the noisy sum is divided by, is treated as public. "
            "It also assumes the training randomness (the Gaussian noise and the batch sampling) was secret, "
            "drawn from an unpredictable source: a published or guessable seed voids the guarantee, since "
            "whoever can reproduce the noise can subtract it. It does not cover hyperparameter "
            "tuning, model selection or repeated runs on the same data, the data used for pretraining "
            "(assumed public), nor a person who contributes several examples (group privacy: epsilon grows "
            f"about linearly with the number of examples per person).{small_delta}"
            f"{f' Notes: {self.notes}' if self.notes else ''}"
        )

    def __str__(self) -> str:
        staged = f" (stages {', '.join(self._stage_names())})" if self.stages else ""
        return (f"(epsilon={self.epsilon:.4g}, delta={self.delta:.3g}) by {self.method.upper()} after "
                f"{self.steps} steps in {len(self.history)} segment(s){staged}, add/remove-one, Poisson sampling")


def _segment_words(s: Segment) -> str:
    return (f"{s.steps} steps with Poisson sampling rate {s.sample_rate:.4g} and noise multiplier "
            f"{s.noise_multiplier:.4g}")


def _labelled_segments(history: object, stages: object) -> tuple[tuple[Segment, ...], tuple[str, ...]]:
    """Non-empty segments of ``history``, each with the label of the history item it comes from."""
    labels = _validate.stage_labels(stages)
    if not labels:
        return as_segments(history), ()
    items = history_items(history)
    if len(labels) != len(items):
        raise ValueError(f"stages must give one label per history segment (or none): got {len(labels)} "
                         f"label(s) {labels} for {len(items)} segment(s)")
    pairs = [(segment, label) for item, label in zip(items, labels) for segment in as_segments(item)]
    return tuple(s for s, _ in pairs), tuple(label for _, label in pairs)


def _known_fields(data: object) -> dict[str, Any]:
    """The fields of a report dict, after checking its format, relation and field names."""
    if not isinstance(data, Mapping):
        raise ValueError(f"a privacy report must be a JSON object, got {type(data).__name__}")
    d = dict(data)
    fmt = d.pop("format", None)  # None: format 1, written before the key existed
    if fmt not in (None, FORMAT):
        raise ValueError(f"unsupported report format {fmt!r}: this version reads {FORMAT!r} and format 1")
    relation = d.pop("neighbouring", NEIGHBOURING)
    if relation != NEIGHBOURING:
        raise ValueError(f"neighbouring must be {NEIGHBOURING!r} (the only relation accounted for), got {relation!r}")
    missing = [k for k in _REQUIRED if k not in d]
    if missing:
        raise ValueError(f"the report lacks the required field(s) {', '.join(missing)}")
    unknown = sorted(set(d) - set(_REQUIRED) - set(_OPTIONAL))
    if unknown:
        raise ValueError(f"the report has unknown field(s) {', '.join(unknown)}")
    return d


def _read_history(rows: object) -> tuple[tuple[Segment, ...], tuple[str, ...]]:
    """Segments and stage labels from format-2 objects or format-1 ``[sigma, q, steps]`` rows."""
    if not isinstance(rows, list):
        raise ValueError(f"history must be a list of segments, got {rows!r}")
    segments, labels = [], []
    for i, row in enumerate(rows):
        if isinstance(row, Mapping) and set(_SEGMENT_FIELDS) <= set(row) <= {*_SEGMENT_FIELDS, "stage"}:
            values, label = [row[k] for k in _SEGMENT_FIELDS], row.get("stage")
        elif isinstance(row, list) and len(row) == 3:
            values, label = row, None
        else:
            raise ValueError(f"history[{i}] must be {{\"noise_multiplier\": s, \"sample_rate\": q, \"steps\": T}} "
                             f"with an optional \"stage\", or a [s, q, T] row; got {row!r}")
        try:
            segments.append(Segment(*values))
        except ValueError as err:
            raise ValueError(f"history[{i}]: {err}") from None
        labels.append(label)
    if len(set(label is None for label in labels)) > 1:
        raise ValueError("history: give a \"stage\" on every segment or on none")
    return tuple(segments), tuple(label for label in labels if label is not None)


def _read_float(value: object, name: str) -> float:
    """Inverse of :func:`_json_float`: a JSON number, or the string 'inf'."""
    if value == "inf":
        return math.inf
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number (or the string 'inf'), got {value!r}")
    return float(value)


def _json_float(x: float) -> float | str:
    """inf is not JSON; store it as the string 'inf'."""
    return x if math.isfinite(x) else str(x)
