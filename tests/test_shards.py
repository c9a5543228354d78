"""Shard training, parallel composition and exact removal (dp_taft.shards)."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch.utils.data import Subset

import dp_taft
from dp_taft.shards import ShardAssignment, fit_shards

FIT = dict(epochs=1, batch_size=16, lr=0.5, quiet=True)


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


def test_duplicate_ids_refused():
    with pytest.raises(ValueError, match="unique"):
        ShardAssignment.create([1, 2, 2], 2)


def test_forget_retrains_with_fresh_noise_exactly_as_from_scratch(tmp_path):
    """Untouched shards stay the very same models; a retrained shard equals fit() from w0 on
    its data without the removed ids with the (shard, round 2) seed, not the round-1 seed."""
    tangent, data = tiny_task()
    ids = list(range(1000, 1000 + len(data)))
    kwargs = dict(epsilon=2.0, delta=1e-3, **FIT)
    shard_set = fit_shards(tangent, data, 3, ids=ids, seed=1, out_dir=tmp_path / "a", **kwargs)
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
    assert report.all_releases_epsilon > report.epsilon  # both rounds released: sequential composition
    assert "before and after" in report.statement() and "sequential composition" in report.statement()


def test_default_ids_come_from_content_so_a_deletion_moves_no_other_example():
    tangent, data = tiny_task(n=60)
    full = fit_shards(tangent, data, 3, epsilon=None, **FIT).assignment
    rest = Subset(data, range(1, 60))  # example 0 deleted: every later position shifts
    smaller = fit_shards(tangent, rest, 3, epsilon=None, **FIT).assignment
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


def test_private_shards_report_parallel_composition():
    tangent, data = tiny_task()
    shard_set = fit_shards(tangent, data, 2, epsilon=2.0, delta=1e-3, accountant="rdp", **FIT)
    report = shard_set.report
    assert len(report.per_shard) == 2
    assert report.epsilon == max(r.epsilon for r in report.per_shard) <= 2.0
    assert report.delta == max(r.delta for r in report.per_shard)
    assert report.all_releases_epsilon == pytest.approx(report.epsilon)  # nothing retrained yet
    statement = report.statement()
    assert "parallel composition" in statement and "public" in statement and "delta composes as the max" in statement
    assert all(r.dataset_size < len(data) for r in report.per_shard)


def test_parallel_workers_match_serial():
    tangent, data = tiny_task(n=48)
    serial = fit_shards(tangent, data, 2, seed=3, epsilon=None, **FIT)
    parallel = fit_shards(tangent, data, 2, seed=3, workers=2, epsilon=None, **FIT)
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
