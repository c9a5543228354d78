"""The DP-SGD epoch loop: Poisson batches, write-ahead reservations, checkpoints, and the
position of a run with the provenance of its random streams."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from .checkpoint import Ledger
from .data import poisson_loader, poisson_sampler
from .distributed import Comm
from .engine import PrivateEngine
from .plan import Plan
from .randomness import NoiseStream, derive_seed, keyed_generator, secret_seed

__all__ = ["RunState", "EpochLoop"]

# Stream ids for the seeds derived from the run's base seed.
_NOISE, _SAMPLER, _AUGMENT = 0, 1, 2


@dataclass
class RunState:
    """Position in the run and the provenance of its random streams.

    ``seed`` is the base of every stream: the caller's, or a secret one from the OS
    CSPRNG. It is kept here, hence only in the run's private checkpoint, never in a
    report. ``stream`` numbers the random streams: 0 for a fresh run; after a crash, the
    steps between the last checkpoint and the crash may have drawn noise and batches that
    were already released, so the resumed run draws from a new stream (the ledger's
    reservation count, unique per crash) rather than replaying them. In secure mode noise
    and batches come from the OS CSPRNG and are never replayed.
    """

    seed: int
    step: int  # DP-SGD steps executed since the run began, that led to the current weights
    epoch: int
    in_epoch: int  # steps executed in the current epoch
    stream: int
    sampler_draws: int  # batches drawn from the current epoch's sampler generator
    partial_loss: tuple[float, int]  # (sum of losses, examples) so far this epoch
    fresh_stream: bool  # noise/augment generators must be seeded, not restored

    @classmethod
    def start(cls, seed: int | None, ledger: Ledger | None) -> "RunState":
        seed = secret_seed() if seed is None else seed
        stream = ledger.reservations if ledger is not None else 0  # > 0: a crash before the first checkpoint
        return cls(seed, 0, 0, 0, stream, 0, (0.0, 0), True)

    @classmethod
    def resume(cls, state: dict[str, Any], ledger: Ledger | None, seed: int | None) -> "RunState":
        saved = state["run"]
        if seed is not None and saved["seed"] != seed:
            raise ValueError(f"seed={seed} differs from the seed of the run being resumed; pass seed=None to resume it")
        run = cls(**{f.name: saved[f.name] for f in dataclasses.fields(cls)})
        run.fresh_stream = ledger is not None and ledger.steps != state["ledger_steps"]
        if run.fresh_stream:
            run.stream = ledger.reservations
            run.sampler_draws = 0
        return run

    def seed_generators(self, noise: NoiseStream, state: dict[str, Any] | None, augment: bool) -> None:
        """Key (fresh stream) or restore (clean resume) the noise stream, and seed augmentation.

        Secure mode keys nothing: its noise comes from the OS CSPRNG. Augmentation uses
        torch's global generator, which keeps 32 bits of a seed; the guarantee does not rely
        on its secrecy (DP-SGD is private for any fixed augmentation).
        """
        if self.fresh_stream or noise.kind == "secure":
            noise.seed(self.seed, _NOISE, self.stream)
            if augment:
                torch.manual_seed(derive_seed(self.seed, _AUGMENT, self.stream))
        else:
            noise.load_state(state["noise_rng"])
            if augment:
                torch.set_rng_state(state["torch_rng"])

    def sampler_rng(self, secure: bool) -> np.random.Generator | None:
        """This epoch's keyed coin-flip generator, the same on every rank (each keeps the flips
        of its own positions, so the batches are a single process's); None in secure mode (CSPRNG)."""
        # The trailing 0 is part of every run's sampler key: changing it would change seeded runs' batches.
        return None if secure else keyed_generator(self.seed, _SAMPLER, self.stream, self.epoch, 0)

    def advance(self, loss_sum: float, seen: int) -> None:
        self.step += 1
        self.in_epoch += 1
        self.sampler_draws += 1
        self.partial_loss = (loss_sum, seen)

    def next_epoch(self) -> None:
        self.epoch += 1
        self.in_epoch = 0
        self.sampler_draws = 0
        self.partial_loss = (0.0, 0)


