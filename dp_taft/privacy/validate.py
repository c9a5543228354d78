"""Argument, model and data checks run by :func:`dp_taft.fit` before any budget is spent.

Every check raises ``ValueError`` (``UnsupportedModelError`` for models) with the
offending value and what to change, e.g.
``ValueError("max_grad_norm must be > 0 (per-sample clipping norm C), got -1")``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

import accounting
import timm.layers
import torch
import torch.nn as nn
from opacus.grad_sample import GradSampleModule, GradSampleModuleFastGradientClipping
from torch.utils.data import DataLoader, Dataset

from ..losses import make_loss
from ..tangent import UnsupportedModelError
from .bk_rules import BK_RULES
from .bookkeeping import require_bk_layers, trainable_layers
from .data import collate_examples, resolve_train_set
from .engine import ClippedSumHook
from .precision import check_precision

__all__ = [
    "check_arguments",
    "check_data",
    "check_real",
    "check_int",
    "check_choice",
    "check_epsilon",
    "check_delta",
    "require_trainable",
    "require_exact_layers",
    "resolve_grad_sample_mode",
    "check_examples",
]

GRAD_SAMPLE_MODES = ("auto", "bk", "hooks", "ghost")


def check_arguments(options: Mapping[str, Any], *, prior: Any = (), stage: str | None = None, augment: Any = None,
                    grad_sample_hook: Any = None) -> dict[str, Any]:
    """Validate :func:`dp_taft.fit`'s arguments that need no data.

    ``options``: the flat options of :meth:`dp_taft.TrainConfig.fit_options` (their types and
    choices are checked when the config is made); ``prior``, ``stage``, ``augment`` and
    ``grad_sample_hook``: fit's own arguments. Returns ``options`` with normalised values
    (floats, ints) and ``criterion``, the loss module, and ``prior``.
    """
    epsilon = check_epsilon(options["epsilon"])
    momentum = check_real("momentum", options["momentum"], "SGD momentum", low_open=False)
    if not momentum < 1:
        raise ValueError(f"momentum must be in [0, 1) (SGD momentum), got {momentum}")
    mode = options["grad_sample_mode"]
    _check_randomness(options["seed"], options["secure_mode"])
    if prior and epsilon is None:
        raise ValueError("prior is a privacy history to compose with; it needs a target epsilon (got epsilon=None)")
    segments = prior.history if isinstance(prior, accounting.PrivacyReport) else prior
    if not all(isinstance(s, accounting.Segment) for s in segments):
        raise ValueError("prior must be an accounting.PrivacyReport or a sequence of accounting.Segment "
                         "(e.g. an earlier result.report)")
    for name, value in (("augment", augment), ("grad_sample_hook", grad_sample_hook)):
        if value is not None and not callable(value):
            raise ValueError(f"{name} must be a callable or None, got {type(value).__name__}")
    hook = grad_sample_hook  # a ClippedSumHook also runs without per-sample gradients
    if hook is not None and mode not in ("auto", "hooks", *(("bk",) if isinstance(hook, ClippedSumHook) else ())):
        raise ValueError(f"grad_sample_hook needs grad_sample_mode='hooks' (per-sample gradients; 'bk' too for a "
                         f"dp_taft.privacy.engine.ClippedSumHook), got {mode!r}")
    _check_toolbox(options, mode)
    check_precision(options["precision"], options["device"], mode)
    if stage is not None and not (isinstance(stage, str) and stage):
        raise ValueError(f"stage must be a non-empty string label or None, got {stage!r}")
    return {
        **options,
        "epsilon": epsilon,
        "max_grad_norm": check_real("max_grad_norm", options["max_grad_norm"], "per-sample clipping norm C"),
        "epochs": check_int("epochs", options["epochs"], "passes over the data", low=1),
        "lr": check_real("lr", options["lr"], "learning rate", low_open=False),
        "momentum": momentum,
        "weight_decay": check_real("weight_decay", options["weight_decay"], "L2 penalty", low_open=False),
        "criterion": make_loss(options["loss"], options["kappa"]),
        "checkpoint_every": check_int("checkpoint_every", options["checkpoint_every"], "steps between checkpoints",
                                      low=1),
        "num_workers": check_int("num_workers", options["num_workers"], "DataLoader workers", low=0),
        "prior": prior,
    }


def _check_toolbox(given: Mapping[str, Any], mode: str) -> None:
    """The convex-toolbox options: LR schedule, clipping kind, iterate averaging (names checked by the config)."""
    warmup = check_real("warmup", given["warmup"], "fraction of the planned steps spent warming up", low_open=False)
    if not warmup < 1:
        raise ValueError(f"warmup must be in [0, 1) (fraction of the planned steps), got {warmup!r}")
    check_real("clipping_gamma", given["clipping_gamma"], "stability constant γ of automatic clipping")
    if given["clipping"] == "automatic" and mode not in ("auto", "hooks"):
        raise ValueError(f"clipping='automatic' needs grad_sample_mode='hooks' (per-sample gradients), got {mode!r}")
    for name, meaning, closed in (("tail_fraction", "share of the planned steps averaged", True),
                                  ("ema_decay", "EMA decay per step", False)):
        value = check_real(name, given[name], meaning)
        if not (value <= 1 if closed else value < 1):
            raise ValueError(f"{name} must be in (0, 1{']' if closed else ')'} ({meaning}), got {value!r}")


def _check_randomness(seed: object, secure_mode: object) -> None:
    if seed is None:
        return
    check_int("seed", seed, "random seed for a reproducible run; None (default) keeps the randomness secret", low=0)
    if secure_mode:
        raise ValueError("secure_mode=True draws from the OS CSPRNG, which cannot be seeded: pass seed=None")


def check_data(model: nn.Module, train_set: Dataset | DataLoader, eval_set: Dataset | None,
               args: dict[str, Any]) -> tuple[Dataset, float, int, float | None]:
    """(training dataset, sample rate q, physical batch size, δ or None when non-private).

    Checks the model's ``num_classes``, the batch sizes against N, δ < 1/N, and every
    example of ``train_set`` and ``eval_set`` (:func:`check_examples`).
    """
    num_classes = getattr(model, "num_classes", None)
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError("the model must have an integer attribute num_classes >= 1 (timm models and dp_taft.methods do)")
    dataset, loader_rate = resolve_train_set(train_set)
    n = len(dataset)
    if n == 0:
        raise ValueError("train_set is empty: DP-SGD needs at least one training example")
    if loader_rate is None:
        batch = check_int("batch_size", args["batch_size"], f"expected Poisson batch size, at most N={n}", low=1, high=n)
        sample_rate = batch / n
    else:
        sample_rate = loader_rate
    physical = args["physical_batch_size"]
    physical = (max(1, round(sample_rate * n)) if physical is None
                else check_int("physical_batch_size", physical, "examples per forward/backward", low=1))
    delta = check_delta(args["delta"], n) if args["epsilon"] is not None else None
    check_examples(dataset, model, num_classes, "train_set")
    if eval_set is not None:
        check_examples(eval_set, model, num_classes, "eval_set")
    return dataset, sample_rate, physical, delta


def check_real(name: str, value: object, meaning: str, *, low: float = 0.0, low_open: bool = True) -> float:
    """A finite real > ``low`` (or >= ``low`` when ``low_open`` is False)."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low)
    if not ok:
        bound = f"> {low:g}" if low_open else f">= {low:g}"
        raise ValueError(f"{name} must be a finite number {bound} ({meaning}), got {value!r}")
    return float(value)


