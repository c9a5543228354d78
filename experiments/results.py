"""Result files shared by the experiments: an append-only CSV and a markdown table.

Nothing here knows the sweep's columns: writers take the column, grouping and value
names, so other experiments (e.g. the shard experiment) reuse them with their own.

* :func:`append_row` / :func:`read_rows` / :func:`latest`: one CSV row per finished run,
  flushed and fsynced as it is written, so a killed experiment loses at most the run in
  progress and a rerun can skip what is done (a torn last line is ignored).
* :func:`aggregate` / :func:`markdown_table`: mean ± std over repeats (seeds) per cell.

The figure drawn from these rows is :func:`experiments.plots.plot_curves`.

CSV values are strings; :func:`to_float` reads numbers back ("" -> NaN, "inf" -> ∞).
"""

from __future__ import annotations

import csv
import io
import math
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "Difference",
    "Stats",
    "aggregate",
    "append_row",
    "format_number",
    "latest",
    "markdown_table",
    "paired_differences",
    "read_rows",
    "to_float",
]

Row = Mapping[str, str]


# --------------------------------------------------------------------------- CSV
def format_number(x: Any, digits: int = 6) -> str:
    """A CSV cell: '' for None, 'inf' / '-inf' / 'nan', integers as is, floats with ``digits`` significant digits."""
    if x is None:
        return ""
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        if math.isnan(x):
            return "nan"
        if math.isinf(x):
            return "inf" if x > 0 else "-inf"
        return f"{x:.{digits}g}"
    return str(x)


def to_float(s: str | None) -> float:
    """Inverse of :func:`format_number` for numbers: '' / None -> NaN."""
    if s is None or s == "":
        return math.nan
    return float(s)


def _header(path: Path) -> list[str] | None:
    with open(path, newline="") as f:
        first = f.readline()
    if not first.strip():
        return None
    return next(csv.reader([first]))


