"""Tangents of the pointwise activations: GELU (erf and tanh forms), SiLU, QuickGELU, sigmoid."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import timm.layers
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers.activations import quick_gelu

from .dual import Tangent
from .registry import register_tangent

__all__ = ["TangentGELU", "TangentQuickGELU", "TangentSiLU", "TangentSigmoid"]

# f'(z) ⊙ g for a pointwise f, given g and the saved tensor z the derivative is read from.
Derivative = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

QUICK_GELU_SCALE = 1.702  # quick_gelu(x) = x·sigmoid(1.702·x), as timm writes it


class _DiagonalTangent(torch.autograd.Function):
    """dx ↦ f'(z) ⊙ dx = ``derivative(dx, z)``, saving only z for backward.

    ``derivative`` is the activation's own fused backward kernel (e.g. ``gelu_backward``).
    The map is linear in dx with the diagonal Jacobian f'(z), so its VJP is
    g ↦ f'(z) ⊙ g: the same kernel. Autograd's generic rule for such a kernel would also
    save dx (for the z-derivative, which the tangent stream never needs: z never depends
    on Δw), doubling the MLP's saved activations.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(dx, z, derivative):
        return derivative(dx, z)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, z, derivative = inputs
        ctx.save_for_backward(z)
        ctx.derivative = derivative

    @staticmethod
    def backward(ctx, grad):
        (z,) = ctx.saved_tensors
        return ctx.derivative(grad, z), None, None


class _PointwiseTangent(nn.Module):
    """A parameter-free pointwise activation y = f(x) and its tangent dy = f'(x) ⊙ dx.

    Subclasses give the primal ``f`` (exactly as the source layer computes it) and the
    tangent ``f'(x) ⊙ dx`` through :class:`_DiagonalTangent`.
    """

    def __init__(self, source_layer: nn.Module, path: str) -> None:
        super().__init__()
        self.source = path

    def primal(self, x: torch.Tensor) -> torch.Tensor:
        """y = f(x)."""
        raise NotImplementedError

    def tangent(self, x: torch.Tensor, y: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
        """dy = f'(x) ⊙ dx (from the input x or the output y, whichever is cheaper)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, dx: Tangent) -> tuple[torch.Tensor, Tangent]:
        y = self.primal(x)
        if dx is None:
            return y, None
        return y, self.tangent(x, y, dx)


_APPROXIMATE: dict[type[nn.Module], str] = {
    timm.layers.GELU: "none",
    timm.layers.GELUTanh: "tanh",
}


@register_tangent(nn.GELU, timm.layers.GELU, timm.layers.GELUTanh)
class TangentGELU(_PointwiseTangent):
    r"""Linearization of the pointwise GELU (no parameters): dy = gelu'(x) ⊙ dx.

    Derivation: exact GELU is x·Φ(x), so gelu'(x) = Φ(x) + x·φ(x) (Φ, φ the standard
    normal cdf and pdf). The tanh form is 0.5·x·(1 + tanh(u)), u = c·(x + a·x³),
    c = √(2/π), a = 0.044715, so gelu'(x) = 0.5·(1 + tanh u) + 0.5·x·(1 − tanh²u)·c·(1 + 3a·x²).

    ``gelu_backward(dx, x)`` evaluates exactly ``gelu'(x) ⊙ dx`` for either form in one
    fused kernel (it is GELU's own backward); :class:`_DiagonalTangent` differentiates it
    in dx only, which is all the tangent stream needs: x never depends on Δw.
    """

    def __init__(self, source_layer: nn.Module, path: str) -> None:
        super().__init__(source_layer, path)
        self.approximate = (
            source_layer.approximate if type(source_layer) is nn.GELU else _APPROXIMATE[type(source_layer)]
        )

    def primal(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate=self.approximate)

    def tangent(self, x: torch.Tensor, y: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
        derivative = partial(torch.ops.aten.gelu_backward, approximate=self.approximate)
        return _DiagonalTangent.apply(dx, x, derivative)


@register_tangent(nn.SiLU)
class TangentSiLU(_PointwiseTangent):
    r"""Linearization of SiLU (swish), silu(x) = x·s, s = sigmoid(x): dy = silu'(x) ⊙ dx.

    Derivation: with s' = s(1 − s), silu'(x) = s + x·s·(1 − s). ``silu_backward(dx, x)``
    is SiLU's own fused backward kernel and evaluates exactly that product.
    """

    def primal(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(x)

    def tangent(self, x: torch.Tensor, y: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
        return _DiagonalTangent.apply(dx, x, torch.ops.aten.silu_backward)


def _quick_gelu_derivative(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """quick_gelu'(x) ⊙ g = silu'(1.702·x) ⊙ g (see :class:`TangentQuickGELU`)."""
    return torch.ops.aten.silu_backward(g, QUICK_GELU_SCALE * x)


@register_tangent(timm.layers.QuickGELU)
class TangentQuickGELU(_PointwiseTangent):
    r"""Linearization of QuickGELU, x·sigmoid(1.702·x) (OpenAI CLIP): dy = q'(x) ⊙ dx.

    Derivation: with a = 1.702 and s = sigmoid(a·x), q'(x) = s + a·x·s·(1 − s).
    Since q(x) = silu(a·x) / a, q'(x) = silu'(a·x) = s + (a·x)·s·(1 − s), the same
    expression, so SiLU's fused backward kernel at a·x evaluates it; saving x (not a·x)
    costs no new tensor, a·x is recomputed in backward.
    """

    def primal(self, x: torch.Tensor) -> torch.Tensor:
        return quick_gelu(x)

    def tangent(self, x: torch.Tensor, y: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
        return _DiagonalTangent.apply(dx, x, _quick_gelu_derivative)


@register_tangent(nn.Sigmoid, timm.layers.Sigmoid)
class TangentSigmoid(_PointwiseTangent):
    r"""Linearization of the sigmoid (the gate of timm's default ``GluMlp``): dy = s(1 − s) ⊙ dx.

    Derivation: s = sigmoid(x) = 1 / (1 + e^{−x}) has s' = s(1 − s), a function of the
    OUTPUT; ``sigmoid_backward(dx, s)`` is the sigmoid's own fused backward kernel for it.
    """

    def primal(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(x)

    def tangent(self, x: torch.Tensor, y: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
        return _DiagonalTangent.apply(dx, y, torch.ops.aten.sigmoid_backward)
