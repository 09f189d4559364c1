"""Bad messages never stop the sinks: they land in ``events_rejected`` with a reason, and the rest flows."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator

import pytest
from clickhouse_connect.driver.client import Client

from schemas.codec import dead_letter_codec, event_codec
from schemas.models import DeadLetter
from sinks.batch import BatchSink
from sinks.raw import RawEventSink
from sinks.rejected import RejectedSink
from tidemark.settings import Settings
from tidemark.topics import EVENTS_DLQ, EVENTS_RAW

from .sink_support import caught_up, encode_events, make_events, produce, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def sinks(kafka_settings: Settings, ch_db: Client) -> Iterator[list[BatchSink]]:
    settings = kafka_settings.model_copy(update={"sink_batch_max_rows": 50, "sink_batch_max_seconds": 0.2})
    started: list[BatchSink] = [RawEventSink(settings, ch_db), RejectedSink(settings, ch_db)]
    for sink in started:
        sink.start()
    yield started
    for sink in started:
        sink.stop(15)


def test_garbage_is_rejected_and_the_events_after_it_still_land(sinks: list[BatchSink], ch_db: Client) -> None:
    raw, _rejected = sinks
    settings = raw.settings
    events = make_events(150, seed=5)
    wire = encode_events(events)
    bad_id = event_codec().encode({**events[0], "id": "not-a-uuid"})
    unknown_schema = b"\xc3\x01" + b"\x00" * 8 + b"\x02"
    garbage = [b"definitely not avro", b"\xff\xfe\x00binary", unknown_schema, bad_id]
    # Garbage first, in the middle and last, on every partition's path (keys spread them).
    payloads = garbage[:2] + wire[:75] + garbage[2:3] + wire[75:] + garbage[3:]
    produce(settings, EVENTS_RAW.name, payloads)

    wait_for(lambda: ch_db.query("SELECT count() FROM events FINAL").result_rows[0][0] == len(events), 60,
             "every valid event in ClickHouse")
    wait_for(lambda: ch_db.query("SELECT count() FROM events_rejected FINAL").result_rows[0][0] == len(garbage), 60,
             "every bad message in events_rejected")
    wait_for(lambda: caught_up(settings, raw.group_id, EVENTS_RAW.name), 30, "the raw sink committed past the garbage")

    stored = ch_db.query("SELECT source, reason, detail, payload FROM events_rejected FINAL").result_rows
    by_payload = {row[3]: row for row in stored}
    assert set(by_payload) == {
        "definitely not avro",
        "base64:" + base64.b64encode(b"\xff\xfe\x00binary").decode(),
        "base64:" + base64.b64encode(unknown_schema).decode(),
        "base64:" + base64.b64encode(bad_id).decode(),
    }
    assert {row[0] for row in stored} == {"sink"}
    assert by_payload["definitely not avro"][1] == "undecodable"
    assert "unknown writer schema" in by_payload["base64:" + base64.b64encode(unknown_schema).decode()][2]
    assert by_payload["base64:" + base64.b64encode(bad_id).decode()][1] == "invalid_event_id"
    assert raw.dead_lettered == len(garbage)
    stored_ids = {r[0] for r in ch_db.query("SELECT toString(event_id) FROM events FINAL").result_rows}
    assert stored_ids == {e["id"] for e in events}


def test_dead_letters_from_the_edge_and_garbage_on_the_dlq(sinks: list[BatchSink], ch_db: Client) -> None:
    _raw, rejected = sinks
    settings = rejected.settings
    letter = DeadLetter(source="collector", reason="missing_event_name", detail="eventName is required",
                        payload=json.dumps({"userId": "u1"}).encode())
    produce(settings, EVENTS_DLQ.name, [dead_letter_codec().encode(letter.to_avro()), b"\x00garbage on the dlq"])

    wait_for(lambda: ch_db.query("SELECT count() FROM events_rejected FINAL").result_rows[0][0] == 2, 60,
             "both dead letters stored")
    rows = ch_db.query(
        "SELECT toString(id), source, reason, detail, payload FROM events_rejected FINAL ORDER BY source"
    ).result_rows
    assert rows[0] == (str(letter.id), "collector", "missing_event_name", "eventName is required", '{"userId": "u1"}')
    assert rows[1][1:3] == ("sink", "undecodable_dead_letter")
    assert rows[1][4] == "\x00garbage on the dlq"
    stamp = ch_db.query(
        "SELECT toUnixTimestamp64Milli(rejected_at) FROM events_rejected FINAL WHERE source = 'collector'"
    ).result_rows[0][0]
    assert stamp == int(letter.rejected_at.timestamp() * 1000)
