"""Membership from published shard sizes (issue 16): an adversary who knows every other
example, the code and the old public key convention places candidates under a public
partition key, and does no better than chance under fit_shards' default secret key.

The game, per candidate pair (a, b): the data set holds the known others and one of a, b,
by a fair coin (so N is the same either way, as the guarantee assumes N public). The
adversary sees only shareable outputs: each shard's ``dataset_size`` and sample rate from the
per-shard reports. It recomputes the content ids (unsalted hashes of the examples), the
partition under each key it can guess, and picks the candidate whose predicted sizes match.
"""

from __future__ import annotations

import math
import secrets
from collections import Counter
from collections.abc import Iterable, Sequence

import timm
import torch
from torch.utils.data import ConcatDataset, Subset, TensorDataset

import dp_taft
from dp_taft.shards import ShardAssignment, content_ids, fit_shards

N_SHARDS, N_OTHERS, TRIALS = 8, 200, 50
KEY_GUESSES = range(16)  # the old default 0 and other small public keys
FALSE_ALARM = 1e-4  # chance that a fair coin trips the "better than chance" threshold


def images(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g))


def published_sizes(per_shard: Sequence[dp_taft.PrivacyReport], batch_size: int) -> tuple[int, ...]:
    """Each shard's size as the shareable per-shard reports give it, twice: ``dataset_size``,
    and ``batch_size / sample_rate`` (the experiment's CSV publishes the same two columns)."""
    sizes = tuple(r.dataset_size for r in per_shard)
    assert sizes == tuple(round(batch_size / r.history[0].sample_rate) for r in per_shard)
    return sizes


def attack(sizes: Sequence[int], others: Iterable[int], a: int, b: int) -> int:
    """The candidate id (a or b) that the published ``sizes`` point to: for each guessed key,
    predict the sizes with a and with b; a key under which exactly one matches decides."""
    others, k = list(others), len(sizes)
    for key in KEY_GUESSES:
        known = Counter(ShardAssignment.shard_of(i, key, k) for i in others)
        match = [c for c in (a, b)
                 if [known[s] + (ShardAssignment.shard_of(c, key, k) == s) for s in range(k)] == list(sizes)]
        if len(match) == 1:
            return match[0]
    return a  # nothing learnt: a fixed guess


def binomial_threshold(n: int, alpha: float) -> int:
    """Smallest t with P(Binomial(n, 1/2) >= t) <= alpha."""
    return next(t for t in range(n + 2) if sum(math.comb(n, k) for k in range(t, n + 1)) / 2**n <= alpha)


def play(key: int | None, coins: Sequence[int], seed: int) -> int:
    """Correct guesses over the games, one per coin (0: a is in, 1: b is in); each data set
    partitioned as fit_shards does (ShardAssignment.create with fit_shards' key: None draws
    a secret key)."""
    others = content_ids(images(N_OTHERS, seed))
    candidates = content_ids(images(2 * len(coins), seed + 1))  # ids depend on the example alone
    wins = 0
    for t, coin in enumerate(coins):
        a, b = candidates[2 * t], candidates[2 * t + 1]
        member = (a, b)[coin]
        sizes = ShardAssignment.create([*others, member], N_SHARDS, key).sizes  # what the reports publish
        wins += attack(sizes, others, a, b) == member
    return wins


def test_public_key_places_candidates_and_secret_key_does_no_better_than_chance():
    threshold = binomial_threshold(TRIALS, FALSE_ALARM)
    public = play(0, torch.randint(0, 2, (TRIALS,), generator=torch.Generator().manual_seed(0)).tolist(), seed=1)
    # Key 0: a and b land in different shards with probability 7/8, and then the sizes tell.
    assert public >= 0.8 * TRIALS > threshold, public
    # Default key: the sizes have the same distribution whichever candidate is in, so with fair
    # secret coins every guess is right with probability exactly 1/2, independently, and the
    # test fails by chance with probability at most FALSE_ALARM.
    secret = play(None, [secrets.randbelow(2) for _ in range(TRIALS)], seed=10)
    assert secret < threshold, (secret, threshold)


def test_the_real_reports_publish_the_partition_sizes_that_the_attack_reads():
    """Real fit_shards runs: the per-shard reports publish exactly the assignment's sizes (what
    play() attacks), and under the public key 0 the attack places the member from them."""
    torch.manual_seed(0)
    vit = timm.models.VisionTransformer(img_size=8, patch_size=4, embed_dim=16, depth=1, num_heads=2, num_classes=3)
    tangent = dp_taft.linearize(vit, blocks=1)
    n_shards, others_data, pool = 4, images(60, seed=20), images(8, seed=21)
    others, (a, *rest) = content_ids(others_data), content_ids(pool)
    b = next(c for c in rest if ShardAssignment.shard_of(c, 0, n_shards) != ShardAssignment.shard_of(a, 0, n_shards))
    data = ConcatDataset([others_data, Subset(pool, [0])])  # the member: a
    fit = dict(epsilon=8.0, delta=1e-3, epochs=1, batch_size=3, lr=0.1, quiet=True, accountant="rdp")
    for key in (0, None):
        shard_set = fit_shards(tangent, data, n_shards, key=key, **fit)
        sizes = published_sizes(shard_set.report.per_shard, fit["batch_size"])
        assert sizes == shard_set.assignment.sizes and sum(sizes) == len(data)
        if key == 0:
            assert attack(sizes, others, a, b) == a and attack(sizes, others, b, a) == a
