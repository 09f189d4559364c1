"""From a detector's score to a severity on-call understands, and a one-line description.

Thresholds are minimum scores per severity; the default suits the default detector's
scores (``-log10`` of a tail probability, see :mod:`streams.anomaly.likelihood`). The
lowest one is the firing threshold: 4 (one in ten thousand) keeps a clean business series
quiet for months; the NAB-optimal 2.4 pages more often, which NAB's weights tolerate and
on-call does not.

>>> scale = SeverityScale()
>>> [getattr(scale.classify(s), "value", None) for s in (1.0, 4.5, 6.0, 7.5, 12.0)]
[None, 'low', 'medium', 'high', 'critical']
>>> describe("signups", {"country": "DE"}, "hour", expected=120.0, actual=12.0, score=7.2)
'signups (country=DE, hour) is 12 vs 120 expected (-90.0%), score 7.2'
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from schemas.anomaly import Severity

DEFAULT_THRESHOLDS: dict[str, float] = {"low": 4.0, "medium": 5.5, "high": 7.0, "critical": 9.0}


@dataclass(frozen=True)
class SeverityScale:
    """Minimum score of each severity."""

    thresholds: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_THRESHOLDS))

    def __post_init__(self) -> None:
        ordered = [self.thresholds[s.value] for s in Severity]  # KeyError names a missing severity
        if ordered != sorted(ordered):
            raise ValueError(f"severity thresholds must increase from low to critical: {dict(self.thresholds)}")

    @property
    def firing(self) -> float:
        """The score at which a series fires (the ``low`` threshold)."""
        return self.thresholds[Severity.low.value]

    def classify(self, score: float) -> Severity | None:
        """The highest severity whose threshold ``score`` reaches; ``None`` below ``low``."""
        found = None
        for severity in Severity:
            if score >= self.thresholds[severity.value]:
                found = severity
        return found


def _number(value: float) -> str:
    return f"{value:,.4g}" if abs(value) < 1e6 else f"{value:,.0f}"


def describe(
    metric_type: str, dimensions: Mapping[str, str], period: str, expected: float, actual: float, score: float
) -> str:
    """A human sentence for alert texts: what, where, how far from expected."""
    where = ", ".join([*(f"{k}={v}" for k, v in sorted(dimensions.items())), period])
    change = f" ({(actual - expected) / abs(expected):+.1%})" if expected else ""
    return f"{metric_type} ({where}) is {_number(actual)} vs {_number(expected)} expected{change}, score {score:.1f}"
