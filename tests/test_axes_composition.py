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
    assert axes.AXES["k"][0] == (1, 2, 3, 4, 5, 6)  # up to the default ViT's depth
    args = argparse.Namespace(methods=["taft", "nlft"], cache_dir=tmp_path)
    _, hparams, nonprivate = sc.load_config(sc.DEFAULT_CONFIG, "default")
    argv = axes.sweep_argv("size", 1000, args)
    assert argv[argv.index("--private-train-size") + 1] == "1000"
    for m in ("taft", "nlft"):
        assert f"--set={m}.batch_size={max(1, round(hparams[m]['batch_size'] / 10))}" in argv
    # the non-private runs' batch (tuned apart, maybe to another size) scales too: q stays the tuned run's
    for m in ("taft", "nlft"):
        tuned = {**hparams[m], **nonprivate[m]}["batch_size"]
        assert f"--set=nonprivate.{m}.batch_size={max(1, round(tuned / 10))}" in argv
    scaled_hp, scaled_np = sc.load_config(sc.DEFAULT_CONFIG, "default")[1:]
    sc.apply_sets(scaled_hp, [a.removeprefix("--set=") for a in argv if a.startswith("--set=")], scaled_np)
    for m in ("taft", "nlft"):
        tuned = {**hparams[m], **nonprivate[m]}["batch_size"]
        assert {**scaled_hp[m], **scaled_np[m]}["batch_size"] == max(1, round(tuned / 10))
        assert scaled_hp[m]["batch_size"] == max(1, round(hparams[m]["batch_size"] / 10))
    assert axes.sweep_argv("k", 6, args) == ["--blocks", "6"]
    assert axes.sweep_argv("k", 2, args) == []
    assert axes.sweep_argv("backbone", 8, args) == []


def test_settings_tag_separates_private_and_retuned_nonprivate_runs(tmp_path):
    methods, argv = ["taft_head", "nlft"], ["--blocks", "4"]
    dirs = axes._sweep_dirs(tmp_path, argv, methods, [3.0, float("inf"), 1.0])
    kinds = [(p.name.split("-")[0], e) for p, e in dirs.items()]
    assert kinds == [("private", [3.0, 1.0]), ("nonprivate", [float("inf")])]
    retuned = [*argv, "--set=nonprivate.nlft.lr=0.3"]  # what a re-tuned [nonprivate.nlft] amounts to
    assert axes.settings_tag(retuned, methods, True) == axes.settings_tag(argv, methods, True)
    assert axes.settings_tag(retuned, methods, False) != axes.settings_tag(argv, methods, False)
    assert axes.settings_tag([*argv, "--set=nlft.lr=0.3"], methods, True) != axes.settings_tag(argv, methods, True)


def _write_point(where, acc, epsilon=3.0):
    for method, values in acc.items():
        for seed, a in enumerate(values):
            res.append_row(where / CSV_NAME, {
                "run_id": f"{method}_eps{epsilon}_{seed}", "method": method, "k": 2, "label": method, "seed": seed,
                "target_epsilon": epsilon, "accuracy": a, "wall_time_s": 10 + seed, "status": "ok"}, COLUMNS)


def test_axis_outputs_pair_taft_with_nlft_by_seed_and_epsilon(tmp_path):
    methods, inf = ["taft", "nlft"], float("inf")
    args = argparse.Namespace(axes=["k"], methods=methods, epsilons=[3.0, inf], seeds=[0, 1], cache_dir=tmp_path,
                              out=tmp_path, default_dir=None)
    for name, value, acc in (("default", 2, {"taft": (0.80, 0.82), "nlft": (0.85, 0.86)}),
                             ("k-1", 1, {"taft": (0.78, 0.79), "nlft": (0.80, 0.83)})):
        argv = axes.sweep_argv("k", value, args)
        private, nonprivate = axes._sweep_dirs(tmp_path / name, argv, methods, args.epsilons)
        _write_point(private, acc)
        _write_point(private, {"nlft": (0.1, 0.1)}, epsilon=8.0)  # another ε in the directory: left out
        _write_point(nonprivate, {m: tuple(a + 0.05 for a in v) for m, v in acc.items()}, epsilon=inf)
    axes.write_outputs(args)
    text = (tmp_path / "summary.md").read_text()
    d = res.Difference.of([0.80 - 0.85, 0.82 - 0.86])
    row = f"| {res.Difference.of([-0.02, -0.04]).text(100)} | {d.text(100)} | — | — | — | — |"
    assert f"| TAFT − NLFT, ε = 3 {row}" in text
    assert f"| TAFT − NLFT, ∞ (non-private) {row}" in text
    times = text.split("Mean wall time per run (s):")[1]
    assert "| TAFT, ε = 3 | 10 ± 1 | 10 ± 1 | — | — | — | — |" in times
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


def test_values_runs_only_the_named_points_of_an_axis(tmp_path, monkeypatch):
    ran = []
    monkeypatch.setattr(axes, "run_point", lambda point, argv, *a, **k: ran.append((point.name, argv)) or 0)
    monkeypatch.setattr(axes, "write_outputs", lambda args: None)
    assert axes.main(["--axes", "k", "--values", "6", "1", "--out", str(tmp_path)]) == 0
    assert ran == [("k-1", ["--blocks", "1"]), ("k-6", ["--blocks", "6"])]
    ran.clear()
    assert axes.main(["--axes", "k", "--out", str(tmp_path)]) == 0
    assert [name for name, _ in ran] == ["k-1", "k-3", "k-4", "k-5", "k-6", "default"]
    with pytest.raises(SystemExit):  # a value on none of the chosen axes runs nothing: refused
        axes.main(["--axes", "k", "--values", "7", "--out", str(tmp_path)])