@dataclass
class EpochLoop:
    """Runs the DP-SGD steps of one epoch: Poisson batches, write-ahead reservations, checkpoints.

    ``block``: steps per reservation and between checkpoints; ``physical``: largest batch
    run at once; ``augment``: applied to each physical image batch; ``after_step``: called
    after every DP-SGD step (post-processing of the released iterate only).
    """

    engine: PrivateEngine
    plan: Plan
    ledger: Ledger | None  # None when non-private, and on every rank but the main one
    comm: Comm
    block: int
    physical: int
    device: torch.device
    augment: Callable[[torch.Tensor], torch.Tensor] | None
    num_workers: int
    quiet: bool
    show_loss: bool  # the running training loss is noiseless (not private): shown only on request
    after_step: Callable[[], None] | None = None  # e.g. the LR schedule and the iterate average

    def run(self, run: RunState, data: Dataset, desc: str, save: Callable[[], None]) -> bool:
        """Train until the epoch ends; True when the budget guard stopped training."""
        self.engine.gsm.train()  # the previous epoch's evaluation left it in eval mode
        loss_sum, seen = run.partial_loss
        sampler = poisson_sampler(len(data), self.plan.sample_rate, steps=self.plan.steps_per_epoch - run.in_epoch,
                                  skip=run.sampler_draws, rng=run.sampler_rng(self.plan.secure_mode),
                                  comm=self.comm)
        loader = poisson_loader(data, sampler, num_workers=self.num_workers)
        bar = tqdm(total=self.plan.steps_per_epoch, initial=run.in_epoch, desc=desc, disable=self.quiet, leave=False)
        block_end, block_cut = run.step, False
        try:
            with BatchMemoryManager(data_loader=loader, max_physical_batch_size=self.physical,
                                    optimizer=self.engine.optimizer) as batches:
                for x, y, indices in batches:
                    if run.step == block_end:  # first physical batch of a new block of steps
                        granted, block_cut = self._reserve(run)
                        if granted == 0:
                            return True
                        block_end = run.step + granted
                    x = x.to(self.device)
                    if self.augment is not None and len(y):
                        x = self.augment(x)
                    with self.comm.guarded():
                        batch_loss, stepped = self.engine.physical_step(x, y.to(self.device), indices)
                    loss_sum, seen = loss_sum + batch_loss, seen + len(y)
                    if not stepped:
                        continue  # more physical batches of the same logical batch follow
                    run.advance(loss_sum, seen)
                    if self.after_step is not None:
                        self.after_step()
                    self._progress(bar, loss_sum, seen)
                    if run.step == block_end:
                        if block_cut:
                            return True
                        if run.in_epoch < self.plan.steps_per_epoch:
                            save()
            return False
        finally:
            bar.close()

    def _reserve(self, run: RunState) -> tuple[int, bool]:
        """(steps granted for the next block, whether the budget cut it short); reserved before any runs."""
        want = min(self.block, self.plan.steps_per_epoch - run.in_epoch)  # blocks end at epoch ends
        if self.plan.epsilon is None:
            return want, False

        def decide() -> int:  # the main rank decides and writes ahead, before any noise
            sigma, q = self.plan.noise_multiplier, self.plan.sample_rate
            allowed = self.ledger.affordable(sigma, q, want)
            if allowed:
                self.ledger.reserve(sigma, q, allowed)
            return allowed

        granted = self.comm.broadcast(self.comm.on_main(decide))
        return granted, granted < want

    def _progress(self, bar: tqdm, loss_sum: float, seen: int) -> None:
        if self.quiet:
            return
        postfix = {"loss (not private)": f"{loss_sum / max(seen, 1):.4f}"} if self.show_loss else {}
        if self.ledger is not None:  # ε of the reserved steps, the block in flight included
            postfix["eps"] = f"{self.ledger.epsilon():.3f}"
        bar.update(1)
        bar.set_postfix(postfix, refresh=False)
