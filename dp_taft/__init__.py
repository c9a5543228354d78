"""dp_taft: differentially private fine-tuning of timm ViTs through their tangent model."""

from . import privacy  # registers the Opacus grad/norm samplers
from .tangent import TangentViT, UnsupportedModelError, linearize
from . import methods
from .compose import compose
from .train import FitResult, fit

__all__ = ["TangentViT", "UnsupportedModelError", "linearize", "fit", "FitResult", "methods", "compose"]
__version__ = "0.1.0"
