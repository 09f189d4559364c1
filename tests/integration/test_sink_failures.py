"""ClickHouse refuses inserts for a while: the sink retries, commits nothing, and loses nothing."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from clickhouse_connect.driver.client import Client
from prometheus_client import REGISTRY

from sinks.raw import RawEventSink
from tidemark.settings import Settings
from tidemark.topics import EVENTS_RAW

from .sink_support import caught_up, committed_offsets, encode_events, make_events, produce, wait_for

pytestmark = pytest.mark.integration


def failures_metric() -> float:
    return REGISTRY.get_sample_value("tidemark_sink_insert_failures_total", {"sink": "raw"}) or 0.0


@pytest.fixture
def sink(kafka_settings: Settings, ch_db: Client) -> Iterator[RawEventSink]:
    settings = kafka_settings.model_copy(
        update={"sink_batch_max_rows": 80, "sink_batch_max_seconds": 0.2, "sink_retry_backoff_max_seconds": 1.0}
    )
    sink = RawEventSink(settings, ch_db)
    sink.start()
    yield sink
    sink.stop(15)
    if ch_db.command("EXISTS TABLE events_hidden"):  # the test failed half-way: leave the database whole
        ch_db.command("RENAME TABLE events_hidden TO events")


def test_failed_inserts_are_retried_without_committing(sink: RawEventSink, ch_db: Client) -> None:
    settings = sink.settings
    before, during = make_events(120, seed=21), make_events(250, seed=22)

    produce(settings, EVENTS_RAW.name, encode_events(before))
    wait_for(
        lambda: caught_up(settings, sink.group_id, EVENTS_RAW.name),
        60,
        "the first events committed",
    )
    committed_before = committed_offsets(settings, sink.group_id, EVENTS_RAW.name)
    metric_before = failures_metric()

    # Make every insert fail for real: the table the sink writes to disappears.
    ch_db.command("RENAME TABLE events TO events_hidden")
    produce(settings, EVENTS_RAW.name, encode_events(during), key_prefix="d")
    wait_for(lambda: sink.insert_failures >= 3, 60, "three failed insert attempts")

    assert failures_metric() - metric_before >= 3
    assert committed_offsets(settings, sink.group_id, EVENTS_RAW.name) == committed_before
    assert sink.running and sink.error is None
    assert ch_db.query("SELECT count() FROM events_hidden").result_rows[0][0] == len(before)

    ch_db.command("RENAME TABLE events_hidden TO events")
    wait_for(
        lambda: caught_up(settings, sink.group_id, EVENTS_RAW.name),
        60,
        "the retried batches committed",
    )
    expected = {e["id"] for e in before + during}
    total, distinct = ch_db.query("SELECT count(), uniqExact(event_id) FROM events FINAL").result_rows[0]
    assert (total, distinct) == (len(expected), len(expected))
    stored = {row[0] for row in ch_db.query("SELECT toString(event_id) FROM events FINAL").result_rows}
    assert stored == expected
    ch_db.command("OPTIMIZE TABLE events FINAL")
    assert ch_db.query("SELECT count() FROM events").result_rows[0][0] == len(expected)
