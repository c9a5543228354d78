"""The command line: python -m accounting {epsilon,noise,verify} (verify: see test_accounting_verify.py)."""

import argparse
import json
import subprocess
import sys

import pytest

import accounting
from accounting.cli import _parser, main

RUN = ["--sample-rate", "0.01", "--steps", "100", "--delta", "1e-5"]


def test_epsilon(capsys):
    assert main(["epsilon", "--sample-rate", "0.001", "--noise-multiplier", "0.8", "--steps", "1000",
                 "--delta", "1e-5"]) == 0
    out = capsys.readouterr().out
    assert f"{accounting.epsilon(0.8, 0.001, 1000, 1e-5):.6g}" in out


def test_epsilon_all_methods(capsys):
    assert main(["epsilon", "--sample-rate", "0.01", "--noise-multiplier", "1", "--steps", "100", "--delta", "1e-5",
                 "--method", "all"]) == 0
    out = capsys.readouterr().out
    assert "PLD" in out and "RDP" in out


def test_noise_json_puts_the_answer_on_top(capsys):
    assert main(["noise", "--epsilon", "2", "--delta", "1e-5", "--sample-rate", "0.01", "--steps", "1000",
                 "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    sigma = answer["noise_multiplier"]
    assert 2 * 0.995 <= accounting.epsilon(sigma, 0.01, 1000, 1e-5) <= 2  # the answer does what it claims
    assert (answer["sample_rate"], answer["steps"], answer["delta"], answer["method"]) == (0.01, 1000, 1e-5, "pld")
    assert answer["target_epsilon"] == 2 and answer["epsilon"] == accounting.epsilon(sigma, 0.01, 1000, 1e-5)
    report = accounting.PrivacyReport.from_dict(answer["report"])
    assert report.history == (accounting.Segment(sigma, 0.01, 1000),) and report.target_epsilon == 2


def test_epsilon_json_puts_the_answer_on_top(capsys):
    assert main(["epsilon", "--noise-multiplier", "1.1", *RUN, "--method", "rdp", "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["epsilon"] == accounting.epsilon(1.1, 0.01, 100, 1e-5, "rdp") and answer["method"] == "rdp"
    assert answer["epsilons"]["pld"] == accounting.epsilon(1.1, 0.01, 100, 1e-5, "pld")
    assert answer["noise_multiplier"] == 1.1 and answer["target_epsilon"] is None
    assert answer["report"]["format"] == "dp_taft.privacy_report/2"


def test_bad_input_is_an_error_not_a_traceback(capsys):
    assert main(["epsilon", "--sample-rate", "1.5", "--noise-multiplier", "1", "--steps", "10", "--delta", "1e-5"]) == 2
    assert "--sample-rate must be in (0, 1], got 1.5" in capsys.readouterr().err


# Python parameter names that must not leak into command-line errors.
PYTHON_NAMES = ("sample_rate", "noise_multiplier", "target_epsilon", "dataset_size", "max_noise_multiplier")


@pytest.mark.parametrize("argv,flag", [
    (["epsilon", "--noise-multiplier", "0", *RUN], "--noise-multiplier must be in (0, inf)"),
    (["epsilon", "--noise-multiplier", "-1", *RUN], "--noise-multiplier must be in (0, inf)"),
    (["epsilon", "--noise-multiplier", "nan", *RUN], "--noise-multiplier must be in (0, inf)"),
    (["epsilon", "--noise-multiplier", "1", *RUN[:-1], "1"], "--delta must be in (0, 1)"),
    (["epsilon", "--noise-multiplier", "1", *RUN[:-1], "0"], "--delta must be in (0, 1)"),
    (["noise", "--epsilon", "0", *RUN], "--epsilon must be in (0, inf)"),
    (["noise", "--epsilon", "inf", *RUN], "--epsilon must be in (0, inf)"),
    (["noise", "--epsilon", "0.01", "--sample-rate", "1", "--steps", "1000", "--delta", "1e-5"],
     "--epsilon 0.01 is unreachable"),
    (["noise", "--epsilon", "1", *RUN, "--dataset-size", "0"], "--dataset-size must be an integer >= 1"),
    (["epsilon", "--noise-multiplier", "1", "--sample-rate", "0.01", "--steps", "0", "--delta", "1e-5"],
     "--steps must be an integer >= 1"),
    (["noise", "--epsilon", "1", "--sample-rate", "0.01", "--steps", "-3", "--delta", "1e-5"],
     "--steps must be an integer >= 1"),
])
def test_errors_name_the_flags(capsys, argv, flag):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and flag in err
    assert not any(name in err for name in PYTHON_NAMES)


def test_delta_must_be_below_one_over_dataset_size(capsys):
    argv = ["epsilon", "--noise-multiplier", "1", "--sample-rate", "0.01", "--steps", "100", "--dataset-size", "5000"]
    assert main([*argv, "--delta", "2e-4"]) == 2
    err = capsys.readouterr().err
    assert "--delta" in err and "--dataset-size" in err and "1/5000" in err
    assert "--delta 2e-05" in err  # the suggestion, 1/(10 N)
    assert main([*argv, "--delta", "1e-5"]) == 0


def test_every_option_has_help_with_its_range():
    commands = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert set(commands) == {"epsilon", "noise", "verify"}
    for name, sub in commands.items():
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help and len(action.help) > 30, (name, action.dest)
            if action.type in (int, float):  # numbers say their range, e.g. "(0, 1]" or ">= 1"
                assert any(r in action.help for r in ("(0, 1]", "(0, 1)", "(0, inf)", "[0, inf)", ">= 1")), \
                    (name, action.dest, action.help)


def test_missing_option_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["epsilon", "--noise-multiplier", "1"])
    assert exit_.value.code == 2 and "--sample-rate" in capsys.readouterr().err


def test_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "accounting", "epsilon", "--sample-rate", "0.01", "--noise-multiplier",
                          "1.0", "--steps", "10", "--delta", "1e-5", "--method", "rdp"],
                         check=True, capture_output=True, text=True).stdout
    assert out.startswith("epsilon = ")


TINY_SIGMA = ["epsilon", "--noise-multiplier", "0.01", "--sample-rate", "0.01", "--steps", "100", "--delta", "1e-5"]


def test_tiny_noise_leaks_no_warning():
    run = subprocess.run([sys.executable, "-W", "error", "-m", "accounting", *TINY_SIGMA, "--method", "all"],
                         capture_output=True, text=True)
    assert run.returncode == 0 and run.stderr == ""


def test_tiny_noise_epsilon_matches_dp_accounting(capsys):
    """Per-step losses above ~709 (σ below ~0.027) once overflowed exp() and collapsed the
    loss distribution's tail: ε came out 7x too small. It must match the reference."""
    pytest.importorskip("dp_accounting")
    from dp_accounting.pld import privacy_loss_distribution

    assert main([*TINY_SIGMA, "--json"]) == 0
    ours = json.loads(capsys.readouterr().out)["epsilon"]
    pmf = privacy_loss_distribution.from_gaussian_mechanism(0.01, value_discretization_interval=1.0,
                                                            sampling_prob=0.01, use_connect_dots=True)
    theirs = pmf.self_compose(100).get_epsilon_for_delta(1e-5)  # about 35,000: ~7 inclusions of ~5,000 each
    assert abs(ours - theirs) <= 1e-3 * theirs
