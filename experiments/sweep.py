"""Privacy-utility sweep: linear probe (FC), TAFT-k and NLFT-k at several target ε, over seeds.

``python -m experiments.sweep`` runs the default grid (see ``experiments/sweep.toml``) on
the offline default task (Fashion-MNIST classes 5-9 fine-tuned from a ViT pretrained on
classes 0-4), each method with the settings ``python -m experiments.tune`` chose for it on
a public proxy (``experiments/tuned.toml``), and writes, in ``--out`` (default
``results/<timestamp>/``):

* ``results.csv``: one row per run (see :data:`COLUMNS`), appended and fsynced as each
  run ends; rerunning with the same ``--out`` skips finished runs (failed ones too,
  unless ``--retry-failed``) and appends. A run killed midway resumes from its
  checkpoint under ``checkpoints/<run_id>/``, whose write-ahead privacy ledger counts
  the steps of the killed attempt; a finished run's checkpoints (every stage's: they hold
  its secret key) are deleted as it ends, and only its ledgers stay;
* ``reports/<run_id>.json``: the run's :class:`accounting.PrivacyReport` (private runs);
* ``runs/<run_id>.json``: hyperparameters, per-epoch history, warnings, error traceback;
* ``summary.md``: mean ± std test accuracy (%) over seeds, rows methods, columns ε, and
  TAFT-k − NLFT-k paired by seed with 95% t intervals;
* ``prefix_cache/``: each distinct frozen-prefix output (train and test), computed once and
  mapped by every run that shares it (``--no-prefix-reuse``: none). It holds features of
  the private data: delete it when the sweep is done;
* ``privacy_utility.png``: accuracy against ε per method, ∞ (non-private) apart.

``--quick`` (every method and ε once, on less data) and ``--smoke`` (tests) pick other
profiles of the config file. A run that fails (e.g. an ε unreachable for its settings)
is recorded with its error and the sweep goes on.

Real data sets (need network unless the files are local): ``--dataset cifar10|cifar100|
fashion-mnist --model <timm name> --pretrained [--checkpoint FILE]``; images are resized
to the model's input size.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import math
import sys
import time
import tomllib
import traceback
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset
from tqdm.auto import tqdm

from dp_taft import FitResult, fit, methods
from dp_taft.head_first import fit_head_first
from dp_taft.privacy.checkpoint import CHECKPOINT_FILE
from experiments import results as res
from experiments.config import read_profiled

__all__ = ["COLUMNS", "DEFAULT_CONFIG", "Run", "Task", "load_config", "main", "plan_runs", "write_outputs"]

DEFAULT_CONFIG = Path(__file__).with_name("sweep.toml")
METHODS = ("fc", "taft", "taft_head", "nlft")
#: Hyperparameters of the two-stage TAFT only (dp_taft.head_first): its probe stage.
HEAD_KEYS = frozenset({"head_epochs", "head_lr"})
DATASETS = ("default", "cifar10", "cifar100", "fashion-mnist")
NUM_CLASSES = {"default": 5, "cifar10": 10, "cifar100": 100, "fashion-mnist": 10}
SWEEP_KEYS = frozenset({
    "methods", "blocks", "epsilons", "seeds", "delta", "accountant", "private_train_size", "test_size", "data_seed",
    "reproducible", "tuned",
})
HPARAM_KEYS = frozenset({
    "epochs", "batch_size", "lr", "optimizer", "momentum", "weight_decay", "max_grad_norm", "loss", "kappa",
    "physical_batch_size", "grad_sample_mode", *HEAD_KEYS,
    # fit's convex toolbox; unset means fit's defaults (constant lr, flat clipping, no averaging)
    "lr_schedule", "warmup", "clipping", "clipping_gamma", "averaging", "tail_fraction", "ema_decay",
})
#: results.csv schema, one row per run attempt (the last row of a run_id is the one that counts).
COLUMNS = (
    "run_id", "method", "k", "label", "seed", "randomness", "target_epsilon", "epsilon", "delta", "sigma",
    "sample_rate", "steps", "accuracy", "wall_time_s", "report", "status", "error",
    "dataset", "model", "n_train", "n_test", "epochs", "batch_size", "lr", "optimizer", "max_grad_norm", "loss",
    "settings", "finished_at",
)
CSV_NAME, SUMMARY_NAME, PLOT_NAME = "results.csv", "summary.md", "privacy_utility.png"
#: Prefix caches shared by the runs (features of the private data: delete it with the checkpoints).
PREFIX_CACHE_DIR = "prefix_cache"


# --------------------------------------------------------------------------- config
def _split(table: dict[str, Any], where: str) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(shared hyperparameters, {method: overrides}) of an [hparams]-like table, keys checked."""
    shared = {k: v for k, v in table.items() if not isinstance(v, dict)}
    per = {k: v for k, v in table.items() if isinstance(v, dict)}
    bad = set(shared) - HPARAM_KEYS
    if bad:
        raise ValueError(f"{where}: unknown hyperparameter(s) {sorted(bad)}; known: {sorted(HPARAM_KEYS)}")
    for m, over in per.items():
        if m not in METHODS:
            raise ValueError(f"{where}.{m}: unknown method; methods are {list(METHODS)}")
        bad = set(over) - HPARAM_KEYS
        if bad:
            raise ValueError(f"{where}.{m}: unknown hyperparameter(s) {sorted(bad)}; known: {sorted(HPARAM_KEYS)}")
    return shared, per


