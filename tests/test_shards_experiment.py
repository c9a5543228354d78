"""experiments.shards end to end: ``--smoke`` outputs, privacy of every row, resume, config errors.

Like tests/test_sweep.py, the run uses a randomly initialised default ViT passed as
``--checkpoint`` (no pretraining needed) and runs in process.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import accounting
import pytest
import torch

import dp_taft
from dp_taft.methods import linear_probe
from dp_taft.shards import ShardAssignment, content_ids
from experiments import results as res
from experiments import shards, shards_privacy, shards_regenerate
from experiments import sweep_config as sc
from experiments.task import build_task
from fit_cases import easy_dataset, permission_modes, tiny_vit

pytest.importorskip("matplotlib")

PUBLISHED = sorted((Path(__file__).resolve().parents[1] / "docs").glob("shards*/"))


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
    assert "removed_id" not in rows[0]  # a content id is a hash of a private example
    for r in rows:
        assert r["status"] == "ok", r["error"]
        target, eps = float(r["target_epsilon"]), float(r["epsilon"])
        per_shard = [float(e) for e in r["per_shard_epsilon"].split(";")]
        assert len(per_shard) == int(r["n_shards"]) == len(r["shard_sizes"].split(";"))
        assert eps == pytest.approx(max(per_shard), rel=1e-3)
        if math.isfinite(target):
            assert float(r["delta"]) == settings["delta"]
            saved = json.loads((smoke_out / "reports" / f"{r['run_id']}.json").read_text())
            # the row's ε covers both releases, the composed models before and after the removal
            rounds = released_rounds(saved)
            assert eps == pytest.approx(saved["all_releases_epsilon"], rel=1e-3)
            assert eps > saved["current_models_epsilon"] and all(shard[0].epsilon <= target for shard in rounds)
            assert "before and after" in saved["statement"] and saved["partition_key"] == "given"
            # the published sizes: each shard's first round, as in the CSV
            assert [shard[0].dataset_size for shard in rounds] == [int(n) for n in r["shard_sizes"].split(";")]
        assert 0 <= float(r["accuracy"]) <= 1 and 0 <= float(r["accuracy_after_removal"]) <= 1
        # batch per shard keeps the unsharded sample rate; removal retrains exactly one shard
        assert int(r["batch_size_per_shard"]) == round(int(r["batch_size"]) / int(r["n_shards"]))
        assert len(r["retrained_shard"].split(";")) == 1
        assert float(r["removal_wall_time_s"]) > 0 and float(r["full_retrain_time_s"]) > 0
    summary = (smoke_out / shards.SUMMARY_NAME).read_text()
    assert "| shards | ε = 8 | ∞ (non-private) |" in summary and "remove 1 example (s)" in summary


def released_rounds(saved: dict) -> list[list[accounting.PrivacyReport]]:
    """Each shard's training rounds from a published shard report, every one verified; checks
    that ``all_releases_epsilon`` (when stated) is their sequential composition, maxed over shards."""
    rounds = [[accounting.PrivacyReport.from_dict(d) for d in (*old, now)]
              for old, now in zip(saved["replaced"], saved["per_shard"])]
    assert all(check.holds for shard in rounds for report in shard for check in report.verify())
    assert sum(map(len, rounds)) == len(rounds) + 1  # one removal: one shard retrained once
    retrained = next(shard for shard in rounds if len(shard) == 2)
    assert retrained[1].dataset_size == retrained[0].dataset_size - 1
    if saved["all_releases_epsilon"] is not None:
        every = [accounting.epsilon_of_history([seg for report in shard for seg in report.history], saved["delta"])
                 if len(shard) > 1 else shard[0].epsilon for shard in rounds]
        assert saved["all_releases_per_shard"] == pytest.approx(every, rel=1e-9)
        # the reports in docs/shards* predate current_models_epsilon: their epsilon is the current models'
        current = saved["current_models_epsilon"] if "members" in saved else saved["epsilon"]
        assert saved["all_releases_epsilon"] == max(every) > current == max(s[-1].epsilon for s in rounds)
        assert "members" not in saved or saved["epsilon"] == saved["all_releases_epsilon"]  # stated up front
    return rounds


@pytest.mark.parametrize("directory", PUBLISHED, ids=lambda p: p.name)
def test_published_shard_results_cover_every_release(directory):
    """docs/shards*: recomputed from the recorded mechanism (labelled so), no per-shard sizes of
    the public key-0 partition nor example ids in the CSV, each row's ε covering both releases
    (∞ for the runs whose randomness came from their public seed and was replayed on removal, and
    for 2 or more shards, whose sizes under the public key 0 are in the reports)."""
    rows = res.read_rows(directory / shards.CSV_NAME)
    assert rows and not set(shards_regenerate.DROPPED) & set(rows[0])
    for r in rows:
        assert "recomputed on" in r["recomputed"] and "from the original run" in r["recomputed"]
        if r["status"] != "ok" or math.isinf(float(r["target_epsilon"])):
            continue
        saved = json.loads((directory / "reports" / f"{r['run_id']}.json").read_text())
        rounds = released_rounds(saved)
        assert all(shard[0].epsilon <= float(r["target_epsilon"]) for shard in rounds)
        assert len(rounds[int(r["retrained_shard"])]) == 2 and saved["recomputed"]["note"] == r["recomputed"]
        if r["randomness"] == "seeded" or int(r["n_shards"]) > 1:  # replayed noise, or a public partition
            assert float(r["epsilon"]) == math.inf and saved["epsilon"] is None
            assert "no epsilon holds" in saved["statement"]
            assert ("public seed" in saved["statement"]) == (r["randomness"] == "seeded")
        else:
            assert float(r["epsilon"]) == pytest.approx(saved["all_releases_epsilon"], rel=1e-5)
            assert [float(e) for e in r["per_shard_epsilon"].split(";")] == pytest.approx(
                saved["all_releases_per_shard"], rel=1e-3)


def test_recomputed_mechanism_is_what_fit_reports():
    """shards_regenerate recomputes a report with fit's own calibration: same σ, q, steps and ε."""
    result = dp_taft.fit(linear_probe(tiny_vit()), easy_dataset(50), epsilon=3.0, delta=1e-3, epochs=2, batch_size=8,
                         lr=0.1, quiet=True)
    mine = shards_regenerate.mechanism_report(3.0, 1e-3, 8, 50, 2, result.report.method, result.report.max_grad_norm,
                                              "recomputed")
    assert mine.history == result.report.history and mine.dataset_size == result.report.dataset_size == 50
    assert mine.epsilon == result.report.epsilon and mine.notes == "recomputed"


