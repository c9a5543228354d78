"""experiments.sweep and experiments.results: outputs, consistency, resume, failures, real-data path.

The end-to-end tests run the ``--smoke`` profile in process on the default task, with a
randomly initialised backbone passed as ``--checkpoint`` (so no pretraining is needed),
and the torchvision path on a synthetic Fashion-MNIST in torchvision's layout with a
tiny timm ViT loaded from a local weights file (no network).
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest
import torch

import accounting
from experiments import results as res
from experiments.plots import plot_curves
from dp_taft.privacy.checkpoint import discard_keys
from experiments import sweep, sweep_config, sweep_outputs

pytest.importorskip("matplotlib")


# --------------------------------------------------------------------------- results.py units
COLS = ("name", "x", "seed", "acc", "status")


def test_append_read_latest_and_torn_line(tmp_path):
    path = tmp_path / "r.csv"
    res.append_row(path, {"name": "a", "x": 1.0, "seed": 0, "acc": 0.5, "status": "ok"}, COLS)
    res.append_row(path, {"name": "a", "x": math.inf, "seed": 0, "acc": 0.7, "status": "ok"}, COLS)
    with open(path, "a") as f:
        f.write("b,2,0")  # a writer killed mid-row
    res.append_row(path, {"name": "a", "x": 1.0, "seed": 0, "acc": 0.6, "status": "ok"}, COLS)
    rows = res.read_rows(path)
    assert [r["acc"] for r in rows] == ["0.5", "0.7", "0.6"]
    assert rows[1]["x"] == "inf" and math.isinf(res.to_float(rows[1]["x"]))
    last = res.latest(rows, ("name", "x"))
    assert last[("a", "1")]["acc"] == "0.6" and len(last) == 2
    with pytest.raises(ValueError, match="columns"):
        res.append_row(path, {"name": "a"}, ("name", "other"))
    with pytest.raises(ValueError, match="not in the CSV schema"):
        res.append_row(path, {"bogus": 1}, COLS)


def test_markdown_table_and_plot_are_generic(tmp_path):
    rows = [
        {"name": g, "x": x, "seed": str(s), "acc": str(a), "status": "ok"}
        for g, x, s, a in [("A", "1", 0, 0.5), ("A", "1", 1, 0.7), ("A", "inf", 0, 0.9), ("B", "8", 0, 0.4)]
    ] + [{"name": "B", "x": "8", "seed": "1", "acc": "", "status": "failed"},
         {"name": "B", "x": "1", "seed": "0", "acc": "", "status": "failed"}]
    table = res.markdown_table(rows, row="name", col="x", value="acc", scale=100, expected_n=2, corner="m")
    lines = table.strip().splitlines()
    assert lines[0] == "| m | 1 | 8 | inf |"
    assert lines[2] == "| A | 60.0 ± 14.1 | — | 90.0 (n=1) |"
    assert lines[3] == "| B | failed | 40.0 (n=1, 1 failed) | — |"
    png = plot_curves(tmp_path / "p.png", rows, x="x", y="acc", group="name", scale=100, xlabel="x", ylabel="y")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    only_inf = [r for r in rows if r["x"] == "inf"]
    assert plot_curves(tmp_path / "q.png", only_inf, x="x", y="acc", group="name").stat().st_size > 0
    twice = rows + [{"name": "A", "x": "1.0", "seed": "2", "acc": "0.6", "status": "ok"}]
    with pytest.raises(ValueError, match="'1' and '1.0'"):
        plot_curves(tmp_path / "r.png", twice, x="x", y="acc", group="name")


# --------------------------------------------------------------------------- config
@pytest.mark.parametrize("profile", ["default", "quick", "smoke"])
def test_profiles_resolve(profile):
    s, hp, nonpriv = sweep_config.load_config(sweep_config.DEFAULT_CONFIG, profile)
    sweep_config.check_sweep(s)
    assert set(hp) == set(sweep_config.METHODS) == set(nonpriv)
    runs = sweep.plan_runs(s, hp, nonpriv)
    for r in runs:
        want = {**hp[r.method], **(nonpriv[r.method] if math.isinf(r.epsilon) else {})}
        assert dict(r.hparams) == want
    assert {r.method for r in runs} == set(sweep_config.METHODS)
    assert any(math.isinf(r.epsilon) for r in runs) and s["delta"] < 1 / s["private_train_size"]
    # a profile sets every run's scale: the tuned non-private settings (every key) do not outvote it
    prof = sweep_config.read_profiled(sweep_config.DEFAULT_CONFIG, ("sweep", "hparams", "nonprivate"), profile)[1]
    base, per = sweep_config.split_hparams(prof.get("hparams", {}), "profile")
    for r in runs:
        assert {**base, **per.get(r.method, {})}.items() <= dict(r.hparams).items(), r
    if profile == "default":
        assert sorted(s["epsilons"]) == [1, 3, 8, math.inf] and s["seeds"] == [0, 1] and s["blocks"] == [2]
        assert len(runs) == 32  # 4 methods x 4 epsilons x 2 seeds


def test_config_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[sweep]\nmethods=['fc']\n[hparams]\nlearning_rate=1\n[profiles.default]\n")
    with pytest.raises(ValueError, match="learning_rate"):
        sweep_config.load_config(bad, "default")
    with pytest.raises(ValueError, match="no profile"):
        sweep_config.load_config(sweep_config.DEFAULT_CONFIG, "nope")
    _, hp, nonpriv = sweep_config.load_config(sweep_config.DEFAULT_CONFIG, "default")
    sweep_config.apply_sets(hp, ["taft.lr=2.0", "epochs=7", "loss=square", "nonprivate.nlft.lr=0.25"], nonpriv)
    assert hp["taft"]["lr"] == 2.0 and hp["fc"]["lr"] != 2.0 and hp["nlft"]["epochs"] == 7
    assert hp["fc"]["loss"] == "square" and nonpriv["nlft"]["lr"] == 0.25 and hp["nlft"]["lr"] != 0.25
    # the command line outvotes the tuned non-private settings (which hold every key) for the runs it names
    assert nonpriv["nlft"]["epochs"] == 7 and nonpriv["fc"]["loss"] == "square" and nonpriv["fc"]["lr"] != 2.0
    assert nonpriv["taft"]["lr"] == 2.0
    with pytest.raises(ValueError, match="unknown hyperparameter"):
        sweep_config.apply_sets(hp, ["taft.lrr=1"])
    sweep_config.apply_sets(hp, ["taft.averaging=ema", "taft.lr_schedule=cosine", "taft.warmup=0.1"])  # fit's toolbox
    assert hp["taft"]["averaging"] == "ema" and hp["taft"]["warmup"] == 0.1 and "averaging" not in hp["nlft"]


# --------------------------------------------------------------------------- end to end
def _smoke(out: Path, backbone_file: Path, *extra: str) -> int:
    return sweep.main(["--smoke", "--checkpoint", str(backbone_file), "--out", str(out), "--no-progress", *extra])


@pytest.fixture(scope="module")
def smoke_out(tmp_path_factory, backbone_file) -> Path:
    out = tmp_path_factory.mktemp("sweep") / "smoke"
    assert _smoke(out, backbone_file) == 0
    return out


def test_smoke_outputs_exist_and_are_consistent(smoke_out):
    rows = res.read_rows(smoke_out / sweep_outputs.CSV_NAME)
    assert list(rows[0]) == list(sweep_outputs.COLUMNS)
    s, _, _ = sweep_config.load_config(sweep_config.DEFAULT_CONFIG, "smoke")
    assert len(rows) == len(sweep_config.METHODS) * len(s["epsilons"])
    assert {r["label"] for r in rows} == {"FC", "TAFT-2", "TAFT-2 (head first)", "NLFT-2"}
    for r in rows:
        assert r["status"] == "ok", r["error"]
        assert 0.0 <= float(r["accuracy"]) <= 1.0 and float(r["wall_time_s"]) > 0 and int(r["steps"]) == (8 if r["method"] == "taft_head" else 4)
        target = float(r["target_epsilon"])
        assert float(r["epsilon"]) <= target
        if math.isinf(target):
            assert r["report"] == "" and r["delta"] == "" and float(r["sigma"]) == 0
            continue
        assert float(r["delta"]) == 1e-5 and float(r["sigma"]) > 0
        report = accounting.PrivacyReport.from_json((smoke_out / r["report"]).read_text())
        assert report.epsilon == pytest.approx(float(r["epsilon"]), rel=1e-5) and report.epsilon <= target
        assert report.steps == int(r["steps"]) and report.delta == 1e-5
    summary = (smoke_out / sweep_outputs.SUMMARY_NAME).read_text()
    for needle in ("| method | ε = 1 | ∞ (non-private) |", "| FC |", "| TAFT-2 |", "| NLFT-2 |"):
        assert needle in summary
    assert (smoke_out / sweep_outputs.PLOT_NAME).read_bytes()[:4] == b"\x89PNG"
    details = json.loads((smoke_out / "runs" / "taft2_eps1_seed0.json").read_text())
    assert len(details["history"]) == 1
    # the noiseless training loss of the private data stays out of the shareable outputs
    assert all("train_loss" not in h for h in details["history"])
    # secret randomness by default, said plainly; the smoke profile is labelled as such
    assert {r["randomness"] for r in rows} == {"secret"}
    assert "secret, from the OS CSPRNG" in summary and "smoke-sized run" in summary


def test_reproducible_runs_repeat_and_are_labelled_seeded(tmp_path, backbone_file):
    outs = [tmp_path / "a", tmp_path / "b", tmp_path / "c"]
    for out, extra in zip(outs, (["--reproducible"], ["--reproducible"], [])):
        assert _smoke(out, backbone_file, "--methods", "fc", "--epsilons", "1", *extra) == 0
    acc = [res.read_rows(out / sweep_outputs.CSV_NAME)[0]["accuracy"] for out in outs]
    reports = [json.loads((out / "reports" / "fc_eps1_seed0.json").read_text()) for out in outs]
    assert acc[0] == acc[1]  # seeded: the same run twice
    assert res.read_rows(outs[0] / sweep_outputs.CSV_NAME)[0]["randomness"] == "seeded"
    assert "Training randomness was seeded" in (outs[0] / sweep_outputs.SUMMARY_NAME).read_text()
    assert reports[0]["epsilon"] == reports[2]["epsilon"]  # the privacy plan does not depend on the seed


def test_resume_skips_finished_runs_and_refuses_other_settings(smoke_out, backbone_file, monkeypatch):
    before = (smoke_out / sweep_outputs.CSV_NAME).read_text()

    def no_finetune(*a, **k):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(sweep, "finetune", no_finetune)
    assert _smoke(smoke_out, backbone_file) == 0
    assert (smoke_out / sweep_outputs.CSV_NAME).read_text() == before
    assert _smoke(smoke_out, backbone_file, "--set", "lr=0.1") == 2  # other settings: refuse to mix
    assert (smoke_out / sweep_outputs.CSV_NAME).read_text() == before
    (smoke_out / sweep_outputs.SUMMARY_NAME).unlink()
    assert sweep.main(["--report-only", "--out", str(smoke_out)]) == 0
    assert "| TAFT-2 |" in (smoke_out / sweep_outputs.SUMMARY_NAME).read_text()


def test_failed_run_is_recorded_and_sweep_goes_on(tmp_path, backbone_file, monkeypatch):
    real_finetune = sweep.finetune

    def flaky_finetune(backbone, train_set, config, **kw):
        if config.privacy.epsilon is not None:
            raise ValueError(f"target epsilon={config.privacy.epsilon} is unreachable (simulated)")
        return real_finetune(backbone, train_set, config, **kw)

    monkeypatch.setattr(sweep, "finetune", flaky_finetune)
    out = tmp_path / "flaky"
    assert _smoke(out, backbone_file, "--methods", "fc") == 0
    rows = {r["run_id"]: r for r in res.read_rows(out / sweep_outputs.CSV_NAME)}
    assert rows["fc_eps1_seed0"]["status"] == "failed" and "unreachable" in rows["fc_eps1_seed0"]["error"]
    assert rows["fc_epsinf_seed0"]["status"] == "ok"
    assert "failed" in (out / sweep_outputs.SUMMARY_NAME).read_text() and (out / sweep_outputs.PLOT_NAME).exists()
    # failed runs are finished for resume purposes unless --retry-failed
    monkeypatch.setattr(sweep, "finetune", real_finetune)
    assert _smoke(out, backbone_file, "--methods", "fc") == 0
    assert len(res.read_rows(out / sweep_outputs.CSV_NAME)) == 2
    assert _smoke(out, backbone_file, "--methods", "fc", "--retry-failed") == 0
    rows = res.read_rows(out / sweep_outputs.CSV_NAME)
    assert len(rows) == 3 and rows[-1]["run_id"] == "fc_eps1_seed0" and rows[-1]["status"] == "ok"
    assert float(rows[-1]["epsilon"]) <= 1.0
    assert "failed" not in (out / sweep_outputs.SUMMARY_NAME).read_text().split("Mean wall time")[0]


def test_delta_must_be_below_one_over_n(tmp_path, backbone_file):
    assert _smoke(tmp_path / "d", backbone_file, "--delta", "0.01") == 2


# --------------------------------------------------------------------------- torchvision + timm path
def _write_idx(path: Path, array: torch.Tensor) -> None:
    dims = array.shape
    header = struct.pack(">BBBB", 0, 0, 0x08, len(dims)) + b"".join(struct.pack(">I", d) for d in dims)
    path.write_bytes(header + array.to(torch.uint8).numpy().tobytes())


def test_real_dataset_path_with_local_files(tmp_path):
    timm = pytest.importorskip("timm")
    pytest.importorskip("torchvision")
    raw = tmp_path / "data" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 96), ("t10k", 48)):
        _write_idx(raw / f"{split}-images-idx3-ubyte", torch.randint(0, 256, (n, 28, 28), generator=g))
        _write_idx(raw / f"{split}-labels-idx1-ubyte", torch.arange(n) % 10)
    kwargs = {"img_size": 32, "depth": 2}
    weights = tmp_path / "vit_tiny.pt"
    torch.save(timm.create_model("vit_tiny_patch16_224", num_classes=10, **kwargs).state_dict(), weights)
    out = tmp_path / "out"
    argv = ["--dataset", "fashion-mnist", "--data-root", str(tmp_path / "data"), "--model", "vit_tiny_patch16_224",
            "--pretrained", "--checkpoint", str(weights), "--timm-kwargs", json.dumps(kwargs),
            "--methods", "fc", "taft", "--blocks", "1", "--epsilons", "8", "inf", "--seeds", "0",
            "--private-train-size", "64", "--test-size", "32", "--set", "epochs=1", "--set", "batch_size=32",
            "--out", str(out), "--no-progress"]
    assert sweep.main(argv) == 0
    rows = res.read_rows(out / sweep_outputs.CSV_NAME)
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows), [r["error"] for r in rows]
    assert {r["label"] for r in rows} == {"FC", "TAFT-1"}
    assert all(r["dataset"] == "fashion-mnist" and r["n_train"] == "64" and r["n_test"] == "32" for r in rows)
    assert all(float(r["epsilon"]) <= float(r["target_epsilon"]) for r in rows)


def test_missing_data_set_says_which_flags_to_pass(tmp_path, capsys):
    """Without the files, the error speaks the sweep's language: --data-root / --download, no Python call."""
    timm = pytest.importorskip("timm")
    kwargs = {"img_size": 32, "depth": 1}
    weights = tmp_path / "vit_tiny.pt"
    torch.save(timm.create_model("vit_tiny_patch16_224", num_classes=10, **kwargs).state_dict(), weights)
    argv = ["--dataset", "cifar10", "--data-root", str(tmp_path / "nowhere"), "--model", "vit_tiny_patch16_224",
            "--pretrained", "--checkpoint", str(weights), "--timm-kwargs", json.dumps(kwargs), "--out",
            str(tmp_path / "out"), "--no-progress"]
    assert sweep.main(argv) == 2
    err = capsys.readouterr().err
    assert "--data-root DIR" in err and "--download" in err and str(tmp_path / "nowhere") in err
    assert "()" not in err  # no Python call to make