def check_int(name: str, value: object, meaning: str, *, low: int, high: int | None = None) -> int:
    """An integer in [low, high] (no upper bound when ``high`` is None)."""
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    ok = ok and low <= value and (high is None or value <= high)
    if not ok:
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be an integer {bound} ({meaning}), got {value!r}")
    return int(value)


def check_choice(name: str, value: object, choices: tuple[str, ...] | list[str]) -> str:
    """One of ``choices``."""
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}: use one of {sorted(choices)}")
    return str(value)


def check_epsilon(epsilon: object) -> float | None:
    """Target ε in (0, inf), or None for non-private training."""
    if epsilon is None:
        return None
    return check_real("epsilon", epsilon, "target privacy budget; pass None to train without DP")


def check_delta(delta: object, n: int) -> float:
    """δ in (0, 1/N); None gives the default 1/(10·N)."""
    if delta is None:
        return 1.0 / (10 * n)
    d = check_real("delta", delta, "target delta, in (0, 1)")
    if not d < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    if d >= 1.0 / n:
        raise ValueError(
            f"delta={delta!r} is >= 1/N = {1.0 / n:.3g} for N={n} training examples: a mechanism that "
            "publishes one random example verbatim satisfies (0, 1/N)-DP, so such a delta protects "
            f"nobody. Use delta < 1/N, e.g. the default 1/(10*N) = {1.0 / (10 * n):.3g} (pass delta=None)."
        )
    return d


def require_trainable(model: nn.Module) -> list[nn.Parameter]:
    """The parameters with ``requires_grad``; refuses a model that has none."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(
            "the model has no trainable parameters (every requires_grad is False): build it with "
            "dp_taft.methods.taft / nlft / linear_probe, or set requires_grad on the part to train."
        )
    return params


def resolve_grad_sample_mode(model: nn.Module, mode: str, *, per_sample_needed: bool) -> str:
    """The mode ``fit`` runs: "auto" is book-keeping where every trainable layer has a BK rule
    (tangent models, and NLFT/probe built from Linear, LayerNorm and LayerScale) and nothing
    needs the per-sample gradients themselves (a grad_sample_hook, automatic clipping);
    else Opacus' hooks. Refuses a model the chosen mode cannot handle exactly."""
    if mode == "auto":
        mode = "hooks" if per_sample_needed or not all(type(m) in BK_RULES for _, m in trainable_layers(model)) else "bk"
    if mode == "bk":
        require_bk_layers(model)
    else:
        require_exact_layers(model, mode)
    return mode


