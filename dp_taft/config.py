"""One typed, serialisable vocabulary for training: :class:`TrainConfig` and its option groups.

Five frozen groups, :class:`MethodOptions` (the model to build), :class:`PrivacyOptions`,
:class:`OptimOptions`, :class:`DataOptions` and :class:`RunOptions`, hold every option of
:func:`dp_taft.fit` and :func:`dp_taft.finetune`, each with a flat name unique across the groups
(``lr``), also ``group.name`` (``optim.lr``; :data:`OPTIONS` maps them), its ``"doc"`` and ``"choices"``.
Types and choices are checked when a group is made; ranges and data checks are ``fit``'s
(:mod:`dp_taft.privacy.validate`; :meth:`TrainConfig.validate` runs them early).

Serialised form (``to_dict``, TOML tables ``[method] [privacy] [optim] [data] [run]``,
``--set KEY=VALUE``): TOML has no null, so None is left out (every option that may be None
defaults to None) and paths are strings; ``epsilon``, which has no default, is written ``inf``
for None (non-private). Reading maps ``epsilon = inf``, and ``"none"`` for an option that may
be None, to None. In Python (``create``, ``replace``, ``fit``) ``inf`` stays a value ``fit`` refuses.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import functools
import math
import os
import tomllib
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from .averaging import AVERAGING
from .losses import LOSSES
from .privacy.precision import PRECISIONS
from .privacy.prefix_cache import STORAGE_DTYPES, CacheSpec
from .privacy.validate import GRAD_SAMPLE_MODES, check_arguments, check_choice, check_int, check_real
from .schedules import SCHEDULES

__all__ = ["TrainConfig", "MethodOptions", "PrivacyOptions", "OptimOptions", "DataOptions", "RunOptions",
           "REQUIRED", "OPTIONS", "FIT_OPTIONS", "METHODS", "OPTIMIZERS", "ACCOUNTANTS", "option_name",
           "describe_unknown", "parse_value", "parse_assignment"]


class Required(enum.Enum):
    """Type of :data:`REQUIRED`: an option that has no default and must be given."""
    REQUIRED = "required"

    def __repr__(self) -> str:
        return "REQUIRED"


#: Default of ``epsilon``: no value is picked silently; ``fit`` refuses to start without one.
REQUIRED = Required.REQUIRED
#: Methods :func:`dp_taft.finetune` builds (:mod:`dp_taft.methods`, :mod:`dp_taft.head_first`).
METHODS = ("taft", "taft-head", "nlft", "probe")
#: optimizer name -> factory(params, lr, momentum, weight_decay).
OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "sgd": lambda params, lr, momentum, wd: torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=wd),
    "adam": lambda params, lr, momentum, wd: torch.optim.Adam(params, lr=lr, weight_decay=wd),
    "adamw": lambda params, lr, momentum, wd: torch.optim.AdamW(params, lr=lr, weight_decay=wd),
}
ACCOUNTANTS = ("pld", "rdp")  # accounting methods of the accounting package
_DTYPE_NAMES = {dtype: name for name, dtype in reversed(STORAGE_DTYPES.items())}  # the long name of each
_NONE = "none"  # how the serialised form spells None


def _option(default: Any, doc: str, *, choices: Sequence[Any] | None = None,
            normalise: Callable[[Any], Any] | None = None, typed: bool = True) -> Any:
    """A documented field; ``normalise`` maps inputs to one stored value; ``typed`` False: the group checks it."""
    return field(default=default, metadata={"doc": doc, "choices": choices, "normalise": normalise, "typed": typed})


def _path(value: Any) -> Any:
    return Path(value) if isinstance(value, (str, os.PathLike)) else value


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _members(hint: Any) -> tuple[Any, ...]:
    return typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, type(int | None)) else (hint,)


_WORDS = {int: "an integer", float: "a number", bool: "True or False", str: "a string", Path: "a path",
          type(None): "None", Required: "REQUIRED"}


def _check_type(name: str, value: Any, hint: Any) -> None:
    """Refuse a value outside the annotation (bools are not numbers; ints are accepted as floats)."""
    members = _members(hint)
    number = {int: int, float: (int, float)}
    if not any(not isinstance(value, bool) and isinstance(value, number[t]) if t in number else isinstance(value, t)
               for t in members):
        words = " or ".join(_WORDS.get(t, t.__name__) for t in members if t is not Required)
        raise ValueError(f"{name} must be {words}, got {value!r}")


class _Group:
    """Base of the option groups: normalises and checks every field when made."""

    def __post_init__(self) -> None:
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if f.metadata["normalise"] is not None:
                value = f.metadata["normalise"](value)
                object.__setattr__(self, f.name, value)
            if f.metadata["typed"]:
                _check_type(f.name, value, _hints(type(self))[f.name])
            if f.metadata["choices"] is not None and value is not None:
                check_choice(f.name, value, f.metadata["choices"])


def _documented(cls: type) -> type:
    """Append each field's documentation to the class docstring (help(), Sphinx)."""
    lines = [f"    {f.name} (default {f.default!r}): {f.metadata['doc']}" for f in fields(cls)]
    cls.__doc__ = f"{cls.__doc__}\n\n    Attributes:\n" + "\n".join(lines)
    return cls


