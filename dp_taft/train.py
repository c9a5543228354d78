"""One DP-SGD training pipeline for TAFT, NLFT and linear probing: :func:`fit`.

DP-SGD through Opacus: Poisson sampling, per-sample clipping at C = ``max_grad_norm``,
Gaussian noise of std σ·C per logical batch, σ calibrated with
:func:`accounting.noise_multiplier` so the planned run ends at the target ε. Privacy is
recorded in a write-ahead ledger (:class:`~dp_taft.privacy.checkpoint.Ledger`) whose
budget guard refuses any step that would exceed the target.

``fit`` reads as four steps: a frozen :class:`~dp_taft.privacy.plan.Plan` (what will run
and what it costs), the ledger and checkpoint, the private engine
(:class:`~dp_taft.privacy.engine.PrivateEngine`: Opacus module, optimizer, loss), and the
epoch loop (:class:`~dp_taft.privacy.loop.EpochLoop`).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import accounting
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .config import ACCOUNTANTS, FIT_OPTIONS, OPTIMIZERS, OPTIONS, TrainConfig, describe_unknown
from .postprocessing import StepPostProcessing
from .privacy.checkpoint import CHECKPOINT_FILE, atomic_save, load_checkpoint, private_dir
from .privacy.data import FromPrefix, Indexed, cache_prefix, collate_examples
from .privacy.distributed import current as distributed_comm
from .privacy.distributed import Comm, local_device
from .privacy.engine import GradSampleHook, PrivateEngine
from .privacy.loop import EpochLoop, RunState
from .privacy.plan import Plan, open_ledger
from .privacy.randomness import NoiseStream
from .privacy.precision import autocast
from .privacy.prefix_cache import CacheSpec
from .privacy.rank_rows import RankRows, own_rows
from .privacy.validate import check_arguments, check_data, require_trainable, resolve_grad_sample_mode

__all__ = ["fit", "evaluate", "FitResult", "EpochRecord", "OPTIMIZERS", "ACCOUNTANTS"]


@dataclass(frozen=True)
class EpochRecord:
    """Metrics at the end of one epoch (or of a run stopped by the budget guard).

    ``train_loss``: mean loss over the training examples seen this epoch (NaN if none). It
    is computed from the private data without noise and is NOT differentially private:
    use it for debugging, do not publish it;
    ``eval_loss``/``eval_accuracy`` (accuracy in [0, 1]): on ``eval_set`` or None;
    ``epsilon_spent``: ε of the ledger so far (None when non-private);
    ``steps``: DP-SGD steps behind the current weights; ``wall_time_s``: seconds this epoch took.
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
    ``sample_rate`` q; ``steps``: DP-SGD steps behind the returned weights (after a crash,
    steps run after the last checkpoint were discarded; the report counts them all).
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
    config: TrainConfig | None = None,
    *,
    eval_set: Dataset | None = None,
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
    prior: Sequence[accounting.Segment] | accounting.PrivacyReport = (),
    stage: str | None = None,
    grad_sample_hook: GradSampleHook | None = None,
    **options: Any,
) -> FitResult:
    """Train ``model`` with DP-SGD to the (ε, δ) target of its options, or non-privately.

    The options (ε, δ, epochs, batch size, learning rate, clipping, caching, device,
    checkpoints, ...) are those of :class:`~dp_taft.config.TrainConfig`'s ``privacy``,
    ``optim``, ``data`` and ``run`` groups, documented there: pass a ``config``, flat
    keywords (``fit(model, data, epsilon=3.0, lr=0.5)``), or both (keywords override the
    config). ``epsilon`` has no default: a target ε > 0, or None to train without privacy
    (no clipping, no noise, no report). The config's ``method`` group is not read here
    (:func:`dp_taft.finetune` builds the model it names).

    Args:
        model: a module with ``num_classes`` whose trainable parameters all sit in layers
            Opacus samples exactly, e.g. from :mod:`dp_taft.methods` (TAFT, NLFT, probe).
            Trained in place and returned as ``result.model``.
        train_set: a map-style dataset of (image (C, H, W) float, integer label), or an
            Opacus ``DPDataLoader`` (its dataset and sample rate are used). Pretrained weights
            expect their own input size and normalisation: transform the images with
            ``dp_taft.backbone.eval_transform(data_config(vit))`` (e.g. through
            ``dp_taft.images.load_images(folder, transform)``).
        config: the options; None: the defaults (then ``epsilon`` must be a keyword).
        eval_set: dataset evaluated (loss, accuracy) at every epoch end; not privacy-protected.
        augment: callable applied to each physical image batch (B, C, H, W) -> same shape;
            disables the prefix cache.
        prior: DP-SGD segments already run on the SAME private data, or the report of that
            earlier run (e.g. a first stage's ``result.report``). They are written first into
            the ledger, σ is calibrated so that prior + this run ends at ``epsilon``, and the
            report covers both. Only with ``epsilon`` set.
        stage: label of this run's segments in the report (e.g. "taft"); with a ``prior``,
            unlabelled prior segments are labelled "prior" and this run's "fit" by default.
        grad_sample_hook: ``hook(indices, params)`` called after each non-empty physical
            batch's backward and before Opacus clips it (``grad_sample_mode="hooks"`` only):
            ``indices`` are the rows' positions in ``train_set``, ``params`` the trainable
            parameters, each with ``.grad_sample`` (B, *shape) to read or overwrite in place.
            Used by :mod:`dp_taft.audit` to inject gradient canaries; clipping, noise and
            accounting are unchanged, so a row that depends only on its own example keeps the guarantee.
            A :class:`~dp_taft.privacy.engine.ClippedSumHook` also runs with an explicit
            ``grad_sample_mode="bk"`` ("auto" picks "hooks" for any hook): its claimed rows skip
            the forward and backward, and it adds their gradients to the clipped sum unclipped:
            they are trusted (an auditing instrument), so one of norm > C voids the guarantee.
        **options: flat option names of ``config``'s privacy/optim/data/run groups.

    Raises:
        TypeError: an unknown option name (the message names it and the known ones).
        ValueError / UnsupportedModelError: bad options, data or model (including a missing
            ``epsilon``), with what to change; always before any step is taken.
    """
    # ---- 1. the plan: arguments, model, data, and σ calibrated for the whole run
    args = check_arguments(_options(config, options).fit_options(), prior=prior, stage=stage, augment=augment,
                           grad_sample_hook=grad_sample_hook)
    params = require_trainable(model)
    mode = resolve_grad_sample_mode(model, args["grad_sample_mode"],
                                    per_sample_needed=grad_sample_hook is not None or args["clipping"] == "automatic")
    dataset, sample_rate, physical, delta = check_data(model, train_set, eval_set, args)
    prior_segments, prior_stages = _prior_history(prior)
    plan = Plan(epsilon=args["epsilon"], delta=delta, sample_rate=sample_rate, max_grad_norm=args["max_grad_norm"],
                dataset_size=len(dataset), accountant=args["accountant"], prior=prior_segments, epochs=args["epochs"],
                secure_mode=args["secure_mode"])

    # ---- 2. ledger and checkpoint: rank 0 writes them and decides the run's state
    comm = distributed_comm(torch.device(args["device"]), args["distributed"])
    device = local_device(torch.device(args["device"]), comm)
    ckpt_dir = args["checkpoint_dir"]
    plan, state, ledger, run = _open_run(plan, ckpt_dir, args["seed"], comm)

    # ---- 3. the private engine
    model.to(device)
    use_cache = augment is None and hasattr(model, "prefix") and hasattr(model, "forward_from_prefix")
    train_data, eval_data, module = _training_view(model, dataset, eval_set, use_cache, physical, device, comm, args)
    noise = NoiseStream(device, args["secure_mode"])
    engine = PrivateEngine.build(
        model, module, OPTIMIZERS[args["optimizer"]](params, args["lr"], args["momentum"], args["weight_decay"]),
        args["criterion"], grad_sample_mode=mode, noise_multiplier=plan.noise_multiplier,
        max_grad_norm=None if plan.epsilon is None else plan.max_grad_norm,
        expected_batch_size=sample_rate * len(dataset), noise=noise, hook=grad_sample_hook, comm=comm,
        normalize=(plan.max_grad_norm, args["clipping_gamma"]) if args["clipping"] == "automatic" else None,
        precision=args["precision"],
    )
    post = StepPostProcessing.build(engine, params, plan, args["lr_schedule"], args["warmup"], args["averaging"],
                                    args["tail_fraction"], args["ema_decay"])
    if state is not None:
        _load_trainable(model, state["trainable"])
        engine.optimizer.load_state_dict(state["optimizer"])
        post.load_state_dict(state.get("post"))
    run.seed_generators(noise, state, augment is not None)
    history = [EpochRecord(**r) for r in (state["history"] if state else [])]

    def save() -> None:  # rank 0 writes; a failure there stops every rank at once
        if ckpt_dir is not None:
            comm.on_main(lambda: atomic_save(_checkpoint(plan, run, model, engine, noise, history, ledger, post),
                                             ckpt_dir / CHECKPOINT_FILE))

    # ---- 4. the epoch loop
    loop = EpochLoop(engine, plan, ledger, comm, block=args["checkpoint_every"], physical=physical, device=device,
                     augment=augment,  # None whenever the cache is used
                     num_workers=args["num_workers"], quiet=args["quiet"], show_loss=args["show_train_loss"],
                     after_step=post.after_step)
    stopped = False
    with engine.training():
        while run.epoch < plan.epochs and not stopped:
            started = time.perf_counter()
            stopped = loop.run(run, train_data, f"epoch {run.epoch + 1}/{plan.epochs}", save)
            with post.evaluated():
                history.append(_epoch_record(run, module, eval_data, args, physical, device, comm, ledger, started))
            if not args["quiet"]:
                tqdm.write(_describe(history[-1], plan.epochs, args["show_train_loss"]))
            if not stopped:
                run.next_epoch()
            save()
    post.finish()
    report = comm.on_main(lambda: None if ledger is None else plan.report(ledger, run.step, prior_stages, stage))
    report, history = comm.broadcast((report, history))  # every rank returns rank 0's ledger-based view
    if stopped:
        warnings.warn(
            f"privacy budget epsilon={plan.epsilon} reached after {run.step} steps (ledger: {report.steps} "
            f"reserved); training stopped before the planned {plan.planned_steps} steps.",
            stacklevel=2,
        )
    return FitResult(model=model, report=report, history=history, noise_multiplier=plan.noise_multiplier,
                     sample_rate=sample_rate, steps=run.step)


