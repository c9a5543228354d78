"""Bad input raises ValueError naming the argument and its valid range."""

import math
import subprocess
import sys

import pytest

import accounting

GOOD = dict(noise_multiplier=1.0, sample_rate=0.01, steps=100, delta=1e-5)
BAD = [
    ("sample_rate", 0.0, r"sample_rate must be in \(0, 1\]"),
    ("sample_rate", 1.5, r"sample_rate must be in \(0, 1\], got 1.5"),
    ("sample_rate", math.nan, "sample_rate"),
    ("noise_multiplier", 0.0, r"noise_multiplier must be in \(0, inf\)"),
    ("noise_multiplier", -1.0, "noise_multiplier"),
    ("noise_multiplier", math.inf, "noise_multiplier"),
    ("steps", -1, "steps must be a non-negative integer"),
    ("steps", 2.5, "steps must be a non-negative integer"),
    ("delta", 0.0, r"delta must be in \(0, 1\)"),
    ("delta", 1.0, "delta"),
    ("delta", math.nan, "delta"),
]


@pytest.mark.parametrize("method", ["pld", "rdp"])
@pytest.mark.parametrize("name,value,message", BAD)
def test_epsilon_rejects(name, value, message, method):
    with pytest.raises(ValueError, match=message):
        accounting.epsilon(**{**GOOD, name: value}, method=method)


@pytest.mark.parametrize("value", [0.0, -1.0, math.nan, math.inf])
def test_epsilon_arguments_rejected(value):
    with pytest.raises(ValueError, match="epsilon"):
        accounting.delta(1.0, 0.01, 100, value)
    with pytest.raises(ValueError, match="target_epsilon"):
        accounting.noise_multiplier(value, 1e-5, 0.01, 100)
    with pytest.raises(ValueError, match="target_epsilon"):
        accounting.max_steps(value, 1e-5, 1.0, 0.01)


def test_other_arguments_rejected():
    with pytest.raises(ValueError, match="method must be one of"):
        accounting.epsilon(1.0, 0.01, 10, 1e-5, method="gdp")
    with pytest.raises(ValueError, match="sample_rate"):
        accounting.Segment(1.0, 2.0, 1)
    with pytest.raises(ValueError, match="count"):
        accounting.SelfComposedEvent(accounting.GaussianEvent(1.0), -3)
    with pytest.raises(ValueError, match="noise_multiplier"):
        accounting.PrivacyAccountant().record(0.0, 0.1)
    with pytest.raises(ValueError, match="orders"):
        accounting.rdp.rdp_subsampled_gaussian(0.1, 1.0, [0.5, 2])
    with pytest.raises(ValueError, match="sampling"):
        accounting.PrivacyReport(1.0, 1e-5, "pld", {}, (), sampling="shuffle")


def test_import_does_not_pull_torch():
    code = "import sys, accounting; assert 'torch' not in sys.modules and 'opacus' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("changes,message", [
    (dict(epsilon=-0.5), r"epsilon must be in \[0, inf\], got -0.5"),
    (dict(epsilon=math.nan), "epsilon must be in"),
    (dict(epsilons={"pld": -1.0}), r"epsilons\['pld'\] must be in \[0, inf\]"),
    (dict(target_epsilon=0.0), r"target_epsilon must be in \(0, inf\)"),
    (dict(stages=("a",)), "one label per history segment"),
    (dict(notes=None), "notes must be a string"),
])
def test_report_fields_rejected(changes, message):
    fields = dict(epsilon=1.0, delta=1e-5, method="pld", epsilons={"pld": 1.0}, history=())
    with pytest.raises(ValueError, match=message):
        accounting.PrivacyReport(**{**fields, **changes})
