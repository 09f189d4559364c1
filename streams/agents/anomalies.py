"""The anomaly agent: metric snapshots (topic ``metrics``) → anomaly episodes (topic ``anomalies``).

One :class:`~streams.anomaly.series.DetectorBank` watches every series (metric x period x
dimension values). The ``metrics`` topic is keyed per *window*, so the snapshots of one
series are spread over its partitions and may arrive out of order between them; the agent
therefore buffers what it consumed until the next flush, groups it by series
(:func:`~streams.anomaly.series.series_key`), keeps the latest snapshot of each period and
feeds each series in period order (:func:`ordered_snapshots`). Each flush then asks the
bank to judge periods whose end plus the stream's grace has passed (``close_due``), so a
series whose events stopped altogether is judged too.

Processing guarantee (same scheme as :mod:`streams.agents.events`): at every flush

1. found anomalies are produced to ``anomalies`` and the producer is flushed (durable);
2. the bank's whole state is written, as one message, to a compacted checkpoint topic
   (key ``bank``) and flushed;
3. only then are the consumed snapshots acknowledged.

After a crash the worker restores the bank from the checkpoint and re-reads snapshots
since the last acknowledged offset; the bank ignores periods it has already judged, so
replays neither double-learn nor re-page. A crash between steps 1 and 2 can re-publish an
episode of the last flush (under a new id): an alert is repeated rather than lost.

The bank is one per worker process: run the anomaly agent on a single worker (the
``metrics`` topic's partitions must all reach the same bank).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any

from confluent_kafka import Consumer, TopicPartition
from prometheus_client import Counter

from schemas.anomaly import Anomaly
from schemas.codec import SchemaError
from schemas.streams import MetricSnapshot, metric_snapshot_codec
from streams.anomaly.series import DetectorBank, anomaly_messages, series_key
from streams.catalogue import Aggregation, Catalogue
from tidemark.settings import Settings

log = logging.getLogger(__name__)

ANOMALIES_PUBLISHED = Counter(
    "tidemark_stream_anomalies_total", "Anomaly messages published, by status.", ["status"]
)
SNAPSHOTS_SKIPPED = Counter("tidemark_stream_anomaly_snapshots_skipped_total", "Undecodable metric snapshots.")

CHECKPOINT_KEY = b"bank"
ADDITIVE = frozenset({Aggregation.count, Aggregation.sum})


def anomaly_state_topic(settings: Settings) -> str:
    """The compacted topic holding the detector bank's checkpoint (one message, key ``bank``)."""
    return settings.topic(f"{settings.stream_app_id}-anomaly-bank")


def additive_metrics(catalogue: Catalogue) -> Callable[[str], bool]:
    """Which metrics are counts or sums (zero in a period without a snapshot), from their aggregation."""
    additive = {name for name, definition in catalogue.items() if definition.aggregation in ADDITIVE}
    return additive.__contains__


def ordered_snapshots(snapshots: Iterable[MetricSnapshot]) -> list[MetricSnapshot]:
    """The snapshots to feed the bank: per series, the latest of each period, in period order.

    Snapshots of one period are re-published as it fills up; the most recently computed
    (ties: the later consumed) is the period's value. Series keep the order of their first
    appearance, so the result does not depend on hashing.

    >>> from datetime import timedelta
    >>> t = datetime(2024, 1, 1, tzinfo=UTC)
    >>> def s(hour, value, computed):
    ...     start = t + timedelta(hours=hour)
    ...     return MetricSnapshot(metric_type="m", period="hour", period_start=start,
    ...                           period_end=start + timedelta(hours=1), value=value,
    ...                           computed_at=t + timedelta(minutes=computed))
    >>> [(x.period_start.hour, x.value) for x in ordered_snapshots([s(2, 5, 1), s(1, 3, 2), s(1, 1, 1)])]
    [(1, 3.0), (2, 5.0)]
    """
    series: dict[str, dict[datetime, MetricSnapshot]] = {}
    for snapshot in snapshots:
        periods = series.setdefault(series_key(snapshot.metric_type, snapshot.period, snapshot.dimensions), {})
        held = periods.get(snapshot.period_start)
        if held is None or snapshot.computed_at >= held.computed_at:
            periods[snapshot.period_start] = snapshot
    return [periods[start] for periods in series.values() for start in sorted(periods)]


