"""The sweep's configuration: reading and checking ``experiments/sweep.toml``, ``--set`` overrides, run configs.

A profile of the config file gives the sweep settings (methods, k, ε, seeds, δ, data sizes,
...) and each method's hyperparameters; :func:`load_config` resolves them (with the tuned
settings of ``python -m experiments.tune``), :func:`apply_sets` applies command-line
overrides, :func:`check_sweep` and :func:`check_hparams` refuse bad values before any run
starts, and :func:`run_config` makes a run's dp_taft.TrainConfig.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dp_taft import TrainConfig
from dp_taft.config import OPTIONS, describe_unknown, option_name, parse_assignment
from dp_taft.presets import LABEL_METHODS, TUNED_FILE, load_tuned, method_tables
from experiments.config import read_profiled

__all__ = ["DEFAULT_CONFIG", "HPARAM_KEYS", "METHODS", "RUN_OPTIONS", "apply_sets", "check_hparams",
           "check_sweep", "fit_values", "hparam_key", "load_config", "method_hparams", "run_config", "split_hparams"]

DEFAULT_CONFIG = Path(__file__).with_name("sweep.toml")
#: The methods by their labels in configs and results (dp_taft.presets.METHOD_LABELS), in output order.
METHODS = tuple(LABEL_METHODS)
SWEEP_KEYS = frozenset({
    "methods", "blocks", "epsilons", "seeds", "delta", "accountant", "private_train_size", "test_size", "data_seed",
    "reproducible", "tuned",
})
#: Options of dp_taft.TrainConfig that the sweep sets itself for every run (method, k, ε, seed, outputs, ...);
#: the training loss is never printed (a noiseless statistic of the private data, kept out of the logs).
RUN_OPTIONS = frozenset({"name", "blocks", "epsilon", "delta", "accountant", "seed", "device", "checkpoint_dir",
                         "quiet", "cache_dir", "show_train_loss", "distributed"})
#: Keys of [hparams] tables and --set: every other option of dp_taft.TrainConfig (unset: its defaults).
HPARAM_KEYS = frozenset(OPTIONS) - RUN_OPTIONS
#: Hyperparameters of the two-stage TAFT only (dp_taft.head_first): its probe stage.
HEAD_KEYS = frozenset(k for k in HPARAM_KEYS if OPTIONS[k] == "method")
#: Value of the [sweep] key tuned that names the settings shipped with dp_taft (dp_taft/presets/tuned.toml).
SHIPPED_TUNED = "dp_taft.presets"


def split_hparams(table: dict[str, Any], where: str) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(shared hyperparameters, {method: overrides}) of an [hparams]-like table, keys checked."""
    return method_tables(table, where, HPARAM_KEYS)


def _load_tuned(path: Path) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """({method: hyperparameters}, {method: non-private overrides}) of a file written by experiments.tune."""
    try:
        return load_tuned(path, HPARAM_KEYS)
    except FileNotFoundError:
        raise ValueError(f"tuned settings {path} not found: run `python -m experiments.tune --write {path}`, "
                         'or set tuned = "" in the sweep config for the untuned [hparams]') from None


