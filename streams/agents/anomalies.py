"""The anomaly agent: metric snapshots (topic ``metrics``) → anomaly episodes (topic ``anomalies``).

One :class:`~streams.anomaly.series.DetectorBank` watches every series (metric x period x
dimension values). A series' snapshots come on one partition of ``metrics``, but the
provisional ones of a period may come after a later period's (windows fill up
concurrently); the agent buffers what it consumed until the next flush, groups it by series
(:func:`~streams.anomaly.series.series_key`), keeps the latest snapshot of each period and
feeds each series in period order (:func:`ordered_snapshots`). Each flush then asks the
bank to judge what has become due without a snapshot (``close_due``), so a series whose
events stopped altogether is judged too.

When are periods complete? The stream worker's metrics stage publishes each window once
more marked ``final`` when every ``events.raw`` partition has closed it, and the bank
(``wait_for_final``) judges a period on that snapshot, never earlier: while a backlog is
caught up, one source partition can be hours of event time ahead of another, and a
period judged on the first snapshot of a later one would be judged half counted. Periods
with no snapshot at all (a count that fell to zero) are judged by *lane clocks*: every
window of a series is merged in one lane of ``metrics.partials`` and a lane's snapshots
come in order on one ``metrics`` partition (:mod:`streams.agents.metrics`), so a final
snapshot ending at ``E`` in a lane says that every window of that lane ending by ``E``
that had events has been published final before it. Up to ``E``, a lane's series are
complete (:meth:`lane_limit`); ``close_due`` judges the silent periods as zeros. Finals
need every source partition to move: after ``FINAL_STALL_SECONDS`` of wall time without
progress in a lane (a partition without traffic, or all traffic stopped), its clock moves on
with the wall clock and at least to stream time, so judgement is late, never lost. Banks that
do not wait for finals (series fed in order) use that *stream time* alone: the latest period
start seen, advanced by the wall clock.

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

import json
import logging
import threading
import time
import zlib
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any
from uuid import NAMESPACE_URL, UUID, uuid5

from confluent_kafka import Consumer, TopicPartition
from prometheus_client import Counter

from schemas.anomaly import Anomaly
from schemas.codec import SchemaError
from schemas.streams import MetricSnapshot, metric_snapshot_codec, series_key_of
from streams.agents import checkpoints
from streams.agents.threaded import ConsumerThread, DurableProducer, run_as_service
from streams.anomaly.series import BankConfig, DetectorBank, anomaly_messages, series_key
from streams.catalogue import Aggregation, Catalogue
from streams.windows import series_lane
from tidemark.settings import Settings

log = logging.getLogger(__name__)

ANOMALIES_PUBLISHED = Counter(
    "tidemark_stream_anomalies_total", "Anomaly messages published, by status.", ["status"]
)
SNAPSHOTS_SKIPPED = Counter("tidemark_stream_anomaly_snapshots_skipped_total", "Undecodable metric snapshots.")

CHECKPOINT_KEY = b"bank"
CHECKPOINT_EVERY_SECONDS = 10.0
CHECKPOINT_FORMAT = b"tmk-anomaly-bank/2"
CHECKPOINT_FORMATS = (b"tmk-anomaly-bank/1", CHECKPOINT_FORMAT)
FINAL_STALL_SECONDS = 600.0  # lanes without progress this long: judge on stream time (see lane_limit)
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
    (ties: the later consumed) is the period's value, and the period is final if any of
    its snapshots was (a correction after the final one does not undo completeness).
    Series keep the order of their first appearance, so the result does not depend on hashing.

    >>> from datetime import timedelta
    >>> t = datetime(2024, 1, 1, tzinfo=UTC)
    >>> def s(hour, value, computed, final=False):
    ...     start = t + timedelta(hours=hour)
    ...     return MetricSnapshot(metric_type="m", period="hour", period_start=start,
    ...                           period_end=start + timedelta(hours=1), value=value,
    ...                           computed_at=t + timedelta(minutes=computed), final=final)
    >>> [(x.period_start.hour, x.value, x.final)
    ...  for x in ordered_snapshots([s(2, 5, 1), s(1, 3, 2), s(1, 1, 1, final=True)])]
    [(1, 3.0, True), (2, 5.0, False)]
    """
    series: dict[str, dict[datetime, MetricSnapshot]] = {}
    finals: set[tuple[str, datetime]] = set()
    for snapshot in snapshots:
        key = series_key(snapshot.metric_type, snapshot.period, snapshot.dimensions)
        periods = series.setdefault(key, {})
        held = periods.get(snapshot.period_start)
        if held is None or snapshot.computed_at >= held.computed_at:
            periods[snapshot.period_start] = snapshot
        if snapshot.final:
            finals.add((key, snapshot.period_start))
    ordered = []
    for key, periods in series.items():
        for start in sorted(periods):
            snapshot = periods[start]
            if not snapshot.final and (key, start) in finals:
                snapshot = snapshot.model_copy(update={"final": True})
            ordered.append(snapshot)
    return ordered