@_documented
@dataclass(frozen=True)
class MethodOptions(_Group):
    """Which model :func:`dp_taft.finetune` builds from a timm ViT (``fit`` itself ignores this group)."""

    name: str = _option("taft", "'taft' (TAFT-k, dp_taft.linearize), 'taft-head' (a private linear probe, then "
                        "TAFT-k around that head, one budget: dp_taft.head_first), 'nlft' (ordinary fine-tuning "
                        "of the last k blocks) or 'probe' (the head only).", choices=METHODS)
    blocks: int = _option(2, "k >= 0 last blocks trained (at most the ViT's depth); 'probe' ignores it.")
    head_epochs: int = _option(1, "'taft-head': epochs (>= 1) of the probe stage before TAFT's epochs.")
    head_lr: float | None = _option(None, "'taft-head': learning rate (>= 0) of the probe stage; None: lr.")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("blocks", self.blocks, "last blocks trained", low=0)
        check_int("head_epochs", self.head_epochs, "epochs of the probe stage", low=1)
        if self.head_lr is not None:
            check_real("head_lr", self.head_lr, "learning rate of the probe stage", low_open=False)


@_documented
@dataclass(frozen=True)
class PrivacyOptions(_Group):
    """The (ε, δ) target and the DP-SGD mechanism: clipping, accounting, randomness."""

    epsilon: float | None | Required = _option(REQUIRED, "target ε > 0, or None: no privacy; it must be given.")
    delta: float | None = _option(None, "target δ in (0, 1/N) for N training examples; None: 1/(10·N).")
    max_grad_norm: float = _option(1.0, "per-sample clipping norm C > 0.")
    accountant: str = _option("pld", "accounting method that calibrates σ and writes the report.",
                              choices=ACCOUNTANTS)
    clipping: str = _option("flat", "'flat' (per-sample gradients scaled to norm <= C) or 'automatic' (g·C/(‖g‖ + "
                            "γ), Bu et al. 2023; per-sample gradients); sensitivity C.", choices=("flat", "automatic"))
    clipping_gamma: float = _option(0.01, "stability constant γ > 0 of automatic clipping.")
    seed: int | None = _option(None, "None: a secret seed (OS CSPRNG) for noise, batches and augmentation. An "
                               "integer >= 0: reproducible, for experiments (a published seed voids the guarantee).")
    secure_mode: bool = _option(False, "noise and batches from the OS CSPRNG, hardened against floating-point "
                                "attacks (dp_taft.privacy.randomness); slower; no seed.")


