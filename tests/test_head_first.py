"""Two-stage TAFT (probe head, then tangent around it) under one budget."""

from __future__ import annotations

import os

import accounting
import pytest
import torch

from dp_taft.head_first import fit_head_first
from fit_cases import easy_dataset, permission_modes, tiny_vit, umask


def test_one_budget_covers_both_stages():
    data = easy_dataset(80)
    model = tiny_vit()
    head_before = model.head.weight.detach().clone()
    result = fit_head_first(model, 1, data, epsilon=2.0, delta=1e-3, head_epochs=1, epochs=2,
                            batch_size=20, lr=0.2, quiet=True)
    report = result.report
    assert 0.97 * 2.0 <= report.epsilon <= 2.0
    assert report.epsilon == pytest.approx(accounting.epsilon_of_history(report.history, 1e-3))
    assert report.steps == result.steps == 4 + 8  # the probe's 4 steps are in the ledger, then TAFT's 8
    # one segment per stage, labelled, even though both stages share (σ, q)
    assert [(label, s.steps) for label, s in zip(report.stages, report.history)] == [("head", 4), ("taft", 8)]
    assert "head" in report.statement() and "taft" in report.statement()
    # the tangent model is linearized around the trained head, not the original one
    tangent = result.model
    assert not torch.equal(tangent.head.weight0, head_before)
    assert torch.equal(model.head.weight, head_before)  # the input model is untouched


def test_non_private():
    result = fit_head_first(tiny_vit(), 1, easy_dataset(40), epsilon=None, head_epochs=1, epochs=1,
                            batch_size=20, lr=0.1, quiet=True)
    assert result.report is None and result.steps == 2 + 2


def test_accountant_keyword_splits_the_budget_too():
    """With accountant="rdp" both the split and the report use RDP (PLD would spend less ε)."""
    data = easy_dataset(80)
    result = fit_head_first(tiny_vit(), 1, data, epsilon=2.0, delta=1e-3, head_epochs=1, epochs=1,
                            batch_size=20, lr=0.2, quiet=True, accountant="rdp")
    report = result.report
    assert report.method == "rdp" and 0.97 * 2.0 <= report.epsilon <= 2.0
    head = report.history[0]
    rdp, pld = (accounting.noise_multiplier(2.0, 1e-3, 0.25, 8, method=m) for m in ("rdp", "pld"))
    assert abs(rdp / pld - 1) > 0.03  # the two splits are distinguishable
    assert head.noise_multiplier == pytest.approx(rdp, rel=0.01)  # calibration lands within its 0.5% of ε


def test_explicit_seed_gives_the_stages_independent_streams(monkeypatch):
    import dp_taft.head_first as hf

    seen = []
    real = hf.fit

    def spy(*args, **kwargs):
        seen.append(kwargs["seed"])
        return real(*args, **kwargs)

    monkeypatch.setattr(hf, "fit", spy)
    fit_head_first(tiny_vit(), 1, easy_dataset(40), epsilon=None, batch_size=20, lr=0.1, quiet=True, seed=5)
    fit_head_first(tiny_vit(), 1, easy_dataset(40), epsilon=None, batch_size=20, lr=0.1, quiet=True)
    assert seen[0] != seen[1] and None not in seen[:2] and seen[2:] == [None, None]


def test_checkpoint_dir_and_stage_dirs_are_owner_only(tmp_path):
    """An existing checkpoint_dir made 0777 ends 0700, like its head/ and taft/ stages and their files."""
    root = tmp_path / "ckpt"
    root.mkdir()
    os.chmod(root, 0o777)
    with umask(0o022):
        fit_head_first(tiny_vit(), 1, easy_dataset(40), epsilon=2.0, delta=1e-3, head_epochs=1, epochs=1,
                       batch_size=20, lr=0.1, quiet=True, checkpoint_dir=root)
    assert {p.name for p in root.iterdir()} == {"head", "taft"}
    assert permission_modes(root) == {"dirs": {0o700}, "files": {0o600}}
