"""Faust's Kafka client (aiokafka) reads what Tidemark's producers write.

The SDK and the collector compress with lz4; a consumer without the codec crashes on the
first batch. The stream worker's stages read with librdkafka, but anything that consumes
through its Faust app (an agent) goes through aiokafka: this reads an SDK-written topic
back with aiokafka itself.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest
from aiokafka import AIOKafkaConsumer

from schemas import AnalyticsEvent, event_codec
from tidemark.settings import Settings
from tidemark.tracker import Tracker

pytestmark = pytest.mark.integration


def test_aiokafka_reads_lz4_batches_written_by_the_sdk(kafka_settings: Settings) -> None:
    with Tracker(kafka_settings.kafka_bootstrap, settings=kafka_settings, compression="lz4") as tracker:
        ids = {tracker.track("login", user_id=f"u{i}", timestamp=datetime.now(UTC)) for i in range(50)}
        assert tracker.flush(30) == 0

    async def read_back() -> set[object]:
        consumer = AIOKafkaConsumer(
            kafka_settings.topic("events.raw"),
            bootstrap_servers=kafka_settings.kafka_bootstrap,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
        )
        await consumer.start()
        seen: set[object] = set()
        try:
            async with asyncio.timeout(60):
                while len(seen) < len(ids):
                    batches = await consumer.getmany(timeout_ms=1000)
                    for records in batches.values():
                        for record in records:
                            seen.add(AnalyticsEvent.from_avro(event_codec().decode(record.value)).id)
        finally:
            await consumer.stop()
        return seen

    assert asyncio.run(read_back()) == ids
