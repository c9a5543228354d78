"""experiments.closeness: the public sample holds no private example, its fractions, the boundary, a smoke run."""

from __future__ import annotations

import math

import pytest
import torch

from experiments import axes, closeness
from experiments import results as res
from experiments.data import default_task, load_fashion_mnist, private_indices, public_split
from experiments.pretrain import pretrain
from experiments.sweep_outputs import COLUMNS, CSV_NAME

pytest.importorskip("matplotlib")

SIZES = (1000, 2500, 5000, 10000)  # the default grid's N, at the sweep's data_seed 0


def _shared(sample: torch.Tensor, n: int) -> tuple[int, int]:
    """(training indices, identical images) the public sample shares with the private training set of size n."""
    by_index = int(torch.isin(sample, private_indices(n, 0)).sum())
    private = default_task(n, seed=0).private_train.tensors[0]  # the very tensors the sweep fine-tunes on
    public = closeness.closeness_data(0.2, SIZES, 0, 0)[0].tensors[0][-sample.numel():]
    seen = {bytes(x.numpy().tobytes()) for x in private}
    return by_index, sum(bytes(x.numpy().tobytes()) in seen for x in public)


def test_public_sample_holds_no_private_example():
    sample = closeness.public_sample(0.2, SIZES, 0, 0)
    for n in SIZES:
        assert _shared(sample, n) == (0, 0)
    assert torch.isin(private_indices(1000, 0), private_indices(10000, 0)).all()  # nested: excluding 10k excludes all
    # the check has teeth: a sample that avoided another seed's private set overlaps this one, by index
    leaky = closeness.public_sample(0.2, SIZES, 1, 0)
    assert int(torch.isin(leaky, private_indices(10000, 0)).sum()) > 0


def test_fractions_are_shares_of_classes_5_to_9_and_nested():
    labels = load_fashion_mnist().train_labels
    samples = {c: closeness.public_sample(c, SIZES, 0, 0) for c in (0.0, 0.01, 0.05, 0.2)}
    assert {c: s.numel() for c, s in samples.items()} == {0.0: 0, 0.01: 300, 0.05: 1500, 0.2: 6000}
    assert all(bool(((labels[s] >= 5) & (labels[s] <= 9)).all()) for s in samples.values())
    assert torch.isin(samples[0.01], samples[0.05]).all() and torch.isin(samples[0.05], samples[0.2]).all()
    assert (labels[samples[0.2]].bincount(minlength=10)[5:] > 1000).all()  # every private class is represented
    train, test, width = closeness.closeness_data(0.05, SIZES, 0, 0)
    public_train, public_test = public_split()
    assert width == 10 and len(train) == 30000 + 1500
    assert torch.equal(train.tensors[0][:30000], public_train.tensors[0])
    assert torch.equal(train.tensors[1][:30000], public_train.tensors[1])
    assert torch.equal(train.tensors[1][30000:], labels[samples[0.05]])  # classes 5-9 keep their own labels
    assert torch.equal(test.tensors[1], public_test.tensors[1])
    with pytest.raises(ValueError, match="outside the private training sets"):
        closeness.public_sample(0.9, SIZES, 0, 0)


def _diffs(values: dict[str, list[float]]) -> dict[str, res.Difference]:
    return {e: res.Difference.of(d) for e, d in values.items()}


def test_boundary_on_made_up_differences():
    eps = ["1", "3", "8", "inf"]
    b = closeness.Boundary.of(_diffs({"1": [0.05, 0.06, 0.04], "3": [0.01, -0.005, 0.02],
                                      "8": [-0.02, -0.03, -0.01], "inf": [-0.04, -0.05, -0.03]}), eps)
    d3, d8 = 0.025 / 3, -0.02
    crossing = math.exp(math.log(3) + (math.log(8) - math.log(3)) * d3 / (d3 - d8))
    assert (b.ahead_to, b.sure_to, b.monotone, b.missing) == ("3", "1", True, ())
    assert b.crossing == pytest.approx(crossing)
    assert b.text() == f"ε ≤ 3 (0 at ε ≈ {crossing:.2g}); 95%: ε ≤ 1"
    everywhere = closeness.Boundary.of(_diffs({e: [0.01, 0.02] for e in eps}), eps)
    assert (everywhere.ahead_to, everywhere.crossing, everywhere.text()) == ("inf", None, "every ε; 95%: none")
    late = closeness.Boundary.of(_diffs({"1": [-0.01, -0.02], "3": [0.01, 0.02], "8": [0.01, 0.03]}), eps)
    assert (late.ahead_to, late.monotone, late.missing) == (None, False, ("inf",))
    assert late.text() == "none; 95%: none; ahead again at a larger ε; no pairs at ε = inf"
    gap = closeness.Boundary.of(_diffs({"1": [0.02, 0.03], "8": [-0.01, -0.02], "inf": [0.01, 0.02]}), eps)
    assert (gap.ahead_to, gap.missing, gap.monotone) == ("1", ("3",), False)  # what ran decides, the gap is said
    assert gap.crossing == pytest.approx(math.exp(math.log(8) * 0.025 / (0.025 + 0.015)))
    to_inf = closeness.Boundary.of(_diffs({"1": [0.02, 0.03], "3": [0.02, 0.03], "8": [0.01, 0.02],
                                           "inf": [-0.01, -0.02]}), eps)
    assert (to_inf.ahead_to, to_inf.crossing) == ("8", None)  # no log-interpolation towards ∞


