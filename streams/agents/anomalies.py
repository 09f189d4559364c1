"""The anomaly agent: metric snapshots (topic ``metrics``) → anomaly episodes (topic ``anomalies``).

One :class:`~streams.anomaly.series.DetectorBank` watches every series (metric x period x
dimension values). The ``metrics`` topic is keyed per *window*, so the snapshots of one
series are spread over its partitions and may arrive out of order between them; the agent
therefore buffers what it consumed until the next flush, groups it by series
(:func:`~streams.anomaly.series.series_key`), keeps the latest snapshot of each period and
feeds each series in period order (:func:`ordered_snapshots`). Each flush then asks the
bank to judge periods whose end plus the stream's grace has passed (``close_due``), so a
series whose events stopped altogether is judged too.

Clock: periods are closed by *stream time* -- the latest period start seen on ``metrics``
-- advanced by the wall clock while no newer snapshot comes. Live, that is the wall clock
(a series whose events stopped is still judged); on a replay of older data it follows the
data, so periods are not judged empty just because they are old.

Processing guarantee (same scheme as :mod:`streams.agents.events`): at every flush found
anomalies are produced to ``anomalies`` and made durable; at most every
``CHECKPOINT_EVERY_SECONDS`` the bank's whole state (and the stream clock) is written, as
one compressed message, to a compacted checkpoint topic (key ``bank``) and only then are
the consumed snapshots acknowledged. After a crash the worker restores the bank from the
checkpoint and re-reads the snapshots since; the bank ignores periods it has already
judged, and an episode's id is derived from its series, detector and detection time
(:func:`episode_id`), so a re-judged episode is the same row again, not a second alert.

The bank is one per worker process: run the anomaly agent on a single worker (the
``metrics`` topic's partitions must all reach the same bank).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import zlib
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any
from uuid import NAMESPACE_URL, UUID, uuid5

from confluent_kafka import Consumer, Producer, TopicPartition
from prometheus_client import Counter

from schemas.anomaly import Anomaly
from schemas.codec import SchemaError
from schemas.streams import MetricSnapshot, metric_snapshot_codec
from streams.anomaly.series import BankConfig, DetectorBank, anomaly_messages, series_key
from streams.catalogue import Aggregation, Catalogue
from tidemark.settings import Settings

log = logging.getLogger(__name__)

ANOMALIES_PUBLISHED = Counter(
    "tidemark_stream_anomalies_total", "Anomaly messages published, by status.", ["status"]
)
SNAPSHOTS_SKIPPED = Counter("tidemark_stream_anomaly_snapshots_skipped_total", "Undecodable metric snapshots.")

CHECKPOINT_KEY = b"bank"
CHECKPOINT_EVERY_SECONDS = 10.0
CHECKPOINT_FORMAT = b"tmk-anomaly-bank/1"
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


def episode_id(anomaly: Anomaly) -> UUID:
    """A stable id of an episode: series, detector and detection time (the same when a replay re-judges it).

    Every version of an episode (open, escalated, resolved) keeps ``detected_at``, so all carry this id.
    """
    text = f"tidemark:anomaly:{anomaly.series_key}|{anomaly.detector}|{anomaly.detected_at.isoformat()}"
    return uuid5(NAMESPACE_URL, text)


def encode_checkpoint(bank_state: bytes, clock_ms: int | None) -> bytes:
    """The checkpoint message: format tag, stream clock and the bank's state, zlib-compressed (JSON shrinks ~10x)."""
    clock = b"" if clock_ms is None else str(clock_ms).encode()
    return zlib.compress(CHECKPOINT_FORMAT + b"\n" + clock + b"\n" + bank_state, 3)


def decode_checkpoint(blob: bytes) -> tuple[bytes, int | None]:
    """The bank's state and the stream clock from :func:`encode_checkpoint` (ValueError if not one)."""
    try:
        tag, clock, state = zlib.decompress(blob).split(b"\n", 2)
    except (zlib.error, ValueError) as exc:
        raise ValueError(f"not an anomaly checkpoint: {exc}") from exc
    if tag != CHECKPOINT_FORMAT:
        raise ValueError(f"unknown anomaly checkpoint format {tag[:40]!r}")
    return state, int(clock) if clock else None


