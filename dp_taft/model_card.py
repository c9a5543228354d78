"""The model card of a model directory: what was trained, under which guarantee, and how to use it.

In the spirit of Hugging Face model cards, in Markdown. Every fact on the card comes from
the arguments of :func:`model_card` (the model's spec, its privacy report and what the caller
measured); nothing is looked up, so the card cannot drift from the files it describes.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import PurePath
from typing import Any

from .model_file import MODEL_FILE, ModelSpec

__all__ = ["model_card", "METHOD_WORDS"]

#: What each method trains, in words.
METHOD_WORDS = {
    "taft": "TAFT-{k}: the tangent (linearized) model of the last {k} block(s), final norm(s) and head, trained "
            "as a linear model around the pretrained weights",
    "taft-head": "TAFT-{k} around a privately trained head: a private linear probe first, then the tangent model "
                 "of the last {k} block(s) around that head",
    "nlft": "NLFT-{k}: ordinary fine-tuning of the last {k} block(s), final norm(s) and head",
    "probe": "linear probe: only the classifier head is trained",
}


def model_card(spec: ModelSpec, report: Any | None, *, eval_accuracy: float | None, train_size: int | None,
               notes: Sequence[str] = ()) -> str:
    """The Markdown model card of a trained model.

    Args:
        spec: the model's spec as saved (with its fingerprint).
        report: the privacy report (an object with ``statement()``, ``epsilon`` and ``delta``,
            e.g. ``accounting.PrivacyReport``), or None for a model trained without privacy.
        eval_accuracy: accuracy in [0, 1] on the eval set the user gave, or None.
        train_size: N, the number of training examples, or None when not stated.
        notes: extra lines, each shown as a bullet under "Notes".
    """
    backbone = spec.backbone
    weights = "timm's own pretrained weights" if backbone.weights is None else (
        f"`{PurePath(backbone.weights).name}`")  # the file name only: a directory path may say who trained it
    kwargs = dict(backbone.model_kwargs)
    lines = [
        f"# {backbone.name}, privately fine-tuned with dp_taft ({spec.method}, k = {spec.blocks})",
        "",
        "## Model",
        f"- Architecture: timm `{backbone.name}`" + (f" with `{json.dumps(kwargs)}`" if kwargs else ""),
        f"- Pretrained weights: {weights}; base fingerprint `{spec.fingerprint}` (SHA-256 of w0: the model loads only "
        "onto this base)",
        f"- Method: {METHOD_WORDS[spec.method].format(k=spec.blocks)}",
        f"- Classes ({len(spec.classes)}): " + ", ".join(f"`{c}`" for c in spec.classes),
        f"- Written by dp_taft {spec.version}",
    ]
    if spec.composition is not None:
        lines.append(f"- Composition: {spec.composition}")
    lines += ["", "## Training data",
              f"- {train_size} training examples (N)." if train_size is not None else "- N not stated.",
              "", "## Privacy guarantee", *_guarantee(report), "", "## Evaluation", _accuracy(eval_accuracy),
              "", "## Assumed public",
              "The guarantee treats as public: the architecture, the pretrained weights (and the data they were "
              "trained on), the training hyperparameters, the class names and the number of training examples N.",
              "", "## How to use",
              "```python", "import dp_taft", 'trained = dp_taft.load("DIR")  # checks the base fingerprint',
              "probabilities = trained.predict(images)  # images: (B, C, H, W), see trained.transform()", "```",
              f"or from a shell: `dp-taft predict DIR IMAGES`. The model file `{MODEL_FILE}` rebuilds the model from "
              "the pretrained weights; give `--weights FILE` (Python: `weights=FILE`) if they live elsewhere."]
    if notes:
        lines += ["", "## Notes", *(f"- {note}" for note in notes)]
    return "\n".join(lines) + "\n"


def _guarantee(report: Any | None) -> list[str]:
    if report is None:
        return ["Trained WITHOUT differential privacy: there is no privacy guarantee. Do not publish this model if "
                "its training data is private."]
    return [report.statement(), "",
            f"- ε = {report.epsilon:.4g}, δ = {report.delta:.3g}",
            "- Check it: `python -m accounting verify privacy_report.json` recomputes ε from the recorded "
            "training history."]


def _accuracy(eval_accuracy: float | None) -> str:
    if eval_accuracy is None:
        return "No evaluation set was given."
    return (f"Accuracy {100 * eval_accuracy:.2f} % on the eval set the user gave. That set is not protected by the "
            "privacy guarantee (it was used in the clear to measure this number).")
