"""The guarantee of composed models (dp_taft.compose.compose_reports), against independent accounting."""

from __future__ import annotations

import json

import pytest

import accounting
from accounting import ParallelReport, PrivacyReport, Segment
from dp_taft.compose import compose_reports
from dp_taft.shard_report import ShardPrivacyReport

A = (Segment(4.0, 0.02, 50), Segment(1.1, 0.02, 300))
B = (Segment(1.3, 0.05, 200),)
C = (Segment(0.9, 0.01, 400),)


@pytest.fixture(scope="module")
def reports() -> tuple[PrivacyReport, PrivacyReport, PrivacyReport]:
    staged = PrivacyReport.from_history(A, 1e-5, dataset_size=5000, stages=("head", "taft"))
    return staged, PrivacyReport.from_history(B, 1e-6, dataset_size=5000), PrivacyReport.from_history(C, 1e-5)


def test_sequential_is_the_composition_of_all_histories(reports):
    composed = compose_reports(reports)
    # independently: every segment of every member, at the largest member delta
    expected = accounting.epsilon_of_history([*A, *B, *C], 1e-5)
    assert isinstance(composed, PrivacyReport) and composed.epsilon == pytest.approx(expected, rel=1e-9)
    assert composed.delta == 1e-5 and composed.method == "pld"
    assert all(composed.epsilon > r.epsilon for r in reports)
    assert composed.stages == ("model 1: head", "model 1: taft", "model 2", "model 3")
    assert composed.dataset_size is None  # the members' sizes differ (5000, 5000, unknown)
    assert all(check.holds for check in composed.verify(composed.methods))
    statement = composed.statement()
    assert "sequential composition of 3 models" in statement and "stage 'model 2'" in statement
    # a composed member composes on: the same mechanism, labels nested
    again = compose_reports([compose_reports(reports[:2]), reports[2]])
    assert again.epsilon == pytest.approx(composed.epsilon, rel=1e-9)
    assert again.stages[0] == "model 1: model 1: head"


def test_method_of_the_first_member(reports):
    rdp = PrivacyReport.from_history(B, 1e-5, method="rdp")
    composed = compose_reports([rdp, reports[2]])
    assert composed.method == "rdp"
    assert composed.epsilon == pytest.approx(accounting.epsilon_of_history([*B, *C], 1e-5, "rdp"), rel=1e-9)


def test_parallel_is_the_largest_member(reports):
    composed = compose_reports(reports, disjoint=True)
    assert isinstance(composed, ParallelReport)
    assert composed.epsilon == max(r.epsilon for r in reports) and composed.delta == 1e-5
    assert composed.epsilon < compose_reports(reports).epsilon
    assert "parallel composition (McSherry 2009" in composed.statement()
    assert "declared trained on disjoint data" in composed.statement()
    assert all(check.holds for check in composed.verify())


def test_parallel_member_under_sequential_composition_is_exact(reports):
    """An example lies in one part of a parallel member, so it pays that part composed with the
    other models: the worst part is not necessarily the one with the largest epsilon alone."""
    subsampled = PrivacyReport.from_history((Segment(1.0, 0.05, 150),), 1e-5)
    one_shot = PrivacyReport.from_history((Segment(1.06, 1.0, 1),), 1e-5)
    assert subsampled.epsilon > one_shot.epsilon  # the worst part alone...
    shards = ParallelReport((subsampled, one_shot))
    composed = compose_reports([reports[1], shards])
    assert isinstance(composed, ParallelReport) and len(composed.members) == 2
    each = [accounting.epsilon_of_history([*B, *part.history], 1e-5) for part in shards.members]
    assert each[1] > each[0]  # ...is not the worst composed with model 1
    assert composed.epsilon == pytest.approx(max(each), rel=1e-9)
    assert [m.stages for m in composed.members] == [("model 1", "model 2")] * 2
    assert "model 2 is itself a parallel composition over 2 disjoint parts" in composed.statement()
    # model 1's examples are in every member: the statement must not claim the members' data are disjoint
    assert composed.basis == "per-example" and "disjoint at the level of examples" not in composed.statement()
    assert ParallelReport.from_json(composed.to_json()).basis == "per-example"


def test_shard_report_composes_as_every_model_it_released(reports):
    """A shard set's report composes as its parallel view, whose member for a retrained shard is
    its rounds composed sequentially: the model its retraining replaced is paid for, also when
    the report is read back from its JSON (``accounting.report_from_dict``: a plain ParallelReport)."""
    shards = ShardPrivacyReport.of([[reports[1], reports[1]], [reports[2]]], key_drawn=True)
    composed = compose_reports([shards, reports[0]])
    assert composed == compose_reports([shards.as_parallel(), reports[0]])
    assert composed == compose_reports([accounting.report_from_dict(json.loads(shards.to_json())), reports[0]])
    # independently: shard 0's two rounds then model 2; shard 1's one round then model 2
    each = [accounting.epsilon_of_history([*B, *B, *A], 1e-5), accounting.epsilon_of_history([*C, *A], 1e-5)]
    assert composed.epsilon == pytest.approx(max(each), rel=1e-9)
    assert [m.stages for m in composed.members] == [("model 1: round 1", "model 1: round 2", "model 2: head",
                                                     "model 2: taft"), ("model 1", "model 2: head", "model 2: taft")]
    assert shards.epsilon == shards.all_releases_epsilon > shards.current_models_epsilon
    unretrained = ShardPrivacyReport.of([[reports[1]], [reports[2]]], key_drawn=True)
    assert unretrained.as_parallel() == ParallelReport((reports[1], reports[2]), notes=unretrained.as_parallel().notes)
    assert compose_reports([unretrained, reports[0]]).epsilon < composed.epsilon


@pytest.mark.parametrize("bad,match", [([], "at least one report"), ([None], r"reports\[0\] is a NoneType")])
def test_bad_members_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        compose_reports(bad)
