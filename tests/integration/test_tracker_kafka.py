"""The SDK against the real Kafka broker: every tracked event lands once on events.raw, intact."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from confluent_kafka import Consumer, TopicPartition

from schemas.codec import event_codec
from schemas.models import AnalyticsEvent
from tidemark.demo import TrafficConfig, generate_events
from tidemark.settings import Settings
from tidemark.tracker import Tracker

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def read_topic(settings: Settings, topic: str, timeout: float = 60.0) -> list[tuple[bytes | None, AnalyticsEvent]]:
    """Every record of ``topic`` up to its current end offsets (exactly what was written, no more)."""
    consumer = Consumer(
        {
            "bootstrap.servers": settings.kafka_bootstrap,
            "group.id": f"check-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    name = settings.topic(topic)
    try:
        partitions = consumer.list_topics(name, timeout=10).topics[name].partitions
        ends = {p: consumer.get_watermark_offsets(TopicPartition(name, p), timeout=10)[1] for p in partitions}
        total = sum(ends.values())
        consumer.assign([TopicPartition(name, p, 0) for p in partitions])
        records: list[tuple[bytes | None, AnalyticsEvent]] = []
        deadline = time.monotonic() + timeout
        while len(records) < total and time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is None:
                continue
            assert message.error() is None, message.error()
            decoded = AnalyticsEvent.from_avro(event_codec().decode(message.value()))
            records.append((message.key(), decoded))
    finally:
        consumer.close()
    assert len(records) == total
    return records


def test_tracked_events_land_once_with_key_properties_and_context(kafka_settings: Settings) -> None:
    anon = str(uuid.uuid4())
    at = datetime(2026, 11, 20, 9, 30, 15, 123000, tzinfo=UTC)
    with Tracker(settings=kafka_settings, linger_ms=5) as tracker:
        page_id = tracker.page(
            "/projects/prj_1", title="Clean water", anonymous_id=anon, referrer="https://www.google.com/"
        )
        fund_ids = [
            tracker.track(
                "fund_project",
                anonymous_id=anon,
                properties={"project_id": "prj_1", "amount": 25.5 + n, "currency": "USD", "note": "héllo ✓"},
                context={"locale": "sw-KE", "location": {"country": "KE"}},
                timestamp=at + timedelta(seconds=n),
            )
            for n in range(200)
        ]
        identify_id = tracker.identify("usr_42", anonymous_id=anon, traits={"country": "KE", "age_band": "25-34"})
        login_id = tracker.track("login", user_id="usr_42")
        assert tracker.flush(timeout=60) == 0
        assert tracker.stats.delivered == 203
        assert tracker.failed == 0 and tracker.dropped == 0

    records = read_topic(kafka_settings, "events.raw")
    by_id = {event.id: (key, event) for key, event in records}
    assert len(records) == len(by_id) == 203  # once each: no loss, no duplicate

    key, page = by_id[page_id]
    assert key == anon.encode()
    assert page.event_name == "page_view" and page.event_type.value == "page_view"
    assert page.properties["path"] == "/projects/prj_1" and page.properties["title"] == "Clean water"
    assert page.context["page"]["path"] == "/projects/prj_1"
    assert page.context["referrer"] == {"url": "https://www.google.com/"}

    for n, fund_id in enumerate(fund_ids):
        key, fund = by_id[fund_id]
        assert key == anon.encode()
        assert fund.event_type.value == "conversion"
        assert fund.timestamp == at + timedelta(seconds=n)
        assert fund.properties == {"project_id": "prj_1", "amount": 25.5 + n, "currency": "USD", "note": "héllo ✓"}
        assert fund.context["location"] == {"country": "KE"} and fund.context["locale"] == "sw-KE"
        assert fund.context["library"]["name"] == "tidemark-python"
        assert fund.source == "sdk" and fund.received_at is not None

    key, identify = by_id[identify_id]
    assert identify.event_name == "identify"
    assert (identify.user_id, identify.anonymous_id) == ("usr_42", anon)  # both ids: this links the device
    assert identify.properties == {"country": "KE", "age_band": "25-34"}
    assert key == anon.encode()
    key, login = by_id[login_id]
    assert key == b"usr_42" and login.anonymous_id is None

    # One device's events stay in order (same key, same partition, produced in order).
    stamps = [event.timestamp for key, event in records if event.event_name == "fund_project"]
    assert stamps == sorted(stamps)


def test_demo_events_are_sent_as_they_are(kafka_settings: Settings) -> None:
    start = datetime(2026, 11, 2, tzinfo=UTC)
    events = list(generate_events(TrafficConfig(start=start, end=start + timedelta(hours=12), sessions_per_day=300)))
    with Tracker(settings=kafka_settings, source="ignored-for-send") as tracker:
        for event in events:
            tracker.send(event)
        assert tracker.flush(timeout=60) == 0
        assert tracker.delivered == len(events)
    received = {event.id: event for _, event in read_topic(kafka_settings, "events.raw")}
    assert len(received) == len(events)
    for event in events:
        assert received[event.id].to_avro() == event.to_avro()


def test_interpreter_exit_flushes_what_is_queued(kafka_settings: Settings) -> None:
    # A program that tracks and exits without closing: the atexit hook must deliver the events.
    # A linger.ms of 20 s keeps them in the producer's queue until the interpreter shuts down (flush ignores it).
    program = f"""
from tidemark.settings import Settings
from tidemark.tracker import Tracker
tracker = Tracker(settings=Settings(kafka_bootstrap={kafka_settings.kafka_bootstrap!r},
                                    topic_prefix={kafka_settings.topic_prefix!r}),
                  linger_ms=20000, delivery_timeout_ms=60000)
for n in range(150):
    tracker.track("login", user_id=f"u{{n}}")
print(tracker.stats.delivered)
"""
    result = subprocess.run(
        [sys.executable, "-c", program],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "0"  # nothing was delivered before exit ...
    records = read_topic(kafka_settings, "events.raw")
    assert sorted(event.user_id for _, event in records) == sorted(f"u{n}" for n in range(150))  # ... all after
