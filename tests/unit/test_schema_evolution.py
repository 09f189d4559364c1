"""Schema evolution: readers of the current schema read old records, and old readers read new ones."""

from __future__ import annotations

import uuid

from schemas.codec import ConfluentCodec, SchemaCodec, event_codec, event_codec_for, load_schema

V1 = load_schema("analytics_event.v1.avsc")
V2 = load_schema("analytics_event.avsc")


def _v1_record() -> dict:
    return {
        "id": "6d1c2a1e-8d1f-4c55-9b0e-2f3c4d5e6f70", "eventType": "conversion", "eventName": "signup",
        "userId": "u1", "anonymousId": "a1", "sessionId": None, "properties": '{"method":"email"}',
        "context": "{}", "timestamp": 1_770_000_000_000,
    }


def test_new_reader_reads_records_written_with_the_old_schema() -> None:
    old_writer = SchemaCodec(V1)
    record = event_codec().decode(old_writer.encode(_v1_record()))
    assert record["eventName"] == "signup"
    assert record["properties"] == '{"method":"email"}'
    # fields added in version 2 take their defaults
    assert record["receivedAt"] is None
    assert record["source"] == "unknown"


def test_old_reader_reads_records_written_with_the_new_schema() -> None:
    old_reader = SchemaCodec(V1, (V2,))
    new = {**_v1_record(), "receivedAt": 1_770_000_000_500, "source": "collector"}
    record = old_reader.decode(event_codec().encode(new))
    assert record["eventName"] == "signup"
    assert "source" not in record and "receivedAt" not in record


def test_every_field_added_since_version_1_has_a_default() -> None:
    old_fields = {f["name"] for f in V1["fields"]}
    for field in V2["fields"]:
        if field["name"] not in old_fields:
            assert "default" in field, f"{field['name']} needs a default so old records stay readable"


def test_confluent_wire_format_through_a_registry() -> None:
    # confluent-kafka's built-in in-memory registry (mock:// URL) speaks the same client API as a real one.
    codec = event_codec_for(f"mock://{uuid.uuid4().hex}", "events.raw")
    assert isinstance(codec, ConfluentCodec)
    record = {**_v1_record(), "receivedAt": None, "source": "sdk"}
    data = codec.encode(record)
    assert data[0] == 0  # Confluent magic byte, then a 4-byte schema id
    assert codec.decode(data)["eventName"] == "signup"
