"""Model directories (dp_taft.model_dir): files, card, history, plots, and loading for prediction."""

from __future__ import annotations

import csv
import json
import os
import stat
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import accounting
import pytest
import timm.data
import torch
from PIL import Image
from test_model_file import CLASSES, DATA_CONFIG, backbone_spec, batch, spec_of, trained_model, write_weights

import dp_taft
from dp_taft import model_dir
from dp_taft.model_card import model_card
from dp_taft.model_file import MODEL_FILE
from dp_taft.plots import confusion_svg, line_chart_svg, stack_svg
from dp_taft.train import EpochRecord

SVG = "{http://www.w3.org/2000/svg}"
# Distinctive training losses: none may appear in any shareable file.
TRAIN_LOSSES = (0.7182818284, 0.5772156649)


def make_report(n: int = 200) -> accounting.PrivacyReport:
    return accounting.PrivacyReport.from_history([accounting.Segment(1.3, 0.05, 80)], 1e-5, dataset_size=n,
                                                 max_grad_norm=1.0)


def make_history() -> list[EpochRecord]:
    return [EpochRecord(epoch=1, train_loss=TRAIN_LOSSES[0], eval_loss=0.9, eval_accuracy=0.61, epsilon_spent=1.25,
                        steps=20, wall_time_s=3.5),
            EpochRecord(epoch=2, train_loss=TRAIN_LOSSES[1], eval_loss=0.8, eval_accuracy=0.7903, epsilon_spent=2.0,
                        steps=40, wall_time_s=3.25)]


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return write_weights(tmp_path_factory.mktemp("weights") / "vit_pretrained.safetensors", seed=0)


@pytest.fixture
def saved(weights, tmp_path):
    """A TAFT model directory with a report, a history and an eval accuracy."""
    backbone = backbone_spec(weights)
    model = trained_model("taft", backbone)
    out = model_dir.save(tmp_path / "model", model, spec_of("taft", backbone, composition="sequential of 2 models"),
                         report=make_report(), history=make_history(), eval_accuracy=0.7903, train_size=200,
                         notes=["trained for the issue-17 test"])
    return out, model


def test_directory_holds_the_shareable_files_owner_only(saved):
    out, _ = saved
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [MODEL_FILE, "privacy_report.json", "model_card.md", "history.csv", "training.svg"])
    assert stat.S_IMODE(out.stat().st_mode) == 0o700


def test_load_predicts_the_trained_model_with_its_report(saved):
    out, model = saved
    torch.manual_seed(4321)
    trained = model_dir.load(out)
    x = batch()
    with torch.no_grad():
        expected = torch.softmax(model(x), dim=-1)
    probabilities = trained.predict(x)
    assert torch.equal(probabilities, expected)
    assert torch.allclose(probabilities.sum(dim=1), torch.ones(len(x)))
    report = make_report()
    assert trained.report_json == json.loads(report.to_json())
    assert accounting.PrivacyReport.from_dict(trained.report_json).epsilon == report.epsilon
    assert trained.spec.classes == CLASSES
    with pytest.raises(ValueError, match=r"\(3, 28, 28\)"):
        trained.predict(torch.zeros(2, 3, 28, 28))
    with pytest.raises(ValueError, match="B, C, H, W"):
        trained.predict(torch.zeros(1, 28, 28))


def test_transform_is_the_models_eval_pipeline(saved):
    trained = model_dir.load(saved[0])
    image = Image.fromarray((torch.arange(40 * 40) % 251).to(torch.uint8).reshape(40, 40).numpy(), mode="L")
    reference = timm.data.create_transform(**DATA_CONFIG, is_training=False)(image)
    got = trained.transform()(image.convert("RGB"))  # converted back to the model's single channel
    assert got.shape == (1, 28, 28) and torch.equal(got, reference)


