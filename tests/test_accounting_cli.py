"""The command line: python -m accounting {epsilon,noise}."""

import subprocess
import sys

import accounting
from accounting.cli import main


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


def test_noise_json(capsys):
    assert main(["noise", "--epsilon", "2", "--delta", "1e-5", "--sample-rate", "0.01", "--steps", "1000",
                 "--json"]) == 0
    report = accounting.PrivacyReport.from_json(capsys.readouterr().out)
    assert 2 * 0.995 <= report.epsilon <= 2 and report.target_epsilon == 2


def test_bad_input_is_an_error_not_a_traceback(capsys):
    assert main(["epsilon", "--sample-rate", "1.5", "--noise-multiplier", "1", "--steps", "10", "--delta", "1e-5"]) == 2
    assert "sample_rate must be in (0, 1]" in capsys.readouterr().err


def test_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "accounting", "epsilon", "--sample-rate", "0.01", "--noise-multiplier",
                          "1.0", "--steps", "10", "--delta", "1e-5", "--method", "rdp"],
                         check=True, capture_output=True, text=True).stdout
    assert out.startswith("epsilon = ")
