"""Every streamed catalogue metric at every period equals the plain-Python reference on the demo dataset.

The dataset spans Europe/Berlin's 23-hour day (2026-03-29), the week boundary of
Monday 2026-03-30 and the March/April month boundary.
"""

from __future__ import annotations

import math
from datetime import datetime, time
from zoneinfo import ZoneInfo

import pytest

from streams.catalogue import CATALOGUE
from streams.periods import Period
from tests.metric_reference import DST_DAY, demo_dataset, ms, period_bounds, reference_snapshots
from tests.stream_harness import LocalPipeline

STREAMED = [d.name for d in CATALOGUE.streaming()]
GRACE_MS = 5 * 60_000


@pytest.fixture(scope="module")
def dataset():
    return demo_dataset()


def _diff(expected: dict, actual: dict) -> list:
    return sorted(
        (k, expected.get(k), actual.get(k))
        for k in set(expected) | set(actual)
        if k not in expected or k not in actual or not math.isclose(expected[k], actual[k], rel_tol=1e-9, abs_tol=1e-9)
    )


@pytest.mark.parametrize(("tz", "partitions", "flush_every"), [("Europe/Berlin", 3, 400), ("UTC", 2, 900)])
def test_stream_equals_reference(dataset, tz: str, partitions: int, flush_every: int) -> None:
    pipeline = LocalPipeline(tz=tz, partitions=partitions)
    pipeline.feed(dataset, flush_every=flush_every)
    expected = reference_snapshots(dataset, CATALOGUE, tz=tz, names=STREAMED, stitch_grace_ms=GRACE_MS)
    assert _diff(expected, pipeline.snapshots) == []
    # The dataset exercises what the test claims: every streamed metric, at every period it has.
    produced = {(k[0], k[1]) for k in pipeline.snapshots}
    for name in STREAMED:
        for period in CATALOGUE[name].periods:
            assert (name, period.value) in produced, (name, period)
    assert all(not p.late_events for p in pipeline.processors)


def test_berlin_dst_day_and_week_boundary_are_covered(dataset) -> None:
    pipeline = LocalPipeline(tz="Europe/Berlin", partitions=2)
    pipeline.feed(dataset, flush_every=600)
    berlin = ZoneInfo("Europe/Berlin")
    dst_day = ms(datetime.combine(DST_DAY, time(0), tzinfo=berlin))
    start, end = period_bounds("day", dst_day, "Europe/Berlin")
    assert (start, end - start) == (dst_day, 23 * 3_600_000)
    assert ("dau", "day", start, "") in pipeline.snapshots
    hours = {k[2] for k in pipeline.snapshots if k[:2] == ("page_views", "hour") and start <= k[2] < end}
    assert 0 < len(hours) <= 23
    weeks = sorted({k[2] for k in pipeline.snapshots if k[1] == Period.week.value})
    monday = ms(datetime(2026, 3, 30, tzinfo=berlin))
    assert weeks == [ms(datetime(2026, 3, 23, tzinfo=berlin)), monday]
