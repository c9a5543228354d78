"""Self-describing model files: reload a trained model into exactly the function it was trained as.

Saving only Δw (``TangentViT.delta_state_dict()``) is a trap: the tangent model's w0 includes
its classifier head, which for a new task is freshly initialised (or, for TAFT around a
privately trained head, the output of a first private stage) and is in no pretrained weights
file. Loaded onto a new ``timm.create_model(...)``, Δw then sits on another random head and
the model silently answers differently. A model file (:data:`MODEL_FILE`, safetensors) holds:

* ``delta.<name>``: Δw of a :class:`~dp_taft.TangentViT`, keyed by the timm parameter names;
* ``trained.<name>``: the trained parameters of NLFT or a linear probe, keyed by their names
  in the method module (:class:`~dp_taft.methods.NLFTViT`, :class:`~dp_taft.methods.LinearProbe`);
* ``base.<name>``: the parts of w0 that no pretrained weights file holds, keyed by timm names
  (for a TangentViT: its head w0);
* metadata ``format`` (:data:`FORMAT`) and ``spec`` (a :class:`ModelSpec` as JSON): the timm
  model and its kwargs, the weights file, the method and k, the class names, the data config,
  the package version and the :func:`~dp_taft.fingerprint.fingerprint` of w0.

:func:`load_model` rebuilds w0 from the spec and the pretrained weights, and refuses to load
onto a w0 whose fingerprint differs (:class:`BaseMismatchError`). Nothing in the file comes
from the private data except the trained (DP) parameters themselves: no data paths, no ids.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
import torch.nn as nn

from .backbone import BackboneSpec, json_copy
from .config import MethodOptions
from .fingerprint import fingerprint
from .methods import LinearProbe, NLFTViT
from .privacy.checkpoint import fsync_dir, private_dir
from .privacy.validate import check_choice, check_int
from .recipes import build_model
from .tangent import TangentViT

__all__ = ["MODEL_FILE", "FORMAT", "METHODS", "ModelSpec", "BaseMismatchError", "fingerprint", "save_model",
           "load_model"]

MODEL_FILE = "delta.safetensors"
FORMAT = "dp_taft.model/1"
#: Method name -> the module type it trains ("taft-head" is TAFT around a privately trained head).
METHODS: dict[str, type[nn.Module]] = {"taft": TangentViT, "taft-head": TangentViT, "nlft": NLFTViT,
                                       "probe": LinearProbe}
_PREFIXES = ("delta", "trained", "base")


class BaseMismatchError(ValueError):
    """The pretrained weights given at load time are not the w0 the model was trained around."""


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a trained model, apart from its tensors.

    ``backbone``: the timm model, its kwargs, its number of classes and the pretrained weights
    file (:class:`dp_taft.backbone.BackboneSpec`); ``method``: one of :data:`METHODS`;
    ``blocks``: k of TAFT-k / NLFT-k (0 for a probe); ``classes``: one name per output, in
    output order; ``data_config``: timm's data config of the model (input_size, mean, std,
    interpolation, crop_pct, crop_mode), JSON-able; ``fingerprint``: SHA-256 (hex) of w0 and the
    structure (:func:`dp_taft.fingerprint.fingerprint`), filled in by :func:`save_model`; ``version``: the
    dp_taft version that wrote the file (filled in by :func:`save_model`); ``composition``:
    free text for models built from several trained ones (e.g. "parallel over 4 shards"), or None.
    """

    backbone: BackboneSpec
    method: str
    blocks: int
    classes: tuple[str, ...]
    data_config: dict[str, Any]
    fingerprint: str = ""
    version: str = ""
    composition: str | None = None

    def __post_init__(self) -> None:
        check_choice("method", self.method, tuple(METHODS))
        check_int("blocks", self.blocks, "k, the number of fine-tuned blocks", low=0)
        classes = tuple(self.classes) if isinstance(self.classes, (list, tuple)) else ()
        if not classes or not all(isinstance(c, str) and c for c in classes):
            raise ValueError(f"classes must be a non-empty sequence of class names (strings), got {self.classes!r}")
        if len(classes) != self.backbone.num_classes:
            raise ValueError(f"{len(classes)} class names for a backbone with num_classes={self.backbone.num_classes}: "
                             "give one name per output of the classifier")
        object.__setattr__(self, "classes", classes)
        # One JSON round trip now, so a spec equals its reloaded self (tuples become lists).
        object.__setattr__(self, "data_config", json_copy(self.data_config, "data_config"))
        for name in ("fingerprint", "version"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a string, got {getattr(self, name)!r}")
        if self.composition is not None and not isinstance(self.composition, str):
            raise ValueError(f"composition must be a line of text or None, got {self.composition!r}")

    def to_dict(self) -> dict[str, Any]:
        """The spec as JSON-ready data (the backbone through its own ``to_dict``)."""
        return {"backbone": self.backbone.to_dict(), "method": self.method, "blocks": self.blocks,
                "classes": list(self.classes), "data_config": self.data_config, "fingerprint": self.fingerprint,
                "version": self.version, "composition": self.composition}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ModelSpec":
        """Read :meth:`to_dict` output; ValueError names a missing or unknown field."""
        fields = [f.name for f in dataclasses.fields(cls)]
        if not isinstance(data, Mapping):
            raise ValueError(f"a model spec must be a JSON object, got {type(data).__name__}")
        missing, unknown = sorted(set(fields) - set(data)), sorted(set(data) - set(fields))
        if missing or unknown:
            raise ValueError(f"model spec fields: missing {missing}, unknown {unknown} (expected {fields})")
        return cls(**{**data, "backbone": BackboneSpec.from_dict(data["backbone"])})


def save_model(path_dir: str | Path, model: nn.Module, spec: ModelSpec) -> ModelSpec:
    """Write ``model`` to ``path_dir``/:data:`MODEL_FILE` with ``spec`` as its description.

    Args:
        path_dir: the model directory, created owner-only (0700) if missing.
        model: the trained method module (TangentViT, NLFTViT or LinearProbe), on any device.
        spec: its description; ``fingerprint`` and ``version`` are filled in here (a
            ``fingerprint`` already set must equal the model's).

    Returns:
        The spec as written (with fingerprint and version).

    Raises:
        ValueError: ``spec`` does not describe ``model`` (method, k or number of classes).
    """
    from . import __version__

    _check_describes(spec, model)
    found = fingerprint(model)
    if spec.fingerprint and spec.fingerprint != found:
        raise ValueError(f"spec.fingerprint {spec.fingerprint[:12]}… is not the model's ({found[:12]}…): the spec "
                         "describes another base; leave fingerprint empty and save_model fills it in")
    spec = dataclasses.replace(spec, fingerprint=found, version=__version__)
    tensors = {f"{prefix}.{name}": t.detach().to("cpu").contiguous().clone()
               for prefix, group in zip(_PREFIXES, _groups(model)) for name, t in group.items()}
    path = private_dir(path_dir) / MODEL_FILE
    # Write beside, then rename: a crash never leaves a torn file in place of a good one.
    tmp = path.with_name(f".{MODEL_FILE}.{os.getpid()}.tmp")
    safetensors.torch.save_file(tensors, tmp, metadata={"format": FORMAT, "spec": json.dumps(spec.to_dict())})
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return spec


def _check_describes(spec: ModelSpec, model: nn.Module) -> None:
    kind = METHODS[spec.method]  # a family's subclass (TangentSwin, NLFTEva, LinearProbeSwin...) is one of them
    if not isinstance(model, kind):
        raise ValueError(f"spec.method={spec.method!r} trains a {kind.__name__}, but the model is a "
                         f"{type(model).__name__}: give the method the model was built with")
    if model.num_blocks != spec.blocks:
        raise ValueError(f"spec.blocks={spec.blocks} but the model fine-tunes {model.num_blocks} block(s): "
                         f"set blocks={model.num_blocks}")
    if model.num_classes != len(spec.classes):
        raise ValueError(f"{len(spec.classes)} class names for a model with {model.num_classes} outputs")


def _groups(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(Δw, trained parameters, w0 outside the pretrained weights) of a method module."""
    if isinstance(model, TangentViT):
        # the heads' w0 are random (new task) or privately trained (taft-head): in no weights file
        heads = [h for h in (model.head, getattr(model, "head_dist", None)) if h is not None]  # DeiT: two heads
        base = {f"{h.source}.{name}": w for h in heads for name, w in (("weight", h.weight0), ("bias", h.bias0))
                if w is not None}
        return model.delta_state_dict(), {}, base
    trained = {name: p for name, p in model.named_parameters() if p.requires_grad}
    return {}, trained, {}


def load_model(path_dir: str | Path, *, weights: str | Path | None = None) -> tuple[nn.Module, ModelSpec]:
    """The trained model saved by :func:`save_model` in ``path_dir``, in eval mode on the CPU, and its spec.

    Rebuilds the backbone from the spec (``weights`` replaces the stored weights file path,
    e.g. when the file moved), writes the stored w0 parts into it, builds the method, checks
    its :func:`~dp_taft.fingerprint.fingerprint` and loads the trained tensors.

    Raises:
        BaseMismatchError: the rebuilt w0 is not the one the model was trained around.
        ValueError: no model file, a file of another format or version, or tensors that do not
            match the method module (names or shapes).
    """
    path = Path(path_dir) / MODEL_FILE
    spec, groups = _read(path)
    backbone = spec.backbone.create(weights)
    _write_base(backbone, groups["base"], path)
    # 'taft-head' trains a TangentViT around its private head, built like TAFT's; the head w0 is in the file
    model = build_model(backbone, MethodOptions(name="taft" if spec.method == "taft-head" else spec.method,
                                                blocks=spec.blocks))
    found = fingerprint(model)
    if found != spec.fingerprint:
        used = weights if weights is not None else spec.backbone.weights
        raise BaseMismatchError(
            f"{path} was trained around base {spec.fingerprint[:12]}…, but the base rebuilt from "
            f"{'timm pretrained weights' if used is None else f'weights file {str(used)!r}'} "
            f"(model {spec.backbone.name!r}) is {found[:12]}…; the model would answer differently. Load with "
            f"the weights the model was trained from: --weights FILE (Python: weights=FILE). "
            f"Full fingerprints: trained {spec.fingerprint}, rebuilt {found}.")
    if isinstance(model, TangentViT):
        _require_empty(groups["trained"], "trained", path)
        _copy_exact(model.deltas(), groups["delta"], path, "delta")
    else:
        _require_empty(groups["delta"], "delta", path)
        _copy_exact({n: p for n, p in model.named_parameters() if p.requires_grad}, groups["trained"], path, "trained")
    return model.eval(), spec


def _read(path: Path) -> tuple[ModelSpec, dict[str, dict[str, torch.Tensor]]]:
    """The spec and the tensors of a model file, grouped by prefix; ValueError for anything else."""
    if not path.is_file():
        raise ValueError(f"no model file {path}: give the directory that dp_taft.model_dir.save (or dp-taft train "
                         f"--out) wrote, which holds {MODEL_FILE}")
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (safetensors.SafetensorError, OSError) as e:
        raise ValueError(f"{path} is not a readable safetensors file ({e}): it is damaged or not a model "
                         "file; copy it again from the model directory") from None
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path} has format {metadata.get('format')!r}; this version of dp_taft reads {FORMAT!r}. "
                         "A newer format needs a newer dp_taft; a bare delta_state_dict() file lacks the head w0 and "
                         "cannot be reloaded exactly: save models with dp_taft.model_dir.save")
    try:
        spec = ModelSpec.from_dict(json.loads(metadata.get("spec", "")))
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: its model spec is unreadable ({e})") from None
    groups: dict[str, dict[str, torch.Tensor]] = {prefix: {} for prefix in _PREFIXES}
    for key, tensor in tensors.items():
        prefix, _, name = key.partition(".")
        if prefix not in groups or not name:
            raise ValueError(f"{path}: unexpected tensor {key!r} (names start with one of {_PREFIXES})")
        groups[prefix][name] = tensor
    return spec, groups


@torch.no_grad()
def _write_base(backbone: nn.Module, base: Mapping[str, torch.Tensor], path: Path) -> None:
    params = dict(backbone.named_parameters())
    for name, tensor in base.items():
        if name not in params or params[name].shape != tensor.shape:
            raise ValueError(f"{path}: stored base tensor {name!r} {tuple(tensor.shape)} has no counterpart in the "
                             "rebuilt backbone: the spec's model or model kwargs differ from those trained")
        params[name].copy_(tensor)


def _require_empty(group: Mapping[str, torch.Tensor], prefix: str, path: Path) -> None:
    if group:
        raise ValueError(f"{path}: tensors {sorted(group)[:5]} ('{prefix}.*') do not belong to its method")


@torch.no_grad()
def _copy_exact(params: Mapping[str, nn.Parameter], stored: Mapping[str, torch.Tensor], path: Path,
                prefix: str) -> None:
    """Copy ``stored`` into ``params``: same names, shapes and dtypes, or ValueError naming them."""
    missing, unexpected = sorted(params.keys() - stored.keys()), sorted(stored.keys() - params.keys())
    if missing or unexpected:
        raise ValueError(f"{path}: '{prefix}.*' tensors do not match the model: missing {missing[:10]}, "
                         f"unexpected {unexpected[:10]}")
    for name, p in params.items():
        if stored[name].shape != p.shape or stored[name].dtype != p.dtype:
            raise ValueError(f"{path}: {prefix}.{name} is {tuple(stored[name].shape)} {stored[name].dtype}, "
                             f"the model's is {tuple(p.shape)} {p.dtype}")
        p.copy_(stored[name])
