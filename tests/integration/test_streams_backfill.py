"""Events later than the grace are counted late by the stream and fixed by the batch recompute."""

from __future__ import annotations

import argparse
import math
import time

import pytest

from schemas.streams import metric_snapshot_codec
from sinks.snapshots import SnapshotSink, snapshot_row
from streams.backfill import current_values, format_report, publish, recompute, reconcile, retractions
from streams.catalogue import CATALOGUE
from streams.periods import Period, PeriodCalendar
from streams.windows import MetricValue
from tests.integration.test_metric_sql import insert_events
from tests.metric_reference import DATASET_END, DATASET_START, demo_dataset, ms, reference_snapshots
from tests.stream_harness import LocalPipeline
from tidemark.commands.backfill import run_once

pytestmark = pytest.mark.integration

TZ = "Europe/Berlin"
NAMES = ["dau", "page_views", "gmv", "arpu", "sessions", "active_users", "signups"]
COLUMNS = ["metric_type", "period", "period_start", "period_end", "dimensions", "dimensions_key", "value", "source",
           "computed_at"]


def _wait(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)  # polling interval, with a deadline
    raise AssertionError(f"timed out waiting for {what}")


def test_late_events_are_fixed_by_the_recompute(ch_db, kafka_settings) -> None:
    events = demo_dataset(sessions_per_day=15, seed=8)
    # Twenty page views arrive hours after their time: beyond the 5-minute grace of every minute window.
    late = [e for e in events if e.event_name == "page_view"][5:200:10]
    on_time = [e for e in events if e not in late]
    pipeline = LocalPipeline(tz=TZ, partitions=3, names=NAMES)
    pipeline.feed(on_time + late, flush_every=100)
    assert sum(p.late_events.get("minute", 0) for p in pipeline.processors) == len(late)

    # What the stream published, as the snapshots sink would have written it.
    codec = metric_snapshot_codec()
    rows = []
    for key, value in pipeline.snapshots.items():
        metric, period, start, dkey = key
        dims = dict([dkey.split("=", 1)]) if dkey else {}
        end = PeriodCalendar(TZ).bounds(Period(period), start)[1]
        v = MetricValue(metric, Period(period), start, end, dims, value)
        rows.append(list(snapshot_row(codec.encode(v.to_avro(computed_at=1_000)))))
    ch_db.insert("metric_snapshots", rows, column_names=COLUMNS)
    insert_events(ch_db, events)

    settings = kafka_settings.model_copy(update={"report_timezone": TZ})
    calendar = PeriodCalendar(TZ)
    lo, hi = ms(DATASET_START), ms(DATASET_END)
    values = recompute(ch_db, CATALOGUE, CATALOGUE.select(NAMES), calendar, lo, hi, settings)
    result = reconcile({k: v for k, (v, _) in current_values(ch_db, NAMES, 0, 1 << 60).items()}, values)
    late_minutes = {ms(e.timestamp) // 60_000 * 60_000 for e in late}
    minute_diffs = {d.period_start for d in result.differences if d.period == "minute" and d.metric == "page_views"}
    assert minute_diffs == late_minutes  # exactly the windows the late events missed
    report = format_report(result, TZ, limit=10_000)
    assert f"{len(result.differences)} different" in report
    assert "page_views                 minute" in report

    stale = retractions({k: v for k, (v, _) in current_values(ch_db, NAMES, 0, 1 << 60).items()}, values,
                        CATALOGUE, calendar)
    assert stale  # late events moved session starts: those windows hold nothing in truth
    published = publish(settings, [*values, *stale])
    sink = SnapshotSink(settings, ch_db)
    sink.start()
    try:
        _wait(lambda: sink.committed_messages == published, 60, "the recomputed snapshots to land")
    finally:
        sink.stop()
    expected = reference_snapshots(events, CATALOGUE, tz=TZ, names=NAMES)
    now = {k: v for k, (v, _) in current_values(ch_db, NAMES, 0, 1 << 60).items()}
    retracted = {v.key for v in stale}
    assert all(now[k] == 0.0 or math.isnan(now[k]) for k in retracted)
    now = {k: v for k, v in now.items() if k not in retracted}
    bad = [k for k in set(expected) | set(now)
           if k not in expected or k not in now or not math.isclose(expected[k], now[k], rel_tol=1e-9, abs_tol=1e-9)]
    assert bad == []
    assert {src for _, src in current_values(ch_db, NAMES, 0, 1 << 60).values()} == {"batch"}

    # The command's round: a dry run with a report changes nothing and says what differs (nothing now).
    args = argparse.Namespace(lookback_hours=None, start=DATASET_START.isoformat(), end=DATASET_END.isoformat(),
                              metrics="dau,gmv", periods="day", report=True, dry_run=True)
    assert run_once(args, settings, ch_db) == 0
