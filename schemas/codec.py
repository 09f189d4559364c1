"""Avro encoding of Tidemark's messages with fastavro, schemas parsed once.

Wire format (default): Avro *single-object encoding*
(https://avro.apache.org/docs/current/specification/#single-object-encoding):
the two marker bytes ``C3 01``, the 8-byte little-endian CRC-64-AVRO fingerprint
of the writer's schema, then the Avro binary body. A reader looks the fingerprint
up among the schema versions it knows and resolves the writer's schema to its own
(the current one), so old and new producers can share a topic.

Evolution rules (checked by ``tests/unit/test_schema_evolution.py``):
- new fields carry a default, so a new reader can read old records;
- fields are never removed without a default on the reader side, so an old reader
  can read new records (it ignores the fields it does not know);
- enum symbols are only appended, and every enum has a default symbol;
- a new version is a new ``.avsc`` file; the previous file stays as ``<name>.vN.avsc``.

When ``TIDEMARK_SCHEMA_REGISTRY_URL`` is set, :class:`ConfluentCodec` speaks the
Confluent wire format (magic byte 0 + 4-byte schema id) through confluent-kafka's
Schema Registry serializers instead.
"""

from __future__ import annotations

import io
import json
from functools import cache
from importlib import resources
from typing import Any

from fastavro import parse_schema, schemaless_reader, schemaless_writer
from fastavro.schema import fingerprint, to_parsing_canonical_form

SINGLE_OBJECT_MARKER = b"\xc3\x01"
HEADER_LENGTH = 10


class SchemaError(ValueError):
    """A message could not be decoded: unknown marker, unknown writer schema or bad body."""


def load_schema(filename: str) -> dict[str, Any]:
    """Read an ``.avsc`` file shipped in ``schemas/avro``."""
    text = resources.files("schemas").joinpath("avro", filename).read_text(encoding="utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema


def schema_fingerprint(parsed: Any) -> bytes:
    """The 8-byte CRC-64-AVRO fingerprint of a schema, in single-object (little-endian) byte order."""
    return bytes.fromhex(fingerprint(to_parsing_canonical_form(parsed), "CRC-64-AVRO"))


class SchemaCodec:
    """Encodes with the current schema and decodes any known version, in single-object encoding.

    >>> codec = event_codec()
    >>> record = {"id": "0b6f6a7e-0000-4000-8000-000000000001", "eventType": "action", "eventName": "login",
    ...           "userId": "u1", "anonymousId": None, "sessionId": None, "properties": "{}", "context": "{}",
    ...           "timestamp": 1700000000000, "receivedAt": None, "source": "sdk"}
    >>> codec.decode(codec.encode(record))["eventName"]
    'login'
    """

    def __init__(self, current: dict[str, Any], history: tuple[dict[str, Any], ...] = ()) -> None:
        self.schema = parse_schema(current)
        self.header = SINGLE_OBJECT_MARKER + schema_fingerprint(self.schema)
        self._writers: dict[bytes, Any] = {self.header[2:]: self.schema}
        for old in history:
            parsed = parse_schema(old)
            self._writers[schema_fingerprint(parsed)] = parsed

    @property
    def known_fingerprints(self) -> frozenset[bytes]:
        """Fingerprints of every schema version this codec can read."""
        return frozenset(self._writers)

    def encode(self, record: dict[str, Any]) -> bytes:
        """Encode one record (a dict in the schema's shape) with the current schema."""
        buf = io.BytesIO()
        buf.write(self.header)
        schemaless_writer(buf, self.schema, record)
        return buf.getvalue()

    def decode(self, data: bytes) -> dict[str, Any]:
        """Decode one message written with any known version, resolved to the current schema."""
        if len(data) < HEADER_LENGTH or data[:2] != SINGLE_OBJECT_MARKER:
            raise SchemaError("not an Avro single-object encoded message")
        writer = self._writers.get(bytes(data[2:HEADER_LENGTH]))
        if writer is None:
            raise SchemaError(f"unknown writer schema fingerprint {bytes(data[2:HEADER_LENGTH]).hex()}")
        buf = io.BytesIO(data)
        buf.seek(HEADER_LENGTH)
        try:
            if writer is self.schema:
                record: dict[str, Any] = schemaless_reader(buf, writer, None)
            else:
                record = schemaless_reader(buf, writer, self.schema)
        except Exception as exc:  # fastavro raises several types for a corrupt body
            raise SchemaError(f"corrupt Avro body: {exc}") from exc
        return record


@cache
def event_codec() -> SchemaCodec:
    """The codec of ``AnalyticsEvent`` (topic ``events.raw``), built once per process."""
    return SchemaCodec(load_schema("analytics_event.avsc"), (load_schema("analytics_event.v1.avsc"),))


@cache
def dead_letter_codec() -> SchemaCodec:
    """The codec of ``DeadLetter`` (topic ``events.dlq``), built once per process."""
    return SchemaCodec(load_schema("dead_letter.avsc"))


class ConfluentCodec:
    """The Confluent wire format (magic byte 0, 4-byte schema id, Avro body) through a Schema Registry.

    Used instead of :class:`SchemaCodec` when ``TIDEMARK_SCHEMA_REGISTRY_URL`` is set. The
    subject is ``<topic>-value`` (TopicNameStrategy); the registry enforces compatibility.
    """

    def __init__(self, registry_url: str, topic: str, current: dict[str, Any]) -> None:
        from confluent_kafka.schema_registry import SchemaRegistryClient
        from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
        from confluent_kafka.serialization import MessageField, SerializationContext

        registry = SchemaRegistryClient.new_client({"url": registry_url})  # mock:// gives an in-memory one
        text = json.dumps(current)
        self._context = SerializationContext(topic, MessageField.VALUE)
        self._serializer = AvroSerializer(registry, text, conf={"auto.register.schemas": True})
        self._deserializer = AvroDeserializer(registry, text)

    def encode(self, record: dict[str, Any]) -> bytes:
        """Encode one record, registering the schema on first use."""
        data: bytes = self._serializer(record, self._context)
        return data

    def decode(self, data: bytes) -> dict[str, Any]:
        """Decode one record written with any schema the registry knows, resolved to the current one."""
        try:
            record: dict[str, Any] = self._deserializer(data, self._context)
        except Exception as exc:  # the deserializer raises several types for foreign or corrupt data
            raise SchemaError(f"not a Confluent Avro message: {exc}") from exc
        return record


def event_codec_for(registry_url: str | None, topic: str) -> SchemaCodec | ConfluentCodec:
    """The codec of tracked events on ``topic``: single-object encoding, or Confluent's with a registry."""
    if registry_url:
        return ConfluentCodec(registry_url, topic, load_schema("analytics_event.avsc"))
    return event_codec()
