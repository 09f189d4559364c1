"""Segment messages → AnalyticsEvent: mapping, ids, clock-skew correction and every refusal."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from api.collector.enrich import RequestFacts
from api.collector.segment import (
    MESSAGE_ID_NAMESPACE,
    CollectorError,
    TimeLimits,
    event_id,
    parse_json_body,
    read_batch,
    read_message,
)
from schemas.codec import event_codec
from schemas.models import AnalyticsEvent, EventType

RECEIVED = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
LIMITS = TimeLimits(max_future=timedelta(hours=24), max_past=timedelta(days=365))
KEYS = ["wk"]


def single(message: dict[str, Any], message_type: str = "track", header_key: str | None = "wk") -> AnalyticsEvent:
    return read_message(
        json.dumps(message).encode(),
        message_type,
        header_key=header_key,
        accepted_keys=KEYS,
        received_at=RECEIVED,
        facts=RequestFacts(user_agent="curl/8.0", client_ip="198.51.100.7"),
        limits=LIMITS,
        max_event_bytes=32 * 1024,
    )


def refused(message: dict[str, Any] | bytes, message_type: str = "track") -> CollectorError:
    body = message if isinstance(message, bytes) else json.dumps(message).encode()
    with pytest.raises(CollectorError) as caught:
        read_message(
            body,
            message_type,
            header_key="wk",
            accepted_keys=KEYS,
            received_at=RECEIVED,
            facts=RequestFacts(),
            limits=LIMITS,
            max_event_bytes=32 * 1024,
        )
    return caught.value


def test_track_maps_event_properties_and_type() -> None:
    event = single({"userId": "ada", "event": "fund_project", "properties": {"amount": 25, "currency": "USD"}})
    assert event.event_name == "fund_project"
    assert event.event_type is EventType.conversion
    assert event.user_id == "ada" and event.anonymous_id is None
    assert event.properties == {"amount": 25, "currency": "USD"}
    assert event.source == "collector"
    assert event.timestamp == RECEIVED and event.received_at == RECEIVED
    assert event.context["ip"] == "198.51.100.0"


def test_track_declared_event_type_wins_for_unknown_names() -> None:
    event = single({"anonymousId": "a1", "event": "checkout_failed", "properties": {"$event_type": "error"}})
    assert event.event_type is EventType.error
    assert single({"anonymousId": "a1", "event": "something_new"}).event_type is EventType.action


def test_event_built_without_second_validation_is_valid_and_encodes() -> None:
    event = single({"userId": 42, "anonymousId": "a1", "event": "login", "messageId": "m-1", "sessionId": "s1"})
    revalidated = AnalyticsEvent.model_validate(event.model_dump())
    assert revalidated == event
    assert event.user_id == "42", "numeric user ids are accepted as text"
    decoded = AnalyticsEvent.from_avro(event_codec().decode(event_codec().encode(event.to_avro())))
    assert decoded == event


def test_message_id_becomes_event_id() -> None:
    given = uuid.uuid4()
    assert single({"userId": "u", "event": "login", "messageId": str(given)}).id == given
    replay_a = single({"userId": "u", "event": "login", "messageId": "ajs-next-123"})
    replay_b = single({"userId": "u", "event": "login", "messageId": "ajs-next-123"})
    assert replay_a.id == replay_b.id == uuid.uuid5(MESSAGE_ID_NAMESPACE, "ajs-next-123")
    assert event_id("ajs-next-124") != replay_a.id
    assert single({"userId": "u", "event": "login"}).id != single({"userId": "u", "event": "login"}).id


def test_clock_skew_is_corrected_with_sent_at() -> None:
    # The device's clock is 1 hour behind: it thinks it sent at 11:00:05 an event from 11:00:00.
    event = single(
        {
            "userId": "u",
            "event": "login",
            "originalTimestamp": "2026-03-01T11:00:00Z",
            "sentAt": "2026-03-01T11:00:05Z",
        }
    )
    assert event.timestamp == RECEIVED - timedelta(seconds=5)
    with_offset = single(
        {"userId": "u", "event": "login", "timestamp": "2026-03-01T13:00:00+02:00", "sentAt": "2026-03-01T11:00:10Z"}
    )
    assert with_offset.timestamp == RECEIVED - timedelta(seconds=10)


def test_timestamp_without_sent_at_is_taken_as_is() -> None:
    event = single({"userId": "u", "event": "login", "timestamp": "2026-02-20T08:30:00.250Z"})
    assert event.timestamp == datetime(2026, 2, 20, 8, 30, 0, 250000, tzinfo=UTC)
    naive = single({"userId": "u", "event": "login", "timestamp": "2026-02-20T08:30:00"})
    assert naive.timestamp == datetime(2026, 2, 20, 8, 30, tzinfo=UTC)


def test_page_maps_to_page_view_with_page_fields() -> None:
    event = single(
        {
            "anonymousId": "a1",
            "name": "Project",
            "properties": {"project_id": "p1"},
            "context": {
                "page": {
                    "path": "/p/1",
                    "url": "https://fund.example/p/1?utm_source=x",
                    "title": "Clean water",
                    "referrer": "https://t.co/z",
                }
            },
        },
        "page",
    )
    assert event.event_name == "page_view" and event.event_type is EventType.page_view
    assert event.properties == {
        "project_id": "p1",
        "name": "Project",
        "path": "/p/1",
        "url": "https://fund.example/p/1?utm_source=x",
        "title": "Clean water",
        "referrer": "https://t.co/z",
    }
    assert event.context["referrer"]["medium"] == "social"
    assert event.context["campaign"] == {"source": "x"}


def test_server_side_page_uses_properties_for_enrichment() -> None:
    event = single(
        {"userId": "u", "properties": {"url": "https://fund.example/?utm_campaign=c", "referrer": "https://bing.com/"}},
        "page",
    )
    assert event.context["campaign"] == {"name": "c"}
    assert event.context["referrer"]["medium"] == "search"


def test_screen_identify_group_alias() -> None:
    screen = single({"userId": "u", "name": "Home", "properties": {"tab": 1}}, "screen")
    assert (screen.event_name, screen.event_type, screen.properties) == (
        "screen",
        EventType.page_view,
        {"tab": 1, "name": "Home"},
    )
    identify = single({"userId": "u", "anonymousId": "a", "traits": {"email": "ada@example.org"}}, "identify")
    assert identify.event_name == "identify" and identify.properties == {"email": "ada@example.org"}
    assert (identify.user_id, identify.anonymous_id) == ("u", "a")
    group = single({"userId": "u", "groupId": "community-9", "traits": {"name": "Nairobi"}}, "group")
    assert group.event_name == "group"
    assert group.properties == {"groupId": "community-9", "traits": {"name": "Nairobi"}}
    alias = single({"userId": "u", "previousId": "a-old"}, "alias")
    assert alias.event_name == "alias" and alias.properties == {"previousId": "a-old"}


def test_write_key_in_body() -> None:
    event = read_message(
        json.dumps({"writeKey": "wk", "userId": "u", "event": "login"}).encode(),
        "track",
        header_key=None,
        accepted_keys=KEYS,
        received_at=RECEIVED,
        facts=RequestFacts(),
        limits=LIMITS,
        max_event_bytes=1024,
    )
    assert event.event_name == "login"


@pytest.mark.parametrize(
    ("body", "message_type", "code", "status"),
    [
        (b"{not json", "track", "invalid_json", 400),
        (b'{"userId": "u", "event": NaN}', "track", "invalid_json", 400),
        (b'{"userId": "u", "event": "caf\xe9"}', "track", "invalid_utf8", 400),
        (b'{"userId": "u", "event": "x\\ud800"}', "track", "invalid_utf8", 400),
        (b"[1, 2]", "track", "invalid_type", 400),
        (b'{"userId": "u", "event": "x", "properties": [1]}', "track", "invalid_type", 400),
        (b'{"userId": "u", "event": 12}', "track", "invalid_type", 400),
        (b'{"userId": true, "event": "x"}', "track", "invalid_type", 400),
        (b'{"userId": "u", "event": "x", "timestamp": "yesterday"}', "track", "invalid_type", 400),
        (b'{"userId": "u"}', "track", "missing_event_name", 400),
        (b'{"userId": "u", "event": "  "}', "track", "missing_event_name", 400),
        (b'{"event": "x"}', "track", "missing_identity", 400),
        (b'{"userId": "", "anonymousId": "", "event": "x"}', "track", "missing_identity", 400),
        (b'{"userId": "u", "event": "x", "timestamp": "2026-03-03T12:00:00Z"}', "track", "timestamp_out_of_range", 400),
        (b'{"userId": "u", "event": "x", "timestamp": "2024-01-01T00:00:00Z"}', "track", "timestamp_out_of_range", 400),
        # A clock skew so large that correcting it leaves the calendar (years 1 to 9999).
        (b'{"userId": "u", "event": "x", "timestamp": "0001-01-01T00:00:00Z", "sentAt": "9999-12-31T00:00:00Z"}',
         "track", "timestamp_out_of_range", 400),
        (b'{"userId": "u", "event": "x", "timestamp": "9999-12-31T00:00:00Z", "sentAt": "0001-01-01T00:00:00Z"}',
         "track", "timestamp_out_of_range", 400),
        # A time whose offset takes it past the calendar's ends once in UTC.
        (b'{"userId": "u", "event": "x", "timestamp": "0001-01-01T00:00:00+05:00"}', "track", "timestamp_out_of_range",
         400),
        (b'{"userId": "u", "event": "x", "timestamp": "2026-03-03T12:00:00Z", "sentAt": "9999-12-31T23:00:00-05:00"}',
         "track", "timestamp_out_of_range", 400),
        (b'{"userId": "u"}', "group", "missing_group_id", 400),
        (b'{"userId": "u"}', "alias", "missing_previous_id", 400),
        (b'{"type": "identify", "userId": "u", "event": "x"}', "track", "invalid_message_type", 400),
    ],
)
def test_bad_message_is_refused_with_reason(body: bytes, message_type: str, code: str, status: int) -> None:
    error = refused(body, message_type)
    assert (error.code, error.status) == (code, status)
    assert error.message
    assert error.as_json() == {"error": {"code": code, "message": error.message}}


def test_oversized_event_is_413() -> None:
    error = refused({"userId": "u", "event": "x", "properties": {"blob": "x" * 40_000}})
    assert (error.code, error.status) == ("event_too_large", 413)


@pytest.mark.parametrize(("header_key", "body_key"), [("nope", None), (None, "nope"), (None, None)])
def test_unknown_write_key_is_401(header_key: str | None, body_key: str | None) -> None:
    message: dict[str, Any] = {"userId": "u", "event": "x"}
    if body_key:
        message["writeKey"] = body_key
    with pytest.raises(CollectorError) as caught:
        read_message(
            json.dumps(message).encode(),
            "track",
            header_key=header_key,
            accepted_keys=KEYS,
            received_at=RECEIVED,
            facts=RequestFacts(),
            limits=LIMITS,
            max_event_bytes=1024,
        )
    assert (caught.value.code, caught.value.status) == ("unknown_write_key", 401)


def test_parse_json_body_accepts_valid_surrogate_pairs() -> None:
    assert parse_json_body(b'{"e": "\\ud83d\\ude00"}') == {"e": "\U0001f600"}


def batch(body: dict[str, Any] | bytes, max_event_bytes: int = 32 * 1024) -> Any:
    return read_batch(
        body if isinstance(body, bytes) else json.dumps(body).encode(),
        header_key="wk",
        accepted_keys=KEYS,
        received_at=RECEIVED,
        facts=RequestFacts(client_ip="203.0.113.50"),
        limits=LIMITS,
        max_event_bytes=max_event_bytes,
        max_batch_bytes=500 * 1024,
    )


def test_batch_bad_items_become_dead_letters_and_the_rest_is_accepted() -> None:
    items: list[Any] = [
        {"type": "track", "userId": "u", "event": "login", "messageId": "ok-1"},
        {"type": "track", "userId": "u"},
        {"type": "launch", "userId": "u"},
        "not an object",
        {"type": "page", "anonymousId": "a", "messageId": "ok-2"},
        {"type": "track", "event": "x"},
        {"type": "track", "userId": "u", "event": "x", "timestamp": "2020-01-01T00:00:00Z"},
        {"type": "identify", "userId": "u", "traits": "not a dict"},
    ]
    intake = batch({"batch": items})
    assert [e.id for e in intake.events] == [event_id("ok-1"), event_id("ok-2")]
    assert [d.reason for d in intake.dead] == [
        "missing_event_name",
        "invalid_message_type",
        "invalid_type",
        "missing_identity",
        "timestamp_out_of_range",
        "invalid_type",
    ]
    assert [e["index"] for e in intake.errors] == [1, 2, 3, 5, 6, 7]
    assert json.loads(intake.dead[0].payload) == items[1]
    assert all(d.source == "collector" and d.detail.startswith("batch item ") for d in intake.dead)


def test_batch_level_context_and_sent_at_apply_to_items() -> None:
    intake = batch(
        {
            "sentAt": "2026-03-01T11:00:10Z",
            "context": {"locale": "sw-KE", "library": {"name": "analytics-python"}},
            "batch": [
                {"type": "track", "userId": "u", "event": "a", "timestamp": "2026-03-01T11:00:00Z"},
                {"type": "track", "userId": "u", "event": "b", "context": {"locale": "en-KE"}},
            ],
        }
    )
    first, second = intake.events
    assert first.timestamp == RECEIVED - timedelta(seconds=10)
    assert first.context["locale"] == "sw-KE" and first.context["library"] == {"name": "analytics-python"}
    assert second.context["locale"] == "en-KE"
    assert second.timestamp == RECEIVED


def test_batch_oversized_item_is_dead_lettered() -> None:
    items = [
        {"type": "track", "userId": "u", "event": "small"},
        {"type": "track", "userId": "u", "event": "big", "properties": {"blob": "x" * 2000}},
    ]
    intake = batch({"batch": items}, max_event_bytes=1000)
    assert [e.event_name for e in intake.events] == ["small"]
    assert [d.reason for d in intake.dead] == ["event_too_large"]


def test_batch_item_with_lone_surrogate_is_dead_lettered() -> None:
    body = (
        b'{"batch": [{"type": "track", "userId": "u", "event": "ok"},'
        b' {"type": "track", "userId": "u", "event": "x\\udc00"}]}'
    )
    intake = batch(body)
    assert [e.event_name for e in intake.events] == ["ok"]
    assert [d.reason for d in intake.dead] == ["invalid_utf8"]
    json.loads(intake.dead[0].payload)  # the dead letter's payload is still valid JSON


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"batch": []}, "empty_batch"),
        ({"messages": []}, "invalid_type"),
        ({"batch": {"type": "track"}}, "invalid_type"),
        ({"batch": [{"type": "track", "userId": "u", "event": "x"}], "sentAt": "soon"}, "invalid_type"),
        (b"[]", "invalid_type"),
        (b"\xff\xfe", "invalid_utf8"),
        (b'{"batch": [', "invalid_json"),
    ],
)
def test_bad_batch_is_refused_as_a_whole(body: dict[str, Any] | bytes, code: str) -> None:
    with pytest.raises(CollectorError) as caught:
        batch(body)
    assert caught.value.code == code and caught.value.status == 400


def test_oversized_batch_is_413() -> None:
    items = [{"type": "track", "userId": "u", "event": "x", "properties": {"p": "y" * 1000}}] * 600
    with pytest.raises(CollectorError) as caught:
        batch({"batch": items})
    assert (caught.value.code, caught.value.status) == ("batch_too_large", 413)
