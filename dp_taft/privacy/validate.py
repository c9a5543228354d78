"""Argument, model and data checks run by :func:`dp_taft.fit` before any budget is spent.

Every check raises ``ValueError`` (``UnsupportedModelError`` for models) with the
offending value and what to change, e.g.
``ValueError("max_grad_norm must be > 0 (per-sample clipping norm C), got -1")``.
"""

from __future__ import annotations

import math
import numbers

import timm.layers
import torch
import torch.nn as nn
from opacus.grad_sample import GradSampleModule, GradSampleModuleFastGradientClipping
from torch.utils.data import DataLoader, Dataset

from ..tangent import UnsupportedModelError

__all__ = [
    "check_real",
    "check_int",
    "check_choice",
    "check_epsilon",
    "check_delta",
    "require_trainable",
    "require_exact_layers",
    "check_examples",
]

GRAD_SAMPLE_MODES = ("hooks", "ghost")


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
        f"'{name}' ({type(m).__module__}.{type(m).__qualname__})"
        for name, m in model.named_modules()
        if any(p.requires_grad for p in m.parameters(recurse=False)) and type(m) not in known
    ]
    if bad:
        raise UnsupportedModelError(
            f"Opacus has no exact per-sample gradient rule for the trainable layer(s) {', '.join(bad)} "
            f"(grad_sample_mode={grad_sample_mode!r}). Freeze them (requires_grad_(False)), build the "
            "model with dp_taft.methods, or register a grad sampler with opacus.grad_sample.register_grad_sampler."
        )


def _expected_image(model: nn.Module) -> tuple[int, tuple[int, int] | None] | None:
    """(channels, (H, W) or None when the size is flexible) from the model's timm PatchEmbed."""
    for m in model.modules():
        if isinstance(m, timm.layers.PatchEmbed):
            size = tuple(m.img_size) if m.img_size is not None and m.strict_img_size and not m.dynamic_img_pad else None
            return m.proj.in_channels, size
    return None


def check_examples(dataset: Dataset, model: nn.Module, num_classes: int, what: str, batch_size: int = 256) -> None:
    """Scan every example once: (image, label) pairs, float images of the model's shape,
    all finite, integer labels in [0, num_classes).

    Raises before training, so a bad example never costs privacy budget.
    """
    expected = _expected_image(model)
    first_shape: tuple[int, ...] | None = None
    seen = 0
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
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