# --------------------------------------------------------------------------- helpers
def _options(config: TrainConfig | None, options: dict[str, Any]) -> TrainConfig:
    """``config`` (default: the defaults) with fit's keyword ``options``; TypeError for a name
    fit does not take, as Python's own for an unexpected keyword."""
    if config is not None and not isinstance(config, TrainConfig):
        raise TypeError(f"fit()'s config must be a dp_taft.TrainConfig or None, got {type(config).__name__} "
                        "(pass the options as keywords, or TrainConfig.create(**options))")
    unknown = set(options) - FIT_OPTIONS
    if unknown:
        method = " (method options are read by dp_taft.finetune, not by fit)" if unknown <= set(OPTIONS) else ""
        raise TypeError(f"fit() got an {describe_unknown('option', unknown, FIT_OPTIONS)}{method}")
    return (config or TrainConfig()).replace(**options)


def _open_run(plan: Plan, ckpt_dir: Path | None, seed: int | None, comm: Comm
              ) -> tuple[Plan, dict[str, Any] | None, Any, RunState]:
    """(calibrated or resumed plan, checkpoint state or None, ledger (rank 0; None when non-private),
    run state) from ``ckpt_dir``'s checkpoint if there is one."""
    state = None
    if ckpt_dir is not None:
        private_dir(ckpt_dir)  # 0700 whatever the umask: it will hold the run's secret key
        state = load_checkpoint(ckpt_dir / CHECKPOINT_FILE)
    plan = plan.calibrated() if state is None else plan.resumed(state["plan"], ckpt_dir)
    ledger = comm.on_main(lambda: open_ledger(plan, ckpt_dir, None if state is None else state["ledger_steps"]))
    run = comm.broadcast(RunState.start(seed, ledger) if state is None else RunState.resume(state, ledger, seed))
    return plan, state, ledger, run


