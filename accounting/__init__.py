"""Privacy accounting for DP-SGD (numpy and scipy only; never imports torch).

Mechanism: the Poisson-subsampled Gaussian mechanism, composed over steps and
over segments with different (sample_rate, noise_multiplier, steps), on
add/remove-one neighbouring datasets. Two accountants:

* ``"pld"`` (default): privacy loss distributions with a pessimistic
  (connect-the-dots) discretisation composed by FFT -- tight, an upper bound;
  :func:`accounting.pld.epsilon_bounds` also gives a rigorous lower bound.
* ``"rdp"``: Rényi DP (Mironov, Talwar, Zhang 2019) with the conversion of
  Balle et al. 2020, Thm 21.

No central-limit (GDP) approximation is used anywhere: it under-reports epsilon.

A run's guarantee is recorded by :class:`PrivacyReport` (sequential composition of its
segments); that of models trained on disjoint data by :class:`ParallelReport`. Both are
checked from their JSON by ``python -m accounting verify``.
"""

from accounting import pld, rdp
from accounting.accountant import (
    PrivacyAccountant,
    delta,
    delta_of_history,
    epsilon,
    epsilon_of_history,
)
from accounting.calibration import max_steps, noise_multiplier
from accounting.events import (
    ComposedEvent,
    GaussianEvent,
    PoissonSampledEvent,
    Segment,
    SelfComposedEvent,
    dpsgd_event,
)
from accounting.parallel import ParallelReport, report_from_dict
from accounting.report import PrivacyReport

__all__ = [
    "ComposedEvent",
    "GaussianEvent",
    "ParallelReport",
    "PoissonSampledEvent",
    "PrivacyAccountant",
    "PrivacyReport",
    "Segment",
    "SelfComposedEvent",
    "delta",
    "delta_of_history",
    "dpsgd_event",
    "epsilon",
    "epsilon_of_history",
    "max_steps",
    "noise_multiplier",
    "pld",
    "rdp",
    "report_from_dict",
]
