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
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from functools import cache
from typing import Any, TypeVar

import orjson
from fastavro import parse_schema, schemaless_reader

from schemas.codec import HEADER_LENGTH, SINGLE_OBJECT_MARKER, SchemaError, load_schema, schema_fingerprint
from schemas.models import AnalyticsEvent

_Name = TypeVar("_Name")

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
        Messages of the current schema are read by :func:`_decode_current`, older ones by
        fastavro (resolved to the current schema).
        """
        if type(data) is bytes and data.startswith(_CURRENT_HEADER or _current_header()):
            return _decode_current(data)
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
        if not isinstance(record, Mapping):
            raise SchemaError("an event is an Avro record")
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


_CURRENT_HEADER = b""  # set by _current_header() on first use


def _current_header() -> bytes:
    """The message header (marker and fingerprint) of the schema :func:`_decode_current` reads.

    Checked against the schema file first: if its layout is not the one the reader was
    written for (a new schema version), no message has this header and fastavro reads them all.
    """
    global _CURRENT_HEADER
    current = load_schema(EVENT_SCHEMAS[0])
    layout = [(f["name"], _bare(_without_logical_types(f["type"]))) for f in current["fields"]]
    if layout != _CURRENT_LAYOUT:
        _CURRENT_HEADER = b"not the current schema: no message starts with this"
    else:
        _CURRENT_HEADER = SINGLE_OBJECT_MARKER + schema_fingerprint(parse_schema(current))
    return _CURRENT_HEADER


def _bare(schema: Any) -> Any:
    # {"type": "long"} is "long"; unions and enums as they are.
    if isinstance(schema, list):
        return [_bare(s) for s in schema]
    if isinstance(schema, dict) and set(schema) == {"type"}:
        return schema["type"]
    return schema


_EVENT_TYPES = ("page_view", "action", "conversion", "error")
_CURRENT_LAYOUT = [
    ("id", "string"),
    ("eventType", {"type": "enum", "name": "EventType", "symbols": list(_EVENT_TYPES), "default": "action"}),
    ("eventName", "string"),
    ("userId", ["null", "string"]),
    ("anonymousId", ["null", "string"]),
    ("sessionId", ["null", "string"]),
    ("properties", "string"),
    ("context", "string"),
    ("timestamp", "long"),
    ("receivedAt", ["null", "long"]),
    ("source", "string"),
]


def _decode_current(data: bytes) -> StreamEvent:
    """An ``events.raw`` message of the current schema, read straight off its Avro body.

    fastavro spends more on setting up each call than on the few fields of an event; this
    reads exactly :data:`_CURRENT_LAYOUT` (Avro binary encoding: zig-zag varints,
    length-prefixed UTF-8, union branch indexes) and builds the event directly. Every
    bytecode counts here (it runs once per event), hence the fields written out one by
    one, the short varints read inline (a length under 64 takes one byte, under 8,192
    two; a timestamp in milliseconds up to September 2039 six) and the rest by :func:`_varint`.
    """
    size = len(data)
    try:
        # id (string)
        n = data[10]
        if n >= 0x80 or n & 1:
            n, pos = _length(data, 10)
        else:
            n, pos = n >> 1, 11
        end = pos + n
        event_id = data[pos:end].decode()
        # eventType (enum; a symbol index under 64 is one byte, its zig-zag even)
        symbol = data[end]
        if symbol >= 2 * len(_EVENT_TYPES) or symbol & 1:
            raise SchemaError(f"corrupt Avro body: enum symbol byte {symbol}")
        event_type = _EVENT_TYPES[symbol >> 1]
        # eventName (string)
        n = data[end + 1]
        if n >= 0x80 or n & 1:
            n, pos = _length(data, end + 1)
        else:
            n, pos = n >> 1, end + 2
        end = pos + n
        event_name = data[pos:end].decode()
        # userId, anonymousId, sessionId (["null", "string"]; null reads as "")
        branch = data[end]
        if branch == 0:
            user_id, end = "", end + 1
        elif branch == 2:
            n = data[end + 1]
            if n >= 0x80 or n & 1:
                n, pos = _length(data, end + 1)
            else:
                n, pos = n >> 1, end + 2
            end = pos + n
            user_id = data[pos:end].decode()
        else:
            raise SchemaError(f"corrupt Avro body: union branch {branch}")
        branch = data[end]
        if branch == 0:
            anonymous_id, end = "", end + 1
        elif branch == 2:
            n = data[end + 1]
            if n >= 0x80 or n & 1:
                n, pos = _length(data, end + 1)
            else:
                n, pos = n >> 1, end + 2
            end = pos + n
            anonymous_id = data[pos:end].decode()
        else:
            raise SchemaError(f"corrupt Avro body: union branch {branch}")
        branch = data[end]
        if branch == 0:
            end += 1
        elif branch == 2:
            n, pos = _length(data, end + 1)
            end = pos + n
            data[pos:end].decode()  # not kept, but it must be text
        else:
            raise SchemaError(f"corrupt Avro body: union branch {branch}")
        # properties, context (JSON text)
        n = data[end]
        if n < 0x80:
            pos = end + 1
        elif data[end + 1] < 0x80:
            n, pos = (n & 0x7F) | data[end + 1] << 7, end + 2
        else:
            n, pos = _varint(data, end)
        if n & 1:
            raise SchemaError("corrupt Avro body: negative length")
        end = pos + (n >> 1)
        properties = data[pos:end]
        n = data[end]
        if n < 0x80:
            pos = end + 1
        elif data[end + 1] < 0x80:
            n, pos = (n & 0x7F) | data[end + 1] << 7, end + 2
        else:
            n, pos = _varint(data, end)
        if n & 1:
            raise SchemaError("corrupt Avro body: negative length")
        end = pos + (n >> 1)
        context = data[pos:end]
        if end > size:
            raise IndexError("a string runs past the end of the message")
        # timestamp (long)
        n = int.from_bytes(data[end : end + 6], "little")
        if n & 0x808080808080 == 0x008080808080:  # six bytes, the last without continuation
            n = (n & 0x7F | n >> 1 & 0x3F80 | n >> 2 & 0x1FC000 | n >> 3 & 0xFE00000 | n >> 4 & 0x7F0000000
                 | n >> 5 & 0x3F800000000)
            pos = end + 6
        else:
            n, pos = _varint(data, end)
        ts = (n >> 1) ^ -(n & 1)
        # receivedAt (["null", "long"]), source (string): read to check the body is whole
        branch = data[pos]
        if branch == 2:
            _received_at, pos = _varint(data, pos + 1)
        elif branch == 0:
            pos += 1
        else:
            raise SchemaError(f"corrupt Avro body: union branch {branch}")
        n, pos = _length(data, pos)
        if pos + n > size:
            raise IndexError("a string runs past the end of the message")
        data[pos : pos + n].decode()
    except (IndexError, UnicodeDecodeError) as exc:
        raise SchemaError(f"corrupt Avro body: {exc}") from exc
    return StreamEvent(
        event_id,
        event_name,
        event_type,
        user_id,
        anonymous_id,
        ts,
        json_object(properties) if properties and properties != b"{}" else {},
        json_object(context) if context and context != b"{}" else {},
    )


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    # An unsigned varint at ``pos`` (7 bits a byte, low bits first): (its value, the position after it).
    byte = data[pos]
    value, shift = byte & 0x7F, 7
    while byte >= 0x80:
        pos += 1
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        shift += 7
    return value, pos + 1


def _length(data: bytes, pos: int) -> tuple[int, int]:
    # A string's length: a zig-zag varint that must not be negative.
    raw, pos = _varint(data, pos)
    if raw & 1:
        raise SchemaError(f"corrupt Avro body: length {-(raw >> 1) - 1}")
    return raw >> 1, pos


def json_object(text: str | bytes) -> Any:
    """A JSON document as Python data (orjson; the standard parser for what it refuses, e.g. NaN)."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        if isinstance(text, bytes):
            try:
                text = text.decode()
            except UnicodeDecodeError as exc:
                raise SchemaError(f"corrupt Avro body: {exc}") from exc
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
            return node.get(inner) if node is not None and isinstance(node, Mapping) else None

        return read_two

    def read(event: StreamEvent) -> Any:
        node: Any = event.properties if root == "properties" else event.context
        for key in keys:
            if not isinstance(node, Mapping):
                return None
            node = node.get(key)
        return node

    return read


