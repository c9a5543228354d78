"""Data-parallel DP-SGD over torch.distributed: who the process is, and the Poisson sampler of its part.

Launched by ``torchrun --nproc-per-node N`` (or inside an initialised process group),
:func:`dp_taft.fit` trains ONE model with Opacus' distributed machinery: the model is
wrapped in ``DifferentiallyPrivateDistributedDataParallel`` (parameters broadcast from
rank 0), every rank clips its own examples' gradients, Opacus' distributed optimizer adds
the Gaussian noise on rank 0 only and all-reduces the sum, so each step carries noise of
std σ·C exactly once. Rank 0 alone writes the ledger and checkpoints; reservation grants,
the run's state and the final report are broadcast from it.

Poisson sampling across ranks (:func:`dp_taft.privacy.data.poisson_sampler`): example i
belongs to rank ``i mod world`` and each rank includes each of its examples independently
with probability q, so the union over ranks is a Poisson(q) sample of the whole data set,
as accounted. Unlike Opacus' ``DistributedUniformWithReplacementSampler``, which skips a
rank's empty batch (and so desynchronises the ranks' steps and reveals emptiness), every
batch is yielded, empty or not.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

__all__ = ["Comm", "current", "local_device"]

T = TypeVar("T")


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
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out


def current(device: torch.device, enabled: bool | None) -> Comm:
    """The run's :class:`Comm`.

    ``enabled`` None: distributed when a process group with more than one rank is
    initialised, or when torchrun's environment (WORLD_SIZE > 1) asks for one, which is
    then initialised (gloo on CPU, nccl on CUDA). False: a single-process run even inside
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
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
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
