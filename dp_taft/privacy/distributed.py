"""Data-parallel DP-SGD over torch.distributed: who the process is, and the Poisson sampler of its part.

Launched by ``torchrun --nproc-per-node N`` (or inside an initialised process group),
:func:`dp_taft.fit` trains ONE model with Opacus' distributed machinery: the model is
wrapped in ``DifferentiallyPrivateDistributedDataParallel`` (parameters broadcast from
rank 0), every rank clips its own examples' gradients, Opacus' distributed optimizer adds
the Gaussian noise on rank 0 only and all-reduces the sum, so each step carries noise of
std σ·C exactly once. Rank 0 alone writes the ledger and checkpoints; reservation grants,
the run's state and the final report are broadcast from it.

Poisson sampling across ranks (:func:`dp_taft.privacy.data.poisson_sampler`): example i
belongs to one rank (rank r holds the r-th of ``world`` contiguous blocks of positions,
:func:`~dp_taft.privacy.rank_rows.block`) and each rank includes each of its examples independently
with probability q, so the union over ranks is a Poisson(q) sample of the whole data set,
as accounted. Unlike Opacus' ``DistributedUniformWithReplacementSampler``, which skips a
rank's empty batch (and so desynchronises the ranks' steps and reveals emptiness), every
batch is yielded, empty or not.

Failures stay bounded. What rank 0 does alone (the ledger's reservations, opening it) goes
through :meth:`Comm.on_main`, which hands rank 0's error to every rank, so all stop at once
with the same message. Anything else that stops one rank while its process lives on (a hung
disk, a user script that catches the error) is ended by the process group's timeout,
:func:`timeout` seconds (default :data:`DEFAULT_TIMEOUT_S`; environment variable
``DP_TAFT_DIST_TIMEOUT``), after which every waiting rank raises :class:`RankFailure`. A
relaunch of the same command resumes from the write-ahead ledger in ``checkpoint_dir``.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

__all__ = ["Comm", "RankFailure", "current", "local_device", "timeout", "DEFAULT_TIMEOUT_S"]

T = TypeVar("T")
#: Seconds a rank waits in a collective for the others before it gives up. Ranks do the same
#: work between collectives (each its part of a batch), so a healthy run never waits long;
#: 10 minutes leaves room for a slow checkpoint write or an uneven prefix-cache build.
DEFAULT_TIMEOUT_S = 600.0
_MAX_TIMEOUT_S = 7 * 24 * 3600.0  # a week: anything longer is no bound, and timedelta must hold it
#: Words of gloo's and NCCL's errors for a lost peer or a timeout (their exception type is plain RuntimeError).
_TRANSPORT_ERRORS = ("gloo", "NCCL", "Timed out", "Connection closed", "Connection reset")
_RESUME = "relaunch the same command to resume from the write-ahead ledger in checkpoint_dir"


class RankFailure(RuntimeError):
    """Another rank of a data-parallel run failed or stopped answering: this rank stops too."""


def timeout() -> float:
    """The process-group timeout in seconds: ``DP_TAFT_DIST_TIMEOUT`` if set (> 0), else :data:`DEFAULT_TIMEOUT_S`."""
    raw = os.environ.get("DP_TAFT_DIST_TIMEOUT")
    if raw is None:
        return DEFAULT_TIMEOUT_S
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds <= _MAX_TIMEOUT_S:
        raise ValueError(f"DP_TAFT_DIST_TIMEOUT must be a number of seconds in (0, {_MAX_TIMEOUT_S:g}], got {raw!r}")
    return seconds


@dataclass(frozen=True)
class Comm:
    """This process's place in a data-parallel run: ``rank`` in [0, ``world``); world 1 = not distributed."""

    rank: int = 0
    world: int = 1

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        """The process that writes the ledger, checkpoints and reports."""
        return self.rank == 0

    def broadcast(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank (picklable objects; no-op when not distributed)."""
        if not self.distributed:
            return obj
        box = [obj if self.main else None]
        self._collective(dist.broadcast_object_list, box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world
        self._collective(dist.all_gather_object, out, obj)
        return out

    def on_main(self, work: Callable[[], T]) -> T | None:
        """``work()`` on rank 0 alone (its result there, None on the other ranks). If it raises,
        every rank raises at once (rank 0 its own error, the others :class:`RankFailure` naming
        it) instead of the others waiting for rank 0 in their next collective."""
        if not self.main:
            failure = self.broadcast(None)
            if failure is not None:
                raise RankFailure(f"rank 0 failed ({failure}); rank {self.rank} stops too. Fix the cause, then {_RESUME}")
            return None
        try:
            value = work()
        except BaseException as e:
            self.broadcast(f"{type(e).__name__}: {e}")
            raise
        self.broadcast(None)
        return value

    @contextlib.contextmanager
    def guarded(self) -> Iterator[None]:
        """Collectives inside (ours, or Opacus' all-reduce in a step) that lose a peer or pass the
        process group's timeout raise :class:`RankFailure`, which says what happened and what to do."""
        try:
            yield
        except RuntimeError as e:
            # gloo reports a lost peer or a timeout as a plain RuntimeError from its transport;
            # anything else (a bug in the step) keeps its own type and message.
            if not (isinstance(e, dist.DistError) or any(m in str(e) for m in _TRANSPORT_ERRORS)):
                raise
            raise RankFailure(f"rank {self.rank}: another rank of the {self.world} failed or did not answer within "
                              f"the process group's timeout ({str(e).strip()[:300]}); {_RESUME}") from e

    def _collective(self, op: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        with self.guarded():
            op(*args, **kwargs)


def current(device: torch.device, enabled: bool | None) -> Comm:
    """The run's :class:`Comm`.

    ``enabled`` None: distributed when a process group with more than one rank is
    initialised, or when torchrun's environment (WORLD_SIZE > 1) asks for one, which is
    then initialised (gloo on CPU, nccl on CUDA) with :func:`timeout`. A process group the
    caller initialised keeps its own timeout (torch's default: 30 min for gloo). False: a single-process run even inside
    a process group (e.g. one shard per rank).
    """
    if enabled is False or not dist.is_available():
        return Comm()
    if not dist.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            if enabled:
                raise ValueError("distributed=True needs torchrun (WORLD_SIZE > 1) or an initialised process group")
            return Comm()
        if device.type == "cuda":  # NCCL's object collectives use the current device: this rank's GPU
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=timeout()))
        # The group we opened is closed at exit: left to interpreter teardown, gloo's threads
        # can be destroyed out of order and abort the process ("terminate called without an
        # active exception"; seen once, in a 2-rank test job on a loaded machine).
        atexit.register(_close_group)
    return Comm(dist.get_rank(), dist.get_world_size())


def _close_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def local_device(device: torch.device, comm: Comm) -> torch.device:
    """``cuda`` without an index means this rank's GPU (LOCAL_RANK) in a distributed run."""
    if comm.distributed and device.type == "cuda" and device.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device
