"""Dual-stream tangent modules: one per layer kind, and the timm ViT conversion."""

from .activation import TangentGELU
from .activation import TangentQuickGELU, TangentSigmoid, TangentSiLU
from .attention import TangentAttention
from .beit import TangentBeit
from .block import TangentBlock
from .dual import Tangent, add_tangents
from .eva import TangentEva
from .glu import TangentGluMlp, TangentSwiGLU
from .layernorm import TangentLayerNorm
from .layerscale import DeltaScale, TangentLayerScale
from .linear import DeltaLinear, TangentLinear, per_sample_gradients_only
from .mlp import TangentMlp
from .pooling import ParameterAdd, TangentAddedParameter, TangentAttentionPool
from .swin import TangentSwin
from .swin_v2 import TangentSwinV2
from .registry import UnsupportedModelError, register_tangent, supported_types, to_tangent
from .vit import TangentViT, linearize

__all__ = [
    "TangentBeit",
    "DeltaLinear",
    "DeltaScale",
    "ParameterAdd",
    "TangentAddedParameter",
    "TangentAttentionPool",
    "Tangent",
    "TangentAttention",
    "TangentBlock",
    "TangentEva",
    "TangentGELU",
    "TangentGluMlp",
    "TangentLayerNorm",
    "TangentLayerScale",
    "TangentLinear",
    "TangentMlp",
    "TangentQuickGELU",
    "TangentSiLU",
    "TangentSigmoid",
    "TangentSwiGLU",
    "TangentSwin",
    "TangentSwinV2",
    "TangentViT",
    "UnsupportedModelError",
    "add_tangents",
    "linearize",
    "per_sample_gradients_only",
    "register_tangent",
    "supported_types",
    "to_tangent",
]
