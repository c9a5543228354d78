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
in it: their guarantee is that of all the shard's rounds together, and it is the one
:attr:`ShardSet.report` states (its ``epsilon``, also named ``all_releases_epsilon``; the
current models' alone is ``current_models_epsilon``). Reusing a round's noise instead would
make it cancel in the difference of the two models and expose those examples.

The partition key is secret by default (128 bits from the OS CSPRNG). The shard sizes are
published (each shard's report states its size and sample rate); with a public key, an
adversary who knows the other examples could compute a candidate's shard and read its
membership off the sizes. With a secret key the sizes depend on the data only through N
(:class:`~dp_taft.shard_report.ShardPrivacyReport` states this precisely). The default key,
the content ids and the removed ids live only in memory and in ``out_dir``, which is
owner-only (directories 0700, files 0600) whatever the umask.

Across processes. With an ``out_dir`` the set is kept there (:mod:`dp_taft.shard_store`), and
:func:`load_shards` brings it back in a later process, where :meth:`ShardSet.forget` works as
in the one that trained it.
"""

from __future__ import annotations

import copy
import os
import shutil
import time
import warnings
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
from .privacy.checkpoint import private_dir
from .privacy.distributed import Comm, current
from .privacy.randomness import derive_seed
from .privacy.validate import check_int
from .shard_report import ShardPrivacyReport
from .shard_store import (ShardAssignment, ShardRecord, check_options, content_ids, discard_replaced, json_options,
                          read_shards, resume_or_create, round_dir, save_shards, unique_ids, write_assignment)
from .tangent import TangentViT
from .train import fit

__all__ = ["ShardAssignment", "ShardSet", "ShardPrivacyReport", "ForgetResult", "fit_shards", "load_shards",
           "content_ids"]


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

    Built by :func:`fit_shards`, or by :func:`load_shards` from its ``out_dir``; ``composed`` is
    the model to use and release. ``rounds[s]``: how many times shard s was trained (1, plus one
    per removal that hit it); ``released[s]``: the privacy report of each of those rounds.
    ``key_drawn``: whether the assignment's key was drawn secretly by :func:`fit_shards` (False:
    given by the caller). ``data_index[p]``: the position in ``train_set`` of the example
    ``assignment.ids[p]``, None when ``train_set`` lacks it (a reloaded set whose data lost an
    example); empty: ``train_set`` is the assignment's data, position for position (fit_shards).
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
    data_index: tuple[int | None, ...] = ()

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

    def _train(self, shards: Sequence[int], removed: frozenset[int], *, retrain: bool = False) -> None:
        """Train ``shards`` (a new round each) on their examples not in ``removed``: in a distributed
        launch each rank trains the shards s ≡ rank (mod world) and every rank receives all of
        them. ``retrain`` (a removal): first clear each shard's stale files (:meth:`_clear`)."""
        data = {s: self._data_positions(s, removed) for s in shards}  # all checked before anything changes
        mine = [s for s in shards if s % self.comm.world == self.comm.rank]
        if retrain:
            for s in mine:  # the rank that retrains s
                self._clear(s)
        outputs = dict(zip(mine, self._run_jobs([self._job(s, data[s]) for s in mine])))
        for part in self.comm.gather(outputs):
            outputs.update(part)
        for s in shards:
            delta_state, report_json, seconds = outputs[s]
            model = copy.deepcopy(self.base)
            model.load_delta_state_dict(delta_state)
            self.models[s] = model
            self.rounds[s] += 1
            self.reports[s] = None if report_json is None else accounting.PrivacyReport.from_json(report_json)
            if self.reports[s] is not None:
                self.released[s].append(self.reports[s])
            self.train_times[s] = seconds

    def _data_positions(self, s: int, removed: frozenset[int]) -> list[int]:
        """Positions in ``train_set`` of shard ``s``'s examples not in ``removed``; ValueError when it
        has none, or when ``train_set`` lacks one of them (the shard cannot be retrained without it)."""
        kept = self.assignment.positions(s, removed)
        if not kept:
            raise ValueError(f"shard {s} has no examples left; use fewer shards")
        index = self.data_index or range(len(self.assignment.ids))
        missing = [self.assignment.ids[p] for p in kept if index[p] is None]
        if missing:
            raise ValueError(f"shard {s} must be retrained, but {len(missing)} of its examples are not in the training "
                             f"data given (ids {missing[:5]}): give the data it was trained on, or forget them too")
        return [index[p] for p in kept]

    def _clear(self, s: int) -> None:
        """Before retraining shard ``s``: delete its cached features (the removed examples' go too,
        not only the model) and any checkpoint of the round about to run, which a removal that was
        interrupted left: that round released nothing, and it may have trained on ids removed now."""
        if self.fit_kwargs.get("cache_dir") is not None:
            shutil.rmtree(self.shard_cache_dir(s), ignore_errors=True)
        if self.out_dir is not None:
            shutil.rmtree(round_dir(self.out_dir, s, self.rounds[s] + 1), ignore_errors=True)

    def _job(self, s: int, positions: list[int]) -> tuple[Any, ...]:
        round_ = self.rounds[s] + 1
        ckpt = None if self.out_dir is None else round_dir(self.out_dir, s, round_)
        kwargs = dict(self.fit_kwargs)
        if kwargs.get("cache_dir") is not None:
            kwargs["cache_dir"] = self.shard_cache_dir(s)
        return self.base, Subset(self.train_set, positions), kwargs, self.shard_seed(s, round_), ckpt

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
        randomness, only the shards that held them, then recompose (and, with an ``out_dir``,
        save). Other shards keep the very same model objects. An id being removed may be
        missing from ``train_set`` (a reloaded set's data); the other examples of the shards
        to retrain may not, and then nothing changes (ValueError)."""
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
        removed = self.removed | frozenset(new)
        self._train(shards, removed, retrain=True)
        self.removed = removed
        self._save(shards)
        if self.out_dir is not None and self.comm.main:
            discard_replaced(self.out_dir, shards, self.rounds)
        return ForgetResult(tuple(shards), ids, time.perf_counter() - start, full)

    def _save(self, trained: Sequence[int]) -> None:
        """Keep the set in ``out_dir`` (rank 0 writes): the Δw of the shards just ``trained`` and the
        record of the whole set (:func:`~dp_taft.shard_store.save_shards`), owner-only whatever the
        umask: the assignment holds the secret key and the content ids (anyone holding a candidate
        example can hash it and look it up), removed.json who asked to be forgotten, and the Δw
        are what the composition is made of."""
        if self.out_dir is None or not self.comm.main:
            return
        record = ShardRecord(self.base.fingerprint(), self.seed, json_options(self.fit_kwargs), tuple(self.rounds),
                             tuple(tuple(r) for r in self.released), tuple(self.train_times), self.removed)
        save_shards(self.out_dir, self.assignment, self.key_drawn, record,
                    {s: self.models[s].delta_state_dict() for s in trained})


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


def _zero_base(model: TangentViT, caller: str) -> TangentViT:
    """A CPU copy of ``model`` with Δw = 0: the w0 every shard trains from."""
    if not isinstance(model, TangentViT):
        raise ValueError(f"{caller}() takes a TangentViT (dp_taft.linearize), got {type(model).__name__}")
    base = copy.deepcopy(model).cpu()
    with torch.no_grad():
        for p in base.deltas().values():
            p.zero_()
    return base


def _refuse_shard_options(fit_kwargs: dict[str, Any]) -> None:
    """Each shard's seed and checkpoint_dir derive from the set's, and a shard is one process's job."""
    if {"seed", "checkpoint_dir", "distributed"} & set(fit_kwargs):
        raise ValueError("pass seed=, out_dir= and distributed= to fit_shards itself (load_shards takes the stored "
                         "seed and out_dir); each shard derives its own seed and checkpoint_dir")


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
        out_dir: where the whole set is kept (:mod:`dp_taft.shard_store`; rank 0 writes), for
            :func:`load_shards` in a later process; private data: it and everything in it are
            made owner-only (0700 / 0600).
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
    _refuse_shard_options(fit_kwargs)
    check_int("workers", workers, "parallel worker processes", low=1)
    base = _zero_base(model, "fit_shards")
    comm = current(torch.device("cpu"), distributed)
    ids = content_ids(train_set) if ids is None else ids
    # Every rank uses rank 0's assignment: a key drawn on each rank would partition differently.
    assignment, key_drawn = comm.broadcast(resume_or_create(None if out_dir is None else Path(out_dir), ids,
                                                            n_shards, key))
    if len(assignment.ids) != len(train_set):
        raise ValueError(f"got {len(assignment.ids)} ids for {len(train_set)} examples; give one id per example")
    shard_set = ShardSet(
        base, train_set, assignment, dict(fit_kwargs), seed, workers,
        None if out_dir is None else private_dir(out_dir), comm, key_drawn=key_drawn,
        models=[base] * n_shards, reports=[None] * n_shards, released=[[] for _ in range(n_shards)],
        train_times=[0.0] * n_shards, rounds=[0] * n_shards,
    )
    if shard_set.out_dir is not None and comm.main:  # ahead of training: a relaunch resumes this partition
        write_assignment(shard_set.out_dir, assignment, key_drawn, frozenset())
    shard_set._train(range(n_shards), frozenset())
    shard_set._save(range(n_shards))
    return shard_set


def load_shards(out_dir: str | Path, model: TangentViT, train_set: Dataset, *, ids: Sequence[int] | None = None,
                workers: int = 1, distributed: bool | None = None, **fit_kwargs: Any) -> ShardSet:
    """The shard set that :func:`fit_shards` (and every :meth:`ShardSet.forget` since) kept in
    ``out_dir``, in this process: models, reports, rounds, removed ids, seed and partition, so
    that ``forget`` works exactly as in the process that trained it.

    Args:
        out_dir: the ``out_dir`` given to :func:`fit_shards`; ``forget`` keeps saving there.
        model: the base the set was trained from (w0 and linearized blocks; its Δw is ignored),
            refused unless its :meth:`~TangentViT.fingerprint` is the one stored.
        train_set: the training data now. Its examples are matched to the stored partition by
            id, not position (their order may differ). An example the set holds may be missing
            (its file deleted) if it was removed or is being removed; any other missing one is
            refused, by id, when its shard must be retrained. Examples the set does not hold
            are ignored with a warning: they were never trained on; to include them, train a
            new shard set.
        ids: one stable id per example of ``train_set``, as given to fit_shards; default: their
            :func:`content_ids`.
        workers, distributed: as in :func:`fit_shards`.
        **fit_kwargs: the fit options to retrain shards with: pass the same as to fit_shards.
            Those that define the mechanism (:data:`~dp_taft.shard_store.PRIVACY_OPTIONS`:
            epsilon, delta, batch_size, epochs, max_grad_norm, accountant, clipping, secure_mode)
            must equal the stored ones (an option left out counts as unset): a shard retrained
            with others would not be the mechanism the set's report states. The others (lr, ...)
            are the caller's: a retrained shard is what fit gives with them. Options JSON cannot
            hold (augment, prior, ...) are not stored and cannot be checked: pass the same.

    Raises:
        ValueError: no finished shard set in ``out_dir``, another base (both fingerprints named),
            other privacy options, or ids not unique or not one per example of ``train_set``.
    """
    _refuse_shard_options(fit_kwargs)
    check_int("workers", workers, "parallel worker processes", low=1)
    base = _zero_base(model, "load_shards")
    out = Path(out_dir)
    comm = current(torch.device("cpu"), distributed)
    # rank 0 reads (out_dir may be on its disk alone) and every rank gets its copy
    assignment, key_drawn, record, deltas = comm.broadcast(comm.on_main(lambda: read_shards(out)))
    if base.fingerprint() != record.fingerprint:
        raise ValueError(f"the model given has base fingerprint {base.fingerprint()}, but the shard set in {out} was "
                         f"trained from base fingerprint {record.fingerprint}: pass the model it was trained from "
                         "(the same pretrained weights, linearized with the same blocks)")
    check_options(record.options, fit_kwargs, out)
    models = []
    for delta in deltas:
        models.append(copy.deepcopy(base))
        models[-1].load_delta_state_dict(delta)
    released = [list(rounds) for rounds in record.released]
    return ShardSet(
        base, train_set, assignment, dict(fit_kwargs), record.seed, workers, private_dir(out), comm,
        key_drawn=key_drawn, models=models, reports=[rounds[-1] if rounds else None for rounds in released],
        released=released, train_times=list(record.train_times), removed=record.removed, rounds=list(record.rounds),
        data_index=_data_index(assignment, content_ids(train_set) if ids is None else ids, len(train_set), out),
    )


def _data_index(assignment: ShardAssignment, ids: Sequence[int], n: int, out_dir: Path) -> tuple[int | None, ...]:
    """The position among ``ids`` (the ``n`` examples given now) of each id of ``assignment``, None
    when absent; warns of the examples given that the set does not hold."""
    ids = unique_ids(ids)
    if len(ids) != n:
        raise ValueError(f"got {len(ids)} ids for {n} examples; give one id per example")
    where = {i: p for p, i in enumerate(ids)}
    new = len(where.keys() - set(assignment.ids))
    if new:
        warnings.warn(f"{new} example(s) of train_set are not in the shard set of {out_dir} and are ignored: they "
                      "were never trained on; to include them, train a new shard set (fit_shards)", stacklevel=3)
    return tuple(where.get(i) for i in assignment.ids)
