"""The local broker serves, and topics are created once with their declared partitions."""

from __future__ import annotations

import pytest
from confluent_kafka.admin import AdminClient

from tidemark.settings import Settings
from tidemark.topics import ALL_TOPICS, ensure_topics

pytestmark = pytest.mark.integration


def test_topics_are_created_idempotently_with_declared_partitions(kafka_settings: Settings) -> None:
    ensure_topics(kafka_settings)  # a second call is harmless
    metadata = AdminClient({"bootstrap.servers": kafka_settings.kafka_bootstrap}).list_topics(timeout=10)
    for spec in ALL_TOPICS:
        topic = metadata.topics[kafka_settings.topic(spec.name)]
        assert topic.error is None
        assert len(topic.partitions) == spec.partitions