def _load_tuned(path: Path) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """({method: hyperparameters}, {method: non-private overrides}) of a file written by experiments.tune."""
    try:
        with open(path, "rb") as f:
            cfg = tomllib.load(f)
    except FileNotFoundError:
        raise ValueError(f"tuned settings {path} not found: run `python -m experiments.tune --write {path}`, "
                         'or set tuned = "" in the sweep config for the untuned [hparams]') from None
    if set(cfg) - {"hparams", "nonprivate"}:
        raise ValueError(f"{path}: unknown table(s) {sorted(set(cfg) - {'hparams', 'nonprivate'})}")
    (shared, per), (np_shared, np_per) = (_split(cfg.get(t, {}), f"{path} [{t}]") for t in ("hparams", "nonprivate"))
    if shared or np_shared:
        raise ValueError(f"{path}: settings outside a [hparams.<method>] / [nonprivate.<method>] table")
    return per, np_per


def load_config(
    path: str | Path, profile: str, *, tuned: bool = True
) -> tuple[dict[str, Any], dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """(sweep settings, {method: hyperparameters}, {method: non-private overrides}) of ``profile`` in ``path``.

    Hyperparameters resolve as [hparams] -> [hparams.<method>] -> the tuned file's
    [hparams.<method>] (the ``tuned`` key, relative to ``path``; skipped when ``tuned`` is
    False or the key is "") -> the profile's hparams; non-private overrides as [nonprivate]
    -> [nonprivate.<method>] -> the tuned file's [nonprivate.<method>].
    """
    cfg, prof = read_profiled(path, ("sweep", "hparams", "nonprivate"), profile)
    sweep = {"tuned": "", **cfg.get("sweep", {})}
    if set(sweep) - SWEEP_KEYS:
        raise ValueError(f"{path} [sweep]: unknown key(s) {sorted(set(sweep) - SWEEP_KEYS)}; known: {sorted(SWEEP_KEYS)}")
    base, per = _split(cfg.get("hparams", {}), "[hparams]")
    prof_hp = prof.pop("hparams", {})
    if set(prof) - SWEEP_KEYS:
        raise ValueError(f"{path} [profiles.{profile}]: unknown key(s) {sorted(set(prof) - SWEEP_KEYS)}; "
                         f"known: {sorted(SWEEP_KEYS)} and the table hparams")
    p_base, p_per = _split(prof_hp, f"[profiles.{profile}.hparams]")
    sweep.update(prof)
    if not isinstance(sweep["tuned"], str):
        raise ValueError(f"{path}: tuned must be a file name (or \"\" for none), got {sweep['tuned']!r}")
    if not tuned:
        sweep["tuned"] = ""
    t_per, t_np = _load_tuned(Path(path).parent / sweep["tuned"]) if sweep["tuned"] else ({}, {})
    hparams = {m: {**base, **per.get(m, {}), **t_per.get(m, {}), **p_base, **p_per.get(m, {})} for m in METHODS}
    np_base, np_per = _split(cfg.get("nonprivate", {}), "[nonprivate]")
    nonprivate = {m: {**np_base, **np_per.get(m, {}), **t_np.get(m, {})} for m in METHODS}
    for m in METHODS:
        stray = (set(hparams[m]) | set(nonprivate[m])) & HEAD_KEYS if m != "taft_head" else set()
        if stray:
            raise ValueError(f"{path}: {sorted(stray)} set for method {m!r}; they belong in [hparams.taft_head]")
    return sweep, hparams, nonprivate


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_sets(hparams: dict[str, dict[str, Any]], sets: Sequence[str],
               nonprivate: dict[str, dict[str, Any]] | None = None) -> None:
    """Apply ``--set [nonprivate.][METHOD.]KEY=VALUE`` overrides (VALUE parsed as TOML, else a string) in place."""
    for item in sets:
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: expected [nonprivate.][METHOD.]KEY=VALUE, e.g. taft.lr=1.0 or epochs=5")
        target = hparams
        if name.startswith("nonprivate."):
            if nonprivate is None:
                raise ValueError(f"--set {item!r}: no non-private overrides here")
            target, name = nonprivate, name.removeprefix("nonprivate.")
        method, _, key = name.rpartition(".")
        if key not in HPARAM_KEYS:
            raise ValueError(f"--set {item!r}: unknown hyperparameter {key!r}; known: {sorted(HPARAM_KEYS)}")
        if method and method not in METHODS:
            raise ValueError(f"--set {item!r}: unknown method {method!r}; methods are {list(METHODS)}")
        for m in [method] if method else METHODS:
            target[m][key] = _parse_value(value)


def _check_sweep(sweep: dict[str, Any]) -> None:
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


# --------------------------------------------------------------------------- runs
def eps_name(epsilon: float) -> str:
    """'inf' or the shortest decimal form ('1', '0.5', '8')."""
    return "inf" if math.isinf(epsilon) else f"{epsilon:g}"


@dataclass(frozen=True)
class Run:
    """One training run of the grid; ``epsilon`` = inf means non-private."""

    method: str
    k: int  # blocks trained (0 for fc)
    seed: int
    epsilon: float
    hparams: tuple[tuple[str, Any], ...]

    @property
    def label(self) -> str:
        if self.method == "fc":
            return "FC"
        if self.method == "taft_head":
            return f"TAFT-{self.k} (head first)"
        return f"{self.method.upper()}-{self.k}"

    @property
    def run_id(self) -> str:
        name = self.method if self.method == "fc" else f"{self.method}{self.k}"
        return f"{name}_eps{eps_name(self.epsilon)}_seed{self.seed}"


def plan_runs(sweep: dict[str, Any], hparams: dict[str, dict[str, Any]],
              nonprivate: dict[str, dict[str, Any]] | None = None) -> list[Run]:
    """The grid, seed-major (a partial sweep has whole seeds), then method, k, ε.

    Non-private runs (ε = inf) use ``hparams[method]`` updated with ``nonprivate[method]``.
    """
    runs = []
    for seed in sweep["seeds"]:
        for method in METHODS:
            if method not in sweep["methods"]:
                continue
            for k in ([0] if method == "fc" else sorted(set(sweep["blocks"]))):
                for eps in sorted({float(e) for e in sweep["epsilons"]}):
                    hp = {**hparams[method], **((nonprivate or {}).get(method, {}) if math.isinf(eps) else {})}
                    runs.append(Run(method, k, seed, eps, tuple(sorted(hp.items()))))
    return runs


def build_method(method: str, k: int, backbone: nn.Module) -> nn.Module:
    if method == "fc":
        return methods.linear_probe(backbone)
    if method == "taft":
        return methods.taft(backbone, k)
    return methods.nlft(backbone, k)


def train_method(method: str, k: int, backbone: nn.Module, train_set: Dataset, **fit_kwargs: Any) -> FitResult:
    """Build ``method`` from ``backbone`` and train it; ``taft_head`` is two stages under one budget."""
    if method == "taft_head":
        return fit_head_first(backbone, k, train_set, **fit_kwargs)
    return fit(build_method(method, k, backbone), train_set, **fit_kwargs)


# --------------------------------------------------------------------------- data and backbones
@dataclass
class Task:
    """Private train/test sets and a backbone factory ``backbone(seed)`` (head initialised from ``seed``).

    ``reuse_prefix``: runs store their prefix caches under ``<out>/prefix_cache/`` and map
    the ones an earlier run (or an earlier invocation) computed for the same frozen prefix
    and data, so each distinct prefix is computed once; False recomputes it in every run.
    """

    train: Dataset
    test: Dataset
    num_classes: int
    backbone: Callable[[int], nn.Module]
    info: dict[str, Any]  # identifies data and model, part of every run's settings hash
    reuse_prefix: bool = True


def load_default_checkpoint(path: Path, num_classes: int, seed: int) -> nn.Module:
    """``default_model(num_classes)`` with the backbone of the state dict at ``path`` and a fresh head drawn with ``seed``."""
    from experiments.data import default_model

    state = torch.load(path, map_location="cpu", weights_only=True)
    head = ("head.weight", "head.bias")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = default_model(num_classes)
    result = model.load_state_dict({k: v for k, v in state.items() if k not in head}, strict=False)
    if result.unexpected_keys or not set(result.missing_keys) <= set(head):
        raise ValueError(f"{path} is not a state dict of experiments.data.default_model: {result}")
    return model


def _backbone_factory(args: argparse.Namespace, num_classes: int) -> Callable[[int], nn.Module]:
    cache: dict[int, nn.Module] = {}
    timm_kwargs = json.loads(args.timm_kwargs) if args.timm_kwargs else {}

    def make(seed: int) -> nn.Module:
        if seed not in cache:
            if args.model == "default":
                if args.checkpoint is not None:
                    cache[seed] = load_default_checkpoint(Path(args.checkpoint), num_classes, seed)
                else:
                    from experiments.pretrain import pretrained_default_model

                    cache[seed] = pretrained_default_model(num_classes, head_seed=seed)
            else:
                from experiments.data import create_backbone

                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed)
                    cache[seed] = create_backbone(args.model, num_classes, args.pretrained, args.checkpoint,
                                                  **timm_kwargs)
            cache[seed].eval()
        return cache[seed]  # dp_taft.methods copy it, so runs never share trained weights

    return make


