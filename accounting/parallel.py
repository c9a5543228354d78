"""Parallel composition: the guarantee of models trained on disjoint parts of the data.

McSherry 2009 (Privacy Integrated Queries), Thm 4: when each example can be in the input of
one mechanism M_i only, and M_i is (ε_i, δ_i)-DP, releasing every M_i is (max ε_i, max δ_i)-DP
under add/remove-one adjacency: adding or removing one example changes one member's input
and leaves the others' outputs distributed as before. δ composes as the maximum, not the sum,
for the same reason.

:meth:`ParallelReport.to_json` writes the format ``dp_taft.parallel_report/1``::

    {"format": "dp_taft.parallel_report/1", "neighbouring": "add/remove-one",
     "epsilon": 2.99, "delta": 1e-05, "notes": "",
     "members": [{"format": "dp_taft.privacy_report/2", ...}, {"format": "dp_taft.privacy_report/2", ...}]}

A member is a privacy report or, nested, another parallel report. Other top-level fields
(a shard set's report adds its own, see ``dp_taft.shard_report``) are ignored by
:meth:`ParallelReport.from_dict` and named as not checked by ``python -m accounting verify``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence, Union

from accounting import _validate
from accounting.report import NEIGHBOURING, EpsilonCheck, PrivacyReport, _json_float, _read_float

FORMAT = "dp_taft.parallel_report/1"
#: Why the maximum over the members holds: "disjoint" training data (parallel composition), or
#: "per-example": each member is the sequential composition of what one example may have used.
BASES = ("disjoint", "per-example")
#: The method name of the checks that compare a parallel report's own (ε, δ) with its members'.
PARALLEL = "parallel"

__all__ = ["BASES", "FORMAT", "ParallelReport", "report_from_dict"]


@dataclass(frozen=True)
class ParallelReport:
    """The (ε, δ) guarantee of a model built from models trained on DISJOINT data.

    ``members``: each member's report (a :class:`~accounting.PrivacyReport`, or a
    ``ParallelReport`` whose own members are disjoint too), in any order, at least one.
    ``epsilon`` (nats, in [0, inf]) and ``delta`` (in (0, 1)): the stated guarantee; None
    (default) states the parallel composition itself, the maxima over the members. A stated
    value below a member's is kept as given (a report read from a file may claim too much);
    :meth:`verify` finds it. ``notes``: free text, e.g. how the data were split.
    """

    members: tuple[Union[PrivacyReport, "ParallelReport"], ...]
    notes: str = ""
    epsilon: Optional[float] = None
    delta: Optional[float] = None
    basis: str = "disjoint"

    def __post_init__(self) -> None:
        if isinstance(self.members, (str, bytes, Mapping)) or not isinstance(self.members, Sequence):
            raise ValueError(f"members must be a sequence of privacy reports, got {type(self.members).__name__}")
        members = tuple(self.members)
        if not members:
            raise ValueError("a parallel report needs at least one member report")
        for i, m in enumerate(members):
            if not isinstance(m, (PrivacyReport, ParallelReport)):
                raise ValueError(f"members[{i}] is a {type(m).__name__}; give an accounting.PrivacyReport or "
                                 "ParallelReport per model")
        if not isinstance(self.notes, str):
            raise ValueError(f"notes must be a string, got {self.notes!r}")
        if self.basis not in BASES:
            raise ValueError(f"basis must be one of {BASES}, got {self.basis!r}")
        epsilon = max(m.epsilon for m in members) if self.epsilon is None else self.epsilon
        delta = max(m.delta for m in members) if self.delta is None else self.delta
        object.__setattr__(self, "members", members)
        object.__setattr__(self, "epsilon", _validate.epsilon_bound(epsilon))
        object.__setattr__(self, "delta", _validate.delta(delta))

    @property
    def methods(self) -> tuple[str, ...]:
        """The accountants every member states an epsilon by (what ``verify`` can recompute with)."""
        return tuple(m for m in _validate.METHODS if all(m in member.methods for member in self.members))

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data in format ``FORMAT`` (see the module docstring)."""
        return {"format": FORMAT, "neighbouring": NEIGHBOURING, "epsilon": _json_float(self.epsilon),
                "delta": self.delta, "basis": self.basis, "notes": self.notes,
                "members": [m.to_dict() for m in self.members]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ParallelReport":
        """Read :meth:`to_dict` output (other top-level fields are ignored); ValueError names the bad field."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a parallel report must be a JSON object, got {type(data).__name__}")
        if data.get("format") != FORMAT:
            raise ValueError(f"not a parallel report: format is {data.get('format')!r}, expected {FORMAT!r}")
        if data.get("neighbouring", NEIGHBOURING) != NEIGHBOURING:
            raise ValueError(f"neighbouring must be {NEIGHBOURING!r} (the only relation accounted for), "
                             f"got {data['neighbouring']!r}")
        missing = [k for k in ("epsilon", "delta", "members") if k not in data]
        if missing:
            raise ValueError(f"the parallel report lacks the required field(s) {', '.join(missing)}")
        rows = data["members"]
        if not isinstance(rows, list) or not rows:
            raise ValueError(f"members must be a non-empty list of privacy reports, got {rows!r}")
        members = []
        for i, row in enumerate(rows):
            try:
                members.append(report_from_dict(row))
            except ValueError as err:
                raise ValueError(f"members[{i}]: {err}") from None
        return cls(tuple(members), notes=data.get("notes", ""), epsilon=_read_float(data["epsilon"], "epsilon"),
                   delta=data["delta"], basis=data.get("basis", "disjoint"))

    @classmethod
    def from_json(cls, text: str) -> "ParallelReport":
        return cls.from_dict(json.loads(text))

    def verify(self, methods: Optional[Sequence[str]] = None, tolerance: float = 1e-9) -> tuple[EpsilonCheck, ...]:
        """Check every member (:meth:`PrivacyReport.verify`, fields prefixed ``members[i].``) and
        that the stated ``epsilon`` and ``delta`` are at least every member's stated ones.

        ``methods``: accountants to recompute the members with, each one of :attr:`methods`
        (default: each member's own). ``tolerance``: relative slack in [0, inf) for round-off.
        The two checks of the composition itself have method ``"parallel"``; their
        ``recomputed`` is the members' maximum. Disjointness of the members' data cannot be
        checked from the report: it is what :meth:`statement` assumes.
        """
        tol = _validate.tolerance(tolerance)
        for m in () if methods is None else methods:
            if m not in self.methods:
                raise ValueError(f"not every member states an epsilon by method {m!r}; all of them state one by "
                                 f"{self.methods}")
        checks: list[EpsilonCheck] = []
        for i, member in enumerate(self.members):
            checks += [dataclasses.replace(c, field=f"members[{i}].{c.field}") for c in member.verify(methods, tol)]
        for name, stated in (("epsilon", self.epsilon), ("delta", self.delta)):
            required = max(getattr(m, name) for m in self.members)
            checks.append(EpsilonCheck(name, PARALLEL, stated, required, required <= stated * (1 + tol)))
        return tuple(checks)

    def statement(self) -> str:
        """One paragraph saying what the guarantee covers and what it assumes."""
        k = len(self.members)
        each = "; ".join(f"member {i + 1}: ({m.epsilon:.4g}, {m.delta:.3g})" for i, m in enumerate(self.members))
        notes = f" Notes: {self.notes}" if self.notes else ""
        guarantee = (f"satisfy ({self.epsilon:.4g}, {self.delta:.3g})-differential privacy at the level of a single "
                     "training example, for neighbouring datasets that differ by adding or removing one example")
        if self.basis == "per-example":
            return (
                f"The released models {guarantee}: each of the {k} members is the sequential composition of the "
                "training runs that one example may have been used by, every example falls under one member, so "
                f"epsilon and delta are the maxima over the members ({each}). It assumes everything each member's "
                "own report assumes (its statement says what), and that which member an example falls under depends "
                f"on that example alone.{notes}"
            )
        return (
            f"The {k} models together, and any model built from them alone (such as their average), {guarantee}, "
            "by parallel composition (McSherry 2009, Thm 4): each example is in the training data of one member only, "
            "so adding or removing it changes one member's input, and epsilon and delta are the maxima over the "
            f"members (delta composes as the max, not the sum) ({each}). It assumes that the members' training data "
            "are disjoint at the level of examples, that which member an example goes to depends on that example "
            "alone (not on which other examples are present), that each member drew its own secret randomness, and "
            "everything each member's own report assumes (its statement says what). A person whose examples lie in "
            "several members is not covered by this guarantee: only the sequential composition of those members "
            f"covers that person.{notes}"
        )

    def __str__(self) -> str:
        how = "disjoint data" if self.basis == "disjoint" else "one case per example"
        return (f"(epsilon={self.epsilon:.4g}, delta={self.delta:.3g}) as the maximum over {len(self.members)} "
                f"member(s) ({how}), add/remove-one")


def report_from_dict(data: Mapping[str, Any]) -> Union[PrivacyReport, ParallelReport]:
    """A :class:`ParallelReport` if ``data`` has its format, else a :class:`PrivacyReport` (format 1 or 2)."""
    if isinstance(data, Mapping) and data.get("format") == FORMAT:
        return ParallelReport.from_dict(data)
    return PrivacyReport.from_dict(data)
