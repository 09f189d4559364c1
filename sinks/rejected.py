"""The rejected-input sink: dead letters on ``events.dlq`` become rows of ClickHouse ``events_rejected``.

The payload column is text an analyst can read: the raw bytes when they are valid
UTF-8 (the collector's JSON, the usual case), otherwise ``base64:`` followed by the
base64 of the exact bytes (an undecodable Avro message, invalid UTF-8 input). Nothing
is lost either way, and ``events.dlq`` keeps the original message for replay.

A message on ``events.dlq`` that is itself undecodable cannot be dead-lettered again
(that would loop), so it lands here directly with reason ``undecodable_dead_letter``,
an id derived from its offset (a replay collapses onto the same row) and its Kafka
timestamp as ``rejected_at``.
"""

from __future__ import annotations

import base64
import uuid
from datetime import UTC, datetime

from clickhouse_connect.driver.client import Client
from confluent_kafka import Message

from schemas.codec import SchemaError, dead_letter_codec
from sinks.batch import BatchSink, Row, SinkSpec, UndecodableMessage
from tidemark.settings import Settings
from tidemark.topics import EVENTS_DLQ

REJECTED_SINK = SinkSpec(
    name="rejected",
    topic=EVENTS_DLQ.name,
    table="events_rejected",
    columns=("id", "rejected_at", "source", "reason", "detail", "payload"),
)

BASE64_PREFIX = "base64:"
_OFFSET_NAMESPACE = uuid.UUID("5f0c0c52-4d0e-4d55-9c38-7f0d2a7f6a11")


def payload_text(payload: bytes) -> str:
    """The payload as stored: itself if valid UTF-8, else ``base64:<base64 of the bytes>``.

    >>> payload_text(b'{"event": "x"}')
    '{"event": "x"}'
    >>> payload_text(b"\\xff\\x00")
    'base64:/wA='
    """
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError:
        return BASE64_PREFIX + base64.b64encode(payload).decode("ascii")


def dead_letter_row(message: Message) -> Row:
    """The ``events_rejected`` row of one ``events.dlq`` message, or :class:`UndecodableMessage`."""
    value = message.value()
    if not value:
        raise UndecodableMessage("undecodable_dead_letter", "empty message")
    try:
        record = dead_letter_codec().decode(value)
    except SchemaError as exc:
        raise UndecodableMessage("undecodable_dead_letter", str(exc)) from exc
    return (
        record["id"],
        record["rejectedAt"],
        record["source"],
        record["reason"],
        record.get("detail") or "",
        payload_text(record["payload"]),
    )


def undecodable_dead_letter_row(message: Message, error: UndecodableMessage) -> Row:
    """The row of a dead letter that cannot be decoded: id from its offset, time from Kafka."""
    where = f"{message.topic()}:{message.partition()}:{message.offset()}"
    _kind, millis = message.timestamp()
    return (
        uuid.uuid5(_OFFSET_NAMESPACE, where),
        datetime.fromtimestamp(max(millis, 0) / 1000, tz=UTC),
        "sink",
        error.reason,
        f"{where}: {error.detail}"[:2000],
        payload_text(message.value() or b""),
    )


class RejectedSink(BatchSink):
    """``events.dlq`` → ClickHouse ``events_rejected``, committed after the insert."""

    def __init__(self, settings: Settings, client: Client) -> None:
        super().__init__(REJECTED_SINK, settings, client)

    to_row = staticmethod(dead_letter_row)  # type: ignore[assignment]

    def undecodable(self, message: Message, error: UndecodableMessage) -> Row | None:
        """Store an undecodable dead letter directly (re-dead-lettering it would loop)."""
        return undecodable_dead_letter_row(message, error)