def _prior_history(prior: Sequence[accounting.Segment] | accounting.PrivacyReport
                   ) -> tuple[tuple[accounting.Segment, ...], tuple[str, ...]]:
    """(segments, their stage labels; empty when unlabelled) of ``fit``'s ``prior``."""
    if isinstance(prior, accounting.PrivacyReport):
        return tuple(prior.history), tuple(prior.stages)
    return tuple(prior), ()


def _training_view(model: nn.Module, dataset: Dataset, eval_set: Dataset | None, use_cache: bool, physical: int,
                   device: torch.device, comm: Comm, args: dict[str, Any]) -> tuple[Dataset, Dataset | None, nn.Module]:
    """(indexed training data, this rank's evaluation rows, module to train): from cached prefix
    outputs through :class:`FromPrefix` when ``use_cache`` and fit's cache options (``args``)
    allow it, else the images through ``model``. In a data-parallel run each rank caches and
    evaluates only its own rows (:mod:`~dp_taft.privacy.rank_rows`)."""
    for what, data in (("training", dataset), ("evaluation", eval_set)):
        if data is not None and len(data) < comm.world:
            raise ValueError(f"{len(data)} {what} examples for {comm.world} ranks: each rank holds its own block of "
                             "positions and needs at least one; use fewer processes or more examples")
    spec = CacheSpec.parse(args["cache_prefix"], args["cache_dir"], args["cache_dtype"])
    if not use_cache or spec is None:
        return Indexed(dataset), None if eval_set is None else own_rows(eval_set, comm), model
    model.eval()
    cache = dict(batch_size=physical, device=device, quiet=args["quiet"], spec=spec, precision=args["precision"],
                 comm=comm)
    cached = cache_prefix(model, dataset, desc="train", **cache)
    cached_eval = None if eval_set is None else cache_prefix(model, eval_set, desc="eval", **cache)
    train = RankRows(cached, comm, len(dataset)) if comm.distributed else cached
    return Indexed(train), cached_eval, FromPrefix(model)


