"""Every Kafka topic Tidemark uses, declared once with its partitions and retention.

``ensure_topics`` creates them idempotently (an existing topic is left as it is).
"""

from __future__ import annotations

from dataclasses import dataclass

from confluent_kafka.admin import AdminClient, NewTopic

from tidemark.settings import Settings

DAY_MS = 24 * 3600 * 1000


@dataclass(frozen=True)
class TopicSpec:
    """A logical topic: its name (before the prefix), partitions, retention and cleanup policy."""

    name: str
    partitions: int
    retention_ms: int
    cleanup_policy: str = "delete"


EVENTS_RAW = TopicSpec("events.raw", partitions=6, retention_ms=7 * DAY_MS)
EVENTS_DLQ = TopicSpec("events.dlq", partitions=1, retention_ms=30 * DAY_MS)
SESSIONS = TopicSpec("sessions", partitions=6, retention_ms=7 * DAY_MS)
METRICS = TopicSpec("metrics", partitions=3, retention_ms=7 * DAY_MS)
ANOMALIES = TopicSpec("anomalies", partitions=1, retention_ms=30 * DAY_MS)
ALERTS = TopicSpec("alerts", partitions=1, retention_ms=30 * DAY_MS)
ALERTS_DLQ = TopicSpec("alerts.dlq", partitions=1, retention_ms=30 * DAY_MS)

ALL_TOPICS: tuple[TopicSpec, ...] = (EVENTS_RAW, EVENTS_DLQ, SESSIONS, METRICS, ANOMALIES, ALERTS, ALERTS_DLQ)


def ensure_topics(settings: Settings, topics: tuple[TopicSpec, ...] = ALL_TOPICS, timeout: float = 30.0) -> None:
    """Create any of ``topics`` that do not exist yet; existing topics are left untouched."""
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    existing = set(admin.list_topics(timeout=timeout).topics)
    new = [
        NewTopic(
            settings.topic(t.name),
            num_partitions=t.partitions,
            replication_factor=1 if _single_broker(admin, timeout) else 3,
            config={"retention.ms": str(t.retention_ms), "cleanup.policy": t.cleanup_policy},
        )
        for t in topics
        if settings.topic(t.name) not in existing
    ]
    if not new:
        return
    for name, future in admin.create_topics(new, operation_timeout=timeout).items():
        try:
            future.result()
        except Exception as exc:  # a concurrent creator won the race: that is fine
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise RuntimeError(f"could not create topic {name}: {exc}") from exc


def _single_broker(admin: AdminClient, timeout: float) -> bool:
    return len(admin.list_topics(timeout=timeout).brokers) < 3
