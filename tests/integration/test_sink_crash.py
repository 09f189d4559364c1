"""SIGKILL the sink mid-stream and restart it: exactly the events sent, none lost, none doubled."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from confluent_kafka import Producer

from schemas.codec import event_codec
from tidemark.settings import Settings
from tidemark.topics import EVENTS_RAW

from .sink_process import SinkProcess
from .sink_support import caught_up, committed_offsets, make_events, wait_for

pytestmark = pytest.mark.integration

EVENTS = 12_000
CHUNK = 300

COMMITTED = "tidemark_sink_committed_messages_total"


def produce_steadily(settings: Settings, payloads: list[bytes], done: threading.Event, errors: list[str]) -> None:
    """Produce in chunks, each acknowledged before the next, so events keep arriving while the sink works."""
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap, "enable.idempotence": True, "linger.ms": 5})

    def delivered(err: object, _msg: object) -> None:
        if err is not None:
            errors.append(str(err))

    try:
        for start in range(0, len(payloads), CHUNK):
            for i in range(start, min(start + CHUNK, len(payloads))):
                producer.produce(settings.topic(EVENTS_RAW.name), payloads[i], key=f"k{i}", on_delivery=delivered)
            if producer.flush(30):
                errors.append("flush timed out")
    finally:
        done.set()


def test_sigkill_mid_stream_loses_and_doubles_nothing(kafka_settings: Settings, tmp_path: Path) -> None:
    events = make_events(EVENTS, seed=99)
    codec = event_codec()
    payloads = [codec.encode(event) for event in events]
    sink = SinkProcess(
        kafka_settings,
        tmp_path / "sink",
        {
            "TIDEMARK_SINK_BATCH_MAX_ROWS": "700",
            "TIDEMARK_SINK_BATCH_MAX_SECONDS": "0.3",
            # A killed member holds its partitions until its session expires: keep that short.
            "TIDEMARK_SINK_SESSION_TIMEOUT_MS": "6000",
        },
    )
    group_id = kafka_settings.group("sink.raw")
    produced, errors = threading.Event(), []
    producer = threading.Thread(target=produce_steadily, args=(kafka_settings, payloads, produced, errors))
    sink.start()
    try:
        producer.start()
        # Some but not all events are durable: the sink is mid-stream.
        wait_for(lambda: (sink.metric(COMMITTED, {"sink": "raw"}) or 0) >= EVENTS // 6, 120, "first commits")
        sink.kill()
        committed_at_kill = sum(committed_offsets(kafka_settings, group_id, EVENTS_RAW.name).values())
        assert 0 < committed_at_kill < EVENTS, sink.log_tail()

        sink.start()  # same data path, same consumer group
        producer.join(120)
        assert produced.is_set() and not errors, errors[:3]
        wait_for(lambda: caught_up(kafka_settings, group_id, EVENTS_RAW.name), 180, "the restarted sink to catch up")
        assert sink.stop() == 0, sink.log_tail()
    finally:
        if sink.alive():
            sink.kill()
        producer.join(60)

    counts, ids, _, after_optimize = sink.query(
        "SELECT count(), uniqExact(event_id) FROM events FINAL",
        "SELECT toString(event_id) FROM events FINAL",
        "OPTIMIZE TABLE events FINAL",
        "SELECT count() FROM events",
    )
    assert counts == [[str(EVENTS), str(EVENTS)]]
    assert {row[0] for row in ids} == {event["id"] for event in events}
    assert after_optimize == [[str(EVENTS)]]
    assert "Inserted" in sink.log_tail(400)
