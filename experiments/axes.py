"""Where TAFT wins or loses: the TAFT − NLFT gap against backbone strength, data size and k.

``python -m experiments.axes`` runs the sweep (tuned settings, ``experiments/sweep.toml``)
at one target ε (default 3) and 2 seeds for TAFT-k's best variant and NLFT-k at the points
of three axes (best by the public proxy of :mod:`experiments.tune`: head first, 92.8 % against
91.8 % for TAFT-k around a fresh head; ``--methods taft taft_head nlft`` runs both), each
varied alone around the default (backbone pretrained 8 epochs, N = 10,000, k = 2), a point
shared by the axes and run once:

* ``backbone``: the public backbone pretrained for 2, 8 or 16 epochs (same deterministic
  recipe, :mod:`experiments.pretrain`; missing checkpoints are pretrained into its cache,
  about 30 s per epoch on 2 cores);
* ``size``: N = 1,000, 10,000 or 30,000 private examples, each method's batch size scaled
  by N / 10,000 so that q, the steps and σ stay those of the tuned run;
* ``k``: 1, 2 or 4 linearised / fine-tuned blocks.

Outputs in ``--out`` (default ``results/axes/``): one sweep directory per point
(``<axis>-<value>/``, resumable like any sweep; ``--default-dir`` reuses the main sweep's
runs for the default point), ``summary.md`` (accuracy per method and the
paired TAFT − NLFT difference with 95% t intervals, per axis) and ``axis_<axis>.png``
(accuracy per method, and the difference, against the axis).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from experiments import results as res
from experiments import sweep as sw
from experiments import sweep_config as sc
from experiments.sweep_outputs import CSV_NAME

__all__ = ["AXES", "main", "points"]

#: axis -> (values, the default's value, x label)
AXES: dict[str, tuple[tuple[int, ...], int, str]] = {
    "backbone": ((2, 8, 16), 8, "public pretraining epochs of the backbone"),
    "size": ((1000, 10000, 30000), 10000, "private training examples N"),
    "k": ((1, 2, 4), 2, "k (blocks linearised / fine-tuned)"),
}
METHODS = ("taft", "taft_head", "nlft")


def backbone_checkpoint(epochs: int, cache_dir: Path) -> Path | None:
    """The backbone pretrained for ``epochs`` (None: the shipped 8-epoch one), pretrained if absent."""
    from experiments.pretrain import pretrained_checkpoint

    if epochs == AXES["backbone"][1]:
        return None
    return pretrained_checkpoint(cache_dir / f"pretrain_e{epochs}.pt", epochs=epochs)


def points(axes: Sequence[str]) -> dict[tuple[str, int], str]:
    """{(axis, value): run directory name}, the shared "default" point (every axis' default value) last."""
    pts = {(a, v): "default" if v == AXES[a][1] else f"{a}-{v}" for a in axes for v in AXES[a][0]}
    return dict(sorted(pts.items(), key=lambda kv: kv[1] == "default"))


def backbone_accuracy(epochs: int, cache_dir: Path) -> float:
    """Public test accuracy (classes 0-4) of the backbone pretrained for ``epochs``, with its pretraining head."""
    from experiments.data import default_model, public_split
    from experiments.pretrain import SHIPPED_CHECKPOINT, evaluate

    path = backbone_checkpoint(epochs, cache_dir) or SHIPPED_CHECKPOINT
    model = default_model(5)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return evaluate(model, public_split()[1])


def sweep_argv(axis: str, value: int, args: argparse.Namespace, out: Path) -> list[str]:
    """The sweep command line of one point."""
    argv = ["--methods", *args.methods, "--epsilons", str(args.epsilon), "--seeds", *map(str, args.seeds),
            "--out", str(out), "--quiet", "--no-progress"]
    if axis == "backbone":
        path = backbone_checkpoint(value, args.cache_dir)
        argv += ["--checkpoint", str(path)] if path else []
    elif axis == "size":
        _, hparams, _ = sc.load_config(sc.DEFAULT_CONFIG, "default")
        argv += ["--private-train-size", str(value)]
        scale = value / AXES["size"][1]
        argv += [f"--set={m}.batch_size={max(1, round(hparams[m]['batch_size'] * scale))}" for m in args.methods]
    elif axis == "k" and value != AXES["k"][1]:
        argv += ["--blocks", str(value)]
    return argv


def _rows(axis: str, out: Path, default_dir: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The counted sweep rows of ``args``' methods, ε and seeds at every point of ``axis``, with the
    column ``axis_value`` (the default point's directory may hold more: e.g. the main sweep)."""
    rows = []
    for (a, value), name in points([axis]).items():
        where = default_dir if name == "default" else out / name
        for r in res.latest(res.read_rows(where / CSV_NAME), ("run_id",)).values():
            if (r["method"] in args.methods and float(r["target_epsilon"]) == args.epsilon
                    and int(r["seed"]) in args.seeds):
                rows.append({**r, "axis_value": str(value)})
    return rows


def write_outputs(out: Path, args: argparse.Namespace, default_dir: Path) -> None:
    """(Re)write summary.md and one figure per axis (``args.axes``) from the points' results.csv."""
    lines = ["# TAFT against NLFT along three axes", "",
             f"Test accuracy (%) on the private task at target ε = {args.epsilon:g}, mean ± std over seeds "
             f"{', '.join(map(str, args.seeds))}, and the paired difference (percentage points, same seed) with its "
             "95% t interval. Each axis varies alone around the default (backbone pretrained 8 epochs, "
             "N = 10,000, k = 2).", ""]
    for axis in args.axes:
        rows = _rows(axis, out, default_dir, args)
        if not rows:
            continue
        values, _, xlabel = AXES[axis]
        cols = [str(v) for v in values]
        if axis == "backbone":
            accs = ", ".join(f"{v} epochs: {100 * backbone_accuracy(v, args.cache_dir):.1f}%" for v in values)
            lines += [f"Public test accuracy of the backbones (classes 0-4, their pretraining head): {accs}.", ""]
        names = {"taft": "TAFT", "taft_head": "TAFT (head first)", "nlft": "NLFT"}
        for r in rows:
            r["name"] = names[r["method"]]
        present = [n for m, n in names.items() if any(r["method"] == m for r in rows)]
        lines += [f"## {axis}: {xlabel}", "",
                  res.markdown_table(rows, row="name", col="axis_value", value="accuracy", row_order=present,
                                     col_order=cols, corner="method", scale=100, expected_n=len(args.seeds))]
        diffs = {a: res.paired_differences(rows, a, "NLFT", group="name", by="axis_value", pair="seed",
                                           value="accuracy") for a in present if a != "NLFT"}
        lines += ["| difference | " + " | ".join(cols) + " |", "|:---|" + "---:|" * len(cols)]
        lines += [f"| {a} − NLFT | " + " | ".join(d[c].text(100) if c in d else "—" for c in cols) + " |"
                  for a, d in diffs.items()]
        lines.append("")
        plot_axis(out / f"axis_{axis}.png", rows, present, diffs, values, xlabel)
    (out / "summary.md").write_text("\n".join(lines))


def plot_axis(path: Path, rows: list[dict[str, Any]], names: Sequence[str], diffs: dict[str, dict[str, res.Difference]],
              values: Sequence[int], xlabel: str) -> None:
    """Left: accuracy per method (mean ± std); right: TAFT − NLFT with 95% intervals and the zero line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stats = res.aggregate(rows, ("name", "axis_value"), "accuracy")
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    for name in names:
        pts = [(v, stats[(name, str(v))]) for v in values if (name, str(v)) in stats and stats[(name, str(v))].n]
        left.errorbar([p[0] for p in pts], [100 * p[1].mean for p in pts], yerr=[100 * p[1].std for p in pts],
                      marker="o", capsize=4, label=name)
    for i, (name, d) in enumerate(diffs.items()):
        pts = [(v * (1.04 ** i), d[str(v)]) for v in values if str(v) in d]
        err = [[100 * (p[1].mean - p[1].low) if p[1].n > 1 else 0 for p in pts],
               [100 * (p[1].high - p[1].mean) if p[1].n > 1 else 0 for p in pts]]
        right.errorbar([p[0] for p in pts], [100 * p[1].mean for p in pts], yerr=err, marker="s", capsize=4,
                       label=f"{name} − NLFT")
    right.axhline(0, color="black", linewidth=1)
    for ax, ylabel in ((left, "test accuracy (%)"), (right, "difference (percentage points)")):
        ax.set_xscale("log")
        ax.set_xticks(list(values))
        ax.set_xticklabels([f"{v:g}" for v in values])
        ax.minorticks_off()
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    from experiments.pretrain import default_cache_dir

    p = argparse.ArgumentParser(prog="python -m experiments.axes", description=__doc__.split("\n\n")[0])
    p.add_argument("--axes", nargs="+", choices=sorted(AXES), default=list(AXES))
    p.add_argument("--methods", nargs="+", choices=METHODS, default=["taft_head", "nlft"])
    p.add_argument("--epsilon", type=float, default=3.0)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--out", type=Path, default=Path("results") / "axes")
    p.add_argument("--default-dir", type=Path, default=None,
                   help="sweep directory of the default point (default OUT/default); e.g. the main sweep's --out, "
                        "whose runs at this ε and these seeds are then reused")
    p.add_argument("--cache-dir", type=Path, default=default_cache_dir(), help="where pretrained backbones are kept")
    p.add_argument("--report-only", action="store_true", help="only rewrite summary.md and the figures")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run every point not yet done (each a resumable sweep), then write the summary and figures."""
    args = parse_args(argv)
    default_dir = args.default_dir or args.out / "default"
    if not args.report_only:
        for (axis, value), name in points(args.axes).items():
            code = sw.main(sweep_argv(axis, value, args, default_dir if name == "default" else args.out / name))
            if code:
                return code
    args.out.mkdir(parents=True, exist_ok=True)
    write_outputs(args.out, args, default_dir)
    print(f"done: {args.out / 'summary.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
