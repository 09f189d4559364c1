"""Reporting periods in a timezone, and tumbling windows on event time with grace and lateness."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest

from streams.aggregators import compile_catalogue
from streams.catalogue import CATALOGUE
from streams.periods import PERIODS, Period, PeriodCalendar
from streams.processor import PartitionProcessor
from tests.metric_reference import event, ms, period_bounds
from tests.stream_harness import LocalPipeline

BERLIN = "Europe/Berlin"


@pytest.mark.parametrize("tz", ["UTC", BERLIN, "America/New_York", "Asia/Kolkata", "Australia/Lord_Howe"])
@pytest.mark.parametrize("week_start", [1, 7])
def test_calendar_agrees_with_wall_clock_reference(tz: str, week_start: int) -> None:
    calendar = PeriodCalendar(tz, week_start)
    rng = random.Random(tz)
    base = ms(datetime(2026, 1, 1, tzinfo=UTC))
    stamps = [base + rng.randrange(365 * 24 * 3_600_000) for _ in range(1500)]
    # Around every DST change of 2026 in Europe and the US, minute by minute.
    for change in (datetime(2026, 3, 29, 1, tzinfo=UTC), datetime(2026, 10, 25, 1, tzinfo=UTC),
                   datetime(2026, 3, 8, 7, tzinfo=UTC), datetime(2026, 11, 1, 6, tzinfo=UTC)):
        stamps += [ms(change) + k * 60_000 for k in range(-90, 90, 7)]
    for ts in stamps:
        for period in PERIODS:
            assert calendar.bounds(period, ts) == period_bounds(period.value, ts, tz, week_start), (period, ts)


def test_berlin_dst_days_last_23_and_25_hours() -> None:
    calendar = PeriodCalendar(BERLIN)
    spring = calendar.bounds(Period.day, ms(datetime(2026, 3, 29, 12, tzinfo=UTC)))
    autumn = calendar.bounds(Period.day, ms(datetime(2026, 10, 25, 12, tzinfo=UTC)))
    assert spring[1] - spring[0] == 23 * 3_600_000
    assert autumn[1] - autumn[0] == 25 * 3_600_000
    assert spring[0] == ms(datetime(2026, 3, 28, 23, tzinfo=UTC))  # local midnight, still CET
    week = calendar.bounds(Period.week, ms(datetime(2026, 3, 29, 12, tzinfo=UTC)))
    assert week == (ms(datetime(2026, 3, 22, 23, tzinfo=UTC)), ms(datetime(2026, 3, 29, 22, tzinfo=UTC)))
    assert (week[1] - week[0]) == 7 * 24 * 3_600_000 - 3_600_000


T0 = datetime(2026, 3, 2, 10, 0, tzinfo=UTC)


def _processor(grace: timedelta = timedelta(minutes=5)) -> PartitionProcessor:
    aggregators = compile_catalogue(CATALOGUE, ["page_views"])
    return PartitionProcessor(0, aggregators, PeriodCalendar("UTC"), grace=grace)


def _values(pipeline: LocalPipeline, period: str) -> dict[int, float]:
    return {k[2]: v for k, v in pipeline.snapshots.items() if k[0] == "page_views" and k[1] == period and k[3] == ""}


def test_out_of_order_within_grace_lands_in_its_window() -> None:
    pipeline = LocalPipeline(partitions=1, names=["page_views"])
    events = [
        event("page_view", T0 + timedelta(seconds=10)),
        event("page_view", T0 + timedelta(minutes=3)),
        event("page_view", T0 + timedelta(seconds=50), anonymous_id="dev-2"),  # 2m10s late: within 5 min
        event("page_view", T0 + timedelta(minutes=5, seconds=59)),
        event("page_view", T0 + timedelta(seconds=59), anonymous_id="dev-3"),  # window 10:00 ends 10:01 + 5m > 10:05:59
    ]
    pipeline.feed(events, flush_every=1)
    minutes = _values(pipeline, "minute")
    assert minutes[ms(T0)] == 3.0
    assert minutes[ms(T0 + timedelta(minutes=3))] == 1.0
    assert pipeline.processors[0].late_events == {}


def test_beyond_grace_is_counted_late_and_still_counts_in_longer_periods() -> None:
    pipeline = LocalPipeline(partitions=1, names=["page_views"])
    events = [
        event("page_view", T0 + timedelta(seconds=10)),
        event("page_view", T0 + timedelta(minutes=6)),  # watermark 10:06: minute 10:00 closed (10:01 + 5m)
        event("page_view", T0 + timedelta(seconds=30), anonymous_id="dev-2"),  # late for its minute only
    ]
    pipeline.feed(events, flush_every=1)
    assert _values(pipeline, "minute")[ms(T0)] == 1.0
    assert _values(pipeline, "hour")[ms(T0)] == 3.0
    assert _values(pipeline, "day")[ms(T0.replace(hour=0))] == 3.0
    assert pipeline.processors[0].late_events == {"minute": 1}


def test_an_event_past_every_window_is_only_counted_late() -> None:
    pipeline = LocalPipeline(partitions=1, names=["page_views"], grace=timedelta(minutes=1))
    events = [event("page_view", T0), event("page_view", T0 + timedelta(days=40)), event("page_view", T0)]
    pipeline.feed(events, flush_every=1)
    # Late for every period; and for sessions, since it precedes the device's open session.
    assert pipeline.processors[0].late_events == {**{p.value: 1 for p in PERIODS}, "sessions": 1}
    assert _values(pipeline, "month")[ms(datetime(2026, 3, 1, tzinfo=UTC))] == 1.0


def test_checkpoint_restore_and_replay_never_double_count() -> None:
    """A partition restored from a checkpoint and replayed from an older offset ends with the same values."""
    from tests.metric_reference import demo_dataset

    events = demo_dataset(sessions_per_day=25, seed=3)
    straight = LocalPipeline(tz=BERLIN, partitions=2)
    straight.feed(events, flush_every=300)

    crashed = LocalPipeline(tz=BERLIN, partitions=2)
    half = len(events) // 2
    log = crashed.feed(events[:half], flush_every=300)
    saved = [p.checkpoint() for p in crashed.processors]
    log += crashed.feed(events[half : half + 200], flush_every=300)  # published, then the worker dies
    for p, blob in enumerate(saved):
        restored = crashed.new_processor(p)
        restored.restore(blob)
        crashed.processors[p] = restored
    crashed.offsets = [0, 0]
    # Kafka redelivers from the committed offset, at or before the checkpoint: the whole log again.
    for i, model in enumerate(events, 1):
        from streams.events import StreamEvent

        e = StreamEvent.from_model(model)
        p = crashed.partition_of(e)
        crashed.processors[p].process(e, crashed.offsets[p])
        crashed.offsets[p] += 1
        if i % 300 == 0:
            crashed.flush()
    crashed.flush()
    assert crashed.snapshots == straight.snapshots
    assert {k: (s.events, s.duration_ms) for k, s in crashed.sessions.items()} == {
        k: (s.events, s.duration_ms) for k, s in straight.sessions.items()
    }


def test_grace_is_named_and_default_five_minutes() -> None:
    assert _processor().metrics.grace_ms == 5 * 60_000


def test_a_session_starting_after_its_minute_closed_counts_where_its_windows_still_exist() -> None:
    """Session windows are judged when the session starts: one that exists counts it, a closed one that does not
    exist counts it late (once per session metric it would have served), the longer periods count it."""
    pipeline = LocalPipeline(partitions=1, names=["sessions", "session_duration"])
    kenya, germany = {"location": {"country": "KE"}}, {"location": {"country": "DE"}}
    events = [
        event("page_view", T0 + timedelta(seconds=10), anonymous_id="dev-1", context=kenya),
        event("page_view", T0 + timedelta(minutes=7), anonymous_id="dev-2", context=kenya),  # minute 10:00 closes
        # A new device starting in minute 10:00: the total's window exists (dev-1's session keeps it open), the
        # window of Germany does not and is closed.
        event("page_view", T0 + timedelta(seconds=20), anonymous_id="dev-3", context=germany),
        event("page_view", T0 + timedelta(seconds=50), anonymous_id="dev-3", context=germany),
        event("page_view", T0 + timedelta(hours=2), anonymous_id="dev-4"),  # everything before closes
    ]
    pipeline.feed(events, flush_every=2)
    minute = {(k[0], k[3]): v for k, v in pipeline.snapshots.items() if k[1] == "minute" and k[2] == ms(T0)}
    hour = {(k[0], k[3]): v for k, v in pipeline.snapshots.items() if k[1] == "hour" and k[2] == ms(T0)}
    assert minute == {("sessions", ""): 2.0, ("sessions", "country=KE"): 1.0,
                      ("session_duration", ""): 15.0, ("session_duration", "country=KE"): 0.0}
    assert hour[("sessions", "")] == 3.0 and hour[("sessions", "country=DE")] == 1.0
    assert hour[("session_duration", "country=DE")] == 30.0
    assert pipeline.processors[0].late_events == {"session_minute": 2}
