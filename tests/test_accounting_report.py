"""PrivacyReport: values, JSON round-trip and the human-readable statement."""

import json

import accounting
from accounting import PrivacyReport, Segment

HISTORY = (Segment(1.0, 0.01, 1000), Segment(1.5, 0.02, 500))


def make() -> PrivacyReport:
    return PrivacyReport.from_history(HISTORY, 1e-5, dataset_size=50000, max_grad_norm=1.0, target_epsilon=3.0,
                                      notes="unit test")


def test_values():
    r = make()
    assert r.method == "pld" and r.sampling == "poisson" and r.history == HISTORY
    assert r.epsilon == accounting.epsilon_of_history(HISTORY, 1e-5)
    assert set(r.epsilons) == {"pld", "rdp"} and r.epsilons["rdp"] >= r.epsilon
    assert {"accounting", "numpy", "scipy", "python"} <= set(r.versions)
    assert 0 <= r.epsilon_error < 0.05 * r.epsilon  # PLD discretisation error, reported


def test_json_round_trip():
    r = make()
    text = r.to_json()
    assert json.loads(text)["history"] == [[1.0, 0.01, 1000], [1.5, 0.02, 500]]
    assert PrivacyReport.from_json(text) == r


def test_statement_says_what_is_covered():
    s = make().statement()
    assert "\n" not in s
    for phrase in ["adding or removing one example", "Poisson", "hyperparameter", "pretraining", "single training example",
                   f"{make().epsilon:.4g}", "1e-05", "50000", "group privacy"]:
        assert phrase in s
    assert "(epsilon=" in str(make())


def test_rdp_method_report():
    r = PrivacyReport.from_history(HISTORY, 1e-6, method="rdp")
    assert r.epsilon == r.epsilons["rdp"] and r.dataset_size is None and r.epsilon_error is None
    assert "RDP" in r.statement()