def subsample(ds: Dataset, size: int, seed: int) -> Dataset:
    """``size`` examples drawn without replacement with ``seed`` (kept in index order); 0 = all."""
    if size == 0 or size >= len(ds):
        if size > len(ds):
            raise ValueError(f"asked for {size} examples, the data set has {len(ds)}")
        return ds
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:size].sort().values
    if isinstance(ds, TensorDataset):
        return TensorDataset(*(t[idx] for t in ds.tensors))
    return Subset(ds, idx.tolist())


def _materialise(ds: Dataset, limit_bytes: int = 1 << 30) -> Dataset:
    """Apply lazy transforms once (a TensorDataset) when the result fits in ``limit_bytes``."""
    if isinstance(ds, TensorDataset) or len(ds) == 0:
        return ds
    x0, _ = ds[0]
    if len(ds) * x0.numel() * x0.element_size() > limit_bytes:
        return ds
    xs, ys = [], []
    for x, y in DataLoader(ds, batch_size=256, shuffle=False):
        xs.append(x)
        ys.append(torch.as_tensor(y))
    return TensorDataset(torch.cat(xs), torch.cat(ys).long())


def _weights_sha256(args: argparse.Namespace) -> str | None:
    """sha256 of the local weights file the backbone came from (None for timm's own download)."""
    from experiments.pretrain import CHECKPOINT_NAME, SHIPPED_CHECKPOINT, default_cache_dir, sha256_file

    path = args.checkpoint
    if path is None and args.model == "default":
        path = SHIPPED_CHECKPOINT if SHIPPED_CHECKPOINT.is_file() else default_cache_dir() / CHECKPOINT_NAME
    return sha256_file(path) if path is not None and Path(path).is_file() else None