def texts_reader(fields: Iterable[tuple[_Name, str]]) -> Callable[[StreamEvent], list[tuple[_Name, str]]]:
    """A function reading several ``(name, path)`` fields of an event at once: the ``(name, value)`` of
    those whose value is non-empty text (what :func:`as_text` keeps), in the order given (a name
    is whatever the caller wants back with the value).

    One call per event instead of one per field: this is how the windows read an event's dimensions.

    >>> read = texts_reader([("country", "context.location.country"), ("community", "properties.community")])
    >>> read(StreamEvent("id", "login", "action", "u", "", 0, {"community": 7}, {"location": {"country": "KE"}}))
    [('country', 'KE')]
    """
    # (name, 0 = properties / 1 = context, first key, second key or None) for paths one or two keys deep.
    shallow: list[tuple[_Name, int, str, str | None]] = []
    other: list[tuple[_Name, Callable[[StreamEvent], Any]]] = []
    for name, path in fields:
        root, _, rest = path.partition(".")
        keys = rest.split(".")
        if root in ("properties", "context") and rest and len(keys) <= 2:
            shallow.append((name, 0 if root == "properties" else 1, keys[0], keys[1] if len(keys) == 2 else None))
        else:
            other.append((name, field_reader(path)))

    def read(event: StreamEvent) -> list[tuple[_Name, str]]:
        found = []
        roots = (event.properties, event.context)
        for name, root, outer, inner in shallow:
            node = roots[root].get(outer)
            if inner is not None and node is not None:
                # Decoded JSON is made of dicts; any other mapping is read the same way, anything else is None.
                node = node.get(inner) if type(node) is dict or isinstance(node, Mapping) else None
            if node and isinstance(node, str):
                found.append((name, node))
        for name, read_field in other:
            value = read_field(event)
            if value and isinstance(value, str):
                found.append((name, value))
        return found

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
