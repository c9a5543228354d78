"""Hyperparameter tuning on a public proxy task, at equal trial budgets, for the sweep.

``python -m experiments.tune`` selects, for each method of the sweep (FC, TAFT-k, TAFT-k
head first, NLFT-k), the DP-SGD settings (lr, epochs, batch size, loss, LR schedule,
clipping kind, iterate averaging; the head stage's epochs for TAFT head first) on a
*public* stand-in for the private task, and writes the winners to ``tuned.toml``, the
format of ``dp_taft/presets/tuned.toml``: the file ``experiments/sweep.toml`` reads (its
``tuned`` key) and ``dp_taft.presets.preset`` returns as configs. Choosing hyperparameters on
the private data would itself leak it (Papernot & Steinke, "Hyperparameter Tuning with
Renyi Differential Privacy", ICLR 2022), outside the ε the runs report; here no private
example or label is read, so the sweep's ε covers the whole procedure.

The proxy mimics the private task's shift. The default backbone is pretrained on public
Fashion-MNIST classes 0-4 and fine-tuned on private classes 5-9 it never saw; the proxy
backbone is pretrained the same way (:func:`experiments.pretrain.pretrain`, deterministic)
on public classes 0-2 only and fine-tuned with DP-SGD on public classes 3-4, with the
private task's N, δ and accountant, so a trial's q, T and σ equal the sweep run's. The
winners then transfer to the real backbone and task. See ``experiments/tune.toml``.

Budget and fairness: every method gets the same ``trials`` configurations (one Latin
hypercube design over the search space, drawn with a public seed; method-specific keys are
added to it), each trained once at the tuning ε; the ε = ∞ settings get the same design
without privacy, lr over its own range (``[nonprivate_space]``), so the non-private column is
tuned as widely as the private ones. Outputs, in ``--out`` (default ``results/tune-<timestamp>/``):

* ``trials.csv``: one row per trial (settings as JSON, proxy accuracy, wall time), appended
  as each ends; rerunning with the same ``--out`` skips finished trials (a hash per phase: under
  a new non-private range, the private rows copied into a new ``--out`` are reused);
* ``summary.md``: the budget, the proxy, and every trial per method, winner marked;
* ``tuned.toml``: the winners, with that provenance in its header (``--write PATH`` also
  copies it there; ``--write`` alone to ``dp_taft/presets/tuned.toml``, making them the
  sweep's defaults and the library's presets).

Trial randomness is seeded with the trial number: the proxy is public, so nothing is
protected, and the tuning is reproducible.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import shutil
import sys
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dp_taft import TrainConfig
from dp_taft.presets import TUNED_FILE
from experiments import results as res
from experiments import sweep as sw
from experiments import sweep_config as sc
from experiments.config import read_profiled
from experiments.task import Task, load_default_checkpoint, subsample

__all__ = ["COLUMNS", "DEFAULT_CONFIG", "PHASES", "design", "load_config", "main", "phase_configs", "select",
           "tuned_toml"]

DEFAULT_CONFIG = Path(__file__).with_name("tune.toml")
TUNE_KEYS = frozenset({
    "methods", "blocks", "epsilon", "trials", "search_seed", "public_classes", "proxy_classes",
    "pretrain_epochs", "pretrain_max_train", "proxy_train_size", "proxy_test_size",
})
COLUMNS = ("phase", "method", "trial", "hparams", "target_epsilon", "epsilon", "sigma", "steps", "accuracy",
           "status", "error", "wall_time_s", "config", "finished_at")
CSV_NAME, SUMMARY_NAME, TUNED_NAME = "trials.csv", "summary.md", "tuned.toml"
PHASES = ("private", "nonprivate")
#: "none" in the space means fit's averaging=None (TOML has no null).
_NO_AVERAGING = "none"


# --------------------------------------------------------------------------- config
def _merge_space(base: dict[str, Any], where: str) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    shared = {k: v for k, v in base.items() if k not in sc.METHODS}
    per = {k: v for k, v in base.items() if k in sc.METHODS}
    for key, spec in [*shared.items(), *((k, v) for m in per.values() for k, v in m.items())]:
        try:
            sc.hparam_key(key)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        _check_spec(key, spec, where)
    return shared, per


def _check_spec(key: str, spec: Any, where: str) -> None:
    """A non-empty list of values or ``{log = [low, high]}``, each value of the option's type and choices."""
    listed = isinstance(spec, list) and spec
    ranged = (isinstance(spec, dict) and set(spec) == {"log"} and isinstance(spec["log"], list)
              and len(spec["log"]) == 2 and all(isinstance(v, (int, float)) for v in spec["log"])
              and 0 < spec["log"][0] < spec["log"][1])
    if not (listed or ranged):
        raise ValueError(f"{where}.{key}: expected a non-empty list of values or {{log = [low, high]}} with "
                         f"0 < low < high, got {spec!r}")
    for value in spec if listed else spec["log"]:
        try:
            TrainConfig().with_values({key: value})
        except ValueError as e:
            raise ValueError(f"{where}.{key}: {e}") from None


