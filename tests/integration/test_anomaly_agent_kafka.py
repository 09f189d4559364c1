"""The anomaly agent on the real broker: metric snapshots in, anomaly episodes out, state across a restart.

The agent's processing runs in-process (no Faust worker): a plain consumer of ``metrics``
feeds :class:`~streams.agents.anomalies.AnomalyAgent` as built for the worker
(:func:`~streams.agents.anomalies.build_anomaly_agent`: real producer, real checkpoint topic).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import uuid4

import pytest
from confluent_kafka import Consumer, Producer

from schemas.anomaly import Anomaly, AnomalyStatus, anomaly_codec
from schemas.streams import MetricSnapshot, metric_snapshot_codec
from streams.agents.anomalies import AnomalyAgent, build_anomaly_agent, ensure_state_topic, read_checkpoint
from streams.agents.metrics import window_key_text
from streams.catalogue import get_catalogue
from tidemark.settings import Settings
from tidemark.topics import ANOMALIES, METRICS

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

T0 = datetime(2024, 1, 1, tzinfo=UTC)
GRACE = timedelta(seconds=300)


def seasonal(hour: int) -> float:
    """A clean daily pattern with a little deterministic noise."""
    return 100.0 + 30.0 * math.sin(2 * math.pi * (hour % 24) / 24) + (hour * 7) % 5


def snapshot(
    metric: str, hour: int, value: float, dimensions: dict[str, str], computed_minute: int = 59
) -> MetricSnapshot:
    start = T0 + timedelta(hours=hour)
    return MetricSnapshot(metric_type=metric, period="hour", period_start=start, period_end=start + timedelta(hours=1),
                          value=value, dimensions=dimensions, computed_at=start + timedelta(minutes=computed_minute))


def produce(settings: Settings, snapshots: list[MetricSnapshot]) -> None:
    """Publish like the metrics agent: keyed per window, so one series spreads over partitions."""
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap, "enable.idempotence": True})
    codec = metric_snapshot_codec()
    for s in snapshots:
        dimension, value = next(iter(s.dimensions.items()), ("", ""))
        key = window_key_text(s.metric_type, dimension, value, s.period, int(s.period_start.timestamp() * 1000))
        producer.produce(settings.topic(METRICS.name), key=key.encode(), value=codec.encode(s.to_avro()))
    assert producer.flush(30) == 0


def consume_into(agent: AnomalyAgent, consumer: Consumer, count: int, deadline_s: float = 30.0) -> None:
    """Feed ``count`` metrics messages to the agent (polling until they came or the deadline passed)."""
    seen = 0
    deadline = time.monotonic() + deadline_s
    while seen < count and time.monotonic() < deadline:
        message = consumer.poll(0.5)
        if message is None or message.error():
            continue
        agent.on_message(message.value(), message)
        seen += 1
    assert seen == count, f"consumed {seen} of {count} snapshots"


def read_anomalies(settings: Settings, count: int, deadline_s: float = 20.0) -> list[Anomaly]:
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": f"check-{uuid4().hex}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    consumer.subscribe([settings.topic(ANOMALIES.name)])
    found: list[Anomaly] = []
    deadline = time.monotonic() + deadline_s
    try:
        while len(found) < count and time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is None or message.error():
                continue
            found.append(Anomaly.from_avro(anomaly_codec().decode(message.value())))
        extra = consumer.poll(1.0)  # nothing beyond what was expected
        assert extra is None or extra.error(), "more anomaly messages than expected"
    finally:
        consumer.close()
    return found


def worker(settings: Settings) -> tuple[AnomalyAgent, Consumer, Callable[[], None]]:
    """What a worker process builds: its consumer of ``metrics`` and the agent (restored from the checkpoint)."""
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": settings.group("anomalies"),
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    consumer.subscribe([settings.topic(METRICS.name)])
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap, "enable.idempotence": True})

    def publisher(topic: str) -> Callable[[bytes, bytes], None]:
        return lambda key, value: producer.produce(topic, key=key, value=value)

    def durable() -> None:
        assert producer.flush(30) == 0

    def ack(message: Any) -> None:
        consumer.commit(message=message, asynchronous=False)

    agent = build_anomaly_agent(settings, get_catalogue(), publisher, durable, ack)
    return agent, consumer, consumer.close


@pytest.fixture
def settings(kafka_settings: Settings) -> Settings:
    configured = kafka_settings.model_copy(update={
        "anomaly_detector": "seasonal_robust_z",
        "anomaly_detector_params": {"warm_up": 24, "min_slot_obs": 3},
        "anomaly_severity_thresholds": {"low": 5.0, "medium": 8.0, "high": 12.0, "critical": 20.0},
        "anomaly_recovery_periods": 2,
        "anomaly_dimensions": ["country"],
        "stream_grace_seconds": GRACE.total_seconds(),
    })
    ensure_state_topic(configured)
    return configured


def test_drop_opens_then_recovery_resolves_across_a_restart(settings: Settings) -> None:
    de = {"country": "DE"}
    history: list[MetricSnapshot] = []
    for hour in range(72):
        # gmv (a sum): partial then final value of each hour; revenue (a sum) and arpu (a ratio) too.
        history.append(snapshot("gmv", hour, seasonal(hour) / 2, de, computed_minute=20))
        history.append(snapshot("gmv", hour, seasonal(hour), de))
        history.append(snapshot("revenue", hour, seasonal(hour + 5), {}))
        history.append(snapshot("arpu", hour, seasonal(hour + 9) / 100, {}))
    history.append(snapshot("gmv", 72, 10.0, de))  # the drop
    # hour 72 of revenue and arpu: no snapshot at all (no events). A sum is then 0; a ratio is undefined.
    random.Random(3).shuffle(history)  # partitions deliver in any order between them
    produce(settings, history)

    agent, consumer, close = worker(settings)
    try:
        consume_into(agent, consumer, len(history))
        found = agent.flush(T0 + timedelta(hours=73) + GRACE + timedelta(minutes=1))
    finally:
        close()
    assert sorted((a.metric_type, a.status.value) for a in found) == [("gmv", "open"), ("revenue", "open")]
    opened = {a.metric_type: a for a in read_anomalies(settings, 2)}
    assert set(opened) == {"gmv", "revenue"}
    gmv = opened["gmv"]
    assert gmv.status is AnomalyStatus.open and gmv.dimensions == de and gmv.actual == 10.0
    assert gmv.window_start == T0 + timedelta(hours=72) and gmv.expected > 50.0 and gmv.deviation < 0
    assert opened["revenue"].actual == 0.0
    assert read_checkpoint(settings) is not None

    # A new worker: the bank comes back from the checkpoint, the consumer from the committed offsets.
    recovery = [snapshot(m, h, seasonal(h + shift), dims)
                for h in (73, 74) for m, shift, dims in (("gmv", 0, de), ("revenue", 5, {}))]
    produce(settings, recovery)
    agent, consumer, close = worker(settings)
    try:
        consume_into(agent, consumer, len(recovery))
        assert consumer.poll(1.0) is None  # the history was acknowledged: not replayed
        resolved = agent.flush(T0 + timedelta(hours=75) + GRACE + timedelta(minutes=1))
    finally:
        close()
    assert sorted((a.metric_type, a.status.value) for a in resolved) == [("gmv", "resolved"), ("revenue", "resolved")]
    messages = read_anomalies(settings, 4)
    assert [m.status for m in messages].count(AnomalyStatus.resolved) == 2
    for m in messages[2:]:
        assert m.id == opened[m.metric_type].id and m.resolved_by == "detector"
        assert m.resolved_at == T0 + timedelta(hours=75)
