"""The raw sink against the real broker and the in-process ClickHouse engine."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from clickhouse_connect.driver.client import Client
from prometheus_client import REGISTRY

from sinks.batch import PendingBatch
from sinks.raw import EVENTS_SINK, RawEventSink
from tidemark.settings import Settings
from tidemark.topics import EVENTS_RAW

from .sink_support import caught_up, encode_events, make_events, produce, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def sink_settings(kafka_settings: Settings) -> Settings:
    """Small batches, so a test of a few hundred events exercises many of them."""
    return kafka_settings.model_copy(update={"sink_batch_max_rows": 97, "sink_batch_max_seconds": 0.2})


@pytest.fixture
def running_sinks() -> Iterator[list[RawEventSink]]:
    """Sinks a test starts; stopped (gracefully) whatever the outcome."""
    sinks: list[RawEventSink] = []
    yield sinks
    for sink in sinks:
        sink.stop(15)


def count_final(client: Client) -> int:
    return int(client.query("SELECT count() FROM events FINAL").result_rows[0][0])


def test_every_event_lands_once_with_its_fields(
    sink_settings: Settings, ch_db: Client, running_sinks: list[RawEventSink]
) -> None:
    events = make_events(500)
    produce(sink_settings, EVENTS_RAW.name, encode_events(events))
    sink = RawEventSink(sink_settings, ch_db)
    running_sinks.append(sink)
    sink.start()

    wait_for(lambda: count_final(ch_db) == len(events), 60, "all events in ClickHouse")
    wait_for(lambda: caught_up(sink_settings, sink.group_id, EVENTS_RAW.name), 30, "offsets committed to the end")

    rows = ch_db.query(
        "SELECT toString(event_id), event_type, event_name, user_id, anonymous_id, session_id,"
        " toUnixTimestamp64Milli(timestamp), toUnixTimestamp64Milli(received_at), source, properties, context,"
        " amount, country FROM events FINAL"
    ).result_rows
    stored = {row[0]: row for row in rows}
    assert len(stored) == len(events)
    for event in events:
        row = stored[event["id"]]
        assert row[1:4] == (event["eventType"], event["eventName"], event["userId"] or "")
        assert row[4:6] == (event["anonymousId"], event["sessionId"])
        assert row[6] == event["timestamp"]
        if event["receivedAt"] is not None:
            assert row[7] == event["receivedAt"]
        else:  # the Kafka message timestamp: set by the producer, after the event happened
            assert row[7] > event["timestamp"]
        assert row[8] == "sdk"
        assert row[9] == event["properties"]  # JSON text stored as sent
        assert row[10] == event["context"]
        assert row[11] == json.loads(event["properties"])["amount"]
        assert row[12] == "DE"
    assert sink.rows_inserted == len(events)
    assert sink.insert_failures == 0


def test_replay_by_a_new_group_collapses(
    sink_settings: Settings, ch_db: Client, running_sinks: list[RawEventSink]
) -> None:
    events = make_events(400, seed=11)
    produce(sink_settings, EVENTS_RAW.name, encode_events(events))
    first = RawEventSink(sink_settings, ch_db)
    running_sinks.append(first)
    first.start()
    wait_for(lambda: caught_up(sink_settings, first.group_id, EVENTS_RAW.name), 60, "first pass committed")
    first.stop(15)

    # A second consumer group re-reads the whole topic, with other batch boundaries.
    replay_settings = sink_settings.model_copy(
        update={"consumer_group_prefix": sink_settings.consumer_group_prefix + ".replay", "sink_batch_max_rows": 61}
    )
    replay = RawEventSink(replay_settings, ch_db)
    running_sinks.append(replay)
    replay.start()
    wait_for(lambda: caught_up(replay_settings, replay.group_id, EVENTS_RAW.name), 60, "replay committed")
    replay.stop(15)

    assert first.rows_inserted == len(events)
    assert replay.rows_inserted == len(events)  # the replay really wrote every row again ...
    total, distinct = ch_db.query("SELECT count(), uniqExact(event_id) FROM events FINAL").result_rows[0]
    assert (total, distinct) == (len(events), len(events))  # ... and the table collapsed it
    ch_db.command("OPTIMIZE TABLE events FINAL")
    assert ch_db.query("SELECT count() FROM events").result_rows[0][0] == len(events)


def test_exact_retry_is_dropped_by_the_token(sink_settings: Settings, ch_db: Client) -> None:
    """A retried insert whose first attempt landed (reply lost) adds nothing, even before merges."""
    sink = RawEventSink(sink_settings, ch_db)  # not started: only its insert is used
    batch = PendingBatch()
    for offset, event in enumerate(make_events(30, seed=3)):
        batch.add_row(
            (event["id"], event["eventType"], event["eventName"], event["userId"] or "", event["anonymousId"], "",
             event["timestamp"], event["timestamp"], "sdk", event["properties"], event["context"])
        )
        batch.track(sink.topic, offset % 3, offset)

    sink.insert_batch(batch)
    sink.insert_batch(batch)  # the same ranges: the same token
    assert ch_db.query("SELECT count() FROM events").result_rows[0][0] == 30

    batch.track(sink.topic, 4, 1000)  # other boundaries: a new token, so the rows go in again ...
    sink.insert_batch(batch)
    assert ch_db.query("SELECT count() FROM events").result_rows[0][0] == 60
    assert count_final(ch_db) == 30  # ... and ReplacingMergeTree collapses them
    assert EVENTS_SINK.columns[0] == "event_id"


def test_a_rebalance_flushes_the_open_batch_and_a_stop_flushes_the_rest(
    sink_settings: Settings, ch_db: Client, running_sinks: list[RawEventSink]
) -> None:
    """Scale-out: a second sink joins mid-batch; every event still lands exactly once."""
    settings = sink_settings.model_copy(update={"sink_batch_max_rows": 10_000, "sink_batch_max_seconds": 120.0})
    first_half, second_half = make_events(600, seed=31), make_events(600, seed=32)
    produce(settings, EVENTS_RAW.name, encode_events(first_half))
    one = RawEventSink(settings, ch_db)
    running_sinks.append(one)
    one.start()
    wait_for(lambda: one.pending_messages == len(first_half), 60, "the first sink to hold an open batch")
    assert one.committed_messages == 0

    two = RawEventSink(settings, ch_db)
    running_sinks.append(two)
    two.start()
    # The join revokes the first sink's partitions: it must insert and commit its open batch then.
    wait_for(lambda: one.committed_messages == len(first_half), 60, "the revoked batch to be committed")
    assert count_final(ch_db) == len(first_half)

    produce(settings, EVENTS_RAW.name, encode_events(second_half), key_prefix="second")
    wait_for(lambda: one.pending_messages + two.pending_messages == len(second_half), 60,
             "both sinks to hold the second half")
    assert one.pending_messages and two.pending_messages  # the partitions really are shared
    one.stop(15)
    two.stop(15)  # graceful stops flush and commit
    assert caught_up(settings, one.group_id, EVENTS_RAW.name)
    expected = {e["id"] for e in first_half + second_half}
    stored = {row[0] for row in ch_db.query("SELECT toString(event_id) FROM events FINAL").result_rows}
    assert stored == expected
    assert count_final(ch_db) == len(expected)


def test_consumer_lag_metric_reaches_zero(
    sink_settings: Settings, ch_db: Client, running_sinks: list[RawEventSink]
) -> None:
    produce(sink_settings, EVENTS_RAW.name, encode_events(make_events(300, seed=41)))
    sink = RawEventSink(sink_settings, ch_db)
    running_sinks.append(sink)
    sink.start()
    topic = sink_settings.topic(EVENTS_RAW.name)

    def lags() -> dict[str, float]:
        return {
            sample.labels["partition"]: sample.value
            for family in REGISTRY.collect()
            if family.name == "tidemark_sink_consumer_lag"
            for sample in family.samples
            if sample.labels["topic"] == topic
        }

    wait_for(lambda: len(lags()) == EVENTS_RAW.partitions and not any(lags().values()), 60, "lag 0 on every partition")
    assert count_final(ch_db) == 300


def test_a_batch_spanning_many_months_is_accepted(sink_settings: Settings, ch_db: Client) -> None:
    """A backfill batch touching more month partitions than ClickHouse's default limit (100) still lands."""
    sink = RawEventSink(sink_settings, ch_db)  # not started: only its insert is used
    batch = PendingBatch()
    month_millis = 31 * 24 * 3600 * 1000
    for offset, event in enumerate(make_events(150, seed=8)):
        stamp = 1_000_000_000_000 + offset * month_millis  # 2001-09 onwards, one month apart
        batch.add_row((event["id"], "action", "login", "u", "", "", stamp, stamp, "sdk", "{}", "{}"))
        batch.track(sink.topic, 0, offset)
    sink.insert_batch(batch)
    months = ch_db.query("SELECT uniqExact(toYYYYMM(timestamp)), count() FROM events FINAL").result_rows[0]
    assert months == (150, 150)
