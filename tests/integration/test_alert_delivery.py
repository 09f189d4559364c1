"""Alert delivery against a real local HTTP receiver, and through the real Kafka broker end to end."""

from __future__ import annotations

import json
import math
import random
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from consumers.alerts.book import OpenAlertBook
from consumers.alerts.consumer import AlertConsumer, AlertDispatcher, channels_from_settings, router_from_settings
from consumers.alerts.delivery import RetryPolicy, post_json
from schemas.anomaly import (
    AlertAction,
    AlertDelivery,
    Anomaly,
    AnomalyStatus,
    DeliveryOutcome,
    Severity,
    alert_delivery_codec,
    anomaly_codec,
)
from schemas.streams import MetricSnapshot
from streams.anomaly.series import DetectorBank
from tidemark.settings import Settings
from tidemark.topics import ALERTS, ALERTS_DLQ, ANOMALIES

pytestmark = pytest.mark.integration

Response = tuple[int, dict[str, str]]


class Receiver:
    """A real HTTP server on 127.0.0.1 that records POSTs and answers from a per-path script."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, Any], float]] = []
        self.script: dict[str, list[Response]] = defaultdict(list)
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                length = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(length) or b"null")
                with receiver.lock:
                    receiver.requests.append((self.path, body, time.monotonic()))
                    queued = receiver.script[self.path]
                    status, headers = queued.pop(0) if queued else (202, {})
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                reply = b'{"status":"success"}' if status < 300 else b'{"status":"invalid event"}'
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet test output
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def bodies(self, path: str) -> list[dict[str, Any]]:
        with self.lock:
            return [body for p, body, _ in self.requests if p == path]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    server.thread.start()
    try:
        yield server
    finally:
        server.server.shutdown()
        server.server.server_close()


def wait_for(condition: Callable[[], bool], timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def episode(severity: Severity = Severity.high, **changes: Any) -> Anomaly:
    detected = datetime(2024, 5, 6, 14, 0, tzinfo=UTC)
    base = Anomaly(
        metric_type="signups",
        period="hour",
        dimensions={"country": "DE"},
        detected_at=detected,
        window_start=detected - timedelta(hours=1),
        severity=severity,
        expected=120.0,
        actual=3.0,
        deviation=-117.0,
        score=7.5,
        detector="seasonal_likelihood",
        description="signups (country=DE, hour) is 3 vs 120 expected (-97.5%), score 7.5",
    )
    return base.model_copy(update=changes)


def test_retries_429_and_5xx_honouring_retry_after(receiver: Receiver) -> None:
    receiver.script["/pd"] = [(429, {"Retry-After": "1"}), (500, {}), (503, {})]
    policy = RetryPolicy(max_attempts=5, backoff_seconds=0.05, backoff_max_seconds=2.0)
    with httpx.Client(timeout=5) as client:
        result = post_json(client, receiver.url + "/pd", {"x": 1}, policy)
    assert result.delivered and result.attempts == 4 and result.status == 202
    times = [t for p, _, t in receiver.requests if p == "/pd"]
    assert len(times) == 4
    assert times[1] - times[0] >= 0.95  # Retry-After: 1 second was honoured
    assert times[2] - times[1] >= 0.05 and times[3] - times[2] >= 0.1  # then exponential backoff


def test_permanent_4xx_and_exhausted_retries_fail_with_a_reason(receiver: Receiver) -> None:
    receiver.script["/bad"] = [(400, {})]
    receiver.script["/down"] = [(500, {})] * 3
    policy = RetryPolicy(max_attempts=3, backoff_seconds=0.01, backoff_max_seconds=0.05)
    with httpx.Client(timeout=5) as client:
        bad = post_json(client, receiver.url + "/bad", {}, policy)
        down = post_json(client, receiver.url + "/down", {}, policy)
        refused = post_json(client, "http://127.0.0.1:9/none", {}, RetryPolicy(2, 0.01, 0.01))
    assert not bad.delivered and bad.attempts == 1 and bad.reason.startswith("permanent: HTTP 400")
    assert not down.delivered and down.attempts == 3 and down.reason.startswith("retries exhausted: HTTP 500")
    assert not refused.delivered and refused.attempts == 2 and refused.status is None


def test_dispatcher_pages_once_updates_on_escalation_and_resolves(receiver: Receiver) -> None:
    settings = Settings(
        alert_webhook_url=receiver.url + "/hook",
        alert_pagerduty_routing_key="R" * 32,
        alert_pagerduty_url=receiver.url + "/pd",
        alert_alertmanager_url=receiver.url + "/am",
        alert_routes={
            "low": ["webhook"],
            "medium": ["webhook"],
            "high": ["webhook", "alertmanager"],
            "critical": ["webhook", "alertmanager", "pagerduty"],
        },
    )
    recorded: list[AlertDelivery] = []
    with httpx.Client(timeout=5) as client:
        dispatcher = AlertDispatcher(
            channels_from_settings(settings),
            router_from_settings(settings),
            OpenAlertBook(),
            RetryPolicy(3, 0.01, 0.05),
            client,
            recorded.append,
        )
        now = datetime(2024, 5, 6, 14, 5, tzinfo=UTC)
        first = episode(Severity.high)
        assert dispatcher.handle(first, now) == AlertAction.trigger
        assert dispatcher.handle(first, now) is None  # replayed message
        assert dispatcher.handle(episode(Severity.medium), now) is None  # second anomaly, series open
        assert dispatcher.handle(episode(Severity.critical), now) == AlertAction.update
        resolved = first.model_copy(
            update={
                "status": AnomalyStatus.resolved,
                "resolved_by": "detector",
                "resolved_at": now + timedelta(hours=2),
            }
        )
        assert dispatcher.handle(resolved, now) == AlertAction.resolve
    assert [b["action"] for b in receiver.bodies("/hook")] == ["trigger", "update", "resolve"]
    assert [b["status"] for b in receiver.bodies("/am")] == ["firing", "firing", "resolved"]
    pd = receiver.bodies("/pd")
    assert [b["event_action"] for b in pd] == ["trigger", "resolve"]  # paged only when it became critical
    assert pd[0]["dedup_key"] == pd[1]["dedup_key"] == first.dedup_key
    assert all(d.outcome == DeliveryOutcome.delivered for d in recorded)


def test_quiet_hours_defer_until_they_end(receiver: Receiver) -> None:
    settings = Settings(
        alert_webhook_url=receiver.url + "/hook",
        alert_quiet_hours="22:00-07:00",
        alert_routes={"high": ["webhook"], "critical": ["webhook"]},
    )
    recorded: list[AlertDelivery] = []
    with httpx.Client(timeout=5) as client:
        dispatcher = AlertDispatcher(
            channels_from_settings(settings),
            router_from_settings(settings),
            OpenAlertBook(),
            RetryPolicy(2, 0.01, 0.01),
            client,
            recorded.append,
        )
        night = datetime(2024, 5, 6, 23, 0, tzinfo=UTC)
        dispatcher.handle(episode(Severity.high), night)
        dispatcher.handle(episode(Severity.critical, metric_type="errors"), night)
        assert [b["anomaly"]["metricType"] for b in receiver.bodies("/hook")] == ["errors"]  # critical goes out
        assert dispatcher.release_deferred(night + timedelta(hours=1)) == 0
        assert dispatcher.release_deferred(datetime(2024, 5, 7, 7, 0, tzinfo=UTC)) == 1
    assert [b["anomaly"]["metricType"] for b in receiver.bodies("/hook")] == ["errors", "signups"]
    assert [d.outcome for d in recorded].count(DeliveryOutcome.deferred) == 1


def _read_all(settings: Settings, topic: str, expected: int, timeout: float = 60.0) -> list[AlertDelivery]:
    consumer = Consumer(
        {
            "bootstrap.servers": settings.kafka_bootstrap,
            "group.id": f"reader-{time.time_ns()}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([settings.topic(topic)])
    found: list[AlertDelivery] = []
    deadline = time.monotonic() + timeout
    try:
        while len(found) < expected and time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is None or message.error():
                continue
            found.append(AlertDelivery.from_avro(alert_delivery_codec().decode(message.value())))
    finally:
        consumer.close()
    return found


def test_alert_consumer_end_to_end_through_kafka(kafka_settings: Settings, receiver: Receiver) -> None:
    receiver.script["/hook"] = [(429, {"Retry-After": "0"}), (500, {})]  # first delivery retried twice
    receiver.script["/slack"] = [(400, {})] * 10  # Slack rejects everything: dead letters
    settings = kafka_settings.model_copy(
        update={
            "alert_webhook_url": receiver.url + "/hook",
            "alert_slack_webhook_url": receiver.url + "/slack",
            "alert_routes": {s.value: ["webhook", "slack"] for s in Severity},
            "alert_backoff_seconds": 0.05,
            "alert_backoff_max_seconds": 0.2,
        }
    )
    first = episode(Severity.high)
    resolved = first.model_copy(
        update={
            "status": AnomalyStatus.resolved,
            "resolved_by": "detector",
            "resolved_at": first.detected_at + timedelta(hours=3),
        }
    )
    messages = [first, first, episode(Severity.medium), resolved]
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap})
    for message in messages:
        producer.produce(
            settings.topic(ANOMALIES.name),
            key=first.series_key.encode(),
            value=anomaly_codec().encode(message.to_avro()),
        )
    producer.produce(settings.topic(ANOMALIES.name), value=b"not avro")
    assert producer.flush(30) == 0

    service = AlertConsumer(settings)
    service.start()
    try:
        wait_for(lambda: service.handled >= 5, what="every anomaly message handled")
    finally:
        service.stop()

    hooks = receiver.bodies("/hook")
    # The trigger was attempted three times (429, 500, 202), then nothing until the resolve.
    assert [b["action"] for b in hooks] == ["trigger", "trigger", "trigger", "resolve"]
    assert all(b["dedupKey"] == first.dedup_key for b in hooks)
    assert len(receiver.bodies("/slack")) == 1  # a 400 is not retried; resolve goes only where trigger arrived

    outcomes = _read_all(settings, ALERTS.name, expected=2)
    assert sorted((d.channel, d.action.value, d.outcome.value) for d in outcomes) == [
        ("webhook", "resolve", "delivered"),
        ("webhook", "trigger", "delivered"),
    ]
    assert next(d for d in outcomes if d.action == AlertAction.trigger).attempts == 3
    dead = _read_all(settings, ALERTS_DLQ.name, expected=2)
    reasons = sorted(d.reason.split(":")[0] for d in dead)
    assert reasons == ["permanent", "undecodable anomaly"]
    assert next(d for d in dead if d.channel == "slack").http_status == 400

    # Offsets were committed after delivery: all five messages are behind the group's position.
    check = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": settings.group("alerts")})
    try:
        (committed,) = check.committed([TopicPartition(settings.topic(ANOMALIES.name), 0)], timeout=10)
    finally:
        check.close()
    assert committed.offset == 5


def test_detector_bank_findings_reach_on_call_and_resolve(receiver: Receiver) -> None:
    """A revenue drop in an hourly series fires one webhook alert within a few windows, then resolves."""
    rng = random.Random(7)
    start = datetime(2024, 1, 1, tzinfo=UTC)
    drop_at, drop_hours = 24 * 25 + 11, 5
    bank = DetectorBank()
    settings = Settings(alert_webhook_url=receiver.url + "/hook", alert_routes={s.value: ["webhook"] for s in Severity})
    with httpx.Client(timeout=5) as client:
        dispatcher = AlertDispatcher(
            channels_from_settings(settings),
            router_from_settings(settings),
            OpenAlertBook(),
            RetryPolicy(3, 0.01, 0.05),
            client,
            lambda _: None,
        )
        fired_at: list[int] = []
        for i in range(24 * 30):
            t = start + timedelta(hours=i)
            value = 500 + 300 * math.sin(2 * math.pi * (t.hour - 8) / 24) + rng.gauss(0, 20)
            if drop_at <= i < drop_at + drop_hours:
                value *= 0.2
            snapshot = MetricSnapshot(
                metric_type="gmv",
                period="hour",
                period_start=t,
                period_end=t + timedelta(hours=1),
                value=value,
                computed_at=t,
            )
            for found in bank.process(snapshot):
                if dispatcher.handle(found, t) == AlertAction.trigger:
                    fired_at.append(i)
    actions = [b["action"] for b in receiver.bodies("/hook")]
    assert actions[0] == "trigger" and actions[-1] == "resolve"
    assert actions.count("trigger") == 1 and actions.count("resolve") == 1
    assert drop_at < fired_at[0] <= drop_at + 3  # judged when the next hour starts: bounded delay