@_documented
@dataclass(frozen=True)
class OptimOptions(_Group):
    """The objective and the optimiser: what each DP-SGD step does with the noisy gradient."""

    epochs: int = _option(1, ">= 1; the plan is T = epochs·round(1/q) steps, sample rate q = batch_size/N.")
    batch_size: int = _option(256, "expected logical (Poisson) batch size, in [1, N].")
    lr: float = _option(0.1, "learning rate >= 0.")
    optimizer: str = _option("sgd", "torch optimiser.", choices=tuple(OPTIMIZERS))
    momentum: float = _option(0.9, "SGD heavy-ball momentum in [0, 1).")
    weight_decay: float = _option(0.0, "L2 penalty >= 0.")
    loss: str = _option("ce", "'ce' (cross-entropy) or 'square' (mean over classes of (f − κ·onehot)², "
                        "κ = kappa).", choices=tuple(LOSSES))
    kappa: float = _option(15.0, "target scale κ > 0 of the square loss.")
    lr_schedule: str = _option("constant", "decay over the planned steps after the warm-up (dp_taft.schedules).",
                               choices=SCHEDULES)
    warmup: float = _option(0.0, "fraction in [0, 1) of the planned steps spent in linear warm-up.")
    averaging: str | None = _option(None, "iterate averaging (dp_taft.averaging), used by the returned model and "
                                    "evaluations; the report does not change.", choices=AVERAGING)
    tail_fraction: float = _option(0.5, "share in (0, 1] of the planned steps that 'tail' averaging covers.")
    ema_decay: float = _option(0.99, "decay per step in (0, 1) of 'ema' averaging.")


@_documented
@dataclass(frozen=True)
class DataOptions(_Group):
    """How the data reaches the model: physical batches, per-sample gradients, the prefix cache, precision."""

    physical_batch_size: int | None = _option(None, "largest batch run at once (memory), >= 1; None: batch_size.")
    grad_sample_mode: str = _option("auto", "'auto': 'bk' (book-keeping) where it applies, else 'hooks' (Opacus' "
                                    "per-sample gradients); 'ghost': Opacus' ghost clipping. All exact.",
                                    choices=GRAD_SAMPLE_MODES)
    cache_prefix: bool | str = _option(
        "auto", "cache the frozen prefix's output once per example (models with prefix/forward_from_prefix, no "
        "augment; dp_taft.privacy.prefix_cache). 'auto': RAM when it needs <= half the available memory, else a "
        "memory-mapped file; True or 'ram'; 'disk'; False: none.", typed=False)
    cache_dir: Path | None = _option(
        None, "where the cache file is kept and reused by runs with the same frozen prefix, data and "
        "cache_dtype; None: RAM or a temporary file. It holds features of the private data.",
        normalise=_path, typed=False)
    cache_dtype: str | None = _option(
        None, "None or 'float32' (exact), 'bf16' (relative error <= 2^-8) or 'fp16' (<= 2^-11, |x| <= 65504); "
        "a torch dtype is stored as its name.",
        normalise=lambda v: _DTYPE_NAMES.get(v, v) if isinstance(v, torch.dtype) else v, typed=False)
    num_workers: int = _option(0, "DataLoader worker processes (>= 0).")
    precision: str = _option("fp32", "'fp32', or 'bf16': forward and backward under autocast, per-sample norms, "
                             "clipping, noise and update in fp32 (dp_taft.privacy.precision).", choices=tuple(PRECISIONS))

    def __post_init__(self) -> None:
        super().__post_init__()
        CacheSpec.parse(self.cache_prefix, self.cache_dir, self.cache_dtype)  # the cache's own checks


@_documented
@dataclass(frozen=True)
class RunOptions(_Group):
    """Where and how the run executes: device, checkpoints, output, processes. No effect on the result."""

    device: str = _option("cpu", "'cpu', 'cuda', 'cuda:1', ... (a torch.device is stored as its name).",
                          normalise=lambda v: str(v) if isinstance(v, torch.device) else v)
    checkpoint_dir: Path | None = _option(
        None, "makes the run resumable with the same directory and privacy settings (dp_taft.privacy.checkpoint); "
        "after a crash the reserved steps stay counted. Owner-only: it holds the run's secret key.",
        normalise=_path)
    checkpoint_every: int = _option(50, "steps between checkpoints (>= 1); also the ledger's reservation block.")
    quiet: bool = _option(False, "no progress bars.")
    show_train_loss: bool = _option(False, "also print the training loss: a noiseless statistic of the private "
                                    "data that the guarantee does NOT cover (labelled 'not private').")
    distributed: bool | None = _option(
        None, "None: data-parallel over the ranks under torchrun or in a process group of several ranks "
        "(dp_taft.privacy.distributed; same noise and report); False: one process.")


