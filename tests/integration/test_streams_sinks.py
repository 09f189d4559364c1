"""Sessions and snapshots land in ClickHouse through their sinks; the raw table agrees with the sessions."""

from __future__ import annotations

import time

import pytest
from confluent_kafka import Producer

from schemas.streams import metric_snapshot_codec
from sinks.sessions import SessionSink, session_row
from sinks.snapshots import SnapshotSink, snapshot_row
from streams.avro_writers import session_message
from streams.events import StreamEvent
from streams.periods import Period
from streams.sessions import SessionTracker, session_id_for
from streams.windows import MetricValue
from tests.integration.test_metric_sql import insert_events
from tests.metric_reference import demo_dataset, ms, reference_sessions

pytestmark = pytest.mark.integration


def _wait(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)  # polling interval of a condition with a deadline, not synchronisation
    raise AssertionError(f"timed out waiting for {what}")


def test_undecodable_rows_are_refused_with_a_reason() -> None:
    from sinks.batch import UndecodableMessage

    for row in (session_row, snapshot_row):
        with pytest.raises(UndecodableMessage, match="undecodable"):
            row(b"not avro")


def test_sessions_and_snapshots_sinks_keep_the_latest_version(ch_db, kafka_settings) -> None:
    events = demo_dataset(sessions_per_day=10, seed=2)
    tracker = SessionTracker(gap_ms=30 * 60_000, max_length_ms=24 * 3_600_000)
    producer = Producer({"bootstrap.servers": kafka_settings.kafka_bootstrap})
    published = 0
    for model in events:  # every version of every session, as the worker publishes them
        tracker.add(StreamEvent.from_model(model))
        for s in tracker.take_dirty():
            producer.produce(kafka_settings.topic("sessions"), key=s.device_id.encode(),
                             value=session_message(s))
            published += 1
    snap = metric_snapshot_codec()
    start = ms(events[0].timestamp) // 86_400_000 * 86_400_000
    for i, value in enumerate((5.0, 7.0, 6.0)):  # later snapshots of one window replace earlier ones
        v = MetricValue("page_views", Period.day, start, start + 86_400_000, {"country": "DE"}, value)
        producer.produce(kafka_settings.topic("metrics"), value=snap.encode(v.to_avro(computed_at=1_000 + i)))
    assert producer.flush(30) == 0

    sinks = [SessionSink(kafka_settings, ch_db), SnapshotSink(kafka_settings, ch_db)]
    for sink in sinks:
        sink.start()
    try:
        _wait(lambda: sinks[0].committed_messages == published and sinks[1].committed_messages == 3, 60,
              "both sinks to commit everything")
    finally:
        for sink in sinks:
            sink.stop()

    expected = {
        session_id_for(r.device_id, r.started_at): (r.events, r.page_views, r.last_seen_at - r.started_at)
        for r in reference_sessions(events, 30 * 60_000, 24 * 3_600_000)
    }
    rows = ch_db.query("SELECT session_id, events, page_views, duration_ms FROM sessions FINAL").result_rows
    assert {sid: (e, p, d) for sid, e, p, d in rows} == expected
    value = ch_db.command(
        "SELECT value FROM metric_snapshots FINAL WHERE metric_type = 'page_views' AND dimensions_key = 'country=DE'"
    )
    assert float(value) == 6.0  # the latest computed, not the sum

    # The raw table agrees with the sessions: every event sits in the session that contains it.
    insert_events(ch_db, events)
    per_event = dict(ch_db.query("SELECT toString(event_id), stream_session_id FROM events_sessionized").result_rows)
    by_device: dict[str, list] = {}
    for r in reference_sessions(events, 30 * 60_000, 24 * 3_600_000):
        by_device.setdefault(r.device_id, []).append(r)
    for e in events:
        device = e.anonymous_id or e.user_id or ""
        t = ms(e.timestamp)
        (containing,) = [r for r in by_device[device] if r.started_at <= t <= r.last_seen_at]
        assert per_event[str(e.id)] == session_id_for(device, containing.started_at)
    assert len(per_event) == len(events)
