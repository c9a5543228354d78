"""Crash safety: atomic checkpoints and the write-ahead privacy ledger with its budget guard.

The ledger is the truth of what was spent. Steps are *reserved* (appended and fsynced)
before they run, in blocks, so a crash at any instant leaves a ledger that counts every
step that may have drawn noise -- possibly a few more, never fewer. The write-ahead
costs one fsync per block, not per step.

Everything here is owner-only whatever the process umask: directories 0700
(:func:`private_dir`), files 0600 (:func:`atomic_save`, :func:`write_private_text`, the
ledger). Checkpoints hold the run's secret key; the helpers serve the library's other private
files too (a shard assignment holds content ids of private examples and the partition key).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import accounting
import torch

__all__ = ["atomic_save", "write_private_text", "private_dir", "open_private", "fsync_dir", "load_checkpoint",
           "discard_keys", "discard_saved", "Ledger", "CHECKPOINT_FILE", "LEDGER_FILE", "PRIVATE_DIR_MODE", "PRIVATE_FILE_MODE"]

CHECKPOINT_FILE = "checkpoint.pt"
LEDGER_FILE = "ledger.jsonl"
PRIVATE_DIR_MODE = 0o700  # owner only: read, write, enter
PRIVATE_FILE_MODE = 0o600  # owner only: read, write
#: Name of the temporary file an atomic write of file ``name`` by process ``pid`` writes first.
_TEMPORARY = ".{name}.{pid}.tmp"


def private_dir(path: str | Path) -> Path:
    """``path`` as an owner-only (0700) directory, whatever the umask; returns it as a Path.

    Missing parents are created 0700 too (they lead only to private data); parents that
    already exist are left alone. ``path`` itself is made 0700 even if it existed: it is
    dedicated to private data (a checkpoint, shard or cache directory), and a umask-made
    0755 would let every local user list and read what the library writes into it.
    """
    path = Path(path)
    missing: list[Path] = []
    parent = path
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=PRIVATE_DIR_MODE)
        except FileExistsError:  # made meanwhile by another rank or worker: chmod'ed below if it is ``path``
            continue
        os.chmod(directory, PRIVATE_DIR_MODE)  # mkdir's mode is masked by the umask
    if not path.is_dir():
        raise NotADirectoryError(f"{path} is not a directory: name a directory for private files")
    if path.stat().st_uid != os.geteuid():
        raise PermissionError(f"{path} belongs to another user, so it cannot be made owner-only (0700): name a "
                              "directory of your own for private files, e.g. a new sub-directory")
    os.chmod(path, PRIVATE_DIR_MODE)
    return path


def open_private(path: Path, flags: int) -> int:
    """A file descriptor of ``path`` opened with ``flags`` (O_CREAT added), mode 0600 whatever the umask
    (fchmod also tightens a file that an older version created with the umask's mode)."""
    fd = os.open(path, flags | os.O_CREAT, PRIVATE_FILE_MODE)
    try:
        os.fchmod(fd, PRIVATE_FILE_MODE)
    except BaseException:
        os.close(fd)
        raise
    return fd


def fsync_dir(directory: Path) -> None:
    # The rename is durable only once the directory entry itself is on disk.
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """``write`` into an owner-only (0600) temporary file beside ``path``, fsync, then rename
    over ``path``: a crash leaves either the old or the new file, never a torn one."""
    tmp = path.with_name(_TEMPORARY.format(name=path.name, pid=os.getpid()))
    with os.fdopen(open_private(tmp, os.O_WRONLY | os.O_TRUNC), "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` of ``obj`` to ``path``, atomically and owner-only (0600).

    Owner-only because checkpoints hold the run's secret key and generator states (and
    prefix-cache markers hold private labels): anyone who reads them can replay the noise.
    """
    _atomic_write(Path(path), lambda f: torch.save(obj, f))


def write_private_text(path: str | Path, text: str) -> None:
    """``text`` (UTF-8) to ``path``, atomically and owner-only (0600) whatever the umask:
    for small private files such as a shard assignment (content ids and the partition key)."""
    _atomic_write(Path(path), lambda f: f.write(text.encode("utf-8")))


def discard_saved(directory: str | Path, name: str) -> None:
    """Delete every file ``name`` under ``directory`` and every temporary copy of one that an
    atomic write left behind (a crash between writing and renaming leaves ``.NAME.PID.tmp``)."""
    root = Path(directory)
    for pattern in (name, _TEMPORARY.format(name=name, pid="*")):
        for path in root.rglob(pattern):
            path.unlink(missing_ok=True)


def discard_keys(run_dir: str | Path) -> None:
    """Delete every checkpoint under ``run_dir`` (each stage's, e.g. head first's ``head/`` and
    ``taft/``), and the temporary file of any checkpoint write a crash interrupted: a finished
    run's checkpoints hold its secret key, which must not outlive the run. The write-ahead
    ledgers stay: they hold only what was spent (σ, q, steps)."""
    discard_saved(run_dir, CHECKPOINT_FILE)


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
            # Owner-only like everything in a checkpoint directory, whatever the umask.
            with os.fdopen(open_private(self.path, os.O_WRONLY | os.O_APPEND), "a", encoding="utf-8") as f:
                f.write(line + "\n")
                f.flush()
                os.fsync(f.fileno())
        self._record(noise_multiplier, sample_rate, steps)

    def _record(self, noise_multiplier: float, sample_rate: float, steps: int) -> None:
        self.accountant.record(noise_multiplier, sample_rate, steps=steps)
        self.entries.append(accounting.Segment(noise_multiplier, sample_rate, steps))