def append_row(path: str | Path, row: Mapping[str, Any], columns: Sequence[str]) -> None:
    """Append ``row`` (keys ⊆ ``columns``) to the CSV at ``path``, writing the header first if new.

    Raises ``ValueError`` if the file's header is not ``columns`` (another experiment's
    file) or ``row`` has unknown keys. The row is one write, flushed and fsynced.
    """
    path = Path(path)
    unknown = set(row) - set(columns)
    if unknown:
        raise ValueError(f"row has columns {sorted(unknown)} not in the CSV schema {list(columns)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        header = _header(path)
        if header is not None and header != list(columns):
            raise ValueError(
                f"{path} has columns {header}, expected {list(columns)}: it was written by another "
                "experiment or version; write to a new output directory"
            )
        new = header is None
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    if new:
        writer.writeheader()
    writer.writerow({c: format_number(row.get(c)) for c in columns})
    with open(path, "a+b") as f:
        if not new and f.tell() > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":  # a torn line from a killed writer: end it; readers drop it
                f.write(b"\n")
        elif new:
            f.truncate(0)
        f.write(buf.getvalue().encode())
        f.flush()
        os.fsync(f.fileno())


def read_rows(path: str | Path) -> list[dict[str, str]]:
    """Rows of the CSV at ``path`` as dicts (empty if the file does not exist); torn rows are dropped."""
    path = Path(path)
    if not path.exists():
        return []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        n = len(reader.fieldnames or [])
        return [dict(r) for r in reader if None not in r and None not in r.values() and len(r) == n]


def latest(rows: Iterable[Row], key: Sequence[str]) -> dict[tuple[str, ...], Row]:
    """The last row for each value of the ``key`` columns (later rows supersede earlier ones)."""
    out: dict[tuple[str, ...], Row] = {}
    for r in rows:
        k = tuple(r[c] for c in key)
        out.pop(k, None)  # keep file order of the latest occurrence
        out[k] = r
    return out


# --------------------------------------------------------------------------- aggregation
@dataclass(frozen=True)
class Stats:
    """Mean and sample standard deviation (ddof=1; 0 for one value) of ``n`` values; ``failed`` rows excluded."""

    mean: float
    std: float
    n: int
    failed: int

    @classmethod
    def of(cls, values: Sequence[float], failed: int = 0) -> "Stats":
        n = len(values)
        if n == 0:
            return cls(math.nan, math.nan, 0, failed)
        mean = sum(values) / n
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
        return cls(mean, std, n, failed)


def _is_ok(r: Row) -> bool:
    return r.get("status", "ok") == "ok"


def aggregate(
    rows: Iterable[Row],
    by: Sequence[str],
    value: str,
    *,
    ok: Callable[[Row], bool] = _is_ok,
) -> dict[tuple[str, ...], Stats]:
    """:class:`Stats` of column ``value`` per distinct tuple of the ``by`` columns.

    Rows for which ``ok`` is false (default: ``status`` column present and not "ok") or
    whose value is empty/NaN count as ``failed``.
    """
    values: dict[tuple[str, ...], list[float]] = {}
    failed: dict[tuple[str, ...], int] = {}
    for r in rows:
        k = tuple(r[c] for c in by)
        values.setdefault(k, [])
        failed.setdefault(k, 0)
        v = to_float(r.get(value)) if ok(r) else math.nan
        if math.isnan(v):
            failed[k] += 1
        else:
            values[k].append(v)
    return {k: Stats.of(values[k], failed[k]) for k in values}


@dataclass(frozen=True)
class Difference:
    """Mean of paired differences a − b over ``n`` pairs and its two-sided 95% Student-t interval."""

    mean: float
    low: float
    high: float
    n: int

    @classmethod
    def of(cls, diffs: Sequence[float]) -> "Difference":
        from scipy import stats

        s = Stats.of(diffs)
        if s.n < 2:
            return cls(s.mean, math.nan, math.nan, s.n)
        half = float(stats.t.ppf(0.975, s.n - 1)) * s.std / math.sqrt(s.n)
        return cls(s.mean, s.mean - half, s.mean + half, s.n)

    def text(self, scale: float = 1.0, digits: int = 1) -> str:
        """"m [lo, hi] (n=…)" times ``scale``; "—" without pairs, no interval for one pair."""
        if self.n == 0:
            return "—"
        if self.n == 1:
            return f"{self.mean * scale:+.{digits}f} (n=1)"
        return (f"{self.mean * scale:+.{digits}f} [{self.low * scale:+.{digits}f}, {self.high * scale:+.{digits}f}] "
                f"(n={self.n})")


def paired_differences(rows: Iterable[Row], a: str, b: str, *, group: str, by: str, pair: str,
                       value: str) -> dict[str, Difference]:
    """{``by`` value: :class:`Difference` of ``value`` between groups ``a`` and ``b``}, pairing rows by ``pair``.

    Only pairs where both rows succeeded count (a failure is not a zero), so n says how many.
    """
    cells: dict[tuple[str, str, str], float] = {}
    for r in rows:
        v = to_float(r.get(value)) if _is_ok(r) else math.nan
        if r[group] in (a, b) and not math.isnan(v):
            cells[(r[group], r[by], r[pair])] = v
    keys = sorted({(k[1], k[2]) for k in cells}, key=lambda k: (_sort_key(k[0]), _sort_key(k[1])))
    diffs: dict[str, list[float]] = {}
    for at, p in keys:
        if (a, at, p) in cells and (b, at, p) in cells:
            diffs.setdefault(at, []).append(cells[(a, at, p)] - cells[(b, at, p)])
    return {at: Difference.of(d) for at, d in diffs.items()}


def _sort_key(s: str) -> tuple[int, float, str]:
    try:
        return (0, float(s), s)
    except ValueError:
        return (1, 0.0, s)


def markdown_table(
    rows: Iterable[Row],
    *,
    row: str,
    col: str,
    value: str,
    row_order: Sequence[str] | None = None,
    col_order: Sequence[str] | None = None,
    row_label: Callable[[str], str] = str,
    col_label: Callable[[str], str] = str,
    corner: str = "",
    scale: float = 1.0,
    digits: int = 1,
    expected_n: int | None = None,
) -> str:
    """A markdown table of mean ± std of ``value`` (times ``scale``), rows by column ``row``, columns by ``col``.

    Orders default to first appearance for rows and numeric order (then text) for columns.
    A cell with no successful value reads "failed" (all its runs failed) or "—" (no run);
    a cell with fewer than ``expected_n`` values or with failures gets "(n=…)" / "(k failed)".
    """
    rows = list(rows)
    stats = aggregate(rows, (row, col), value)
    rkeys = list(row_order) if row_order is not None else list(dict.fromkeys(r[row] for r in rows))
    ckeys = list(col_order) if col_order is not None else sorted({r[col] for r in rows}, key=_sort_key)
    lines = [
        "| " + " | ".join([corner] + [col_label(c) for c in ckeys]) + " |",
        "|" + "|".join([":---"] + ["---:"] * len(ckeys)) + "|",
    ]
    for rk in rkeys:
        cells = [row_label(rk)]
        for ck in ckeys:
            s = stats.get((rk, ck))
            if s is None:
                cells.append("—")
                continue
            if s.n == 0:
                cells.append("failed")
                continue
            text = f"{s.mean * scale:.{digits}f}"
            if s.n > 1:
                text += f" ± {s.std * scale:.{digits}f}"
            notes = []
            if expected_n is not None and s.n < expected_n:
                notes.append(f"n={s.n}")
            if s.failed:
                notes.append(f"{s.failed} failed")
            if notes:
                text += f" ({', '.join(notes)})"
            cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def rewrite_outputs(out: Path | None, write: Callable[[Path], list], names: Sequence[str]) -> int:
    """``--report-only``: rewrite an experiment's table and plot from its CSV; exit status (2: no ``out``)."""
    if out is None:
        print("error: --report-only needs --out (the experiment's output directory)", file=sys.stderr)
        return 2
    rows = write(out)
    print(f"{len(rows)} runs in {out / names[0]}; wrote {', '.join(str(out / n) for n in names[1:])}")
    return 0


def epsilon_label(e: str) -> str:
    """Column or legend label of a target epsilon written in a CSV: "ε = 3" or "∞ (non-private)"."""
    return "∞ (non-private)" if math.isinf(float(e)) else f"ε = {float(e):g}"
