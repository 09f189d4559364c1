"""The events stage's consumer thread against the real broker: when it commits what it consumed."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from schemas.models import AnalyticsEvent
from streams.agents.events import EventsConsumer
from streams.agents.metrics import PARTIALS_PARTITIONS, PARTIALS_TOPIC
from streams.aggregators import compile_catalogue
from streams.app import ensure_stream_topics
from streams.catalogue import get_catalogue
from tests.integration.stream_worker import committed_offsets, produce_events, wait_for
from tidemark.settings import Settings
from tidemark.topics import EVENTS_RAW

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

START = datetime(2026, 3, 2, 9, tzinfo=UTC)


def _events(first: int, count: int) -> list[AnalyticsEvent]:
    return [AnalyticsEvent(event_name="page_view", event_type="page_view", anonymous_id=f"d{i % 17}",
                           timestamp=START + timedelta(seconds=i)) for i in range(first, first + count)]


def test_a_pause_in_traffic_checkpoints_and_commits_without_waiting_for_the_next_due_checkpoint(
    kafka_settings: Settings,
) -> None:
    settings = kafka_settings.model_copy(update={"stream_flush_seconds": 0.2, "stream_flush_events": 1_000_000})
    ensure_stream_topics(settings)
    stage = EventsConsumer(settings, compile_catalogue(get_catalogue(), ["signups"]), settings.topic(PARTIALS_TOPIC),
                           partial_lanes=PARTIALS_PARTITIONS)
    stage.agent.checkpoint_seconds = 3_600  # after its first flush, no partition is due again within the test
    group, topic = f"{settings.topic_prefix}{settings.stream_app_id}", settings.topic(EVENTS_RAW.name)

    def committed() -> int:
        assert stage.failure is None and stage.running
        return committed_offsets(settings, group, topic, EVENTS_RAW.partitions)

    stage.start()
    try:
        sent = produce_events(settings, _events(0, 60))
        wait_for(lambda: committed() == sent, 90, "the first events committed")
        # Later events are neither due by time nor by count: only the pause makes them checkpointed.
        sent += produce_events(settings, _events(60, 60))
        wait_for(lambda: committed() == sent, 90, "the events after the pause committed")
    finally:
        stage.stop()
    assert stage.failure is None
