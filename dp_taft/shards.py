"""Parallel shard training and exact removal of training data ("composition" and "removal").

Training data are split into disjoint shards; one tangent model is trained privately per
shard from the same w0, and the shard models are composed by averaging Δw, which is
exactly their output ensemble (:func:`dp_taft.compose`). Removing an example then means
retraining only its shard (SISA-style unlearning; Bourtoule et al. 2021), and because
each shard's training is seeded, the result equals training that shard from scratch
without the example.

Privacy. Each example's shard is a keyed hash of the example's id alone, so adding or
removing one example changes exactly one shard's data and leaves every other shard's
data — and therefore its trained model — untouched. The composed model is then
(max ε_s, max δ_s)-DP under add/remove-one adjacency by parallel composition
(McSherry 2009, Thm 4), where (ε_s, δ_s) is shard s's guarantee.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import accounting
import torch
from torch.utils.data import Dataset, Subset

from .compose import compose
from .tangent import TangentViT
from .train import fit

__all__ = ["ShardAssignment", "ShardSet", "ShardPrivacyReport", "ForgetResult", "fit_shards"]


@dataclass(frozen=True)
class ShardAssignment:
    """Which shard holds each example: ``shard_of(id) = H_key(id) mod n_shards``.

    ``H_key`` is keyed BLAKE2b of the example's id; it depends on nothing but the id
    and the key, which is what makes shards of neighbouring datasets differ in one
    shard only. ``ids`` are the stable example ids (default: dataset positions);
    ``shards[i]`` is the shard of ``ids[i]``.
    """

    n_shards: int
    key: int
    ids: tuple[int, ...]
    shards: tuple[int, ...]

    @staticmethod
    def shard_of(example_id: int, key: int, n_shards: int) -> int:
        digest = hashlib.blake2b(str(int(example_id)).encode(), key=str(key).encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") % n_shards

    @classmethod
    def create(cls, ids: Sequence[int], n_shards: int, key: int = 0) -> "ShardAssignment":
        if isinstance(n_shards, bool) or not isinstance(n_shards, int) or n_shards < 1:
            raise ValueError(f"n_shards must be an integer >= 1, got {n_shards!r}")
        ids = tuple(int(i) for i in ids)
        if len(set(ids)) != len(ids):
            raise ValueError("example ids must be unique: each example must sit in exactly one shard")
        return cls(n_shards, key, ids, tuple(cls.shard_of(i, key, n_shards) for i in ids))

    def positions(self, shard: int, removed: frozenset[int] = frozenset()) -> list[int]:
        """Dataset positions of the examples in ``shard``, skipping removed ids."""
        return [p for p, (i, s) in enumerate(zip(self.ids, self.shards)) if s == shard and i not in removed]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "ShardAssignment":
        d = json.loads(text)
        return cls(d["n_shards"], d["key"], tuple(d["ids"]), tuple(d["shards"]))


@dataclass(frozen=True)
class ShardPrivacyReport:
    """Guarantee of the composed model: (max ε_s, max δ_s) by parallel composition."""

    epsilon: float
    delta: float
    per_shard: tuple[accounting.PrivacyReport, ...]

    def statement(self) -> str:
        eps = ", ".join(f"{r.epsilon:.4g}" for r in self.per_shard)
        return (
            f"The composed model is ({self.epsilon:.4g}, {self.delta:.3g})-DP under add/remove-one "
            f"adjacency by parallel composition: every example lies in exactly one of "
            f"{len(self.per_shard)} disjoint shards, assigned by a keyed hash of its own id, and "
            f"each shard model is DP on its shard (per-shard ε: {eps}). Releasing models from "
            "before and after a removal composes sequentially for the examples of retrained shards."
        )


@dataclass(frozen=True)
class ForgetResult:
    """What :meth:`ShardSet.forget` did: shards retrained, ids removed, and its cost
    against retraining every shard (sum of the shards' training times)."""

    retrained_shards: tuple[int, ...]
    removed_ids: tuple[int, ...]
    wall_time_s: float
    full_retrain_time_s: float

    @property
    def speedup(self) -> float:
        return self.full_retrain_time_s / self.wall_time_s


@dataclass
class ShardSet:
    """Shard models trained from one w0, their composition and the means to forget.

    Built by :func:`fit_shards`; ``composed`` is the model to use and release.
    """

    base: TangentViT
    train_set: Dataset
    assignment: ShardAssignment
    fit_kwargs: dict[str, Any]
    seed: int
    workers: int
    out_dir: Path | None
    models: list[TangentViT] = field(default_factory=list)
    reports: list[accounting.PrivacyReport | None] = field(default_factory=list)
    train_times: list[float] = field(default_factory=list)
    removed: frozenset[int] = frozenset()
    rounds: list[int] = field(default_factory=list)

    @property
    def composed(self) -> TangentViT:
        return compose(self.models)

    @property
    def report(self) -> ShardPrivacyReport | None:
        if any(r is None for r in self.reports):
            return None
        return ShardPrivacyReport(
            max(r.epsilon for r in self.reports), max(r.delta for r in self.reports), tuple(self.reports)
        )

    def shard_seed(self, shard: int) -> int:
        """The fixed seed of shard ``shard``: retraining it replays the same randomness."""
        return int.from_bytes(hashlib.blake2b(f"{self.seed}:{shard}".encode(), digest_size=4).digest(), "big")

    def _train(self, shards: Sequence[int]) -> None:
        jobs = []
        for s in shards:
            positions = self.assignment.positions(s, self.removed)
            if not positions:
                raise ValueError(f"shard {s} has no examples left; use fewer shards")
            ckpt = None
            if self.out_dir is not None:
                ckpt = self.out_dir / f"shard_{s:03d}" / f"round_{self.rounds[s]:03d}"
            jobs.append((self.base, Subset(self.train_set, positions), self.fit_kwargs, self.shard_seed(s), ckpt))
        threads = max(1, (os.cpu_count() or 1) // max(1, self.workers))
        if self.workers <= 1:
            outputs = [_train_shard(*job) for job in jobs]
        else:
            with ProcessPoolExecutor(self.workers, mp_context=get_context("spawn"),
                                     initializer=torch.set_num_threads, initargs=(threads,)) as pool:
                outputs = list(pool.map(_train_shard, *zip(*jobs)))
        for s, (delta_state, report_json, seconds) in zip(shards, outputs):
            model = copy.deepcopy(self.base)
            model.load_delta_state_dict(delta_state)
            self.models[s] = model
            self.reports[s] = None if report_json is None else accounting.PrivacyReport.from_json(report_json)
            self.train_times[s] = seconds

    def forget(self, ids: Iterable[int]) -> ForgetResult:
        """Remove the examples with these ids: retrain from w0, without them, only the shards
        that held them (same seeds), then recompose. Other shards are left bit-identical."""
        ids = tuple(sorted({int(i) for i in ids}))
        known = set(self.assignment.ids)
        unknown = [i for i in ids if i not in known]
        if unknown:
            raise ValueError(f"ids {unknown[:5]} are not in the training set's ids")
        new = [i for i in ids if i not in self.removed]
        full = sum(self.train_times)
        start = time.perf_counter()
        shard_of = dict(zip(self.assignment.ids, self.assignment.shards))
        shards = sorted({shard_of[i] for i in new})
        self.removed = self.removed | frozenset(new)
        for s in shards:
            self.rounds[s] += 1
        self._train(shards)
        self._save()
        return ForgetResult(tuple(shards), ids, time.perf_counter() - start, full)

    def _save(self) -> None:
        if self.out_dir is None:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "assignment.json").write_text(self.assignment.to_json())
        (self.out_dir / "removed.json").write_text(json.dumps(sorted(self.removed)))
        for s, model in enumerate(self.models):
            shard_dir = self.out_dir / f"shard_{s:03d}"
            shard_dir.mkdir(exist_ok=True)
            torch.save(model.delta_state_dict(), shard_dir / "delta.pt")


def _train_shard(base: TangentViT, data: Dataset, fit_kwargs: dict[str, Any], seed: int,
                 checkpoint_dir: Path | None) -> tuple[dict[str, torch.Tensor], str | None, float]:
    """One shard's private fit from w0 (runs in a worker process when workers > 1)."""
    model = copy.deepcopy(base)
    start = time.perf_counter()
    result = fit(model, data, seed=seed, checkpoint_dir=checkpoint_dir, **fit_kwargs)
    seconds = time.perf_counter() - start
    return model.delta_state_dict(), None if result.report is None else result.report.to_json(), seconds


def fit_shards(
    model: TangentViT,
    train_set: Dataset,
    n_shards: int,
    *,
    ids: Sequence[int] | None = None,
    key: int = 0,
    seed: int = 0,
    workers: int = 1,
    out_dir: str | Path | None = None,
    **fit_kwargs: Any,
) -> ShardSet:
    """Train one private tangent model per disjoint shard, from ``model``'s w0, and compose them.

    Args:
        model: a :class:`TangentViT`; its w0 is used, its current Δw ignored (shards start at 0).
        train_set: map-style dataset of (image, label).
        n_shards: number of shards >= 1.
        ids: a stable, unique id per example (default: its position); removal is by id.
        key: hash key of the shard assignment (a different key, a different partition).
        seed: base seed; shard s trains with a seed derived from (seed, s).
        workers: parallel worker processes (spawned; each gets cores // workers threads).
        out_dir: where the assignment, each shard's checkpoints and Δw are kept.
        **fit_kwargs: passed to :func:`dp_taft.fit` for every shard (epsilon, delta, epochs,
            batch_size, ...); ``batch_size`` is the expected batch per shard.

    Returns:
        A :class:`ShardSet`: ``.composed`` model, ``.models`` per shard, ``.report``.
    """
    if not isinstance(model, TangentViT):
        raise ValueError(f"fit_shards() takes a TangentViT (dp_taft.linearize), got {type(model).__name__}")
    if "seed" in fit_kwargs or "checkpoint_dir" in fit_kwargs:
        raise ValueError("pass seed= and out_dir= to fit_shards itself; each shard derives its own")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
    base = copy.deepcopy(model).cpu()
    with torch.no_grad():
        for p in base.deltas().values():
            p.zero_()
    assignment = ShardAssignment.create(range(len(train_set)) if ids is None else ids, n_shards, key)
    if len(assignment.ids) != len(train_set):
        raise ValueError(f"got {len(assignment.ids)} ids for {len(train_set)} examples; give one id per example")
    shard_set = ShardSet(
        base, train_set, assignment, dict(fit_kwargs), seed, workers,
        None if out_dir is None else Path(out_dir),
        models=[base] * n_shards, reports=[None] * n_shards, train_times=[0.0] * n_shards,
        rounds=[0] * n_shards,
    )
    shard_set._train(range(n_shards))
    shard_set._save()
    return shard_set
