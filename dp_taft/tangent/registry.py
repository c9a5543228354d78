"""Conversion registry: which dual-stream module replaces which timm/torch layer.

In the manner of Opacus' ``register_grad_sampler``: every tangent module class
registers itself, keyed by the *exact* class of the layer it linearizes. Exact
matching is deliberate: a subclass may override ``forward`` with different maths,
and silently linearizing it with the parent's rule would give a wrong answer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch.nn as nn

__all__ = ["UnsupportedModelError", "register_tangent", "to_tangent", "supported_types"]

_CONVERTERS: dict[type[nn.Module], Callable[[nn.Module, str], nn.Module]] = {}

M = TypeVar("M", bound=type[nn.Module])


class UnsupportedModelError(TypeError):
    """A model or layer the tangent conversion cannot linearize exactly."""


def register_tangent(*source_types: type[nn.Module]) -> Callable[[M], M]:
    """Class decorator: the decorated tangent module converts layers of ``source_types``.

    The decorated class must accept ``(source_module, path)`` in its constructor.
    """

    def decorator(cls: M) -> M:
        for source_type in source_types:
            _CONVERTERS[source_type] = cls
        return cls

    return decorator


def supported_types() -> list[str]:
    """Qualified names of every layer class the conversion accepts."""
    return sorted(f"{t.__module__}.{t.__qualname__}" for t in _CONVERTERS)


def describe(module: nn.Module) -> str:
    """``module.Class`` of a layer, as error messages print it."""
    t = type(module)
    return f"{t.__module__}.{t.__qualname__}"


def to_tangent(module: nn.Module, path: str) -> nn.Module:
    """The dual-stream replacement of ``module`` (found at ``path`` in the source model).

    Raises:
        UnsupportedModelError: naming the path, the layer class and what is supported.
    """
    converter = _CONVERTERS.get(type(module))
    if converter is None:
        raise UnsupportedModelError(
            f"cannot linearize '{path}' of type {describe(module)}: no tangent rule is "
            f"registered for it. Supported layer types: {', '.join(supported_types())}. "
            "Linearize fewer blocks (blocks=k) so this layer stays in the frozen prefix, "
            "or register a tangent module for it with dp_taft.tangent.register_tangent."
        )
    return converter(module, path)


def require_no_dropout(module: nn.Module, path: str) -> None:
    """Refuse stochastic layers: the tangent model linearizes the deterministic network.

    Dropout and stochastic depth would make f(x; w0) random, so J·Δw would not be the
    Jacobian of any fixed function; an identity (rate 0) is fine.
    """
    if isinstance(module, nn.Identity):
        return
    if type(module) is nn.Dropout and module.p == 0.0:
        return
    raise UnsupportedModelError(
        f"'{path}' is a stochastic layer ({describe(module)}) inside the linearized part. "
        "Create the timm model with drop_rate=0, proj_drop_rate=0, attn_drop_rate=0 and "
        "drop_path_rate=0 (the tangent model linearizes the deterministic network)."
    )
