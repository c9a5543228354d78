"""Composition of tangent models: averaging Δw is exactly an output ensemble.

The tangent model is affine in Δw: f_lin(x; Δw) = f(x; w0) + J(x; w0)·Δw. For weights
a_i with Σ a_i = 1,

    f_lin(x; Σ a_i Δw_i) = Σ a_i f(x; w0) + J·Σ a_i Δw_i = Σ a_i f_lin(x; Δw_i),

so one model with the averaged Δw answers exactly like the weighted ensemble of the
models, at the cost of one. This holds only for models linearized around the same w0
with the same structure, which :func:`compose` checks by fingerprint.

The composed model is post-processing of the members, so its privacy guarantee is that of
releasing them all: :func:`compose_reports` computes it, by sequential composition when the
members' training data may overlap, by parallel composition when they are disjoint.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import accounting
import torch

from .sequential import sequential_report
from .shard_report import ShardPrivacyReport
from .tangent import TangentViT

__all__ = ["compose", "compose_reports"]

Report = accounting.PrivacyReport | accounting.ParallelReport


def compose(models: Sequence[TangentViT], weights: Sequence[float] | None = None) -> TangentViT:
    """A new tangent model whose Δw is the weighted average of ``models``' Δw.

    Args:
        models: one or more :class:`TangentViT` linearized around the same w0 with the
            same ``blocks`` (checked with :meth:`TangentViT.fingerprint`).
        weights: one real weight per model, summing to 1 (|Σ − 1| <= 1e-9); uniform
            when None. The output then equals the same weighted average of the models'
            outputs, exactly up to round-off.

    Returns:
        A fresh model (the inputs are not modified).

    Raises:
        ValueError: empty ``models``, wrong number of weights, weights not summing to 1,
            or models linearized around different w0 / with different structure.
    """
    if not models:
        raise ValueError("compose() needs at least one tangent model")
    for i, m in enumerate(models):
        if not isinstance(m, TangentViT):
            raise ValueError(f"models[{i}] is a {type(m).__name__}; compose() takes TangentViT models (dp_taft.linearize)")
    if weights is None:
        weights = [1.0 / len(models)] * len(models)
    weights = [float(w) for w in weights]
    if len(weights) != len(models):
        raise ValueError(f"got {len(weights)} weights for {len(models)} models; give one weight per model")
    if not all(math.isfinite(w) for w in weights) or abs(math.fsum(weights) - 1.0) > 1e-9:
        raise ValueError(
            f"weights must be finite and sum to 1 (an affine combination), got {weights} "
            f"(sum {math.fsum(weights)}); normalize them, e.g. by shard sizes / total"
        )
    reference = models[0].fingerprint()
    for i, m in enumerate(models[1:], start=1):
        if m.fingerprint() != reference:
            raise ValueError(
                f"models[{i}] was linearized around different pretrained weights w0 or with a "
                f"different structure (blocks={m.num_blocks} vs {models[0].num_blocks}) than "
                "models[0]; only tangent models of the same w0 and blocks compose exactly"
            )
    composed = copy.deepcopy(models[0])
    states = [m.delta_state_dict() for m in models]
    with torch.no_grad():
        for name, delta in composed.deltas().items():
            delta.copy_(sum(w * s[name] for w, s in zip(weights, states)))
    return composed


def compose_reports(reports: Sequence[Report | ShardPrivacyReport], *, disjoint: bool = False) -> Report:
    """The privacy guarantee of releasing every member model (hence of their composition).

    Args:
        reports: one report per member model, in training order: an ``accounting.PrivacyReport``
            (which may itself be staged or composed), an ``accounting.ParallelReport`` or a
            shard set's report (its :meth:`~ShardPrivacyReport.as_parallel`: per shard, every model
            it released, those replaced after removals too, composed sequentially). A shard set's
            report read back from its JSON (``accounting.report_from_dict``) is that same parallel
            report, so composing it again never drops the replaced rounds.
        disjoint: False (default): the members may have seen the same examples, so their DP-SGD
            histories compose sequentially: ``PrivacyReport.from_history`` of the concatenated
            segments, labelled ``"model i"`` (``"model i: <stage>"`` for a staged member), with the
            first member's method. True: the caller declares the members' training data disjoint
            (no example in two of them): an ``accounting.ParallelReport``, (max ε_i, max δ_i).

    δ of a sequential composition is the largest member δ, at which ε is recomputed from the
    whole history (:func:`dp_taft.sequential.sequential_report` says why that is valid).

    A parallel member under sequential composition is handled exactly, not refused: an example
    is in one part of it, so releasing everything costs that example the sequential composition
    of its part with the other members. The result is a ``ParallelReport`` over the parts whose
    members are those sequential compositions (one per combination of parts when several
    members are parallel; each costs one accountant run).
    """
    members = [r.as_parallel() if isinstance(r, ShardPrivacyReport) else r for r in reports]
    if not members:
        raise ValueError("compose_reports() needs at least one report")
    for i, r in enumerate(members):
        if not isinstance(r, (accounting.PrivacyReport, accounting.ParallelReport)):
            raise ValueError(f"reports[{i}] is a {type(r).__name__}; give an accounting.PrivacyReport or "
                             "ParallelReport (a model trained without privacy has none, and neither has a composition "
                             "with it)")
    if disjoint:
        return accounting.ParallelReport(tuple(members), notes=(
            f"parallel composition of {len(members)} models declared trained on disjoint data; a person whose "
            "examples lie in two of them is covered only by their sequential composition"))
    parallel = next((i for i, r in enumerate(members) if isinstance(r, accounting.ParallelReport)), None)
    if parallel is None:
        return _sequential(members)
    split = members[parallel]
    return accounting.ParallelReport(
        tuple(compose_reports([*members[:parallel], part, *members[parallel + 1:]]) for part in split.members),
        basis="per-example",
        notes=(f"sequential composition of {len(members)} models, of which model {parallel + 1} is itself a parallel "
               f"composition over {len(split.members)} disjoint parts: each member here is one part composed "
               "sequentially with the other models; an example is in one part at most, so the members cover "
               "every example"))


def _sequential(reports: Sequence[accounting.PrivacyReport]) -> accounting.PrivacyReport:
    """Sequential composition of models whose training data may overlap (see :func:`compose_reports`)."""
    return sequential_report(reports, part="model", notes=(
        f"sequential composition of {len(reports)} models (stages 'model 1' to 'model {len(reports)}', in this "
        "order) whose training data may overlap: every example may have taken part in each of them, so all "
        "their DP-SGD steps are composed; delta is the largest member delta, at which epsilon was recomputed "
        "from the whole history"))
