"""Pretrained timm backbones from a local weights file, and the input pipeline they expect.

A backbone is described by a :class:`BackboneSpec` (timm name, classes, weights file, extra
``timm.create_model`` keyword arguments) that can be stored as JSON and rebuilt later, e.g. by
``dp-taft predict`` on another machine where the weights file lives elsewhere::

    spec = BackboneSpec("vit_small_patch16_224", num_classes=10, weights="vit_s16.safetensors")
    vit = spec.create()                               # timm's loader, checked against the file
    transform = eval_transform(data_config(vit))      # the resizing and normalisation it was trained with

Weights load the way timm loads them (``pretrained_cfg_overlay=dict(file=...)``: the model
family's checkpoint filter, position-embedding resampling, input-channel adaptation, a fresh
classifier when the class count differs), plus one check timm skips: when the class count
differs timm loads non-strictly, so a file of another architecture (other depth, width,
patch size...) would load without a word and leave part of the network random. Here every key
and shape of the (filtered) file must match the model, the classifier aside; otherwise
:class:`WeightsMismatchError` lists the differences.

Normalisation matters because pretrained weights expect inputs standardised with the mean and
std of their own pretraining data: the same images normalised otherwise shift every activation
and lose most of what pretraining gave. :func:`data_config` reads them from the model.
"""

from __future__ import annotations

import difflib
import json
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import timm.data
import timm.layers
import timm.models
import torch
import torch.nn as nn
from PIL import Image
from torchvision import transforms

from .privacy.validate import check_int

__all__ = ["BackboneSpec", "WeightsMismatchError", "WEIGHTS_SUFFIXES", "create_backbone", "data_config",
           "eval_transform"]

#: Weight file formats read by ``timm.models.load_state_dict``: safetensors, or torch.save pickles.
WEIGHTS_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
_SHOWN = 10  # keys listed per kind of difference in an error message
_MODE = {1: "L", 3: "RGB"}  # PIL mode of a model's input channels


class WeightsMismatchError(ValueError):
    """A weights file does not fit the model built from the given name and keyword arguments."""


class WeightsFileNotFoundError(FileNotFoundError, ValueError):
    """The weights file does not exist (both a ``FileNotFoundError`` and a ``ValueError``)."""


