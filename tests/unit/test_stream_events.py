"""The stream's own reader of ``events.raw`` agrees with fastavro on every record and refuses what is corrupt."""

from __future__ import annotations

import io
import json
import random

import pytest
from fastavro import parse_schema, schemaless_reader, schemaless_writer

from schemas.codec import HEADER_LENGTH, SINGLE_OBJECT_MARKER, SchemaError, load_schema, schema_fingerprint
from streams.events import StreamEvent, _plain_event_schemas, as_number, as_text

CURRENT = parse_schema(load_schema("analytics_event.avsc"))
OLD = parse_schema(load_schema("analytics_event.v1.avsc"))


def _message(record: dict, schema=CURRENT) -> bytes:
    buf = io.BytesIO()
    buf.write(SINGLE_OBJECT_MARKER + schema_fingerprint(schema))
    schemaless_writer(buf, schema, record)
    return buf.getvalue()


def _by_fastavro(data: bytes) -> StreamEvent:
    """What decoding was before the direct reader: fastavro with the plain schemas, then from_record."""
    schemas = _plain_event_schemas()
    writer = schemas[data[2:HEADER_LENGTH]]
    reader = schemas[b""]
    buf = io.BytesIO(data[HEADER_LENGTH:])
    return StreamEvent.from_record(schemaless_reader(buf, writer, None if writer is reader else reader))


def _text(rng: random.Random, longest: int) -> str:
    alphabet = "abcXYZ019-_ éß€日本🙂\"\\"
    return "".join(rng.choice(alphabet) for _ in range(rng.randrange(longest)))


def _record(rng: random.Random) -> dict:
    properties = {"amount": rng.choice([1, 2.5, -3, True, None, "7", 1e300]), "path": _text(rng, 90),
                  "nested": {"community": _text(rng, 8)}}
    return {
        "id": f"{rng.getrandbits(128):032x}",
        "eventType": rng.choice(["page_view", "action", "conversion", "error"]),
        "eventName": _text(rng, 70),
        "userId": rng.choice([None, _text(rng, 40), ""]),
        "anonymousId": rng.choice([None, _text(rng, 80)]),
        "sessionId": rng.choice([None, _text(rng, 10)]),
        "properties": rng.choice(["{}", "", json.dumps(properties), '{"x": NaN}',
                                  json.dumps({"big": "y" * rng.randrange(20_000)})]),
        "context": rng.choice(["{}", json.dumps({"location": {"country": _text(rng, 3)}})]),
        "timestamp": rng.choice([0, 1, -1, 1_772_452_800_006, -(2**62), 2**62, rng.getrandbits(40)]),
        "receivedAt": rng.choice([None, 0, 1_772_452_800_123, -5]),
        "source": _text(rng, 30),
    }


def test_direct_reader_equals_fastavro_on_random_records() -> None:
    rng = random.Random(7)
    for _ in range(3000):
        data = _message(_record(rng))
        assert StreamEvent.decode(data) == _by_fastavro(data)


def test_records_of_the_old_schema_still_decode() -> None:
    record = {k: v for k, v in _record(random.Random(3)).items() if k not in ("receivedAt", "source")}
    data = _message(record, OLD)
    assert StreamEvent.decode(data) == _by_fastavro(data)


def test_every_truncation_is_refused() -> None:
    data = _message(_record(random.Random(5)))
    for cut in range(HEADER_LENGTH, len(data)):
        with pytest.raises(SchemaError):
            StreamEvent.decode(data[:cut])


@pytest.mark.parametrize(
    ("offset", "byte"),
    [(0, 0x03), (1, 0x7F)],  # a negative length; an enum symbol out of range
)
def test_corrupt_fields_are_refused(offset: int, byte: int) -> None:
    record = _record(random.Random(9)) | {"id": "x" * 36}
    data = bytearray(_message(record))
    position = HEADER_LENGTH if offset == 0 else HEADER_LENGTH + 1 + 36
    data[position] = byte
    with pytest.raises(SchemaError):
        StreamEvent.decode(bytes(data))


def test_bad_union_branch_and_bad_utf8_are_refused() -> None:
    record = _record(random.Random(11)) | {"id": "i", "eventType": "action", "eventName": "n"}
    data = bytearray(_message(record))
    branch = HEADER_LENGTH + 2 + 1 + 2  # after id (len + 1 byte), eventType, eventName (len + 1 byte)
    data[branch] = 4
    with pytest.raises(SchemaError):
        StreamEvent.decode(bytes(data))
    data = bytearray(_message(record))
    data[HEADER_LENGTH + 1] = 0xFF  # the id's one character
    with pytest.raises(SchemaError):
        StreamEvent.decode(bytes(data))


def test_clickhouse_field_semantics() -> None:
    assert as_text("a") == "a" and as_text(5) == "" and as_text(None) == ""
    assert as_number(True) is None and as_number(float("nan")) is None and as_number(float("inf")) is None
    assert as_number(3) == 3.0 and as_number("3") is None


@pytest.mark.parametrize(
    "name",
    ["streams.events", "streams.sessions", "streams.sketches", "streams.aggregators", "streams.periods",
     "streams.windows", "streams.merging"],
)
def test_docstring_examples_run(name: str) -> None:
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(name))
    assert result.attempted > 0 and result.failed == 0
