"""Where the retention rollup path places an instant: one lookup per bucket against the reference calendar.

``bucket_periods`` computes, once per request, each 7-day UTC bucket's cut and the period bits
on either side of it; the SQL gives every first and last instant of the rollup the bit that
:meth:`BucketPeriods.bit` gives here. The reference is tests/analysis_reference.py's
``period_index`` (the local calendar of the zone, event by event).
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest

from api.analyses.models import AnalysisSettings
from api.analyses.query import TimeRange
from api.analyses.retention import bucket_periods
from tests.analysis_reference import period_index

# Zones with DST on either hemisphere, half- and quarter-hour offsets, and the extremes of the offsets.
ZONES = ["Europe/Berlin", "America/New_York", "Australia/Sydney", "Asia/Kathmandu", "Pacific/Kiritimati", "Etc/GMT+12"]


def local_midnights(since: datetime, days: int, tz: str) -> list[datetime]:
    """The instants the zone's days start (every week and month start among them)."""
    zone = ZoneInfo(tz)
    first = since.astimezone(zone).date()
    return [datetime.combine(first + timedelta(days=d), time(), zone).astimezone(UTC) for d in range(days)]


def reference_bit(ts: datetime, start: datetime, end: datetime, period: str, tz: str, week_start: int, n: int) -> int:
    i = period_index(ts, start, period, tz, week_start)
    return 1 << i if ts < end and 0 <= i < n else 0


@pytest.mark.parametrize("seed", range(6))
def test_each_instant_gets_its_local_period(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(20):
        period = rng.choice(["week", "month"])
        tz, week_start = rng.choice(ZONES), rng.choice([1, 7])
        n = rng.randint(1, 14) if period == "week" else rng.randint(1, 5)
        start = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=rng.randint(0, 300 * 86400))
        end = start + timedelta(seconds=rng.randint(3600, 160 * 86400), milliseconds=rng.randint(0, 999))
        placed = bucket_periods(
            period, AnalysisSettings(timezone=tz, week_start=week_start), TimeRange(start=start, end=end), n
        )
        assert placed is not None
        # Random instants, and the instants around the range's cuts and every period start.
        instants = [start - timedelta(days=40) + timedelta(seconds=rng.randint(0, 250 * 86400)) for _ in range(300)]
        for edge in [start, end, *local_midnights(start - timedelta(days=40), 250, tz)]:
            instants += [edge - timedelta(milliseconds=1), edge, edge + timedelta(milliseconds=1)]
        for ts in instants:
            want = reference_bit(ts, start, end, period, tz, week_start, n)
            assert placed.bit(ts) == want, (ts, period, tz, week_start, n, start, end)


def test_the_end_cuts_its_bucket() -> None:
    """A range ending on a Tuesday (UTC weeks): the rest of the end's bucket places nothing."""
    start, end = datetime(2026, 3, 2, tzinfo=UTC), datetime(2026, 3, 17, 12, tzinfo=UTC)
    placed = bucket_periods("week", AnalysisSettings(), TimeRange(start=start, end=end), 12)
    assert placed is not None
    assert placed.bit(end - timedelta(milliseconds=1)) == 1 << 2
    assert placed.bit(end) == 0
    assert placed.bit(datetime(2026, 3, 18, 12, tzinfo=UTC)) == 0  # still the end's bucket (Thursday to Thursday)


def test_a_bucket_with_two_period_starts_cannot_be_placed() -> None:
    """Days: a 7-day bucket holds seven day starts, so first and last instants cannot tell the days between."""
    start = datetime(2026, 3, 2, tzinfo=UTC)
    time_range = TimeRange(start=start, end=start + timedelta(days=30))
    assert bucket_periods("day", AnalysisSettings(), time_range, 30) is None
    assert bucket_periods("week", AnalysisSettings(), time_range, 5) is not None
