"""Opacus integration: exact per-sample gradient samplers and the book-keeping rules
(both registered on import)."""

from . import bk_rules, grad_samplers

__all__ = ["bk_rules", "grad_samplers"]
