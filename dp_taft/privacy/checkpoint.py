"""Crash safety: atomic checkpoints and the write-ahead privacy ledger with its budget guard.

The ledger is the truth of what was spent. Steps are *reserved* (appended and fsynced)
before they run, in blocks, so a crash at any instant leaves a ledger that counts every
step that may have drawn noise -- possibly a few more, never fewer. The write-ahead
costs one fsync per block, not per step.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import accounting
import torch

__all__ = ["atomic_save", "fsync_dir", "load_checkpoint", "Ledger", "CHECKPOINT_FILE", "LEDGER_FILE"]

CHECKPOINT_FILE = "checkpoint.pt"
LEDGER_FILE = "ledger.jsonl"


def fsync_dir(directory: Path) -> None:
    # The rename is durable only once the directory entry itself is on disk.
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to an owner-only (0600) temporary file, fsync, then rename over ``path``.

    A crash leaves either the old or the new file, never a torn one. Owner-only because
    checkpoints hold the run's secret key and generator states (and prefix-cache markers
    hold private labels): anyone who reads them can replay the noise.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def load_checkpoint(path: Path) -> dict[str, Any] | None:
    """The checkpoint saved at ``path``, or None when there is none."""
    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)


class Ledger:
    """Write-ahead record of DP-SGD steps, checked against a target (ε, δ) before each reservation.

    Args:
        path: the append-only JSON-lines file (one reservation per line), or None to
            keep the ledger in memory only (no crash safety).
        method: accounting method, e.g. "pld".
        target_epsilon: ε no reservation may exceed; delta: its δ in (0, 1).
    """

    def __init__(self, path: Path | None, *, method: str, target_epsilon: float, delta: float) -> None:
        self.path = path
        self.method = method
        self.target_epsilon = target_epsilon
        self.delta = delta
        self.accountant = accounting.PrivacyAccountant(method=method)
        # Each reservation as written (the accountant merges equal neighbours).
        self.entries: list[accounting.Segment] = []
        self._epsilon: tuple[int, float] = (-1, 0.0)  # (steps, ε) of the last computation
        # (σ, q) -> steps known to fit the budget (a lower bound) / the exact maximum.
        self._fits: dict[tuple[float, float], int] = {}
        self._max: dict[tuple[float, float], int] = {}
        if path is not None and path.exists():
            self._replay(path)

    def _replay(self, path: Path) -> None:
        data = path.read_bytes()
        good = 0  # byte offset after the last complete line
        for line in data.splitlines(keepends=True):
            if not line.endswith(b"\n"):
                break  # torn append: its fsync never returned, so its steps never ran
            entry = json.loads(line)
            self._record(entry["noise_multiplier"], entry["sample_rate"], entry["steps"])
            good += len(line)
        if good < len(data):
            with open(path, "r+b") as f:
                f.truncate(good)

    @property
    def reservations(self) -> int:
        """Reservations written so far (lines of the ledger)."""
        return len(self.entries)

    @property
    def steps(self) -> int:
        """Steps reserved so far (>= steps executed)."""
        return self.accountant.steps

    @property
    def history(self) -> list:
        """Reserved segments, as ``accounting.Segment``s."""
        return list(self.accountant.history)

    def epsilon(self) -> float:
        """ε of every reserved step at the ledger's δ (memoized: the history only grows)."""
        if self._epsilon[0] != self.steps:
            self._epsilon = (self.steps, self.accountant.epsilon(self.delta) if self.steps else 0.0)
        return self._epsilon[1]

    def vouch(self, noise_multiplier: float, sample_rate: float, steps: int) -> None:
        """Record that ``steps`` homogeneous steps are known to fit the budget (skips recomputation)."""
        key = (noise_multiplier, sample_rate)
        self._fits[key] = max(self._fits.get(key, 0), steps)

    def affordable(self, noise_multiplier: float, sample_rate: float, want: int) -> int:
        """Largest n <= ``want`` such that the history plus n more steps stays within the target ε."""
        key = (noise_multiplier, sample_rate)
        used = self.steps
        if all((s.noise_multiplier, s.sample_rate) == key for s in self.accountant.history):
            if used + want <= self._fits.get(key, 0):
                return want
            if key not in self._max:
                self._max[key] = accounting.max_steps(
                    self.target_epsilon, self.delta, noise_multiplier, sample_rate, method=self.method
                )
            return max(0, min(want, self._max[key] - used))
        # Mixed history (e.g. a resume with another batch size): bisect on n.
        lo, hi = 0, want
        while lo < hi:
            mid = (lo + hi + 1) // 2
            segment = accounting.Segment(noise_multiplier, sample_rate, mid)
            eps = accounting.epsilon_of_history([*self.accountant.history, segment], self.delta, method=self.method)
            lo, hi = (mid, hi) if eps <= self.target_epsilon else (lo, mid - 1)
        return lo

    def reserve(self, noise_multiplier: float, sample_rate: float, steps: int) -> None:
        """Append and fsync "``steps`` more steps at (σ, q)" before any of them runs."""
        if self.path is not None:
            line = json.dumps({"noise_multiplier": noise_multiplier, "sample_rate": sample_rate, "steps": steps})
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line + "\n")
                f.flush()
                os.fsync(f.fileno())
        self._record(noise_multiplier, sample_rate, steps)

    def _record(self, noise_multiplier: float, sample_rate: float, steps: int) -> None:
        self.accountant.record(noise_multiplier, sample_rate, steps=steps)
        self.entries.append(accounting.Segment(noise_multiplier, sample_rate, steps))
