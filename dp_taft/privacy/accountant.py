"""Opacus accountants that delegate to :mod:`accounting`.

Opacus 1.6 creates accountants by mechanism name (``PrivacyEngine(accountant="prv")``
calls ``opacus.accountants.create_accountant``), and ``make_private_with_epsilon``
calibrates σ by bisection over a fresh accountant of the engine's mechanism. So the
clean integration is to register our classes under their own names; then, with no
subclassing or attribute surgery,

    engine = PrivacyEngine(accountant="dp_taft_pld")
    engine.make_private_with_epsilon(...)   # σ calibrated with accounting's PLD
    engine.get_epsilon(delta)               # == accounting.epsilon_of_history(...)

Importing :mod:`dp_taft` registers "dp_taft_pld" and "dp_taft_rdp".
"""

from __future__ import annotations

from typing import Any, ClassVar

import accounting
from opacus.accountants import IAccountant
from opacus.accountants.registry import register_accountant

__all__ = ["OpacusPLDAccountant", "OpacusRDPAccountant", "opacus_accountant_name"]


class _OpacusBridge(IAccountant):
    """Opacus accountant whose ε is computed by :func:`accounting.epsilon_of_history`.

    ``history`` keeps Opacus' format, a list of (noise_multiplier, sample_rate, steps)
    tuples, because Opacus' ``get_noise_multiplier`` assigns it directly.
    """

    method: ClassVar[str]

    def __init__(self) -> None:
        self.history: list[tuple[float, float, int]] = []

    def step(self, *, noise_multiplier: float, sample_rate: float) -> None:
        """Record one DP-SGD step; consecutive steps with equal (σ, q) share one entry."""
        if self.history and self.history[-1][:2] == (noise_multiplier, sample_rate):
            self.history[-1] = (noise_multiplier, sample_rate, self.history[-1][2] + 1)
        else:
            self.history.append((noise_multiplier, sample_rate, 1))

    def get_epsilon(self, delta: float, **opacus_kwargs: Any) -> float:
        """ε spent so far at ``delta`` in (0, 1).

        ``opacus_kwargs``: Opacus forwards ``make_private_with_epsilon``'s extra keyword
        arguments here; they configure Opacus' own accountants and do not apply.
        """
        if not self.history:
            return 0.0
        segments = [accounting.Segment(s, q, n) for s, q, n in self.history]
        return accounting.epsilon_of_history(segments, delta, method=self.method)

    def __len__(self) -> int:
        return sum(n for _, _, n in self.history)

    @classmethod
    def mechanism(cls) -> str:
        return opacus_accountant_name(cls.method)


class OpacusPLDAccountant(_OpacusBridge):
    """Registered as ``"dp_taft_pld"``: PLD accounting (tight, the default of :func:`dp_taft.fit`)."""

    method = "pld"


class OpacusRDPAccountant(_OpacusBridge):
    """Registered as ``"dp_taft_rdp"``: RDP accounting (looser upper bound)."""

    method = "rdp"


def opacus_accountant_name(method: str) -> str:
    """The Opacus mechanism name under which the ``method`` accountant is registered."""
    return f"dp_taft_{method}"


for _cls in (OpacusPLDAccountant, OpacusRDPAccountant):
    register_accountant(_cls.mechanism(), _cls, force=True)  # force: re-import (e.g. importlib.reload) is harmless
