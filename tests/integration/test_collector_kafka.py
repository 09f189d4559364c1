"""The collector against the real Kafka broker: what is posted is what lands on events.raw / events.dlq.

The app runs with its full lifespan (migrations, topics, publisher) on the pytest process's
chDB engine (``ch_db``); records are read back with a plain confluent-kafka consumer and
decoded with the project's codecs.
"""

from __future__ import annotations

import base64
import gzip
import json
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from clickhouse_connect.driver.client import Client
from confluent_kafka import Consumer
from fastapi.testclient import TestClient

from api.app import create_app
from api.collector.segment import event_id
from schemas.codec import dead_letter_codec, event_codec
from schemas.models import AnalyticsEvent, DeadLetter
from tidemark.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

AUTH = ("demo-write-key", "")
CLIENT_ADDRESS = ("198.51.100.77", 50123)


@pytest.fixture
def collector(kafka_settings: Settings, ch_db: Client) -> Iterator[TestClient]:
    with TestClient(create_app(kafka_settings, clickhouse=ch_db), client=CLIENT_ADDRESS) as client:
        yield client


def consume(settings: Settings, topic: str, count: int, timeout: float = 30.0) -> list[tuple[bytes | None, bytes]]:
    """Read ``count`` records of ``topic`` from the beginning (fails after ``timeout`` seconds)."""
    consumer = Consumer(
        {
            "bootstrap.servers": settings.kafka_bootstrap,
            "group.id": f"check-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([settings.topic(topic)])
    records: list[tuple[bytes | None, bytes]] = []
    deadline = time.monotonic() + timeout
    try:
        while len(records) < count and time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is None:
                continue
            assert message.error() is None, message.error()
            records.append((message.key(), message.value()))
        # A short extra read makes sure nothing more than expected arrived.
        extra_deadline = time.monotonic() + 1.0
        while time.monotonic() < extra_deadline:
            message = consumer.poll(0.2)
            if message is not None and message.error() is None:
                records.append((message.key(), message.value()))
    finally:
        consumer.close()
    assert len(records) == count, f"expected {count} records on {topic}, got {len(records)}"
    return records


def events_on_raw(settings: Settings, count: int, timeout: float = 30.0) -> list[tuple[bytes | None, AnalyticsEvent]]:
    records = consume(settings, "events.raw", count, timeout)
    return [(k, AnalyticsEvent.from_avro(event_codec().decode(v))) for k, v in records]


def letters_on_dlq(settings: Settings, count: int) -> list[DeadLetter]:
    return [DeadLetter.from_avro(dead_letter_codec().decode(v)) for _, v in consume(settings, "events.dlq", count)]


def test_track_lands_on_events_raw_with_id_ip_and_properties(collector: TestClient, kafka_settings: Settings) -> None:
    message_id = str(uuid.uuid4())
    properties = {"amount": 25.5, "currency": "KES", "project_id": "p-1", "nested": {"tags": ["a", "b"]}, "ok": True}
    response = collector.post(
        "/v1/track",
        json={
            "messageId": message_id,
            "anonymousId": "anon-1",
            "userId": "ada",
            "event": "fund_project",
            "properties": properties,
            "context": {"locale": "sw-KE", "page": {"url": "https://fund.example/p/1?utm_source=sms"}},
        },
        auth=AUTH,
        headers={
            "user-agent": "Mozilla/5.0 (Windows NT 10.0; Win64; x64) Chrome/120.0.0.0 Safari/537.36",
            "cf-ipcountry": "KE",
        },
    )
    assert response.status_code == 200, response.text
    assert response.json() == {"success": True}
    [(key, event)] = events_on_raw(kafka_settings, 1)
    assert key == b"anon-1", "keyed by the device's anonymous id"
    assert str(event.id) == message_id
    assert event.event_name == "fund_project" and event.event_type.value == "conversion"
    assert event.properties == properties
    assert event.context["ip"] == "198.51.100.0"
    assert "198.51.100.77" not in json.dumps(event.context)
    assert event.context["location"] == {"country": "KE"}
    assert event.context["campaign"] == {"source": "sms"}
    assert event.context["locale"] == "sw-KE"
    assert event.context["device"]["type"] == "desktop"
    assert event.source == "collector"


def test_clock_skew_correction_and_non_uuid_message_id(collector: TestClient, kafka_settings: Settings) -> None:
    # The device clock runs 2 hours fast: it stamped the event 3 s before it sent it.
    device_now = datetime.now(UTC) + timedelta(hours=2)
    body = {
        "messageId": "ajs-next-1700000000000-xyz",
        "userId": "u-1",
        "event": "login",
        "originalTimestamp": (device_now - timedelta(seconds=3)).isoformat(),
        "sentAt": device_now.isoformat(),
    }
    before = datetime.now(UTC)
    assert collector.post("/v1/track", json=body, auth=AUTH).status_code == 200
    after = datetime.now(UTC)
    [(key, event)] = events_on_raw(kafka_settings, 1)
    assert key == b"u-1"
    assert event.id == event_id("ajs-next-1700000000000-xyz")
    assert event.received_at is not None
    assert event.timestamp == event.received_at - timedelta(seconds=3)
    assert before - timedelta(seconds=4) <= event.timestamp <= after


def test_every_message_type(collector: TestClient, kafka_settings: Settings) -> None:
    calls: list[tuple[str, dict[str, Any]]] = [
        ("identify", {"userId": "u", "anonymousId": "a", "traits": {"plan": "pro"}}),
        ("page", {"anonymousId": "a", "name": "Home", "context": {"page": {"path": "/", "title": "Tidemark"}}}),
        ("screen", {"anonymousId": "a", "name": "Wallet"}),
        ("group", {"userId": "u", "groupId": "c-1", "traits": {"name": "Nairobi"}}),
        ("alias", {"userId": "u", "previousId": "a"}),
    ]
    for path, body in calls:
        response = collector.post(f"/v1/{path}", json={**body, "messageId": f"m-{path}"}, auth=AUTH)
        assert response.status_code == 200, response.text
    events = {e.id: e for _, e in events_on_raw(kafka_settings, len(calls))}
    by_name = {events[event_id(f"m-{path}")].event_name: events[event_id(f"m-{path}")] for path, _ in calls}
    assert set(by_name) == {"identify", "page_view", "screen", "group", "alias"}
    assert by_name["identify"].properties == {"plan": "pro"}
    assert by_name["page_view"].properties == {"name": "Home", "path": "/", "title": "Tidemark"}
    assert by_name["group"].properties == {"groupId": "c-1", "traits": {"name": "Nairobi"}}
    assert by_name["alias"].properties == {"previousId": "a"}


def test_batch_accepts_valid_items_and_dead_letters_the_rest(collector: TestClient, kafka_settings: Settings) -> None:
    items: list[Any] = [
        {"type": "track", "userId": "u1", "event": "login", "messageId": "b-1"},
        {"type": "track", "userId": "u1"},
        {"type": "page", "anonymousId": "a2", "messageId": "b-2"},
        {"type": "track", "event": "orphan"},
        {"type": "track", "userId": "u3", "event": "big", "properties": {"blob": "x" * 40_000}},
        {"type": "identify", "userId": "u4", "traits": {"email": "x@example.org"}, "messageId": "b-3"},
    ]
    token = base64.b64encode(b"demo-write-key:").decode()
    response = collector.post("/v1/batch", json={"batch": items}, headers={"authorization": f"Basic {token}"})
    assert response.status_code == 200, response.text
    answer = response.json()
    assert (answer["success"], answer["accepted"], answer["rejected"]) == (True, 3, 3)
    assert [e["index"] for e in answer["errors"]] == [1, 3, 4]

    events = events_on_raw(kafka_settings, 3)
    assert sorted(str(e.id) for _, e in events) == sorted(str(event_id(m)) for m in ("b-1", "b-2", "b-3"))
    letters = letters_on_dlq(kafka_settings, 3)
    assert sorted(d.reason for d in letters) == ["event_too_large", "missing_event_name", "missing_identity"]
    by_reason = {d.reason: d for d in letters}
    assert json.loads(by_reason["missing_identity"].payload) == items[3]
    assert json.loads(by_reason["event_too_large"].payload) == items[4]
    assert all(d.source == "collector" for d in letters)


def test_import_is_an_alias_of_batch_and_body_write_key_works(collector: TestClient, kafka_settings: Settings) -> None:
    body = {"writeKey": "demo-write-key", "batch": [{"type": "track", "userId": "u", "event": "imported"}]}
    response = collector.post("/v1/import", json=body)
    assert response.status_code == 200, response.text
    [(_, event)] = events_on_raw(kafka_settings, 1)
    assert event.event_name == "imported"


def test_replayed_message_id_gives_the_same_event_id(collector: TestClient, kafka_settings: Settings) -> None:
    body = {"messageId": "replay-me", "userId": "u", "event": "login"}
    for _ in range(2):
        assert collector.post("/v1/track", json=body, auth=AUTH).status_code == 200
    events = events_on_raw(kafka_settings, 2)
    assert {e.id for _, e in events} == {event_id("replay-me")}


def test_readyz_and_metrics_after_traffic(collector: TestClient, kafka_settings: Settings) -> None:
    ready = collector.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"] == {"clickhouse": "ok", "kafka": "ok"}
    assert collector.post("/v1/track", json={"userId": "u", "event": "login"}, auth=AUTH).status_code == 200
    text = collector.get("/metrics").text
    assert "tidemark_publish_latency_seconds_count" in text
    assert 'tidemark_collector_events_accepted_total{endpoint="track"}' in text
    events_on_raw(kafka_settings, 1)


def test_unreachable_broker_is_503_with_reason(ch_db: Client, kafka_settings: Settings) -> None:
    app = create_app(kafka_settings, clickhouse=ch_db)
    with TestClient(app) as client:
        # Point the running publisher at nothing: a fresh producer on a closed port, 1 s delivery timeout.
        publisher = app.state.publisher
        publisher.stop()
        publisher.settings = kafka_settings.model_copy(
            update={"kafka_bootstrap": "127.0.0.1:9", "publish_timeout_seconds": 1.0}
        )
        publisher.start()
        response = client.post("/v1/track", json={"userId": "u", "event": "login"}, auth=AUTH)
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "kafka_unavailable"
        assert response.json()["error"]["message"]


def test_gzip_batch_like_tracking_libraries_send(collector: TestClient, kafka_settings: Settings) -> None:
    items = [{"type": "track", "userId": f"u{i}", "event": "watch_ad", "messageId": f"gz-{i}"} for i in range(20)]
    body = gzip.compress(json.dumps({"batch": items, "sentAt": datetime.now(UTC).isoformat()}).encode())
    response = collector.post(
        "/v1/batch", content=body, auth=AUTH, headers={"content-encoding": "gzip", "content-type": "application/json"}
    )
    assert response.status_code == 200, response.text
    assert response.json()["accepted"] == 20
    events = events_on_raw(kafka_settings, 20)
    assert sorted(str(e.id) for _, e in events) == sorted(str(event_id(f"gz-{i}")) for i in range(20))


def test_concurrent_batches_each_answered_after_their_own_delivery(
    collector: TestClient, kafka_settings: Settings
) -> None:
    """Many requests in flight share the producer; every 200 covers exactly that request's events."""

    def post(client_no: int) -> list[str]:
        sent: list[str] = []
        for request_no in range(4):
            ids = [f"c{client_no}-r{request_no}-e{i}" for i in range(25)]
            items = [{"type": "track", "anonymousId": f"a{client_no}", "event": "login", "messageId": m} for m in ids]
            response = collector.post("/v1/batch", json={"batch": items}, auth=AUTH)
            assert response.status_code == 200, response.text
            assert response.json()["accepted"] == 25
            sent.extend(ids)
        return sent

    with ThreadPoolExecutor(max_workers=8) as pool:
        sent = [m for ids in pool.map(post, range(8)) for m in ids]
    assert len(sent) == 800
    events = events_on_raw(kafka_settings, len(sent), timeout=60)
    assert sorted(str(e.id) for _, e in events) == sorted(str(event_id(m)) for m in sent)
    # One device's events share a key, hence a partition, hence their order.
    assert {key for key, _ in events} == {f"a{n}".encode() for n in range(8)}
