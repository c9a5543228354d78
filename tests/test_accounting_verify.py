"""Verifying a saved report: PrivacyReport.verify, ParallelReport.verify and ``python -m accounting verify``."""

import json
import subprocess
import sys

import pytest

from accounting import ParallelReport, PrivacyReport, Segment, report_from_dict
from accounting.cli import main

HISTORY = (Segment(2.0, 0.05, 60), Segment(1.2, 0.05, 200))


@pytest.fixture(scope="module")
def report() -> PrivacyReport:
    return PrivacyReport.from_history(HISTORY, 1e-5, dataset_size=10000, target_epsilon=5.0, stages=("head", "taft"))


def write(tmp_path, data, name="report.json") -> str:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


def verify(path, *flags) -> int:
    return main(["verify", path, *flags])


def test_genuine_report_verifies(tmp_path, report, capsys):
    assert verify(write(tmp_path, report.to_json())) == 0
    out = capsys.readouterr().out
    assert "OK: every stated epsilon holds" in out and "DOES NOT HOLD" not in out


def test_genuine_report_verifies_with_every_method(tmp_path, report, capsys):
    assert verify(write(tmp_path, report.to_json()), "--method", "all", "--json") == 0
    result = json.loads(capsys.readouterr().out)
    assert result["holds"] is True and result["delta"] == 1e-5
    assert {(c["field"], c["method"]) for c in result["checks"]} == {
        ("epsilon", "pld"), ("epsilons.pld", "pld"), ("target_epsilon", "pld"), ("epsilons.rdp", "rdp")}


def test_epsilon_edited_down_fails(tmp_path, report, capsys):
    d = report.to_dict()
    d["epsilon"] = round(report.epsilon * 0.9, 3)  # a tampered claim: 10% less privacy loss than spent
    assert verify(write(tmp_path, d)) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "exceeds epsilon" in out


def test_rdp_epsilon_edited_down_fails_when_checked(tmp_path, report, capsys):
    d = report.to_dict()
    d["epsilons"]["rdp"] = report.epsilons["pld"]  # plausible-looking but below what RDP gives
    path = write(tmp_path, d)
    assert verify(path) == 0  # the default checks only the report's own method
    assert verify(path, "--method", "rdp", "--json") == 1
    checks = json.loads(capsys.readouterr().out.splitlines()[-1])["checks"]
    assert checks == [{"field": "epsilons.rdp", "method": "rdp", "stated": report.epsilons["pld"],
                       "recomputed": report.epsilons["rdp"], "holds": False}]


def test_history_edited_fails(tmp_path, report):
    d = report.to_dict()
    d["history"][1]["steps"] *= 2  # more steps than the stated epsilon covers
    assert verify(write(tmp_path, d)) == 1


def test_overspent_budget_fails(tmp_path, capsys):
    over = PrivacyReport.from_history(HISTORY, 1e-5, target_epsilon=1.0)
    assert over.epsilon > 1.0  # the premise: this history spends more than the target
    assert verify(write(tmp_path, over.to_json())) == 1
    assert "exceeds target_epsilon" in capsys.readouterr().out


def test_tolerance_admits_round_off(tmp_path, report):
    d = report.to_dict()
    d["epsilon"] = report.epsilon * (1 - 1e-6)
    path = write(tmp_path, d)
    assert verify(path) == 1
    assert verify(path, "--tolerance", "1e-5") == 0


def test_old_form_report_verifies(tmp_path, report):
    d = report.to_dict()
    old = {k: v for k, v in d.items() if k not in ("format", "neighbouring")}
    old["history"] = [[s.noise_multiplier, s.sample_rate, s.steps] for s in report.history]
    assert verify(write(tmp_path, old)) == 0
    old["epsilon"] = report.epsilon / 2
    assert verify(write(tmp_path, old)) == 1


def test_cli_json_output_verifies(tmp_path, capsys):
    assert main(["noise", "--epsilon", "3", "--delta", "1e-5", "--sample-rate", "0.02", "--steps", "300",
                 "--json"]) == 0
    path = write(tmp_path, capsys.readouterr().out)
    assert verify(path) == 0


@pytest.mark.parametrize("content,message", [
    (None, "cannot read REPORT.json"),
    ("{not json", "is not valid JSON"),
    ('{"epsilon": 1.0}', "lacks the required field"),
    ('{"epsilon": 1.0, "delta": 1e-5, "method": "pld", "epsilons": {}, "history": [[0, 0.1, 3]]}',
     "history[0]: noise_multiplier must be in (0, inf)"),
])
def test_bad_input_exits_2(tmp_path, capsys, content, message):
    path = str(tmp_path / "missing.json") if content is None else write(tmp_path, content)
    assert verify(path) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_bad_flags_exit_2(tmp_path, capsys):
    rdp_only = PrivacyReport.from_json('{"epsilon": 1.0, "delta": 1e-5, "method": "rdp", "epsilons": {}, '
                                       '"history": [[2.0, 0.1, 3]]}')
    path = write(tmp_path, rdp_only.to_json())
    assert verify(path, "--method", "pld") == 2
    assert "--method pld: the report states no PLD epsilon; use --method rdp" in capsys.readouterr().err
    assert verify(path, "--tolerance", "-1") == 2
    assert "--tolerance must be in [0, inf)" in capsys.readouterr().err


