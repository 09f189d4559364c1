"""The stream processors' light view of an event, and how it is read off ``events.raw``.

Stream processing touches every event, so it skips pydantic validation (events were
validated at the edge before they were produced) and keeps the event time as integer
milliseconds. Field paths (``properties.amount``, ``context.location.country``) are
read the same way ClickHouse's ``JSONExtract*`` reads them, so the stream and the SQL
agree on what a missing or mistyped value means.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from schemas.codec import event_codec
from schemas.models import AnalyticsEvent


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
            event_id=str(record["id"]),
            event_name=record["eventName"],
            event_type=record["eventType"],
            user_id=record.get("userId") or "",
            anonymous_id=record.get("anonymousId") or "",
            ts=ts,
            properties=json.loads(props) if props != "{}" else {},
            context=json.loads(ctx) if ctx != "{}" else {},
        )

    @classmethod
    def from_model(cls, event: AnalyticsEvent) -> StreamEvent:
        """Build from the pydantic model (tests, the SDK's in-process path)."""
        return cls.from_record(event.to_avro())

    @classmethod
    def decode(cls, data: bytes) -> StreamEvent:
        """Decode one ``events.raw`` message (Avro single-object encoding)."""
        return cls.from_record(event_codec().decode(data))


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
    """A value as ``JSONExtract(..., 'Nullable(Float64)')`` reads it: JSON numbers, else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)
