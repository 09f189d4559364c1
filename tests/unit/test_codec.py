"""Avro single-object encoding of tracked events and dead letters."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from schemas import AnalyticsEvent, DeadLetter, dead_letter_codec, event_codec
from schemas.codec import SINGLE_OBJECT_MARKER, SchemaError, schema_fingerprint


def _event() -> AnalyticsEvent:
    return AnalyticsEvent(
        event_name="fund_project",
        event_type="conversion",
        user_id="u1",
        properties={"amount": 25.5, "currency": "USD", "tags": ["a", "b"], "nested": {"x": 1}},
        context={"locale": "fr-FR"},
        timestamp=datetime(2026, 3, 29, 1, 30, 0, 123000, tzinfo=UTC),
        source="sdk",
    )


def test_event_round_trip_keeps_every_field() -> None:
    event = _event()
    data = event_codec().encode(event.to_avro())
    assert data[:2] == SINGLE_OBJECT_MARKER
    assert AnalyticsEvent.from_avro(event_codec().decode(data)) == event


def test_header_carries_the_writers_fingerprint() -> None:
    data = event_codec().encode(_event().to_avro())
    assert data[2:10] == schema_fingerprint(event_codec().schema)


def test_crc64_fingerprint_matches_the_avro_specification_vector() -> None:
    # The Avro specification's test vector: fingerprint64("int") = 0x7275d51a3f395c8f, written little-endian.
    assert schema_fingerprint("int") == (0x7275D51A3F395C8F).to_bytes(8, "little")


def test_dead_letter_round_trip() -> None:
    letter = DeadLetter(source="collector", reason="missing_event_name", detail="no event", payload=b"\xff{")
    assert DeadLetter.from_avro(dead_letter_codec().decode(dead_letter_codec().encode(letter.to_avro()))) == letter


@pytest.mark.parametrize(
    "data",
    [b"", b"{}", b"\xc3\x01" + b"\x00" * 8 + b"x", event_codec().header + b"\xff\xff\xff"],
    ids=["empty", "json", "unknown-fingerprint", "corrupt-body"],
)
def test_undecodable_messages_raise_schema_error(data: bytes) -> None:
    with pytest.raises(SchemaError):
        event_codec().decode(data)


def test_event_needs_someone() -> None:
    with pytest.raises(ValueError, match="userId or anonymousId"):
        AnalyticsEvent(event_name="login", timestamp=datetime.now(UTC))