def load_config(path: str | Path, profile: str) -> tuple[dict[str, Any], dict[str, dict[str, Any]], dict[str, Any]]:
    """(settings, {method: search space}, non-private lr space) of ``profile`` in ``path``."""
    cfg, prof = read_profiled(path, ("tune", "space", "nonprivate_space"), profile)
    prof_space = prof.pop("space", {})
    settings = {**cfg.get("tune", {}), **prof}
    if set(settings) - TUNE_KEYS or TUNE_KEYS - set(settings):
        raise ValueError(f"{path} [tune] + profile {profile!r}: unknown {sorted(set(settings) - TUNE_KEYS)}, "
                         f"missing {sorted(TUNE_KEYS - set(settings))}")
    _check_settings(settings)
    shared, per = _merge_space(cfg.get("space", {}), "[space]")
    p_shared, p_per = _merge_space(prof_space, f"[profiles.{profile}.space]")
    spaces = {m: {**shared, **per.get(m, {}), **p_shared, **p_per.get(m, {})} for m in settings["methods"]}
    nonprivate = dict(cfg.get("nonprivate_space", {}))
    if set(nonprivate) != {"lr"}:
        raise ValueError(f"{path} [nonprivate_space]: expected exactly the key lr, got {sorted(nonprivate)}")
    _check_spec("lr", nonprivate["lr"], "[nonprivate_space]")
    return settings, spaces, nonprivate


def _check_settings(s: dict[str, Any]) -> None:
    def count(name: str, low: int) -> None:
        if not (isinstance(s[name], int) and not isinstance(s[name], bool) and s[name] >= low):
            raise ValueError(f"{name} must be an integer >= {low}, got {s[name]!r}")

    for name, low in (("blocks", 1), ("trials", 1), ("search_seed", 0),
                      ("pretrain_epochs", 1), ("pretrain_max_train", 0), ("proxy_train_size", 0),
                      ("proxy_test_size", 0)):
        count(name, low)
    if not (isinstance(s["methods"], list) and s["methods"] and set(s["methods"]) <= set(sc.METHODS)):
        raise ValueError(f"methods must be a non-empty list of {list(sc.METHODS)}, got {s['methods']!r}")
    if not (isinstance(s["epsilon"], (int, float)) and 0 < s["epsilon"] < math.inf):
        raise ValueError(f"epsilon must be a finite number > 0 (the tuning target), got {s['epsilon']!r}")
    pub, proxy = s["public_classes"], s["proxy_classes"]
    for name, cls in (("public_classes", pub), ("proxy_classes", proxy)):
        if not (isinstance(cls, list) and cls and set(cls) <= set(range(5)) and len(set(cls)) == len(cls)):
            raise ValueError(f"{name} must be distinct public classes in 0..4, got {cls!r}")
    if set(pub) & set(proxy) or len(proxy) < 2:
        raise ValueError(f"proxy_classes {proxy} must be >= 2 classes the proxy backbone never saw "
                         f"(disjoint from public_classes {pub})")


# --------------------------------------------------------------------------- design
def design(space: dict[str, Any], trials: int, seed: int) -> list[dict[str, Any]]:
    """``trials`` configurations: a Latin hypercube over ``space`` drawn with ``seed``.

    Each listed value appears ⌊trials/len⌋ or ⌈trials/len⌉ times; a ``{log = [a, b]}`` key
    takes one value in each of ``trials`` equal log-width strata of [a, b]; every key is
    shuffled independently by its own generator, keyed by ``seed`` and the key's name, so
    a key's column does not depend on the other keys: methods whose spaces differ only in
    extra keys (``head_epochs``) get the same values of the shared ones, trial by trial.
    """
    columns: dict[str, list[Any]] = {}
    for key in sorted(space):
        rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
        spec = space[key]
        if isinstance(spec, dict):
            lo, hi = math.log(spec["log"][0]), math.log(spec["log"][1])
            u = (np.arange(trials) + rng.random(trials)) / trials
            values = [float(f"{math.exp(lo + (hi - lo) * x):.3g}") for x in u]
        else:
            values = [spec[i % len(spec)] for i in range(trials)]
        columns[key] = [values[i] for i in rng.permutation(trials)]
    return [{k: columns[k][t] for k in columns} for t in range(trials)]


