"""A shard set kept in its out_dir and brought back in another process (dp_taft.shard_store, load_shards)."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import Subset, TensorDataset

import dp_taft
from accounting.cli import main as accounting_main
from dp_taft.shards import fit_shards, load_shards
from fit_cases import permission_modes
from test_shards import FIT, states_equal, tiny_task

N = 72
IDS = list(range(1000, 1000 + N))
KWARGS = dict(epsilon=2.0, delta=1e-3, **FIT)
REMOVED = [1005, 1040]  # two ids: at most two of the three shards are retrained, at least one is untouched

# Runs in a new Python process: reload the set from out_dir (with the data it is given) and forget.
RELAUNCH = """
import sys, torch
from torch.utils.data import TensorDataset
from dp_taft.shards import load_shards
out_dir, inputs, output, threads = sys.argv[1:]
torch.set_num_threads(int(threads))  # the same reductions as the process it is compared with
given = torch.load(inputs, weights_only=False)
shard_set = load_shards(out_dir, given["base"], TensorDataset(given["x"], given["y"]), ids=given["ids"],
                        **given["fit"])
result = shard_set.forget(given["forget"])
torch.save({"deltas": [m.delta_state_dict() for m in shard_set.models], "retrained": result.retrained_shards,
            "report": shard_set.report.to_json()}, output)
"""


def same_delta(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def copy_of(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> SimpleNamespace:
    """One seeded shard set in out_dir "a", a copy "b" of it made before any removal, ``REMOVED``
    forgotten in memory (into "a") and, from "b", in a new process whose data lacks the removed
    examples' files and lists the others in reverse order."""
    root = tmp_path_factory.mktemp("store")
    tangent, data = tiny_task(n=N)
    shard_set = fit_shards(tangent, data, 3, ids=IDS, seed=1, out_dir=root / "a", **KWARGS)
    before = [m.delta_state_dict() for m in shard_set.models]
    copy_of(root / "a", root / "b")
    keep = [p for p, i in enumerate(IDS) if i not in REMOVED][::-1]
    x, y = data.tensors
    torch.save({"base": tangent, "x": x[keep], "y": y[keep], "ids": [IDS[p] for p in keep], "fit": KWARGS,
                "forget": REMOVED}, root / "inputs.pt")
    relaunch = subprocess.run([sys.executable, "-c", RELAUNCH, str(root / "b"), str(root / "inputs.pt"),
                               str(root / "output.pt"), str(torch.get_num_threads())], capture_output=True, text=True)
    assert relaunch.returncode == 0, relaunch.stderr
    result = shard_set.forget(REMOVED)
    return SimpleNamespace(root=root, tangent=tangent, data=data, shard_set=shard_set, before=before, result=result,
                           other=torch.load(root / "output.pt", weights_only=False))


def test_forget_in_a_new_process_equals_forget_in_memory(run, capsys):
    shard_set, other = run.shard_set, run.other
    assert other["retrained"] == run.result.retrained_shards and run.result.retrained_shards
    for s, model in enumerate(shard_set.models):
        assert same_delta(other["deltas"][s], model.delta_state_dict())  # bit-identical
        untouched = s not in run.result.retrained_shards
        assert same_delta(other["deltas"][s], run.before[s]) == untouched
    report = json.loads(other["report"])
    assert report == json.loads(shard_set.report.to_json())
    # every release counted: a retrained shard's two rounds compose sequentially
    for s in run.result.retrained_shards:
        assert report["rounds"][s] == 2 and len(report["replaced"][s]) == 1
        assert report["all_releases_per_shard"][s] > report["per_shard"][s]["epsilon"]
    # what the report states up front covers every release; the current models' ε is named apart
    assert report["epsilon"] == report["all_releases_epsilon"] > report["current_models_epsilon"]
    assert report["current_models_epsilon"] == max(r["epsilon"] for r in report["per_shard"])
    assert [m["epsilon"] for m in report["members"]] == report["all_releases_per_shard"]
    path = run.root / "report.json"
    path.write_text(other["report"])
    assert accounting_main(["verify", str(path), "--method", "all"]) == 0  # a verifiable parallel report
    assert "not checked" in capsys.readouterr().out
    assert permission_modes(run.root / "b") == {"dirs": {0o700}, "files": {0o600}}


def test_reload_after_forget_gives_the_same_set(run):
    shard_set = run.shard_set
    again = load_shards(run.root / "a", run.tangent, run.data, ids=IDS, **KWARGS)
    assert all(states_equal(a, b) for a, b in zip(again.models, shard_set.models))
    assert again.rounds == shard_set.rounds and again.removed == frozenset(REMOVED)
    assert again.released == shard_set.released and again.train_times == shard_set.train_times
    assert (again.assignment, again.seed, again.key_drawn) == (shard_set.assignment, 1, True)
    assert states_equal(again.composed, shard_set.composed)