def episode_id(anomaly: Anomaly) -> UUID:
    """A stable id of an episode: series, detector and detection time (the same when a replay re-judges it).

    Every version of an episode (open, escalated, resolved) keeps ``detected_at``, so all carry this id.
    """
    text = f"tidemark:anomaly:{anomaly.series_key}|{anomaly.detector}|{anomaly.detected_at.isoformat()}"
    return uuid5(NAMESPACE_URL, text)


def encode_checkpoint(bank_state: bytes, clock_ms: int | None, lanes: dict[int, int] | None = None) -> bytes:
    """The checkpoint message: format tag, clocks (stream time, lane clocks) and the bank's state, zlib-compressed."""
    clocks = json.dumps({"stream": clock_ms, "lanes": {str(k): v for k, v in (lanes or {}).items()}}).encode()
    return zlib.compress(CHECKPOINT_FORMAT + b"\n" + clocks + b"\n" + bank_state, 3)


def decode_checkpoint(blob: bytes) -> tuple[bytes, int | None, dict[int, int]]:
    """The bank's state, the stream clock and the lane clocks from :func:`encode_checkpoint` (ValueError if not one)."""
    try:
        tag, clock, state = zlib.decompress(blob).split(b"\n", 2)
    except (zlib.error, ValueError) as exc:
        raise ValueError(f"not an anomaly checkpoint: {exc}") from exc
    if tag not in CHECKPOINT_FORMATS:
        raise ValueError(f"unknown anomaly checkpoint format {tag[:40]!r}")
    if tag != CHECKPOINT_FORMAT:  # version 1: the stream clock alone
        return state, int(clock) if clock else None, {}
    clocks = json.loads(clock)
    return state, clocks["stream"], {int(k): int(v) for k, v in clocks["lanes"].items()}


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
        lanes: int = 1,
        watches: Callable[[str, dict[str, str]], bool] | None = None,
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
        self.lanes = lanes  # lanes of metrics.partials (see the module's docstring)
        self.lane_ms: dict[int, int] = {}  # per lane: the latest end of a final snapshot
        self._lane_seen_at: dict[int, float] = {}  # wall time when it last advanced
        self._lane_of: dict[str, int] = {}
        self._consuming_since: float | None = None  # wall time of the first snapshot consumed
        self._lane_ends: dict[int, int] = {}  # lane clocks consumed since the last flush
        self.watches = watches
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
                    state, self.stream_ms, self.lane_ms = decode_checkpoint(blob)
                    self._stream_seen_at = self.wall_clock()
                    self._lane_seen_at = dict.fromkeys(self.lane_ms, self._stream_seen_at)
                except ValueError as exc:
                    log.warning("Ignoring the anomaly checkpoint, starting fresh: %s", exc)
            self._bank = self._bank_factory(state)
        return self._bank

    def on_message(self, value: bytes | None, message: Any = None) -> None:
        """Take one ``metrics`` message (acknowledged once a checkpoint reflects it)."""
        snapshot: MetricSnapshot | None = None
        final_end: tuple[int, int] | None = None  # (lane, period end ms) of a final snapshot
        try:
            if not value:
                raise SchemaError("empty message")
            record = self._codec.decode(value)
            if record.get("final"):
                key = series_key_of(record["metricType"], record["period"], record.get("dimensionsKey", ""))
                end = record["periodEnd"]  # a datetime (the codec reads logical types)
                final_end = (self.lane_of(key), int(end.timestamp() * 1000) if isinstance(end, datetime) else int(end))
            # Most snapshots are of series nobody watches (minutes, breakdowns): only their lane's
            # progress counts, so the model is built for the watched ones alone.
            if self.watches is None or self.watches(record["period"], record.get("dimensions") or {}):
                snapshot = MetricSnapshot.from_avro(record)
        except (SchemaError, ValueError, KeyError, TypeError) as exc:
            SNAPSHOTS_SKIPPED.inc()
            log.warning("Skipping undecodable metric snapshot: %s", exc)
        with self._lock:
            self.unacked.append(message)
            if snapshot is not None:
                self.pending.append(snapshot)
            if final_end is not None and final_end[1] > self._lane_ends.get(final_end[0], -1):
                self._lane_ends[final_end[0]] = final_end[1]
            if self._consuming_since is None:
                self._consuming_since = self.wall_clock()

    def now(self) -> datetime | None:
        """Stream time: the latest period start seen, advanced by the wall time since (None before any)."""
        if self.stream_ms is None:
            return None
        elapsed = max(0.0, self.wall_clock() - self._stream_seen_at)
        return datetime.fromtimestamp(self.stream_ms / 1000 + elapsed, tz=UTC)

    def lane_of(self, key: str) -> int:
        """The lane of a series (by its series key)."""
        lane = self._lane_of.get(key)
        if lane is None:
            lane = self._lane_of[key] = series_lane(key, self.lanes)
        return lane

    def lane_limit(self, key: str) -> int | None:
        """Up to when (ms) a series' periods are complete: the end of its lane's latest final snapshot.

        Finals need every ``events.raw`` partition to move; one without traffic holds them
        all back. When a lane has not advanced for ``FINAL_STALL_SECONDS`` of wall time
        since snapshots began to come, its clock moves on with the wall clock, and at least
        to stream time minus the grace (the judging of banks that do not wait for finals).
        """
        lane = self.lane_of(key)
        end = self.lane_ms.get(lane)
        wall = self.wall_clock()
        stalled = wall - max(self._lane_seen_at.get(lane, float("-inf")), self._consuming_since or wall)
        if stalled < FINAL_STALL_SECONDS:
            return end
        limit = None if end is None else end + int(stalled * 1000)
        if (clock := self.now()) is not None:
            fallback = int(clock.timestamp() * 1000) - int(self.grace_seconds * 1000)
            limit = fallback if limit is None else max(limit, fallback)
        return limit

    def flush(self, now: datetime | None = None, force_checkpoint: bool = False) -> list[Anomaly]:
        """Judge what was consumed and what is due, publish it; checkpoint and acknowledge when due.

        ``now`` overrides the stream clock (tests, backfills). Returns the anomalies published.
        """
        bank = self.bank
        with self._lock:  # what was consumed so far, and exactly the messages it came from
            pending, self.pending = self.pending, []
            lane_ends, self._lane_ends = self._lane_ends, {}
            self._processed.extend(self.unacked)
            self.unacked = []
        found: list[Anomaly] = []
        for snapshot in ordered_snapshots(pending):
            start_ms = int(snapshot.period_start.timestamp() * 1000)
            if self.stream_ms is None or start_ms > self.stream_ms:
                self.stream_ms, self._stream_seen_at = start_ms, self.wall_clock()
            found.extend(bank.process(snapshot))
        for lane, end_ms in lane_ends.items():  # after the snapshots those finals came with
            if end_ms > self.lane_ms.get(lane, -1):
                self.lane_ms[lane], self._lane_seen_at[lane] = end_ms, self.wall_clock()
        if now is not None:
            found.extend(bank.close_due(now, self.grace_seconds))
        elif bank.config.wait_for_final:
            found.extend(bank.close_due(None, limit_for=self.lane_limit))
        elif (clock := self.now()) is not None:
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
        self.save_state(encode_checkpoint(self.bank.to_bytes(), self.stream_ms, self.lane_ms))
        self._checkpointed_at = self.wall_clock()
        self._dirty = False
        processed, self._processed = self._processed, []
        for message in processed:
            if message is not None:
                self.ack(message)