def _epoch_record(run: RunState, module: nn.Module, eval_data: Dataset | None, args: dict[str, Any], physical: int,
                  device: torch.device, comm: Comm, ledger: Any, started: float) -> EpochRecord:
    eval_loss, eval_acc = None, None
    if eval_data is not None:  # each rank's rows, summed over the ranks
        sums = comm.gather(_eval_sums(module, eval_data, args["criterion"], physical, device, args["precision"]))
        loss_sum, correct, count = map(sum, zip(*sums))
        eval_loss, eval_acc = loss_sum / count, correct / count
    loss_sum, seen = run.partial_loss
    return EpochRecord(
        epoch=run.epoch, train_loss=loss_sum / seen if seen else math.nan, eval_loss=eval_loss, eval_accuracy=eval_acc,
        epsilon_spent=ledger.epsilon() if ledger is not None else None, steps=run.step,
        wall_time_s=time.perf_counter() - started,
    )


def _checkpoint(plan: Plan, run: RunState, model: nn.Module, engine: PrivateEngine, noise: NoiseStream,
                history: list[EpochRecord], ledger: Any, post: "StepPostProcessing") -> dict[str, Any]:
    """Everything a resume needs. Private: it holds the run's secret seed and generator states."""
    return {
        "plan": plan.to_dict(),
        "run": {**asdict(run), "fresh_stream": False},
        "ledger_steps": ledger.steps if ledger is not None else None,
        "trainable": {k: p.detach().cpu().clone() for k, p in model.named_parameters() if p.requires_grad},
        "optimizer": engine.optimizer.state_dict(),
        "noise_rng": noise.state(),
        "torch_rng": torch.get_rng_state(),
        "history": [asdict(r) for r in history],
        "post": post.state_dict(),
    }


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


def evaluate(module: nn.Module, data: Dataset, criterion: nn.Module, batch_size: int,
             device: torch.device, precision: str = "fp32") -> tuple[float, float]:
    """(mean loss, accuracy in [0, 1]) of ``module`` on ``data`` of (input, label), in eval mode,
    under ``precision``'s autocast ("fp32": none)."""
    loss_sum, correct, count = _eval_sums(module, data, criterion, batch_size, device, precision)
    return loss_sum / count, correct / count


@torch.no_grad()
def _eval_sums(module: nn.Module, data: Dataset, criterion: nn.Module, batch_size: int, device: torch.device,
               precision: str) -> tuple[float, int, int]:
    """(summed loss, correct predictions, examples) of ``module`` on ``data``."""
    module.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for x, y in DataLoader(data, batch_size=batch_size, shuffle=False, collate_fn=collate_examples):
        x, y = x.to(device), y.to(device)
        with autocast(device, precision):
            logits = module(x)
            loss_sum += float(criterion(logits, y)) * len(y)
        correct += int((logits.argmax(dim=1) == y).sum())
        count += len(y)
    return loss_sum, correct, count


def _describe(r: EpochRecord, epochs: int, show_loss: bool) -> str:
    """One epoch's line; the training loss only on request, labelled (noiseless, so not private)."""
    parts = [f"epoch {r.epoch + 1}/{epochs}"]
    if show_loss:
        parts.append(f"train loss {r.train_loss:.4f} (not private)")
    if r.eval_loss is not None:
        parts += [f"eval loss {r.eval_loss:.4f}", f"eval acc {r.eval_accuracy:.3f}"]
    if r.epsilon_spent is not None:
        parts.append(f"eps {r.epsilon_spent:.3f}")
    return ", ".join(parts) + f", {r.steps} steps, {r.wall_time_s:.1f}s"
