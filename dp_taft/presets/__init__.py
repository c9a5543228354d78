"""Tuned settings shipped with dp_taft: :func:`preset` and the file behind it, ``tuned.toml``.

``tuned.toml`` holds, per method, the DP-SGD settings that ``python -m experiments.tune``
selected on a PUBLIC proxy task (so choosing them cost no privacy; provenance in the file's
header): ``[hparams.<label>]`` for private runs and ``[nonprivate.<label>]`` overrides for
runs without privacy. Its tables, like the experiments' configs and outputs, name the methods
by their labels ("fc", "taft", "taft_head", "nlft"); the library names them "probe", "taft",
"taft-head", "nlft" (:data:`dp_taft.config.METHODS`). :data:`METHOD_LABELS` is the one map.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ..config import OPTIONS, REQUIRED, Required, TrainConfig, describe_unknown

__all__ = ["TUNED_FILE", "METHOD_LABELS", "LABEL_METHODS", "method_tables", "load_tuned", "preset"]

#: The tuned settings of every method (package data).
TUNED_FILE = Path(__file__).with_name("tuned.toml")
#: library method name -> its label in preset tables and the experiments' configs and results.
METHOD_LABELS = {"probe": "fc", "taft": "taft", "taft-head": "taft_head", "nlft": "nlft"}
#: label -> library method name.
LABEL_METHODS = {label: name for name, label in METHOD_LABELS.items()}
Settings = dict[str, Any]


def method_tables(table: Mapping[str, Any], where: str, keys: Iterable[str]) -> tuple[Settings, dict[str, Settings]]:
    """(shared settings, {label: settings}) of a table whose values are settings and whose
    sub-tables are per method label (``[hparams]`` with ``[hparams.taft]``), every key in ``keys``.

    ValueError naming ``where``, the key and the known ones for an unknown key or label.
    """
    keys = set(keys)
    shared = {k: v for k, v in table.items() if not isinstance(v, Mapping)}
    per = {k: dict(v) for k, v in table.items() if isinstance(v, Mapping)}
    for label, values in [("", shared), *per.items()]:
        name = f"{where}.{label}" if label else where
        if label and label not in LABEL_METHODS:
            raise ValueError(f"{name}: {describe_unknown('method', [label], LABEL_METHODS)}")
        if set(values) - keys:
            raise ValueError(f"{name}: {describe_unknown('hyperparameter', set(values) - keys, keys)}")
    return shared, per


def load_tuned(path: str | Path = TUNED_FILE, keys: Iterable[str] = OPTIONS
               ) -> tuple[dict[str, Settings], dict[str, Settings]]:
    """({label: settings}, {label: non-private overrides}) of a tuned file (the format of
    :data:`TUNED_FILE`), keys checked against ``keys``. FileNotFoundError when it is absent."""
    with open(path, "rb") as f:
        cfg = tomllib.load(f)
    tables = ("hparams", "nonprivate")
    if set(cfg) - set(tables):
        raise ValueError(f"{path}: {describe_unknown('table', set(cfg) - set(tables), tables)}")
    (shared, per), (np_shared, np_per) = (method_tables(cfg.get(t, {}), f"{path} [{t}]", keys)
                                          for t in tables)
    if shared or np_shared:
        raise ValueError(f"{path}: settings outside a [hparams.<method>] / [nonprivate.<method>] table")
    return per, np_per


def preset(method: str, *, private: bool = True, epsilon: float | Required = REQUIRED,
           path: str | Path = TUNED_FILE) -> TrainConfig:
    """The tuned :class:`~dp_taft.config.TrainConfig` of ``method`` ("probe", "taft", "taft-head",
    "nlft"): the defaults with the file's ``[hparams.<label>]``, and with its
    ``[nonprivate.<label>]`` when ``private`` is False (then ``epsilon`` is None).

    ``epsilon``: the target ε > 0 of a private run; left out, the config has none yet and
    ``fit`` refuses it until ``config.replace(epsilon=...)``. ``blocks`` keeps its default
    k = 2, at which the settings were tuned.
    """
    if method not in METHOD_LABELS:
        label = LABEL_METHODS.get(method)
        hint = f" ({method!r} is the experiments' label of {label!r})" if label else ""
        raise ValueError(describe_unknown("method", [method], METHOD_LABELS) + hint)
    if not private and epsilon not in (REQUIRED, None):
        raise ValueError(f"private=False trains without privacy: drop epsilon={epsilon!r}, or use private=True")
    label = METHOD_LABELS[method]
    hparams, nonprivate = load_tuned(path)
    if label not in hparams:
        raise ValueError(f"{path} has no [hparams.{label}] table (the settings of {method!r})")
    values = {**hparams[label], **({} if private else nonprivate.get(label, {}))}
    return TrainConfig.create(name=method).with_values(values).replace(epsilon=epsilon if private else None)
