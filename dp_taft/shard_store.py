"""What a shard set keeps: the partition of its examples, and its owner-only ``out_dir``.

``out_dir`` of :func:`dp_taft.shards.fit_shards` (directories 0700, files 0600, whatever the umask)::

    assignment.json           the partition (ids, shards, secret key) and key_drawn; written ahead of training
    removed.json              the ids removed so far
    shards.json               the record of the trained set (format ``dp_taft.shard_set/2``): base
                              fingerprint, seed, fit options, each shard's rounds, every released
                              round's privacy report, training times, removed ids
    shard_XXX/round_RRR/      round RRR of shard XXX: fit's checkpoint and ledger, and delta.pt, its Δw
    shard_XXX/delta.pt        the shard's current Δw (a copy of its last round's, for other readers)

Everything here is private: the key and the content ids let anyone holding a candidate example
hash it and find its shard, removed.json says who asked to be forgotten, the seed (when one was
given) replays the noise.

Crash safety. ``shards.json`` is written last, atomically, and names each shard's round; a
later process (:func:`dp_taft.shards.load_shards`) reads the Δw of exactly those rounds. A crash
during a removal therefore leaves the set as it was before it, and its unfinished round is
discarded when the next removal trains that round again. ``removed.json`` is written before
``shards.json``: it may list an id whose removal did not finish (which only makes a relaunched
``fit_shards`` refuse the directory), never omit one that the models reflect.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import accounting
import torch
from torch.utils.data import DataLoader, Dataset

from .privacy.checkpoint import CHECKPOINT_FILE, atomic_save, discard_saved, private_dir, write_private_text
from .privacy.randomness import secret_seed
from .privacy.validate import check_int
from .shard_report import HASH_BITS

__all__ = ["ShardAssignment", "ShardRecord", "content_ids", "unique_ids", "round_dir", "write_assignment", "save_shards",
           "discard_replaced",
           "read_shards", "resume_or_create", "json_options", "check_options", "PRIVACY_OPTIONS", "ASSIGNMENT_FILE",
           "REMOVED_FILE", "STATE_FILE", "DELTA_FILE"]

ASSIGNMENT_FILE, REMOVED_FILE, STATE_FILE, DELTA_FILE = "assignment.json", "removed.json", "shards.json", "delta.pt"
#: /2: the base fingerprint is :func:`dp_taft.fingerprint.fingerprint` (that of model files); /1 hashed w0 otherwise.
STATE_FORMAT = "dp_taft.shard_set/2"
#: fit options that define each shard's mechanism: a shard retrained with other values would not
#: be the mechanism its report and the set's guarantee describe, so a reloaded set refuses them.
PRIVACY_OPTIONS = ("epsilon", "delta", "batch_size", "epochs", "max_grad_norm", "accountant", "clipping",
                   "secure_mode")


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
        ids = unique_ids(ids)
        return cls(n_shards, key, ids, tuple(cls.shard_of(i, key, n_shards) for i in ids))

    @property
    def sizes(self) -> tuple[int, ...]:
        """Examples per shard: what the shard reports publish (each shard's dataset size)."""
        return tuple(self.shards.count(s) for s in range(self.n_shards))

    def positions(self, shard: int, removed: frozenset[int] = frozenset()) -> list[int]:
        """Positions in ``ids`` of the examples in ``shard``, skipping removed ids."""
        return [p for p, (i, s) in enumerate(zip(self.ids, self.shards)) if s == shard and i not in removed]

    def to_json(self, **extra: Any) -> str:
        """The assignment (and ``extra`` fields) as JSON: private, it holds the key and the ids."""
        return json.dumps({**dataclasses.asdict(self), **extra})

    @classmethod
    def from_json(cls, text: str) -> "ShardAssignment":
        d = json.loads(text)
        return cls(d["n_shards"], d["key"], tuple(d["ids"]), tuple(d["shards"]))


def unique_ids(ids: Sequence[int]) -> tuple[int, ...]:
    """``ids`` as a tuple of ints, refused unless unique (each example sits in exactly one shard)."""
    ids = tuple(int(i) for i in ids)
    if len(set(ids)) != len(ids):
        raise ValueError("example ids must be unique: each example must sit in exactly one shard")
    return ids


@dataclass(frozen=True)
class ShardRecord:
    """What ``shards.json`` holds beyond the assignment: see the module docstring.

    ``fingerprint``: :meth:`TangentViT.fingerprint` of the base (w0, structure; as in a model
    file); ``seed``: the shard set's seed or None (secret randomness); ``options``: the JSON-able
    fit options of the last training; ``rounds[s]``, ``released[s]`` (one report per round of a
    private set, none otherwise), ``train_times[s]`` (seconds of its last round): per shard;
    ``removed``: the ids the models no longer hold.
    """

    fingerprint: str
    seed: int | None
    options: dict[str, Any]
    rounds: tuple[int, ...]
    released: tuple[tuple[accounting.PrivacyReport, ...], ...]
    train_times: tuple[float, ...]
    removed: frozenset[int]

    def to_json(self) -> str:
        return json.dumps({"format": STATE_FORMAT, "base_fingerprint": self.fingerprint, "seed": self.seed,
                           "fit_options": self.options, "rounds": list(self.rounds),
                           "released": [[r.to_dict() for r in rounds] for rounds in self.released],
                           "train_times": list(self.train_times), "removed": sorted(self.removed)})

    @classmethod
    def from_json(cls, text: str, where: Path) -> "ShardRecord":
        """Parse ``where``'s text; ValueError names the file when it is not a shard set's record."""
        try:
            d = json.loads(text)
            if d.get("format") != STATE_FORMAT:
                raise ValueError(f"format {d.get('format')!r} is not {STATE_FORMAT!r}")
            return cls(d["base_fingerprint"], d["seed"], d["fit_options"], tuple(d["rounds"]),
                       tuple(tuple(accounting.PrivacyReport.from_dict(r) for r in rounds) for rounds in d["released"]),
                       tuple(float(t) for t in d["train_times"]), frozenset(int(i) for i in d["removed"]))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"{where} is not a readable shard set record ({type(err).__name__}: {err}); it is "
                             "written by fit_shards(out_dir=...): use that directory") from None