def test_the_written_report_verifies(saved):
    done = subprocess.run([sys.executable, "-m", "accounting", "verify", str(saved[0] / "privacy_report.json")],
                          cwd=Path(__file__).parents[1], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_card_states_the_facts_it_was_given(saved, weights):
    out, _ = saved
    card = (out / "model_card.md").read_text()
    report = make_report()
    assert report.statement() in card
    for fact in (f"ε = {report.epsilon:.4g}", f"δ = {report.delta:.3g}", "200 training examples", "79.03 %",
                 "python -m accounting verify privacy_report.json", "vit_tiny_patch16_224", weights.name,
                 model_dir.load(out).spec.fingerprint, "`cat`, `dog`, `owl`", "sequential of 2 models",
                 "trained for the issue-17 test", "not protected", "dp-taft predict DIR IMAGES", "dp_taft.load"):
        assert fact in card, fact
    assert str(weights.parent) not in card  # the weights file's name, not where it lives


def test_card_numbers_follow_the_arguments(weights):
    backbone = backbone_spec(weights)
    spec = spec_of("nlft", backbone, fingerprint="ab" * 32, version="9.9")
    report = accounting.PrivacyReport.from_history([accounting.Segment(0.9, 0.2, 300)], 3e-6, dataset_size=1234)
    card = model_card(spec, report, eval_accuracy=0.125, train_size=1234, notes=())
    for fact in (f"ε = {report.epsilon:.4g}", "δ = 3e-06", "1234 training examples", "12.50 %", "NLFT-1", "9.9"):
        assert fact in card, fact
    assert "Notes" not in card and "Composition" not in card
    private = model_card(spec, None, eval_accuracy=None, train_size=None)
    assert "WITHOUT differential privacy" in private and "ε =" not in private and "No evaluation set" in private


def test_history_csv_has_no_training_loss(saved):
    out, _ = saved
    with open(out / "history.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["epoch", "steps", "epsilon_spent", "eval_loss", "eval_accuracy", "wall_time_s"]
    assert rows[1:] == [["1", "20", "1.25", "0.9", "0.61", "3.5"], ["2", "40", "2.0", "0.8", "0.7903", "3.25"]]
    for path in out.iterdir():
        if path.name != MODEL_FILE:
            text = path.read_text()
            assert "train_loss" not in text and not any(str(loss) in text for loss in TRAIN_LOSSES), path.name


def test_training_plot_is_svg_with_accuracy_and_epsilon(saved):
    root = ET.parse(saved[0] / "training.svg").getroot()
    assert root.tag == f"{SVG}svg"
    charts = root.findall(f"{SVG}svg")
    assert len(charts) == 2
    texts = ["".join(t.itertext()) for t in root.iter(f"{SVG}text")]
    assert "eval accuracy" in texts and "ε spent" in texts
    # Two epochs: one line of two markers per chart.
    assert [len(c.findall(f"{SVG}circle")) for c in charts] == [2, 2]


def test_non_private_model_has_no_report_and_a_stale_one_is_removed(saved, weights):
    out, model = saved
    backbone = backbone_spec(weights)
    history = [EpochRecord(1, 0.5, None, None, None, 10, 1.0)]
    model_dir.save(out, model, spec_of("taft", backbone), history=history, train_size=200)
    assert not (out / "privacy_report.json").exists()
    assert "WITHOUT differential privacy" in (out / "model_card.md").read_text()
    assert model_dir.load(out).report_json is None
    root = ET.parse(out / "training.svg").getroot()
    assert "no data" in ["".join(t.itertext()) for t in root.iter(f"{SVG}text")]


def test_bad_arguments_are_refused(weights, tmp_path):
    backbone = backbone_spec(weights)
    model = trained_model("probe", backbone)
    spec = spec_of("probe", backbone)
    with pytest.raises(ValueError, match="fraction, not a percentage"):
        model_dir.save(tmp_path, model, spec, eval_accuracy=79.0)
    with pytest.raises(ValueError, match="dataset_size=200"):
        model_dir.save(tmp_path, model, spec, report=make_report(200), train_size=199)
    with pytest.raises(ValueError, match="sequence of lines"):
        model_dir.save(tmp_path, model, spec, notes="one line")
    assert not os.listdir(tmp_path)
    (tmp_path / "privacy_report.json").write_text("{")
    model_dir.save(tmp_path, model, spec)
    (tmp_path / "privacy_report.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        model_dir.load(tmp_path)


def test_confusion_matrix_svg():
    classes = ["a&b", "<c>", "d"]
    text = confusion_svg(torch.tensor([[5, 1, 0], [2, 7, 1], [0, 0, 9]]), classes, "Confusion on eval")
    root = ET.fromstring(text)
    texts = ["".join(t.itertext()) for t in root.iter(f"{SVG}text")]
    assert texts.count("a&b") == 2 and texts.count("<c>") == 2  # row and column labels, escaped in the file
    assert "Confusion on eval" in texts and "7" in texts and "9" in texts
    assert len(root.findall(f"{SVG}rect")) == 1 + 9  # background + one cell per pair
    with pytest.raises(ValueError, match="3 x 3"):
        confusion_svg([[1, 2], [3, 4]], classes, "t")
    with pytest.raises(ValueError, match=">= 0"):
        confusion_svg([[1, -2, 0], [0, 0, 0], [0, 0, 0]], classes, "t")


def test_line_chart_and_stack_svg():
    chart = line_chart_svg({"one": [(0, 1.0), (1, 3.0), (2, 2.0)], "single": [(1, 5.0)], "empty": []},
                           x_label="epoch", y_label="value", title="A & B")
    root = ET.fromstring(chart)
    assert len(root.findall(f"{SVG}polyline")) == 1 and len(root.findall(f"{SVG}circle")) == 4
    texts = ["".join(t.itertext()) for t in root.iter(f"{SVG}text")]
    assert {"A & B", "epoch", "value", "one", "single", "empty"} <= set(texts)
    with pytest.raises(ValueError, match="'one' has a non-finite point"):
        line_chart_svg({"one": [(0, float("nan"))]}, x_label="x", y_label="y", title="t")
    stacked = ET.fromstring(stack_svg([chart, chart]))
    assert stacked.attrib["height"] == str(2 * int(root.attrib["height"]))
    assert [c.attrib["y"] for c in stacked.findall(f"{SVG}svg")] == ["0", root.attrib["height"]]


def test_a_parallel_composition_report_is_written_and_stated(weights, tmp_path):
    backbone = backbone_spec(weights)
    members = (make_report(100), accounting.PrivacyReport.from_history([accounting.Segment(1.0, 0.05, 80)], 1e-5,
                                                                        dataset_size=100))
    report = accounting.ParallelReport(members)
    out = model_dir.save(tmp_path, trained_model("taft", backbone), spec_of("taft", backbone), report=report,
                         train_size=200)
    card = (out / "model_card.md").read_text()
    assert report.statement() in card and f"ε = {max(m.epsilon for m in members):.4g}" in card
    assert json.loads((out / "privacy_report.json").read_text())["format"] == "dp_taft.parallel_report/1"


def test_resave_of_a_composed_model_keeps_the_history_and_states_the_composition(saved, weights, tmp_path):
    out, model = saved
    backbone = backbone_spec(weights)
    first = model_dir.load(out)
    assert first.report.epsilon == make_report().epsilon  # the report as an object, to compose
    second = trained_model("taft", backbone, seed=3)  # same base (seed 3 makes the same head) ...
    with torch.no_grad():
        for p in second.deltas().values():
            p.mul_(-0.5)  # ... other Δw
    composed = dp_taft.compose([first.model, second])
    history_before = (out / "history.csv").read_text()
    model_dir.resave(out, composed, first.spec, report=make_report(), notes=["composed"],
                     composition="sequential composition of 2 models")
    assert (out / "history.csv").read_text() == history_before
    reloaded = model_dir.load(out)
    assert reloaded.spec.composition == "sequential composition of 2 models"
    assert "sequential composition of 2 models" in (out / "model_card.md").read_text()
    with torch.no_grad():
        assert torch.equal(reloaded.model(batch()), composed(batch()))
    fresh = model_dir.resave(tmp_path / "new", composed, first.spec)
    assert (fresh / "history.csv").read_text().splitlines() == [",".join(model_dir.HISTORY_COLUMNS)]
    assert model_dir.load(fresh).spec.composition == "sequential of 2 models"  # kept from the spec
