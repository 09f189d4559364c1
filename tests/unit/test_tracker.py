"""The SDK's behaviour when the caller is wrong or Kafka is away.

These use the real confluent-kafka producer pointed at a closed local port (no broker
answers, so nothing can be delivered); the delivered path is in the integration tests.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from uuid import UUID

import pytest

from tidemark.settings import Settings
from tidemark.tracker import Tracker


def _closed_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"127.0.0.1:{port}"  # nothing listens here once the socket is closed


@pytest.fixture
def offline() -> Iterator[Tracker]:
    tracker = Tracker(_closed_port(), Settings(topic_prefix="unit."), delivery_timeout_ms=60_000)
    yield tracker
    tracker.close(timeout=0)


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"event_name": "login"}, "userId or anonymousId"),
        ({"event_name": " ", "user_id": "u1"}, "blank"),
        ({"event_name": "", "user_id": "u1"}, "eventName"),
        ({"event_name": "login", "user_id": "u1", "timestamp": datetime(2026, 1, 1)}, "timezone"),
        ({"event_name": "login", "user_id": "u1", "properties": {"when": object()}}, "not JSON"),
        ({"event_name": "login", "user_id": "u1", "properties": {"ratio": float("nan")}}, "not JSON"),
        ({"event_name": "login", "user_id": "u1", "properties": ["not", "a", "mapping"]}, "mapping"),
        ({"event_name": "login", "user_id": "u1", "message_id": "not-a-uuid"}, "UUID"),
        ({"event_name": "login", "user_id": "u" * 300}, "userId"),
        ({"event_name": "login", "user_id": "u1", "properties": {"blob": "x" * 40_000}}, "limit"),
    ],
)
def test_invalid_input_raises_value_error_at_once(offline: Tracker, kwargs: dict, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        offline.track(**kwargs)
    assert offline.stats.enqueued == 0


def test_valid_input_is_queued_with_its_message_id(offline: Tracker) -> None:
    message_id = UUID("6a3c1b3e-95a4-4f8f-9a57-1b1f6a7f0001")
    returned = offline.track(
        "fund_project",
        user_id="usr_1",
        properties={"amount": Decimal("25.50"), "at": datetime(2026, 1, 1, tzinfo=UTC), "tags": {"a"}},
        message_id=str(message_id),
    )
    assert returned == message_id
    assert offline.stats.enqueued == 1
    assert isinstance(offline.track("login", anonymous_id="a1"), UUID)


def test_identify_and_page_need_their_ids(offline: Tracker) -> None:
    with pytest.raises(ValueError):
        offline.identify("")
    with pytest.raises(ValueError):
        offline.page(user_id="u1")
    offline.page(url="https://example.org/projects/p1?x=1", user_id="u1")
    assert offline.stats.enqueued == 1


def test_full_queue_drops_and_counts_instead_of_blocking() -> None:
    tracker = Tracker(
        _closed_port(),
        Settings(topic_prefix="unit."),
        queue_max_messages=10,
        max_block_ms=5,
        delivery_timeout_ms=60_000,
    )
    try:
        for n in range(50):
            tracker.track("login", user_id=f"u{n}")
        stats = tracker.stats
        assert stats.enqueued == 10
        assert stats.dropped == 40
        assert stats.delivered == 0
    finally:
        left = tracker.close(timeout=0)
    assert left == 10
    assert tracker.failed == 10  # purged on close and counted, not silently forgotten


def test_undeliverable_events_are_counted_as_failed_and_flush_reports_none_left() -> None:
    tracker = Tracker(_closed_port(), Settings(topic_prefix="unit."), delivery_timeout_ms=1_000)
    try:
        for n in range(5):
            tracker.track("login", user_id=f"u{n}")
        assert tracker.flush(timeout=30) == 0  # returns once every record has a final outcome
        assert tracker.failed == 5
        assert tracker.delivered == 0
    finally:
        tracker.close(timeout=0)


def test_closed_tracker_refuses_new_events() -> None:
    tracker = Tracker(_closed_port(), Settings(topic_prefix="unit."))
    assert tracker.close(timeout=0) == 0
    assert tracker.close(timeout=0) == 0
    with pytest.raises(RuntimeError):
        tracker.track("login", user_id="u1")