def round_dir(out_dir: Path, shard: int, round_: int) -> Path:
    """Where round ``round_`` (1 = first training) of ``shard`` keeps its checkpoint, ledger and Δw."""
    return out_dir / f"shard_{shard:03d}" / f"round_{round_:03d}"


def write_assignment(out_dir: Path, assignment: ShardAssignment, key_drawn: bool, removed: frozenset[int]) -> None:
    """The partition and the removed ids, owner-only; written ahead of any training so that a
    relaunch into the same ``out_dir`` resumes the same partition (:func:`resume_or_create`)."""
    write_private_text(out_dir / ASSIGNMENT_FILE, assignment.to_json(key_drawn=key_drawn))
    write_private_text(out_dir / REMOVED_FILE, json.dumps(sorted(removed)))


def save_shards(out_dir: Path, assignment: ShardAssignment, key_drawn: bool, record: ShardRecord,
                trained: Mapping[int, dict[str, torch.Tensor]]) -> None:
    """Write the Δw of the shards just ``trained`` (shard -> Δw state; each in its round's folder
    and as the shard's current copy), then the assignment and removed ids, then ``shards.json``
    last, which makes the new rounds the set's (see the module docstring)."""
    for s, delta in trained.items():
        atomic_save(delta, private_dir(round_dir(out_dir, s, record.rounds[s])) / DELTA_FILE)
        atomic_save(delta, out_dir / f"shard_{s:03d}" / DELTA_FILE)
    write_assignment(out_dir, assignment, key_drawn, record.removed)
    write_private_text(out_dir / STATE_FILE, record.to_json())


