"""Argument checks shared by every public entry point of :mod:`accounting`.

Each check raises ``ValueError`` naming the argument and its valid range, e.g.
``ValueError("sample_rate must be in (0, 1], got 1.5")``, and returns the value
converted to a plain Python ``float``/``int`` so callers can store it.
"""

from __future__ import annotations

import math
import numbers

METHODS = ("pld", "rdp")


def _real(name: str, value: object, valid: str) -> float:
    """Convert ``value`` to a finite float or raise a ValueError citing ``valid``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number in {valid}, got {value!r}")
    x = float(value)
    if math.isnan(x):
        raise ValueError(f"{name} must be in {valid}, got nan")
    return x


def sample_rate(value: object, name: str = "sample_rate") -> float:
    """Poisson sampling probability q, valid range (0, 1]."""
    q = _real(name, value, "(0, 1]")
    if not 0.0 < q <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {value!r}")
    return q


def noise_multiplier(value: object, name: str = "noise_multiplier") -> float:
    """Noise standard deviation over the L2 sensitivity, valid range (0, inf)."""
    s = _real(name, value, "(0, inf)")
    if not 0.0 < s < math.inf:
        raise ValueError(f"{name} must be in (0, inf), got {value!r}")
    return s


def steps(value: object, name: str = "steps") -> int:
    """Number of compositions, a non-negative integer (0 means no release)."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    if isinstance(value, numbers.Integral):
        n = int(value)
    elif isinstance(value, numbers.Real) and float(value).is_integer():
        n = int(value)  # 1000.0 is accepted: configs often store counts as floats
    else:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    if n < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return n


def delta(value: object, name: str = "delta") -> float:
    """Target delta, valid range (0, 1)."""
    d = _real(name, value, "(0, 1)")
    if not 0.0 < d < 1.0:
        raise ValueError(f"{name} must be in (0, 1), got {value!r}")
    return d


def epsilon(value: object, name: str = "epsilon") -> float:
    """Target epsilon, valid range (0, inf)."""
    e = _real(name, value, "(0, inf)")
    if not 0.0 < e < math.inf:
        raise ValueError(f"{name} must be in (0, inf), got {value!r}")
    return e


def method(value: object, name: str = "method") -> str:
    """Accounting method, one of ``METHODS``."""
    if value not in METHODS:
        raise ValueError(f"{name} must be one of {METHODS}, got {value!r}")
    return str(value)


def epsilon_bound(value: object, name: str = "epsilon") -> float:
    """An epsilon a report states (an upper bound, possibly infinite), valid range [0, inf]."""
    e = _real(name, value, "[0, inf]")
    if e < 0.0:
        raise ValueError(f"{name} must be in [0, inf], got {value!r}")
    return e


def tolerance(value: object, name: str = "tolerance") -> float:
    """Relative slack when comparing epsilons, valid range [0, inf)."""
    t = _real(name, value, "[0, inf)")
    if not 0.0 <= t < math.inf:
        raise ValueError(f"{name} must be in [0, inf), got {value!r}")
    return t


def stage_labels(value: object, name: str = "stages") -> tuple[str, ...]:
    """Stage names such as ``("head", "taft")``: a sequence of non-empty single-line strings (may be empty)."""
    if isinstance(value, str):
        raise ValueError(f"{name} must be a sequence of labels such as ('head', 'taft'), not the string {value!r}")
    try:
        labels = tuple(value)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"{name} must be a sequence of labels such as ('head', 'taft'), got {value!r}") from None
    for label in labels:
        # The statement is one paragraph: a label with a line break or control character would break it.
        if not isinstance(label, str) or not label.strip() or not label.isprintable():
            raise ValueError(f"each label in {name} must be a non-empty single-line string, got {label!r}")
    return labels