def require_exact_layers(model: nn.Module, grad_sample_mode: str) -> None:
    """Refuse trainable layers that Opacus would silently hand to functorch.

    Opacus matches registered samplers by exact class; an unregistered layer with
    trainable parameters falls back to functorch (vmap), whose per-sample gradients
    are not guaranteed exact for our layers. Ghost mode also accepts layers with a
    registered norm sampler.
    """
    known = set(GradSampleModule.GRAD_SAMPLERS)
    if grad_sample_mode == "ghost":
        known |= set(GradSampleModuleFastGradientClipping.NORM_SAMPLERS)
    bad = [
        f"'{name or '<the model itself>'}' ({type(m).__module__}.{type(m).__qualname__}, owning "
        f"{', '.join(n for n, p in m.named_parameters(recurse=False) if p.requires_grad)})"
        for name, m in trainable_layers(model)
        if type(m) not in known
    ]
    if bad:
        raise UnsupportedModelError(
            f"Opacus has no exact per-sample gradient rule for the trainable layer(s) {'; '.join(bad)} "
            f"(grad_sample_mode={grad_sample_mode!r}). To fine-tune a timm ViT privately, convert it first: "
            "dp_taft.linearize(vit, blocks=k) (TAFT), dp_taft.methods.nlft(vit, k) or "
            "dp_taft.methods.linear_probe(vit). Otherwise freeze those parameters (requires_grad_(False)) or "
            "register a grad sampler with opacus.grad_sample.register_grad_sampler."
        )


def _expected_image(model: nn.Module) -> tuple[int, tuple[int, int] | None] | None:
    """(channels, (H, W) or None when the size is flexible) from the model's timm PatchEmbed."""
    for m in model.modules():
        if isinstance(m, timm.layers.PatchEmbed):
            size = tuple(m.img_size) if m.img_size is not None and m.strict_img_size and not m.dynamic_img_pad else None
            return m.proj.in_channels, size
    return None


def _refuse_non_tensor_images(dataset: Dataset, what: str) -> None:
    """A clear error for images that are not tensors (PIL images, numpy arrays), which
    would otherwise surface as a collate TypeError."""
    item = dataset[0]
    image = item[0] if isinstance(item, (list, tuple)) and len(item) == 2 else None
    if image is not None and not torch.is_tensor(image):
        raise ValueError(
            f"{what} images are {type(image).__module__}.{type(image).__qualname__}, not tensors: add "
            "torchvision.transforms.ToTensor() (and Normalize) to the dataset's transform, e.g. "
            "transform=transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])"
        )


def check_examples(dataset: Dataset, model: nn.Module, num_classes: int, what: str, batch_size: int = 256) -> None:
    """Scan every example once: (image, label) pairs, float images of the model's shape,
    all finite, integer labels in [0, num_classes).

    Raises before training, so a bad example never costs privacy budget.
    """
    _refuse_non_tensor_images(dataset, what)
    expected = _expected_image(model)
    first_shape: tuple[int, ...] | None = None
    seen = 0
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_examples):
        if not (isinstance(batch, (list, tuple)) and len(batch) == 2):
            raise ValueError(f"{what} must yield (image, label) pairs, got items of another structure")
        x, y = batch
        if not torch.is_tensor(x) or not x.is_floating_point():
            raise ValueError(
                f"{what} images must be floating-point tensors, got {getattr(x, 'dtype', type(x))}: "
                "convert them, e.g. with x.float() / 255 and normalization"
            )
        shape = tuple(x.shape[1:])
        first_shape = first_shape or shape
        if expected is not None:
            channels, size = expected
            want = (channels, *size) if size else (channels, "H", "W")
            if len(shape) != 3 or shape[0] != channels or (size and shape[1:] != size):
                raise ValueError(
                    f"{what} images have shape {shape}, the model expects (C, H, W) = {want}: "
                    "resize/convert the inputs or create the model with matching img_size/in_chans"
                )
        elif shape != first_shape:
            raise ValueError(f"{what} images have inconsistent shapes {first_shape} and {shape}")
        bad = (~torch.isfinite(x.reshape(len(x), -1))).any(dim=1).nonzero()
        if len(bad):
            raise ValueError(
                f"{what} example {seen + int(bad[0])} has NaN or inf pixels: clean the data "
                "(nothing was trained, no privacy budget was spent)"
            )
        if not torch.is_tensor(y) or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool or y.ndim != 1:
            raise ValueError(f"{what} labels must be integer class indices (one per example), got {getattr(y, 'dtype', type(y))}")
        out = ((y < 0) | (y >= num_classes)).nonzero()
        if len(out):
            i = int(out[0])
            raise ValueError(
                f"{what} example {seen + i} has label {int(y[i])}, outside [0, {num_classes}) for a model "
                f"with num_classes={num_classes}: remap the labels or create the model with more classes"
            )
        seen += len(x)