def phase_configs(settings: dict[str, Any], spaces: dict[str, Any], nonprivate: dict[str, Any], phase: str,
                  method: str) -> list[dict[str, Any]]:
    """The trials of ``method`` in ``phase``: the non-private ones are the private ones with lr
    over the ``nonprivate`` range (trial by trial the same other settings and lr stratum, since
    ``design`` draws each key from its own generator)."""
    space = spaces[method] if phase == "private" else {**spaces[method], **nonprivate}
    return design(space, settings["trials"], settings["search_seed"])


def fit_kwargs(config: dict[str, Any]) -> dict[str, Any]:
    """A trial configuration as sweep hyperparameters (``averaging = "none"`` dropped)."""
    return {k: v for k, v in config.items() if not (k == "averaging" and v == _NO_AVERAGING)}


# --------------------------------------------------------------------------- the proxy task
def proxy_backbone_path(settings: dict[str, Any], cache_dir: Path) -> Path:
    """The proxy backbone's checkpoint under ``cache_dir``, pretrained (deterministic) if absent."""
    from experiments.pretrain import pretrained_checkpoint

    classes = "-".join(map(str, settings["public_classes"]))
    n = settings["pretrain_max_train"]
    path = cache_dir / f"proxy_vit_classes{classes}_e{settings['pretrain_epochs']}{f'_n{n}' if n else ''}.pt"
    return pretrained_checkpoint(path, epochs=settings["pretrain_epochs"], max_train=n or None,
                                 classes=settings["public_classes"])


def proxy_task(settings: dict[str, Any], backbone_path: Path) -> Task:
    """The public proxy: ``proxy_classes`` of the public split, fine-tuned from the proxy backbone."""
    from experiments.data import public_split, select_classes

    public_train, public_test = public_split()  # holds no private example
    train = select_classes(public_train, settings["proxy_classes"])
    test = select_classes(public_test, settings["proxy_classes"])
    train = subsample(train, settings["proxy_train_size"], seed=0)
    test = subsample(test, settings["proxy_test_size"], seed=1)
    num_classes = len(settings["proxy_classes"])
    cache: dict[int, torch.nn.Module] = {}

    def backbone(seed: int) -> torch.nn.Module:
        if seed not in cache:
            cache[seed] = load_default_checkpoint(backbone_path, num_classes, seed).eval()
        return cache[seed]

    info = {"dataset": "proxy", "model": "default", "classes": settings["proxy_classes"],
            "backbone": backbone_path.name, "n_train": len(train), "n_test": len(test)}
    return Task(train, test, num_classes, backbone, info)


# --------------------------------------------------------------------------- trials
def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:12]


def config_hashes(settings: dict[str, Any], spaces: dict[str, Any], nonprivate: dict[str, Any],
                  base: dict[str, Any]) -> dict[str, str]:
    """{phase: short hash of everything that fixes its trials}; a resumed ``--out`` must match. The
    private one leaves out the non-private lr range: widening it reruns the non-private phase only."""
    private = _digest([settings, spaces, base])
    return {"private": private, "nonprivate": _digest([private, nonprivate])}


def run_trial(phase: str, method: str, trial: int, config: dict[str, Any], task: Task, base: dict[str, Any],
              out: Path, *, device: str, quiet: bool) -> dict[str, Any]:
    """Train one trial (seeded with its number) through the sweep's ``run_one``; returns its trials.csv row."""
    settings, sweep_hp, sweep = base["settings"], base["hparams"][method], base["sweep"]
    epsilon = float(settings["epsilon"]) if phase == "private" else math.inf
    k = 0 if method == "fc" else settings["blocks"]
    hp = {**sweep_hp, **fit_kwargs(config)}
    run = sw.Run(method, k, trial, epsilon, tuple(sorted(hp.items())))
    row = sw.run_one(run, task, {**sweep, "reproducible": True}, out, device=device, quiet=quiet)
    return {"phase": phase, "method": method, "trial": trial, "hparams": json.dumps(config, sort_keys=True),
            "target_epsilon": epsilon, **{c: row.get(c) for c in ("epsilon", "sigma", "steps", "accuracy", "status",
                                                                   "error", "wall_time_s", "finished_at")}}


