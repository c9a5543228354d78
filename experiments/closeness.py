"""The closeness axis: where TAFT beats NLFT as the pretraining comes closer to the private task.

A DIFFERENT TASK from the default one, never mixed into its claims. ``python -m
experiments.closeness`` pretrains one backbone per closeness c (experiments.pretrain's
deterministic recipe, ``pretrain_epochs`` epochs) on the public classes 0-4 plus a PUBLIC,
labelled sample of c × 30,000 training images of classes 5-9, drawn from those in no private
training set of the grid (the sweep's subsamples of every N at its data_seed: for one seed the
smaller are inside the larger, and the union is excluded), then fine-tunes each backbone on the
private task exactly as the sweep does (classes 5-9 through a fresh 5-way head, tuned settings
of ``dp_taft/presets/tuned.toml`` read at run time, the batch size scaled with N as
:func:`experiments.axes.size_argv` does) at every (c, N, ε), TAFT-k head first against NLFT-k.

The pretraining head is 10-way (classes 0-9, their own labels) for every c, c = 0 included:
the sample teaches the backbone to tell classes 5-9 apart, which is what "closer to the
task" means, and the axis then varies the data alone (c = 0 is the shipped recipe with 5
unused outputs, not the shipped file). The head is dropped for fine-tuning, as the default's.

Outputs in ``--out`` (default ``results/closeness/``): one directory per point
``c<percent>-n<N>/`` with the resumable sweeps of :func:`experiments.axes.run_point` (a
re-tuned settings file starts new ones); ``summary.md`` (the boundary per (c, N), the paired
TAFT − NLFT differences with 95% t intervals, accuracies, wall times, the backbones) and
``boundary.png``, the boundary map over the differences against ε. The backbones are kept in
``--cache-dir`` (default ``~/.cache/dp_taft``). Options ``--fractions/--sizes/--epsilons/--seeds``
run part of the grid now (e.g. one seed first); the summary always covers the whole grid.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import takewhile
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import TensorDataset

from experiments import axes
from experiments import results as res
from experiments import sweep_config as sc
from experiments.config import read_profiled

__all__ = ["CONFIG", "Boundary", "boundary_lines", "boundary_rows", "closeness_data", "grid_rows", "load_grid", "main",
           "public_sample"]

CONFIG = Path(__file__).with_name("closeness.toml")
GRID_KEYS = frozenset({"fractions", "sizes", "epsilons", "methods", "blocks", "seeds", "pretrain_epochs",
                       "sample_seed", "sweep_profile"})


def load_grid(path: Path, profile: str) -> dict[str, Any]:
    """The [closeness] settings of ``path`` updated with its ``[profiles.<profile>]``, keys checked."""
    cfg, prof = read_profiled(path, ("closeness",), profile)
    grid = {**cfg.get("closeness", {}), **prof}
    if set(grid) != GRID_KEYS:
        raise ValueError(f"{path}: unknown {sorted(set(grid) - GRID_KEYS)}, missing {sorted(GRID_KEYS - set(grid))}")
    if not all(0 <= c < 1 for c in grid["fractions"]):
        raise ValueError(f"{path}: fractions must be in [0, 1), got {grid['fractions']}")
    return grid


# --------------------------------------------------------------------------- the public data
def public_sample(fraction: float, sizes: Sequence[int], data_seed: int, sample_seed: int) -> torch.Tensor:
    """Indices (ascending) into the 60,000 Fashion-MNIST training images of the public sample of
    classes 5-9 at closeness ``fraction``: round(fraction × 30,000) images drawn without replacement
    (``sample_seed``) from the training images of classes 5-9 in none of the private training sets
    of ``sizes`` at ``data_seed`` (:func:`experiments.data.private_indices`). One permutation for
    every fraction, so a smaller sample is inside a larger one."""
    from experiments.data import private_indices

    everything = private_indices(None)
    excluded = torch.cat([private_indices(n, data_seed) for n in sizes])
    pool = everything[~torch.isin(everything, excluded)]
    count = round(fraction * everything.numel())
    if count > pool.numel():
        raise ValueError(f"closeness {fraction:g} needs {count} public images of classes 5-9; {pool.numel()} are "
                         f"outside the private training sets of N = {max(sizes)}")
    order = torch.randperm(pool.numel(), generator=torch.Generator().manual_seed(sample_seed))
    return pool[order[:count]].sort().values


def closeness_data(fraction: float, sizes: Sequence[int], data_seed: int,
                   sample_seed: int) -> tuple[TensorDataset, TensorDataset, int]:
    """(pretraining set, its test set, 10): the public training images of classes 0-4 followed by
    the :func:`public_sample`, labelled 0-9 as Fashion-MNIST's classes; tested on the public
    test images of classes 0-4 (the test images of 5-9 are the private task's)."""
    from experiments.data import load_fashion_mnist, normalise, public_split

    raw = load_fashion_mnist()
    idx = public_sample(fraction, sizes, data_seed, sample_seed)
    public_train, public_test = public_split()
    images = torch.cat([public_train.tensors[0], normalise(raw.train_images[idx])])
    labels = torch.cat([public_train.tensors[1], raw.train_labels[idx]])
    return TensorDataset(images, labels), public_test, 10


def _data_seed(grid: Mapping[str, Any]) -> int:
    """The sweep's data_seed: the seed of the private subsamples the public sample must avoid."""
    return sc.load_config(sc.DEFAULT_CONFIG, grid["sweep_profile"])[0]["data_seed"]


def backbone_path(fraction: float, grid: Mapping[str, Any], cache_dir: Path) -> Path:
    """Where the closeness-``fraction`` backbone of ``grid`` is kept in ``cache_dir`` (see :func:`backbone`)."""
    return cache_dir / (f"closeness_c{fraction:g}_e{grid['pretrain_epochs']}_n{max(grid['sizes'])}"
                        f"_d{_data_seed(grid)}_s{grid['sample_seed']}.pt")


def backbone(fraction: float, grid: Mapping[str, Any], cache_dir: Path) -> Path:
    """:func:`backbone_path`, pretrained on :func:`closeness_data` first if absent (8 epochs took 13-14
    minutes on one shared core; bit-identical for one machine and thread count)."""
    from experiments.pretrain import pretrained_checkpoint

    return pretrained_checkpoint(backbone_path(fraction, grid, cache_dir), epochs=grid["pretrain_epochs"],
                                 data=closeness_data(fraction, grid["sizes"], _data_seed(grid), grid["sample_seed"]))


def _key(fraction: float, n: int) -> str:
    """A point's key in the ``point`` column and :func:`boundary_rows`: "c|N", e.g. "0.05|1000"."""
    return f"{fraction:g}|{n}"


def point_name(fraction: float, n: int) -> str:
    """``c<percent>-n<N>``, e.g. c5-n1000."""
    return f"c{100 * fraction:g}-n{n}"


def point_argv(fraction: float, n: int, grid: Mapping[str, Any], cache_dir: Path) -> list[str]:
    """The sweep options of point (c, N), ε, seeds and --out aside."""
    return ["--profile", grid["sweep_profile"], "--checkpoint", str(backbone_path(fraction, grid, cache_dir)),
            "--blocks", str(grid["blocks"]), *axes.size_argv(n, grid["methods"], grid["sweep_profile"])]


# --------------------------------------------------------------------------- the boundary
@dataclass(frozen=True)
class Boundary:
    """Up to which target ε a paired difference TAFT − NLFT favours TAFT, from the smallest ε up.

    ``ahead_to``: the largest ε (CSV text, "inf" = non-private) up to which the mean difference is
    > 0 at every ε of the grid (None: not even at the smallest); ``sure_to``: the same with the
    whole 95% interval above 0; ``crossing``: where the mean reaches 0 between ``ahead_to`` and
    the next ε, linear in log ε (None when that next ε is ∞ or there is none); ``monotone``:
    TAFT is nowhere ahead again past the first ε where it is not; ``missing``: ε without pairs,
    left out of the above (a grid still running).
    """

    ahead_to: str | None
    sure_to: str | None
    crossing: float | None
    monotone: bool
    missing: tuple[str, ...]

    @classmethod
    def of(cls, diffs: Mapping[str, res.Difference], epsilons: Sequence[str]) -> Boundary:
        missing = tuple(e for e in sorted(epsilons, key=float) if e not in diffs or diffs[e].n == 0)
        eps = [e for e in sorted(epsilons, key=float) if e not in missing]  # a partial grid: what ran, gaps noted
        means = [diffs[e].mean for e in eps]
        ahead = len(list(takewhile(lambda m: m > 0, means)))
        sure = len(list(takewhile(lambda e: diffs[e].low > 0, eps)))  # a NaN bound (one pair) is not sure
        crossing = None
        if 0 < ahead < len(eps) and math.isfinite(float(eps[ahead])):
            x0, x1 = math.log(float(eps[ahead - 1])), math.log(float(eps[ahead]))
            d0, d1 = means[ahead - 1], means[ahead]
            crossing = math.exp(x0 + (x1 - x0) * d0 / (d0 - d1))
        return cls(eps[ahead - 1] if ahead else None, eps[sure - 1] if sure else None, crossing,
                   not any(m > 0 for m in means[ahead:]), missing)

    def text(self) -> str:
        """E.g. "ε ≤ 3 (0 at ε ≈ 4.6); 95%: ε ≤ 1", "none; 95%: none", "every ε; 95%: ε ≤ 8"."""
        def upto(e: str | None) -> str:
            return "none" if e is None else "every ε" if e == "inf" else f"ε ≤ {e}"

        out = upto(self.ahead_to) + (f" (0 at ε ≈ {self.crossing:.2g})" if self.crossing else "")
        notes = [f"95%: {upto(self.sure_to)}"] + ([] if self.monotone else ["ahead again at a larger ε"])
        return "; ".join([out, *notes, *([f"no pairs at ε = {', '.join(self.missing)}"] if self.missing else [])])


def boundary_rows(rows: Sequence[Mapping[str, str]], epsilons: Sequence[str]) -> dict[str, tuple[
        dict[str, res.Difference], Boundary]]:
    """{point ("c|N"): ({ε: TAFT − NLFT paired by seed}, its :class:`Boundary`)} of sweep rows with
    the columns ``point`` and ``name`` ("TAFT (head first)" / "NLFT")."""
    out = {}
    for point in dict.fromkeys(r["point"] for r in rows):
        mine = [r for r in rows if r["point"] == point]
        diffs = res.paired_differences(mine, axes.NAMES["taft_head"], axes.NAMES["nlft"], group="name",
                                       by="target_epsilon", pair="seed", value="accuracy")
        out[point] = (diffs, Boundary.of(diffs, epsilons))
    return out


# --------------------------------------------------------------------------- outputs
def grid_rows(grid: Mapping[str, Any], out: Path, cache_dir: Path) -> list[dict[str, Any]]:
    """The counted rows of every point of the grid, with the columns ``point`` ("c|N"), ``c``, ``n``."""
    rows = []
    for c in grid["fractions"]:
        for n in grid["sizes"]:
            argv = point_argv(c, n, grid, cache_dir)
            for r in axes.point_rows(out / point_name(c, n), argv, grid["methods"], grid["epsilons"], grid["seeds"]):
                rows.append({**r, "point": _key(c, n), "c": f"{100 * c:g}", "n": str(n)})
    return rows


def _backbone_lines(grid: Mapping[str, Any], cache_dir: Path) -> list[str]:
    """Markdown: each backbone's public sample (per class), file and public test accuracy."""
    from experiments.data import default_model, load_fashion_mnist, public_split
    from experiments.pretrain import evaluate, sha256_file

    labels, seed = load_fashion_mnist().train_labels, _data_seed(grid)
    lines = ["| c | public images of classes 5-9 (per class 5, 6, 7, 8, 9) | public test accuracy, classes 0-4 | "
             "sha256 |", "|---:|:---|---:|:---|"]
    for c in grid["fractions"]:
        counts = torch.bincount(labels[public_sample(c, grid["sizes"], seed, grid["sample_seed"])], minlength=10)
        path = backbone_path(c, grid, cache_dir)
        sample = f"| {100 * c:g} % | {int(counts.sum())} ({', '.join(map(str, counts[5:].tolist()))}) | "
        if not path.is_file():
            lines.append(sample + "not pretrained yet | |")
            continue
        model = default_model(10)
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        acc = evaluate(model, public_split()[1])
        lines.append(sample + f"{100 * acc:.1f} % | `{sha256_file(path)[:12]}` |")
    return lines + [""]


def boundary_lines(found: Mapping[str, tuple[dict[str, res.Difference], Boundary]], grid: Mapping[str, Any],
                   eps: Sequence[str]) -> list[str]:
    """Markdown: the boundary per (c, N), then every paired difference with its interval."""
    def cell(c: float, n: int, e: str | None) -> str:
        diffs, bound = found.get(_key(c, n), ({}, None))
        if e is None:
            return bound.text() if bound else "—"
        return diffs[e].text(100) if e in diffs else "—"

    sizes = grid["sizes"]
    return [
        f"TAFT − NLFT by target ε, paired by seed ({', '.join(map(str, grid['seeds']))}): the ε up to which "
        "the mean difference is above 0 at every ε of the grid (and where it crosses 0, interpolated in log ε), "
        "and the ε up to which its 95% t interval is above 0.", "",
        "| c \\ N | " + " | ".join(map(str, sizes)) + " |", "|:---|" + "---:|" * len(sizes),
        *(f"| {100 * c:g} % | " + " | ".join(cell(c, n, None) for n in sizes) + " |" for c in grid["fractions"]), "",
        "TAFT − NLFT (percentage points), mean [95% t interval] (n pairs):", "",
        "| c | N | " + " | ".join(map(res.epsilon_label, eps)) + " |", "|---:|---:|" + "---:|" * len(eps),
        *(f"| {100 * c:g} % | {n} | " + " | ".join(cell(c, n, e) for e in eps) + " |"
          for c in grid["fractions"] for n in sizes), "",
    ]


def write_outputs(grid: Mapping[str, Any], out: Path, cache_dir: Path) -> list[dict[str, Any]]:
    """(Re)write summary.md and boundary.png in ``out`` from the points' results; returns the rows."""
    rows = grid_rows(grid, out, cache_dir)
    eps = [res.format_number(float(e)) for e in grid["epsilons"]]
    found = boundary_rows(rows, eps)
    lrs = sorted({f"{r['lr']} ({r['name']})" for r in rows if r["target_epsilon"] == "inf"})
    deltas = sorted({r["delta"] for r in rows if r["delta"]})
    lines = [
        "# Closeness axis: TAFT-k head first against NLFT-k as pretraining comes closer to the private task", "",
        "**A different task from the default one**: the backbones are pretrained on public classes 0-4 plus a "
        "public, labelled sample of c × 30,000 training images of classes 5-9 (the private task's classes), "
        "drawn from the training images in no private training set; these numbers never stand in for the "
        "default task's. Private task as the sweep's: classes 5-9, fresh 5-way head, test on all 5,000 test "
        f"images of classes 5-9, k = {grid['blocks']}, δ = {', '.join(deltas) or '—'}, batch size scaled with N; "
        f"tuned settings of dp_taft/presets/tuned.toml, at ε = ∞ its [nonprivate.<method>] tables (lr "
        f"{', '.join(lrs) or '—'}).", "",
        "## Backbones", "", *_backbone_lines(grid, cache_dir),
        "## Where TAFT is ahead", "", *boundary_lines(found, grid, eps),
        "## Test accuracy (%), mean ± std over seeds", "",
    ]
    for r in rows:
        r["row"] = f"{r['c']} % · {r['n']} · {r['name']}"
    order = [f"{100 * c:g} % · {n} · {axes.NAMES[m]}" for c in grid["fractions"] for n in grid["sizes"]
             for m in grid["methods"]]
    lines += [res.markdown_table(rows, row="row", col="target_epsilon", value="accuracy", row_order=order,
                                 col_order=eps, col_label=res.epsilon_label, corner="c · N · method", scale=100,
                                 expected_n=len(grid["seeds"])),
              "Mean wall time per run (s), over c, ε and seeds (shared 2-core machine, one thread each):", "",
              res.markdown_table(rows, row="name", col="n", value="wall_time_s", corner="method", digits=0)]
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text("\n".join(lines))
    plot_boundary(out / "boundary.png", found, grid, eps)
    return rows


def plot_boundary(path: Path, found: Mapping[str, tuple[dict[str, res.Difference], Boundary]],
                  grid: Mapping[str, Any], eps: Sequence[str]) -> None:
    """Top: the map, per (c, N), of the ε up to which TAFT is ahead (mean; 95% in brackets); bottom,
    one panel per c: TAFT − NLFT (percentage points) against ε, one line per N, 95% t intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    fracs, sizes = grid["fractions"], grid["sizes"]
    fig = plt.figure(figsize=(3.2 * len(fracs), 8.5))
    spec = fig.add_gridspec(2, len(fracs), height_ratios=[1, 1.1], hspace=0.45)
    top = fig.add_subplot(spec[0, :])
    levels = ["none", *(f"ε ≤ {e}" if e != "inf" else "every ε" for e in eps)]
    cmap = ListedColormap(plt.get_cmap("RdYlGn")([i / len(eps) for i in range(len(levels))]))
    cells = [[math.nan] * len(sizes) for _ in fracs]
    for i, c in enumerate(fracs):
        for j, n in enumerate(sizes):
            b = found.get(_key(c, n), (None, None))[1]
            if b is None:
                top.text(j, i, "no runs", ha="center", va="center", fontsize=9)
                continue
            cells[i][j] = 0 if b.ahead_to is None else eps.index(b.ahead_to) + 1
            sure = levels[0 if b.sure_to is None else eps.index(b.sure_to) + 1]
            cross = f"\n0 at ε ≈ {b.crossing:.2g}" if b.crossing else ""
            gaps = "\n(incomplete)" if b.missing else ""
            top.text(j, i, f"{levels[cells[i][j]]}{cross}\n95%: {sure}{gaps}", ha="center", va="center", fontsize=9)
    top.imshow(cells, cmap=cmap, vmin=-0.5, vmax=len(levels) - 0.5, aspect="auto")
    top.set_xticks(range(len(sizes)), [f"{n:,}" for n in sizes])
    top.set_yticks(range(len(fracs)), [f"{100 * c:g} %" for c in fracs])
    top.set_xlabel("private training examples N")
    top.set_ylabel("closeness c\n(public share of classes 5-9)")
    top.set_title("Where TAFT-k (head first) beats NLFT-k: the target ε up to which TAFT − NLFT > 0 "
                  "(mean over seeds; 95%: interval above 0)", fontsize=10)
    first = None
    for i, c in enumerate(fracs):
        ax = fig.add_subplot(spec[1, i], sharey=first)  # one scale: the panels compare c
        first = first or ax
        for j, n in enumerate(sizes):
            diffs = found.get(_key(c, n), ({}, None))[0]
            pts = [(k + (j - (len(sizes) - 1) / 2) * 0.07, diffs[e]) for k, e in enumerate(eps) if e in diffs]
            if not pts:
                continue
            err = [[100 * (d.mean - d.low) if d.n > 1 else 0 for _, d in pts],
                   [100 * (d.high - d.mean) if d.n > 1 else 0 for _, d in pts]]
            ax.errorbar([x for x, _ in pts], [100 * d.mean for _, d in pts], yerr=err, marker="o", capsize=3,
                        label=f"N = {n:,}")
        ax.axhline(0, color="black", linewidth=1)
        ax.set_xticks(range(len(eps)), [res.epsilon_label(e).replace(" (non-private)", "") for e in eps])
        ax.set_title(f"c = {100 * c:g} %", fontsize=10)
        ax.set_xlabel("target ε")
        ax.grid(True, alpha=0.3)
        if i == 0:
            ax.set_ylabel("TAFT − NLFT (points)\nabove 0: TAFT ahead")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    from experiments.pretrain import default_cache_dir

    p = argparse.ArgumentParser(prog="python -m experiments.closeness", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, default=CONFIG)
    p.add_argument("--profile", default="default")
    p.add_argument("--fractions", nargs="+", type=float, help="run only these c of the grid now")
    p.add_argument("--sizes", nargs="+", type=int, help="run only these N of the grid now")
    p.add_argument("--epsilons", nargs="+", type=float, help="run only these target ε of the grid now (inf = ∞)")
    p.add_argument("--seeds", nargs="+", type=int, help="run only these seeds of the grid now")
    p.add_argument("--out", type=Path, default=Path("results") / "closeness")
    p.add_argument("--cache-dir", type=Path, default=default_cache_dir(), help="where the backbones are kept")
    p.add_argument("--report-only", action="store_true", help="only rewrite summary.md and boundary.png")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Pretrain the missing backbones and run (resume) the chosen part of the grid, c by c, then
    write the summary and figure of the whole grid; the first nonzero sweep exit code, or 0."""
    args = parse_args(argv)
    grid = load_grid(args.config, args.profile)
    part = {k: getattr(args, k) or grid[k] for k in ("fractions", "sizes", "epsilons", "seeds")}
    outside = {k: sorted(set(v) - set(grid[k])) for k, v in part.items() if set(v) - set(grid[k])}
    if outside:
        grid_values = "; ".join(f"{k}: {' '.join(f'{v:g}' for v in grid[k])}" for k in outside)
        shares = " (fractions are shares: 0.05 = 5 %)" if "fractions" in outside else ""
        print(f"error: not in the grid of {args.config} [{args.profile}]: {outside}; its values are "
              f"{grid_values}{shares}", file=sys.stderr)
        return 2
    code = 0
    for c in [] if args.report_only else part["fractions"]:
        backbone(c, grid, args.cache_dir)
        for n in part["sizes"]:
            result = axes.run_point(args.out / point_name(c, n), point_argv(c, n, grid, args.cache_dir),
                                    grid["methods"], part["epsilons"], part["seeds"])
            code = code or result  # a refused point (its message printed) does not stop the others
    write_outputs(grid, args.out, args.cache_dir)
    print(f"done: {args.out / 'summary.md'}, {args.out / 'boundary.png'}")
    return code
if __name__ == "__main__":
    sys.exit(main())