def test_paired_differences_match_scipy_paired_t_interval():
    from scipy import stats

    a = [0.81, 0.84, 0.80, 0.86]
    b = [0.85, 0.83, 0.84, 0.88]
    rows = [{"label": g, "eps": "3", "seed": str(i), "acc": str(v), "status": "ok"}
            for g, vals in (("A", a), ("B", b)) for i, v in enumerate(vals)]
    rows += [{"label": "A", "eps": "3", "seed": "9", "acc": "0.9", "status": "ok"},  # unpaired: ignored
             {"label": "B", "eps": "8", "seed": "0", "acc": "", "status": "failed"}]
    diff = res.paired_differences(rows, "A", "B", group="label", by="eps", pair="seed", value="acc")
    assert set(diff) == {"3"}
    ref = stats.ttest_rel(a, b).confidence_interval(0.95)
    d = diff["3"]
    assert d.n == 4 and d.mean == pytest.approx(sum(x - y for x, y in zip(a, b)) / 4)
    assert (d.low, d.high) == pytest.approx((ref.low, ref.high))
    assert d.text(100) == f"{100 * d.mean:+.1f} [{100 * ref.low:+.1f}, {100 * ref.high:+.1f}] (n=4)"


def _encodings(key: int) -> list[bytes]:
    """How a 128-bit key can sit in a file: decimal text (JSON, logs) or pickled little-endian (torch.save)."""
    return [str(key).encode(), key.to_bytes(key.bit_length() // 8 + 1, "little", signed=True)]


def test_finished_sweep_leaves_no_file_holding_a_key(tmp_path, backbone_file, monkeypatch):
    """Head first trains two stages, each with its own checkpoint (and secret key): once the
    run has finished, no checkpoint and no file holding any of the keys is left in --out."""
    import dp_taft.privacy.loop as loop

    keys: list[int] = []
    draw = loop.secret_seed

    def recording() -> int:
        keys.append(draw())
        return keys[-1]

    monkeypatch.setattr(loop, "secret_seed", recording)
    out = tmp_path / "sweep"
    assert _smoke(out, backbone_file, "--methods", "taft_head", "fc", "--epsilons", "1") == 0
    assert len(keys) >= 3  # fc, and head first's two stages
    files = [p for p in out.rglob("*") if p.is_file()]
    assert not [p for p in files if p.name == "checkpoint.pt"]
    assert [p for p in files if p.name == "ledger.jsonl"]  # what was spent stays on record
    for path in files:
        data = path.read_bytes()
        assert not any(e in data for k in keys for e in _encodings(k)), path


def test_discard_keys_removes_every_stage_checkpoint_and_keeps_ledgers(tmp_path):
    """discard_keys removes every stage's checkpoint under a run's folder, nothing else."""
    run_dir = tmp_path / "checkpoints" / "taft_head2_eps1_seed0"
    for stage in ("head", "taft"):
        (run_dir / stage).mkdir(parents=True)
        (run_dir / stage / "checkpoint.pt").write_bytes(b"key")
        (run_dir / stage / "ledger.jsonl").write_text("{}\n")
    discard_keys(run_dir)
    assert sorted(p.name for p in run_dir.rglob("*") if p.is_file()) == ["ledger.jsonl", "ledger.jsonl"]
