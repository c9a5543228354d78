"""experiments.shards end to end: ``--smoke`` outputs, privacy of every row, resume, config errors.

Like tests/test_sweep.py, the run uses a randomly initialised default ViT passed as
``--checkpoint`` (no pretraining needed) and runs in process.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from experiments import results as res
from experiments import shards
from experiments import sweep as sw

pytest.importorskip("matplotlib")


@pytest.fixture(autouse=True, scope="module")
def _restore_threads():
    """The runs use --threads 1 (tiny batches: 1 thread is faster, and far faster on a busy machine)."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _smoke(out: Path, backbone_file: Path, *extra: str) -> int:
    return shards.main(["--smoke", "--checkpoint", str(backbone_file), "--out", str(out), "--quiet",
                        "--threads", "1", *extra])


@pytest.fixture(scope="module")
def smoke_out(tmp_path_factory, backbone_file) -> Path:
    out = tmp_path_factory.mktemp("shards") / "smoke"
    assert _smoke(out, backbone_file) == 0
    return out


def test_smoke_outputs_and_privacy(smoke_out):
    for name in (shards.CSV_NAME, shards.SUMMARY_NAME, shards.PLOT_NAME):
        assert (smoke_out / name).stat().st_size > 0, name
    rows = res.read_rows(smoke_out / shards.CSV_NAME)
    settings, _, _ = shards.load_config(shards.DEFAULT_CONFIG, "smoke")
    expected = {shards.run_id(n, float(e), s)
                for n in settings["n_shards"] for e in settings["epsilons"] for s in settings["seeds"]}
    assert {r["run_id"] for r in rows} == expected and len(rows) == len(expected)
    for r in rows:
        assert r["status"] == "ok", r["error"]
        target, eps = float(r["target_epsilon"]), float(r["epsilon"])
        per_shard = [float(e) for e in r["per_shard_epsilon"].split(";")]
        assert len(per_shard) == int(r["n_shards"]) == len(r["shard_sizes"].split(";"))
        assert eps <= target and eps == pytest.approx(max(per_shard), rel=1e-3)
        if math.isfinite(target):
            assert float(r["delta"]) == settings["delta"]
            saved = json.loads((smoke_out / "reports" / f"{r['run_id']}.json").read_text())
            # written after the removal: releasing the models from before and after it composes
            assert saved["all_releases_epsilon"] > saved["epsilon"] == pytest.approx(eps, rel=1e-3)
            assert "before and after" in saved["statement"]
        assert 0 <= float(r["accuracy"]) <= 1 and 0 <= float(r["accuracy_after_removal"]) <= 1
        # batch per shard keeps the unsharded sample rate; removal retrains exactly one shard
        assert int(r["batch_size_per_shard"]) == round(int(r["batch_size"]) / int(r["n_shards"]))
        assert len(r["retrained_shard"].split(";")) == 1
        assert float(r["removal_wall_time_s"]) > 0 and float(r["full_retrain_time_s"]) > 0
    summary = (smoke_out / shards.SUMMARY_NAME).read_text()
    assert "| shards | ε = 8 | ∞ (non-private) |" in summary and "remove 1 example (s)" in summary


def test_resume_skips_finished_rows_and_refuses_other_settings(smoke_out, backbone_file, monkeypatch):
    before = (smoke_out / shards.CSV_NAME).read_text()

    def boom(*args, **kwargs):
        raise AssertionError("a finished configuration was rerun")

    monkeypatch.setattr(shards, "fit_shards", boom)
    assert _smoke(smoke_out, backbone_file) == 0
    assert (smoke_out / shards.CSV_NAME).read_text() == before
    assert _smoke(smoke_out, backbone_file, "--set", "lr=0.25") == 2  # other settings: refused, not mixed


def test_config_errors(tmp_path, backbone_file):
    bad = tmp_path / "bad.toml"
    bad.write_text(shards.DEFAULT_CONFIG.read_text().replace("shard_key = 0", "shard_kee = 0"))
    with pytest.raises(ValueError, match="unknown key"):
        shards.load_config(bad, "smoke")
    # delta must be below 1 / (smallest shard size)
    assert _smoke(tmp_path / "o", backbone_file, "--n-shards", "64", "--delta", "0.1") == 2


def test_quick_profile_resolves():
    settings, hp, nonprivate = shards.load_config(shards.DEFAULT_CONFIG, "quick")
    assert settings["n_shards"] == [1, 2, 4] and settings["seeds"] == [0]
    _, sweep_hp, sweep_nonprivate = sw.load_config(sw.DEFAULT_CONFIG, "default")  # with the tuned file
    assert hp["epochs"] == 1 and hp["batch_size"] == 200 and nonprivate == sweep_nonprivate["taft"]
    default, hp_default, _ = shards.load_config(shards.DEFAULT_CONFIG, "default")
    assert default["n_shards"] == [1, 2, 4, 8] and default["private_train_size"] == 10000
    assert default["delta"] == 1e-5 and math.isinf(default["epsilons"][-1])
    assert hp_default == sweep_hp["taft"]  # the sweep's (tuned) TAFT settings


def test_smoke_runs_its_shards_across_two_torchrun_ranks(tmp_path, backbone_file):
    """Under torchrun, rank r trains the shards s ≡ r (mod 2); rank 0 alone writes the outputs."""
    import os
    import subprocess
    import sys

    out = tmp_path / "ddp"
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "experiments.shards", "--smoke", "--checkpoint", str(backbone_file), "--out", str(out),
                          "--quiet", "--threads", "1", "--epsilons", "8", "--n-shards", "2"],
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = res.read_rows(out / shards.CSV_NAME)
    assert [r["run_id"] for r in rows] == ["shards2_eps8_seed0"]  # one row: the other rank wrote nothing
    assert rows[0]["status"] == "ok" and float(rows[0]["epsilon"]) <= 8.0
    assert len(rows[0]["per_shard_epsilon"].split(";")) == 2
