"""A model directory that describes itself: the model, its guarantee, its card and its training curve.

:func:`save` writes, into an owner-only directory (the CLI keeps private files such as
checkpoints beside these)::

    delta.safetensors    the model (dp_taft.model_file: Δw or trained tensors, the w0 outside
                         the pretrained weights, and the spec with the base fingerprint)
    privacy_report.json  the guarantee, verifiable with `python -m accounting verify`
    model_card.md        what was trained, on how many examples, under which guarantee
    history.csv          per epoch: steps, ε spent, eval loss and accuracy, wall time
    training.svg         eval accuracy and ε spent per epoch

These five files are meant to be shared. None holds the training loss: it is a noiseless
statistic of the private data (see ``dp_taft.train.EpochRecord``). :func:`resave` rewrites
the model, report and card of a model derived from saved ones (composed, or with examples
removed) and keeps the training history. :func:`load` returns a :class:`TrainedModel` that
predicts with the model's own eval transform.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import accounting
import torch
import torch.nn as nn

from .backbone import eval_transform
from .model_card import model_card
from .model_file import MODEL_FILE, ModelSpec, load_model, save_model
from .plots import line_chart_svg, stack_svg
from .privacy.checkpoint import private_dir, write_private_text
from .privacy.validate import check_int, check_real

__all__ = ["save", "resave", "load", "TrainedModel", "history_csv", "training_svg", "MODEL_FILE", "REPORT_FILE",
           "CARD_FILE", "HISTORY_FILE", "PLOT_FILE", "HISTORY_COLUMNS"]

REPORT_FILE = "privacy_report.json"
CARD_FILE = "model_card.md"
HISTORY_FILE = "history.csv"
PLOT_FILE = "training.svg"
#: history.csv's columns, attributes of each history record (``dp_taft.train.EpochRecord``); never train_loss.
HISTORY_COLUMNS = ("epoch", "steps", "epsilon_spent", "eval_loss", "eval_accuracy", "wall_time_s")


@dataclasses.dataclass
class TrainedModel:
    """A model loaded from a model directory: ``model`` (eval mode, CPU), its ``spec`` and the
    privacy report as JSON data (``report_json``, None when trained without privacy)."""

    model: nn.Module
    spec: ModelSpec
    report_json: dict[str, Any] | None

    @property
    def report(self) -> accounting.PrivacyReport | accounting.ParallelReport | None:
        """The privacy report as an object (e.g. to compose it with others), or None."""
        return None if self.report_json is None else accounting.report_from_dict(self.report_json)

    def transform(self) -> Callable[[Any], torch.Tensor]:
        """The eval transform of the model (PIL image -> normalised tensor (C, H, W)): the
        resize, crop and mean/std the pretrained weights expect, from ``spec.data_config``."""
        return eval_transform(self.spec.data_config)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Class probabilities (B, classes), rows summing to 1, for transformed images (B, C, H, W).

        The images are moved to the model's device; columns follow ``spec.classes``.
        """
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.is_floating_point():
            raise ValueError(f"predict takes a float tensor of images (B, C, H, W), got "
                             f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}: "
                             "apply transform() to each image and stack them")
        expected = self.spec.data_config.get("input_size")
        if expected is not None and list(images.shape[1:]) != list(expected):
            raise ValueError(f"images are {tuple(images.shape[1:])} (C, H, W) but the model takes {tuple(expected)}: "
                             "apply transform() to each image")
        device = next(self.model.parameters()).device
        self.model.eval()
        return torch.softmax(self.model(images.to(device)), dim=-1)


def save(out_dir: str | Path, model: nn.Module, spec: ModelSpec, *, report: Any | None = None,
         history: Sequence[Any] = (), eval_accuracy: float | None = None, train_size: int | None = None,
         notes: Sequence[str] = ()) -> Path:
    """Write a model directory (see the module docstring) and return its path.

    Args:
        out_dir: the directory, created (or made) owner-only, 0700.
        model: the trained method module (TangentViT, NLFTViT or LinearProbe).
        spec: its :class:`~dp_taft.model_file.ModelSpec` (fingerprint and version filled in here).
        report: the privacy report: an object with ``to_json()``, ``statement()``, ``epsilon``
            and ``delta`` (``accounting.PrivacyReport`` or a parallel-composition report);
            None for a model trained without privacy (the card says so, and a report left by
            an earlier save in ``out_dir`` is removed).
        history: per-epoch records with the attributes :data:`HISTORY_COLUMNS`
            (``FitResult.history``); may be empty.
        eval_accuracy: accuracy in [0, 1] on the user's eval set, or None.
        train_size: N, the number of training examples (>= 1), or None; must equal the
            report's ``dataset_size`` when that is stated.
        notes: extra lines for the card.

    Raises:
        ValueError: inconsistent arguments (see :func:`dp_taft.model_file.save_model` too).
    """
    return _write(out_dir, model, spec, report, history, eval_accuracy, train_size, notes)


