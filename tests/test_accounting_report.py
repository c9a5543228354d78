"""PrivacyReport: values, stages, JSON (format 2 and the older format 1) and the human-readable statement."""

import json
import math

import pytest

import accounting
from accounting import ComposedEvent, PrivacyReport, Segment

HISTORY = (Segment(1.0, 0.01, 1000), Segment(1.5, 0.02, 500))
# Written by the format-1 to_json (history as bare rows, no "format" key), before stages existed.
OLD_FORM = (
    '{"dataset_size": 1000, "delta": 1e-05, "epsilon": 2.5, "epsilon_error": 0.01, '
    '"epsilons": {"pld": 2.5, "rdp": "inf"}, "history": [[1.795, 0.05, 60], [0.9, 0.1, 7]], '
    '"max_grad_norm": 1.0, "method": "pld", "notes": "old run", "sampling": "poisson", "target_epsilon": 3.0, '
    '"versions": {"accounting": "0.0.9", "numpy": "1.26.0", "python": "3.11.2", "scipy": "1.11.0"}}'
)


def make(**kwargs) -> PrivacyReport:
    return PrivacyReport.from_history(HISTORY, 1e-5, dataset_size=50000, max_grad_norm=1.0, target_epsilon=3.0,
                                      notes="unit test", **kwargs)


def test_values():
    r = make()
    assert r.method == "pld" and r.sampling == "poisson" and r.history == HISTORY and r.stages == ()
    assert r.epsilon == accounting.epsilon_of_history(HISTORY, 1e-5)
    assert set(r.epsilons) == {"pld", "rdp"} and r.epsilons["rdp"] >= r.epsilon
    assert {"accounting", "numpy", "scipy", "python"} <= set(r.versions)
    assert 0 <= r.epsilon_error < 0.05 * r.epsilon  # PLD discretisation error, reported


def test_json_names_every_field():
    d = json.loads(make().to_json())
    assert d["format"] == "dp_taft.privacy_report/2"
    assert d["neighbouring"] == "add/remove-one" and d["sampling"] == "poisson"
    assert d["history"] == [{"noise_multiplier": 1.0, "sample_rate": 0.01, "steps": 1000},
                            {"noise_multiplier": 1.5, "sample_rate": 0.02, "steps": 500}]
    assert "stages" not in d  # labels live on the segments


def test_json_round_trip():
    r = make()
    assert PrivacyReport.from_json(r.to_json()) == r
    assert PrivacyReport.from_dict(r.to_dict()) == r


def test_stages_are_written_per_segment_and_read_back():
    r = make(stages=("head", "taft"))
    rows = json.loads(r.to_json())["history"]
    assert [row["stage"] for row in rows] == ["head", "taft"]
    back = PrivacyReport.from_json(r.to_json())
    assert back == r and back.stages == ("head", "taft")
    assert back.epsilon == make().epsilon  # labels do not change the accounting


def test_stage_labels_follow_their_items():
    two = ComposedEvent((Segment(2.0, 0.1, 5).event, Segment(3.0, 0.2, 7).event))
    r = PrivacyReport.from_history([Segment(1.0, 0.1, 0), two, Segment(1.0, 0.3, 4)], 1e-5,
                                   stages=["warmup", "taft", "head"])
    # The zero-step warm-up is dropped with its label; the composed event labels both of its segments.
    assert r.history == (Segment(2.0, 0.1, 5), Segment(3.0, 0.2, 7), Segment(1.0, 0.3, 4))
    assert r.stages == ("taft", "taft", "head")


def test_history_may_be_a_one_shot_iterator():
    r = PrivacyReport.from_history(iter(HISTORY), 1e-5, stages=("a", "b"))
    assert r.history == HISTORY and r.stages == ("a", "b")


@pytest.mark.parametrize("stages,message", [
    (("head",), r"one label per history segment .* 1 label\(s\) .* 2 segment\(s\)"),
    (("head", "taft", "extra"), "one label per history segment"),
    (("head", ""), "non-empty single-line string"),
    (("head", "line\nbreak"), "non-empty single-line string"),
    (("head", 3), "non-empty single-line string"),
    ("head", "not the string 'head'"),
])
def test_bad_stages_rejected(stages, message):
    with pytest.raises(ValueError, match=message):
        PrivacyReport.from_history(HISTORY, 1e-5, stages=stages)