def test_published_sizes_come_from_a_secret_owner_only_partition_key(smoke_out, backbone_file):
    """The CSV's shard sizes are those of the partition under the key in private/ (0700/0600),
    and that key appears in no shareable output."""
    key_file = smoke_out / shards_privacy.KEY_FILE
    assert permission_modes(key_file.parent) == {"dirs": {0o700}, "files": {0o600}}
    key = int(key_file.read_text())
    assert key.bit_length() > 64  # drawn (128 bits), not a small public constant; fails with probability 2^-64
    args = shards.parse_args(["--smoke", "--checkpoint", str(backbone_file)])
    settings, _, _ = shards.load_config(shards.DEFAULT_CONFIG, "smoke")
    ids = content_ids(build_task(args, settings).train)
    for r in res.read_rows(smoke_out / shards.CSV_NAME):
        sizes = ShardAssignment.create(ids, int(r["n_shards"]), key).sizes
        assert ";".join(map(str, sizes)) == r["shard_sizes"]
    shareable = [p for p in smoke_out.rglob("*") if p.is_file() and p.suffix in (".csv", ".md", ".json", ".jsonl")
                 and shards_privacy.KEY_FILE.parent.name not in p.parts]
    assert shareable and not any(str(key) in p.read_text() for p in shareable)


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
    # a public partition key is no setting any more: it would let the shard sizes reveal membership
    bad.write_text(shards.DEFAULT_CONFIG.read_text().replace("[shards]\n", "[shards]\nshard_key = 0\n"))
    with pytest.raises(ValueError, match="unknown key"):
        shards.load_config(bad, "smoke")
    # delta must be below 1 / (smallest shard size)
    assert _smoke(tmp_path / "o", backbone_file, "--n-shards", "64", "--delta", "0.1") == 2


def test_quick_profile_resolves():
    settings, hp, nonprivate = shards.load_config(shards.DEFAULT_CONFIG, "quick")
    assert settings["n_shards"] == [1, 2, 4] and settings["seeds"] == [0]
    _, sweep_hp, sweep_nonprivate = sc.load_config(sc.DEFAULT_CONFIG, "default")  # with the tuned file
    assert hp["epochs"] == 1 and hp["batch_size"] == 200
    # the profile's scale holds for the ε = ∞ runs too (the tuned non-private table holds every key)
    assert nonprivate == {**sweep_nonprivate["taft"], "epochs": 1, "batch_size": 200}
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
    assert rows[0]["status"] == "ok"
    saved = json.loads((out / "reports" / "shards2_eps8_seed0.json").read_text())
    assert float(rows[0]["epsilon"]) == pytest.approx(saved["all_releases_epsilon"], rel=1e-5)  # both releases
    assert all(shard[0].epsilon <= 8.0 for shard in released_rounds(saved))
    assert len(rows[0]["per_shard_epsilon"].split(";")) == 2