def resave(out_dir: str | Path, model: nn.Module, spec: ModelSpec, *, report: Any | None = None,
           eval_accuracy: float | None = None, train_size: int | None = None, notes: Sequence[str] = (),
           composition: str | None = None) -> Path:
    """Write a model derived from saved ones (composed, or retrained to forget examples) to ``out_dir``.

    As :func:`save` with ``spec`` taken from a loaded model (:attr:`TrainedModel.spec`; its
    fingerprint must be the new model's, as for an average of tangent models of one base), and
    ``composition`` (when not None) replacing the spec's. No per-epoch history is written: the
    history files already in ``out_dir`` (the original run's) are kept, and a new directory gets
    empty ones.
    """
    if composition is not None:
        spec = dataclasses.replace(spec, composition=composition)
    return _write(out_dir, model, spec, report, None, eval_accuracy, train_size, notes)


def _write(out_dir: str | Path, model: nn.Module, spec: ModelSpec, report: Any | None,
           history: Sequence[Any] | None, eval_accuracy: float | None, train_size: int | None,
           notes: Sequence[str]) -> Path:
    """:func:`save`; ``history`` None keeps the history files in ``out_dir`` (empty ones if absent)."""
    if eval_accuracy is not None:
        eval_accuracy = check_real("eval_accuracy", eval_accuracy, "accuracy in [0, 1]", low_open=False)
        if eval_accuracy > 1:
            raise ValueError(f"eval_accuracy must be in [0, 1] (a fraction, not a percentage), got {eval_accuracy}")
    if train_size is not None:
        train_size = check_int("train_size", train_size, "N, the number of training examples", low=1)
        stated = getattr(report, "dataset_size", None)
        if stated is not None and stated != train_size:
            raise ValueError(f"train_size={train_size} but the privacy report states dataset_size={stated}: "
                             "give the N the model was trained on")
    if isinstance(notes, str) or not all(isinstance(n, str) for n in notes):
        raise ValueError(f"notes must be a sequence of lines (strings), got {notes!r}")
    out = private_dir(out_dir)
    spec = save_model(out, model, spec)
    if report is None:
        (out / REPORT_FILE).unlink(missing_ok=True)  # a stale guarantee must not describe this model
    else:
        write_private_text(out / REPORT_FILE, report.to_json())
    write_private_text(out / CARD_FILE, model_card(spec, report, eval_accuracy=eval_accuracy,
                                                   train_size=train_size, notes=notes))
    if history is not None or not (out / HISTORY_FILE).exists():
        write_private_text(out / HISTORY_FILE, history_csv(history or ()))
        write_private_text(out / PLOT_FILE, training_svg(history or ()))
    return out


def load(out_dir: str | Path, *, weights: str | Path | None = None) -> TrainedModel:
    """The model saved in ``out_dir`` by :func:`save`, with its spec and privacy report.

    ``weights``: the pretrained weights file, when it is not where the spec says (the
    base fingerprint is checked either way: see :func:`dp_taft.model_file.load_model`).
    """
    model, spec = load_model(out_dir, weights=weights)
    path = Path(out_dir) / REPORT_FILE
    report = None
    if path.is_file():
        try:
            report = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e}): restore it from the original model directory") from None
    return TrainedModel(model, spec, report)


def history_csv(history: Sequence[Any]) -> str:
    """``history`` as CSV text with the header :data:`HISTORY_COLUMNS` (None written as an empty field)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(HISTORY_COLUMNS)
    for record in history:
        row = [getattr(record, column) for column in HISTORY_COLUMNS]
        writer.writerow(["" if value is None else value for value in row])
    return buffer.getvalue()


def training_svg(history: Sequence[Any]) -> str:
    """Eval accuracy (%) and ε spent per epoch, two charts in one SVG document."""
    def points(column: str, scale: float = 1.0) -> list[tuple[float, float]]:
        # Epochs without the value (no eval set, non-private run) are gaps, not zeros.
        values = [(float(r.epoch), getattr(r, column)) for r in history]
        return [(x, scale * v) for x, v in values if v is not None and math.isfinite(v)]

    accuracy = line_chart_svg({"eval accuracy": points("eval_accuracy", 100.0)}, x_label="epoch",
                              y_label="accuracy (%)", title="Accuracy on the eval set", y_range=(0.0, 100.0))
    epsilon = line_chart_svg({"ε spent": points("epsilon_spent")}, x_label="epoch", y_label="ε",
                             title="Privacy budget spent (ε at the run's δ)", y_range=(0.0, 0.0))
    return stack_svg([accuracy, epsilon])
