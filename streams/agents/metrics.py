"""Stage two of the stream worker: ``metrics.partials`` → one ``MetricSnapshot`` per window on topic ``metrics``.

What comes in: at every flush, each source partition of ``events.raw`` sends each lane
(partition of ``metrics.partials``) one batch: its partials of the lane's windows changed
since its previous flush, then its new watermark (``metric_partial_batch.avsc``). Partials
of one series are always routed to one lane (:func:`~streams.windows.series_lane`), so
every window meets in one :class:`~streams.merging.SnapshotMerger`. When a lane's slowest
source partition has passed a window's end plus the grace period, the window is published
once more marked ``final``, at once. Provisional values of the windows that changed are
published together, at most as often as stage one sends them
(:func:`~streams.agents.events.publish_every`): a window gets a partial from every source
partition per flush of theirs, and publishing on each would send it many times a second
while a backlog is caught up. Everything a lane publishes goes to one partition of
``metrics`` (:func:`snapshot_partition`), in order, so a consumer that sees a lane's final
snapshot up to some end has seen every earlier one of that lane.

Processing guarantee (the scheme of the events stage, :mod:`streams.agents.events`): at
most every ``CHECKPOINT_EVERY_SECONDS`` every output is made durable, then the lane's
whole state (windows changed and not yet published included) and the offset of the last
batch it reflects are written, as ONE message, to the lane's partition of :func:`merge_checkpoint_topic`;
only then is the offset after it committed. A restarted lane restores its checkpoint and
skips batches it already applied; a batch applied twice would do no harm anyway (a partial
replaces its source's previous partial of the window, a snapshot replaces the previous
snapshot of its key).

Why a librdkafka consumer thread and not a Faust agent with a Faust table: the table wrote
every partial's state (sets of thousands of ids) to its changelog, one aiokafka message
per partial, and that, with Faust's per-message cost, took more of a worker's time than
reading and processing the events did.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import lz4.frame
import orjson
from confluent_kafka import Consumer, TopicPartition
from prometheus_client import Counter

from schemas.codec import HEADER_LENGTH, SchemaError
from schemas.streams import metric_partial_batch_codec, metric_partial_codec, metric_snapshot_codec
from streams.agents.checkpoints import read_checkpoint
from streams.agents.events import publish_every
from streams.agents.threaded import ConsumerThread, DurableProducer
from streams.aggregators import MetricAggregator, decode_state
from streams.merging import SnapshotMerger
from streams.periods import Period
from streams.windows import DEFAULT_GRACE, MetricValue, WindowKey
from tidemark.settings import Settings

log = logging.getLogger(__name__)

SNAPSHOTS_PUBLISHED = Counter("tidemark_stream_snapshots_total", "Metric snapshots published.")
FINAL_SNAPSHOTS = Counter(
    "tidemark_stream_final_snapshots_total", "Metric snapshots published as final (window complete)."
)
LATE_PARTIALS = Counter("tidemark_stream_late_partials_total", "Partials for windows already complete or evicted.")

PARTIALS_TOPIC = "metrics.partials"
PARTIALS_PARTITIONS = 6
CHECKPOINT_EVERY_SECONDS = 10.0
# Once nothing has come for this long (batches come every flush while stage one runs), the lanes
# are checkpointed without waiting for the interval: what they reflect is committed promptly.
CHECKPOINT_IDLE_SECONDS = 2.0
CHECKPOINT_FORMAT = 1
EVICT_EVERY_SECONDS = 60.0  # how often session-metric windows long closed are forgotten


PERIODS = {period.value: period for period in Period}  # by name, without an Enum call per partial


def window_key_text(metric: str, dimension: str, value: str, period: str, start: int) -> str:
    """The text key of a window's snapshots on ``metrics``."""
    return f"{metric}|{period}|{start}|{dimension}|{value}"


def snapshot_partition(lane: int, metrics_partitions: int) -> int:
    """The partition of ``metrics`` a lane publishes to: always the same one, so its snapshots stay in order."""
    return lane % metrics_partitions


def merge_checkpoint_topic(settings: Settings) -> str:
    """The compacted topic of the lanes' checkpoints (lane L's checkpoint in its partition L)."""
    return settings.topic(f"{settings.stream_app_id}-merge-checkpoints")


def merge_group(settings: Settings) -> str:
    """The consumer group of metric merging (reads ``metrics.partials``)."""
    return f"{settings.topic_prefix}{settings.stream_app_id}-merge"


