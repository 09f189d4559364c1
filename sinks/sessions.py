"""The sessions sink: every session version on ``sessions`` becomes a row of ClickHouse ``sessions``.

The table is ``ReplacingMergeTree(version)`` ordered by the session's start date and id:
each update of a session is a new row, and the highest version (more events, then
closed) is what ``FINAL`` reads. A replayed version is the same row again.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import pyarrow as pa
from clickhouse_connect.driver.client import Client
from confluent_kafka import Message

from schemas.codec import SchemaCodec, SchemaError, load_schema
from sinks.batch import BatchSink, Row, SinkSpec, UndecodableMessage
from tidemark.settings import Settings
from tidemark.topics import SESSIONS

_TS = pa.timestamp("ms", tz="UTC")

SESSIONS_SINK = SinkSpec(
    name="sessions",
    topic=SESSIONS.name,
    table="sessions",
    columns=(
        "session_id", "user_id", "device_id", "started_at", "last_seen_at", "duration_ms", "page_views", "events",
        "device", "browser", "os", "country", "referrer", "utm_source", "utm_medium", "utm_campaign", "closed",
        "version",
    ),
    arrow_types=(
        pa.string(), pa.string(), pa.string(), _TS, _TS, pa.uint64(), pa.uint32(), pa.uint32(),
        *[pa.string()] * 8, pa.uint8(), pa.uint64(),
    ),
)


def strip_logical_types(schema: Any) -> Any:
    """The schema without ``logicalType`` annotations: same bytes and fingerprint, primitive values out."""
    if isinstance(schema, dict):
        return {key: strip_logical_types(value) for key, value in schema.items() if key != "logicalType"}
    if isinstance(schema, list):
        return [strip_logical_types(item) for item in schema]
    return schema


@cache
def wire_session_codec() -> SchemaCodec:
    """``session_codec()`` handing back timestamps as epoch milliseconds (what ClickHouse takes)."""
    return SchemaCodec(strip_logical_types(load_schema("session.avsc")))


def session_row(value: bytes | None) -> Row:
    """The ``sessions`` row of one ``sessions`` message, or :class:`UndecodableMessage`."""
    if not value:
        raise UndecodableMessage("undecodable", "empty message")
    try:
        r = wire_session_codec().decode(value)
    except SchemaError as exc:
        raise UndecodableMessage("undecodable", str(exc)) from exc
    return (
        r["sessionId"], r["userId"] or "", r["deviceId"], r["startedAt"], r["lastSeenAt"], r["durationMs"],
        r["pageViews"], r["events"], r["device"], r["browser"], r["os"], r["country"], r["referrer"],
        r["utmSource"], r["utmMedium"], r["utmCampaign"], int(r["closed"]), r["version"],
    )


class SessionSink(BatchSink):
    """``sessions`` → ClickHouse ``sessions``, committed after the insert."""

    def __init__(self, settings: Settings, client: Client) -> None:
        super().__init__(SESSIONS_SINK, settings, client)

    def to_row(self, message: Message) -> Row:
        """The row of one session version."""
        return session_row(message.value())
