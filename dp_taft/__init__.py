"""dp_taft: differentially private fine-tuning of timm ViTs through their tangent model."""

from . import privacy  # registers the Opacus grad/norm samplers
from .tangent import TangentViT, UnsupportedModelError, linearize

__all__ = ["TangentViT", "UnsupportedModelError", "linearize"]
__version__ = "0.1.0"
