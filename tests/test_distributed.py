"""Data-parallel DP-SGD under torchrun: 2 ranks on gloo, one model, the single-process guarantee.

Each test launches tests/distributed_job.py with `python -m torch.distributed.run
--standalone --nproc-per-node 2` (what `torchrun` runs), as a user would.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path

import accounting
import pytest
import torch

import dp_taft
from dp_taft.methods import taft
from dp_taft.privacy.checkpoint import LEDGER_FILE, Ledger
from distributed_job import NOISE, SHARDS, TRAIN, shard_task
from fit_cases import easy_dataset, tiny_vit, trainable_state

JOB = Path(__file__).with_name("distributed_job.py")


def launch(out: Path, *args: str, **env_vars: str) -> subprocess.CompletedProcess:
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env_vars}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(JOB), *args, str(out)], env=env, capture_output=True, text=True, timeout=300)


def ranks(out: Path) -> list[dict]:
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def single_process(**kwargs) -> dp_taft.FitResult:
    settings = {k: v for k, v in TRAIN.items() if k not in ("checkpoint_every", "seed")}
    return dp_taft.fit(taft(tiny_vit(), 1), easy_dataset(400), eval_set=easy_dataset(150, seed=1), quiet=True,
                       **{**settings, **kwargs})


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    run = launch(out, "train")
    assert run.returncode == 0, run.stderr[-3000:]
    return out


def test_every_rank_ends_with_the_same_model(trained):
    a, b = ranks(trained)
    assert a["world"] == b["world"] == 2
    assert a["trainable"].keys() == b["trainable"].keys()
    assert all(torch.equal(a["trainable"][k], b["trainable"][k]) for k in a["trainable"])


def test_report_equals_the_single_process_report_for_the_same_plan(trained):
    a, b = ranks(trained)
    assert a["report"] == b["report"]
    report = accounting.PrivacyReport.from_json(a["report"])
    reference = single_process().report
    assert report.history == reference.history  # same q, σ and T
    assert report.epsilon == reference.epsilon <= TRAIN["epsilon"]
    assert a["steps"] == report.steps == 3 * 10


def test_weights_equal_the_single_process_run_with_the_same_seed(trained):
    # Every rank draws the coin flips of all N examples and keeps its own, and rank 0 draws the
    # single process's noise: the same batches and noise; only the order of float sums differs.
    distributed = ranks(trained)[0]["trainable"]
    reference = trainable_state(single_process(seed=TRAIN["seed"]).model)
    assert distributed.keys() == reference.keys()
    for k in reference:
        torch.testing.assert_close(distributed[k], reference[k], rtol=1e-4, atol=1e-5, msg=k)


def test_each_rank_caches_only_its_rows_and_a_shared_cache_dir_is_reused(tmp_path):
    cache = tmp_path / "cache"
    first = launch(tmp_path / "first", "train", "--cache-dir", str(cache))  # both ranks build in cache at once
    assert first.returncode == 0, first.stderr[-3000:]
    built = ranks(tmp_path / "first")
    assert [r["prefix_examples"] for r in built] == [200 + 75, 200 + 75]  # half the training and eval examples
    single = single_process(seed=TRAIN["seed"], cache_dir=tmp_path / "single")
    whole = sorted(p.stat().st_size for p in (tmp_path / "single").glob("*.bin"))  # eval, train
    stored = {m.name: torch.load(m, weights_only=True)["labels"] for m in cache.glob("*.meta.pt")}
    assert sorted(len(y) for y in stored.values()) == [75, 75, 200, 200]  # train and eval, one part per rank
    labels = easy_dataset(400).tensors[1]
    for name, y in stored.items():
        rank = int(name.split("-")[1].removeprefix("w2r"))  # <group>-w2r<rank>-<hash>.meta.pt
        if len(y) == 200:  # this rank's training rows: its block of positions
            assert torch.equal(y, labels[200 * rank:200 * (rank + 1)])
    parts = sorted(p.stat().st_size for p in cache.glob("*.bin"))
    assert [2 * size for size in parts] == [whole[0], whole[0], whole[1], whole[1]]  # each: half of one process's
    second = launch(tmp_path / "second", "train", "--cache-dir", str(cache))
    assert second.returncode == 0, second.stderr[-3000:]
    reused = ranks(tmp_path / "second")
    assert [r["prefix_examples"] for r in reused] == [0, 0]
    assert all(torch.equal(reused[0]["trainable"][k], built[0]["trainable"][k]) for k in built[0]["trainable"])
    for k, v in trainable_state(single.model).items():
        torch.testing.assert_close(built[0]["trainable"][k], v, rtol=1e-4, atol=1e-5, msg=k)


def test_a_cache_of_another_world_size_is_computed_again_and_said(tmp_path, caplog):
    cache = tmp_path / "cache"
    assert launch(tmp_path / "ranks", "train", "--cache-dir", str(cache)).returncode == 0
    with caplog.at_level("INFO", logger="dp_taft.privacy.prefix_cache"):
        single = single_process(seed=TRAIN["seed"], cache_dir=cache)
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "other rank layouts (w2r0, w2r1" in said and "computing this rank's rows again" in said
    reference = single_process(seed=TRAIN["seed"])
    assert all(torch.equal(a, b) for a, b in zip(trainable_state(single.model).values(),
                                                  trainable_state(reference.model).values()))


def test_accuracy_matches_the_single_process_run_within_noise(trained):
    distributed = ranks(trained)[0]["accuracy"]
    reference = single_process(seed=0).history[-1].eval_accuracy
    # chance is 1/3; over 6 seeds of the single-process run, accuracy ranged 0.83-1.0
    assert distributed >= 0.75 and reference >= 0.75
    assert abs(distributed - reference) <= 0.2


def test_noise_is_added_once_per_step(tmp_path):
    """All per-sample gradients erased, q = 1, SGD lr 1, one step: Δw = −noise/(q·N), so
    std(Δw)·q·N must be σ·C — not √2·σ·C (noise per rank) nor σ·C/√2 (noise split)."""
    run = launch(tmp_path, "noise")
    assert run.returncode == 0, run.stderr[-3000:]
    a, b = ranks(tmp_path)
    before = {k: v for k, v in taft(tiny_vit(), 1).named_parameters() if v.requires_grad}
    moved = torch.cat([(a["trainable"][k] - before[k].detach()).flatten() for k in before])
    assert all(torch.equal(a["trainable"][k], b["trainable"][k]) for k in before)
    sigma_c = a["noise_multiplier"] * NOISE["max_grad_norm"]
    std = float(moved.std()) * NOISE["batch_size"]  # q·N = 96
    assert moved.numel() > 3000  # relative sd of the estimate < 2%
    assert std == pytest.approx(sigma_c, rel=0.08)


def test_a_killed_rank_resumes_with_every_step_in_the_ledger(tmp_path):
    crashed = launch(tmp_path, "train", "--count", "--die-after", "13")
    assert crashed.returncode != 0 and not (tmp_path / "rank0.pt").exists()
    executed_before = len((tmp_path / "executed.txt").read_text().splitlines())
    ledger = Ledger(tmp_path / "ckpt" / LEDGER_FILE, method="pld", target_epsilon=TRAIN["epsilon"],
                    delta=TRAIN["delta"])
    assert 13 <= executed_before and ledger.steps >= 14  # step 14 was reserved before rank 1 died in it

    resumed = launch(tmp_path, "train", "--count")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = ranks(tmp_path)
    assert all(torch.equal(a["trainable"][k], b["trainable"][k]) for k in a["trainable"])
    report = accounting.PrivacyReport.from_json(a["report"])
    executed = len((tmp_path / "executed.txt").read_text().splitlines())
    ledger = Ledger(tmp_path / "ckpt" / LEDGER_FILE, method="pld", target_epsilon=TRAIN["epsilon"],
                    delta=TRAIN["delta"])
    assert report.steps == ledger.steps >= executed > executed_before  # every step that ran is counted
    assert report.epsilon == pytest.approx(accounting.epsilon_of_history(ledger.history, TRAIN["delta"]), rel=1e-12)
    assert report.epsilon <= TRAIN["epsilon"] and math.isfinite(report.epsilon)


def test_shards_spread_over_the_ranks_equal_the_single_process_shards(tmp_path):
    """Rank r trains shards s ≡ r (mod 2); every rank ends with all of them, bit-identical to
    one process training every shard with the same seed, before and after a removal."""
    from dp_taft.shards import fit_shards

    run = launch(tmp_path, "shards")
    assert run.returncode == 0, run.stderr[-3000:]
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    model, data = shard_task()
    assert a["key"] == b["key"]  # rank 0's secret partition key on every rank
    reference = fit_shards(model, data, 3, ids=range(len(data)), key=a["key"], seed=1, distributed=False, **SHARDS)
    reference.forget([5])
    for got in (a, b):
        assert got["retrained"] == a["retrained"] and got["report"] == a["report"]
        for mine, want in zip(got["deltas"], reference.models):
            want = want.delta_state_dict()
            assert all(torch.equal(mine[k], want[k]) for k in want)
    assert "parallel composition" in a["report"]
    shards_of = lambda rank: [s for s in range(3) if s % 2 == rank]  # noqa: E731
    for rank, got in enumerate((a, b)):  # each rank trained only its own shards, once per round
        assert got["fits"] == len(shards_of(rank)) + len(set(a["retrained"]) & set(shards_of(rank)))


@pytest.mark.parametrize("how", ["fail", "hang"])
def test_rank0_failing_alone_ends_every_rank_in_bounded_time_and_a_relaunch_resumes(tmp_path, how):
    """Rank 0 alone fails ("fail": its ledger write raises; "hang": it stops answering) and its
    process lives on: rank 1 must stop by itself with a clear error (at once when rank 0's
    error can be handed over, else after the process-group timeout, 8 s here), and the job
    must end long before rank 0's 600 s sleep; a relaunch resumes with every step counted."""
    started = time.monotonic()
    crashed = launch(tmp_path, "train", "--rank0", how, "--die-after", "6", DP_TAFT_DIST_TIMEOUT="8")
    elapsed = time.monotonic() - started
    assert crashed.returncode != 0 and elapsed < 120, (elapsed, crashed.stderr[-3000:])
    expected = "rank 0 failed (OSError" if how == "fail" else "did not answer within the process group's timeout"
    assert "rank 1 stopped: RankFailure" in crashed.stderr and expected in crashed.stderr, crashed.stderr[-3000:]
    assert "resume from the write-ahead ledger" in crashed.stderr
    executed_before = len((tmp_path / "executed.txt").read_text().splitlines())

    resumed = launch(tmp_path, "train", "--count")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    report = accounting.PrivacyReport.from_json(ranks(tmp_path)[0]["report"])
    executed = len((tmp_path / "executed.txt").read_text().splitlines())
    assert report.steps >= executed > executed_before >= 6
    assert report.epsilon <= TRAIN["epsilon"]