def read_checkpoint(settings: Settings, timeout: float = 30.0) -> bytes | None:
    """The latest bank checkpoint on :func:`anomaly_state_topic` (``None`` when there is none yet)."""
    return checkpoints.read_checkpoint(settings, anomaly_state_topic(settings), 0, CHECKPOINT_KEY, timeout)


def ensure_state_topic(settings: Settings) -> None:
    """Create the compacted checkpoint topic (one partition) unless it exists."""
    checkpoints.ensure_checkpoint_topic(settings, anomaly_state_topic(settings), 1)


def build_anomaly_agent(
    settings: Settings,
    catalogue: Catalogue,
    publisher: Callable[[str], Callable[[bytes, bytes], None]],
    outputs_durable: Callable[[], None],
    ack: Callable[[Any], None],
    lanes: int = 1,
) -> AnomalyAgent:
    """The anomaly agent of a worker: bank from the settings, checkpoint on :func:`anomaly_state_topic`."""
    from tidemark.topics import ANOMALIES

    is_additive = additive_metrics(catalogue)
    # The checkpoint can weigh megabytes: it goes out through a producer of its own, confirmed at once.
    state_producer = DurableProducer(settings)
    publish_state = state_producer.publisher(anomaly_state_topic(settings))

    def save_state(blob: bytes) -> None:
        publish_state(CHECKPOINT_KEY, blob)
        state_producer.durable()

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
        lanes=lanes,
        watches=BankConfig.from_settings(settings).watches,
    )