def test_library_verify(report):
    checks = report.verify()
    assert [c.field for c in checks] == ["epsilon", "epsilons.pld", "target_epsilon"]
    assert all(c.holds and c.method == "pld" for c in checks)
    with pytest.raises(ValueError, match="states no epsilon by method 'gdp'"):
        report.verify(["gdp"])
    with pytest.raises(ValueError, match="tolerance"):
        report.verify(tolerance=-0.1)


# ---- parallel reports (accounting.ParallelReport): models trained on disjoint data


@pytest.fixture(scope="module")
def parallel() -> ParallelReport:
    other = PrivacyReport.from_history((Segment(1.0, 0.04, 300),), 1e-6, dataset_size=8000)
    return ParallelReport((PrivacyReport.from_history(HISTORY, 1e-5, dataset_size=10000), other), notes="two shards")


def verify_in_a_new_process(path: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "accounting", "verify", path], capture_output=True, text=True)


def test_parallel_report_verifies_as_the_largest_member(tmp_path, parallel):
    members = parallel.members
    assert (parallel.epsilon, parallel.delta) == (max(m.epsilon for m in members), 1e-5)  # (max ε_i, max δ_i)
    assert ParallelReport.from_json(parallel.to_json()) == parallel
    run = verify_in_a_new_process(write(tmp_path, parallel.to_json()))
    assert run.returncode == 0, run.stdout + run.stderr
    assert "members[1].epsilon" in run.stdout and "OK: every stated epsilon holds" in run.stdout
    statement = parallel.statement()
    for phrase in ("parallel composition (McSherry 2009, Thm 4)", "disjoint at the level of examples",
                   "A person whose examples lie in several members is not covered", "Notes: two shards"):
        assert phrase in statement


@pytest.mark.parametrize("field", ["epsilon", "delta"])
def test_parallel_report_claiming_less_than_a_member_fails(tmp_path, parallel, field):
    d = parallel.to_dict()
    d[field] = getattr(parallel.members[0], field) * 0.9  # below the first member's
    run = verify_in_a_new_process(write(tmp_path, d))
    assert run.returncode == 1, run.stdout + run.stderr
    assert f"exceeds {field}" in run.stdout


def test_parallel_report_with_a_tampered_member_fails(tmp_path, parallel):
    d = parallel.to_dict()
    d["members"][1]["epsilon"] *= 0.5
    assert verify(write(tmp_path, d), "--json") == 1


def test_nested_parallel_report_and_extra_fields(tmp_path, parallel, capsys):
    nested = ParallelReport((parallel, parallel.members[1]))
    d = {**nested.to_dict(), "statement": "as a shard set writes it", "rounds": [1, 1]}
    assert report_from_dict(d) == nested
    assert verify(write(tmp_path, d), "--method", "all", "--json") == 0
    result = json.loads(capsys.readouterr().out)
    assert result["not_checked"] == ["rounds", "statement"]
    assert {c["field"] for c in result["checks"]} >= {"members[0].members[1].epsilons.rdp", "members[0].delta"}


def test_shard_set_report_after_a_removal_states_every_release(tmp_path, capsys):
    """After a removal retrained shard 0 (fresh noise, one example fewer), a shard set's JSON
    states the guarantee of releasing the models from before and after it: its top-level epsilon
    is all_releases_epsilon, above the current models'. verify recomputes its members (the
    replaced round included) and passes; read back and composed with a later model, it still
    pays for the replaced round."""
    from dp_taft.compose import compose_reports
    from dp_taft.shard_report import ShardPrivacyReport

    first = PrivacyReport.from_history(HISTORY, 1e-5, dataset_size=10000, target_epsilon=5.0)
    retrained = PrivacyReport.from_history(HISTORY, 1e-5, dataset_size=9999, target_epsilon=5.0)
    untouched = PrivacyReport.from_history((Segment(1.5, 0.04, 300),), 1e-5, dataset_size=8000)
    shards = ShardPrivacyReport.of([[first, retrained], [untouched]], key_drawn=True)
    d = json.loads(shards.to_json())
    current = max(retrained.epsilon, untouched.epsilon)
    assert d["epsilon"] == d["all_releases_epsilon"] == shards.epsilon > d["current_models_epsilon"] == current
    assert d["epsilon"] == max(m["epsilon"] for m in d["members"]) and d["delta"] == 1e-5
    first_sentence = d["statement"].split("). ")[0]
    assert f"({shards.epsilon:.4g}, 1e-05)-DP" in first_sentence and f"{current:.4g}" not in first_sentence
    assert f"({current:.4g}, 1e-05)-DP (current_models_epsilon)" in d["statement"]
    assert verify(write(tmp_path, d), "--method", "all") == 0
    out = capsys.readouterr().out
    assert "OK: every stated epsilon holds" in out and "not checked" in out
    read_back = report_from_dict(d)
    assert isinstance(read_back, ParallelReport) and read_back == shards.as_parallel()
    later = PrivacyReport.from_history((Segment(1.5, 0.01, 100),), 1e-5)
    composed = compose_reports([read_back, later])
    assert composed.epsilon >= shards.all_releases_epsilon
    assert composed.epsilon > compose_reports([ParallelReport(shards.per_shard), later]).epsilon  # the replaced round


@pytest.mark.parametrize("change,message", [
    ({"members": []}, "members must be a non-empty list"),
    ({"members": [{"epsilon": 1.0}]}, "members[0]: the report lacks the required field"),
    ({"neighbouring": "replace-one"}, "neighbouring must be"),
])
def test_bad_parallel_report_exits_2(tmp_path, parallel, capsys, change, message):
    assert verify(write(tmp_path, {**parallel.to_dict(), **change})) == 2
    assert message in capsys.readouterr().err
