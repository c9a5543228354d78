"""The privacy guarantee of a set of shard models (:func:`dp_taft.shards.fit_shards`).

Parallel composition (McSherry 2009, Thm 4): each example lies in one shard, so the shard
models are together (max ε_s, max δ_s)-DP. A removal retrains a shard with fresh noise, and a
guarantee about released models must hold when all of them are released: an example that
stayed in a retrained shard took part in each of its rounds, so shard s's ε_s is that of its
rounds composed sequentially (:func:`dp_taft.sequential.sequential_report`). That is the ε a
report states (``epsilon``, the first sentence of :meth:`ShardPrivacyReport.statement`); the
current models' alone is a field of its own, ``current_models_epsilon``, and the two are equal
until a removal. What is assumed public, and why the shard sizes may be, is spelled out by
:meth:`ShardPrivacyReport.statement`.

Its JSON is a parallel report (:class:`accounting.ParallelReport`) whose members are the
shards' all-releases reports, with the shard set's own fields added, so ``python -m accounting
verify`` recomputes every member (the replaced rounds included) and checks the stated ε
against them; read back with ``accounting.report_from_dict`` it is that parallel report, and
composing it again (:func:`dp_taft.compose.compose_reports`) keeps the replaced rounds.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import accounting

from .sequential import sequential_report

__all__ = ["HASH_BITS", "ShardPrivacyReport"]

#: Bits of the keyed hash that ShardAssignment.shard_of reduces mod n_shards.
HASH_BITS = 64


@dataclass(frozen=True)
class ShardPrivacyReport:
    """Guarantee of every model a shard set released: its current models and those replaced.

    ``released[s]``: the report of each training round of shard s (1 + one per removal that
    hit it), in order; ``per_shard[s]`` is the last, the model in the composition.
    ``all_releases[s]``: the guarantee of every model shard s released: its one round's report,
    or its rounds composed sequentially (fresh noise in each) at the largest of their δ's.
    ``key_drawn``: True when fit_shards drew the partition key from the OS CSPRNG; False when
    the caller gave it (and must keep it secret). Build it with :meth:`of`.
    """

    released: tuple[tuple[accounting.PrivacyReport, ...], ...]
    key_drawn: bool
    all_releases: tuple[accounting.PrivacyReport, ...]

    @classmethod
    def of(cls, released: Sequence[Sequence[accounting.PrivacyReport]], key_drawn: bool) -> "ShardPrivacyReport":
        """The report of shards whose rounds had the reports ``released`` (see the class doc)."""
        released = tuple(tuple(rounds) for rounds in released)
        return cls(released, key_drawn, tuple(_all_rounds(s, rounds) for s, rounds in enumerate(released)))

    @property
    def epsilon(self) -> float:
        """The stated ε: that of releasing every model ever trained, before and after removals
        (the maximum of ``all_releases_per_shard``; :attr:`all_releases_epsilon` names it too)."""
        return max(self.all_releases_per_shard)

    @property
    def delta(self) -> float:
        """The stated δ: the largest of the shards' all-releases reports (the current models' unless a
        removal lowered a shard's δ)."""
        return max(r.delta for r in self.all_releases)

    @property
    def all_releases_epsilon(self) -> float:
        """ε at ``delta`` when every model ever trained, before and after removals, is released: ``epsilon``."""
        return self.epsilon

    @property
    def all_releases_per_shard(self) -> tuple[float, ...]:
        """ε of every model each shard released (its rounds composed)."""
        return tuple(r.epsilon for r in self.all_releases)

    @property
    def current_models_epsilon(self) -> float:
        """ε of the shards' current models alone: it holds only if no model replaced by a
        retraining was ever released; equal to ``epsilon`` before any removal."""
        return max(r.epsilon for r in self.per_shard)

    @property
    def per_shard(self) -> tuple[accounting.PrivacyReport, ...]:
        """The report of each shard's current model."""
        return tuple(rounds[-1] for rounds in self.released)

    @property
    def rounds(self) -> tuple[int, ...]:
        """How many times each shard was trained."""
        return tuple(len(rounds) for rounds in self.released)

    def as_parallel(self) -> accounting.ParallelReport:
        """The stated guarantee as a parallel report whose members are the shards' all-releases reports."""
        return accounting.ParallelReport(self.all_releases, notes=(
            f"parallel composition over {len(self.released)} disjoint shards of one shard set "
            "(dp_taft.shards.fit_shards); member s covers every model shard s released, its rounds before and "
            "after removals composed sequentially"))

    def to_dict(self) -> dict[str, Any]:
        """Named-field JSON form: the parallel report of every release (:meth:`as_parallel`:
        format, epsilon, delta, notes, members), and the shard set's own fields: the statement,
        ``current_models_epsilon``, each shard's current report again (``per_shard``) and the
        reports of the models it replaced (``replaced``, oldest first), from which the members
        can be recomputed (``accounting verify`` lists these fields as not checked)."""
        return {**self.as_parallel().to_dict(), "statement": self.statement(),
                "current_models_epsilon": self.current_models_epsilon,
                "all_releases_epsilon": self.all_releases_epsilon,
                "all_releases_per_shard": list(self.all_releases_per_shard),
                "partition_key": "drawn" if self.key_drawn else "given", "rounds": list(self.rounds),
                "per_shard": [r.to_dict() for r in self.per_shard],
                "replaced": [[r.to_dict() for r in rounds[:-1]] for rounds in self.released]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    def statement(self) -> str:
        """One paragraph: the stated guarantee, what it assumes, and what the removals changed."""
        k = len(self.released)
        eps = ", ".join(f"{e:.4g}" for e in self.all_releases_per_shard)
        models = ("every shard's models, including those replaced when a removal retrained the shard, and the "
                  "model composed from the current ones" if max(self.rounds) > 1 else
                  "every shard's model and the model composed from them")
        return (
            f"The models this shard set released, all of them together ({models}), are "
            f"({self.epsilon:.4g}, {self.delta:.3g})-DP under add/remove-one adjacency by parallel composition: every "
            f"example lies in exactly one of {k} disjoint shards, chosen by a keyed hash of its own stable id, and "
            f"each shard's models are DP on its shard (per-shard epsilon: {eps}); epsilon and delta are the maxima "
            "over the shards (delta composes as the max, not the sum, because each example affects one shard). "
            f"{self._public()} Also assumed: every shard's noise and batch sampling were secret.{self._releases()} "
            "Each shard's report (per_shard) states its mechanism."
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
        return (f" {retrained} shard(s) were retrained after removals, each with fresh secret noise. The models from "
                "before and after the removals are all taken as released: an example that stayed in a retrained "
                "shard took part in each of its training rounds, so that shard's epsilon above is the sequential "
                "composition of its rounds. The current models alone are "
                f"({self.current_models_epsilon:.4g}, {self.delta:.3g})-DP (current_models_epsilon), which holds only "
                "if no model replaced by a retraining was ever released.")


def _all_rounds(shard: int, rounds: Sequence[accounting.PrivacyReport]) -> accounting.PrivacyReport:
    """The guarantee of every model shard ``shard`` released: its rounds composed sequentially."""
    if len(rounds) == 1:
        return rounds[0]  # nothing to compose: the round's own (verified) report
    return sequential_report(rounds, part="round", notes=(
        f"shard {shard}: sequential composition of its {len(rounds)} training rounds (the first, then one retraining "
        "with fresh noise per removal that hit the shard), all released; an example that stayed took part in each; "
        "delta is the largest round delta, at which epsilon was recomputed from the whole history"))
