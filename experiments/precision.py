"""bf16 against fp32 on the default task: accuracy with paired seeds, and wall time.

    python -m experiments.precision [--out results/precision] [--seeds 0 1 2] [--epsilon 3]

Runs the sweep (``experiments/sweep.toml``, tuned settings) into ``OUT/fp32/`` and
``OUT/bf16/`` (``--set precision=bf16``), seed by seed alternating, for TAFT-2 head first and
NLFT-2 at one target ε,
with ``--reproducible``: a seed fixes the head, the Poisson batches and the noise, so each
bf16 run is paired with the fp32 run that saw the same batches and noise, and their
difference is the precision's alone. Resumable (each sweep is). Writes ``OUT/summary.md``:
accuracy per precision (mean ± std) and the paired bf16 − fp32 difference with a 95 % t
interval. Speed is not measured here (``experiments.bench_throughput`` does, on a GPU): on a
CPU shared with other jobs the runs' wall times say more about the load than the precision.

The seeds are written in the outputs: these runs are measurements, not private releases.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

from experiments import results as res
from experiments import sweep as sw
from experiments.sweep_outputs import CSV_NAME

__all__ = ["main", "summary"]

PRECISIONS = ("fp32", "bf16")
METHODS = ("taft_head", "nlft")


def _run_sweeps(out: Path, seeds: Sequence[int], epsilon: float, threads: int | None) -> None:
    """Seed by seed, fp32 then bf16: a run cut short leaves whole pairs."""
    for seed in seeds:
        for precision in PRECISIONS:
            argv = ["--out", str(out / precision), "--methods", *METHODS, "--blocks", "2", "--epsilons", str(epsilon),
                    "--seeds", str(seed), "--reproducible", "--quiet", "--no-progress",
                    "--set", f"precision={precision}"]
            if threads:
                argv += ["--threads", str(threads)]
            if sw.main(argv) != 0:
                raise SystemExit(f"the {precision} sweep failed; see {out / precision}")


def summary(out: Path) -> str:
    """summary.md's text from ``OUT/<precision>/results.csv``."""
    rows = [{**r, "precision": p} for p in PRECISIONS for r in res.read_rows(out / p / CSV_NAME)]
    lines = ["# bf16 against fp32 on the default task", "",
             "Same seeds, batches and noise per pair (`--reproducible`); accuracy (%) on the private task's test set.",
             "", "| method | fp32 | bf16 | bf16 − fp32 (points, 95 % t interval) |", "|:---|---:|---:|---:|"]
    for method in METHODS:
        mine = [r for r in rows if r["method"] == method and r["status"] == "ok"]
        acc = {p: [100 * float(r["accuracy"]) for r in mine if r["precision"] == p] for p in PRECISIONS}
        diff = res.paired_differences(mine, "bf16", "fp32", group="precision", by="method", pair="seed",
                                      value="accuracy").get(method)
        cells = ["—" if not v else f"{v[0]:.1f} (n=1)" if len(v) == 1 else
                 f"{statistics.mean(v):.1f} ± {statistics.stdev(v):.1f} (n={len(v)})" for v in acc.values()]
        lines.append(f"| {mine[0]['label'] if mine else method} | {' | '.join(cells)} | "
                     f"{diff.text(scale=100) if diff else '—'} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.precision", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("results/precision"))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epsilon", type=float, default=3.0)
    p.add_argument("--threads", type=int, help="torch intra-op threads")
    p.add_argument("--report-only", action="store_true", help="only rewrite summary.md")
    args = p.parse_args(argv)
    if not args.report_only:
        _run_sweeps(args.out, args.seeds, args.epsilon, args.threads)
    text = summary(args.out)
    (args.out / "summary.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
