"""Dependency-free SVG charts for model directories and ``dp-taft evaluate``.

The library writes plots without matplotlib (an optional dependency of the experiments
only): a line chart (:func:`line_chart_svg`), a confusion matrix (:func:`confusion_svg`)
and a vertical stack of charts in one file (:func:`stack_svg`). Every function returns a
complete, standalone SVG 1.1 document as a string.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping, Sequence
from xml.sax.saxutils import escape

__all__ = ["line_chart_svg", "confusion_svg", "stack_svg"]

_NS = "http://www.w3.org/2000/svg"
_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")
_FONT = 'font-family="sans-serif"'
_CHAR_W = 7  # px per character at font-size 12: room for labels (an estimate, no font metrics)


def _document(width: int, height: int, body: Iterable[str]) -> str:
    return (f'<svg xmlns="{_NS}" version="1.1" width="{width}" height="{height}" viewBox="0 0 {width} {height}">\n'
            f'<rect width="{width}" height="{height}" fill="white"/>\n' + "\n".join(body) + "\n</svg>\n")


def _text(x: float, y: float, text: str, *, size: int = 12, anchor: str = "middle", extra: str = "") -> str:
    return (f'<text x="{x:.1f}" y="{y:.1f}" {_FONT} font-size="{size}" text-anchor="{anchor}"{extra}>'
            f'{escape(text)}</text>')


def _ticks(low: float, high: float, *, integers: bool = False) -> list[float]:
    """About five round tick values (1, 2 or 5 times a power of ten apart) within [low, high];
    whole numbers only when ``integers`` (epochs have no half)."""
    raw = (high - low) / 4
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    step = max(step, 1.0) if integers else step
    first = math.ceil(low / step - 1e-9)
    return [k * step for k in range(first, math.floor(high / step + 1e-9) + 1)]


def _span(values: list[float], within: tuple[float, float] | None = None) -> tuple[float, float]:
    """The range of ``values`` and ``within``, widened when empty or a single value so the scale is defined."""
    values = values + list(within or ())
    if not values:
        return 0.0, 1.0
    low, high = min(values), max(values)
    if high == low:
        pad = abs(low) * 0.1 or 0.5
        return low - pad, high + pad
    return low, high


def line_chart_svg(series: Mapping[str, Sequence[tuple[float, float]]], *, x_label: str, y_label: str,
                   title: str, y_range: tuple[float, float] | None = None, width: int = 520,
                   height: int = 320) -> str:
    """A line chart with markers, one line per entry of ``series``, on shared axes.

    Args:
        series: legend label -> (x, y) points in drawing order; every coordinate finite.
            A series may be empty (it is listed in the legend only); with no points at all
            the chart says "no data".
        x_label, y_label, title: axis labels and the title (plain text; escaped here).
        y_range: (low, high) the y axis covers at least (e.g. (0, 100) for a percentage), or
            None to fit the data.
        width, height: size in px (>= 200 and >= 150).

    Raises:
        ValueError: a non-finite coordinate (named with its series) or a too small size.
    """
    if width < 200 or height < 150:
        raise ValueError(f"a line chart needs width >= 200 and height >= 150 px, got {width}x{height}")
    for name, points in series.items():
        for x, y in points:
            if not (math.isfinite(x) and math.isfinite(y)):
                raise ValueError(f"series {name!r} has a non-finite point ({x}, {y}): leave missing values out")
    left, right, top, bottom = 64, 16, 48, 48
    plot_w, plot_h = width - left - right, height - top - bottom
    xs = [x for pts in series.values() for x, _ in pts]
    (x0, x1) = _span(xs)
    (y0, y1) = _span([y for pts in series.values() for _, y in pts], y_range)

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * plot_w

    def py(y: float) -> float:
        return top + plot_h - (y - y0) / (y1 - y0) * plot_h

    body = [_text(width / 2, 20, title, size=14, extra=' font-weight="bold"'),
            f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#444"/>']
    for x in _ticks(x0, x1, integers=all(float(x).is_integer() for x in xs)):
        body += [f'<line x1="{px(x):.1f}" y1="{top + plot_h}" x2="{px(x):.1f}" y2="{top + plot_h + 4}" stroke="#444"/>',
                 _text(px(x), top + plot_h + 16, f"{x:.4g}", size=11)]
    for y in _ticks(y0, y1):
        body += [f'<line x1="{left}" y1="{py(y):.1f}" x2="{left + plot_w}" y2="{py(y):.1f}" stroke="#ddd"/>',
                 _text(left - 6, py(y) + 4, f"{y:.4g}", size=11, anchor="end")]
    body += [_text(left + plot_w / 2, height - 10, x_label),
             _text(14, top + plot_h / 2, y_label, extra=f' transform="rotate(-90 14 {top + plot_h / 2:.1f})"')]
    if not any(series.values()):
        body.append(_text(left + plot_w / 2, top + plot_h / 2, "no data", size=13, extra=' fill="#888"'))
    legend_x = left
    for i, (name, points) in enumerate(series.items()):
        color = _COLORS[i % len(_COLORS)]
        coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in points)
        if len(points) > 1:
            body.append(f'<polyline points="{coords}" fill="none" stroke="{color}" stroke-width="2"/>')
        body += [f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{color}"/>' for x, y in points]
        body += [f'<rect x="{legend_x}" y="{top - 16}" width="10" height="10" fill="{color}"/>',
                 _text(legend_x + 14, top - 7, name, size=11, anchor="start")]
        legend_x += 14 + _CHAR_W * len(name) + 16
    return _document(width, height, body)


def confusion_svg(matrix: Sequence[Sequence[float]], classes: Sequence[str], title: str) -> str:
    """A confusion matrix as a heat map: row = true class, column = predicted class.

    Args:
        matrix: n x n counts (>= 0; a nested list, numpy array or tensor), ``matrix[i][j]``
            the number of examples of class i predicted as j.
        classes: the n class names, in index order.
        title: plain text (escaped here).

    Each cell shows its count; its shade is the count over its row's total (the fraction
    of class i predicted as j), so rows of rare classes are as readable as frequent ones.

    Raises:
        ValueError: a matrix that is not n x n for n = len(classes), or a negative or
            non-finite count.
    """
    rows = [[float(v) for v in row] for row in matrix]
    n = len(classes)
    if n == 0 or len(rows) != n or any(len(r) != n for r in rows):
        raise ValueError(f"the confusion matrix must be {n} x {n} (one row and column per class), got "
                         f"{len(rows)} rows of lengths {sorted({len(r) for r in rows})}")
    if any(not math.isfinite(v) or v < 0 for r in rows for v in r):
        raise ValueError("confusion matrix counts must be finite and >= 0")
    cell = 36
    label_w = 12 + _CHAR_W * max(len(c) for c in classes)
    left, top = label_w + 24, label_w + 48
    # Column labels are rotated 60 degrees: each overhangs its column to the right by half its length.
    width, height = max(left + n * cell + label_w // 2 + 16, 240), top + n * cell + 16
    body = [_text(width / 2, 20, title, size=14, extra=' font-weight="bold"'),
            _text(left + n * cell / 2, 40, "predicted class"),
            _text(14, top + n * cell / 2, "true class", extra=f' transform="rotate(-90 14 {top + n * cell / 2})"')]
    for i, name in enumerate(classes):
        cx, cy = left + i * cell + cell / 2, top + i * cell + cell / 2 + 4
        body += [_text(left - 6, cy, name, size=11, anchor="end"),
                 _text(cx, top - 6, name, size=11, anchor="start", extra=f' transform="rotate(-60 {cx} {top - 6})"')]
    for i, row in enumerate(rows):
        total = sum(row)
        for j, count in enumerate(row):
            share = count / total if total else 0.0
            shade = tuple(round(255 + (dark - 255) * share) for dark in (31, 78, 156))
            x, y = left + j * cell, top + i * cell
            body += [f'<rect x="{x}" y="{y}" width="{cell}" height="{cell}" fill="rgb{shade}" stroke="#ccc"/>',
                     _text(x + cell / 2, y + cell / 2 + 4, f"{count:.6g}", size=11,
                           extra=f' fill="{"white" if share > 0.5 else "black"}"')]
    return _document(width, height, body)


def stack_svg(charts: Sequence[str]) -> str:
    """One SVG document showing ``charts`` (standalone SVG documents, e.g. from this module) top to bottom."""
    if not charts:
        raise ValueError("stack_svg needs at least one chart")
    sizes = []
    for chart in charts:
        root = ET.fromstring(chart)
        if root.tag != f"{{{_NS}}}svg" or "width" not in root.attrib or "height" not in root.attrib:
            raise ValueError("each chart must be an SVG document with width and height, as this module writes")
        sizes.append((float(root.attrib["width"]), float(root.attrib["height"])))
    body, y = [], 0.0
    for chart, (_, h) in zip(charts, sizes):
        # A nested <svg> placed at y keeps each chart's own coordinates.
        body.append(chart.replace("<svg ", f'<svg x="0" y="{y:g}" ', 1).strip())
        y += h
    return _document(round(max(w for w, _ in sizes)), round(y), body)
