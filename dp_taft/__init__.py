"""dp_taft: differentially private fine-tuning of timm ViTs through their tangent model."""

from . import privacy  # registers the Opacus grad/norm samplers
from .tangent import TangentViT, UnsupportedModelError, linearize
from . import methods
from .compose import compose, compose_reports
from .train import FitResult, fit
from .config import DataOptions, MethodOptions, OptimOptions, PrivacyOptions, RunOptions, TrainConfig
from .recipes import finetune
from . import presets  # presets.preset(method): the tuned settings of a method
from .backbone import BackboneSpec
from .model_dir import load, save
from .model_file import ModelSpec
# public submodules: dp_taft.head_first.fit_head_first, dp_taft.shards.fit_shards, dp_taft.audit.audit_dirac,
# dp_taft.images.load_images, dp_taft.backbone.eval_transform, dp_taft.inference.evaluate_model
from . import audit, backbone, head_first, images, inference, shards

__all__ = ["TangentViT", "UnsupportedModelError", "linearize", "fit", "FitResult", "methods", "compose", "compose_reports",
           "audit", "head_first", "shards", "TrainConfig", "MethodOptions", "PrivacyOptions", "OptimOptions",
           "DataOptions", "RunOptions", "finetune", "presets", "BackboneSpec", "ModelSpec", "save", "load",
           "backbone", "images", "inference"]
__version__ = "0.1.0"
