"""Daily and weekly seasonality of demo traffic, in a local timezone.

People use the platform in their waking hours: little at 04:00, a lunchtime bump,
an evening peak. Weekends start later and are quieter overall. The intensity is a
piecewise-linear curve through one knot per local hour, scaled so that its average
over a week is exactly 1, so ``sessions_per_day`` keeps its meaning whatever the shape.

>>> s = Seasonality("UTC")
>>> from datetime import datetime, UTC
>>> ms = lambda d: int(d.timestamp() * 1000)
>>> s.factor(ms(datetime(2026, 11, 25, 14, tzinfo=UTC))) > 3 * s.factor(ms(datetime(2026, 11, 25, 4, tzinfo=UTC)))
True
>>> Seasonality("UTC", amplitude=0.0).factor(ms(datetime(2026, 11, 25, 4, tzinfo=UTC)))
1.0
"""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

# Relative activity at each local hour (knot at HH:00).
# fmt: off
WEEKDAY_CURVE: tuple[float, ...] = (
    0.35, 0.22, 0.15, 0.12, 0.12, 0.18,  # 00-05
    0.35, 0.65, 0.95, 1.10, 1.20, 1.30,  # 06-11
    1.45, 1.50, 1.40, 1.30, 1.25, 1.30,  # 12-17
    1.45, 1.65, 1.70, 1.45, 1.00, 0.60,  # 18-23
)
WEEKEND_CURVE: tuple[float, ...] = (
    0.50, 0.35, 0.25, 0.18, 0.14, 0.14,  # 00-05
    0.20, 0.30, 0.50, 0.75, 1.00, 1.20,  # 06-11
    1.30, 1.35, 1.35, 1.30, 1.25, 1.25,  # 12-17
    1.30, 1.40, 1.40, 1.25, 0.95, 0.70,  # 18-23
)
# fmt: on
# Monday .. Sunday (ISO weekday - 1).
WEEKDAY_FACTORS: tuple[float, ...] = (1.02, 1.05, 1.05, 1.03, 0.95, 0.78, 0.84)

WEEKEND = (5, 6)


def _curve(weekday: int) -> tuple[float, ...]:
    return WEEKEND_CURVE if weekday in WEEKEND else WEEKDAY_CURVE


def _weekly_mean() -> float:
    # Mean of a piecewise-linear periodic curve through equally spaced knots = mean of the knots.
    total = sum(WEEKDAY_FACTORS[d] * sum(_curve(d)) / 24 for d in range(7))
    return total / 7


class Seasonality:
    """Relative traffic intensity at an instant (1.0 = the weekly average).

    ``amplitude`` blends between flat traffic (0) and the full curves (1).
    """

    def __init__(self, timezone: str = "UTC", amplitude: float = 1.0) -> None:
        if amplitude < 0:
            raise ValueError("amplitude must be >= 0")
        self.timezone = ZoneInfo(timezone)
        self.amplitude = amplitude
        self._norm = _weekly_mean()
        raw_max = max(max(WEEKDAY_CURVE) * max(WEEKDAY_FACTORS), max(WEEKEND_CURVE) * max(WEEKDAY_FACTORS))
        self.max_factor = 1.0 + amplitude * max(0.0, raw_max / self._norm - 1.0)

    def factor(self, ts_ms: int) -> float:
        """Intensity at ``ts_ms`` (Unix milliseconds), following local time in the configured timezone."""
        if self.amplitude == 0:
            return 1.0
        local = datetime.fromtimestamp(ts_ms / 1000, self.timezone)
        weekday = local.weekday()
        curve = _curve(weekday)
        position = local.hour + (local.minute * 60 + local.second) / 3600
        low = int(position) % 24
        high = (low + 1) % 24
        frac = position - int(position)
        raw = (curve[low] * (1 - frac) + curve[high] * frac) * WEEKDAY_FACTORS[weekday] / self._norm
        return max(0.0, 1.0 + self.amplitude * (raw - 1.0))
