"""Opacus integration: exact per-sample gradient samplers and the family book-keeping rules
(both registered on import)."""

from . import bk_family_rules, grad_samplers

__all__ = ["bk_family_rules", "grad_samplers"]
