"""Live pacing of demo traffic, and the examples in the demo package's docstrings."""

from __future__ import annotations

import doctest
from datetime import UTC, datetime, timedelta

import pytest

import tidemark.demo.anomalies
import tidemark.demo.experiments
import tidemark.demo.seasonality
import tidemark.demo.traffic
from tidemark.demo import generate_events, live_config, paced


class ManualClock:
    """A clock that only moves when the code under test sleeps (pure logic, no waiting)."""

    def __init__(self, now: float) -> None:
        self.now = now
        self.slept: list[float] = []

    def time(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds > 0
        self.slept.append(seconds)
        self.now += seconds


def test_paced_releases_each_item_at_its_due_time_with_heartbeats() -> None:
    clock = ManualClock(100.0)
    released: list[tuple[float, float | None]] = []
    for item in paced([99.0, 100.0, 102.5, 102.5, 106.0], lambda x: x, clock.time, clock.sleep, heartbeat=1.0):
        released.append((clock.now, item))
    items = [(now, item) for now, item in released if item is not None]
    assert [item for _, item in items] == [99.0, 100.0, 102.5, 102.5, 106.0]
    assert all(now >= item for now, item in items)  # never early
    assert items[0][0] == 100.0 and items[1][0] == 100.0  # the past streams out at once
    assert items[2][0] == 102.5 and items[4][0] == 106.0  # never late either
    heartbeats = [now for now, item in released if item is None]
    assert heartbeats == [101.0, 102.0, 103.5, 104.5, 105.5]
    assert max(clock.slept) <= 1.0


def test_live_config_backfills_then_continues_at_about_the_rate() -> None:
    now = datetime(2026, 11, 25, 12, tzinfo=UTC)
    config = live_config(2.0, seed=9, backfill=timedelta(hours=6), now=now, seasonality=0.0)
    assert config.end is None and config.start == now - timedelta(hours=6)
    events = generate_events(config)
    backfill = 0
    for event in events:
        if event.timestamp >= now:
            break
        backfill += 1
    rate = backfill / (6 * 3600)
    assert 1.4 < rate < 2.6, rate
    # The endless stream keeps going past "now" with increasing timestamps.
    later = [next(events).timestamp for _ in range(100)]
    assert later == sorted(later) and later[0] >= now


@pytest.mark.parametrize(
    "module",
    [tidemark.demo.anomalies, tidemark.demo.experiments, tidemark.demo.seasonality, tidemark.demo.traffic],
)
def test_docstring_examples_run(module: object) -> None:
    result = doctest.testmod(module, raise_on_error=False)  # type: ignore[arg-type]
    assert result.attempted > 0
    assert result.failed == 0