def decode_partial_batch(data: bytes) -> dict[str, Any]:
    """A ``metric_partial_batch.avsc`` record from a ``metrics.partials`` message.

    A message of the earlier format -- one partial, or one watermark announcement, per
    message (``metric_partial.avsc``) -- comes back as a batch of it, so a topic written
    by both during an upgrade is read in order.
    """
    batch_codec = metric_partial_batch_codec()
    fingerprint = bytes(data[2:HEADER_LENGTH])
    if fingerprint in batch_codec.known_fingerprints:
        return batch_codec.decode(data)
    single = metric_partial_codec()
    if fingerprint not in single.known_fingerprints:
        raise SchemaError(f"unknown writer schema fingerprint {fingerprint.hex()}")
    record = single.decode(data)
    partials = [] if not record["metric"] else [{**record, "state": record["state"].encode()}]
    watermark = record["watermark"]
    return {"partition": record["partition"], "watermark": watermark, "announced": watermark, "partials": partials}


class MetricsAgent:
    """Merges partial batches per lane and publishes snapshots (no Kafka: see :class:`MetricsConsumer`).

    ``publish_snapshot(key, value, lane)`` sends one encoded snapshot (the lane picks its
    partition). A window's final snapshot goes out as soon as it is complete; provisional
    values go out at :meth:`publish_changed`.
    """

    def __init__(
        self,
        aggregators: dict[str, MetricAggregator],
        publish_snapshot: Callable[[bytes, bytes, int], None],
        source_partitions: int | None = None,
        grace: timedelta = DEFAULT_GRACE,
        publish_every: dict[Period, float] | None = None,
    ) -> None:
        self.aggregators = aggregators
        self.source_partitions = source_partitions
        self.grace = grace
        # Seconds between provisional publications of a changed window, per period (none: every call).
        self.publish_every = publish_every or {}
        self._published_at: dict[Period, float] = {}
        self.mergers: dict[int, SnapshotMerger] = {}
        self.publish_snapshot = publish_snapshot
        self.applied: dict[int, int] = {}  # lane -> offset of the last batch applied
        self.changed: dict[int, set[WindowKey]] = {}  # lane -> windows changed since they were last published
        self._codec = metric_snapshot_codec()

    def merger(self, lane: int) -> SnapshotMerger:
        """The merger of one lane (partition of ``metrics.partials``)."""
        merger = self.mergers.get(lane)
        if merger is None:
            merger = self.mergers[lane] = SnapshotMerger(
                self.aggregators, source_partitions=self.source_partitions, grace=self.grace
            )
        return merger

    def on_batch(self, lane: int, batch: dict[str, Any], offset: int | None = None) -> bool:
        """Apply one batch of a source partition to ``lane``; publish the windows it completed.

        False when ``offset`` was applied already (a redelivery after a restart).
        """
        if offset is not None:
            if offset <= self.applied.get(lane, -1):
                return False
            self.applied[lane] = offset
        merger = self.merger(lane)
        source = batch["partition"]
        merger.note_watermark(source, batch["watermark"])
        changed = self.changed.setdefault(lane, set())
        aggregators, put, late = self.aggregators, merger.put, 0
        # Metrics sharing a window in stage one (dau and active_users) send the same text: decoded
        # once, the state shared (the merger only reads its parts).
        decoded: dict[bytes, Any] = {}
        for entry in batch["partials"]:
            metric = entry["metric"]
            if metric not in aggregators:  # removed from the catalogue since
                continue
            wkey = (metric, entry["dimension"], entry["dimensionValue"], PERIODS[entry["period"]],
                    entry["periodStart"])
            text = entry["state"]
            state = decoded.get(text)
            if state is None:
                state = decoded[text] = decode_state(orjson.loads(text))
            if put(wkey, entry["periodEnd"], source, state, text):
                changed.add(wkey)
            else:
                late += 1
        if late:
            LATE_PARTIALS.inc(late)
        merger.note_watermark(source, batch["announced"])
        self._publish_finals(lane)
        return True

    def skip(self, lane: int, offset: int) -> None:
        """A message of ``lane`` that could not be read: nothing to apply, but it counts as consumed."""
        self.applied[lane] = max(offset, self.applied.get(lane, -1))

    def _publish_finals(self, lane: int) -> None:
        finals = self.mergers[lane].finalize()
        if finals:
            changed = self.changed.get(lane, set())
            computed_at = int(time.time() * 1000)
            for final in finals:
                changed.discard(final.window_key)  # the final value supersedes it
                self._publish(final, computed_at, lane)

    def publish_changed(self, now: float | None = None) -> int:
        """Publish the value of every window changed since it was last published; return how many.

        With ``now`` (monotonic seconds) and ``publish_every`` set, a window of a period is
        published at most every ``publish_every[period]`` seconds (a day window that every
        flush of every source changes need not go out every second; its final value goes
        out at once anyway). Without ``now`` every changed window is published.
        """
        if now is None or not self.publish_every:
            due = None
        else:
            due = {period for period, every in self.publish_every.items()
                   if now - self._published_at.get(period, -1e18) >= every}
            for period in due:
                self._published_at[period] = now
        computed_at = int(time.time() * 1000)
        published = 0
        for lane, changed in self.changed.items():
            if not changed:
                continue
            merger = self.mergers[lane]
            out = changed if due is None else {w for w in changed if w[3] in due or w[3] not in self.publish_every}
            for wkey in out:
                value = merger.value(wkey)
                if value is not None:
                    self._publish(value, computed_at, lane)
                    published += 1
            if out is changed:
                changed.clear()
            else:
                changed -= out
        return published

    def _publish(self, value: MetricValue, computed_at: int, lane: int) -> None:
        metric, dimension, dimension_value, period, start = value.window_key
        key = window_key_text(metric, dimension, dimension_value, period.value, start).encode()
        self.publish_snapshot(key, self._codec.encode(value.to_avro(computed_at)), lane)
        SNAPSHOTS_PUBLISHED.inc()
        if value.final:
            FINAL_SNAPSHOTS.inc()

    def checkpoint(self, lane: int) -> bytes:
        """The lane's whole state and the offset it reflects, as one lz4-compressed JSON document.

        Windows changed but not yet published are in it too, and are published after a restore.
        """
        changed = [[m, d, v, p.value, t] for m, d, v, p, t in self.changed.get(lane, ())]
        document = {
            "format": CHECKPOINT_FORMAT,
            "lane": lane,
            "applied_offset": self.applied.get(lane, -1),
            "changed": changed,
            **self.merger(lane).to_document(),
        }
        return lz4.frame.compress(orjson.dumps(document))

    def restore(self, lane: int, blob: bytes) -> None:
        """Resume ``lane`` from a :meth:`checkpoint`."""
        document = orjson.loads(lz4.frame.decompress(blob))
        if document.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"unknown metric-merging checkpoint format {document.get('format')!r}")
        merger = self.merger(lane)
        merger.restore_document(document)
        self.applied[lane] = int(document["applied_offset"])
        changed = {(m, d, v, Period(p), int(t)) for m, d, v, p, t in document["changed"]}
        self.changed[lane] = {wkey for wkey in changed if wkey in merger.parts}

    def evict(self) -> int:
        """Forget session-metric windows long closed (memory)."""
        dropped = sum(merger.evict() for merger in self.mergers.values())
        if dropped:
            log.info("Evicted %d merged windows", dropped)
        return dropped

    def forget(self, lanes: set[int]) -> None:
        """Lanes moved to another worker: drop their state (the new owner restores their checkpoints)."""
        for lane in lanes:
            self.mergers.pop(lane, None)
            self.applied.pop(lane, None)
            self.changed.pop(lane, None)