def test_old_form_is_read():
    r = PrivacyReport.from_json(OLD_FORM)
    assert r.history == (Segment(1.795, 0.05, 60), Segment(0.9, 0.1, 7)) and r.stages == ()
    assert (r.epsilon, r.delta, r.method, r.dataset_size, r.target_epsilon) == (2.5, 1e-5, "pld", 1000, 3.0)
    assert r.epsilons == {"pld": 2.5, "rdp": math.inf} and r.epsilon_error == 0.01 and r.notes == "old run"
    assert r.versions["accounting"] == "0.0.9"  # the producer's versions, not this machine's
    new = json.loads(r.to_json())  # and it is rewritten in the new form
    assert new["format"] == "dp_taft.privacy_report/2" and new["epsilons"]["rdp"] == "inf"
    assert new["history"][0] == {"noise_multiplier": 1.795, "sample_rate": 0.05, "steps": 60}


def test_old_form_without_optional_fields():
    r = PrivacyReport.from_json('{"epsilon": 1.0, "delta": 1e-6, "method": "rdp", "epsilons": {"rdp": 1.0}, '
                                '"history": [[2.0, 0.01, 10]]}')
    assert r.versions == {} and r.dataset_size is None and r.sampling == "poisson" and r.steps == 10


def edited(**changes) -> str:
    d = make(stages=("head", "taft")).to_dict()
    d.update(changes)
    return json.dumps(d)


@pytest.mark.parametrize("text,message", [
    ("[1, 2]", "must be a JSON object, got list"),
    (edited(format="dp_taft.privacy_report/9"), "unsupported report format 'dp_taft.privacy_report/9'"),
    (edited(neighbouring="replace-one"), "neighbouring must be 'add/remove-one'"),
    (edited(sampling="shuffle"), "sampling must be 'poisson'"),
    (edited(epsilon="small"), "epsilon must be a number"),
    (edited(epsilon=-1.0), r"epsilon must be in \[0, inf\]"),
    (edited(epsilons={"gdp": 1.0}), "each key of epsilons must be one of"),
    (edited(delta=2.0), r"delta must be in \(0, 1\)"),
    (edited(extra=1), "unknown field.* extra"),
    (edited(history=[[1.0, 2.0, 3]]), r"history\[0\]: sample_rate must be in \(0, 1\]"),
    (edited(history=[{"noise_multiplier": 1.0, "steps": 3}]), r"history\[0\] must be"),
    (edited(history=[{"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 3, "stage": "a"},
                     {"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 3}]), "on every segment or on none"),
])
def test_malformed_json_rejected(text, message):
    with pytest.raises(ValueError, match=message):
        PrivacyReport.from_json(text)


def test_missing_field_named():
    d = make().to_dict()
    del d["history"], d["delta"]
    with pytest.raises(ValueError, match="lacks the required field.*delta, history"):
        PrivacyReport.from_dict(d)


def test_statement_says_what_is_covered():
    for r in (make(), PrivacyReport.from_json(make().to_json())):
        s = r.statement()
        assert "\n" not in s
        for phrase in ["adding or removing one example", "Poisson", "hyperparameter", "pretraining",
                       "single training example", f"{make().epsilon:.4g}", "1e-05", "50000", "group privacy",
                       "dataset size, which sets the sample rate", "treated as public"]:
            assert phrase in s
    assert "(epsilon=" in str(make())


def test_statement_requires_secret_randomness():
    s = PrivacyReport.from_json(make().to_json()).statement()
    assert "training randomness (the Gaussian noise and the batch sampling) was secret" in s
    assert "drawn from an unpredictable source" in s
    assert "a published or guessable seed voids the guarantee" in s


def test_statement_describes_each_stage():
    r = PrivacyReport.from_json(make(stages=("head", "taft")).to_json())
    s = r.statement()
    assert "in 2 stages on the same private data" in s
    head = "stage 'head': 1000 steps with Poisson sampling rate 0.01 and noise multiplier 1"
    taft = "then stage 'taft': 500 steps with Poisson sampling rate 0.02 and noise multiplier 1.5"
    assert head in s and taft in s and s.index(head) < s.index(taft)
    assert "all stages composed together" in s and "stages head, taft" in str(r)
    assert "stage '" not in make().statement()


def test_rdp_method_report():
    r = PrivacyReport.from_history(HISTORY, 1e-6, method="rdp")
    assert r.epsilon == r.epsilons["rdp"] and r.dataset_size is None and r.epsilon_error is None
    assert "RDP" in r.statement()
