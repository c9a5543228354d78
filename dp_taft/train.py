"""One DP-SGD training pipeline for TAFT, NLFT and linear probing: :func:`fit`.

DP-SGD through Opacus: Poisson sampling (Opacus' DPDataLoader), per-sample clipping
at C = ``max_grad_norm``, Gaussian noise of std σ·C per logical batch, σ calibrated
with :func:`accounting.noise_multiplier` so the planned run ends at the target ε.
Privacy is recorded in a write-ahead ledger (:class:`~dp_taft.privacy.checkpoint.Ledger`)
whose budget guard refuses any step that would exceed the target.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import accounting
import numpy as np
import torch
import torch.nn as nn
from opacus.grad_sample import prepare_module
from opacus.optimizers import DPOptimizer, get_optimizer_class
from opacus.utils.batch_memory_manager import BatchMemoryManager
from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .losses import make_loss
from .tangent import per_sample_gradients_only
from .privacy.accountant import OpacusPLDAccountant
from .privacy.checkpoint import CHECKPOINT_FILE, LEDGER_FILE, Ledger, atomic_save, load_checkpoint
from .privacy.data import FromPrefix, cache_prefix, poisson_loader, resolve_train_set
from .privacy.validate import (
    GRAD_SAMPLE_MODES,
    check_choice,
    check_delta,
    check_epsilon,
    check_examples,
    check_int,
    check_real,
    require_exact_layers,
    require_trainable,
)

__all__ = ["fit", "evaluate", "FitResult", "EpochRecord", "OPTIMIZERS", "ACCOUNTANTS"]

#: name -> factory(params, lr, momentum, weight_decay).
OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "sgd": lambda params, lr, momentum, wd: torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=wd),
    "adam": lambda params, lr, momentum, wd: torch.optim.Adam(params, lr=lr, weight_decay=wd),
    "adamw": lambda params, lr, momentum, wd: torch.optim.AdamW(params, lr=lr, weight_decay=wd),
}
#: Accounting methods of :mod:`accounting` that ``fit(accountant=...)`` accepts.
ACCOUNTANTS = ("pld", "rdp")

# Non-private training runs the same Opacus path with σ = 0 and a clipping norm no
# gradient reaches (clip factor min(1, C/‖g‖) = 1); C·σ = 0 exactly, so no noise.
_NO_CLIP = 1e30
# Stream ids for the seeds derived from `seed` (see _derive_seed).
_NOISE, _SAMPLER, _AUGMENT = 0, 1, 2
# Fields of the plan that fix the privacy guarantee; a resume must not change them.
_PRIVACY_KEYS = ("epsilon", "delta", "sample_rate", "max_grad_norm", "dataset_size", "accountant", "prior")


@dataclass(frozen=True)
class EpochRecord:
    """Metrics at the end of one epoch (or of a run stopped by the budget guard).

    ``train_loss``: mean loss over the training examples seen this epoch (NaN if none). It
    is computed from the private data without noise and is NOT differentially private:
    use it for debugging, do not publish it;
    ``eval_loss``/``eval_accuracy`` (accuracy in [0, 1]): on ``eval_set`` or None;
    ``epsilon_spent``: ε of the ledger so far (None when non-private);
    ``steps``: DP-SGD steps executed since the run began; ``wall_time_s``: seconds this epoch took.
    """

    epoch: int
    train_loss: float
    eval_loss: float | None
    eval_accuracy: float | None
    epsilon_spent: float | None
    steps: int
    wall_time_s: float


@dataclass
class FitResult:
    """What :func:`fit` returns.

    ``model``: the trained model (the object passed in, left in eval mode); ``report``: the privacy report
    of every reserved step (None when ``epsilon`` is None); ``history``: one
    :class:`EpochRecord` per epoch; ``noise_multiplier`` σ (0 when non-private);
    ``sample_rate`` q; ``steps``: DP-SGD steps executed, over all resumed runs.
    """

    model: nn.Module
    report: accounting.PrivacyReport | None
    history: list[EpochRecord]
    noise_multiplier: float
    sample_rate: float
    steps: int


def fit(
    model: nn.Module,
    train_set: Dataset | DataLoader,
    *,
    epsilon: float | None,
    delta: float | None = None,
    epochs: int = 1,
    batch_size: int = 256,
    max_grad_norm: float = 1.0,
    lr: float = 0.1,
    optimizer: str = "sgd",
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    loss: str = "ce",
    kappa: float = 15.0,
    eval_set: Dataset | None = None,
    physical_batch_size: int | None = None,
    grad_sample_mode: str = "hooks",
    accountant: str = "pld",
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
    cache_prefix: bool = True,
    device: str | torch.device = "cpu",
    seed: int = 0,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 50,
    quiet: bool = False,
    num_workers: int = 0,
    prior: Sequence[accounting.Segment] = (),
) -> FitResult:
    """Train ``model`` with DP-SGD to an (``epsilon``, ``delta``) target, or non-privately.

    Args:
        model: a module with ``num_classes`` whose trainable parameters all sit in layers
            Opacus samples exactly, e.g. from :mod:`dp_taft.methods` (TAFT, NLFT, probe).
            Trained in place and returned as ``result.model``.
        train_set: a map-style dataset of (image (C, H, W) float, integer label), or an
            Opacus ``DPDataLoader`` (its dataset and sample rate are used).
        epsilon: target ε > 0; None trains without privacy (no clipping, no noise, no report).
        delta: target δ in (0, 1/N); None means 1/(10·N).
        epochs: >= 1; the plan is T = epochs·round(1/q) steps with q = batch_size/N.
        batch_size: expected logical (Poisson) batch size, in [1, N].
        max_grad_norm: per-sample clipping norm C > 0.
        lr, optimizer ("sgd", "adam", "adamw"), momentum (SGD, in [0, 1)), weight_decay (>= 0).
        loss: "ce" (cross-entropy) or "square" (mean over classes of (f − κ·onehot)²), κ = ``kappa``.
        eval_set: dataset evaluated (loss, accuracy) at every epoch end; not privacy-protected.
        physical_batch_size: largest batch run at once (memory); default ``batch_size``.
        grad_sample_mode: "hooks" (per-sample gradients) or "ghost" (ghost clipping).
        accountant: "pld" or "rdp" (:mod:`accounting` method).
        augment: callable applied to each physical image batch (B, C, H, W) -> same shape;
            disables the prefix cache.
        cache_prefix: for models with ``prefix``/``forward_from_prefix`` and no ``augment``,
            compute the frozen prefix once per example and train from the cache.
        device: where training runs ("cpu", "cuda", ...).
        seed: non-negative integer; fixes Poisson sampling, noise and augmentation.
        checkpoint_dir: makes the run resumable (see :mod:`dp_taft.privacy.checkpoint`): call ``fit``
            again with the same directory and privacy settings. After a clean stop the run continues
            exactly; after a crash, the steps reserved since the last checkpoint stay counted and the
            resumed run draws fresh batches and noise (re-releasing a step with the same randomness
            on a slightly different gradient would leak), so it may stop early at the budget.
        checkpoint_every: steps between checkpoints (>= 1); also the ledger's reservation block.
        quiet: no progress bars.
        num_workers: DataLoader worker processes (>= 0).
        prior: DP-SGD segments already run on the SAME private data (e.g. an earlier
            training stage's ``result.report.history``). They are written first into the
            ledger, σ is calibrated so that prior + this run ends at ``epsilon``, and the
            report covers both. Only with ``epsilon`` set.

    Raises:
        ValueError / UnsupportedModelError: bad arguments, data or model, with what to change;
            always before any step is taken.
    """
    # ---- arguments that need no data
    epsilon = check_epsilon(epsilon)
    max_grad_norm = check_real("max_grad_norm", max_grad_norm, "per-sample clipping norm C")
    epochs = check_int("epochs", epochs, "passes over the data", low=1)
    lr = check_real("lr", lr, "learning rate", low_open=False)
    momentum = check_real("momentum", momentum, "SGD momentum", low_open=False)
    if not momentum < 1:
        raise ValueError(f"momentum must be in [0, 1) (SGD momentum), got {momentum}")
    weight_decay = check_real("weight_decay", weight_decay, "L2 penalty", low_open=False)
    criterion = make_loss(loss, kappa)
    check_choice("optimizer", optimizer, tuple(OPTIMIZERS))
    check_choice("grad_sample_mode", grad_sample_mode, GRAD_SAMPLE_MODES)
    check_choice("accountant", accountant, ACCOUNTANTS)
    checkpoint_every = check_int("checkpoint_every", checkpoint_every, "steps between checkpoints", low=1)
    num_workers = check_int("num_workers", num_workers, "DataLoader workers", low=0)
    seed = check_int("seed", seed, "random seed", low=0)
    prior = tuple(prior)
    if prior and epsilon is None:
        raise ValueError("prior is a privacy history to compose with; it needs a target epsilon (got epsilon=None)")
    if not all(isinstance(s, accounting.Segment) for s in prior):
        raise ValueError("prior must be a sequence of accounting.Segment (e.g. an earlier result.report.history)")
    if augment is not None and not callable(augment):
        raise ValueError(f"augment must be a callable on image batches or None, got {type(augment).__name__}")
    device = torch.device(device)

    # ---- model
    params = require_trainable(model)
    require_exact_layers(model, grad_sample_mode)
    num_classes = getattr(model, "num_classes", None)
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError("the model must have an integer attribute num_classes >= 1 (timm models and dp_taft.methods do)")

    # ---- data
    dataset, loader_rate = resolve_train_set(train_set)
    n = len(dataset)
    if n == 0:
        raise ValueError("train_set is empty: DP-SGD needs at least one training example")
    if loader_rate is None:
        batch_size = check_int("batch_size", batch_size, f"expected Poisson batch size, at most N={n}", low=1, high=n)
        sample_rate = batch_size / n
    else:
        sample_rate = loader_rate
    physical = (
        max(1, round(sample_rate * n))
        if physical_batch_size is None
        else check_int("physical_batch_size", physical_batch_size, "examples per forward/backward", low=1)
    )
    if epsilon is not None:
        delta = check_delta(delta, n)
    check_examples(dataset, model, num_classes, "train_set")
    if eval_set is not None:
        check_examples(eval_set, model, num_classes, "eval_set")
    steps_per_epoch = max(1, round(1 / sample_rate))
    planned_steps = epochs * steps_per_epoch

    # ---- privacy plan, ledger and checkpoint
    plan = {
        "epsilon": epsilon,
        "delta": delta if epsilon is not None else None,
        "sample_rate": sample_rate,
        "max_grad_norm": max_grad_norm,
        "dataset_size": n,
        "accountant": accountant,
        "prior": [dataclasses.asdict(segment) for segment in prior],
    }
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    state = None
    if ckpt_dir is not None:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        state = load_checkpoint(ckpt_dir / CHECKPOINT_FILE)
    if state is not None:
        _check_resumable(state["plan"], plan, ckpt_dir)
        sigma = state["plan"]["noise_multiplier"]
    elif epsilon is None:
        sigma = 0.0
    else:
        sigma = _calibrate(epsilon, delta, sample_rate, planned_steps, accountant, prior)
    plan["noise_multiplier"] = sigma
    ledger = None
    if epsilon is not None:
        ledger = Ledger(
            ckpt_dir / LEDGER_FILE if ckpt_dir is not None else None,
            method=accountant, target_epsilon=epsilon, delta=delta,
        )
        if state is not None and ledger.steps < state["ledger_steps"]:
            raise ValueError(
                f"{ckpt_dir / LEDGER_FILE} records {ledger.steps} steps but the checkpoint was written after "
                f"{state['ledger_steps']} were reserved: the ledger was lost or truncated, and resuming would "
                "under-report the privacy spent. Restore the ledger or start a fresh run in a new checkpoint_dir."
            )
        if ledger.steps == 0:
            for segment in prior:  # spent before this run: recorded ahead of everything else
                ledger.reserve(segment.noise_multiplier, segment.sample_rate, segment.steps)
        elif tuple(ledger.entries[: len(prior)]) != prior:
            raise ValueError(
                f"{ckpt_dir / LEDGER_FILE} does not start with the given prior history; resume with the "
                "same prior, or start a fresh run in a new checkpoint_dir."
            )
        if not prior and accounting.epsilon(sigma, sample_rate, planned_steps, delta, method=accountant) <= epsilon:
            ledger.vouch(sigma, sample_rate, planned_steps)

    # ---- training objects (all Opacus): per-sample gradients, clipping, noise
    model.to(device)
    use_cache = cache_prefix and augment is None and hasattr(model, "prefix") and hasattr(model, "forward_from_prefix")
    if use_cache:
        train_data = _cache(model, dataset, physical, device, quiet, "caching prefix (train)")
        eval_data = _cache(model, eval_set, physical, device, quiet, "caching prefix (eval)") if eval_set is not None else None
        module: nn.Module = FromPrefix(model)
    else:
        train_data, eval_data, module = dataset, eval_set, model
    clip = max_grad_norm if epsilon is not None else _NO_CLIP
    ghost = grad_sample_mode == "ghost"
    gsm = prepare_module(
        module, grad_sample_mode=grad_sample_mode, batch_first=True, loss_reduction="mean",
        **({"max_grad_norm": clip} if ghost else {}),
    )
    noise_rng = torch.Generator(device=device)
    dp_opt: DPOptimizer = get_optimizer_class(clipping="flat", distributed=False, grad_sample_mode=grad_sample_mode)(
        OPTIMIZERS[optimizer](params, lr, momentum, weight_decay),
        noise_multiplier=sigma, max_grad_norm=clip, expected_batch_size=sample_rate * n,
        loss_reduction="mean", generator=noise_rng,
    )
    # Counts steps as Opacus takes them (after their noise): the "executed" side of the ledger.
    executed = OpacusPLDAccountant()
    dp_opt.attach_step_hook(executed.get_optimizer_hook_fn(sample_rate=sample_rate))
    loss_fn = DPLossFastGradientClipping(gsm, dp_opt, criterion, "mean") if ghost else criterion

    # ---- start or resume
    run = _RunState.start(seed, ledger) if state is None else _RunState.resume(state, ledger, seed)
    if state is not None:
        _load_trainable(model, state["trainable"])
        dp_opt.load_state_dict(state["optimizer"])
    run.seed_generators(noise_rng, state, seed, augment is not None)
    history = [EpochRecord(**r) for r in (state["history"] if state else [])]

    def save() -> None:
        if ckpt_dir is not None:
            atomic_save(run.checkpoint(plan, model, dp_opt, noise_rng, history, ledger), ckpt_dir / CHECKPOINT_FILE)

    epochs_runner = _Epochs(
        gsm=gsm, dp_opt=dp_opt, loss_fn=loss_fn, executed=executed, ledger=ledger, noise_multiplier=sigma,
        sample_rate=sample_rate, steps_per_epoch=steps_per_epoch, block=checkpoint_every, physical=physical,
        device=device, augment=None if use_cache else augment, num_workers=num_workers, quiet=quiet,
    )
    try:
        # In hooks mode the optimizer builds .grad from the per-sample gradients, so the
        # tangent's ΔW layers skip the summed gradient autograd would compute for nothing;
        # ghost clipping's second backward needs it.
        with warnings.catch_warnings(), (nullcontext() if ghost else per_sample_gradients_only(model)):
            # Opacus' backward hooks on the first trainable layer, whose input never needs a
            # gradient, make torch warn on every step; the per-sample gradients are exact.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            stopped = False
            while run.epoch < epochs and not stopped:
                started = time.perf_counter()
                stopped = epochs_runner.run(run, train_data, f"epoch {run.epoch + 1}/{epochs}", save)
                eval_loss, eval_acc = (None, None) if eval_data is None else evaluate(module, eval_data, criterion, physical, device)
                loss_sum, seen = run.partial_loss
                history.append(EpochRecord(
                    epoch=run.epoch, train_loss=loss_sum / seen if seen else math.nan, eval_loss=eval_loss,
                    eval_accuracy=eval_acc, epsilon_spent=ledger.epsilon() if ledger is not None else None,
                    steps=run.step, wall_time_s=time.perf_counter() - started,
                ))
                if not quiet:
                    tqdm.write(_describe(history[-1], epochs))
                if not stopped:
                    run.next_epoch(seed)
                save()
        if stopped:
            warnings.warn(
                f"privacy budget epsilon={epsilon} reached after {run.step} steps (ledger: {ledger.steps} "
                f"reserved); training stopped before the planned {planned_steps} steps.",
                stacklevel=2,
            )
    finally:
        gsm.to_standard_module()  # removes Opacus hooks and per-sample attributes from the parameters
        model.eval()

    report = None
    if ledger is not None:
        report = accounting.PrivacyReport.from_history(
            ledger.history, delta, method=accountant, dataset_size=n, max_grad_norm=max_grad_norm,
            target_epsilon=epsilon,
            notes=f"dp_taft.fit: {ledger.steps} steps reserved in the write-ahead ledger, {run.step} executed",
        )
    return FitResult(model=model, report=report, history=history, noise_multiplier=sigma,
                     sample_rate=sample_rate, steps=run.step)


# --------------------------------------------------------------------------- helpers
@functools.lru_cache(maxsize=64)  # a pure function of its arguments, and the costliest call of a short run
def _calibrate(epsilon: float, delta: float, sample_rate: float, steps: int, method: str,
               prior: tuple[accounting.Segment, ...] = ()) -> float:
    try:
        return accounting.noise_multiplier(epsilon, delta, sample_rate, steps, method=method, prior=prior)
    except ValueError as e:
        raise ValueError(
            f"target epsilon={epsilon} (delta={delta:.3g}) is unreachable in T={steps} steps at sample rate "
            f"q={sample_rate:.4g} within the noise-multiplier search bounds ({e}). Raise epsilon, train "
            "fewer epochs or use a smaller batch_size."
        ) from e


def _check_resumable(saved: dict[str, Any], plan: dict[str, Any], ckpt_dir: Path) -> None:
    changed = [f"{k}: saved {saved[k]!r}, now {plan[k]!r}" for k in _PRIVACY_KEYS if saved[k] != plan[k]]
    if changed:
        raise ValueError(
            f"checkpoint_dir {str(ckpt_dir)!r} holds a run with other privacy settings ({'; '.join(changed)}). "
            "Resume with the same epsilon, delta, batch size, max_grad_norm, dataset and accountant, "
            "or start a fresh run in a new checkpoint_dir."
        )


def _derive_seed(seed: int, *keys: int) -> int:
    """Independent 64-bit seed per (seed, stream id, ...) so streams never overlap."""
    low, high = np.random.SeedSequence([seed, *keys]).generate_state(2, dtype=np.uint32)
    return int(low) | int(high) << 32


@dataclass
class _RunState:
    """Position in the run and the provenance of its random streams.

    ``stream`` numbers the random streams: 0 for a fresh run; after a crash, the steps
    between the last checkpoint and the crash may have drawn noise and batches that
    were already released, so the resumed run draws from a new stream (the ledger's
    reservation count, unique per crash) rather than replaying them.
    """

    step: int  # DP-SGD steps executed since the run began
    epoch: int
    in_epoch: int  # steps executed in the current epoch
    stream: int
    sampler_seed: int
    sampler_draws: int  # batches drawn from the current sampler generator
    partial_loss: tuple[float, int]  # (sum of losses, examples) so far this epoch
    fresh_stream: bool  # noise/augment generators must be seeded, not restored

    @classmethod
    def start(cls, seed: int, ledger: Ledger | None) -> "_RunState":
        stream = ledger.reservations if ledger is not None else 0  # > 0: a crash before the first checkpoint
        return cls(0, 0, 0, stream, _derive_seed(seed, _SAMPLER, stream, 0), 0, (0.0, 0), True)

    @classmethod
    def resume(cls, state: dict[str, Any], ledger: Ledger | None, seed: int) -> "_RunState":
        run = cls(**{f.name: state["run"][f.name] for f in dataclasses.fields(cls)})
        run.fresh_stream = ledger is not None and ledger.steps != state["ledger_steps"]
        if run.fresh_stream:
            run.stream = ledger.reservations
            run.sampler_seed = _derive_seed(seed, _SAMPLER, run.stream, run.epoch)
            run.sampler_draws = 0
        return run

    def seed_generators(self, noise_rng: torch.Generator, state: dict[str, Any] | None, seed: int, augment: bool) -> None:
        if self.fresh_stream:
            noise_rng.manual_seed(_derive_seed(seed, _NOISE, self.stream))
            if augment:
                torch.manual_seed(_derive_seed(seed, _AUGMENT, self.stream))
        else:
            noise_rng.set_state(state["noise_rng"])
            if augment:
                torch.set_rng_state(state["torch_rng"])

    def advance(self) -> None:
        self.step += 1
        self.in_epoch += 1
        self.sampler_draws += 1

    def next_epoch(self, seed: int) -> None:
        self.epoch += 1
        self.in_epoch = 0
        self.sampler_seed = _derive_seed(seed, _SAMPLER, self.stream, self.epoch)
        self.sampler_draws = 0
        self.partial_loss = (0.0, 0)

    def checkpoint(self, plan: dict[str, Any], model: nn.Module, dp_opt: DPOptimizer, noise_rng: torch.Generator,
                   history: list[EpochRecord], ledger: Ledger | None) -> dict[str, Any]:
        return {
            "plan": plan,
            "run": {**dataclasses.asdict(self), "fresh_stream": False},
            "ledger_steps": ledger.steps if ledger is not None else None,
            "trainable": {k: p.detach().cpu().clone() for k, p in model.named_parameters() if p.requires_grad},
            "optimizer": dp_opt.state_dict(),
            "noise_rng": noise_rng.get_state(),
            "torch_rng": torch.get_rng_state(),
            "history": [dataclasses.asdict(r) for r in history],
        }


@dataclass
class _Epochs:
    """Runs the DP-SGD steps of one epoch: Poisson batches, write-ahead reservations, checkpoints."""

    gsm: nn.Module
    dp_opt: DPOptimizer
    loss_fn: Callable
    executed: OpacusPLDAccountant  # counts steps as Opacus takes them (after their noise)
    ledger: Ledger | None
    noise_multiplier: float
    sample_rate: float
    steps_per_epoch: int
    block: int  # steps per reservation and between checkpoints
    physical: int
    device: torch.device
    augment: Callable[[torch.Tensor], torch.Tensor] | None
    num_workers: int
    quiet: bool

    def run(self, run: _RunState, data: Dataset, desc: str, save: Callable[[], None]) -> bool:
        """Train until the epoch ends; True when the budget guard stopped training."""
        self.gsm.train()
        loss_sum, seen = run.partial_loss
        loader = poisson_loader(
            data, self.sample_rate, steps=self.steps_per_epoch - run.in_epoch, skip=run.sampler_draws,
            generator=torch.Generator().manual_seed(run.sampler_seed), num_workers=self.num_workers,
        )
        bar = tqdm(total=self.steps_per_epoch, initial=run.in_epoch, desc=desc, disable=self.quiet, leave=False)
        block_end, block_cut = run.step, False
        try:
            with BatchMemoryManager(data_loader=loader, max_physical_batch_size=self.physical, optimizer=self.dp_opt) as batches:
                for x, y in batches:
                    if run.step == block_end:  # first physical batch of a new block of steps
                        granted, block_cut = self._reserve(run)
                        if granted == 0:
                            return True
                        block_end = run.step + granted
                    before = len(self.executed)
                    loss_sum, seen = _train_physical_batch(
                        self.gsm, self.dp_opt, self.loss_fn, x.to(self.device), y.to(self.device), self.augment,
                        loss_sum, seen,
                    )
                    if len(self.executed) == before:
                        continue  # more physical batches of the same logical batch follow
                    run.advance()
                    run.partial_loss = (loss_sum, seen)
                    self._progress(bar, loss_sum, seen)
                    if run.step == block_end:
                        if block_cut:
                            return True
                        if run.in_epoch < self.steps_per_epoch:
                            save()
            return False
        finally:
            bar.close()

    def _reserve(self, run: _RunState) -> tuple[int, bool]:
        """(steps granted for the next block, whether the budget cut it short); reserved before any runs."""
        want = min(self.block, self.steps_per_epoch - run.in_epoch)  # blocks end at epoch ends
        if self.ledger is None:
            return want, False
        granted = self.ledger.affordable(self.noise_multiplier, self.sample_rate, want)
        if granted:
            self.ledger.reserve(self.noise_multiplier, self.sample_rate, granted)  # write-ahead: before any noise
        return granted, granted < want

    def _progress(self, bar: tqdm, loss_sum: float, seen: int) -> None:
        if self.quiet:
            return
        postfix = {"loss": f"{loss_sum / max(seen, 1):.4f}"}
        if self.ledger is not None:  # ε of the reserved steps, the block in flight included
            postfix["eps"] = f"{self.ledger.epsilon():.3f}"
        bar.update(1)
        bar.set_postfix(postfix, refresh=False)


def _load_trainable(model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    own = {k: p for k, p in model.named_parameters() if p.requires_grad}
    if own.keys() != saved.keys():
        raise ValueError(
            "the checkpoint's trainable parameters do not match this model (was it saved from another "
            f"method or k?): missing {sorted(own.keys() - saved.keys())}, unexpected {sorted(saved.keys() - own.keys())}"
        )
    with torch.no_grad():
        for k, p in own.items():
            p.copy_(saved[k])


def _train_physical_batch(gsm: nn.Module, dp_opt: DPOptimizer, loss_fn: Callable, x: torch.Tensor, y: torch.Tensor,
                          augment: Callable | None, loss_sum: float, seen: int) -> tuple[float, int]:
    """Forward/backward one physical batch and let Opacus clip, accumulate and (at the
    end of the logical batch) add noise and step. Returns the updated (loss sum, examples)."""
    if len(y) == 0:
        # An empty Poisson batch still releases a noisy (all-noise) update: skipping it
        # would reveal that the batch was empty, which the accounting does not cover.
        for p in dp_opt.params:
            p.grad = torch.zeros_like(p)
            p.grad_sample = p.new_zeros((0, *p.shape))
    else:
        if augment is not None:
            x = augment(x)
        batch_loss = loss_fn(gsm(x), y)
        batch_loss.backward()
        loss_sum += float(batch_loss.item()) * len(y)
        seen += len(y)
    dp_opt.step()
    dp_opt.zero_grad()
    return loss_sum, seen


@torch.no_grad()
@torch.no_grad()
def evaluate(module: nn.Module, data: Dataset, criterion: nn.Module, batch_size: int,
             device: torch.device) -> tuple[float, float]:
    """(mean loss, accuracy in [0, 1]) of ``module`` on ``data`` of (input, label), in eval mode."""
    module.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for x, y in DataLoader(data, batch_size=batch_size, shuffle=False):
        x, y = x.to(device), y.to(device)
        logits = module(x)
        loss_sum += float(criterion(logits, y)) * len(y)
        correct += int((logits.argmax(dim=1) == y).sum())
        count += len(y)
    return loss_sum / count, correct / count


def _cache(model: nn.Module, data: Dataset, batch_size: int, device: torch.device, quiet: bool, desc: str) -> Dataset:
    model.eval()
    return cache_prefix(model, data, batch_size=batch_size, device=device, quiet=quiet, desc=desc)


def _describe(r: EpochRecord, epochs: int) -> str:
    parts = [f"epoch {r.epoch + 1}/{epochs}", f"train loss {r.train_loss:.4f}"]
    if r.eval_loss is not None:
        parts += [f"eval loss {r.eval_loss:.4f}", f"eval acc {r.eval_accuracy:.3f}"]
    if r.epsilon_spent is not None:
        parts.append(f"eps {r.epsilon_spent:.3f}")
    return ", ".join(parts) + f", {r.steps} steps, {r.wall_time_s:.1f}s"
