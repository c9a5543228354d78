"""The experiments' accuracy figure: mean y against x per group, error bars over repeats.

x is drawn on a log axis by default; points at x = ∞ (e.g. non-private runs) go to a
narrow panel on the right, since a log axis cannot show them. The rows are the CSV rows of
:mod:`experiments.results`; rows that are not ok are left out (see
:func:`experiments.results.aggregate`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from experiments import results as res

__all__ = ["plot_curves"]

_MARKERS = "osD^vP*Xh<>"


def plot_curves(
    path: str | Path,
    rows: Iterable[res.Row],
    *,
    x: str,
    y: str,
    group: str,
    group_order: Sequence[str] | None = None,
    group_label: Callable[[str], str] = str,
    xlabel: str = "",
    ylabel: str = "",
    title: str = "",
    scale: float = 1.0,
    log_x: bool = True,
    inf_label: str = "∞",
) -> Path:
    """Plot mean ``y`` (× ``scale``) against ``x`` per ``group``, error bars = std over repeats; save a PNG.

    Groups are drawn in ``group_order`` (default: first appearance in ``rows``), those
    without an ok row left out; at x = ∞ they are offset so their bars do not overlap.
    Returns ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on the machines that run experiments
    import matplotlib.pyplot as plt

    rows = list(rows)
    stats = {k: s for k, s in res.aggregate(rows, (group, x), y).items() if s.n}
    groups = list(group_order) if group_order is not None else list(dict.fromkeys(r[group] for r in rows))
    groups = [g for g in groups if any(k[0] == g for k in stats)]
    finite_x = sorted({res.to_float(k[1]) for k in stats if math.isfinite(res.to_float(k[1]))})
    has_inf = any(math.isinf(res.to_float(k[1])) for k in stats)
    spellings: dict[tuple[str, float], str] = {}
    for g, xv in stats:  # "1" and "1.0" are one point: refuse rather than draw one of them and drop the other
        if spellings.setdefault((g, res.to_float(xv)), xv) != xv:
            raise ValueError(f"group {g!r} has x = {spellings[(g, res.to_float(xv))]!r} and {xv!r}, the same "
                             f"number written twice: write each {x} one way in the rows")

    plt.rcParams.update({"font.size": 12})
    fig, ax, ax_inf = _panels(plt, bool(finite_x), has_inf)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, g in enumerate(groups):
        style = {"color": colors[i % len(colors)], "marker": _MARKERS[i % len(_MARKERS)], "capsize": 4,
                 "markersize": 7, "linewidth": 2, "elinewidth": 1.5}
        offset = (i - (len(groups) - 1) / 2) * 0.12
        _draw_group(ax, ax_inf, {res.to_float(k[1]): s for k, s in stats.items() if k[0] == g}, scale,
                    group_label(g), offset, style)
    if ax is not None:
        _format_main(ax, finite_x, log_x, xlabel, ylabel)
    if ax_inf is not None:
        _format_inf(ax, ax_inf, inf_label, ylabel)
    _legend(ax, ax_inf, bool(groups))
    if title:
        fig.suptitle(title)
    with warnings.catch_warnings():  # tight_layout warns about the shared-y panel pair; the result is fine
        warnings.simplefilter("ignore")
        fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path


def _panels(plt: Any, finite: bool, inf: bool) -> tuple[Any, Any, Any]:
    """(figure, main axes or None, ∞ panel or None): the ∞ panel shares the main panel's y axis."""
    if finite and inf:
        fig, (ax, ax_inf) = plt.subplots(
            1, 2, sharey=True, figsize=(8, 5), gridspec_kw={"width_ratios": [5, 1], "wspace": 0.05}
        )
        return fig, ax, ax_inf
    if inf:
        fig, ax_inf = plt.subplots(figsize=(4, 5))
        return fig, None, ax_inf
    fig, ax = plt.subplots(figsize=(7, 5))
    return fig, ax, None


def _draw_group(ax: Any, ax_inf: Any, points: Mapping[float, res.Stats], scale: float, label: str,
                offset: float, style: dict[str, Any]) -> None:
    """One group's finite points as a line on ``ax``, its ∞ point at ``offset`` on ``ax_inf``; labelled once."""
    fin = sorted((xv, s) for xv, s in points.items() if math.isfinite(xv))
    inf = [s for xv, s in points.items() if math.isinf(xv)]
    if ax is not None and fin:
        ax.errorbar([xv for xv, _ in fin], [s.mean * scale for _, s in fin], yerr=[s.std * scale for _, s in fin],
                    label=label, **style)
    if ax_inf is not None and inf:
        ax_inf.errorbar([offset], [inf[0].mean * scale], yerr=[inf[0].std * scale],
                        label=None if (ax is not None and fin) else label, **style)


def _format_main(ax: Any, finite_x: Sequence[float], log_x: bool, xlabel: str, ylabel: str) -> None:
    """Ticks at the x values that ran (not a log axis' decades), labels and grid."""
    if log_x:
        ax.set_xscale("log")
    if finite_x:
        ax.set_xticks(finite_x)
        ax.set_xticklabels([f"{v:g}" for v in finite_x])
        ax.minorticks_off()
        if log_x:
            ax.set_xlim(finite_x[0] / 1.4, finite_x[-1] * 1.4)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)


def _format_inf(ax: Any, ax_inf: Any, inf_label: str, ylabel: str) -> None:
    """The ∞ panel: one tick; joined to the main panel without the spines between them."""
    ax_inf.set_xlim(-0.5, 0.5)
    ax_inf.set_xticks([0])
    ax_inf.set_xticklabels([inf_label])
    ax_inf.grid(True, axis="y", alpha=0.3)
    if ax is None:
        ax_inf.set_ylabel(ylabel)
        return
    ax.spines["right"].set_visible(False)
    ax_inf.spines["left"].set_visible(False)
    ax_inf.tick_params(axis="y", left=False)


def _legend(ax: Any, ax_inf: Any, any_group: bool) -> None:
    """One legend for both panels, or a note that nothing ran ok."""
    legend_ax = ax if ax is not None else ax_inf
    if not any_group:
        legend_ax.text(0.5, 0.5, "no successful runs", ha="center", va="center", transform=legend_ax.transAxes)
        return
    handles, labels = [], []
    for a in (ax, ax_inf):
        if a is not None:
            h, lab = a.get_legend_handles_labels()
            handles += h
            labels += lab
    legend_ax.legend(handles, labels, loc="best", fontsize=11)
