"""The sweep's result files: the results.csv schema, and summary.md and the plot rewritten from results.csv."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from experiments import results as res
from experiments.plots import plot_curves
from experiments.sweep_config import METHODS

__all__ = ["COLUMNS", "CSV_NAME", "PLOT_NAME", "SUMMARY_NAME", "difference_table", "randomness_notes",
           "write_outputs"]

#: results.csv schema, one row per run attempt (the last row of a run_id is the one that counts).
COLUMNS = (
    "run_id", "method", "k", "label", "seed", "randomness", "target_epsilon", "epsilon", "delta", "sigma",
    "sample_rate", "steps", "accuracy", "wall_time_s", "report", "status", "error",
    "dataset", "model", "n_train", "n_test", "epochs", "batch_size", "lr", "optimizer", "max_grad_norm", "loss",
    "settings", "finished_at",
)
CSV_NAME, SUMMARY_NAME, PLOT_NAME = "results.csv", "summary.md", "privacy_utility.png"


def _label_order(rows: Sequence[res.Row]) -> list[str]:
    def key(r: res.Row) -> tuple[int, int]:
        m = r["method"]
        return (METHODS.index(m) if m in METHODS else len(METHODS), int(r["k"] or 0))

    return list(dict.fromkeys(r["label"] for r in sorted(rows, key=key)))


def difference_table(rows: Sequence[res.Row], cols: Sequence[str]) -> list[str]:
    """Markdown lines: TAFT-k (and head first) minus NLFT-k per ε, paired by seed, with 95% t intervals."""
    lines = []
    for k in sorted({r["k"] for r in rows if r["method"] == "nlft"}, key=int):
        for method in ("taft", "taft_head"):
            a = next((r["label"] for r in rows if r["method"] == method and r["k"] == k), None)
            if a is None:
                continue
            diffs = res.paired_differences(rows, a, f"NLFT-{k}", group="label", by="target_epsilon", pair="seed",
                                           value="accuracy")
            lines.append(f"| {a} − NLFT-{k} | " + " | ".join(diffs[c].text(100) if c in diffs else "—" for c in cols)
                         + " |")
    if not lines:
        return []
    return ["Paired difference in test accuracy (percentage points), same seed, mean [95% t interval] (n pairs):",
            "", "| difference | " + " | ".join(res.epsilon_label(c) for c in cols) + " |",
            "|:---|" + "---:|" * len(cols), *lines, ""]


def randomness_notes(rows: Sequence[res.Row]) -> list[str]:
    """Markdown lines saying whether the runs' training randomness was secret or seeded."""
    kinds = {r.get("randomness") or "seeded" for r in rows}  # rows from before the column were seeded
    if kinds == {"secret"}:
        return ["Training randomness (noise, Poisson batches): secret, from the OS CSPRNG; the seeds above only "
                "label replicates and initialise the heads.", ""]
    return ["**Training randomness was seeded with the seeds above** (reproducible runs, for experiments): "
            "anyone who reads these seeds can replay the noise, so the stated ε does not hold against them.", ""]


def _profile_notes(out: Path) -> list[str]:
    """A warning when the last invocation ran a smoke-sized profile."""
    log = out / "invocations.jsonl"
    lines = log.read_text().splitlines() if log.exists() else []
    profile = json.loads(lines[-1]).get("profile") if lines else None
    if profile not in ("quick", "smoke"):
        return []
    return [f"**Profile {profile!r}: a smoke-sized run** (little data, few steps, one seed). It checks that every "
            "method runs end to end; its ranking of the methods is not indicative of the full sweep's.", ""]


def write_outputs(out: Path) -> list[dict[str, str]]:
    """(Re)write summary.md and privacy_utility.png from results.csv; returns the counted rows."""
    rows = list(res.latest(res.read_rows(out / CSV_NAME), ("run_id",)).values())
    if not rows:
        return []
    order = _label_order(rows)
    seeds = sorted({r["seed"] for r in rows}, key=int)
    cols = sorted({r["target_epsilon"] for r in rows}, key=float)
    one = lambda c: ", ".join(sorted({r[c] for r in rows if r[c]})) or "—"  # noqa: E731
    private = [r for r in rows if r["delta"]]
    lines = [
        "# Privacy-utility sweep",
        "",
        f"Test accuracy (%) on the private task, mean ± std over seeds {', '.join(seeds)} "
        f"(sample std; n shown where fewer runs succeeded). Data set: {one('dataset')}, model: {one('model')}, "
        f"N = {one('n_train')} private training examples, {one('n_test')} test examples, "
        f"δ = {', '.join(sorted({r['delta'] for r in private})) or '—'}; columns are target ε "
        "(every reported ε is at most its target; see results.csv and reports/).",
        "",
        res.markdown_table(rows, row="label", col="target_epsilon", value="accuracy", row_order=order,
                           col_order=cols, col_label=res.epsilon_label, corner="method", scale=100, digits=1,
                           expected_n=len(seeds)),
        "Mean wall time per run (s):",
        "",
        res.markdown_table(rows, row="label", col="target_epsilon", value="wall_time_s", row_order=order,
                           col_order=cols, col_label=res.epsilon_label, corner="method", digits=0),
    ]
    lines += difference_table(rows, cols) + randomness_notes(rows) + _profile_notes(out)
    failed = [r for r in rows if r["status"] != "ok"]
    if failed:
        lines += ["Failed runs:", ""] + [f"- `{r['run_id']}`: {r['error']}" for r in failed] + [""]
    (out / SUMMARY_NAME).write_text("\n".join(lines))
    plot_curves(out / PLOT_NAME, rows, x="target_epsilon", y="accuracy", group="label", group_order=order,
                xlabel="target ε (log scale)", ylabel="test accuracy (%)", scale=100,
                title=f"Privacy-utility trade-off ({one('dataset')}, N = {one('n_train')}, "
                      + (f"mean ± std over {len(seeds)} seeds)" if len(seeds) > 1 else "1 seed)"),
                inf_label="∞\n(non-private)")
    return rows

