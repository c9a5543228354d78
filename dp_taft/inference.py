"""A trained model on labelled or unlabelled images: class probabilities, accuracy, confusion matrix."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from .privacy.data import collate_examples

__all__ = ["Evaluation", "evaluate_model", "predict_probabilities"]


@torch.no_grad()
def predict_probabilities(model: nn.Module, data: Dataset, *, batch_size: int = 64,
                          device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(softmax probabilities (N, classes), labels (N,)) of ``model`` in eval mode on ``data`` of
    (image, label) pairs, in data order; ``batch_size`` images run at once (memory only)."""
    model.eval().to(device)
    probs, labels = [], []
    for x, y in DataLoader(data, batch_size=batch_size, shuffle=False, collate_fn=collate_examples):
        probs.append(model(x.to(device)).softmax(dim=1).cpu())
        labels.append(torch.as_tensor(y))
    if not probs:
        raise ValueError("no images to predict: the data set is empty")
    return torch.cat(probs), torch.cat(labels)


@dataclass(frozen=True)
class Evaluation:
    """Accuracy of a model on labelled data. ``matrix[i][j]``: examples of true class i predicted
    as j; ``per_class[i]``: accuracy on class i in [0, 1] (None when the data hold none of it)."""

    classes: tuple[str, ...]
    matrix: tuple[tuple[int, ...], ...]

    @property
    def total(self) -> int:
        return sum(map(sum, self.matrix))

    @property
    def accuracy(self) -> float:
        return sum(self.matrix[i][i] for i in range(len(self.classes))) / self.total

    @property
    def per_class(self) -> tuple[float | None, ...]:
        return tuple(row[i] / sum(row) if sum(row) else None for i, row in enumerate(self.matrix))

    def to_dict(self) -> dict[str, Any]:
        return {"examples": self.total, "accuracy": self.accuracy, "classes": list(self.classes),
                "per_class_accuracy": dict(zip(self.classes, self.per_class)),
                "confusion_matrix": [list(row) for row in self.matrix]}

    def table(self) -> str:
        """Plain-text summary: overall accuracy, then one line per class."""
        width = max(len(c) for c in self.classes)
        lines = [f"accuracy {100 * self.accuracy:.2f} % on {self.total} images"]
        for name, row, acc in zip(self.classes, self.matrix, self.per_class):
            shown = "   n/a" if acc is None else f"{100 * acc:6.2f}"
            lines.append(f"  {name:<{width}}  {shown} %  ({sum(row)} images)")
        return "\n".join(lines)


def evaluate_model(model: nn.Module, data: Dataset, classes: Sequence[str], *, batch_size: int = 64,
                   device: str | torch.device = "cpu") -> Evaluation:
    """The :class:`Evaluation` of ``model`` on ``data`` whose labels index ``classes``."""
    probs, labels = predict_probabilities(model, data, batch_size=batch_size, device=device)
    k = len(classes)
    matrix = torch.zeros(k, k, dtype=torch.long)
    matrix.index_put_((labels.long(), probs.argmax(dim=1)), torch.ones_like(labels, dtype=torch.long), accumulate=True)
    return Evaluation(tuple(classes), tuple(tuple(int(v) for v in row) for row in matrix.tolist()))
