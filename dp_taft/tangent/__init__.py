"""Dual-stream tangent modules: one per layer kind, and the timm ViT conversion."""

from .activation import TangentGELU
from .attention import TangentAttention
from .block import TangentBlock
from .dual import Tangent, add_tangents
from .layernorm import TangentLayerNorm
from .layerscale import DeltaScale, TangentLayerScale
from .linear import DeltaLinear, TangentLinear, per_sample_gradients_only
from .mlp import TangentMlp
from .registry import UnsupportedModelError, register_tangent, supported_types, to_tangent
from .vit import TangentViT, linearize

__all__ = [
    "DeltaLinear",
    "DeltaScale",
    "Tangent",
    "TangentAttention",
    "TangentBlock",
    "TangentGELU",
    "TangentLayerNorm",
    "TangentLayerScale",
    "TangentLinear",
    "TangentMlp",
    "TangentViT",
    "UnsupportedModelError",
    "add_tangents",
    "linearize",
    "per_sample_gradients_only",
    "register_tangent",
    "supported_types",
    "to_tangent",
]
