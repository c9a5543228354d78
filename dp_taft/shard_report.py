"""The privacy guarantee of a set of shard models (:func:`dp_taft.shards.fit_shards`).

Parallel composition (McSherry 2009, Thm 4): each example lies in one shard, so the composed
model is (max ε_s, max δ_s)-DP. A removal retrains a shard with fresh noise; releasing the
models from before and after it composes sequentially for the examples that stayed, which
``all_releases_epsilon`` covers. What is assumed public, and why the shard sizes may be, is
spelled out by :meth:`ShardPrivacyReport.statement`. Its JSON is a parallel report
(:class:`accounting.ParallelReport`, whose members are the shards' current models) with the
shard set's own fields added, so ``python -m accounting verify`` checks it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import accounting

__all__ = ["HASH_BITS", "ShardPrivacyReport"]

#: Bits of the keyed hash that ShardAssignment.shard_of reduces mod n_shards.
HASH_BITS = 64


@dataclass(frozen=True)
class ShardPrivacyReport:
    """Guarantee of the composed model and of every model released so far.

    ``released[s]``: the report of each training round of shard s (1 + one per removal that
    hit it), in order; ``per_shard[s]`` is the last, the model in the composition.
    ``epsilon``, ``delta``: the composed model's, the maxima over ``per_shard``.
    ``all_releases_per_shard[s]``: ε at ``delta`` of every model shard s released (its rounds
    composed with :func:`accounting.epsilon_of_history`); their maximum,
    ``all_releases_epsilon``, covers every model ever trained and equals ``epsilon`` before
    any removal. ``key_drawn``: True when fit_shards drew the partition key from the OS
    CSPRNG; False when the caller gave it (and must keep it secret).
    """

    released: tuple[tuple[accounting.PrivacyReport, ...], ...]
    key_drawn: bool
    epsilon: float
    delta: float
    all_releases_per_shard: tuple[float, ...]

    @classmethod
    def of(cls, released: Sequence[Sequence[accounting.PrivacyReport]], key_drawn: bool) -> "ShardPrivacyReport":
        """The report of shards whose rounds had the reports ``released`` (see the class doc)."""
        released = tuple(tuple(rounds) for rounds in released)
        current = [rounds[-1] for rounds in released]
        delta = max(r.delta for r in current)
        every = tuple(_all_rounds_epsilon(rounds, delta) for rounds in released)
        return cls(released, key_drawn, max(r.epsilon for r in current), delta, every)

    @property
    def all_releases_epsilon(self) -> float:
        """ε at ``delta`` when every model ever trained, before and after removals, is released."""
        return max(self.all_releases_per_shard)

    @property
    def per_shard(self) -> tuple[accounting.PrivacyReport, ...]:
        """The report of each shard's current model."""
        return tuple(rounds[-1] for rounds in self.released)

    @property
    def rounds(self) -> tuple[int, ...]:
        """How many times each shard was trained."""
        return tuple(len(rounds) for rounds in self.released)

    def as_parallel(self) -> accounting.ParallelReport:
        """The composed model's guarantee as a parallel report over the shards' current models."""
        return accounting.ParallelReport(self.per_shard, notes=f"parallel composition over {len(self.released)} "
                                         "disjoint shards of one shard set (dp_taft.shards.fit_shards)")

    def to_dict(self) -> dict[str, Any]:
        """Named-field JSON form: the parallel report of the current models (:meth:`as_parallel`:
        format, epsilon, delta, notes, members), and the shard set's own fields: the statement,
        each shard's current report again (``per_shard``) and the reports of the models it
        replaced (``replaced``, oldest first), from which ``all_releases_epsilon`` can be
        recomputed (``accounting verify`` lists these fields as not checked)."""
        return {**self.as_parallel().to_dict(), "statement": self.statement(),
                "all_releases_epsilon": self.all_releases_epsilon,
                "all_releases_per_shard": list(self.all_releases_per_shard),
                "partition_key": "drawn" if self.key_drawn else "given", "rounds": list(self.rounds),
                "per_shard": [r.to_dict() for r in self.per_shard],
                "replaced": [[r.to_dict() for r in rounds[:-1]] for rounds in self.released]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    def statement(self) -> str:
        k = len(self.released)
        eps = ", ".join(f"{r.epsilon:.4g}" for r in self.per_shard)
        return (
            f"The composed model is ({self.epsilon:.4g}, {self.delta:.3g})-DP under add/remove-one adjacency by "
            f"parallel composition: every example lies in exactly one of {k} disjoint shards, chosen by a keyed "
            f"hash of its own stable id, and each shard model is DP on its shard (per-shard epsilon: {eps}); "
            "epsilon and delta are the maxima over the shards (delta composes as the max, not the sum, because "
            f"each example affects one shard). {self._public()} Also assumed: every shard's noise and batch "
            f"sampling were secret.{self._releases()} Each shard's report (per_shard) states its mechanism."
        )

    def _public(self) -> str:
        """What the guarantee assumes public, and why the shard sizes can be."""
        k = len(self.released)
        key = ("only because the partition key is secret: fit_shards drew it from the OS CSPRNG (128 bits) and "
               "kept it only in the memory of the processes that ran it and, with an out_dir, in its owner-only "
               "assignment.json." if self.key_drawn else
               "only if the partition key is secret: it was given by the caller, who must have drawn it uniformly "
               "at random and never published it. With a public or guessable key (such as the former default 0) "
               "each example's shard is a public function of its content, and the sizes tell whether a candidate "
               "example is in.")
        return (
            "Assumed public, as DP-SGD's accounting assumes of a data set's size: the number N of examples and "
            "each shard's size (hence its sample rate; each per-shard report states both). The shard sizes may be "
            f"public {key} With a secret key, modelling the keyed hash (BLAKE2b) as a pseudorandom function, the "
            f"shards of distinct ids are independent and uniform over the {k} shards (up to a bias below "
            f"{k}/2^{HASH_BITS}), so given N the vector of shard sizes is Multinomial(N; 1/{k}, ..., 1/{k}) whatever "
            "the examples: for two data sets of the same size N, such as one holding a given example and one "
            "holding another in its place, it has the same distribution, and it tells nothing about which examples "
            "are in beyond N (a computational guarantee, resting on the key's secrecy)."
        )

    def _releases(self) -> str:
        retrained = sum(1 for r in self.rounds if r > 1)
        if not retrained:
            return ""
        return (f" {retrained} shard(s) were retrained after removals, each with fresh secret noise; if the models "
                "from before and after the removals are all released, an example that stayed in a retrained shard "
                "took part in each of its training rounds, and by sequential composition of those rounds every "
                f"example is protected at ({self.all_releases_epsilon:.4g}, {self.delta:.3g})-DP.")


def _all_rounds_epsilon(rounds: Sequence[accounting.PrivacyReport], delta: float) -> float:
    """ε at ``delta`` of one shard's rounds composed sequentially (fresh noise in each)."""
    if len(rounds) == 1 and rounds[0].delta == delta:
        return rounds[0].epsilon  # nothing to compose: the round's own (verified) ε
    history = [segment for r in rounds for segment in r.history]
    return accounting.epsilon_of_history(history, delta, method=rounds[0].method)
