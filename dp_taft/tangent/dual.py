"""The dual-stream convention shared by every tangent module.

A tangent module maps ``(x, dx) -> (y, dy)``: ``x`` is the primal activation of the
network at the pretrained weights w0 (it never depends on Δw, so autograd records
nothing for it), and ``dx`` is its tangent, the directional derivative J·Δw of that
activation along the trainable Δw. ``dx is None`` encodes an exactly-zero tangent,
which is what enters the first linearized block (the frozen prefix has no Δ); it lets
the first layers skip the ``W0·dx`` products entirely.
"""

from __future__ import annotations

from typing import Optional

import torch

Tangent = Optional[torch.Tensor]

__all__ = ["Tangent", "add_tangents"]


def add_tangents(a: Tangent, b: Tangent) -> Tangent:
    """Tangent of a sum: d(u + v) = du + dv, with None standing for zero."""
    if a is None:
        return b
    if b is None:
        return a
    return a + b
