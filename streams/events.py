"""The stream processors' light view of an event, and how it is read off ``events.raw``.

Stream processing touches every event, so it skips pydantic validation (events were
validated at the edge before they were produced) and keeps the event time as integer
milliseconds. Field paths (``properties.amount``, ``context.location.country``) are
read the same way ClickHouse's ``JSONExtract*`` reads them, so the stream and the SQL
agree on what a missing or mistyped value means.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from functools import cache
from typing import Any

import orjson
from fastavro import parse_schema, schemaless_reader

from schemas.codec import HEADER_LENGTH, SINGLE_OBJECT_MARKER, SchemaError, load_schema, schema_fingerprint
from schemas.models import AnalyticsEvent

EVENT_SCHEMAS = ("analytics_event.avsc", "analytics_event.v1.avsc")  # current first, then older versions


@dataclass(slots=True)
class StreamEvent:
    """One event as the stream processors see it (event time ``ts`` in UTC milliseconds)."""

    event_id: str
    event_name: str
    event_type: str
    user_id: str
    anonymous_id: str
    ts: int
    properties: Mapping[str, Any]
    context: Mapping[str, Any]
    person: str = field(default="")  # the person after identity stitching, set by the processor

    @property
    def device_id(self) -> str:
        """The key events are partitioned and sessionised by: the anonymous id, else the user id."""
        return self.anonymous_id or self.user_id

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> StreamEvent:
        """Build from a decoded ``analytics_event.avsc`` record."""
        ts = record["timestamp"]
        if isinstance(ts, datetime):
            ts = int(ts.timestamp()) * 1000 + ts.microsecond // 1000
        props = record.get("properties") or "{}"
        ctx = record.get("context") or "{}"
        return cls(
            str(record["id"]),
            record["eventName"],
            record["eventType"],
            record.get("userId") or "",
            record.get("anonymousId") or "",
            ts,
            json_object(props) if props != "{}" else {},
            json_object(ctx) if ctx != "{}" else {},
        )

    @classmethod
    def from_model(cls, event: AnalyticsEvent) -> StreamEvent:
        """Build from the pydantic model (tests, the SDK's in-process path)."""
        return cls.from_record(event.to_avro())

    @classmethod
    def decode(cls, data: bytes) -> StreamEvent:
        """Decode one ``events.raw`` message (Avro single-object encoding, any known schema version).

        Reads with the schemas stripped of their logical types: the id stays the text it
        was written as and the timestamp integer milliseconds (the same bytes; what is
        skipped is building a ``UUID`` and a ``datetime`` only to take them apart again).
        """
        if len(data) < HEADER_LENGTH or data[:2] != SINGLE_OBJECT_MARKER:
            raise SchemaError("not an Avro single-object encoded message")
        schemas = _plain_event_schemas()
        writer = schemas.get(bytes(data[2:HEADER_LENGTH]))
        if writer is None:
            raise SchemaError(f"unknown writer schema fingerprint {bytes(data[2:HEADER_LENGTH]).hex()}")
        buf = io.BytesIO(data)
        buf.seek(HEADER_LENGTH)
        reader = schemas[b""]
        try:
            record = schemaless_reader(buf, writer, None if writer is reader else reader)
        except Exception as exc:  # fastavro raises several types for a corrupt body
            raise SchemaError(f"corrupt Avro body: {exc}") from exc
        return cls.from_record(record)


def _without_logical_types(schema: Any) -> Any:
    if isinstance(schema, dict):
        return {k: _without_logical_types(v) for k, v in schema.items() if k != "logicalType"}
    if isinstance(schema, list):
        return [_without_logical_types(v) for v in schema]
    return schema


@cache
def _plain_event_schemas() -> dict[bytes, Any]:
    """Writer fingerprint -> that version's schema without logical types (b"": the current one, the reader)."""
    schemas: dict[bytes, Any] = {}
    for i, name in enumerate(EVENT_SCHEMAS):
        original = load_schema(name)
        plain = parse_schema(_without_logical_types(original))
        schemas[schema_fingerprint(parse_schema(original))] = plain
        if i == 0:
            schemas[b""] = plain
    return schemas


def json_object(text: str) -> Any:
    """A JSON document as Python data (orjson; the standard parser for what it refuses, e.g. NaN)."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)


def field_reader(path: str) -> Callable[[StreamEvent], Any]:
    """A function reading ``path`` from an event.

    Paths: ``person``, ``event_name``, ``event_type``, ``user_id``, ``anonymous_id``,
    ``device_id``, or ``properties.<key>[.<key>...]`` / ``context.<key>[.<key>...]``.
    """
    if path in ("person", "event_name", "event_type", "user_id", "anonymous_id", "device_id"):
        return lambda event: getattr(event, path)
    root, _, rest = path.partition(".")
    if root not in ("properties", "context") or not rest:
        raise ValueError(f"unknown field path {path!r}")
    keys = tuple(rest.split("."))
    if len(keys) == 1:
        (only,) = keys
        if root == "properties":
            return lambda event: event.properties.get(only)
        return lambda event: event.context.get(only)
    if len(keys) == 2:
        outer, inner = keys

        def read_two(event: StreamEvent) -> Any:
            node = (event.properties if root == "properties" else event.context).get(outer)
            if isinstance(node, dict):
                return node.get(inner)
            return node.get(inner) if isinstance(node, Mapping) else None

        return read_two

    def read(event: StreamEvent) -> Any:
        node: Any = event.properties if root == "properties" else event.context
        for key in keys:
            if not isinstance(node, Mapping):
                return None
            node = node.get(key)
        return node

    return read


def as_text(value: Any) -> str:
    """A value as ClickHouse's ``JSONExtractString`` reads it: strings as they are, anything else ''."""
    return value if isinstance(value, str) else ""


def as_number(value: Any) -> float | None:
    """A value as ``JSONExtract(..., 'Nullable(Float64)')`` reads it: JSON numbers, else None.

    NaN and infinities are not JSON numbers (ClickHouse's parser refuses them) and would
    poison every sum they entered: None too.
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if number - number == 0.0 else None
