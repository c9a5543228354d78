"""Parallel shard training and exact removal of training data ("composition" and "removal").

Training data are split into disjoint shards; one tangent model is trained privately per
shard from the same w0, and the shard models are composed by averaging Δw, which is
exactly their output ensemble (:func:`dp_taft.compose`). Removing an example then means
retraining only its shard from w0 (SISA-style unlearning; Bourtoule et al. 2021): the
untouched shards keep the very same models, and the retrained shard is distributed exactly
as training it from scratch without the example (same code path and hyperparameters,
fresh randomness).

Privacy. Each example's shard is a keyed hash of the example's stable id alone (an id the
caller gives, or a hash of the example's content), so adding or removing one example
changes exactly one shard's data and leaves every other shard's data — and therefore its
trained model — untouched. The composed model is then (max ε_s, max δ_s)-DP under
add/remove-one adjacency by parallel composition (McSherry 2009, Thm 4), where
(ε_s, δ_s) is shard s's guarantee. A retrained shard draws fresh noise, so releasing the
models from before and after a removal composes sequentially for the examples that stayed
in it: their guarantee is that of all the shard's rounds together
(:attr:`ShardSet.report`'s ``all_releases_epsilon``). Reusing a round's noise instead would
make it cancel in the difference of the two models and expose those examples.

The partition key is secret by default (128 bits from the OS CSPRNG). The shard sizes are
published (each shard's report states its size and sample rate); with a public key, an
adversary who knows the other examples could compute a candidate's shard and read its
membership off the sizes. With a secret key the sizes depend on the data only through N
(:class:`~dp_taft.shard_report.ShardPrivacyReport` states this precisely). The default key,
the content ids and the removed ids live only in memory and in ``out_dir``, which is
owner-only (directories 0700, files 0600) whatever the umask.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import accounting
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from .compose import compose
from .privacy.checkpoint import atomic_save, private_dir, write_private_text
from .privacy.distributed import Comm, current
from .privacy.randomness import derive_seed, secret_seed
from .privacy.validate import check_int
from .shard_report import HASH_BITS, ShardPrivacyReport
from .tangent import TangentViT
from .train import fit

#: In ``out_dir``: the partition (ids, key) and the removed ids, both owner-only.
ASSIGNMENT_FILE, REMOVED_FILE = "assignment.json", "removed.json"

__all__ = ["ShardAssignment", "ShardSet", "ShardPrivacyReport", "ForgetResult", "fit_shards", "content_ids"]


def content_ids(dataset: Dataset) -> tuple[int, ...]:
    """A stable 63-bit id per example: keyed-free BLAKE2b of its image bytes, dtype, shape
    and label. It depends on the example alone, so deleting one example changes no other
    id. Identical examples would share an id and are refused: give them ``ids=`` instead."""
    ids: list[int] = []
    seen: dict[int, int] = {}
    for x, y in DataLoader(dataset, batch_size=1, shuffle=False):
        h = hashlib.blake2b(digest_size=8)
        h.update(f"{x.dtype}|{tuple(x.shape[1:])}|{int(y[0])}|".encode())
        h.update(x[0].contiguous().numpy().tobytes())
        i = int.from_bytes(h.digest(), "big") >> 1
        if i in seen:
            raise ValueError(
                f"examples {seen[i]} and {len(ids)} are identical (same image and label), so their content ids "
                "collide; remove the duplicate or pass fit_shards(ids=...) with one stable unique id per example"
            )
        seen[i] = len(ids)
        ids.append(i)
    return tuple(ids)


@dataclass(frozen=True)
class ShardAssignment:
    """Which shard holds each example: ``shard_of(id) = H_key(id) mod n_shards``.

    ``H_key`` is keyed BLAKE2b of the example's id; it depends on nothing but the id
    and the key, which is what makes shards of neighbouring datasets differ in one
    shard only. ``ids`` are the stable example ids (never positions: deleting one example
    would shift every later position and move other examples between shards);
    ``shards[i]`` is the shard of ``ids[i]``. ``key`` must stay secret (it is by default):
    whoever knows it and the ids can tell from the shard sizes which examples are in.
    """

    n_shards: int
    key: int
    ids: tuple[int, ...]
    shards: tuple[int, ...]

    @staticmethod
    def shard_of(example_id: int, key: int, n_shards: int) -> int:
        digest = hashlib.blake2b(str(int(example_id)).encode(), key=str(key).encode(),
                                 digest_size=HASH_BITS // 8).digest()
        return int.from_bytes(digest, "big") % n_shards

    @classmethod
    def create(cls, ids: Sequence[int], n_shards: int, key: int | None = None) -> "ShardAssignment":
        """The partition of ``ids`` into ``n_shards``; ``key`` None (default): a secret 128-bit
        key from the OS CSPRNG (:func:`~dp_taft.privacy.randomness.secret_seed`)."""
        check_int("n_shards", n_shards, "number of disjoint shards", low=1)
        if key is None:
            key = secret_seed()
        check_int("key", key, "128-bit partition key; None draws a secret one", low=0, high=2**128 - 1)
        ids = tuple(int(i) for i in ids)
        if len(set(ids)) != len(ids):
            raise ValueError("example ids must be unique: each example must sit in exactly one shard")
        return cls(n_shards, key, ids, tuple(cls.shard_of(i, key, n_shards) for i in ids))

    @property
    def sizes(self) -> tuple[int, ...]:
        """Examples per shard: what the shard reports publish (each shard's dataset size)."""
        return tuple(self.shards.count(s) for s in range(self.n_shards))

    def positions(self, shard: int, removed: frozenset[int] = frozenset()) -> list[int]:
        """Dataset positions of the examples in ``shard``, skipping removed ids."""
        return [p for p, (i, s) in enumerate(zip(self.ids, self.shards)) if s == shard and i not in removed]

    def to_json(self, **extra: Any) -> str:
        """The assignment (and ``extra`` fields) as JSON: private, it holds the key and the ids."""
        return json.dumps({**dataclasses.asdict(self), **extra})

    @classmethod
    def from_json(cls, text: str) -> "ShardAssignment":
        d = json.loads(text)
        return cls(d["n_shards"], d["key"], tuple(d["ids"]), tuple(d["shards"]))


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
    ``rounds[s]``: how many times shard s was trained (1, plus one per removal that hit it);
    ``released[s]``: the privacy report of each of those rounds. ``key_drawn``: whether
    the assignment's key was drawn secretly by :func:`fit_shards` (False: given by the caller).
    """

    base: TangentViT
    train_set: Dataset
    assignment: ShardAssignment
    fit_kwargs: dict[str, Any]
    seed: int | None
    workers: int
    out_dir: Path | None
    comm: Comm = Comm()
    key_drawn: bool = False
    models: list[TangentViT] = field(default_factory=list)
    reports: list[accounting.PrivacyReport | None] = field(default_factory=list)
    released: list[list[accounting.PrivacyReport]] = field(default_factory=list)
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
        return ShardPrivacyReport.of(self.released, self.key_drawn)

    def shard_seed(self, shard: int, round_: int) -> int | None:
        """Seed of round ``round_`` (1 = first training) of ``shard``: None (secret, fresh
        randomness) unless ``fit_shards`` was given a seed; then one derived per (shard, round),
        so a retrained shard never reuses its earlier noise."""
        return None if self.seed is None else derive_seed(self.seed, shard, round_)

    def _train(self, shards: Sequence[int]) -> None:
        """Train ``shards`` (a new round each): in a distributed launch each rank trains the
        shards s ≡ rank (mod world) and every rank receives all of them."""
        for s in shards:
            self.rounds[s] += 1
        mine = [s for s in shards if s % self.comm.world == self.comm.rank]
        outputs = dict(zip(mine, self._run_jobs([self._job(s) for s in mine])))
        for part in self.comm.gather(outputs):
            outputs.update(part)
        for s in shards:
            delta_state, report_json, seconds = outputs[s]
            model = copy.deepcopy(self.base)
            model.load_delta_state_dict(delta_state)
            self.models[s] = model
            self.reports[s] = None if report_json is None else accounting.PrivacyReport.from_json(report_json)
            if self.reports[s] is not None:
                self.released[s].append(self.reports[s])
            self.train_times[s] = seconds

    def _job(self, s: int) -> tuple[Any, ...]:
        positions = self.assignment.positions(s, self.removed)
        if not positions:
            raise ValueError(f"shard {s} has no examples left; use fewer shards")
        ckpt = None
        if self.out_dir is not None:
            ckpt = self.out_dir / f"shard_{s:03d}" / f"round_{self.rounds[s]:03d}"
        kwargs = dict(self.fit_kwargs)
        if kwargs.get("cache_dir") is not None:
            kwargs["cache_dir"] = self.shard_cache_dir(s)
        return self.base, Subset(self.train_set, positions), kwargs, self.shard_seed(s, self.rounds[s]), ckpt

    def shard_cache_dir(self, s: int) -> Path:
        """Shard ``s``'s own prefix-cache folder under ``fit_kwargs["cache_dir"]``: its features of the
        shard's examples, which :meth:`forget` deletes with the shard's old model."""
        return Path(self.fit_kwargs["cache_dir"]) / f"shard_{s:03d}"

    def _run_jobs(self, jobs: list[tuple[Any, ...]]) -> list[tuple[dict[str, torch.Tensor], str | None, float]]:
        if self.workers <= 1 or len(jobs) <= 1:
            return [_train_shard(*job) for job in jobs]
        threads = max(1, (os.cpu_count() or 1) // self.workers)
        with ProcessPoolExecutor(self.workers, mp_context=get_context("spawn"),
                                 initializer=torch.set_num_threads, initargs=(threads,)) as pool:
            return list(pool.map(_train_shard, *zip(*jobs)))

    def forget(self, ids: Iterable[int]) -> ForgetResult:
        """Remove the examples with these ids: retrain from w0, without them and with fresh
        randomness, only the shards that held them, then recompose. Other shards keep the
        very same model objects."""
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
        if self.fit_kwargs.get("cache_dir") is not None:
            for s in shards:  # the stored features of the removed examples go too, not only the model
                if s % self.comm.world == self.comm.rank:  # the rank that retrains it
                    shutil.rmtree(self.shard_cache_dir(s), ignore_errors=True)
        self._train(shards)
        self._save()
        return ForgetResult(tuple(shards), ids, time.perf_counter() - start, full)

    def _save_assignment(self) -> None:
        """Write the assignment (and the removals) ahead of any training, so that a relaunch into
        the same ``out_dir`` resumes the same partition (:func:`_resume_or_create`)."""
        if self.out_dir is None or not self.comm.main:
            return  # out_dir was made owner-only (private_dir) when the ShardSet was built
        write_private_text(self.out_dir / ASSIGNMENT_FILE, self.assignment.to_json(key_drawn=self.key_drawn))
        write_private_text(self.out_dir / REMOVED_FILE, json.dumps(sorted(self.removed)))

    def _save(self) -> None:
        """Owner-only, whatever the umask: the assignment holds the secret key and the content
        ids (anyone holding a candidate example can hash it and look it up), removed.json who
        asked to be forgotten, and the Δw are what the composition is made of."""
        if self.out_dir is None or not self.comm.main:
            return
        self._save_assignment()
        for s, model in enumerate(self.models):
            atomic_save(model.delta_state_dict(), private_dir(self.out_dir / f"shard_{s:03d}") / "delta.pt")


def _train_shard(base: TangentViT, data: Dataset, fit_kwargs: dict[str, Any], seed: int | None,
                 checkpoint_dir: Path | None) -> tuple[dict[str, torch.Tensor], str | None, float]:
    """One shard's private fit from w0 (runs in a worker process when workers > 1)."""
    model = copy.deepcopy(base)
    start = time.perf_counter()
    # distributed=False: one shard is one process's job, even inside a torchrun launch
    result = fit(model, data, seed=seed, checkpoint_dir=checkpoint_dir, distributed=False, **fit_kwargs)
    seconds = time.perf_counter() - start
    deltas = {k: v.detach().cpu() for k, v in model.delta_state_dict().items()}  # gathered across ranks
    return deltas, None if result.report is None else result.report.to_json(), seconds


def _resume_or_create(out_dir: Path | None, ids: Sequence[int], n_shards: int,
                      key: int | None) -> tuple[ShardAssignment, bool]:
    """(assignment, whether its key was drawn here): the one ``out_dir`` holds, for a relaunch that
    resumes the shards' checkpoints on the very partition they were trained on, else a new one.

    A new secret key on relaunch would move examples between shards while each shard resumes
    a checkpoint trained on its old examples: parallel composition and removal would both
    fail silently. So a different partition (ids, shard count or key) is refused, and so is
    an ``out_dir`` holding shards but no assignment, or one where removals already happened.
    """
    if out_dir is not None and (out_dir / ASSIGNMENT_FILE).exists():
        text = (out_dir / ASSIGNMENT_FILE).read_text()
        stored = ShardAssignment.from_json(text)
        removed = json.loads((out_dir / REMOVED_FILE).read_text()) if (out_dir / REMOVED_FILE).exists() else []
        same = (stored.n_shards == n_shards and stored.ids == tuple(int(i) for i in ids)
                and key in (None, stored.key))
        if removed or not same:
            why = "examples were removed from it since" if removed else "other ids, shard count or key"
            raise ValueError(f"{out_dir} holds a shard set trained on another partition ({why}); use a new "
                             "out_dir, or the same data, n_shards and key to resume an interrupted fit_shards")
        return stored, bool(json.loads(text).get("key_drawn", False))
    if out_dir is not None and any(out_dir.glob("shard_*")):
        raise ValueError(f"{out_dir} holds shard checkpoints but no {ASSIGNMENT_FILE}: their partition is unknown; "
                         "use a new out_dir")
    return ShardAssignment.create(ids, n_shards, key), key is None


def fit_shards(
    model: TangentViT,
    train_set: Dataset,
    n_shards: int,
    *,
    ids: Sequence[int] | None = None,
    key: int | None = None,
    seed: int | None = None,
    workers: int = 1,
    out_dir: str | Path | None = None,
    distributed: bool | None = None,
    **fit_kwargs: Any,
) -> ShardSet:
    """Train one private tangent model per disjoint shard, from ``model``'s w0, and compose them.

    Args:
        model: a :class:`TangentViT`; its w0 is used, its current Δw ignored (shards start at 0).
        train_set: map-style dataset of (image, label).
        n_shards: number of shards >= 1.
        ids: a stable, unique integer id per example (e.g. a database key), the same whatever
            else is added to or deleted from the data set; removal is by id. Default: the
            :func:`content_ids` of the examples (duplicates refused). Never positions.
        key: partition key. None (default): 128 bits from the OS CSPRNG, kept only in memory and
            in ``out_dir``'s owner-only ``assignment.json`` (so :meth:`ShardSet.forget` keeps every
            other example in its shard). The shard sizes are published (each shard's report states
            its size and sample rate), which is safe only while the key is secret: an integer key
            that is published or guessable (such as the former default 0) lets anyone who knows
            the other examples tell from the sizes whether a candidate is in.
        seed: None (default): every shard, and every retraining, draws secret randomness. An
            integer makes runs reproducible (round r of shard s uses a seed derived from
            (seed, s, r)); the guarantee then requires the seed to stay secret.
        workers: parallel worker processes (spawned; each gets cores // workers threads).
        out_dir: where the assignment, each shard's checkpoints and Δw are kept (rank 0 writes);
            private data: it and everything in it are made owner-only (0700 / 0600).
        distributed: None (default): under ``torchrun`` (or in an initialised process group),
            rank r trains the shards s ≡ r (mod world) and every rank gets every shard model,
            also on :meth:`ShardSet.forget`; False: this process trains every shard.
        **fit_kwargs: passed to :func:`dp_taft.fit` for every shard (epsilon, delta, epochs,
            batch_size, ...); ``batch_size`` is the expected batch per shard. A ``cache_dir`` is
            this shard set's own: shard s caches in its ``shard_XXX/`` folder, which
            :meth:`ShardSet.forget` deletes before retraining s (the removed features go too).

    Returns:
        A :class:`ShardSet`: ``.composed`` model, ``.models`` per shard, ``.report``.
    """
    if not isinstance(model, TangentViT):
        raise ValueError(f"fit_shards() takes a TangentViT (dp_taft.linearize), got {type(model).__name__}")
    if {"seed", "checkpoint_dir", "distributed"} & set(fit_kwargs):
        raise ValueError("pass seed=, out_dir= and distributed= to fit_shards itself; each shard derives its own")
    check_int("workers", workers, "parallel worker processes", low=1)
    base = copy.deepcopy(model).cpu()
    with torch.no_grad():
        for p in base.deltas().values():
            p.zero_()
    comm = current(torch.device("cpu"), distributed)
    ids = content_ids(train_set) if ids is None else ids
    # Every rank uses rank 0's assignment: a key drawn on each rank would partition differently.
    assignment, key_drawn = comm.broadcast(_resume_or_create(None if out_dir is None else Path(out_dir), ids,
                                                             n_shards, key))
    if len(assignment.ids) != len(train_set):
        raise ValueError(f"got {len(assignment.ids)} ids for {len(train_set)} examples; give one id per example")
    shard_set = ShardSet(
        base, train_set, assignment, dict(fit_kwargs), seed, workers,
        None if out_dir is None else private_dir(out_dir), comm, key_drawn=key_drawn,
        models=[base] * n_shards, reports=[None] * n_shards, released=[[] for _ in range(n_shards)],
        train_times=[0.0] * n_shards, rounds=[0] * n_shards,
    )
    shard_set._save_assignment()
    shard_set._train(range(n_shards))
    shard_set._save()
    return shard_set