def _made_up_rows(tmp_path, grid):
    """Results of every point of ``grid`` written where :func:`axes.point_rows` reads them: at c = 0 TAFT is
    ahead at ε = 1 only, at c = 1 % everywhere."""
    for c in grid["fractions"]:
        argv = closeness.point_argv(c, grid["sizes"][0], grid, tmp_path)
        for where, eps in axes._sweep_dirs(tmp_path / closeness.point_name(c, grid["sizes"][0]), argv,
                                           grid["methods"], grid["epsilons"]).items():
            for e in eps:
                for seed in grid["seeds"]:
                    for method, acc in (("taft_head", 0.80 + 0.01 * seed), ("nlft", 0.78 if e == 1 or c else 0.85)):
                        res.append_row(where / CSV_NAME, {
                            "run_id": f"{method}2_eps{e}_seed{seed}", "method": method, "k": 2, "label": method,
                            "seed": seed, "target_epsilon": e, "accuracy": acc + 0.002 * seed, "status": "ok",
                            "lr": 0.1, "wall_time_s": 5}, COLUMNS)


def test_summary_and_figure_from_a_made_up_table(tmp_path):
    grid = {**closeness.load_grid(closeness.CONFIG, "smoke"), "fractions": [0.0, 0.01], "seeds": [0, 1, 2]}
    _made_up_rows(tmp_path, grid)
    rows = closeness.write_outputs(grid, tmp_path, tmp_path)
    assert len(rows) == 2 * 2 * 2 * 3
    text = (tmp_path / "summary.md").read_text()
    assert "| 0 % | ε ≤ 1; 95%: ε ≤ 1 |" in text and "| 1 % | every ε; 95%: every ε |" in text
    assert "not pretrained yet" in text and "**A different task from the default one**" in text
    found = closeness.boundary_rows(rows, ["1", "inf"])
    assert found["0|128"][0]["1"].mean == pytest.approx(0.03)  # seeds 0, 1, 2: 0.80 + 0.01 s − 0.78 = 2, 3, 4 points
    assert (tmp_path / "boundary.png").read_bytes()[:4] == b"\x89PNG"


def test_smoke_run_resumes(tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    argv = ["--profile", "smoke", "--out", str(out), "--cache-dir", str(cache)]
    grid = closeness.load_grid(closeness.CONFIG, "smoke")
    assert closeness.main(argv) == 0
    rows = closeness.grid_rows(grid, out, cache)
    assert {(r["method"], r["target_epsilon"], r["status"]) for r in rows} == {
        (m, e, "ok") for m in ("taft_head", "nlft") for e in ("1", "inf")}
    state = torch.load(next(cache.glob("closeness_c0.01_*.pt")), weights_only=True)
    assert state["head.weight"].shape[0] == 10  # the pretraining head covers classes 0-9
    assert closeness.main(argv) == 0  # resumed: nothing runs again
    assert len(closeness.grid_rows(grid, out, cache)) == len(rows)
    assert "| 1 % | 300 (" in (out / "summary.md").read_text()
    assert closeness.main([*argv, "--sizes", "999"]) == 2  # outside the grid
    with pytest.raises(ValueError, match="classes or data"):
        pretrain(0, classes=[0, 1], data=closeness.closeness_data(0.01, [128], 0, 0))


def test_a_point_outside_the_grid_is_refused_with_the_grid_values(tmp_path, capsys):
    assert closeness.main(["--fractions", "5", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "'fractions': [5.0]" in err and "fractions: 0 0.01 0.05 0.2" in err and "0.05 = 5 %" in err
    assert not any(tmp_path.iterdir())  # refused before anything ran