def default_task_args(checkpoint: Path | None = None) -> argparse.Namespace:
    """The command-line fields :func:`build_task` reads, for the offline default task and ViT
    (``checkpoint``: other weights for it), for experiments that build the sweep's task."""
    return argparse.Namespace(dataset="default", model="default", pretrained=True, checkpoint=checkpoint,
                              timm_kwargs=None, data_root=Path("data"), download=False)


def build_task(args: argparse.Namespace, sweep: dict[str, Any]) -> Task:
    num_classes = NUM_CLASSES[args.dataset]
    backbone = _backbone_factory(args, num_classes)
    n_train, n_test, data_seed = sweep["private_train_size"], sweep["test_size"], sweep["data_seed"]
    if args.dataset == "default":
        from experiments.data import default_task

        task = default_task(private_train_size=n_train or None, seed=data_seed)
        train, test = task.private_train, task.private_test
    else:
        from experiments.data import PUBLIC_MEAN, PUBLIC_STD, load_image_dataset, model_normalisation

        probe = backbone(sweep["seeds"][0])
        embed = probe.patch_embed
        size, in_chans = int(embed.img_size[0]), int(embed.proj.in_channels)
        if args.model == "default":
            mean, std = (PUBLIC_MEAN,), (PUBLIC_STD,)
        else:
            mean, std = model_normalisation(probe, in_chans)
        load = lambda train: load_image_dataset(  # noqa: E731
            args.dataset, args.data_root, size, in_chans, train=train, download=args.download, mean=mean, std=std)
        train = _materialise(subsample(load(True), n_train, data_seed))
        test = load(False)
    test = _materialise(subsample(test, n_test, data_seed + 1))
    backbone(sweep["seeds"][0])  # fail (or pretrain the default ViT) before the first run
    info = {
        "dataset": args.dataset, "model": args.model,
        "pretrained": True if args.model == "default" else bool(args.pretrained),
        "checkpoint": str(args.checkpoint) if args.checkpoint else None,
        "weights_sha256": _weights_sha256(args),
        "timm_kwargs": json.loads(args.timm_kwargs) if args.timm_kwargs else {},
        "n_train": len(train), "n_test": len(test), "data_seed": data_seed,
    }
    # experiments.shards builds its own args, without this sweep option
    return Task(train, test, num_classes, backbone, info, reuse_prefix=not getattr(args, "no_prefix_reuse", False))