class MetricsConsumer(ConsumerThread):
    """Reads ``metrics.partials`` with librdkafka in a thread of its own and drives a :class:`MetricsAgent`.

    Snapshots go out through its own librdkafka producer, every delivery confirmed before
    a lane's checkpoint counts as durable; offsets are committed only up to what a durable
    checkpoint reflects. A failure stops the thread and is kept in :attr:`failure` (the
    worker then stops: the next owner restores the checkpoints and replays since).
    """

    thread_name = "metrics-merging"
    after_failure = "the next owner replays from the checkpoints"

    def __init__(
        self,
        settings: Settings,
        aggregators: dict[str, MetricAggregator],
        source_partitions: int,
        metrics_partitions: int,
        batch_size: int = 500,
    ) -> None:
        from tidemark.topics import METRICS

        super().__init__(settings, PARTIALS_TOPIC, merge_group(settings), batch_size)
        self._checkpoints = merge_checkpoint_topic(settings)
        self.producer = DurableProducer(settings)
        self.outputs_durable = self.producer.durable
        publish = self.producer.publisher(settings.topic(METRICS.name))

        def publish_snapshot(key: bytes, value: bytes, lane: int) -> None:
            publish(key, value, snapshot_partition(lane, metrics_partitions))

        self.agent = MetricsAgent(
            aggregators, publish_snapshot, source_partitions=source_partitions,
            grace=timedelta(seconds=settings.stream_grace_seconds), publish_every=publish_every(settings),
        )
        self._loaded: set[int] = set()  # lanes restored from their checkpoints
        self._dirty: set[int] = set()  # lanes with batches applied since their checkpoint

    def _load(self, lane: int) -> None:
        blob = read_checkpoint(self.settings, self._checkpoints, lane, str(lane).encode())
        if blob:
            self.agent.restore(lane, blob)
            merger = self.agent.merger(lane)
            log.info("Lane %d restored from its checkpoint at offset %d (%d windows)",
                     lane, self.agent.applied[lane], len(merger.parts))
        self._loaded.add(lane)

    def checkpoint(self, lanes: set[int]) -> None:
        """Make what was published durable, write the lanes' checkpoints, then mark their offsets for commit."""
        lanes = lanes & self._dirty
        if not lanes:
            return
        self.outputs_durable()
        save = self.producer.publisher(self._checkpoints)
        for lane in lanes:
            save(str(lane).encode(), self.agent.checkpoint(lane), lane)
        self.outputs_durable()
        for lane in lanes:
            self._to_commit[lane] = self.agent.applied[lane] + 1
        self._dirty -= lanes

    def _forget(self, lanes: set[int]) -> None:
        self.agent.forget(lanes)
        self._loaded -= lanes
        self._dirty -= lanes
        for lane in lanes:
            self._to_commit.pop(lane, None)

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        super()._on_assign(consumer, partitions)
        # Restore at once rather than at the lane's next batch: windows its checkpoint holds changed
        # but unpublished go out at the next publication even if no batch comes for a while.
        for tp in partitions:
            if tp.topic == self.topic and tp.partition not in self._loaded:
                self._load(tp.partition)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        revoked = {tp.partition for tp in partitions if tp.topic == self.topic}
        if not self._closing:
            self.checkpoint(revoked)  # hand over cleanly: the next owner starts after the checkpoint
            self._commit(consumer, revoked)
        self._forget(revoked)

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        lost = {tp.partition for tp in partitions if tp.topic == self.topic}
        log.warning("Lanes %s lost to another worker: their state is dropped, not committed", sorted(lost))
        self._forget(lost)

    def _loop(self, consumer: Consumer) -> None:
        settings = self.settings
        flush_every = settings.stream_flush_seconds
        consumer.subscribe([self.topic], on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost)
        flushed_at = checkpointed_at = evicted_at = received_at = time.monotonic()
        on_batch = self.agent.on_batch
        while not self._stopping.is_set():
            messages = self._consume(consumer, min(0.2, flush_every))
            for message in messages:
                lane, offset = message.partition(), message.offset()
                if lane is None or offset is None:  # only error events lack them
                    continue
                if lane not in self._loaded:
                    self._load(lane)
                try:
                    batch = decode_partial_batch(message.value() or b"")
                except SchemaError as exc:  # never stop the stream on one bad message
                    log.warning("Skipping undecodable partials at %d:%d: %s", lane, offset, exc)
                    self.agent.skip(lane, offset)
                    self._dirty.add(lane)
                    continue
                if on_batch(lane, batch, offset):
                    self._dirty.add(lane)
            now = time.monotonic()
            if now - flushed_at >= flush_every:
                self.agent.publish_changed(now)
                self.producer.poll(0)  # serve delivery reports
                flushed_at = now
            if now - evicted_at >= EVICT_EVERY_SECONDS:
                self.agent.evict()
                evicted_at = now
            if messages:
                received_at = now
            idle = now - received_at >= CHECKPOINT_IDLE_SECONDS
            if self._dirty and (idle or now - checkpointed_at >= CHECKPOINT_EVERY_SECONDS):
                self.checkpoint(set(self._dirty))
                self._commit(consumer)
                checkpointed_at = now
        self.checkpoint(set(self._dirty))  # stopping: the next owner replays nothing
        self._commit(consumer)
        log.info("Metric merging stopped: %d lanes checkpointed and committed", len(self._loaded))
