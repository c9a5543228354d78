"""Opacus integration: exact per-sample gradient samplers (registered on import)."""

from . import grad_samplers

__all__ = ["grad_samplers"]
