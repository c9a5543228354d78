"""Shard training, parallel composition and exact removal (dp_taft.shards)."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch.utils.data import Subset

import dp_taft
from dp_taft.shards import ShardAssignment, fit_shards, load_shards
from fit_cases import permission_modes, umask

FIT = dict(epochs=1, batch_size=4, lr=0.5, quiet=True)  # small: secret keys give random shard sizes


def tiny_task(n=96, seed=0):
    torch.manual_seed(seed)
    model = timm.models.VisionTransformer(img_size=8, patch_size=4, embed_dim=16, depth=2, num_heads=2, num_classes=3)
    x = torch.randn(n, 3, 8, 8)
    y = (x[:, 0].mean((1, 2)) > 0).long() + (x[:, 1].mean((1, 2)) > 0).long()
    return dp_taft.linearize(model, blocks=1), torch.utils.data.TensorDataset(x, y)


def states_equal(a, b):
    sa, sb = a.delta_state_dict(), b.delta_state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_assignment_is_a_partition_that_depends_only_on_each_id():
    ids = list(range(0, 3000, 3))
    a = ShardAssignment.create(ids, 4, key=7)
    positions = [a.positions(s) for s in range(4)]
    assert sorted(p for ps in positions for p in ps) == list(range(len(ids)))
    assert all(len(ps) > 150 for ps in positions)  # roughly balanced
    # removing one example and adding another moves no other example
    b = ShardAssignment.create(ids[1:] + [99999], 4, key=7)
    assert dict(zip(a.ids, a.shards)).items() - {(i, s) for i, s in zip(b.ids, b.shards)} == {(ids[0], a.shards[0])}
    assert ShardAssignment.create(ids, 4, key=8).shards != a.shards  # the key changes the partition
    assert ShardAssignment.from_json(a.to_json()) == a
    assert a.sizes == tuple(len(ps) for ps in positions)


def test_default_partition_key_is_secret_and_fresh():
    """128 bits from the OS each time: no two default partitions share a key, none is the old 0."""
    keys = [ShardAssignment.create(range(10), 2).key for _ in range(4)]
    assert len(set(keys)) == 4 and all(0 < k < 2**128 for k in keys)
    assert max(keys).bit_length() > 64  # 4 draws all below 2^64: probability 2^-256
    with pytest.raises(ValueError, match="128-bit partition key"):
        ShardAssignment.create(range(10), 2, key=2**128)


def test_duplicate_ids_refused():
    with pytest.raises(ValueError, match="unique"):
        ShardAssignment.create([1, 2, 2], 2)


@pytest.mark.parametrize("reload", [False, True], ids=["in_memory", "reloaded"])
def test_forget_retrains_with_fresh_noise_exactly_as_from_scratch(tmp_path, reload):
    """Untouched shards stay the very same models; a retrained shard equals fit() from w0 on
    its data without the removed ids with the (shard, round 2) seed, not the round-1 seed;
    also on the set reloaded from its out_dir (load_shards), as a later process would."""
    tangent, data = tiny_task()
    ids = list(range(1000, 1000 + len(data)))
    kwargs = dict(epsilon=2.0, delta=1e-3, **FIT)
    shard_set = fit_shards(tangent, data, 3, ids=ids, seed=1, out_dir=tmp_path / "a", **kwargs)
    if reload:
        shard_set = load_shards(tmp_path / "a", tangent, data, ids=ids, **kwargs)
    before = list(shard_set.models)
    removed = [1005, 1040]
    result = shard_set.forget(removed)
    shard_of = dict(zip(shard_set.assignment.ids, shard_set.assignment.shards))
    assert set(result.retrained_shards) == {shard_of[i] for i in removed}
    assert result.full_retrain_time_s > 0 and result.wall_time_s > 0
    for s in range(3):
        if s not in result.retrained_shards:
            assert shard_set.models[s] is before[s]  # untouched: the very same model
            continue
        keep = [p for p, i in enumerate(ids) if shard_of[i] == s and i not in removed]
        scratch = [copy.deepcopy(shard_set.base) for _ in range(2)]
        for model, round_ in zip(scratch, (2, 1)):
            dp_taft.fit(model, Subset(data, keep), seed=shard_set.shard_seed(s, round_), **kwargs)
        assert states_equal(shard_set.models[s], scratch[0])  # fresh round-2 randomness, same code path
        assert not states_equal(shard_set.models[s], scratch[1])  # not the noise of the released round 1
        assert shard_set.rounds[s] == 2 and len(shard_set.released[s]) == 2
    assert (tmp_path / "a" / "assignment.json").exists() and (tmp_path / "a" / "removed.json").exists()
    report = shard_set.report
    # both rounds released: sequential composition, and that is the ε stated
    assert report.epsilon == report.all_releases_epsilon > report.current_models_epsilon
    assert report.current_models_epsilon == max(r.epsilon for r in report.per_shard)
    assert report.as_parallel().epsilon == report.epsilon and report.to_dict()["epsilon"] == report.epsilon
    assert "before and after" in report.statement() and "sequential composition" in report.statement()


def test_default_ids_come_from_content_so_a_deletion_moves_no_other_example():
    tangent, data = tiny_task(n=60)
    full = fit_shards(tangent, data, 3, epsilon=None, **FIT).assignment
    rest = Subset(data, range(1, 60))  # example 0 deleted: every later position shifts
    smaller = fit_shards(tangent, rest, 3, key=full.key, epsilon=None, **FIT).assignment
    assert smaller.ids == full.ids[1:]
    assert smaller.shards == full.shards[1:]  # no other example changed shard
    with pytest.raises(ValueError, match="examples 0 and 1 are identical.*ids="):
        fit_shards(tangent, Subset(data, [0, 0, 1, 2]), 2, epsilon=None, **FIT)


def test_seedless_shards_retrain_with_fresh_secret_noise():
    tangent, data = tiny_task(n=60)
    shard_set = fit_shards(tangent, data, 2, ids=range(60), epsilon=2.0, delta=1e-3, **FIT)
    assert shard_set.shard_seed(0, 1) is None
    before = list(shard_set.models)
    retrained = shard_set.forget([7]).retrained_shards
    assert all(not states_equal(shard_set.models[s], before[s]) for s in retrained)


@pytest.mark.parametrize("reload", [False, True], ids=["in_memory", "reloaded"])
def test_forget_deletes_the_stored_features_of_removed_examples(tmp_path, reload):
    """With a prefix cache_dir, each shard caches its own examples' frozen features; forgetting
    an example must erase its features from disk too, not only retrain the model."""
    tangent, data = tiny_task(n=60)
    cache = tmp_path / "cache"
    kwargs = dict(epsilon=2.0, delta=1e-3, cache_dir=cache, **FIT)
    shard_set = fit_shards(tangent, data, 2, ids=range(60), out_dir=tmp_path / "set", **kwargs)
    if reload:
        shard_set = load_shards(tmp_path / "set", tangent, data, ids=range(60), **kwargs)
    with torch.no_grad():
        features = tangent.prefix(data[7][0][None])[0].contiguous().numpy().tobytes()

    def stored() -> bool:
        return any(features in p.read_bytes() for p in cache.rglob("*.bin"))

    assert stored()  # the cache really holds example 7's features (else this test proves nothing)
    shard_set.forget([7])
    assert not stored()
    assert sorted(p.name for p in cache.iterdir() if p.is_dir()) == ["shard_000", "shard_001"]


def test_relaunch_into_the_same_out_dir_keeps_the_partition(tmp_path):
    """A relaunch (e.g. after a crash) must resume the very partition the shard checkpoints were
    trained on, not draw a new secret key; another partition, or a set with removals, is refused."""
    tangent, data = tiny_task(n=40)
    kwargs = dict(ids=range(40), epsilon=2.0, delta=1e-3, out_dir=tmp_path, **FIT)
    first = fit_shards(tangent, data, 2, **kwargs)
    again = fit_shards(tangent, data, 2, **kwargs)
    assert again.assignment == first.assignment and again.key_drawn
    assert all(states_equal(a, b) for a, b in zip(again.models, first.models))  # resumed, not retrained
    with pytest.raises(ValueError, match="another partition"):
        fit_shards(tangent, data, 3, **kwargs)
    with pytest.raises(ValueError, match="another partition"):
        fit_shards(tangent, data, 2, key=first.assignment.key + 1, **kwargs)
    again.forget([3])
    with pytest.raises(ValueError, match="removed"):
        fit_shards(tangent, data, 2, **kwargs)
    (tmp_path / "assignment.json").unlink()
    with pytest.raises(ValueError, match="no assignment.json"):
        fit_shards(tangent, data, 2, **kwargs)


def test_private_shards_report_parallel_composition():
    tangent, data = tiny_task()
    shard_set = fit_shards(tangent, data, 2, epsilon=2.0, delta=1e-3, accountant="rdp", **FIT)
    report = shard_set.report
    assert len(report.per_shard) == 2
    assert report.epsilon == max(r.epsilon for r in report.per_shard) <= 2.0
    assert report.delta == max(r.delta for r in report.per_shard)
    assert report.all_releases_epsilon == report.current_models_epsilon == report.epsilon  # nothing retrained yet
    statement = report.statement()
    assert "parallel composition" in statement and "delta composes as the max" in statement
    assert all(r.dataset_size < len(data) for r in report.per_shard)
    # what is assumed public, and why the published sizes may be: the key was drawn, not given
    assert report.key_drawn and "fit_shards drew it from the OS CSPRNG" in statement
    assert "number N of examples and each shard's size" in statement and "Multinomial(N; 1/2, ..., 1/2)" in statement
    assert tuple(r.dataset_size for r in report.per_shard) == shard_set.assignment.sizes
    given = fit_shards(tangent, data, 2, key=shard_set.assignment.key, epsilon=2.0, delta=1e-3, **FIT).report
    assert not given.key_drawn and "given by the caller" in given.statement()
    assert "fit_shards drew it" not in given.statement()


@pytest.mark.parametrize("mask", [0o022, 0o000, 0o277], ids=oct)
def test_out_dir_is_owner_only_whatever_the_umask(tmp_path, mask):
    """out_dir, its new parents and everything fit_shards and forget write in it (assignment with
    the key and content ids, removed ids, each shard's Δw, checkpoints and ledgers): 0700 / 0600."""
    tangent, data = tiny_task(n=48)
    out = tmp_path / "new" / "out"
    with umask(mask):
        shard_set = fit_shards(tangent, data, 2, out_dir=out, epsilon=4.0, delta=1e-3, **FIT)
        shard_set.forget(shard_set.assignment.ids[3:4])
        names = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert {"assignment.json", "removed.json", "shard_000/delta.pt", "shard_001/round_001/ledger.jsonl"} <= names
    key = str(shard_set.assignment.key).encode()  # as its statement says: kept in assignment.json alone
    assert [p.name for p in out.rglob("*") if p.is_file() and key in p.read_bytes()] == ["assignment.json"]
    assert permission_modes(tmp_path / "new") == {"dirs": {0o700}, "files": {0o600}}


def test_parallel_workers_match_serial():
    tangent, data = tiny_task(n=48)
    serial = fit_shards(tangent, data, 2, seed=3, epsilon=None, **FIT)
    parallel = fit_shards(tangent, data, 2, key=serial.assignment.key, seed=3, workers=2, epsilon=None, **FIT)
    for a, b in zip(serial.models, parallel.models):
        torch.testing.assert_close(a.delta_state_dict(), b.delta_state_dict(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [(dict(workers=0), "workers"), (dict(seed=1, checkpoint_dir="x"), "out_dir"), (dict(ids=[1, 2]), "one id per example")],
)
def test_bad_arguments(kwargs, match):
    tangent, data = tiny_task(n=10)
    with pytest.raises(ValueError, match=match):
        fit_shards(tangent, data, 2, epsilon=None, **FIT, **kwargs)


def test_requires_tangent_model():
    _, data = tiny_task(n=10)
    with pytest.raises(ValueError, match="TangentViT"):
        fit_shards(torch.nn.Linear(2, 2), data, 2, epsilon=None)
