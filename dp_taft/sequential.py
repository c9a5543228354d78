"""Sequential composition of privacy reports: the guarantee of releasing runs that may share examples.

One function, :func:`sequential_report`, for both places that compose runs in order: models
composed by :func:`dp_taft.compose.compose_reports`, and the training rounds of one shard
(before and after removals) in :class:`dp_taft.shard_report.ShardPrivacyReport`. It imports
nothing from dp_taft, so both can use it without an import cycle.
"""

from __future__ import annotations

from collections.abc import Sequence

import accounting

__all__ = ["sequential_report"]


def sequential_report(reports: Sequence[accounting.PrivacyReport], *, part: str,
                      notes: str) -> accounting.PrivacyReport:
    """The guarantee of releasing every run of ``reports`` (in order), any example taking part in each.

    Every run drew fresh noise, so all their DP-SGD segments compose: ε is recomputed by
    ``PrivacyReport.from_history`` from the concatenated histories at the largest member δ,
    with the first report's method. Each segment is labelled ``"<part> i"`` (``"<part> i:
    <stage>"`` for a staged run), i counting from 1. ``dataset_size`` and ``max_grad_norm``
    are kept when every run states the same one, else None. ``notes``: what was composed.

    δ: any δ in (0, 1) would be valid, as ε is recomputed at it from the whole history; the
    largest keeps the composition's ε comparable to each run's (a run's ε at its own δ is at
    least its ε at a larger one), and it is one of the δ's the runs were already held to.
    """
    segments, stages = [], []
    for i, r in enumerate(reports, start=1):
        labels = r.stages or ("",) * len(r.history)
        segments += r.history
        stages += [f"{part} {i}: {label}" if label else f"{part} {i}" for label in labels]
    sizes = {r.dataset_size for r in reports}
    norms = {r.max_grad_norm for r in reports}
    return accounting.PrivacyReport.from_history(
        segments, max(r.delta for r in reports), method=reports[0].method,
        dataset_size=sizes.pop() if len(sizes) == 1 else None, max_grad_norm=norms.pop() if len(norms) == 1 else None,
        stages=stages, notes=notes)