def expected_trials(settings: dict[str, Any]) -> set[tuple[str, str, str]]:
    """(phase, method, trial) of every trial the configuration asks for, as trials.csv writes them."""
    return {(phase, m, str(t)) for m in settings["methods"] for phase in PHASES for t in range(settings["trials"])}


def select(rows: Sequence[res.Row], phase: str, method: str) -> res.Row:
    """The winning trial: highest proxy accuracy among the finished ones (ties: the lower trial number)."""
    ok = [r for r in rows if r["phase"] == phase and r["method"] == method and r["status"] == "ok"]
    if not ok:
        raise RuntimeError(f"no {phase} trial of {method} finished; see {CSV_NAME} for the errors")
    return max(ok, key=lambda r: (res.to_float(r["accuracy"]), -int(r["trial"])))


def _toml_value(v: Any) -> str:
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, bool):
        return "true" if v else "false"
    return repr(v)


def tuned_toml(rows: Sequence[res.Row], settings: dict[str, Any], nonprivate: dict[str, Any], profile: str) -> str:
    """The winners as sweep.toml-style ``[hparams.<method>]`` / ``[nonprivate.<method>]`` tables, with provenance.

    A ``[nonprivate.<method>]`` table holds every setting of its winner, ``averaging = "none"``
    included: readers lay it over ``[hparams.<method>]``, whose values it must all replace.
    """
    n_private = sum(r["phase"] == "private" for r in rows)
    n_nonprivate = len(rows) - n_private
    np_lr = nonprivate["lr"]["log"]
    lines = [
        f"# Written by `python -m experiments.tune --profile {profile}`; read by experiments/sweep.toml (key tuned).",
        f"# Proxy: backbone pretrained on public Fashion-MNIST classes {settings['public_classes']} "
        f"({settings['pretrain_epochs']} epochs), DP fine-tuned on public classes {settings['proxy_classes']} "
        f"(N = {settings['proxy_train_size'] or 'all'}).",
        f"# Budget: {settings['trials']} trials per method at target epsilon {settings['epsilon']:g} (one Latin "
        f"hypercube, search_seed {settings['search_seed']}) + the same {settings['trials']} without privacy, lr "
        f"log-uniform in [{np_lr[0]:g}, {np_lr[1]:g}]; {n_private} + {n_nonprivate} trials ran.",
        "# Selection: highest proxy test accuracy. No private example or label was read.",
        "",
    ]
    for method in settings["methods"]:
        for phase, table in (("private", "hparams"), ("nonprivate", "nonprivate")):
            win = select(rows, phase, method)
            config = json.loads(win["hparams"])
            values = fit_kwargs(config) if phase == "private" else config
            lines += [f"[{table}.{method}]  # trial {win['trial']}, proxy accuracy {100 * float(win['accuracy']):.1f}%"]
            lines += [*(f"{k} = {_toml_value(v)}" for k, v in sorted(values.items())), ""]
    return "\n".join(lines)