class AnomalyAgent:
    """Buffers consumed snapshots and, at each flush, runs them through the bank and publishes what it found.

    Everything Kafka-specific is injected (``publish``, ``save_state``, ``outputs_durable``,
    ``ack``), so the processing runs the same inside the Faust worker and in plain code.
    """

    def __init__(
        self,
        bank_factory: Callable[[bytes | None], DetectorBank],
        publish: Callable[[bytes, bytes], None],
        save_state: Callable[[bytes], None],
        load_state: Callable[[], bytes | None],
        outputs_durable: Callable[[], None],
        ack: Callable[[Any], None],
        grace_seconds: float = 0.0,
    ) -> None:
        self._bank_factory = bank_factory
        self._load_state = load_state
        self._bank: DetectorBank | None = None
        self.publish = publish
        self.save_state = save_state
        self.outputs_durable = outputs_durable
        self.ack = ack
        self.grace_seconds = grace_seconds
        self.pending: list[MetricSnapshot] = []
        self.unacked: list[Any] = []
        self._codec = metric_snapshot_codec()

    @property
    def bank(self) -> DetectorBank:
        """The detector bank, restored from the checkpoint on first use (when the worker runs)."""
        if self._bank is None:
            self._bank = self._bank_factory(self._load_state())
        return self._bank

    def on_message(self, value: bytes | None, message: Any = None) -> None:
        """Take one ``metrics`` message (acknowledged at the next flush, once it is reflected in state)."""
        self.unacked.append(message)
        try:
            if not value:
                raise SchemaError("empty message")
            self.pending.append(MetricSnapshot.from_avro(self._codec.decode(value)))
        except (SchemaError, ValueError) as exc:
            SNAPSHOTS_SKIPPED.inc()
            log.warning("Skipping undecodable metric snapshot: %s", exc)

    def flush(self, now: datetime | None = None) -> list[Anomaly]:
        """Judge what was consumed and what is due; publish, checkpoint, then acknowledge. Returns the anomalies."""
        bank = self.bank
        found: list[Anomaly] = []
        for snapshot in ordered_snapshots(self.pending):
            found.extend(bank.process(snapshot))
        self.pending.clear()
        found.extend(bank.close_due(now or datetime.now(UTC), self.grace_seconds))
        if not found and not self.unacked:
            return []  # nothing consumed, nothing published: the checkpoint still holds
        for key, value in anomaly_messages(found):
            self.publish(key, value)
        for anomaly in found:
            ANOMALIES_PUBLISHED.labels(anomaly.status.value).inc()
        self.outputs_durable()  # anomalies first: a crash before the checkpoint repeats, never loses, them
        self.save_state(bank.to_bytes())
        self.outputs_durable()
        for message in self.unacked:
            if message is not None:
                self.ack(message)
        self.unacked.clear()
        return found


def read_checkpoint(settings: Settings, timeout: float = 30.0) -> bytes | None:
    """The latest bank checkpoint on :func:`anomaly_state_topic` (``None`` when there is none yet)."""
    topic = anomaly_state_topic(settings)
    consumer = Consumer({
        "bootstrap.servers": settings.kafka_bootstrap,
        "group.id": settings.group("anomaly-bank-restore"),
        "enable.auto.commit": False,
        "fetch.message.max.bytes": 64 * 1024 * 1024,
        "receive.message.max.bytes": 65 * 1024 * 1024,
    })
    try:
        low, high = consumer.get_watermark_offsets(TopicPartition(topic, 0), timeout=timeout)
        if high <= low:
            return None
        consumer.assign([TopicPartition(topic, 0, low)])
        latest: bytes | None = None
        position = low
        while position < high:
            message = consumer.poll(timeout)
            if message is None:
                raise RuntimeError(f"could not read the anomaly checkpoint from {topic} within {timeout} s")
            if message.error():
                continue
            position = message.offset() + 1
            if message.key() == CHECKPOINT_KEY:
                latest = message.value()
        return latest
    finally:
        consumer.close()


def ensure_state_topic(settings: Settings, max_message_bytes: int) -> None:
    """Create the compacted checkpoint topic (one partition) unless it exists."""
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    name = anomaly_state_topic(settings)
    if name in admin.list_topics(timeout=30).topics:
        return
    brokers = len(admin.list_topics(timeout=30).brokers)
    topic = NewTopic(
        name,
        num_partitions=1,
        replication_factor=1 if brokers < 3 else 3,
        config={"cleanup.policy": "compact", "max.message.bytes": str(max_message_bytes)},
    )
    for future in admin.create_topics([topic], operation_timeout=30).values():
        try:
            future.result()
        except Exception as exc:  # created concurrently: fine
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise


def build_anomaly_agent(
    settings: Settings,
    catalogue: Catalogue,
    publisher: Callable[[str], Callable[[bytes, bytes], None]],
    outputs_durable: Callable[[], None],
    ack: Callable[[Any], None],
) -> AnomalyAgent:
    """The anomaly agent of a worker: bank from the settings, checkpoint on :func:`anomaly_state_topic`."""
    from tidemark.topics import ANOMALIES

    is_additive = additive_metrics(catalogue)
    state_topic = anomaly_state_topic(settings)
    checkpoint = publisher(state_topic)

    def bank_factory(state: bytes | None) -> DetectorBank:
        if state is None:
            return DetectorBank.from_settings(settings, is_additive=is_additive)
        from streams.anomaly.series import BankConfig

        return DetectorBank.from_bytes(state, BankConfig.from_settings(settings), is_additive)

    return AnomalyAgent(
        bank_factory,
        publish=publisher(settings.topic(ANOMALIES.name)),
        save_state=lambda blob: checkpoint(CHECKPOINT_KEY, blob),
        load_state=lambda: read_checkpoint(settings),
        outputs_durable=outputs_durable,
        ack=ack,
        grace_seconds=settings.stream_grace_seconds,
    )


def register_anomaly_agent(
    app: Any,
    settings: Settings,
    catalogue: Catalogue,
    publisher: Callable[[str], Callable[[bytes, bytes], None]],
    outputs_durable: Callable[[], None],
    ack: Callable[[Any], None],
    max_message_bytes: int,
) -> AnomalyAgent:
    """Add the ``anomalies`` Faust agent (topic ``metrics``) and its flush timer to ``app``."""
    import faust

    from tidemark.topics import METRICS

    ensure_state_topic(settings, max_message_bytes)
    agent = build_anomaly_agent(settings, catalogue, publisher, outputs_durable, ack)
    metrics = app.topic(settings.topic(METRICS.name), key_type=bytes, value_type=bytes,
                        key_serializer="raw", value_serializer="raw")

    @app.agent(metrics, name="anomalies")
    async def detect(stream: faust.StreamT) -> None:
        async for event in stream.noack().events():
            agent.on_message(event.message.value, event.message)

    @app.timer(settings.stream_flush_seconds)
    async def judge() -> None:
        agent.flush()

    return agent