_GROUPS: dict[str, type] = {"method": MethodOptions, "privacy": PrivacyOptions, "optim": OptimOptions,
                            "data": DataOptions, "run": RunOptions}
#: flat option name -> its group's name in :class:`TrainConfig`.
OPTIONS: dict[str, str] = {f.name: group for group, cls in _GROUPS.items() for f in fields(cls)}
#: The options :func:`dp_taft.fit` reads (every group but ``method``).
FIT_OPTIONS = frozenset(name for name, group in OPTIONS.items() if group != "method")


def describe_unknown(kind: str, names: Iterable[str], known: Iterable[str]) -> str:
    """``unknown <kind> 'x' (did you mean 'y'?); known: ...`` for the names outside ``known``."""
    known = sorted(known)
    parts = [repr(n) + "".join(f" (did you mean {c!r}?)" for c in difflib.get_close_matches(n, known, n=1))
             for n in sorted(names)]
    return f"unknown {kind} {', '.join(parts)}; known: {', '.join(known)}"


def option_name(key: str) -> str:
    """The flat name of ``key`` ("lr" or "optim.lr"); ValueError naming the known ones otherwise."""
    group, dot, name = key.rpartition(".")
    if dot and group not in _GROUPS:
        raise ValueError(describe_unknown("option group", [group], _GROUPS) + f" (in {key!r})")
    if name not in OPTIONS:
        raise ValueError(describe_unknown("option", [name], OPTIONS if not dot else
                                          [f.name for f in fields(_GROUPS[group])]))
    if dot and OPTIONS[name] != group:
        raise ValueError(f"option {name!r} belongs to [{OPTIONS[name]}], not [{group}] (in {key!r})")
    return name


def parse_value(text: str) -> Any:
    """A command-line VALUE: TOML (``1.0``, ``true``, ``inf``, ``[1, 2]``, ``"x"``), else the text itself."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_assignment(item: str) -> tuple[str, Any]:
    """("KEY", parsed VALUE) of ``KEY=VALUE``; the key is returned as written."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"--set {item!r}: expected KEY=VALUE, e.g. lr=1.0, optim.lr=1.0 or epsilon=inf")
    return key.strip(), parse_value(value.strip())


def _deserialised(name: str, value: Any) -> Any:
    """A value read from TOML/JSON/--set: ``epsilon = inf`` and "none" (where None is allowed) are None."""
    if name == "epsilon" and value == math.inf:
        return None
    may_be_none = type(None) in _members(_hints(_GROUPS[OPTIONS[name]])[name])
    return None if may_be_none and value == _NONE else value


def _serialised(name: str, value: Any) -> Any:
    if name == "epsilon" and value is None:
        return math.inf
    return str(value) if isinstance(value, Path) else value


