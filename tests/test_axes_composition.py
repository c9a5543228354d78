"""experiments.axes (points, command lines, outputs) and experiments.composition (smoke run)."""

from __future__ import annotations

import argparse

import pytest

from experiments import axes, composition
from experiments import results as res
from experiments import sweep_config as sc
from experiments.sweep_outputs import COLUMNS, CSV_NAME

pytest.importorskip("matplotlib")


def test_axis_points_share_the_default_and_scale_batches_with_n(tmp_path):
    pts = axes.points(list(axes.AXES))
    assert sum(name == "default" for name in pts.values()) == 3  # one per axis, one directory
    assert list(pts.values())[-3:] == ["default"] * 3  # last: a main sweep running alongside has finished it
    args = argparse.Namespace(methods=["taft", "nlft"], epsilon=3.0, seeds=[0, 1], cache_dir=tmp_path)
    _, hparams, _ = sc.load_config(sc.DEFAULT_CONFIG, "default")
    argv = axes.sweep_argv("size", 1000, args, tmp_path / "p")
    assert argv[argv.index("--private-train-size") + 1] == "1000"
    for m in ("taft", "nlft"):
        assert f"--set={m}.batch_size={max(1, round(hparams[m]['batch_size'] / 10))}" in argv
    assert axes.sweep_argv("k", 4, args, tmp_path / "p")[-2:] == ["--blocks", "4"]
    assert "--blocks" not in axes.sweep_argv("k", 2, args, tmp_path / "p")
    assert "--checkpoint" not in axes.sweep_argv("backbone", 8, args, tmp_path / "p")


def test_axis_outputs_pair_taft_with_nlft_by_seed(tmp_path):
    for name, acc in (("default", {"taft": (0.80, 0.82), "nlft": (0.85, 0.86)}),
                      ("k-1", {"taft": (0.78, 0.79), "nlft": (0.80, 0.83)})):
        for method, values in acc.items():
            for seed, a in enumerate(values):
                res.append_row(tmp_path / name / CSV_NAME, {
                    "run_id": f"{method}_{seed}", "method": method, "k": 2, "label": method, "seed": seed,
                    "target_epsilon": 3.0, "accuracy": a, "status": "ok"}, COLUMNS)
    res.append_row(tmp_path / "default" / CSV_NAME, {  # another ε in the default directory: left out
        "run_id": "nlft_eps8", "method": "nlft", "k": 2, "label": "nlft", "seed": 0, "target_epsilon": 8.0,
        "accuracy": 0.1, "status": "ok"}, COLUMNS)
    args = argparse.Namespace(axes=["k"], methods=["taft", "nlft"], epsilon=3.0, seeds=[0, 1], cache_dir=tmp_path)
    axes.write_outputs(tmp_path, args, tmp_path / "default")
    text = (tmp_path / "summary.md").read_text()
    d = res.Difference.of([0.80 - 0.85, 0.82 - 0.86])
    assert f"| TAFT − NLFT | {res.Difference.of([-0.02, -0.04]).text(100)} | {d.text(100)} | — |" in text
    assert (tmp_path / "axis_k.png").read_bytes()[:4] == b"\x89PNG"


def test_composition_smoke(tmp_path):
    out = tmp_path / "c"
    assert composition.main(["--profile", "smoke", "--seeds", "0", "--out", str(out)]) == 0
    rows = res.read_rows(out / "results.csv")
    assert {(r["method"], r["combination"]) for r in rows} == {
        ("taft", "average Δw"), ("taft", "output ensemble"), ("nlft", "average weights"), ("nlft", "output ensemble")}
    assert all(r["status"] == "ok" and float(r["epsilon"]) <= 8.0 + 1e-9 for r in rows)
    taft = {r["combination"]: float(r["accuracy"]) for r in rows if r["method"] == "taft"}
    assert taft["average Δw"] == pytest.approx(taft["output ensemble"], abs=1e-3)  # linearity: one model = ensemble
    assert "NLFT: average weights" in (out / "summary.md").read_text()
    # resumed: nothing is retrained
    assert composition.main(["--profile", "smoke", "--seeds", "0", "--out", str(out)]) == 0
    assert len(res.read_rows(out / "results.csv")) == len(rows)


def test_average_weights_averages_only_trainable_parameters():
    import torch

    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    for m in (a, b):
        m.bias.requires_grad_(False)  # frozen: shared by construction in real models, kept from the first
    avg = composition.average_weights([a, b])
    assert torch.allclose(avg.weight, (a.weight + b.weight) / 2)
    assert torch.equal(avg.bias, a.bias) and not torch.equal(avg.bias, b.bias)
