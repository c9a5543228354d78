"""Every privacy report published in docs/ re-checks with `python -m accounting verify`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPORTS = sorted((Path(__file__).resolve().parents[1] / "docs").glob("*/reports/*.json"))
SWEEP_REPORTS = [p for p in REPORTS if p.parent.parent.name == "sweep"]


def test_the_sweep_published_its_reports():
    assert len(SWEEP_REPORTS) >= 20  # 24 private runs in docs/sweep


@pytest.mark.parametrize("path", SWEEP_REPORTS, ids=lambda p: p.stem)
def test_published_report_verifies(path):
    run = subprocess.run([sys.executable, "-m", "accounting", "verify", str(path), "--method", "all"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
