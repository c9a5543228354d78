"""Crash safety of dp_taft.fit: SIGKILL mid-epoch and resume, exact resume, the write-ahead ledger."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import accounting
import pytest
import torch

import dp_taft
from dp_taft.methods import linear_probe
from dp_taft.privacy.checkpoint import (CHECKPOINT_FILE, LEDGER_FILE, Ledger, atomic_save, discard_keys, load_checkpoint,
                                        private_dir)
from fit_cases import easy_dataset, interrupt_after, permission_modes, tiny_vit, trainable_state, umask

REPO = Path(__file__).resolve().parents[1]
TARGET, DELTA = 2.0, 1e-3

# The child counts every step Opacus executes (the engine's step hook runs once per step,
# after the noise, before the update), durably; it sleeps so the parent can kill it mid-epoch.
CHILD = textwrap.dedent(
    """
    import json, os, sys, time
    import dp_taft
    from dp_taft.privacy.engine import PrivateEngine
    from dp_taft.methods import linear_probe
    from fit_cases import easy_dataset, tiny_vit

    ckpt, counter, out, pause = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    count = PrivateEngine._count

    def counting(self, optimizer):
        count(self, optimizer)
        with open(counter, "a") as f:
            f.write("step\\n"); f.flush(); os.fsync(f.fileno())
        time.sleep(pause)

    PrivateEngine._count = counting
    result = dp_taft.fit(linear_probe(tiny_vit()), easy_dataset(96), epsilon=%r, delta=%r, epochs=3,
                         batch_size=16, lr=0.1, checkpoint_dir=ckpt, checkpoint_every=4, quiet=True)
    with open(out, "w") as f:
        json.dump({"steps": result.steps, "epsilon": result.report.epsilon,
                   "history": [[s.noise_multiplier, s.sample_rate, s.steps] for s in result.report.history]}, f)
    """
    % (TARGET, DELTA)
)


def _child(tmp_path: Path, pause: float) -> subprocess.Popen:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    args = [str(tmp_path / "ckpt"), str(tmp_path / "executed.txt"), str(tmp_path / "result.json"), str(pause)]
    return subprocess.Popen([sys.executable, str(script), *args], env=env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _executed(tmp_path: Path) -> int:
    path = tmp_path / "executed.txt"
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_sigkill_mid_epoch_then_resume(tmp_path):
    child = _child(tmp_path, pause=0.3)
    deadline = time.monotonic() + 240
    # 6 steps per epoch, checkpoints every 4: kill in epoch 2, in the middle of a reserved block.
    while _executed(tmp_path) < 9:
        assert child.poll() is None, child.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "the child never reached step 9"
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    child.wait()
    killed_at = _executed(tmp_path)
    assert killed_at < 18 and not (tmp_path / "result.json").exists()
    ledger_after_kill = Ledger(tmp_path / "ckpt" / LEDGER_FILE, method="pld", target_epsilon=TARGET, delta=DELTA)
    assert ledger_after_kill.steps >= killed_at  # write-ahead: every executed step was reserved first

    resumed = _child(tmp_path, pause=0.0)
    _, err = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, err.decode()[-2000:]  # (1) training completes
    result = json.loads((tmp_path / "result.json").read_text())
    ledger = Ledger(tmp_path / "ckpt" / LEDGER_FILE, method="pld", target_epsilon=TARGET, delta=DELTA)
    executed = _executed(tmp_path)
    assert executed > killed_at
    assert ledger.steps >= executed  # (2) the ledger counts every step ever run, re-runs included
    assert sum(n for *_, n in result["history"]) == ledger.steps
    segments = [accounting.Segment(*s) for s in result["history"]]
    eps = accounting.epsilon_of_history(segments, DELTA)
    assert result["epsilon"] == pytest.approx(eps, rel=1e-12) and eps <= TARGET  # (3)


class _Interrupt(Exception):
    pass


def _interrupt_after(monkeypatch, steps: int) -> None:
    """Make the `steps`+1-th DP-SGD step raise before its noise is drawn (a crash), in any mode."""
    interrupt_after(monkeypatch, steps, _Interrupt)


@pytest.mark.parametrize("epsilon", [None, TARGET], ids=["non-private", "private"])
def test_interrupted_run_resumes(tmp_path, monkeypatch, epsilon):
    data = easy_dataset(96)
    kwargs = dict(epsilon=epsilon, delta=DELTA, epochs=2, batch_size=16, lr=0.1, quiet=True, checkpoint_every=2, seed=0)
    straight = trainable_state(dp_taft.fit(linear_probe(tiny_vit()), data, **kwargs).model)
    with monkeypatch.context() as mp:
        _interrupt_after(mp, 7)
        with pytest.raises(_Interrupt):
            dp_taft.fit(linear_probe(tiny_vit()), data, checkpoint_dir=tmp_path, **kwargs)
    assert load_checkpoint(tmp_path / CHECKPOINT_FILE)["run"]["step"] == 6  # last block end before the crash
    if epsilon is None:
        result = dp_taft.fit(linear_probe(tiny_vit()), data, checkpoint_dir=tmp_path, **kwargs)
    else:
        with pytest.warns(UserWarning, match="privacy budget epsilon=2.0 reached"):
            result = dp_taft.fit(linear_probe(tiny_vit()), data, checkpoint_dir=tmp_path, **kwargs)
    resumed = trainable_state(result.model)
    if epsilon is None:
        # Nothing was released, so the resume replays the same batches: bit-identical weights.
        assert result.steps == 12
        assert all(torch.equal(resumed[k], straight[k]) for k in straight)
    else:
        # Step 7 (reserved, maybe noised) is counted; the resume draws fresh batches and noise
        # rather than re-releasing it, and stops where the budget ends.
        assert result.report.epsilon <= TARGET
        assert sum(s.steps for s in result.report.history) >= result.steps + 1
        assert not all(torch.equal(resumed[k], straight[k]) for k in straight)


def test_lost_ledger_is_refused_on_resume(tmp_path):
    kwargs = dict(epsilon=TARGET, delta=DELTA, epochs=1, batch_size=32, quiet=True, checkpoint_dir=tmp_path)
    dp_taft.fit(linear_probe(tiny_vit()), easy_dataset(96), **kwargs)
    (tmp_path / LEDGER_FILE).unlink()
    with pytest.raises(ValueError, match="ledger was lost or truncated"):
        dp_taft.fit(linear_probe(tiny_vit()), easy_dataset(96), **kwargs)


def test_torn_ledger_line_is_dropped_and_truncated(tmp_path):
    path = tmp_path / LEDGER_FILE
    ledger = Ledger(path, method="pld", target_epsilon=TARGET, delta=DELTA)
    ledger.reserve(1.0, 0.1, 5)
    with open(path, "a") as f:
        f.write('{"noise_multiplier": 1.0, "sample_')  # killed mid-append: its fsync never returned
    again = Ledger(path, method="pld", target_epsilon=TARGET, delta=DELTA)
    assert again.steps == 5 and again.reservations == 1
    again.reserve(1.0, 0.1, 2)
    assert Ledger(path, method="pld", target_epsilon=TARGET, delta=DELTA).steps == 7


def test_budget_guard_grants_only_what_fits(tmp_path):
    ledger = Ledger(None, method="pld", target_epsilon=TARGET, delta=DELTA)
    cap = accounting.max_steps(TARGET, DELTA, 1.0, 0.1)
    assert ledger.affordable(1.0, 0.1, cap + 10) == cap
    ledger.reserve(1.0, 0.1, cap - 3)
    assert ledger.affordable(1.0, 0.1, 10) == 3
    ledger.reserve(2.0, 0.1, 1)  # mixed history: bisection on epsilon_of_history
    n = ledger.affordable(1.0, 0.1, 10)
    fits = [*ledger.history, accounting.Segment(1.0, 0.1, n)]
    assert accounting.epsilon_of_history(fits, DELTA) <= TARGET
    assert n == 10 or accounting.epsilon_of_history([*ledger.history, accounting.Segment(1.0, 0.1, n + 1)], DELTA) > TARGET


def test_atomic_save_replaces_without_leftovers(tmp_path):
    path = tmp_path / "state.pt"
    atomic_save({"a": torch.ones(2)}, path)
    atomic_save({"a": torch.zeros(2)}, path)
    assert torch.equal(load_checkpoint(path)["a"], torch.zeros(2))
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]
    assert load_checkpoint(tmp_path / "missing.pt") is None


def test_discard_keys_deletes_the_temporary_file_of_an_interrupted_checkpoint_write(tmp_path, monkeypatch):
    """A crash inside atomic_save, after the checkpoint was written beside its place and before
    the rename, leaves ``.checkpoint.pt.PID.tmp``: it holds the secret seed as the checkpoint
    does, so discard_keys deletes it too, and only checkpoints and their temporaries."""
    stage = private_dir(tmp_path / "run" / "taft")
    atomic_save({"seed": 1234}, stage / CHECKPOINT_FILE)
    (stage / LEDGER_FILE).write_text("{}\n")
    atomic_save({"delta": torch.ones(2)}, stage / "delta.pt")
    def killed(src: Path, dst: Path) -> None:
        raise OSError("killed before the rename")

    with monkeypatch.context() as m:
        m.setattr(os, "replace", killed)
        for name in (CHECKPOINT_FILE, "delta.pt"):
            with pytest.raises(OSError, match="killed before the rename"):
                atomic_save({"seed": 1234}, stage / name)
    leftover = stage / f".{CHECKPOINT_FILE}.{os.getpid()}.tmp"
    assert torch.load(leftover, weights_only=True) == {"seed": 1234}  # the secret, in a file of its own
    (stage / f".{CHECKPOINT_FILE}.99999.tmp").write_bytes(b"another process's")
    discard_keys(tmp_path / "run")
    assert sorted(p.name for p in stage.iterdir()) == [f".delta.pt.{os.getpid()}.tmp", "delta.pt", LEDGER_FILE]


@pytest.mark.parametrize("mask", [0o022, 0o000, 0o277], ids=oct)
def test_checkpoint_dirs_are_0700_and_files_0600_whatever_the_umask(tmp_path, mask):
    """A new checkpoint_dir and its missing parents, and an existing one made 0777, end owner-only
    with every file in them (checkpoint with the secret key, ledger), after a run and a resume."""
    existing = tmp_path / "existing"
    existing.mkdir()
    os.chmod(existing, 0o777)
    with umask(mask):
        for ckpt in (tmp_path / "new" / "ckpt", existing, existing):  # the last: a resume
            dp_taft.fit(linear_probe(tiny_vit()), easy_dataset(48), epsilon=TARGET, delta=DELTA, epochs=1,
                        batch_size=16, lr=0.1, checkpoint_dir=ckpt, quiet=True)
    assert {p.name for p in existing.iterdir()} == {CHECKPOINT_FILE, LEDGER_FILE}
    for root in (tmp_path / "new", existing):
        assert permission_modes(root) == {"dirs": {0o700}, "files": {0o600}}
