"""End to end through the real ``dp-taft`` command line: a practitioner's PNG folders, a CSV
manifest and a .safetensors backbone in; model directories, predictions, evaluations, a
composed model and a removal out. Checked from outside: the reports with ``python -m
accounting verify``, predictions against the labels, the files' permissions."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import timm
import torch

import dp_taft as dp_taft_api
from dp_taft.cli import main as cli_main
from dp_taft.images import read_image
from experiments.practitioner import MODEL_KWARGS, Workspace, make_workspace

FAST = ["--set", "optim.epochs=2", "--set", "optim.batch_size=50", "--quiet"]


def dp_taft(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``python -m dp_taft ARGS`` in a fresh process, as a user would (1 torch thread)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "dp_taft", *map(str, args)], capture_output=True, text=True, env=env)
    if check and done.returncode != 0:
        raise AssertionError(f"dp-taft {' '.join(map(str, args))} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return done


def verify(report: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "accounting", "verify", str(report), "--method", "all"],
                          capture_output=True, text=True)


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    return make_workspace(tmp_path_factory.mktemp("practitioner"))


@pytest.fixture(scope="module")
def taft_dir(ws: Workspace) -> Path:
    out = ws.root / "taft"
    dp_taft("train", "--data", ws.train, "--eval-data", ws.eval, *ws.model_args(), "--epsilon", 8, *FAST,
            "--out", out)
    return out


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_train_writes_a_model_directory_that_describes_itself(taft_dir: Path, ws: Workspace) -> None:
    for name in ("delta.safetensors", "privacy_report.json", "model_card.md", "history.csv", "training.svg"):
        assert (taft_dir / name).is_file(), name
    report = json.loads((taft_dir / "privacy_report.json").read_text())
    assert report["epsilon"] <= 8.0 and report["dataset_size"] == 300
    assert report["delta"] < 1 / 300
    assert verify(taft_dir / "privacy_report.json").returncode == 0
    card = (taft_dir / "model_card.md").read_text()
    assert f"{report['epsilon']:.4g}" in card and "300" in card and "adding or removing one example" in card
    with open(taft_dir / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and not any("train_loss" in k for k in rows[0])
    # DIR is owner-only; the run's secret key and the cached features of the private images are gone
    assert _mode(taft_dir) == 0o700 and _mode(taft_dir / "train_record.json") == 0o600
    assert not list(taft_dir.rglob("checkpoint.pt")) and not (taft_dir / "cache").exists()
    assert list(taft_dir.rglob("ledger.jsonl"))


def test_predict_and_evaluate_agree_with_the_labels(taft_dir: Path, ws: Workspace) -> None:
    preds = ws.root / "preds.csv"
    dp_taft("predict", taft_dir, ws.eval, "--output", preds, "--top-k", 2)
    with open(preds) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 100 and set(rows[0]) == {"path", "label", "confidence", "label_2", "confidence_2"}
    right = sum(Path(r["path"]).parent.name == r["label"] for r in rows)
    assert right > 40, f"{right}/100 right: no better than chance (20)"
    assert all(float(r["confidence"]) >= float(r["confidence_2"]) for r in rows)
    done = dp_taft("evaluate", taft_dir, "--data", ws.eval, "--report-dir", ws.root / "evaluation")
    evaluation = json.loads((ws.root / "evaluation" / "evaluation.json").read_text())
    assert evaluation["accuracy"] == right / 100 and "accuracy" in done.stdout
    assert (ws.root / "evaluation" / "confusion_matrix.svg").read_text().startswith("<svg")
    # the reloaded model is exactly the trained one: its accuracy is the last epoch's, to the bit
    with open(taft_dir / "history.csv") as f:
        assert float(list(csv.DictReader(f))[-1]["eval_accuracy"]) == evaluation["accuracy"]


def test_a_delta_on_another_base_is_refused_naming_both_fingerprints(taft_dir: Path, ws: Workspace) -> None:
    done = dp_taft("predict", taft_dir, ws.eval, "--weights", ws.other_weights, check=False)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    trained = json.loads(safetensors.safe_open(str(taft_dir / "delta.safetensors"), "pt").metadata()["spec"])
    rebuilt = re.search(r"rebuilt ([0-9a-f]{64})", done.stderr)
    assert trained["fingerprint"] in done.stderr and rebuilt and rebuilt.group(1) != trained["fingerprint"]
    assert "--weights" in done.stderr


def test_rerunning_the_same_command_does_not_train_again(taft_dir: Path, ws: Workspace) -> None:
    before = (taft_dir / "delta.safetensors").read_bytes()
    done = dp_taft("train", "--data", ws.train, "--eval-data", ws.eval, *ws.model_args(), "--epsilon", 8, *FAST,
                   "--out", taft_dir)
    assert "nothing to do" in done.stdout and (taft_dir / "delta.safetensors").read_bytes() == before
    other = dp_taft("train", "--data", ws.train, *ws.model_args(), "--epsilon", 3, *FAST, "--out", taft_dir,
                    check=False)
    assert other.returncode == 2 and "another training run" in other.stderr and "epsilon" in other.stderr


@pytest.fixture(scope="module")
def shard_dir(ws: Workspace) -> Path:
    out = ws.root / "shards"
    dp_taft("train", "--data", ws.manifest, "--eval-data", ws.eval, *ws.model_args(), "--epsilon", 8,
            "--shards", 2, *FAST, "--out", out)
    return out


def test_shards_from_a_csv_then_forget(shard_dir: Path, ws: Workspace) -> None:
    report = json.loads((shard_dir / "privacy_report.json").read_text())
    assert report["epsilon"] <= 8.0 and verify(shard_dir / "privacy_report.json").returncode == 0
    assert report["delta"] == 1 / (10 * 200)  # from N, not from a shard's own size
    assert _mode(shard_dir / "shards") == 0o700 and not list(shard_dir.rglob("checkpoint.pt"))
    with open(ws.manifest) as f:
        first, second = [r["id"] for r in csv.DictReader(f)][:2]
    ids = ws.root / "forget.txt"
    ids.write_text(f"{first}\n{second}\n")
    model_before = (shard_dir / "delta.safetensors").read_bytes()
    done = dp_taft("forget", shard_dir, "--ids", ids)
    assert "removed 2 example(s)" in done.stdout and "retraining every shard" in done.stdout
    assert (shard_dir / "delta.safetensors").read_bytes() != model_before
    after = json.loads((shard_dir / "privacy_report.json").read_text())
    assert verify(shard_dir / "privacy_report.json").returncode == 0
    assert after["all_releases_epsilon"] >= after["epsilon"]
    card = (shard_dir / "model_card.md").read_text()
    assert "2 example(s) removed" in card and "198" in card  # 200 - 2 examples remain
    assert not (shard_dir / "cache").exists() and not list(shard_dir.rglob("checkpoint.pt"))
    # the models trained on the removed examples left the disk; only the ledgers of their rounds stay
    assert not [p for p in shard_dir.rglob("round_001/delta.pt") if (p.parent.parent / "round_002").exists()]
    unknown = ws.root / "unknown.txt"
    unknown.write_text("nobody\n")
    refused = dp_taft("forget", shard_dir, "--ids", unknown, check=False)
    assert refused.returncode == 2 and "nobody" in refused.stderr


def _logits(directory: Path, ws: Workspace) -> torch.Tensor:
    trained = dp_taft_api.load(directory, weights=ws.weights)  # the model file keeps only the name
    images = [trained.transform()(read_image(p)) for p in sorted(ws.eval.rglob("*.png"))[:16]]
    with torch.no_grad():
        return trained.model(torch.stack(images))


def test_compose_is_the_ensemble_and_composes_the_guarantees(taft_dir: Path, shard_dir: Path, ws: Workspace) -> None:
    members = [json.loads((d / "privacy_report.json").read_text()) for d in (taft_dir, shard_dir)]
    sequential, parallel = ws.root / "composed", ws.root / "composed_disjoint"
    dp_taft("compose", taft_dir, shard_dir, "--out", sequential)
    dp_taft("compose", taft_dir, shard_dir, "--disjoint", "--out", parallel)
    seq, par = (json.loads((d / "privacy_report.json").read_text()) for d in (sequential, parallel))
    assert seq["epsilon"] > max(m["epsilon"] for m in members)
    assert par["epsilon"] == pytest.approx(max(m["epsilon"] for m in members))
    assert verify(sequential / "privacy_report.json").returncode == 0
    assert verify(parallel / "privacy_report.json").returncode == 0
    assert "sequential" in (sequential / "model_card.md").read_text()
    assert "disjoint at the level of examples" not in (sequential / "model_card.md").read_text()
    assert "accuracy" in dp_taft("evaluate", sequential, "--data", ws.eval).stdout  # finds the weights itself
    assert "parallel" in (parallel / "model_card.md").read_text()
    # averaging the saved Δw is exactly the output ensemble of the saved models
    ensemble = (_logits(taft_dir, ws) + _logits(shard_dir, ws)) / 2
    torch.testing.assert_close(_logits(sequential, ws), ensemble, rtol=1e-5, atol=1e-5)


def test_compose_refuses_what_does_not_compose(taft_dir: Path, ws: Workspace) -> None:
    probe = ws.root / "probe"
    dp_taft("train", "--data", ws.train, *ws.model_args(), "--method", "probe", "--epsilon", 8, *FAST, "--out", probe)
    done = dp_taft("compose", taft_dir, probe, "--out", ws.root / "nope", check=False)
    assert done.returncode == 2 and "only tangent models" in done.stderr and "Traceback" not in done.stderr
    twice = dp_taft("compose", taft_dir, taft_dir, "--disjoint", "--out", ws.root / "nope", check=False)
    assert twice.returncode == 2 and "different model directories" in twice.stderr
    onto = dp_taft("compose", taft_dir, probe, "--out", probe, check=False)
    assert onto.returncode == 2 and "already holds a model" in onto.stderr


def test_an_interrupted_train_resumes_with_its_ledger_intact(ws: Workspace) -> None:
    out = ws.root / "interrupted"
    argv = ["train", "--data", ws.train, *ws.model_args(), "--epsilon", 4, "--set", "optim.epochs=30",
            "--set", "optim.batch_size=50", "--set", "run.checkpoint_every=2", "--quiet", "--out", out]
    proc = subprocess.Popen([sys.executable, "-m", "dp_taft", *map(str, argv)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    ledger = out / "checkpoints" / "ledger.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (ledger.exists() and len(ledger.read_text().splitlines()) >= 6):
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = ledger.read_text().splitlines()
    assert len(before) >= 6 and not (out / "delta.safetensors").exists()
    dp_taft(*argv)
    after = ledger.read_text().splitlines()
    assert after[:len(before)] == before  # the killed attempt's reservations are still counted
    report = json.loads((out / "privacy_report.json").read_text())
    assert report["epsilon"] <= 4.0 and verify(out / "privacy_report.json").returncode == 0
    assert sum(s["steps"] for s in report["history"]) >= 180  # every planned step, and those lost in the kill


ERRORS = {
    "corrupt image": "corrupt or unreadable image",
    "non-image file": "non-image file",
    "empty class": "holds no image",
    "unknown eval class": "zebra",
    "csv columns": "path",
    "csv missing path": "gone.png",
    "weights that do not fit": "unexpected",
    "unsupported model": "VisionTransformer",
    "delta too large": "delta",
    "too many blocks": "[0, 6]",
    "a seed": "secretly",
    "no such device": "not a torch device",
    "typo in --set": "did you mean 'epochs'",
}


def _bad_input(case: str, ws: Workspace, tmp: Path) -> list[str]:
    """The argv of ``dp-taft train`` with the bad input of ``case`` (files made under ``tmp``)."""
    data, evals, extra, model = shutil.copytree(ws.train, tmp / "train"), ws.eval, [], ws.model_args()
    first = sorted(data.rglob("*.png"))[0]
    if case == "corrupt image":
        first.write_bytes(first.read_bytes()[:60])
    elif case == "non-image file":
        (first.parent / "notes.txt").write_text("not an image")
    elif case == "empty class":
        (data / "zz_empty").mkdir()
    elif case == "unknown eval class":
        evals = shutil.copytree(ws.eval, tmp / "eval")
        shutil.copytree(evals / "bag", evals / "zebra")
    elif case in ("csv columns", "csv missing path"):
        data = tmp / "m.csv"
        header, row = ("file,label", "train/bag/x.png,bag") if case == "csv columns" else ("path,label", "gone.png,bag")
        data.write_text(f"{header}\n{row}\n")
    elif case == "weights that do not fit":
        model = ws.model_args()[:-1] + [json.dumps({**MODEL_KWARGS, "depth": 5})]
    elif case == "unsupported model":
        net = timm.create_model("resnet10t", num_classes=5, in_chans=1)
        safetensors.torch.save_file(net.state_dict(), str(tmp / "resnet.safetensors"))
        model = ["--model", "resnet10t", "--weights", str(tmp / "resnet.safetensors"),
                 "--model-kwargs", json.dumps({"in_chans": 1})]
    elif case == "delta too large":
        extra = ["--delta", "0.01"]
    elif case == "too many blocks":
        extra = ["--blocks", "7"]
    elif case == "a seed":
        extra = ["--set", "seed=1"]
    elif case == "no such device":
        extra = ["--device", "bogus"]
    elif case == "typo in --set":
        extra = ["--set", "optim.epochz=3"]
    return ["train", "--data", str(data), "--eval-data", str(evals), *model, "--epsilon", "8", *extra, *FAST,
            "--out", str(tmp / "out")]


@pytest.mark.parametrize("case", ERRORS)
def test_bad_input_gets_one_clear_message(case: str, ws: Workspace, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(_bad_input(case, ws, tmp_path)) == 2
    err = capsys.readouterr().err
    assert err.startswith("dp-taft train: error:") and ERRORS[case] in err and "Traceback" not in err
    assert not (tmp_path / "out" / "delta.safetensors").exists()


def test_a_refused_command_leaves_its_dir_usable(ws: Workspace, tmp_path: Path) -> None:
    argv = ["train", "--data", str(ws.train), *ws.model_args(), "--epsilon", "8", *FAST, "--out", str(tmp_path / "m")]
    assert cli_main([*argv, "--blocks", "7"]) == 2  # refused before any step: nothing spent
    assert cli_main(argv) == 0 and (tmp_path / "m" / "delta.safetensors").is_file()


def test_the_console_script_is_installed() -> None:
    script = Path(sys.executable).with_name("dp-taft")
    done = subprocess.run([str(script), "train", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "--epsilon" in done.stdout and "--shards" in done.stdout
