"""Fine-tune a timm ViT by the method a :class:`~dp_taft.config.TrainConfig` names: :func:`finetune`.

``config.method`` says which model to build from the backbone (:mod:`dp_taft.methods`,
:mod:`dp_taft.head_first`) and the other groups how to train it (:func:`dp_taft.fit`)::

    config = dp_taft.TrainConfig.create(name="taft", blocks=2, epsilon=3.0, epochs=3, lr=1.0)
    result = dp_taft.finetune(timm.create_model("vit_small_patch16_224", num_classes=10), train_set, config)
"""

from __future__ import annotations

import timm.models.vision_transformer as vit
import torch.nn as nn
from torch.utils.data import Dataset

from . import methods
from .config import MethodOptions, TrainConfig
from .head_first import fit_head_first
from .train import FitResult, fit

__all__ = ["build_model", "finetune"]


def build_model(backbone: vit.VisionTransformer, method: MethodOptions) -> nn.Module:
    """The trainable model of a one-stage ``method`` ('taft', 'nlft' or 'probe') built from a copy of
    ``backbone``; 'taft-head' has two stages and is built by :func:`finetune` itself."""
    if method.name == "taft":
        return methods.taft(backbone, method.blocks)
    if method.name == "nlft":
        return methods.nlft(backbone, method.blocks)
    if method.name == "probe":
        return methods.linear_probe(backbone)
    raise ValueError(f"build_model builds 'taft', 'nlft' and 'probe'; {method.name!r} has two stages: "
                     "use dp_taft.finetune")


def finetune(backbone: vit.VisionTransformer, train_set: Dataset, config: TrainConfig, *,
             eval_set: Dataset | None = None) -> FitResult:
    """Build the method ``config.method`` names from ``backbone`` (a timm VisionTransformer, never
    modified) and train it with DP-SGD under ``config``'s options (:func:`dp_taft.fit`).

    'taft-head' runs :func:`dp_taft.head_first.fit_head_first` (a private linear probe for
    ``head_epochs``, then TAFT-``blocks`` around that head, one budget); the others one ``fit``.
    ``eval_set``: evaluated at every epoch end (not privacy-protected). Returns the
    :class:`~dp_taft.train.FitResult` (for 'taft-head', stage 2's, with both stages' steps).
    """
    if not isinstance(config, TrainConfig):
        raise ValueError(f"config must be a dp_taft.TrainConfig, got {type(config).__name__}: build one with "
                         "TrainConfig.create(**options), TrainConfig.from_toml(path) or dp_taft.presets.preset(...)")
    config.fit_options()  # a missing epsilon fails before the model is built
    if config.method.name == "taft-head":
        return fit_head_first(backbone, config.method.blocks, train_set, config, eval_set=eval_set)
    return fit(build_model(backbone, config.method), train_set, config, eval_set=eval_set)