@dataclass(frozen=True)
class BackboneSpec:
    """Everything needed to rebuild a backbone: JSON-able, see :meth:`to_dict`.

    ``name``: a timm model name (``timm.list_models()``); ``num_classes`` >= 0 (0: no
    classifier); ``weights``: a local weights file (``WEIGHTS_SUFFIXES``), or None for timm's
    own pretrained weights (downloaded: needs network); ``model_kwargs``: extra JSON-able
    keyword arguments of ``timm.create_model`` (``img_size``, ``in_chans``, ``depth``,
    ``pretrained_cfg_overlay``...), stored as a deep copy.
    """

    name: str
    num_classes: int
    weights: str | None = None
    model_kwargs: Mapping[str, Any] = field(default_factory=dict, hash=False)  # a dict: hash the rest

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name must be a timm model name (see timm.list_models()), got {self.name!r}")
        check_int("num_classes", self.num_classes, "classes of the head; 0 for none", low=0)
        if self.weights is not None:
            object.__setattr__(self, "weights", str(self.weights))
        object.__setattr__(self, "model_kwargs", json_copy(self.model_kwargs, "model_kwargs"))

    def create(self, weights: str | Path | None = None) -> nn.Module:
        """The backbone in eval mode; ``weights`` overrides the stored file (same weights, another place)."""
        return create_backbone(self.name, self.num_classes, weights=weights if weights is not None else self.weights,
                               model_kwargs=self.model_kwargs)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able fields; ``BackboneSpec.from_dict(spec.to_dict()) == spec``."""
        return {"name": self.name, "num_classes": self.num_classes, "weights": self.weights,
                "model_kwargs": json_copy(self.model_kwargs, "model_kwargs")}

    @classmethod
    def from_dict(cls, fields: Mapping[str, Any]) -> BackboneSpec:
        """The spec that :meth:`to_dict` wrote (``weights`` and ``model_kwargs`` may be absent)."""
        unknown = set(fields) - {"name", "num_classes", "weights", "model_kwargs"}
        missing = {"name", "num_classes"} - set(fields)
        if unknown or missing:
            raise ValueError(f"a backbone spec has the fields name, num_classes, weights, model_kwargs; got "
                             f"unknown {sorted(unknown)}, missing {sorted(missing)}")
        return cls(**fields)


def json_copy(value: object, name: str) -> dict[str, Any]:
    """A deep copy of the mapping ``value`` through JSON, so a spec always serialises (tuples
    come back as lists); ValueError naming ``name`` for anything else."""
    if not isinstance(value, Mapping):
        raise ValueError(f"{name} must be a mapping (a JSON object), got {value!r}")
    try:
        return json.loads(json.dumps(dict(value)))
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be JSON-able (numbers, strings, lists, dicts): {err}") from err


def create_backbone(name: str, num_classes: int, *, weights: str | Path | None = None,
                    model_kwargs: Mapping[str, Any] | None = None, pretrained: bool = True) -> nn.Module:
    """``timm.create_model(name, num_classes=num_classes, **model_kwargs)`` with pretrained weights, in eval mode.

    ``weights``: a local file (``.safetensors``, ``.pth``, ``.pt``, ``.bin``; a plain state dict
    or a checkpoint dict holding one under "state_dict", "model"...), loaded by timm
    (``pretrained_cfg_overlay`` with ``file``, merged with any ``pretrained_cfg_overlay`` in
    ``model_kwargs``, e.g. to set the file's mean/std). The file's classifier is kept when it
    has ``num_classes`` rows, else the head is freshly initialised. None with ``pretrained``:
    timm's own weights (downloaded: needs network). ``pretrained=False``: random weights.

    Raises ``ValueError`` for an unknown name (with close matches), a file that does not exist
    (:class:`WeightsFileNotFoundError`) or has another suffix, and :class:`WeightsMismatchError`
    when the file's keys or shapes do not fit the model (another architecture or size).
    """
    num_classes = check_int("num_classes", num_classes, "classes of the head; 0 for none", low=0)
    kwargs = dict(model_kwargs or {})
    _check_name(name)
    if weights is None:
        return _create(name, pretrained=pretrained, num_classes=num_classes, **kwargs).eval()
    if not pretrained:
        raise ValueError(f"weights={str(weights)!r} is only read with pretrained=True (pretrained=False builds "
                         "random weights): drop one of them")
    path = _check_file(weights)
    state = _read(path)
    overlay = dict(kwargs.pop("pretrained_cfg_overlay", None) or {})
    overlay["file"] = str(path)
    classifiers = _classifiers(name, overlay)
    # The pretrained cfg's class count stands for the weights' own classifier: timm keeps it
    # only when it equals num_classes. For a local file that is the file's head, not the
    # registry tag's (1000 for ImageNet), so a file saved with num_classes classes loads whole.
    overlay.setdefault("num_classes", _file_classes(state, classifiers))
    try:
        model = _create(name, pretrained=True, num_classes=num_classes, pretrained_cfg_overlay=overlay, **kwargs)
    except RuntimeError as err:  # timm's strict load: size mismatch, missing or unexpected keys
        reference = _create(name, pretrained=False, num_classes=num_classes, **kwargs)
        _raise_if_mismatched(name, path, state, reference, classifiers, num_classes != overlay["num_classes"], err)
        raise WeightsMismatchError(f"timm could not load {path} into {name}: {err}") from err
    _raise_if_mismatched(name, path, state, model, classifiers, num_classes != overlay["num_classes"], None)
    return model.eval()


def _create(name: str, **kwargs: Any) -> nn.Module:
    """``timm.create_model``, with a keyword the model does not take reported as such."""
    try:
        return timm.create_model(name, **kwargs)
    except TypeError as err:
        if "keyword argument" not in str(err):
            raise
        raise ValueError(f"{name} does not take one of the model kwargs {sorted(kwargs)}: {err}. Check "
                         "--model-kwargs (model_kwargs) against the model's constructor.") from err


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not timm.is_model(name):
        close = difflib.get_close_matches(str(name), timm.list_models(), n=5, cutoff=0.6)
        hint = f"; close matches: {', '.join(close)}" if close else "; see timm.list_models('*vit*')"
        raise ValueError(f"unknown timm model {name!r}{hint}")


def _check_file(weights: str | Path) -> Path:
    path = Path(weights).expanduser()
    if path.suffix.lower() not in WEIGHTS_SUFFIXES:
        raise ValueError(f"weights file {str(path)!r} has suffix {path.suffix!r}; use one of "
                         f"{', '.join(WEIGHTS_SUFFIXES)} (safetensors or a torch.save state dict)")
    if not path.is_file():
        raise WeightsFileNotFoundError(f"weights file {str(path)!r} does not exist (or is not a file): check --weights")
    return path


def _read(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = timm.models.load_state_dict(str(path))
    except Exception as err:  # unpickling, safetensors header, zip errors: all mean an unreadable file
        raise ValueError(f"cannot read weights file {str(path)!r} as a state dict ({type(err).__name__}: {err}); "
                         "it must be safetensors or a torch.save of a state dict") from err
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"weights file {str(path)!r} holds no state dict of tensors (name -> tensor)")
    return state


def _classifiers(name: str, overlay: Mapping[str, Any]) -> tuple[str, ...]:
    """Module names of the model family's classifier(s), from its pretrained cfg."""
    cfg = timm.models.get_pretrained_cfg(name)
    found = overlay.get("classifier", cfg.classifier if cfg is not None else None)
    if found is None:
        return ()
    return (found,) if isinstance(found, str) else tuple(found)


def _file_classes(state: Mapping[str, torch.Tensor], classifiers: tuple[str, ...]) -> int:
    """Rows of the file's (first) classifier weight; 0 when the file has no classifier."""
    for c in classifiers:
        if f"{c}.weight" in state:
            return int(state[f"{c}.weight"].shape[0])
    return 0


def _filtered(state: dict[str, torch.Tensor], model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """``state`` through the model family's ``checkpoint_filter_fn`` (as timm applies it), if it has one."""
    module = sys.modules[timm.models.model_entrypoint(timm.models.get_arch_name(name)).__module__]
    filter_fn = getattr(module, "checkpoint_filter_fn", None)
    if filter_fn is None:
        return state
    try:
        return filter_fn(dict(state), model)
    except TypeError:  # older filters take the state dict only (timm calls them the same way)
        return filter_fn(dict(state))


def _raise_if_mismatched(name: str, path: Path, state: dict[str, torch.Tensor], model: nn.Module,
                         classifiers: tuple[str, ...], fresh_head: bool, cause: RuntimeError | None) -> None:
    """:class:`WeightsMismatchError` listing how the filtered file differs from ``model``.

    Classifier keys do not count when the head is fresh (timm drops them); the first conv's
    input channels do not either (timm adapts them, and refuses an inconsistent count itself).
    """
    got = _filtered(state, model, name)
    want = model.state_dict()
    skip = {f"{c}.{p}" for c in classifiers for p in ("weight", "bias")} if fresh_head else set()
    first_conv = f"{model.pretrained_cfg.get('first_conv')}.weight"
    missing = sorted(k for k in want.keys() - got.keys() if k not in skip)
    unexpected = sorted(k for k in got.keys() - want.keys() if k not in skip)
    shapes = sorted(f"{k} {tuple(got[k].shape)} vs {tuple(want[k].shape)}" for k in want.keys() & got.keys()
                    if k not in skip and not _same_shape(got[k], want[k], k == first_conv))
    if not (missing or unexpected or shapes):
        return
    parts = [f"{what} ({len(keys)}): {', '.join(keys[:_SHOWN])}{', ...' if len(keys) > _SHOWN else ''}"
             for what, keys in (("missing from the file", missing), ("unexpected in the file", unexpected),
                                ("shape file vs model", shapes)) if keys]
    raise WeightsMismatchError(
        f"weights file {str(path)!r} does not fit the model {name} built here: " + "; ".join(parts)
        + ". Check that --model (name) and --model-kwargs (model_kwargs: depth, embed_dim, patch_size, img_size, "
        "in_chans...) describe the architecture the file was saved from."
    ) from cause


def _same_shape(a: torch.Tensor, b: torch.Tensor, channels_adapted: bool) -> bool:
    if channels_adapted and a.ndim == b.ndim == 4:
        return a.shape[0] == b.shape[0] and a.shape[2:] == b.shape[2:]
    return a.shape == b.shape


def data_config(model: nn.Module) -> dict[str, Any]:
    """The input pipeline ``model`` expects, JSON-able: ``input_size`` (C, H, W) in pixels,
    ``interpolation``, ``mean``/``std`` (one per channel, for pixels scaled to [0, 1]),
    ``crop_pct`` in (0, 1], ``crop_mode``.

    ``timm.data.resolve_data_config`` describes the *pretrained* weights' input (e.g. 3 x 224 x
    224 for a model created with ``img_size=28, in_chans=1``); the size and channels here are
    those of the model actually built (its patch embedding), and a 3-channel statistic is
    averaged for a 1-channel model (or a 1-channel one repeated for 3 channels). Pretrained
    weights expect their own mean/std: pass this to :func:`eval_transform`.
    """
    config = dict(timm.data.resolve_data_config({}, model=model))
    embed = next((m for m in model.modules() if isinstance(m, timm.layers.PatchEmbed)), None)
    if embed is not None:
        size = tuple(embed.img_size) if embed.img_size is not None else tuple(config["input_size"][1:])
        config["input_size"] = (int(embed.proj.in_channels), *size)
    else:
        config["input_size"] = tuple(timm.models.get_model_input_config(model)["input_size"])
    channels = int(config["input_size"][0])
    for key in ("mean", "std"):
        values = [float(v) for v in config[key]]
        if len(values) != channels:
            values = [sum(values) / len(values)] * channels
        config[key] = tuple(values)
    config["input_size"] = tuple(int(v) for v in config["input_size"])
    return config


class _ConvertMode:
    """PIL image -> the same image in ``mode`` ("L" grey, "RGB"): the channels the model takes."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def __call__(self, image: Image.Image) -> Image.Image:
        return image if image.mode == self.mode else image.convert(self.mode)

    def __repr__(self) -> str:
        return f"ConvertMode({self.mode!r})"


def eval_transform(config: Mapping[str, Any]) -> Callable[[Image.Image], torch.Tensor]:
    """PIL image -> float tensor ``config["input_size"]``: converted to the model's channels
    (grey "L" for 1, "RGB" for 3), resized and centre-cropped, scaled to [0, 1] and normalised
    with the config's mean/std (``timm.data.create_transform(**config, is_training=False)``).

    Deterministic (no random augmentation), so a prefix cache of its outputs stays exact. For a
    model: ``eval_transform(data_config(model))``.
    """
    channels = int(config["input_size"][0])
    if channels not in _MODE:
        raise ValueError(f"eval_transform handles 1- or 3-channel models, got input_size {tuple(config['input_size'])}")
    return transforms.Compose([_ConvertMode(_MODE[channels]), timm.data.create_transform(**config, is_training=False)])
