"""The README's closeness and k tables are the published runs in docs/, not numbers typed by hand.

Recomputes the closeness paired differences from docs/closeness/*/results.csv with the
experiment's own code and compares them, cell by cell, with the README and with
docs/closeness/summary.md; the README's k table (its seeds, accuracy and difference columns, not
the images/s column, which `experiments.bench_throughput` prints) is compared with
docs/axes/k-depth/summary.md. The README's prose around them is not checked here.
"""

from __future__ import annotations

import itertools
from pathlib import Path

from experiments import closeness
from experiments import results as res

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _table(text: str, header: str) -> list[str]:
    """The rows of the markdown table whose header line is ``header`` (minus signs as '-')."""
    lines = text.replace("−", "-").splitlines()
    start = lines.index(header) + 2  # header, then the alignment line
    return list(itertools.takewhile(lambda line: line.startswith("|"), lines[start:]))


def _closeness_lines() -> list[str]:
    """The markdown lines of closeness' summary.md that the published CSVs give (boundary, differences)."""
    grid = closeness.load_grid(closeness.CONFIG, "default")
    # The backbones are not needed: a point's run folder is named by its settings (the tuned presets), not by
    # the checkpoint's path.
    rows = closeness.grid_rows(grid, ROOT / "docs" / "closeness", ROOT / "no-backbones-needed")
    assert rows, "no runs found in docs/closeness for the current settings: re-run or re-copy after a retune"
    eps = [res.format_number(float(e)) for e in grid["epsilons"]]
    return closeness.boundary_lines(closeness.boundary_rows(rows, eps), grid, eps)


def test_readme_closeness_differences_are_those_of_the_published_csvs():
    lines = _closeness_lines()
    header = next(line for line in lines if line.startswith("| c | N |"))
    expected = _table("\n".join(lines), header)
    assert len(expected) == 16  # 4 closeness values × 4 sizes
    assert _table(README, header) == expected


def test_published_closeness_summary_is_its_csvs():
    summary = (ROOT / "docs" / "closeness" / "summary.md").read_text()
    lines = _closeness_lines()
    for header in (line for line in lines if line.startswith("| c ")):  # the boundary, then the differences
        assert _table(summary, header) == _table("\n".join(lines), header), header


def _k_cells(rows: list[str]) -> dict[str, list[str]]:
    """{first cell: the other cells} of markdown table rows."""
    return {cells[0]: cells[1:] for cells in ([c.strip() for c in r.strip("|").split("|")] for r in rows)}


def _seed_count(cell: str) -> int:
    """How many seeds a README "seeds" cell names: "0" -> 1, "0-2" -> 3."""
    first, _, last = cell.partition("-")
    return int(last or first) - int(first) + 1


def test_readme_k_table_is_the_published_k_axis():
    summary = (ROOT / "docs" / "axes" / "k-depth" / "summary.md").read_text()
    published = _k_cells(_table(summary, "| method | 1 | 2 | 3 | 4 | 5 | 6 |"))
    published |= _k_cells(_table(summary, "| difference | 1 | 2 | 3 | 4 | 5 | 6 |"))
    header = next(line for line in README.replace("−", "-").splitlines() if line.startswith("| k | seeds | TAFT-k"))
    readme = _k_cells(_table(README, header))
    columns = {"TAFT (head first), ε = 3": 1, "NLFT, ε = 3": 2, "TAFT (head first) - NLFT, ε = 3": 3,
               "TAFT (head first), ∞ (non-private)": 4, "NLFT, ∞ (non-private)": 5,
               "TAFT (head first) - NLFT, ∞ (non-private)": 6}
    ran = {str(k) for k in range(1, 7) if any(published[row][k - 1] != "—" for row in columns)}
    assert set(readme) == ran, "the README's k table must have a row for each k that ran, and only those"
    for k, cells in readme.items():
        for row, col in columns.items():
            cell = published[row][int(k) - 1]  # e.g. "81.2 (n=1)", "-6.3 [-8.0, -4.6] (n=3)", "—"
            value, shown, difference = cell.split(" ")[0], cells[col], " - NLFT" in row
            if value != "—" and not difference:  # accuracies are shown as percentages
                assert shown.endswith(" %"), f"k = {k}, {row}: README {shown!r} lacks its unit"
                shown = shown.removesuffix(" %")
            assert shown.split(" ")[0] == value, f"k = {k}, {row}: README {cells[col]!r}"
            if difference and value != "—":  # the differences say how many seeds were paired: "(n=3)"
                pairs = int(cell.rsplit("(n=", 1)[1].rstrip(")"))
                assert _seed_count(cells[0]) == pairs, f"k = {k}: README seeds {cells[0]!r}, pairs {pairs}"
                if pairs > 1:  # and the interval is shown with the mean
                    assert cells[col] == cell.rsplit(" (n=", 1)[0], f"k = {k}, {row}"