# --------------------------------------------------------------------------- one run
def settings_hash(run: Run, task: Task, sweep: dict[str, Any]) -> str:
    """Short hash of everything that fixes a run's result besides its key (method, k, seed, ε)."""
    blob = json.dumps({"task": task.info, "hparams": dict(run.hparams), "delta": sweep["delta"],
                       "accountant": sweep["accountant"], "randomness": randomness(sweep)},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def randomness(sweep: dict[str, Any]) -> str:
    """How a run's noise and batches were drawn: "secret" (the default) or "seeded"."""
    return "seeded" if sweep["reproducible"] else "secret"


def discard_keys(run_dir: Path) -> None:
    """Delete every checkpoint under ``run_dir`` (each stage's, e.g. head first's ``head/`` and
    ``taft/``): a finished run's checkpoints hold its secret key, which must not outlive the run.
    The write-ahead ledgers stay: they hold only what was spent (σ, q, steps)."""
    for path in run_dir.rglob(CHECKPOINT_FILE):
        path.unlink()


def run_one(run: Run, task: Task, sweep: dict[str, Any], out: Path, *, device: str, quiet: bool) -> dict[str, Any]:
    """Train and evaluate one run; returns its CSV row (status "failed" with the error if it raised)."""
    hp = dict(run.hparams)
    row: dict[str, Any] = {
        "run_id": run.run_id, "method": run.method, "k": run.k, "label": run.label, "seed": run.seed,
        "randomness": randomness(sweep), "target_epsilon": run.epsilon, "dataset": task.info["dataset"], "model": task.info["model"],
        "n_train": task.info["n_train"], "n_test": task.info["n_test"],
        **{c: hp.get(c) for c in ("epochs", "batch_size", "lr", "optimizer", "max_grad_norm", "loss")},
        "settings": settings_hash(run, task, sweep),
    }
    details: dict[str, Any] = {"run_id": run.run_id, "hparams": hp, "task": task.info, "sweep_delta": sweep["delta"]}
    physical = hp.pop("physical_batch_size", 0) or None
    private = math.isfinite(run.epsilon)
    started = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = train_method(
                run.method, run.k, task.backbone(run.seed), task.train, epsilon=run.epsilon if private else None,
                delta=sweep["delta"] if private else None, eval_set=task.test, physical_batch_size=physical,
                accountant=sweep["accountant"], device=device, seed=run.seed if sweep["reproducible"] else None,
                checkpoint_dir=out / "checkpoints" / run.run_id, quiet=quiet,
                cache_dir=out / PREFIX_CACHE_DIR if task.reuse_prefix else None, **hp,
            )
            row.update(sigma=result.noise_multiplier, sample_rate=result.sample_rate, steps=result.steps,
                       accuracy=result.history[-1].eval_accuracy, status="ok", error="")
            discard_keys(out / "checkpoints" / run.run_id)
            if result.report is not None:
                rel = Path("reports") / f"{run.run_id}.json"
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                (out / rel).write_text(result.report.to_json())
                row.update(epsilon=result.report.epsilon, delta=result.report.delta, report=str(rel))
            else:
                row.update(epsilon=math.inf)
            # The training loss is a noiseless statistic of the private data, outside the
            # guarantee: it stays out of this shareable file.
            details["history"] = [{k: v for k, v in dataclasses.asdict(r).items() if k != "train_loss"}
                                  for r in result.history]
        except Exception as e:  # noqa: BLE001 -- a failed run is recorded and the sweep goes on
            row.update(status="failed", error=f"{type(e).__name__}: {e}".replace("\n", " ")[:1000])
            details["traceback"] = traceback.format_exc()
    row["wall_time_s"] = round(time.perf_counter() - started, 2)
    row["finished_at"] = datetime.datetime.now().isoformat(timespec="seconds")
    details["warnings"] = sorted({f"{w.category.__name__}: {w.message}" for w in caught})
    details["row"] = {k: res.format_number(v) for k, v in row.items()}
    (out / "runs").mkdir(parents=True, exist_ok=True)
    (out / "runs" / f"{run.run_id}.json").write_text(json.dumps(details, indent=1, default=str))
    return row


# --------------------------------------------------------------------------- outputs
def _label_order(rows: Sequence[res.Row]) -> list[str]:
    def key(r: res.Row) -> tuple[int, int]:
        m = r["method"]
        return (METHODS.index(m) if m in METHODS else len(METHODS), int(r["k"] or 0))

    return list(dict.fromkeys(r["label"] for r in sorted(rows, key=key)))


def difference_table(rows: Sequence[res.Row], cols: Sequence[str]) -> list[str]:
    """Markdown lines: TAFT-k (and head first) minus NLFT-k per ε, paired by seed, with 95% t intervals."""
    lines = []
    for k in sorted({r["k"] for r in rows if r["method"] == "nlft"}, key=int):
        for method in ("taft", "taft_head"):
            a = next((r["label"] for r in rows if r["method"] == method and r["k"] == k), None)
            if a is None:
                continue
            diffs = res.paired_differences(rows, a, f"NLFT-{k}", group="label", by="target_epsilon", pair="seed",
                                           value="accuracy")
            lines.append(f"| {a} − NLFT-{k} | " + " | ".join(diffs[c].text(100) if c in diffs else "—" for c in cols)
                         + " |")
    if not lines:
        return []
    return ["Paired difference in test accuracy (percentage points), same seed, mean [95% t interval] (n pairs):",
            "", "| difference | " + " | ".join(res.epsilon_label(c) for c in cols) + " |",
            "|:---|" + "---:|" * len(cols), *lines, ""]


def randomness_notes(rows: Sequence[res.Row]) -> list[str]:
    """Markdown lines saying whether the runs' training randomness was secret or seeded."""
    kinds = {r.get("randomness") or "seeded" for r in rows}  # rows from before the column were seeded
    if kinds == {"secret"}:
        return ["Training randomness (noise, Poisson batches): secret, from the OS CSPRNG; the seeds above only "
                "label replicates and initialise the heads.", ""]
    return ["**Training randomness was seeded with the seeds above** (reproducible runs, for experiments): "
            "anyone who reads these seeds can replay the noise, so the stated ε does not hold against them.", ""]


def _profile_notes(out: Path) -> list[str]:
    """A warning when the last invocation ran a smoke-sized profile."""
    log = out / "invocations.jsonl"
    lines = log.read_text().splitlines() if log.exists() else []
    profile = json.loads(lines[-1]).get("profile") if lines else None
    if profile not in ("quick", "smoke"):
        return []
    return [f"**Profile {profile!r}: a smoke-sized run** (little data, few steps, one seed). It checks that every "
            "method runs end to end; its ranking of the methods is not indicative of the full sweep's.", ""]


def write_outputs(out: Path) -> list[dict[str, str]]:
    """(Re)write summary.md and privacy_utility.png from results.csv; returns the counted rows."""
    rows = list(res.latest(res.read_rows(out / CSV_NAME), ("run_id",)).values())
    if not rows:
        return []
    order = _label_order(rows)
    seeds = sorted({r["seed"] for r in rows}, key=int)
    cols = sorted({r["target_epsilon"] for r in rows}, key=float)
    one = lambda c: ", ".join(sorted({r[c] for r in rows if r[c]})) or "—"  # noqa: E731
    private = [r for r in rows if r["delta"]]
    lines = [
        "# Privacy-utility sweep",
        "",
        f"Test accuracy (%) on the private task, mean ± std over seeds {', '.join(seeds)} "
        f"(sample std; n shown where fewer runs succeeded). Data set: {one('dataset')}, model: {one('model')}, "
        f"N = {one('n_train')} private training examples, {one('n_test')} test examples, "
        f"δ = {', '.join(sorted({r['delta'] for r in private})) or '—'}; columns are target ε "
        "(every reported ε is at most its target; see results.csv and reports/).",
        "",
        res.markdown_table(rows, row="label", col="target_epsilon", value="accuracy", row_order=order,
                           col_order=cols, col_label=res.epsilon_label, corner="method", scale=100, digits=1,
                           expected_n=len(seeds)),
        "Mean wall time per run (s):",
        "",
        res.markdown_table(rows, row="label", col="target_epsilon", value="wall_time_s", row_order=order,
                           col_order=cols, col_label=res.epsilon_label, corner="method", digits=0),
    ]
    lines += difference_table(rows, cols) + randomness_notes(rows) + _profile_notes(out)
    failed = [r for r in rows if r["status"] != "ok"]
    if failed:
        lines += ["Failed runs:", ""] + [f"- `{r['run_id']}`: {r['error']}" for r in failed] + [""]
    (out / SUMMARY_NAME).write_text("\n".join(lines))
    res.plot_curves(out / PLOT_NAME, rows, x="target_epsilon", y="accuracy", group="label", group_order=order,
                    xlabel="target ε (log scale)", ylabel="test accuracy (%)", scale=100,
                    title=f"Privacy-utility trade-off ({one('dataset')}, N = {one('n_train')}, "
                          + (f"mean ± std over {len(seeds)} seeds)" if len(seeds) > 1 else "1 seed)"),
                    inf_label="∞\n(non-private)")
    return rows


# --------------------------------------------------------------------------- CLI
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.sweep", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="TOML config file")
    prof = p.add_mutually_exclusive_group()
    prof.add_argument("--profile", default="default", help="profile of the config file")
    prof.add_argument("--quick", dest="profile", action="store_const", const="quick",
                      help="profile 'quick': every method and ε once, on less data (<= 3 min)")
    prof.add_argument("--smoke", dest="profile", action="store_const", const="smoke",
                      help="profile 'smoke': tiny, for tests")
    p.add_argument("--out", type=Path, default=None, help="output directory (default results/<timestamp>/); "
                   "an existing one is resumed")
    p.add_argument("--methods", nargs="+", choices=METHODS, help="override the config's methods")
    p.add_argument("--blocks", nargs="+", type=int, help="k for TAFT-k and NLFT-k, e.g. --blocks 1 2 4")
    p.add_argument("--epsilons", nargs="+", type=float, help="target ε values; inf = non-private")
    p.add_argument("--seeds", nargs="+", type=int, help="replicates; each seeds its head initialisation (and, "
                   "with --reproducible, the training randomness)")
    p.add_argument("--reproducible", action="store_const", const=True, default=None,
                   help="seed noise and batches with the run's seed (experiments only: the seeds are written in the "
                        "outputs, so the runs' privacy guarantees do not hold against readers of them)")
    p.add_argument("--private-train-size", type=int, help="private training examples (0 = all)")
    p.add_argument("--test-size", type=int, help="test examples (0 = all)")
    p.add_argument("--delta", type=float)
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="[nonprivate.][METHOD.]KEY=VALUE",
                   help="hyperparameter override, e.g. --set taft.lr=1.0 --set epochs=5 --set nonprivate.lr=0.1 "
                        "(repeatable; nonprivate.* applies to the ε = inf runs only)")
    p.add_argument("--dataset", choices=DATASETS, default="default",
                   help="'default' = offline Fashion-MNIST 5-9 task; others via torchvision")
    p.add_argument("--data-root", type=Path, default=Path("data"), help="torchvision data directory")
    p.add_argument("--download", action="store_true", help="let torchvision download the data set (network)")
    p.add_argument("--model", default="default", help="timm model name, or 'default' (the offline ViT)")
    p.add_argument("--pretrained", action="store_true", help="timm pretrained weights (download unless --checkpoint)")
    p.add_argument("--checkpoint", type=Path, help="local weights file (state dict) instead of a download")
    p.add_argument("--timm-kwargs", help="JSON dict of extra timm.create_model arguments, e.g. '{\"img_size\": 64}'")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    p.add_argument("--retry-failed", action="store_true", help="rerun runs recorded as failed")
    p.add_argument("--no-prefix-reuse", action="store_true",
                   help=f"compute the frozen prefix in every run instead of storing it once under OUT/{PREFIX_CACHE_DIR}/")
    p.add_argument("--quiet", action="store_true", help="no per-run progress bars")
    p.add_argument("--no-progress", action="store_true", help="no progress bars at all")
    p.add_argument("--report-only", action="store_true", help="only rewrite summary.md and the plot from results.csv")
    args = p.parse_args(argv)
    if args.checkpoint is not None and args.model != "default" and not args.pretrained:
        p.error("--checkpoint holds pretrained weights: pass --pretrained with it")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the sweep; returns 0 (failed runs are recorded, not fatal), 2 on a bad configuration."""
    args = parse_args(argv)
    out = args.out or Path("results") / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    if args.report_only:
        return res.rewrite_outputs(args.out, write_outputs, (CSV_NAME, SUMMARY_NAME, PLOT_NAME))
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        sweep, hparams, nonprivate = load_config(args.config, args.profile)
        for key in ("methods", "blocks", "epsilons", "seeds", "private_train_size", "test_size", "delta",
                    "reproducible"):
            if getattr(args, key) is not None:
                sweep[key] = getattr(args, key)
        apply_sets(hparams, args.sets, nonprivate)
        _check_sweep(sweep)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    task = build_task(args, sweep)
    n = len(task.train)
    if not sweep["delta"] < 1 / n:
        print(f"error: delta={sweep['delta']:g} is not below 1/N = {1 / n:.3g} for N={n} private training "
              "examples; use a smaller delta (e.g. --delta 1e-6) or more data", file=sys.stderr)
        return 2
    runs = plan_runs(sweep, hparams, nonprivate)
    out.mkdir(parents=True, exist_ok=True)
    done = res.latest(res.read_rows(out / CSV_NAME), ("run_id",))
    conflicts = [r.run_id for r in runs
                 if (r.run_id,) in done and done[(r.run_id,)]["settings"] != settings_hash(r, task, sweep)]
    if conflicts:
        print(f"error: {out} holds runs made with other settings ({', '.join(conflicts[:5])}"
              f"{', ...' if len(conflicts) > 5 else ''}): rerun with the same config, profile and options "
              "to resume, or use a new --out", file=sys.stderr)
        return 2

    def finished(r: Run) -> bool:
        prev = done.get((r.run_id,))
        return prev is not None and (prev["status"] == "ok" or not args.retry_failed)

    pending = [r for r in runs if not finished(r)]
    with open(out / "invocations.jsonl", "a") as f:
        f.write(json.dumps({"at": datetime.datetime.now().isoformat(timespec="seconds"),
                            "argv": list(argv) if argv is not None else sys.argv[1:], "profile": args.profile,
                            "sweep": sweep, "hparams": hparams,
                            "nonprivate": nonprivate, "task": task.info,
                            "runs": len(runs), "pending": len(pending)}, default=str) + "\n")
    print(f"sweep: {len(runs)} runs ({len(runs) - len(pending)} already done), profile {args.profile!r}, "
          f"N = {n}, test {len(task.test)}, out {out}", flush=True)
    bar = tqdm(total=len(runs), initial=len(runs) - len(pending), desc="sweep", unit="run",
               disable=args.no_progress, dynamic_ncols=True)
    failures = 0
    try:
        for run in pending:
            bar.set_postfix_str(run.run_id)
            row = run_one(run, task, sweep, out, device=args.device, quiet=args.quiet or args.no_progress)
            res.append_row(out / CSV_NAME, row, COLUMNS)
            if row["status"] == "ok":
                eps = "∞" if not math.isfinite(run.epsilon) else f"{row['epsilon']:.3f}"
                msg = f"{run.run_id}: accuracy {100 * row['accuracy']:.1f}%, ε {eps}, {row['wall_time_s']:.0f} s"
            else:
                failures += 1
                msg = f"{run.run_id}: FAILED ({row['error'][:200]})"
            bar.update(1)
            tqdm.write(msg) if not args.no_progress else print(msg, flush=True)
    finally:
        bar.close()
        write_outputs(out)
    print(f"done: {out / CSV_NAME}, {out / SUMMARY_NAME}, {out / PLOT_NAME}"
          + (f"; {failures} run(s) failed (see summary.md)" if failures else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
