"""Seasonal baseline with robust z-scores: Tidemark's default series detector.

Business series repeat by hour of day and day of week. For every *season slot* (e.g.
"Tuesday 14:00-15:00 local time") the detector keeps the last ``slot_window`` values it
saw there; the expected value is their median and the spread their MAD (median absolute
deviation, scaled by 1.4826 to estimate a standard deviation). An observation's score is
its robust z-score ``|x - median| / spread`` against the most specific season that already
has ``min_slot_obs`` values (hour of week, then hour of day), else against the last
``recent_window`` values regardless of season. Old values fall out of the bounded
windows, which is the detector's forgetting.

Median and MAD ignore the outliers they are meant to find, unlike mean and standard
deviation, so an anomaly does not hide the next one; the bounded windows let the baseline
follow a level shift after ``slot_window`` seasons.

Parameters
----------
seasons
    Season slots to try, most specific first: any of ``hour_of_week``, ``hour_of_day``,
    ``day_of_week``, ``minute_of_hour``.
slot_window
    Values remembered per season slot.
recent_window
    Values remembered for the season-less baseline.
min_slot_obs
    Values a season slot needs before its median is trusted as the expected value.
min_scale_obs
    Values a season slot needs before its spread is trusted (default: ``min_slot_obs``).
    A MAD of three values is mostly luck: with a higher bar the spread comes from the
    next, broader season (hour of day instead of hour of week) until the slot has enough
    values, so a young weekly slot does not turn ordinary noise into a page.
judge_constant
    Whether to score a series whose recent window holds one repeated value (False: score 0).
    A rare event's count (0, 0, 0, ...) has no measured noise: against a spread of nothing,
    its first occurrence would be infinitely unusual. Business series use False; the NAB
    corpus, whose flat stretches end in real anomalies, keeps True.
warm_up
    Observations before any non-zero score.
timezone
    IANA timezone in which seasons are read (business hours are local).
min_scale
    Smallest spread, relative to the season-less spread, so that a perfectly regular slot
    does not turn every rounding difference into an anomaly.

Examples
--------
>>> from datetime import UTC, datetime, timedelta
>>> detector = SeasonalRobustZ(warm_up=48)
>>> start = datetime(2024, 1, 1, tzinfo=UTC)
>>> for i in range(24 * 7):  # a week of hourly values: busy by day, quiet by night
...     t = start + timedelta(hours=i)
...     x = {"value": 100.0 + (50.0 if 9 <= t.hour < 18 else 0.0) + (i % 3), "t": t}
...     detector.learn_one(x)
>>> noon = start + timedelta(days=7, hours=12)
>>> detector.expected_one({"value": 0.0, "t": noon})
150.0
>>> detector.score_one({"value": 150.0, "t": noon})
0.0
>>> detector.score_one({"value": 100.0, "t": noon}) > 10.0  # a night-time level at noon
True
"""

from __future__ import annotations

import statistics
from collections import deque
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from streams.anomaly.base import Observation, SeriesDetector

MAD_TO_SIGMA = 1.4826  # MAD of a normal distribution times this is its standard deviation
MEAN_AD_TO_SIGMA = 1.2533  # sqrt(pi / 2): the same for the mean absolute deviation
SEASONS = ("hour_of_week", "hour_of_day", "day_of_week", "minute_of_hour")


def season_slot(season: str, t: datetime) -> str:
    """The slot of ``t`` (already in local time) for a season, as a short key.

    >>> from datetime import datetime
    >>> season_slot("hour_of_week", datetime(2024, 1, 2, 14, 30))  # Tuesday
    'hw1.14'
    """
    if season == "hour_of_week":
        return f"hw{t.weekday()}.{t.hour}"
    if season == "hour_of_day":
        return f"hd{t.hour}"
    if season == "day_of_week":
        return f"dw{t.weekday()}"
    if season == "minute_of_hour":
        return f"mh{t.minute}"
    raise ValueError(f"unknown season {season!r}; expected one of {SEASONS}")


