"""Where TAFT wins or loses: the TAFT − NLFT gap against backbone strength, data size and k.

``python -m experiments.axes`` runs the sweep (tuned settings, ``experiments/sweep.toml``)
at the target ε of ``--epsilons`` (default 3; ``inf`` = non-private) and 2 seeds for TAFT-k's
best variant and NLFT-k at the points of three axes (best by the public proxy of
:mod:`experiments.tune`: head first, 92.8 % against 91.8 % for TAFT-k around a fresh head;
``--methods taft taft_head nlft`` runs both), each varied alone around the default (backbone
pretrained 8 epochs, N = 10,000, k = 2), a point shared by the axes and run once:

* ``backbone``: the public backbone pretrained for 2, 8 or 16 epochs (same deterministic
  recipe, :mod:`experiments.pretrain`; missing checkpoints are pretrained into its cache,
  about 30 s per epoch on 2 cores);
* ``size``: N = 1,000, 10,000 or 30,000 private examples, each method's batch size scaled
  by N / 10,000 so that q, the steps and σ stay those of the tuned run;
* ``k``: 1 to 6 linearised / fine-tuned blocks (6 = the default ViT's depth: TAFT-6's frozen
  prefix is the patch and position embedding alone, NLFT-6 trains every block, the final norm
  and the head, 99.3 % of the weights, all but the embeddings).

Outputs in ``--out`` (default ``results/axes/``): one directory per point (``<axis>-<value>/``),
holding one resumable sweep for its private runs (``private-<tag>/``) and one for its
non-private runs (``nonprivate-<tag>/``), tag = a fingerprint of the settings the runs take
(:func:`settings_tag`, the tuned file read at run time), so a re-tuned file starts new
sweeps instead of clashing with runs made under the old one (``--default-dir`` instead
reuses one sweep directory, e.g. the main sweep's, for the default point); ``summary.md``
(accuracy per method and ε, mean wall time per run, and the paired TAFT − NLFT difference
with 95% t intervals, per axis) and ``axis_<axis>.png`` (accuracy per method, and the
difference, against the axis).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from experiments import results as res
from experiments import sweep as sw
from experiments import sweep_config as sc
from experiments.sweep_outputs import CSV_NAME

__all__ = ["AXES", "main", "point_rows", "points", "run_point", "settings_tag", "size_argv"]

#: axis -> (values, the default's value, x label)
AXES: dict[str, tuple[tuple[int, ...], int, str]] = {
    "backbone": ((2, 8, 16), 8, "public pretraining epochs of the backbone"),
    "size": ((1000, 10000, 30000), 10000, "private training examples N"),
    "k": ((1, 2, 3, 4, 5, 6), 2, "k (blocks linearised / fine-tuned)"),
}
METHODS = ("taft", "taft_head", "nlft")
NAMES = {"taft": "TAFT", "taft_head": "TAFT (head first)", "nlft": "NLFT"}


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


def size_argv(n: int, methods: Sequence[str], profile: str = "default") -> list[str]:
    """Sweep options for N = ``n`` private examples: each method's batch size of the sweep config's
    ``profile``, private and non-private (their tuned batches differ), scaled by ``n`` / the
    profile's N, so that q and the steps stay the tuned run's (and σ, when private)."""
    sweep, hparams, nonprivate = sc.load_config(sc.DEFAULT_CONFIG, profile)
    scale = n / sweep["private_train_size"]

    def scaled(batch: int) -> int:
        return max(1, round(batch * scale))

    return ["--private-train-size", str(n),
            *(f"--set={m}.batch_size={scaled(hparams[m]['batch_size'])}" for m in methods),
            *(f"--set=nonprivate.{m}.batch_size="
              f"{scaled(sc.method_hparams(hparams, nonprivate, m, private=False)['batch_size'])}" for m in methods)]


def sweep_argv(axis: str, value: int, args: argparse.Namespace) -> list[str]:
    """The sweep options that place one point of ``axis`` (ε, seeds and --out are :func:`run_point`'s)."""
    if axis == "backbone":
        path = backbone_checkpoint(value, args.cache_dir)
        return ["--checkpoint", str(path)] if path else []
    if axis == "size":
        return size_argv(value, args.methods)
    return ["--blocks", str(value)] if axis == "k" and value != AXES["k"][1] else []


def settings_tag(argv: Sequence[str], methods: Sequence[str], private: bool) -> str:
    """8 hex digits of the sha256 of the hyperparameters ``methods`` take under the sweep options
    ``argv`` (--profile, --set) with the tuned file as it reads now, non-private overrides
    included when not ``private``: which settings a directory's runs were made with."""
    profile = argv[argv.index("--profile") + 1] if "--profile" in argv else "default"
    _, hparams, nonprivate = sc.load_config(sc.DEFAULT_CONFIG, profile)
    sc.apply_sets(hparams, [a.removeprefix("--set=") for a in argv if a.startswith("--set=")], nonprivate)
    chosen = {m: sc.method_hparams(hparams, nonprivate, m, private=private) for m in methods}
    return hashlib.sha256(json.dumps(chosen, sort_keys=True, default=str).encode()).hexdigest()[:8]


def _sweep_dirs(point: Path, argv: Sequence[str], methods: Sequence[str],
                epsilons: Sequence[float]) -> dict[Path, list[float]]:
    """{sweep directory: its target ε}: private and non-private runs apart, each under its settings tag."""
    dirs: dict[Path, list[float]] = {}
    for private in (True, False):
        eps = [e for e in epsilons if math.isfinite(e) == private]
        if eps:
            kind = "private" if private else "nonprivate"
            dirs[point / f"{kind}-{settings_tag(argv, methods, private)}"] = eps
    return dirs


def run_point(point: Path, argv: Sequence[str], methods: Sequence[str], epsilons: Sequence[float],
              seeds: Sequence[int], *, fixed: bool = False) -> int:
    """Run (resume) the sweeps of one point: options ``argv`` at ``epsilons`` and ``seeds``, into
    :func:`_sweep_dirs` of ``point`` (``fixed``: into ``point`` itself); the first nonzero exit code, or 0."""
    dirs = {point: list(epsilons)} if fixed else _sweep_dirs(point, argv, methods, epsilons)
    for where, eps in dirs.items():
        code = sw.main([*argv, "--methods", *methods, "--epsilons", *map(str, eps), "--seeds", *map(str, seeds),
                        "--out", str(where), "--quiet", "--no-progress"])
        if code:
            return code
    return 0


def point_rows(point: Path, argv: Sequence[str], methods: Sequence[str], epsilons: Sequence[float],
               seeds: Sequence[int], *, fixed: bool = False) -> list[dict[str, Any]]:
    """The counted sweep rows of ``methods`` at ``epsilons`` and ``seeds`` in the point's current
    sweep directories (:func:`run_point`), each with the column ``name`` (the method's)."""
    dirs = [point] if fixed else list(_sweep_dirs(point, argv, methods, epsilons))
    return [{**r, "name": NAMES[r["method"]]} for where in dirs
            for r in res.latest(res.read_rows(where / CSV_NAME), ("run_id",)).values()
            if r["method"] in methods and float(r["target_epsilon"]) in epsilons and int(r["seed"]) in seeds]


def _rows(axis: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The counted rows of every point of ``axis``, with the columns ``axis_value`` and ``name``
    (the method's, and the ε when there are several)."""
    rows = []
    for (_, value), name in points([axis]).items():
        fixed = name == "default" and args.default_dir is not None
        where = args.default_dir if fixed else args.out / name
        for r in point_rows(where, sweep_argv(axis, value, args), args.methods, args.epsilons, args.seeds,
                            fixed=fixed):
            eps = res.epsilon_label(r["target_epsilon"]) if len(args.epsilons) > 1 else ""
            rows.append({**r, "axis_value": str(value), "name": _name(r["method"], eps)})
    return rows


def _name(method: str, eps_label: str) -> str:
    """A table row's name: the method's, and its ε when a table has several ("" = one)."""
    return f"{NAMES[method]}, {eps_label}" if eps_label else NAMES[method]


def _names(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    """(row name, its NLFT's row name, the difference's name) per method and ε, in table order."""
    eps = [res.epsilon_label(res.format_number(e)) for e in args.epsilons] if len(args.epsilons) > 1 else [""]
    return [(_name(m, e), _name("nlft", e), f"{NAMES[m]} − {_name('nlft', e)}") for e in eps for m in METHODS
            if m in args.methods]


def write_outputs(args: argparse.Namespace) -> None:
    """(Re)write summary.md and one figure per axis (``args.axes``) in ``args.out`` from the points' results."""
    eps = ", ".join(res.epsilon_label(res.format_number(e)) for e in args.epsilons)
    lines = ["# TAFT against NLFT along three axes", "",
             f"Test accuracy (%) on the private task at target {eps}, mean ± std over seeds "
             f"{', '.join(map(str, args.seeds))}, and the paired difference (percentage points, same seed) with its "
             "95% t interval. Each axis varies alone around the default (backbone pretrained 8 epochs, "
             "N = 10,000, k = 2). Wall times are per run on a shared 2-core machine, one thread (indicative).", ""]
    for axis in args.axes:
        rows = _rows(axis, args)
        if not rows:
            continue
        values, _, xlabel = AXES[axis]
        cols = [str(v) for v in values]
        if axis == "backbone":
            accs = ", ".join(f"{v} epochs: {100 * backbone_accuracy(v, args.cache_dir):.1f}%" for v in values)
            lines += [f"Public test accuracy of the backbones (classes 0-4, their pretraining head): {accs}.", ""]
        present = [names for names in _names(args) if any(r["name"] == names[0] for r in rows)]
        order = [a for a, _, _ in present]
        lines += [f"## {axis}: {xlabel}", "",
                  res.markdown_table(rows, row="name", col="axis_value", value="accuracy", row_order=order,
                                     col_order=cols, corner="method", scale=100, expected_n=len(args.seeds)),
                  "Mean wall time per run (s):", "",
                  res.markdown_table(rows, row="name", col="axis_value", value="wall_time_s", row_order=order,
                                     col_order=cols, corner="method", digits=0)]
        diffs = {d: res.paired_differences(rows, a, b, group="name", by="axis_value", pair="seed", value="accuracy")
                 for a, b, d in present if a != b}
        lines += ["| difference | " + " | ".join(cols) + " |", "|:---|" + "---:|" * len(cols)]
        lines += [f"| {a} | " + " | ".join(d[c].text(100) if c in d else "—" for c in cols) + " |"
                  for a, d in diffs.items()]
        lines.append("")
        plot_axis(args.out / f"axis_{axis}.png", rows, order, diffs, values, xlabel)
    (args.out / "summary.md").write_text("\n".join(lines))


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
                       label=name)
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
    p.add_argument("--values", nargs="+", type=int, default=None,
                   help="run only the points with these values of the axes now (e.g. --axes k --values 6); "
                        "the summary still covers every point")
    p.add_argument("--epsilons", nargs="+", type=float, default=[3.0], help="target ε; inf = non-private")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--out", type=Path, default=Path("results") / "axes")
    p.add_argument("--default-dir", type=Path, default=None,
                   help="one sweep directory for every run of the default point (default: OUT/default's tagged "
                        "sweeps); e.g. the main sweep's --out, whose runs at these ε and seeds are then reused")
    p.add_argument("--cache-dir", type=Path, default=default_cache_dir(), help="where pretrained backbones are kept")
    p.add_argument("--report-only", action="store_true", help="only rewrite summary.md and the figures")
    args = p.parse_args(argv)
    on_axes = {v for a in args.axes for v in AXES[a][0]}
    if args.values is not None and set(args.values) - on_axes:
        p.error(f"--values {sorted(set(args.values) - on_axes)} on none of the axes {args.axes} "
                f"(their values: {sorted(on_axes)})")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run every point not yet done (each a resumable sweep), then write the summary and figures."""
    args = parse_args(argv)
    if not args.report_only:
        for (axis, value), name in points(args.axes).items():
            if args.values is not None and value not in args.values:
                continue
            fixed = name == "default" and args.default_dir is not None
            code = run_point(args.default_dir if fixed else args.out / name, sweep_argv(axis, value, args),
                             args.methods, args.epsilons, args.seeds, fixed=fixed)
            if code:
                return code
    args.out.mkdir(parents=True, exist_ok=True)
    write_outputs(args)
    print(f"done: {args.out / 'summary.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
