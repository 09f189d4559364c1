"""Reporting periods (minute, hour, day, week, month) in the reporting timezone.

A period is a half-open interval ``[start, end)`` of UTC instants. Day, week and month
boundaries are local midnights in the reporting timezone, so a day can last 23 or 25
hours around a DST change (Europe/Berlin 2026-03-29 lasts 23 hours). Minute and hour
boundaries are local too: for a zone whose offset is not a whole number of hours
(Asia/Kolkata, +05:30) the hour starts at :30 UTC.

All instants are integer milliseconds since the epoch: that is what the wire carries and
it keeps the hot path free of datetime objects. Results are cached per 15-minute block
of UTC time, because every timezone offset in the tz database changes on a
quarter-hour boundary.

>>> cal = PeriodCalendar("Europe/Berlin")
>>> start, end = cal.bounds(Period.day, 1774778400000)  # 2026-03-29 10:00 UTC
>>> (end - start) // 3_600_000
23
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from enum import StrEnum
from zoneinfo import ZoneInfo

MINUTE_MS = 60_000
HOUR_MS = 3_600_000
_BLOCK_MS = 15 * MINUTE_MS


class Period(StrEnum):
    """The granularities metric snapshots are computed at (``metric_snapshots.period``)."""

    minute = "minute"
    hour = "hour"
    day = "day"
    week = "week"
    month = "month"


PERIODS: tuple[Period, ...] = (Period.minute, Period.hour, Period.day, Period.week, Period.month)


def to_millis(value: datetime) -> int:
    """Milliseconds since the epoch of an aware datetime."""
    return int(value.timestamp()) * 1000 + value.microsecond // 1000


def from_millis(value: int) -> datetime:
    """The aware UTC datetime of a millisecond timestamp."""
    return datetime.fromtimestamp(value / 1000, tz=UTC)


class PeriodCalendar:
    """Maps an instant to the period containing it, in one reporting timezone.

    ``week_start`` uses ISO numbering (1 = Monday ... 7 = Sunday).
    """

    def __init__(self, timezone: str = "UTC", week_start: int = 1) -> None:
        if not 1 <= week_start <= 7:
            raise ValueError("week_start must be 1 (Monday) ... 7 (Sunday)")
        self.timezone = timezone
        self.zone = ZoneInfo(timezone)
        self.week_start = week_start
        self._cache: dict[tuple[Period, int], tuple[int, int]] = {}

    def bounds(self, period: Period, ts_ms: int) -> tuple[int, int]:
        """``(start_ms, end_ms)`` of the ``period`` containing instant ``ts_ms``."""
        if period == "minute":
            start = ts_ms - ts_ms % MINUTE_MS  # every zone's offset is a whole number of minutes
            return start, start + MINUTE_MS
        key = (period, ts_ms // _BLOCK_MS)
        cached = self._cache.get(key)
        if cached is None:
            if len(self._cache) > 200_000:  # bounded: a long-running worker walks forward in time
                self._cache.clear()
            cached = self._compute(Period(period), ts_ms)
            self._cache[key] = cached
        return cached

    def start(self, period: Period, ts_ms: int) -> int:
        """Start (ms) of the period containing ``ts_ms``."""
        return self.bounds(period, ts_ms)[0]

    def periods_between(self, period: Period, from_ms: int, to_ms: int) -> list[tuple[int, int]]:
        """Every period that intersects ``[from_ms, to_ms)``, in order."""
        out: list[tuple[int, int]] = []
        cursor = from_ms
        while cursor < to_ms:
            start, end = self.bounds(period, cursor)
            out.append((start, end))
            cursor = end
        return out

    def _compute(self, period: Period, ts_ms: int) -> tuple[int, int]:
        local = from_millis(ts_ms).astimezone(self.zone)
        if period is Period.hour:
            # Floor the local wall clock to the hour, keeping the UTC offset in force at ts.
            offset_ms = int(local.utcoffset().total_seconds() * 1000)  # type: ignore[union-attr]
            wall = ts_ms + offset_ms
            start = wall - wall % HOUR_MS - offset_ms
            if start > ts_ms:  # a transition inside this hour moved the floor past ts
                start -= HOUR_MS
            return start, start + HOUR_MS
        day = local.date()
        if period is Period.day:
            return self._midnight(day), self._midnight(day + timedelta(days=1))
        if period is Period.week:
            first = day - timedelta(days=(day.isoweekday() - self.week_start) % 7)
            return self._midnight(first), self._midnight(first + timedelta(days=7))
        if period is Period.month:
            first = day.replace(day=1)
            following = date(first.year + first.month // 12, first.month % 12 + 1, 1)
            return self._midnight(first), self._midnight(following)
        raise ValueError(f"unknown period {period!r}")

    def _midnight(self, day: date) -> int:
        # The first instant of a local calendar day (zoneinfo resolves a skipped midnight forward).
        return to_millis(datetime(day.year, day.month, day.day, tzinfo=self.zone))
