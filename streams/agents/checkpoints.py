"""Checkpoint topics of the stream worker's stages: compacted, one checkpoint message per key.

Each stage writes its whole state as ONE message (that is what makes a checkpoint atomic)
to a compacted topic, and only then commits the offsets that state reflects: the events
stage one per ``events.raw`` partition, metric merging one per lane of ``metrics.partials``,
anomaly detection one for its detector bank. A partition of a checkpoint topic is written
by one owner at a time, so its newest message is the newest checkpoint (compaction keeps
the newest message of every key).
"""

from __future__ import annotations

import time

from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from tidemark.settings import Settings

# A busy partition's open windows can weigh megabytes: checkpoint topics and producers take messages this large.
MAX_CHECKPOINT_BYTES = 64 * 1024 * 1024


def ensure_checkpoint_topic(settings: Settings, name: str, partitions: int) -> None:
    """Create the compacted topic ``name`` (full name, prefix included) unless it exists."""
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    metadata = admin.list_topics(timeout=30)
    if name in metadata.topics:
        return
    topic = NewTopic(
        name,
        num_partitions=partitions,
        replication_factor=1 if len(metadata.brokers) < 3 else 3,
        config={"cleanup.policy": "compact", "max.message.bytes": str(MAX_CHECKPOINT_BYTES)},
    )
    for future in admin.create_topics([topic], operation_timeout=30).values():
        try:
            future.result()
        except Exception as exc:  # created concurrently by another worker: fine
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise


def read_checkpoint(settings: Settings, topic: str, partition: int, key: bytes, timeout: float = 30.0) -> bytes | None:
    """The newest message under ``key`` in ``topic``'s ``partition`` (``None`` when there is none yet)."""
    consumer = Consumer({
        "bootstrap.servers": settings.kafka_bootstrap,
        "group.id": settings.group("checkpoint-restore"),
        "enable.auto.commit": False,
        "fetch.message.max.bytes": MAX_CHECKPOINT_BYTES,
        "receive.message.max.bytes": MAX_CHECKPOINT_BYTES + 1024 * 1024,
    })
    try:
        low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=timeout)
        if high <= low:
            return None
        # The newest message is the one wanted; the whole partition is read only if it is another key's.
        for start in (max(low, high - 1), low):
            latest = _newest(consumer, topic, partition, key, start, high, timeout)
            if latest is not None or start == low:
                return latest
        return None
    finally:
        consumer.close()


def _newest(consumer: Consumer, topic: str, partition: int, key: bytes, start: int, high: int,
            timeout: float) -> bytes | None:
    consumer.assign([TopicPartition(topic, partition, start)])
    latest, position = None, start
    deadline = time.monotonic() + timeout
    while position < high:
        message = consumer.poll(max(0.0, deadline - time.monotonic()))
        if message is None:
            raise RuntimeError(f"could not read the checkpoint in {topic}[{partition}] within {timeout} s")
        if message.error():
            continue
        position = (message.offset() or position) + 1
        if message.key() == key and message.value():
            latest = message.value()
    return latest