def summary(rows: Sequence[res.Row], settings: dict[str, Any], nonprivate: dict[str, Any]) -> str:
    """Markdown: every trial per method and phase, the winner in bold."""
    np_lr = nonprivate["lr"]["log"]
    lines = ["# Public-proxy tuning", "",
             f"Proxy: classes {settings['proxy_classes']} from a backbone pretrained on {settings['public_classes']}; "
             f"{settings['trials']} private trials (target ε = {settings['epsilon']:g}) and the same "
             f"{settings['trials']} configurations without privacy (lr log-uniform in [{np_lr[0]:g}, {np_lr[1]:g}], "
             "same strata) per method. Accuracy: proxy test set (public).", ""]
    for phase in PHASES:
        for method in settings["methods"]:
            mine = [r for r in rows if r["phase"] == phase and r["method"] == method]
            if not mine:
                continue
            best = select(rows, phase, method) if any(r["status"] == "ok" for r in mine) else None
            lines += [f"## {method}, {phase}", "", "| trial | settings | accuracy (%) | steps | time (s) |",
                      "|---|---|---|---|---|"]
            for r in sorted(mine, key=lambda r: int(r["trial"])):
                acc = f"{100 * float(r['accuracy']):.1f}" if r["status"] == "ok" else f"failed: {r['error'][:80]}"
                mark = "**" if r is best else ""
                lines.append(f"| {mark}{r['trial']}{mark} | `{r['hparams']}` | {mark}{acc}{mark} | {r['steps']} "
                             f"| {r['wall_time_s']} |")
            lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------- CLI
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.tune", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="TOML config file")
    prof = p.add_mutually_exclusive_group()
    prof.add_argument("--profile", default="default", help="profile of the config file")
    prof.add_argument("--smoke", dest="profile", action="store_const", const="smoke", help="profile 'smoke' (tests)")
    p.add_argument("--out", type=Path, default=None, help="output directory (default results/tune-<timestamp>/); "
                   "an existing one is resumed")
    p.add_argument("--write", type=Path, nargs="?", const=TUNED_FILE, default=None, metavar="PATH",
                   help="also copy tuned.toml to PATH; --write alone: dp_taft/presets/tuned.toml (the sweep's "
                        "defaults and dp_taft.presets.preset's settings)")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="where the proxy backbone is kept (default: experiments.pretrain's cache directory)")
    p.add_argument("--only", nargs="+", choices=sc.METHODS, metavar="METHOD",
                   help="run only these methods' trials: processes with disjoint --only share one --out "
                        "(e.g. on several machines); the outputs are written once every trial is in trials.csv")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    p.add_argument("--quiet", action="store_true", help="no per-trial progress bars")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run (or resume) the tuning; returns 0, or 2 on a bad configuration or a mismatching ``--out``."""
    from experiments.pretrain import default_cache_dir

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        settings, spaces, np_space = load_config(args.config, args.profile)
        sweep, hparams, _ = sc.load_config(sc.DEFAULT_CONFIG, "default", tuned=False)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = args.out or Path("results") / f"tune-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    base = {"settings": settings, "hparams": hparams, "sweep": {k: sweep[k] for k in ("delta", "accountant")}}
    digests = config_hashes(settings, spaces, np_space, base)
    rows = res.read_rows(out / CSV_NAME)
    if any(r["config"] != digests.get(r["phase"]) for r in rows):
        print(f"error: {out} holds trials of another configuration: use a new --out", file=sys.stderr)
        return 2
    task = proxy_task(settings, proxy_backbone_path(settings, args.cache_dir or default_cache_dir()))
    if not sweep["delta"] < 1 / len(task.train):
        print(f"error: delta {sweep['delta']:g} is not below 1/N for the proxy's N = {len(task.train)}", file=sys.stderr)
        return 2
    done = {(r["phase"], r["method"], r["trial"]) for r in rows}
    methods = [m for m in settings["methods"] if args.only is None or m in args.only]
    for phase in PHASES:
        for method in methods:
            for trial, config in enumerate(phase_configs(settings, spaces, np_space, phase, method)):
                if (phase, method, str(trial)) in done:
                    continue
                row = run_trial(phase, method, trial, config, task, base, out, device=args.device, quiet=args.quiet)
                row["config"] = digests[phase]
                res.append_row(out / CSV_NAME, row, COLUMNS)
                acc = f"{100 * row['accuracy']:.1f}%" if row["status"] == "ok" else f"FAILED ({row['error'][:150]})"
                print(f"{phase} {method} {trial}: {acc} in {row['wall_time_s']:.0f} s {row['hparams']}", flush=True)
    rows = res.read_rows(out / CSV_NAME)  # with --only, other processes' trials too
    missing = expected_trials(settings) - {(r["phase"], r["method"], r["trial"]) for r in rows}
    if missing:
        print(f"done with {' '.join(methods)}; {len(missing)} trial(s) of other methods are not in {CSV_NAME} yet: "
              "rerun without --only once they are, to write the outputs")
        return 0
    (out / SUMMARY_NAME).write_text(summary(rows, settings, np_space))
    (out / TUNED_NAME).write_text(tuned_toml(rows, settings, np_space, args.profile))
    if args.write is not None:
        shutil.copyfile(out / TUNED_NAME, args.write)
    print(f"done: {out / TUNED_NAME}" + (f", copied to {args.write}" if args.write else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
