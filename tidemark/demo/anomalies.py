"""Incidents the demo traffic can be told to contain, for testing anomaly detection end to end.

Each injected anomaly has a kind, a start, a duration and a magnitude; inside its span
the simulator changes one behaviour and nothing else, so a detector's finding can be
traced back to its cause:

- ``revenue_drop``: the chance that a project visit ends in ``fund_project`` *and* the
  contributed amounts are multiplied by ``magnitude`` (default 0.3: volume x0.3,
  GMV about x0.09) — a broken checkout or a payment outage;
- ``signup_spike``: the signup probability of anonymous sessions is multiplied by
  ``magnitude`` (default 5) — a viral post or a bot wave;
- ``error_burst``: the probability that a page view is followed by an ``error`` event
  becomes ``magnitude`` (default 0.25, against a baseline of 0.5 %) — a bad deploy.

The span is half-open: ``start <= t < start + duration``. Injection is deterministic
(same seed, same anomalies, same events).

>>> a = InjectedAnomaly.parse("error_burst@2026-11-25T10:00Z/30m")
>>> (a.kind, a.duration.total_seconds(), a.magnitude)
('error_burst', 1800.0, 0.25)
>>> InjectedAnomaly.parse("revenue_drop@2026-11-25T10:00:00+00:00/2h*0.1").magnitude
0.1
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

AnomalyKind = Literal["revenue_drop", "signup_spike", "error_burst"]
ANOMALY_KINDS: tuple[str, ...] = ("revenue_drop", "signup_spike", "error_burst")
DEFAULT_MAGNITUDE: dict[str, float] = {"revenue_drop": 0.3, "signup_spike": 5.0, "error_burst": 0.25}

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> timedelta:
    """``"90s"``, ``"30m"``, ``"2h"``, ``"1.5d"`` as a ``timedelta``."""
    match = _DURATION.match(text.strip())
    if not match:
        raise ValueError(f"invalid duration {text!r}: use a number and one of s, m, h, d (e.g. 30m)")
    return timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2)])


@dataclass(frozen=True)
class InjectedAnomaly:
    """One incident: ``kind`` from ``start`` for ``duration``, with a kind-specific ``magnitude``."""

    kind: AnomalyKind
    start: datetime
    duration: timedelta
    magnitude: float

    def __post_init__(self) -> None:
        if self.kind not in ANOMALY_KINDS:
            raise ValueError(f"unknown anomaly kind {self.kind!r}; known: {', '.join(ANOMALY_KINDS)}")
        if self.start.tzinfo is None:
            raise ValueError("anomaly start must be timezone-aware")
        if self.duration <= timedelta(0):
            raise ValueError("anomaly duration must be positive")
        if self.magnitude < 0:
            raise ValueError("anomaly magnitude must be >= 0")

    @classmethod
    def of(
        cls, kind: AnomalyKind, start: datetime, duration: timedelta, magnitude: float | None = None
    ) -> InjectedAnomaly:
        """An anomaly with the kind's default magnitude unless one is given."""
        return cls(kind, start, duration, DEFAULT_MAGNITUDE[kind] if magnitude is None else magnitude)

    @property
    def start_ms(self) -> int:
        """Start as Unix milliseconds."""
        return int(self.start.timestamp() * 1000)

    @property
    def end_ms(self) -> int:
        """Exclusive end as Unix milliseconds."""
        return self.start_ms + int(self.duration.total_seconds() * 1000)

    def covers(self, ts_ms: int) -> bool:
        """Whether ``ts_ms`` lies inside the anomaly's span."""
        return self.start_ms <= ts_ms < self.end_ms

    @classmethod
    def parse(cls, spec: str, now: datetime | None = None) -> InjectedAnomaly:
        """Parse ``KIND@START/DURATION[*MAGNITUDE]``.

        START is an ISO-8601 instant with an offset or ``Z`` (``2026-11-25T10:00Z``), or an
        offset from ``now`` such as ``+10m``. Example: ``revenue_drop@+5m/20m*0.1``.
        """
        match = re.match(r"^(\w+)@(.+)/([\d.]+[smhd])(?:\*([\d.]+))?$", spec.strip())
        if not match:
            raise ValueError(f"invalid anomaly {spec!r}: expected KIND@START/DURATION[*MAGNITUDE]")
        kind, start_text, duration_text, magnitude_text = match.groups()
        if kind not in ANOMALY_KINDS:
            raise ValueError(f"unknown anomaly kind {kind!r}; known: {', '.join(ANOMALY_KINDS)}")
        if start_text.startswith("+"):
            start = (now or datetime.now(UTC)) + parse_duration(start_text[1:])
        else:
            try:
                start = datetime.fromisoformat(start_text.replace("Z", "+00:00"))
            except ValueError as exc:
                raise ValueError(f"invalid anomaly start {start_text!r}: {exc}") from exc
            if start.tzinfo is None:
                raise ValueError(f"anomaly start {start_text!r} needs a timezone (Z or +HH:MM)")
        magnitude = float(magnitude_text) if magnitude_text else None
        return cls.of(kind, start, parse_duration(duration_text), magnitude)  # type: ignore[arg-type]


def magnitude_at(anomalies: tuple[InjectedAnomaly, ...], kind: str, ts_ms: int) -> float | None:
    """The magnitude of the first ``kind`` anomaly covering ``ts_ms``, or None when none does."""
    for anomaly in anomalies:
        if anomaly.kind == kind and anomaly.covers(ts_ms):
            return anomaly.magnitude
    return None
