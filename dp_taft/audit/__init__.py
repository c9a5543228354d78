"""One-run privacy auditing: an empirical lower bound ε_lb beside a run's claimed ε.

In the manner of Steinke, Nasr, Jagielski, *Privacy Auditing with One (1) Training Run*
(NeurIPS 2023): m canaries, each included independently with probability 1/2, one run
through the real :func:`dp_taft.fit`, one score per canary, and a bound that turns the
number of right membership guesses into ε_lb at a stated confidence.

* :func:`audit_dirac`: white-box Dirac gradient canaries (strongest per unit of cost), through
  fit's default book-keeping path or Opacus' per-sample path (:data:`AUDIT_MODES`), any q;
* :func:`audit_input`: input-space canaries, e.g. :func:`mislabeled` examples;
* :func:`epsilon_lower_bound`: the bound alone, from (m, r, v) — bounds "steinke",
  "fdp" and "gdp" (see :mod:`dp_taft.audit.bounds` for what each one covers).

An audit can refute a privacy claim (ε_lb > claimed ε); it can never prove one.
"""

from .audits import AUDIT_MODES, audit_dirac, audit_input
from .bounds import BOUNDS, epsilon_lower_bound, gdp_epsilon, gdp_mu_lower_bound, steinke_p_value
from .canaries import mislabeled
from .guesses import DEFAULT_FRACTIONS, Guesses, best_guesses
from .result import AuditResult

__all__ = [
    "AUDIT_MODES",
    "AuditResult",
    "BOUNDS",
    "DEFAULT_FRACTIONS",
    "Guesses",
    "audit_dirac",
    "audit_input",
    "best_guesses",
    "epsilon_lower_bound",
    "gdp_epsilon",
    "gdp_mu_lower_bound",
    "mislabeled",
    "steinke_p_value",
]