def discard_replaced(out_dir: Path, shards: Sequence[int], rounds: Sequence[int]) -> None:
    """Delete the models (Δw and checkpoint, and temporary copies a crash left) of every earlier
    round of the retrained ``shards``: they were trained on the examples just removed, which must
    leave the disk with them. The rounds' ledgers stay (σ, q and steps only): the reports of the
    released rounds need them."""
    for s in shards:
        for r in range(1, rounds[s]):
            for name in (DELTA_FILE, CHECKPOINT_FILE):
                discard_saved(round_dir(out_dir, s, r), name)


def read_shards(out_dir: Path) -> tuple[ShardAssignment, bool, ShardRecord, list[dict[str, torch.Tensor]]]:
    """(assignment, key_drawn, record, each shard's Δw of the round the record names) from ``out_dir``."""
    if not (out_dir / STATE_FILE).is_file() or not (out_dir / ASSIGNMENT_FILE).is_file():
        raise ValueError(f"{out_dir} holds no trained shard set (no {STATE_FILE} and {ASSIGNMENT_FILE}): give the "
                         "out_dir of a finished fit_shards, or relaunch an interrupted fit_shards to finish it")
    text = (out_dir / ASSIGNMENT_FILE).read_text()
    assignment = ShardAssignment.from_json(text)
    record = ShardRecord.from_json((out_dir / STATE_FILE).read_text(), out_dir / STATE_FILE)
    if len(record.rounds) != assignment.n_shards:
        raise ValueError(f"{out_dir / STATE_FILE} records {len(record.rounds)} shards, {out_dir / ASSIGNMENT_FILE} "
                         f"{assignment.n_shards}: the directory mixes two shard sets; use a complete one")
    deltas = []
    for s, r in enumerate(record.rounds):
        path = round_dir(out_dir, s, r) / DELTA_FILE
        if not path.is_file():
            raise ValueError(f"{path} is missing: {STATE_FILE} names round {r} of shard {s} as its current model")
        deltas.append(torch.load(path, map_location="cpu", weights_only=True))
    return assignment, bool(json.loads(text).get("key_drawn", False)), record, deltas


def resume_or_create(out_dir: Path | None, ids: Sequence[int], n_shards: int,
                     key: int | None) -> tuple[ShardAssignment, bool]:
    """(assignment, whether its key was drawn here): the one ``out_dir`` holds, for a relaunch that
    resumes the shards' checkpoints on the very partition they were trained on, else a new one.

    A new secret key on relaunch would move examples between shards while each shard resumes
    a checkpoint trained on its old examples: parallel composition and removal would both
    fail silently. So a different partition (ids, shard count or key) is refused, and so is
    an ``out_dir`` holding shards but no assignment, or one where removals already happened
    (reload that one with :func:`dp_taft.shards.load_shards`).
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


def json_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of the fit options JSON can hold (paths as strings; callables, data sets and other
    objects are left out). A ``config`` (:class:`dp_taft.config.TrainConfig`) counts as its
    ``fit_options()``, overridden by the flat options given beside it, as in :func:`dp_taft.fit`."""
    options = dict(options)
    config = options.pop("config", None)
    if config is not None:
        options = {**config.fit_options(), **options}
    kept: dict[str, Any] = {}
    for name, value in options.items():
        value = str(value) if isinstance(value, Path) else value
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            continue
        kept[name] = value
    return kept


def check_options(stored: Mapping[str, Any], given: Mapping[str, Any], out_dir: Path) -> None:
    """Refuse fit options ``given`` for retraining whose :data:`PRIVACY_OPTIONS` differ from those
    the shard set in ``out_dir`` was trained with (``stored``): an option left out counts as unset."""
    given = json.loads(json.dumps(json_options(given)))  # as stored: tuples become lists
    unset = "<not given>"
    differ = [f"{k}={given.get(k, unset)!r} (trained with {stored.get(k, unset)!r})"
              for k in PRIVACY_OPTIONS if given.get(k, unset) != stored.get(k, unset)]
    if differ:
        raise ValueError(f"the shard set in {out_dir} was trained with other privacy settings: {'; '.join(differ)}. "
                         "Pass the fit options it was trained with: a shard retrained with other ones would not be "
                         "the mechanism its report states")
