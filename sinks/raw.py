"""The raw sink: every tracked event on ``events.raw`` becomes one row of ClickHouse ``events``.

Replays are harmless twice over (see :mod:`sinks.batch`): an exact retry of a batch is
dropped by its ``insert_deduplication_token``, and a replay with different batch
boundaries collapses in the ``ReplacingMergeTree`` keyed by ``event_id``.

The hot loop is lean on purpose: one Avro decode per message, no JSON parsing
(``properties`` and ``context`` travel as JSON text and are stored as-is; ClickHouse
materialises the hot properties), and primitive values all the way into the insert.
"""

from __future__ import annotations

import re
from functools import cache
from io import BytesIO
from typing import Any

import pyarrow as pa
from clickhouse_connect.driver.client import Client
from confluent_kafka import TIMESTAMP_NOT_AVAILABLE, Message
from fastavro import schemaless_reader

from schemas.codec import HEADER_LENGTH, SchemaCodec, SchemaError, load_schema
from sinks.batch import BatchSink, Row, SinkSpec, UndecodableMessage
from tidemark.settings import Settings
from tidemark.topics import EVENTS_RAW

EVENTS_SINK = SinkSpec(
    name="raw",
    topic=EVENTS_RAW.name,
    table="events",
    columns=(
        "event_id",
        "event_type",
        "event_name",
        "user_id",
        "anonymous_id",
        "session_id",
        "timestamp",
        "received_at",
        "source",
        "properties",
        "context",
    ),
    arrow_types=(*[pa.string()] * 6, pa.timestamp("ms", tz="UTC"), pa.timestamp("ms", tz="UTC"), *[pa.string()] * 3),
)

# Every version of the event schema, newest first (the same files ``schemas.codec.event_codec`` reads).
EVENT_SCHEMA_FILES = ("analytics_event.avsc", "analytics_event.v1.avsc")

# Event times the table accepts: a month partition per distinct month, so one absurd
# timestamp must not create partitions (or values a client cannot read back) by itself.
MIN_EVENT_MILLIS = 0  # 1970-01-01
MAX_EVENT_MILLIS = 4_102_444_800_000  # 2100-01-01

_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


def _without_logical_types(schema: Any) -> Any:
    """The schema with every ``logicalType`` annotation removed (the wire bytes are the same)."""
    if isinstance(schema, dict):
        return {key: _without_logical_types(value) for key, value in schema.items() if key != "logicalType"}
    if isinstance(schema, list):
        return [_without_logical_types(item) for item in schema]
    return schema


@cache
def wire_event_codec() -> SchemaCodec:
    """``event_codec()`` that hands back wire values: ids as text and timestamps as epoch milliseconds.

    Logical types do not change the bytes or the schema fingerprint (the canonical form
    drops them), so this codec reads exactly what ``event_codec()`` reads. Skipping the
    ``UUID``/``datetime`` objects halves the decode cost, and ClickHouse takes the
    primitive values directly, so the sink never converts them back.
    """
    current, *history = (_without_logical_types(load_schema(name)) for name in EVENT_SCHEMA_FILES)
    return SchemaCodec(current, tuple(history))


def event_row(message: Message) -> Row:
    """The ``events`` row of one ``events.raw`` message, or :class:`UndecodableMessage`.

    ``received_at`` falls back to the Kafka message timestamp for producers that do not
    set ``receivedAt`` (schema version 1, or SDKs that leave it out).
    """
    value = message.value()
    if not value:
        raise UndecodableMessage("undecodable", "empty message")
    try:
        record = _decode_event(value)
    except SchemaError as exc:
        raise UndecodableMessage("undecodable", str(exc)) from exc
    event_id = record["id"]
    # A malformed id would make ClickHouse refuse the whole batch: refuse the one event instead.
    if not _UUID.fullmatch(event_id):
        raise UndecodableMessage("invalid_event_id", f"event id {event_id[:80]!r} is not a UUID")
    timestamp = record["timestamp"]
    if not MIN_EVENT_MILLIS <= timestamp < MAX_EVENT_MILLIS:
        raise UndecodableMessage("timestamp_out_of_range", f"event time {timestamp} ms is not in 1970-2099")
    received_at = record["receivedAt"]  # present in every version once resolved to the current schema
    if received_at is None or not MIN_EVENT_MILLIS <= received_at < MAX_EVENT_MILLIS:
        kind, received_at = message.timestamp()
        if kind == TIMESTAMP_NOT_AVAILABLE:
            received_at = timestamp
    return (
        event_id,
        record["eventType"],
        record["eventName"],
        record["userId"] or "",
        record["anonymousId"] or "",
        record["sessionId"] or "",
        timestamp,
        received_at,
        record["source"],
        record["properties"],
        record["context"],
    )


_EVENT_CODEC = wire_event_codec()
_CURRENT_HEADER = _EVENT_CODEC.header
_CURRENT_SCHEMA = _EVENT_CODEC.schema


def _decode_event(value: bytes) -> dict[str, Any]:
    """Decode one message: the current schema straight through fastavro (the hot path), the rest via the codec.

    Older writer versions, unknown fingerprints and corrupt bodies all go through
    ``SchemaCodec.decode``, which resolves them or raises :class:`SchemaError` with the reason.
    """
    if value[:HEADER_LENGTH] == _CURRENT_HEADER:
        buf = BytesIO(value)
        buf.seek(HEADER_LENGTH)
        try:
            return schemaless_reader(buf, _CURRENT_SCHEMA, None)  # type: ignore[return-value]
        except Exception:  # a corrupt body: the codec below says what is wrong with it
            pass
    return _EVENT_CODEC.decode(value)


class RawEventSink(BatchSink):
    """``events.raw`` → ClickHouse ``events``, one row per event, committed after the insert."""

    def __init__(self, settings: Settings, client: Client) -> None:
        super().__init__(EVENTS_SINK, settings, client)

    to_row = staticmethod(event_row)  # type: ignore[assignment]