class AnomalyAgent:
    """Buffers consumed snapshots and, at each flush, runs them through the bank and publishes what it found.

    Everything Kafka-specific is injected (``publish``, ``save_state``/``load_state`` of the
    checkpoint blob, ``outputs_durable``, ``ack``), so the processing runs the same inside
    the Faust worker and in plain code. ``wall_clock`` is injectable for the same reason.
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
        checkpoint_every: float = CHECKPOINT_EVERY_SECONDS,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._bank_factory = bank_factory
        self._load_state = load_state
        self._bank: DetectorBank | None = None
        self.publish = publish
        self.save_state = save_state
        self.outputs_durable = outputs_durable
        self.ack = ack
        self.grace_seconds = grace_seconds
        self.checkpoint_every = checkpoint_every
        self.wall_clock = wall_clock
        # on_message (the event loop) and flush (a worker thread in the stream worker) meet here.
        self._lock = threading.Lock()
        self.pending: list[MetricSnapshot] = []
        self.unacked: list[Any] = []  # consumed since the last flush
        self._processed: list[Any] = []  # reflected in the bank, acknowledged at the next checkpoint
        self.stream_ms: int | None = None  # latest period start seen
        self._stream_seen_at = 0.0  # wall time when it last advanced
        self._dirty = False  # found anomalies or consumed messages since the last checkpoint
        self._checkpointed_at = float("-inf")
        self._codec = metric_snapshot_codec()

    @property
    def bank(self) -> DetectorBank:
        """The detector bank, restored from the checkpoint on first use (when the worker runs)."""
        if self._bank is None:
            blob = self._load_state()
            state: bytes | None = None
            if blob is not None:
                try:
                    state, self.stream_ms = decode_checkpoint(blob)
                    self._stream_seen_at = self.wall_clock()
                except ValueError as exc:
                    log.warning("Ignoring the anomaly checkpoint, starting fresh: %s", exc)
            self._bank = self._bank_factory(state)
        return self._bank

    def on_message(self, value: bytes | None, message: Any = None) -> None:
        """Take one ``metrics`` message (acknowledged once a checkpoint reflects it)."""
        snapshot: MetricSnapshot | None = None
        try:
            if not value:
                raise SchemaError("empty message")
            snapshot = MetricSnapshot.from_avro(self._codec.decode(value))
        except (SchemaError, ValueError) as exc:
            SNAPSHOTS_SKIPPED.inc()
            log.warning("Skipping undecodable metric snapshot: %s", exc)
        with self._lock:
            self.unacked.append(message)
            if snapshot is not None:
                self.pending.append(snapshot)

    def now(self) -> datetime | None:
        """Stream time: the latest period start seen, advanced by the wall time since (None before any)."""
        if self.stream_ms is None:
            return None
        elapsed = max(0.0, self.wall_clock() - self._stream_seen_at)
        return datetime.fromtimestamp(self.stream_ms / 1000 + elapsed, tz=UTC)

    def flush(self, now: datetime | None = None, force_checkpoint: bool = False) -> list[Anomaly]:
        """Judge what was consumed and what is due, publish it; checkpoint and acknowledge when due.

        ``now`` overrides the stream clock (tests, backfills). Returns the anomalies published.
        """
        bank = self.bank
        with self._lock:  # what was consumed so far, and exactly the messages it came from
            pending, self.pending = self.pending, []
            self._processed.extend(self.unacked)
            self.unacked = []
        found: list[Anomaly] = []
        for snapshot in ordered_snapshots(pending):
            start_ms = int(snapshot.period_start.timestamp() * 1000)
            if self.stream_ms is None or start_ms > self.stream_ms:
                self.stream_ms, self._stream_seen_at = start_ms, self.wall_clock()
            found.extend(bank.process(snapshot))
        clock = now or self.now()
        if clock is not None:
            found.extend(bank.close_due(clock, self.grace_seconds))
        found = [a.model_copy(update={"id": episode_id(a)}) for a in found]
        if found:
            for key, value in anomaly_messages(found):
                self.publish(key, value)
            for anomaly in found:
                ANOMALIES_PUBLISHED.labels(anomaly.status.value).inc()
            self.outputs_durable()
        self._dirty = self._dirty or bool(found) or bool(self._processed)
        due = self.wall_clock() - self._checkpointed_at >= self.checkpoint_every
        if self._dirty and (due or force_checkpoint):
            self.checkpoint()
        return found

    def checkpoint(self) -> None:
        """Write the bank's state (outputs already durable), then acknowledge what it reflects."""
        self.save_state(encode_checkpoint(self.bank.to_bytes(), self.stream_ms))
        self._checkpointed_at = self.wall_clock()
        self._dirty = False
        processed, self._processed = self._processed, []
        for message in processed:
            if message is not None:
                self.ack(message)


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
    max_checkpoint_bytes: int = 64 * 1024 * 1024,
) -> AnomalyAgent:
    """The anomaly agent of a worker: bank from the settings, checkpoint on :func:`anomaly_state_topic`."""
    from tidemark.topics import ANOMALIES

    is_additive = additive_metrics(catalogue)
    # The checkpoint can weigh megabytes: its own producer takes messages as large as the topic does.
    state_producer = Producer({
        "bootstrap.servers": settings.kafka_bootstrap,
        "enable.idempotence": True,
        "message.max.bytes": max_checkpoint_bytes,
        "compression.type": "none",  # already compressed
    })
    state_topic = anomaly_state_topic(settings)

    def save_state(blob: bytes) -> None:
        state_producer.produce(state_topic, key=CHECKPOINT_KEY, value=blob)
        if state_producer.flush(60) != 0:
            raise RuntimeError("the anomaly checkpoint was not delivered within 60 s; not acknowledging")

    def bank_factory(state: bytes | None) -> DetectorBank:
        if state is None:
            return DetectorBank.from_settings(settings, is_additive=is_additive)
        return DetectorBank.from_bytes(state, BankConfig.from_settings(settings), is_additive)

    return AnomalyAgent(
        bank_factory,
        publish=publisher(settings.topic(ANOMALIES.name)),
        save_state=save_state,
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
    loop_ack: list[asyncio.AbstractEventLoop] = []

    def ack_on_loop(message: Any) -> None:
        # Faust's consumer is not thread-safe: acknowledgements go back to the event loop.
        loop_ack[0].call_soon_threadsafe(ack, message)

    agent = build_anomaly_agent(settings, catalogue, publisher, outputs_durable, ack_on_loop, max_message_bytes)
    metrics = app.topic(settings.topic(METRICS.name), key_type=bytes, value_type=bytes,
                        key_serializer="raw", value_serializer="raw")

    @app.agent(metrics, name="anomalies")
    async def detect(stream: faust.StreamT) -> None:
        async for event in stream.noack().events():
            agent.on_message(event.message.value, event.message)

    # Judging touches every series (close_due) and the checkpoint serialises the whole bank:
    # that runs in a thread of its own, not on the event loop the other agents share, and
    # not more often than once a second.
    @app.timer(max(settings.stream_flush_seconds, 1.0))
    async def judge() -> None:
        loop = asyncio.get_running_loop()
        if not loop_ack:
            loop_ack.append(loop)
        await loop.run_in_executor(None, agent.flush)

    return agent