@dataclass(frozen=True)
class TrainConfig:
    """Every option of a training run, in five groups; frozen: :meth:`replace` makes a new one.

    ``TrainConfig.create(name="nlft", blocks=1, epsilon=3.0, lr=0.5)``; ``fit(model, data, config,
    lr=...)`` trains with it (keywords override it); :func:`dp_taft.finetune` also builds the
    model ``method`` names. The module docstring describes the serialised form.
    """

    method: MethodOptions = field(default_factory=MethodOptions)
    privacy: PrivacyOptions = field(default_factory=PrivacyOptions)
    optim: OptimOptions = field(default_factory=OptimOptions)
    data: DataOptions = field(default_factory=DataOptions)
    run: RunOptions = field(default_factory=RunOptions)

    def __post_init__(self) -> None:
        bad = [g for g, cls in _GROUPS.items() if not isinstance(getattr(self, g), cls)]
        if bad:
            raise ValueError(f"TrainConfig groups {bad} are not option groups: build them from flat names with "
                             "TrainConfig.create(**options) or TrainConfig.from_dict(tables)")

    @classmethod
    def create(cls, **options: Any) -> TrainConfig:
        """The defaults with ``options`` (flat names or "group.name") set."""
        return cls().replace(**options)

    def replace(self, **options: Any) -> TrainConfig:
        """A copy with ``options`` (flat or "group.name") set; ValueError for an unknown name or a bad value."""
        changes: dict[str, dict[str, Any]] = {}
        for key, value in options.items():
            name = option_name(key)
            group = changes.setdefault(OPTIONS[name], {})
            if name in group:
                raise ValueError(f"option {name!r} given twice (as {name!r} and {OPTIONS[name]}.{name})")
            group[name] = value
        return dataclasses.replace(self, **{g: dataclasses.replace(getattr(self, g), **values)
                                            for g, values in changes.items()})

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Nested ``{group: {option: value}}``, TOML/JSON-ready: None left out (``epsilon`` None is
        ``inf``; a missing epsilon is left out), paths as strings."""
        out: dict[str, dict[str, Any]] = {}
        for group in _GROUPS:
            values = dataclasses.asdict(getattr(self, group))
            out[group] = {k: _serialised(k, v) for k, v in values.items()
                          if v is not REQUIRED and (v is not None or k == "epsilon")}
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        """The config of group tables ``{"optim": {"lr": 1.0}}``, flat and "group.name" keys; others: defaults."""
        return cls().with_values(_flatten(data))

    @classmethod
    def from_toml(cls, path: str | Path) -> TrainConfig:
        """The config in the TOML file ``path`` (tables ``[method] [privacy] [optim] [data] [run]``)."""
        with open(path, "rb") as f:
            try:
                return cls.from_dict(tomllib.load(f))
            except ValueError as e:  # TOMLDecodeError is one too
                raise ValueError(f"{path}: {e}") from e

    def with_values(self, values: Mapping[str, Any]) -> TrainConfig:
        """:meth:`replace` with values in the serialised form (``epsilon = inf``, ``"none"``: None)."""
        return self.replace(**{k: _deserialised(option_name(k), v) for k, v in values.items()})

    def with_sets(self, sets: Iterable[str]) -> TrainConfig:
        """A copy with ``KEY=VALUE`` applied in order (``optim.lr=1.0``, ``epsilon=inf``; :func:`parse_value`)."""
        config = self
        for item in sets:
            key, value = parse_assignment(item)
            try:
                config = config.with_values({key: value})
            except ValueError as e:
                raise ValueError(f"--set {item!r}: {e}") from e
        return config

    @classmethod
    def preset(cls, method: str, *, private: bool = True, epsilon: float | Required = REQUIRED) -> TrainConfig:
        """The tuned config of ``method`` (:func:`dp_taft.presets.preset`)."""
        from .presets import preset  # imported here: dp_taft.presets builds on this module
        return preset(method, private=private, epsilon=epsilon)

    def fit_options(self) -> dict[str, Any]:
        """The flat options :func:`dp_taft.fit` reads (all but ``method``'s); ValueError without ``epsilon``."""
        if self.privacy.epsilon is REQUIRED:
            raise ValueError("epsilon is required: a target ε > 0, or None to train without privacy")
        return {name: getattr(getattr(self, group), name) for name, group in OPTIONS.items() if name in FIT_OPTIONS}

    def validate(self) -> TrainConfig:
        """``self``, after ``fit``'s checks that need no data or model (ranges, combinations, ``epsilon``)."""
        check_arguments(self.fit_options())
        return self


def _flatten(data: Mapping[str, Any]) -> dict[str, Any]:
    """Flat "group.name" / name keys of a mapping holding group tables and/or flat keys."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            if key not in _GROUPS:
                raise ValueError(describe_unknown("table", [key], _GROUPS))
            flat.update({f"{key}.{name}": v for name, v in value.items()})
        else:
            flat[key] = value
    return flat
