"""What the sink tests share: realistic events, a producer, offsets, and polling with a deadline."""

from __future__ import annotations

import json
import random
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from confluent_kafka import Consumer, Producer, TopicPartition

from schemas.codec import event_codec
from tidemark.settings import Settings

T = TypeVar("T")

BASE_MILLIS = 1_764_000_000_000  # 2025-11-24T16:00:00Z


def make_events(count: int, seed: int = 7) -> list[dict[str, Any]]:
    """``count`` Avro event records with unique ids; every fifth has no ``receivedAt`` and no user id."""
    rng = random.Random(seed)
    names = ["page_view", "login", "fund_project", "watch_ad", "create_loan"]
    events = []
    for i in range(count):
        name = rng.choice(names)
        events.append(
            {
                "id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
                "eventType": "page_view" if name == "page_view" else "action",
                "eventName": name,
                "userId": None if i % 5 == 0 else f"user-{rng.randrange(50)}",
                "anonymousId": f"anon-{rng.randrange(80)}",
                "sessionId": f"s-{rng.randrange(100)}",
                "properties": json.dumps(
                    {"amount": round(rng.uniform(1, 100), 2), "currency": "EUR", "community": "Lakeside", "n": i},
                    separators=(",", ":"),
                ),
                "context": json.dumps({"location": {"country": "DE"}, "device": {"type": "mobile"}}),
                "timestamp": BASE_MILLIS + i * 1000,
                "receivedAt": None if i % 5 == 0 else BASE_MILLIS + i * 1000 + 250,
                "source": "sdk",
            }
        )
    return events


def produce(settings: Settings, topic: str, payloads: Iterable[bytes], key_prefix: str = "k") -> int:
    """Produce every payload to ``topic`` (spread over partitions by key) and wait until all are acknowledged."""
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap, "enable.idempotence": True, "linger.ms": 5})
    failures: list[str] = []

    def delivered(err: Any, _msg: Any) -> None:
        if err is not None:
            failures.append(str(err))

    sent = 0
    for i, payload in enumerate(payloads):
        producer.produce(settings.topic(topic), payload, key=f"{key_prefix}{i}", on_delivery=delivered)
        producer.poll(0)
        sent += 1
    remaining = producer.flush(30)
    assert remaining == 0 and not failures, f"undelivered: {remaining}, failed: {failures[:3]}"
    return sent


def encode_events(events: Iterable[dict[str, Any]]) -> list[bytes]:
    """The events in the wire format (Avro single-object encoding)."""
    codec = event_codec()
    return [codec.encode(event) for event in events]


def high_watermarks(settings: Settings, topic: str) -> dict[int, int]:
    """partition -> offset after the last message, for every partition of ``topic``."""
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": "tidemark-test-watermarks"})
    try:
        full = settings.topic(topic)
        partitions = consumer.list_topics(full, timeout=10).topics[full].partitions
        return {p: consumer.get_watermark_offsets(TopicPartition(full, p), timeout=10)[1] for p in partitions}
    finally:
        consumer.close()


def committed_offsets(settings: Settings, group_id: str, topic: str) -> dict[int, int]:
    """partition -> committed offset of ``group_id`` on ``topic`` (0 where nothing is committed yet)."""
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": group_id})
    try:
        full = settings.topic(topic)
        partitions = consumer.list_topics(full, timeout=10).topics[full].partitions
        committed = consumer.committed([TopicPartition(full, p) for p in partitions], timeout=10)
        return {tp.partition: max(tp.offset, 0) for tp in committed}
    finally:
        consumer.close()


def caught_up(settings: Settings, group_id: str, topic: str) -> bool:
    """Whether ``group_id`` has committed everything on ``topic`` (consumer lag 0 everywhere)."""
    return committed_offsets(settings, group_id, topic) == high_watermarks(settings, topic)


def wait_for(condition: Callable[[], T | None], timeout: float, what: str, interval: float = 0.2) -> T:
    """Poll ``condition`` until it returns something truthy; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = condition()
        if last:
            return last
        time.sleep(interval)  # polling interval of a condition with a deadline
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")