class AnomalyConsumer(ConsumerThread):
    """Reads ``metrics`` with librdkafka in a thread of its own and drives an :class:`AnomalyAgent`.

    Why not a Faust agent: the agent needs a small share of what ``metrics`` carries (hourly
    and daily totals, and every lane's progress), but a Faust agent pays about 150 µs per
    message on the event loop the metrics merging also runs on; while a backlog is caught
    up that is minutes of delay before an hour is judged. Here a message costs its Avro
    decoding. Offsets are committed only up to what a durable bank checkpoint reflects
    (the agent's ``ack``), so a restart re-reads exactly what the bank has not seen.
    """

    thread_name = "anomaly-consumer"
    after_failure = "the bank restarts from its checkpoint"

    def __init__(
        self,
        settings: Settings,
        catalogue: Catalogue,
        publisher: Callable[[str], Callable[[bytes, bytes], None]],
        outputs_durable: Callable[[], None],
        lanes: int = 1,
        batch_size: int = 5_000,
    ) -> None:
        from tidemark.topics import METRICS

        group = f"{settings.topic_prefix}{settings.stream_app_id}-anomalies"
        super().__init__(settings, METRICS.name, group, batch_size)
        self.agent = build_anomaly_agent(
            settings, catalogue, publisher, outputs_durable, self._acknowledged, lanes=lanes
        )

    def _acknowledged(self, message: Any) -> None:
        partition, offset = message
        if offset + 1 > self._to_commit.get(partition, -1):
            self._to_commit[partition] = offset + 1

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        if not self._closing:
            self.agent.flush(force_checkpoint=True)
            self._commit(consumer)

    def _loop(self, consumer: Consumer) -> None:
        # Judging touches every series and the checkpoint serialises the whole bank: at most once a second.
        flush_every = max(self.settings.stream_flush_seconds, 1.0)
        consumer.subscribe([self.topic], on_assign=self._on_assign, on_revoke=self._on_revoke)
        flushed_at = time.monotonic()
        on_message = self.agent.on_message
        while not self._stopping.is_set():
            for message in self._consume(consumer, 0.2):
                on_message(message.value(), (message.partition(), message.offset()))
            now = time.monotonic()
            if now - flushed_at >= flush_every:
                self.agent.flush()
                self._commit(consumer)
                flushed_at = now
        self.agent.flush(force_checkpoint=True)
        self._commit(consumer)
        log.info("Anomaly consumer stopped: bank checkpointed and offsets committed")


def register_anomaly_agent(
    app: Any,
    settings: Settings,
    catalogue: Catalogue,
    publisher: Callable[[str], Callable[[bytes, bytes], None]],
    outputs_durable: Callable[[], None],
    lanes: int = 1,
) -> AnomalyAgent:
    """Run an :class:`AnomalyConsumer` as a service of the Faust ``app`` (a failure there stops the worker)."""
    ensure_state_topic(settings)
    anomalies = AnomalyConsumer(settings, catalogue, publisher, outputs_durable, lanes=lanes)
    run_as_service(app, anomalies, "anomaly consumer")
    return anomalies.agent
