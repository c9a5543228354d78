"""dp_taft: differentially private fine-tuning of timm ViTs through their tangent model."""

from . import privacy  # registers the Opacus grad/norm samplers
from .tangent import TangentViT, UnsupportedModelError, linearize
from . import methods
from .compose import compose
from .train import FitResult, fit
# public submodules: dp_taft.head_first.fit_head_first, dp_taft.shards.fit_shards, dp_taft.audit.audit_dirac
from . import audit, head_first, shards

__all__ = ["TangentViT", "UnsupportedModelError", "linearize", "fit", "FitResult", "methods", "compose",
           "audit", "head_first", "shards"]
__version__ = "0.1.0"
