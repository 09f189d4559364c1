"""Turning Kafka messages into ClickHouse rows: the sinks' pure logic, without a broker or an engine."""

from __future__ import annotations

import base64
import json
import uuid
from datetime import UTC, datetime

import pytest
from confluent_kafka import TIMESTAMP_CREATE_TIME, TIMESTAMP_NOT_AVAILABLE, Message

from schemas.codec import SchemaCodec, dead_letter_codec, event_codec, load_schema
from schemas.models import AnalyticsEvent, DeadLetter
from sinks.batch import UndecodableMessage
from sinks.raw import EVENTS_SINK, event_row, wire_event_codec
from sinks.rejected import REJECTED_SINK, dead_letter_row, payload_text, undecodable_dead_letter_row

RECORD = {
    "id": "0b6f6a7e-0000-4000-8000-000000000001",
    "eventType": "conversion",
    "eventName": "fund_project",
    "userId": None,
    "anonymousId": "anon-1",
    "sessionId": None,
    "properties": '{"amount": 12.5, "currency": "EUR", "note": "caf\\u00e9 \u00fc"}',
    "context": '{"location":{"country":"DE"}}',
    "timestamp": 1_700_000_000_123,
    "receivedAt": 1_700_000_000_456,
    "source": "collector",
}


def message(value: bytes | None, timestamp: tuple[int, int] = (TIMESTAMP_CREATE_TIME, 1_700_000_009_999)) -> Message:
    return Message(topic="events.raw", partition=2, offset=41, value=value, timestamp=timestamp)


def test_event_row_follows_the_column_order_and_keeps_json_text() -> None:
    row = event_row(message(event_codec().encode(RECORD)))
    assert dict(zip(EVENTS_SINK.columns, row, strict=True)) == {
        "event_id": RECORD["id"],
        "event_type": "conversion",
        "event_name": "fund_project",
        "user_id": "",
        "anonymous_id": "anon-1",
        "session_id": "",
        "timestamp": 1_700_000_000_123,
        "received_at": 1_700_000_000_456,
        "source": "collector",
        "properties": RECORD["properties"],
        "context": RECORD["context"],
    }


def test_event_row_of_a_model_round_trip() -> None:
    event = AnalyticsEvent(event_name="login", user_id="u1", timestamp=datetime(2025, 3, 30, 1, 30, tzinfo=UTC),
                           properties={"a": [1, 2]})
    row = event_row(message(event_codec().encode(event.to_avro())))
    assert row[0] == str(event.id)
    assert row[6] == int(event.timestamp.timestamp() * 1000)
    assert json.loads(row[9]) == {"a": [1, 2]}


def test_received_at_falls_back_to_the_kafka_timestamp() -> None:
    record = {**RECORD, "receivedAt": None}
    assert event_row(message(event_codec().encode(record)))[7] == 1_700_000_009_999
    no_time = message(event_codec().encode(record), (TIMESTAMP_NOT_AVAILABLE, -1))
    assert event_row(no_time)[7] == RECORD["timestamp"]


def test_version_1_records_are_read_with_defaults() -> None:
    v1 = SchemaCodec(load_schema("analytics_event.v1.avsc"))
    old = {k: v for k, v in RECORD.items() if k not in ("receivedAt", "source")}
    row = event_row(message(v1.encode(old)))
    assert row[7] == 1_700_000_009_999  # no receivedAt in v1: the Kafka timestamp
    assert row[8] == "unknown"


def test_wire_codec_reads_exactly_what_the_event_codec_reads() -> None:
    assert wire_event_codec().known_fingerprints == event_codec().known_fingerprints
    data = event_codec().encode(RECORD)
    typed, wire = event_codec().decode(data), wire_event_codec().decode(data)
    assert str(typed["id"]) == wire["id"]
    assert int(typed["timestamp"].timestamp() * 1000) == wire["timestamp"]
    assert {k: v for k, v in typed.items() if k not in ("id", "timestamp", "receivedAt")} == {
        k: v for k, v in wire.items() if k not in ("id", "timestamp", "receivedAt")
    }


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (None, "undecodable"),
        (b"", "undecodable"),
        (b"{\"event\": \"json, not avro\"}", "undecodable"),
        (b"\xc3\x01" + b"\x00" * 8 + b"\x02", "undecodable"),  # unknown writer schema
        (event_codec().encode(RECORD)[:25], "undecodable"),  # truncated body
        (event_codec().encode({**RECORD, "id": "not-a-uuid"}), "invalid_event_id"),
        (event_codec().encode({**RECORD, "timestamp": 2**62}), "timestamp_out_of_range"),
        (event_codec().encode({**RECORD, "timestamp": -1}), "timestamp_out_of_range"),
    ],
)
def test_bad_messages_are_refused_with_a_reason(value: bytes | None, reason: str) -> None:
    with pytest.raises(UndecodableMessage) as refused:
        event_row(message(value))
    assert refused.value.reason == reason


def test_payload_text_is_lossless() -> None:
    assert payload_text('{"ü": 1}'.encode()) == '{"ü": 1}'
    binary = b"\xc3\x01\xff\x00"
    text = payload_text(binary)
    assert text.startswith("base64:") and base64.b64decode(text.removeprefix("base64:")) == binary


def test_dead_letter_row() -> None:
    letter = DeadLetter(source="collector", reason="oversized_event", detail="33000 > 32768 bytes", payload=b"\xff{")
    row = dead_letter_row(message(dead_letter_codec().encode(letter.to_avro())))
    values = dict(zip(REJECTED_SINK.columns, row, strict=True))
    assert values["id"] == letter.id
    assert values["rejected_at"] == letter.rejected_at
    assert (values["source"], values["reason"], values["detail"]) == ("collector", "oversized_event",
                                                                       "33000 > 32768 bytes")
    assert values["payload"] == "base64:" + base64.b64encode(b"\xff{").decode()


def test_undecodable_dead_letter_row_is_stable_across_replays() -> None:
    garbage = message(b"garbage", (TIMESTAMP_CREATE_TIME, 1_700_000_000_000))
    with pytest.raises(UndecodableMessage) as refused:
        dead_letter_row(garbage)
    first = undecodable_dead_letter_row(garbage, refused.value)
    again = undecodable_dead_letter_row(garbage, refused.value)
    assert first == again and isinstance(first[0], uuid.UUID)
    assert first[1] == datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC)
    assert first[3:] == ("undecodable_dead_letter", first[4], "garbage")
    assert "events.raw:2:41" in first[4]


def test_an_absurd_received_at_falls_back_to_the_kafka_timestamp() -> None:
    row = event_row(message(event_codec().encode({**RECORD, "receivedAt": 2**60})))
    assert row[7] == 1_700_000_009_999