def load_config(
    path: str | Path, profile: str, *, tuned: bool = True
) -> tuple[dict[str, Any], dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """(sweep settings, {method: hyperparameters}, {method: non-private overrides}) of ``profile`` in ``path``.

    Hyperparameters resolve as [hparams] -> [hparams.<method>] -> the tuned file's
    [hparams.<method>] (the ``tuned`` key: a file relative to ``path``, or "dp_taft.presets" for
    the settings shipped with dp_taft; skipped when ``tuned`` is False or the key is "") -> the
    profile's hparams; non-private overrides as [nonprivate] -> [nonprivate.<method>] -> the
    tuned file's [nonprivate.<method>] -> the profile's hparams again: a profile sets the scale
    of every run (a smoke profile's batch of 32 on 128 examples), private or not.
    """
    cfg, prof = read_profiled(path, ("sweep", "hparams", "nonprivate"), profile)
    sweep = {"tuned": "", **cfg.get("sweep", {})}
    if set(sweep) - SWEEP_KEYS:
        raise ValueError(f"{path} [sweep]: unknown key(s) {sorted(set(sweep) - SWEEP_KEYS)}; known: {sorted(SWEEP_KEYS)}")
    base, per = split_hparams(cfg.get("hparams", {}), "[hparams]")
    prof_hp = prof.pop("hparams", {})
    if set(prof) - SWEEP_KEYS:
        raise ValueError(f"{path} [profiles.{profile}]: unknown key(s) {sorted(set(prof) - SWEEP_KEYS)}; "
                         f"known: {sorted(SWEEP_KEYS)} and the table hparams")
    p_base, p_per = split_hparams(prof_hp, f"[profiles.{profile}.hparams]")
    sweep.update(prof)
    if not isinstance(sweep["tuned"], str):
        raise ValueError(f"{path}: tuned must be a file name, \"{SHIPPED_TUNED}\" (the settings shipped with "
                         f"dp_taft) or \"\" (none), got {sweep['tuned']!r}")
    if not tuned:
        sweep["tuned"] = ""
    tuned_file = TUNED_FILE if sweep["tuned"] == SHIPPED_TUNED else Path(path).parent / sweep["tuned"]
    t_per, t_np = _load_tuned(tuned_file) if sweep["tuned"] else ({}, {})
    hparams = {m: {**base, **per.get(m, {}), **t_per.get(m, {}), **p_base, **p_per.get(m, {})} for m in METHODS}
    np_base, np_per = split_hparams(cfg.get("nonprivate", {}), "[nonprivate]")
    nonprivate = {m: {**np_base, **np_per.get(m, {}), **t_np.get(m, {}), **p_base, **p_per.get(m, {})}
                  for m in METHODS}
    for m in METHODS:
        stray = (set(hparams[m]) | set(nonprivate[m])) & HEAD_KEYS if m != "taft_head" else set()
        if stray:
            raise ValueError(f"{path}: {sorted(stray)} set for method {m!r}; they belong in [hparams.taft_head]")
    return sweep, hparams, nonprivate


def apply_sets(hparams: dict[str, dict[str, Any]], sets: Sequence[str],
               nonprivate: dict[str, dict[str, Any]] | None = None) -> None:
    """Apply ``--set [nonprivate.][METHOD.]KEY=VALUE`` overrides in place, in order: KEY an option of
    dp_taft.TrainConfig (flat, or "group.name"), VALUE parsed as TOML, else a string. The command
    line is the last word for every run it names: without ``nonprivate.`` the value holds for the
    method's private and non-private runs alike (the tuned non-private settings hold every key,
    and must not silently outvote it); with it, for the non-private runs only."""
    for item in sets:
        name, value = parse_assignment(item)
        targets = [hparams] if nonprivate is None else [hparams, nonprivate]
        if name.startswith("nonprivate."):
            if nonprivate is None:
                raise ValueError(f"--set {item!r}: no non-private overrides here")
            targets, name = [nonprivate], name.removeprefix("nonprivate.")
        method, dot, key = name.partition(".")
        if not (dot and method in METHODS):  # no method: every method's, the key maybe "group.name"
            method, key = "", name
        try:
            key = hparam_key(key)
        except ValueError as e:
            raise ValueError(f"--set {item!r}: {e}") from None
        for target in targets:
            for m in [method] if method else METHODS:
                target[m][key] = value


def hparam_key(key: str) -> str:
    """The flat name of hyperparameter ``key`` (an option of dp_taft.TrainConfig, flat or
    "group.name", outside :data:`RUN_OPTIONS`); ValueError naming the known ones otherwise."""
    name = option_name(key) if "." in key else key
    if name in RUN_OPTIONS:
        raise ValueError(f"{name!r} is not a hyperparameter: the sweep sets it for every run (methods, blocks, "
                         "epsilons, delta, accountant and seeds of [sweep]; --device, --quiet, --out)")
    if name not in HPARAM_KEYS:
        raise ValueError(describe_unknown("hyperparameter", [name], HPARAM_KEYS))
    return name


def check_hparams(hparams: dict[str, dict[str, Any]], nonprivate: dict[str, dict[str, Any]]) -> None:
    """Refuse a hyperparameter of the wrong type or outside its choices before any run starts."""
    for m in METHODS:
        for private, where in ((True, m), (False, f"{m} (non-private)")):
            hp = method_hparams(hparams, nonprivate, m, private=private)
            try:
                run_config(m, 0, hp)
            except ValueError as e:
                raise ValueError(f"hyperparameters of {where}: {e}") from e


def check_sweep(sweep: dict[str, Any]) -> None:
    """Refuse sweep settings ([sweep] and its profile, after command-line overrides) that are missing or invalid."""

    def ints(name: str, low: int) -> None:
        v = sweep[name]
        if not (isinstance(v, list) and v and all(isinstance(x, int) and not isinstance(x, bool) and x >= low for x in v)):
            raise ValueError(f"{name} must be a non-empty list of integers >= {low}, got {v!r}")

    missing = SWEEP_KEYS - {"tuned"} - set(sweep)  # "tuned" is read and checked by load_config
    if missing:
        raise ValueError(f"the config lacks sweep setting(s) {sorted(missing)}")
    if not (isinstance(sweep["methods"], list) and sweep["methods"] and set(sweep["methods"]) <= set(METHODS)):
        raise ValueError(f"methods must be a non-empty list of {list(METHODS)}, got {sweep['methods']!r}")
    ints("blocks", 1)
    ints("seeds", 0)
    eps = sweep["epsilons"]
    if not (isinstance(eps, list) and eps and all(isinstance(e, (int, float)) and e > 0 for e in eps)):
        raise ValueError(f"epsilons must be a non-empty list of numbers > 0 (inf = non-private), got {eps!r}")
    if not (isinstance(sweep["delta"], float) and 0 < sweep["delta"] < 1):
        raise ValueError(f"delta must be a number in (0, 1), got {sweep['delta']!r}")
    for name in ("private_train_size", "test_size", "data_seed"):
        v = sweep[name]
        if not (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
            raise ValueError(f"{name} must be an integer >= 0 (0 = all for the sizes), got {v!r}")
    if not isinstance(sweep["reproducible"], bool):
        raise ValueError(f"reproducible must be true or false, got {sweep['reproducible']!r}")
    TrainConfig.create(accountant=sweep["accountant"])  # one of dp_taft's accountants


def method_hparams(hparams: dict[str, dict[str, Any]], nonprivate: dict[str, dict[str, Any]] | None,
                   method: str, *, private: bool) -> dict[str, Any]:
    """The hyperparameters a run of ``method`` takes: ``hparams[method]``, with the method's
    non-private overrides laid over them when the run is not ``private`` (ε = ∞)."""
    return {**hparams[method], **({} if private else (nonprivate or {}).get(method, {}))}


def fit_values(hparams: dict[str, Any]) -> dict[str, Any]:
    """``hparams`` as the config files write them, as :func:`dp_taft.fit` keywords (``"none"`` = None:
    a tuned non-private table spells "no averaging" so, to replace a private winner's)."""
    config = TrainConfig.create().with_values(hparams)
    return {name: getattr(getattr(config, OPTIONS[name]), name) for name in map(option_name, hparams)}


def run_config(method: str, k: int, hparams: dict[str, Any], **run_options: Any) -> TrainConfig:
    """The dp_taft.TrainConfig of a run of ``method`` (a label of :data:`METHODS`) with ``k`` blocks:
    ``hparams`` as the config files write them (physical_batch_size 0 = the logical batch size,
    "none" = None) and ``run_options`` (:data:`RUN_OPTIONS`: ε, δ, seed, ...)."""
    hp = {**hparams, "physical_batch_size": hparams.get("physical_batch_size") or None}
    return TrainConfig.create(name=LABEL_METHODS[method], blocks=k).with_values({**hp, **run_options})
