"""Immutable descriptions of the mechanisms that accountants consume.

Every event describes a release on *add/remove-one* neighbouring datasets: two
datasets are neighbours when one is obtained from the other by adding or
removing a single example. Sensitivities are in units of the clipping norm, so
``GaussianEvent(noise_multiplier=s)`` is the Gaussian mechanism with noise
standard deviation ``s`` times the L2 sensitivity.

Events compose like Google's ``dp_accounting.DpEvent``:

* ``PoissonSampledEvent(q, GaussianEvent(s))`` -- one DP-SGD step: every example
  is included independently with probability ``q`` (Poisson sampling), then the
  clipped sum is released with Gaussian noise.
* ``SelfComposedEvent(event, count)`` -- ``count`` independent runs of ``event``.
* ``ComposedEvent((e1, e2, ...))`` -- independent runs of different events.

``Segment(noise_multiplier, sample_rate, steps)`` is the flat form every
accountant reduces an event to; a training run is a tuple of segments.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from accounting import _validate


@dataclass(frozen=True)
class GaussianEvent:
    """Gaussian mechanism with noise std ``noise_multiplier`` x sensitivity, in (0, inf)."""

    noise_multiplier: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "noise_multiplier", _validate.noise_multiplier(self.noise_multiplier))


@dataclass(frozen=True)
class PoissonSampledEvent:
    """``event`` run on a Poisson subsample; ``sample_rate`` q in (0, 1]."""

    sample_rate: float
    event: GaussianEvent

    def __post_init__(self) -> None:
        object.__setattr__(self, "sample_rate", _validate.sample_rate(self.sample_rate))
        if not isinstance(self.event, GaussianEvent):
            raise ValueError(f"event must be a GaussianEvent, got {type(self.event).__name__}")


@dataclass(frozen=True)
class SelfComposedEvent:
    """``count`` (a non-negative integer) independent repetitions of ``event``."""

    event: "Event"
    count: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "count", _validate.steps(self.count, "count"))
        _check_event(self.event)


@dataclass(frozen=True)
class ComposedEvent:
    """Independent composition of the tuple ``events`` (in order of execution)."""

    events: tuple

    def __post_init__(self) -> None:
        object.__setattr__(self, "events", tuple(self.events))
        for e in self.events:
            _check_event(e)


Event = Union[GaussianEvent, PoissonSampledEvent, SelfComposedEvent, ComposedEvent]
EVENT_TYPES = (GaussianEvent, PoissonSampledEvent, SelfComposedEvent, ComposedEvent)


def _check_event(event: object) -> None:
    if not isinstance(event, EVENT_TYPES):
        raise ValueError(f"event must be an accounting event, got {type(event).__name__}")


@dataclass(frozen=True)
class Segment:
    """``steps`` DP-SGD steps with Poisson ``sample_rate`` q in (0, 1] and ``noise_multiplier`` in (0, inf).

    A run that changes batch size or noise part-way is a tuple of segments.
    """

    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "noise_multiplier", _validate.noise_multiplier(self.noise_multiplier))
        object.__setattr__(self, "sample_rate", _validate.sample_rate(self.sample_rate))
        object.__setattr__(self, "steps", _validate.steps(self.steps))

    @property
    def event(self) -> SelfComposedEvent:
        """The equivalent event: ``SelfComposedEvent(PoissonSampledEvent(q, GaussianEvent(s)), steps)``."""
        return dpsgd_event(self.noise_multiplier, self.sample_rate, self.steps)


def dpsgd_event(noise_multiplier: float, sample_rate: float, steps: int) -> SelfComposedEvent:
    """The event of ``steps`` DP-SGD steps (Poisson-subsampled Gaussian, add/remove-one)."""
    return SelfComposedEvent(PoissonSampledEvent(sample_rate, GaussianEvent(noise_multiplier)), steps)


def to_segments(event: Event) -> tuple[Segment, ...]:
    """Flatten ``event`` into segments; zero-step segments are dropped.

    A bare ``GaussianEvent`` is a segment with ``sample_rate=1`` (no subsampling).
    """
    if isinstance(event, GaussianEvent):
        return (Segment(event.noise_multiplier, 1.0, 1),)
    if isinstance(event, PoissonSampledEvent):
        return (Segment(event.event.noise_multiplier, event.sample_rate, 1),)
    if isinstance(event, SelfComposedEvent):
        inner = to_segments(event.event)
        if event.count == 0:
            return ()
        if len(inner) == 1:  # the common case: keep one segment rather than `count` copies
            s = inner[0]
            return (Segment(s.noise_multiplier, s.sample_rate, s.steps * event.count),)
        return inner * event.count
    if isinstance(event, ComposedEvent):
        return tuple(s for e in event.events for s in to_segments(e))
    _check_event(event)
    raise AssertionError("unreachable")


def history_items(history: object) -> tuple:
    """The items of a history: a lone segment or event is a history of one item."""
    if isinstance(history, (Segment, *EVENT_TYPES)):
        return (history,)
    return tuple(history)  # type: ignore[call-overload]


def as_segments(history: object) -> tuple[Segment, ...]:
    """Normalise an event, a segment or a sequence of either into a tuple of non-empty segments."""
    out: list[Segment] = []
    for item in history_items(history):
        if isinstance(item, Segment):
            if item.steps:
                out.append(item)
        else:
            out.extend(to_segments(item))
    return tuple(out)