def test_interrupted_removal_is_discarded(run, tmp_path):
    """A removal that died before its record was written leaves a checkpoint of the next round and
    maybe a newer shard_XXX/delta.pt: the reload takes the recorded round's Δw, and the next
    removal trains that round again from scratch instead of resuming another removal's run."""
    out = copy_of(run.root / "a", tmp_path / "out")
    shard_set = run.shard_set
    s = 0
    r = shard_set.rounds[s]
    stale = out / f"shard_{s:03d}" / f"round_{r + 1:03d}"
    stale.mkdir()
    (stale / "checkpoint.pt").write_bytes(b"not a checkpoint")
    torch.save({k: v + 1 for k, v in shard_set.models[s].delta_state_dict().items()}, out / "shard_000" / "delta.pt")
    reloaded = load_shards(out, run.tangent, run.data, ids=IDS, **KWARGS)
    assert states_equal(reloaded.models[s], shard_set.models[s])
    victim = next(i for i, t in zip(IDS, reloaded.assignment.shards) if t == s and i not in reloaded.removed)
    assert reloaded.forget([victim]).retrained_shards == (s,)
    gone = reloaded.removed
    keep = [p for p, (i, t) in enumerate(zip(IDS, reloaded.assignment.shards)) if t == s and i not in gone]
    scratch = copy.deepcopy(reloaded.base)
    dp_taft.fit(scratch, Subset(run.data, keep), seed=reloaded.shard_seed(s, r + 1), **KWARGS)
    assert states_equal(reloaded.models[s], scratch)


def test_missing_example_refused_by_id_only_when_its_shard_is_retrained(run, tmp_path):
    out = copy_of(run.root / "a", tmp_path / "out")
    assignment, removed = run.shard_set.assignment, run.shard_set.removed
    in_shard = {s: [i for i, t in zip(IDS, assignment.shards) if t == s and i not in removed] for s in range(3)}
    lost, victim = in_shard[0][:2]  # example `lost` was deleted from the data without being forgotten
    data = Subset(run.data, [p for p, i in enumerate(IDS) if i != lost])
    ids = [i for i in IDS if i != lost]
    shard_set = load_shards(out, run.tangent, data, ids=ids, **KWARGS)
    record = (out / "shards.json").read_text()
    with pytest.raises(ValueError, match=rf"shard 0 must be retrained.*\b{lost}\b.*forget them too"):
        shard_set.forget([victim])
    assert shard_set.removed == removed and shard_set.rounds == run.shard_set.rounds  # nothing changed
    assert (out / "shards.json").read_text() == record
    assert shard_set.forget([in_shard[1][0]]).retrained_shards == (1,)  # shard 0 is not retrained: fine


def test_other_base_refused_naming_both_fingerprints(run):
    other, _ = tiny_task(n=N, seed=5)
    with pytest.raises(ValueError, match=re.escape(other.fingerprint()) + ".*" + re.escape(run.tangent.fingerprint())):
        load_shards(run.root / "a", other, run.data, ids=IDS, **KWARGS)


@pytest.mark.parametrize("change", [dict(epsilon=3.0), dict(delta=1e-4), dict(batch_size=8), dict(epochs=2),
                                    dict(max_grad_norm=0.5), dict(accountant="rdp"), dict(clipping="automatic"),
                                    dict(secure_mode=True), dict(delta=None)], ids=str)
def test_changed_privacy_options_refused(run, change):
    options = {k: v for k, v in {**KWARGS, **change}.items() if v is not None}
    name = next(iter(change))
    with pytest.raises(ValueError, match=rf"other privacy settings: {name}="):
        load_shards(run.root / "a", run.tangent, run.data, ids=IDS, **options)


def test_other_options_and_new_examples_accepted(run):
    x, y = run.data.tensors
    data = TensorDataset(torch.cat([x, x[:3] + 1]), torch.cat([y, y[:3]]))
    with pytest.warns(UserWarning, match="3 example.*never trained on"):
        shard_set = load_shards(run.root / "a", run.tangent, data, ids=IDS + [1, 2, 3], **{**KWARGS, "lr": 0.1})
    assert shard_set.fit_kwargs["lr"] == 0.1
    with pytest.raises(ValueError, match="one id per example"):
        load_shards(run.root / "a", run.tangent, data, ids=IDS, **KWARGS)


def test_no_shard_set_refused(tmp_path, run):
    with pytest.raises(ValueError, match="holds no trained shard set"):
        load_shards(tmp_path, run.tangent, run.data, ids=IDS, **KWARGS)
    with pytest.raises(ValueError, match="out_dir="):
        load_shards(run.root / "a", run.tangent, run.data, ids=IDS, seed=1, **KWARGS)