def robust_location_scale(values: deque[float] | list[float]) -> tuple[float, float]:
    """Median and MAD-based standard deviation of ``values``.

    Quantised series (counts, prices) often have a MAD of 0; then the mean absolute
    deviation (scaled to a standard deviation) stands in, so that a single change is not
    an infinitely large anomaly.

    >>> robust_location_scale([1.0, 2.0, 3.0, 4.0, 100.0])
    (3.0, 1.4826)
    >>> robust_location_scale([5.0, 5.0, 5.0, 9.0])
    (5.0, 1.2533)
    """
    median = statistics.median(values)
    deviations = [abs(v - median) for v in values]
    mad = statistics.median(deviations)
    if mad > 0:
        return median, MAD_TO_SIGMA * mad
    return median, MEAN_AD_TO_SIGMA * statistics.fmean(deviations)


class SeasonalRobustZ(SeriesDetector):
    """Robust z-score of a value against its season's recent median and MAD."""

    def __init__(
        self,
        seasons: tuple[str, ...] | list[str] = ("hour_of_week", "hour_of_day"),
        slot_window: int = 8,
        recent_window: int = 48,
        min_slot_obs: int = 4,
        warm_up: int = 48,
        timezone: str = "UTC",
        min_scale: float = 0.1,
        min_scale_obs: int | None = None,
        judge_constant: bool = True,
    ) -> None:
        for season in seasons:
            season_slot(season, datetime(2024, 1, 1))  # fail on a typo at construction, not on data
        self.seasons = tuple(seasons)
        self.slot_window = slot_window
        self.recent_window = recent_window
        self.min_slot_obs = min_slot_obs
        self.warm_up = warm_up
        self.timezone = timezone
        self.min_scale = min_scale
        self.min_scale_obs = min_slot_obs if min_scale_obs is None else min_scale_obs
        self.judge_constant = judge_constant
        self._zone = ZoneInfo(timezone)
        self._slots: dict[str, deque[float]] = {}
        self._recent: deque[float] = deque(maxlen=recent_window)
        self.n_seen = 0

    def _keys(self, t: datetime) -> list[str]:
        local = t.astimezone(self._zone) if t.tzinfo is not None else t
        return [season_slot(season, local) for season in self.seasons]

    def baseline(self, x: Observation) -> tuple[float, float] | None:
        """Expected value and spread for ``x``'s time, from the most specific trusted season."""
        if not self._recent:
            return None
        recent_location, recent_scale = robust_location_scale(self._recent)
        location, scale = recent_location, recent_scale
        located = False
        for key in self._keys(x["t"]):
            slot = self._slots.get(key)
            if slot is None:
                continue
            if not located and len(slot) >= self.min_slot_obs:
                location, scale = robust_location_scale(slot)
                located = True
                if len(slot) >= self.min_scale_obs:
                    break
            elif located and len(slot) >= self.min_scale_obs:
                scale = robust_location_scale(slot)[1]  # the broader season's spread, from enough values
                break
        floor = max(self.min_scale * recent_scale, 1e-9 * max(1.0, abs(location)))
        return location, max(scale, floor)

    def expected_one(self, x: Observation) -> float | None:
        """The season's median at ``x["t"]``."""
        found = self.baseline(x)
        return None if found is None else found[0]

    def score_one(self, x: Observation) -> float:
        """Robust z-score of ``x["value"]``; 0 during warm-up."""
        if self.n_seen < self.warm_up:
            return 0.0
        if not self.judge_constant and self._recent and min(self._recent) == max(self._recent):
            return 0.0
        found = self.baseline(x)
        if found is None:
            return 0.0
        location, scale = found
        return abs(float(x["value"]) - location) / scale

    def learn_one(self, x: Observation) -> None:
        """Remember ``x["value"]`` in its season slots and in the recent window."""
        value = float(x["value"])
        for key in self._keys(x["t"]):
            slot = self._slots.get(key)
            if slot is None:
                slot = self._slots[key] = deque(maxlen=self.slot_window)
            slot.append(value)
        self._recent.append(value)
        self.n_seen += 1

    def state_dict(self) -> dict[str, Any]:
        """Slots, recent values and count as plain JSON data."""
        return {
            "n_seen": self.n_seen,
            "recent": list(self._recent),
            "slots": {key: list(values) for key, values in self._slots.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` wrote (windows are re-bounded by the current parameters)."""
        self.n_seen = int(state["n_seen"])
        self._recent = deque((float(v) for v in state["recent"]), maxlen=self.recent_window)
        self._slots = {
            key: deque((float(v) for v in values), maxlen=self.slot_window) for key, values in state["slots"].items()
        }
