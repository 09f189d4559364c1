"""The events stage: ``events.raw`` → sessions (topic ``sessions``) and per-partition metric partials.

For every partition of ``events.raw`` it holds a :class:`~streams.processor.PartitionProcessor`
(identity links, open sessions, open metric windows). Every ``stream_flush_seconds`` (or
``stream_flush_events`` events) a partition is *flushed*:

1. changed sessions are published to ``sessions`` (an open one at most every
   ``SESSION_PUBLISH_EVERY`` seconds, a closed one at once), and changed windows to
   ``metrics.partials``: one batch per lane (several when it would pass
   ``PARTIAL_BATCH_BYTES``), each partial the partition's full value of a window (never a
   delta), then the partition's watermark, announced by the lane's last batch;
2. at most every ``CHECKPOINT_EVERY_SECONDS`` (or when ``stream_flush_events`` events
   wait, or once no event has come for ``CHECKPOINT_IDLE_SECONDS``), the outputs are made
   durable (the producer is flushed and every delivery confirmed), then the partition's
   whole state and the offset it reflects are written, as ONE message, to the partition's
   checkpoint (:func:`checkpoint_topic`, partition = source partition) and made durable
   too (the partitions due at one flush share these waits);
3. only then is the offset after it committed (:class:`EventsConsumer`).

So the committed offset never passes the checkpoint: after a crash the partition
restarts at or before the checkpoint, the processor restored from it skips what it
already applied and re-publishes the same values for the rest. That is the processing
guarantee: at-least-once delivery, exactly-once effect (see :mod:`streams.app` for why
not Kafka transactions).

Why ``events.raw`` is read with librdkafka rather than through a Faust agent: Faust hands
a stream one message at a time through its conductor, channels and event objects, which
costs about 150 µs a message, so a Faust agent that does nothing at all tops out near 6,000
events/s per worker; librdkafka hands over batches for about a microsecond a message. The
consumer joins the group ``<prefix><stream_app_id>``, gets partitions by cooperative-sticky
assignment, restores a partition from its checkpoint when it is assigned and checkpoints
and commits it when it is revoked.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

from confluent_kafka import Consumer, TopicPartition
from prometheus_client import Counter

from schemas.streams import metric_partial_batch_codec
from streams.agents.checkpoints import read_checkpoint
from streams.agents.threaded import ConsumerThread, DurableProducer
from streams.aggregators import MetricAggregator, state_json
from streams.avro_writers import session_message
from streams.events import StreamEvent
from streams.periods import Period, PeriodCalendar
from streams.processor import FlushResult, PartitionProcessor
from streams.sessions import SessionWindow
from streams.windows import MetricPartial, series_lane
from tidemark.settings import Settings

log = logging.getLogger(__name__)

EVENTS_PROCESSED = Counter("tidemark_stream_events_total", "Events applied by the stream processors.")
EVENTS_SKIPPED = Counter(
    "tidemark_stream_events_skipped_total", "Events not applied, by reason (replayed, undecodable).", ["reason"]
)
LATE_EVENTS = Counter("tidemark_stream_late_events_total", "Events later than their window's grace.", ["period"])
# A changed window is re-published at most this often (seconds); a closing window at once. Partials
# fan out (metrics x dimension values x periods), so this bounds the load on the metrics agent.
PUBLISH_EVERY = {Period.minute: 5.0, Period.hour: 10.0, Period.day: 30.0, Period.week: 30.0, Period.month: 30.0}

# An open session that keeps changing is re-published at most this often (seconds); a closed one at once.
SESSION_PUBLISH_EVERY = 5.0

# A message of metric partials holds at most about this many bytes (a flush sends more messages
# when needed); well under the broker's default limit of 1 MB per message.
PARTIAL_BATCH_BYTES = 256 * 1024
# Bytes of an entry besides its state, metric name and dimension value (an upper bound).
PARTIAL_ENTRY_OVERHEAD = 64

# Outputs are published at every flush; the state is checkpointed (and the events acknowledged)
# at most this often, or when ``stream_flush_events`` events wait. A crash replays since then.
CHECKPOINT_EVERY_SECONDS = 10.0
# ... and as soon as no event has arrived for this long (traffic paused or caught up).
CHECKPOINT_IDLE_SECONDS = 2.0


def publish_every(settings: Settings) -> dict[Period, float]:
    """Seconds between publications of a changed open window, per period (stages one and two alike)."""
    return {period: min(seconds, settings.stream_republish_max_seconds) for period, seconds in PUBLISH_EVERY.items()}


FLUSHES = Counter("tidemark_stream_flushes_total", "Partition checkpoints (publish + checkpoint + commit).")


def partial_entry(partial: MetricPartial, state: bytes) -> dict[str, Any]:
    """A partial as an entry of a ``metric_partial_batch.avsc`` record (``state``: its state as JSON)."""
    return {
        "metric": partial.metric,
        "period": partial.period.value,
        "periodStart": partial.period_start,
        "periodEnd": partial.period_end,
        "dimension": partial.dimension,
        "dimensionValue": partial.dimension_value,
        "state": state,
    }


def partial_chunks(entries: list[dict[str, Any]], limit: int = PARTIAL_BATCH_BYTES) -> list[list[dict[str, Any]]]:
    """``entries`` cut into consecutive chunks of about ``limit`` bytes at most (always at least one chunk).

    A flush after a long pause (a backlog, a slow start) can change tens of thousands of
    windows; one message for all of them would pass the broker's message size limit
    (1 MB by default) and stop the stage.
    """
    chunks: list[list[dict[str, Any]]] = [[]]
    size = 0
    for entry in entries:
        cost = PARTIAL_ENTRY_OVERHEAD + len(entry["state"]) + len(entry["metric"]) + len(entry["dimensionValue"])
        if size + cost > limit and chunks[-1]:
            chunks.append([])
            size = 0
        chunks[-1].append(entry)
        size += cost
    return chunks


def checkpoint_topic(settings: Settings) -> str:
    """The compacted topic of the partitions' checkpoints (partition p's checkpoint in its partition p)."""
    return settings.topic(f"{settings.stream_app_id}-partition-checkpoints-changelog")


def checkpoint_key(partition: int) -> bytes:
    """The key of a partition's checkpoint message (the partition number, as JSON)."""
    return str(partition).encode()


def read_partition_checkpoint(settings: Settings, partition: int, timeout: float = 30.0) -> bytes | None:
    """The latest checkpoint of source ``partition`` (``None`` when it has none yet)."""
    return read_checkpoint(settings, checkpoint_topic(settings), partition, checkpoint_key(partition), timeout)


class EventsAgent:
    """Stage one of the stream: per-partition state, flushed, checkpointed and committed together.

    ``publish_session``, ``publish_partials`` and ``save_checkpoint`` are the three ways
    out; ``commit(partition, offset)`` is told that the partition's events up to
    ``offset`` are reflected in a durable checkpoint (Kafka topics in the worker; plain
    callables in the benchmark).
    """

    def __init__(
        self,
        settings: Settings,
        aggregators: dict[str, MetricAggregator],
        publish_session: Callable[[bytes, bytes], None],
        publish_partials: Callable[[bytes, bytes, int], None],
        save_checkpoint: Callable[[int, bytes], None],
        load_checkpoint: Callable[[int], bytes | None],
        commit: Callable[[int, int], None],
        outputs_durable: Callable[[], None] = lambda: None,
        partial_lanes: int = 1,
    ) -> None:
        from datetime import timedelta

        self.settings = settings
        self.aggregators = aggregators
        self.calendar = PeriodCalendar(settings.report_timezone, settings.week_start)
        self.grace = timedelta(seconds=settings.stream_grace_seconds)
        self.gap = timedelta(minutes=settings.session_inactivity_minutes)
        self.max_length = timedelta(minutes=settings.session_max_length_minutes)
        self.publish_session = publish_session
        self.publish_partials = publish_partials  # (key, value, lane): a series' partials all go to its lane
        self.partial_lanes = partial_lanes
        self.save_checkpoint = save_checkpoint
        self.load_checkpoint = load_checkpoint
        self.commit = commit
        self.outputs_durable = outputs_durable
        self.processors: dict[int, PartitionProcessor] = {}
        # Per partition: the last offset consumed, and how many events since the last checkpoint.
        self.consumed: dict[int, int] = {}
        self.waiting: dict[int, int] = defaultdict(int)
        self.flush_events = settings.stream_flush_events
        self._late_reported: dict[int, dict[str, int]] = defaultdict(dict)
        self._replayed: dict[int, int] = defaultdict(int)
        self._applied = 0
        self._undecodable = 0
        self._checkpointed_at: dict[int, float] = {}
        # Serialising a partition's state costs milliseconds to seconds: not at every flush.
        self.checkpoint_seconds = CHECKPOINT_EVERY_SECONDS
        self._partial_codec = metric_partial_batch_codec()
        self._lanes: dict[tuple[Any, ...], int] = {}  # (metric, period, dimension, value) -> its lane
        self._announced: dict[int, int] = {}  # partition -> watermark announced to every lane
        self.partial_batch_bytes = PARTIAL_BATCH_BYTES
        # Changed open sessions wait for the next publication (see _publish_sessions).
        self.session_publish_seconds = min(SESSION_PUBLISH_EVERY, settings.stream_republish_max_seconds)
        self._sessions_waiting: dict[int, dict[str, SessionWindow]] = {}
        self._sessions_published_at: dict[int, float] = {}

    def processor(self, partition: int) -> PartitionProcessor:
        """The partition's processor, restored from its checkpoint the first time it is needed."""
        processor = self.processors.get(partition)
        if processor is None:
            processor = PartitionProcessor(
                partition,
                self.aggregators,
                self.calendar,
                grace=self.grace,
                session_gap=self.gap,
                session_max_length=self.max_length,
            )
            processor.metrics.publish_every = publish_every(self.settings)
            blob = self.load_checkpoint(partition)
            if blob:
                processor.restore(blob)
                log.info(
                    "Partition %d restored from its checkpoint at offset %d (%d open sessions, %d windows)",
                    partition, processor.applied_offset, len(processor.sessions.open), len(processor.metrics.windows),
                )
            self.processors[partition] = processor
        return processor

    def on_message(self, partition: int, offset: int, value: bytes | None) -> None:
        """Apply one ``events.raw`` message; flush the partition when enough events piled up."""
        processor = self.processors.get(partition) or self.processor(partition)
        self.consumed[partition] = offset
        self.waiting[partition] += 1
        try:
            event = StreamEvent.decode(value or b"")
        except Exception as exc:  # never stop the stream: the raw sink dead-letters what it cannot read
            self._undecodable += 1
            log.warning("Skipping undecodable event at %d:%d: %s", partition, offset, exc)
        else:
            if processor.process(event, offset):
                self._applied += 1
            else:
                self._replayed[partition] += 1
        if self.waiting[partition] >= self.flush_events:
            self.flush(partition)

    def flush(self, partition: int, force_checkpoint: bool = False) -> None:
        """Publish the partition's changes; when due, make them durable, checkpoint, then commit."""
        self.flush_partitions([partition], force_checkpoint)

    def flush_partitions(self, partitions: Iterable[int], force_checkpoint: bool = False) -> None:
        """Publish every partition's changes; checkpoint those due (the order is the guarantee).

        The partitions due share the waits: their outputs are made durable together, then
        their checkpoints are written and made durable together, then their offsets are
        committed. (A wait for the broker's acknowledgements costs a round trip whether it
        covers one partition or all of them.)
        """
        due: list[tuple[int, PartitionProcessor, int, FlushResult, float]] = []
        for partition in partitions:
            processor = self.processors.get(partition)
            waiting = self.waiting.get(partition, 0)
            if processor is None or not (waiting or processor.metrics.dirty or force_checkpoint):
                continue
            started = time.monotonic()
            result = processor.flush(now=started, copy=False)  # encoded below, before the next event
            checkpoint = (force_checkpoint or waiting >= self.flush_events
                          or started - self._checkpointed_at.get(partition, -1e18) >= self.checkpoint_seconds)
            self._publish_sessions(partition, result.sessions, started, everything=checkpoint)
            self._publish_partials(partition, result.partials, processor.metrics.watermark)
            self._report_late(partition, processor)
            if checkpoint:  # else published; checkpoint and commit wait for a later flush
                due.append((partition, processor, waiting, result, started))
        self._count_applied()
        if not due:
            return
        self.outputs_durable()
        for partition, processor, _waiting, _result, started in due:
            self._checkpointed_at[partition] = started
            self.save_checkpoint(partition, processor.checkpoint())
        self.outputs_durable()
        for partition, _processor, waiting, result, started in due:
            if partition in self.consumed:
                self.commit(partition, self.consumed[partition])
            self.waiting[partition] = 0
            FLUSHES.inc()
            replayed = self._replayed.pop(partition, 0)
            if replayed:
                EVENTS_SKIPPED.labels("replayed").inc(replayed)
                log.info("Partition %d: skipped %d redelivered events already applied in its checkpoint",
                         partition, replayed)
            log.debug(
                "Checkpointed partition %d: %d events, %d sessions, %d partials, %d sessions expired in %.3fs",
                partition, waiting, len(result.sessions), len(result.partials), result.expired_sessions,
                time.monotonic() - started,
            )

    def _publish_sessions(self, partition: int, changed: list[SessionWindow], now: float, everything: bool) -> None:
        """Publish closed sessions at once, open ones that changed at most every ``session_publish_seconds``.

        An open session changes with nearly every flush while its device is active; its
        latest version replaces the earlier ones downstream, so the versions in between
        need not all be sent. Whatever waits is published before a checkpoint
        (``everything``), so a restart never leaves a change unpublished.
        """
        waiting = self._sessions_waiting.setdefault(partition, {})
        for session in changed:
            waiting[session.session_id] = session
        if not waiting:
            return
        if not everything and now - self._sessions_published_at.get(partition, -1e18) < self.session_publish_seconds:
            closed = [sid for sid, session in waiting.items() if session.closed]
            out = [waiting.pop(sid) for sid in closed]
        else:
            self._sessions_published_at[partition] = now
            out = list(waiting.values())
            waiting.clear()
        publish = self.publish_session
        for session in out:
            publish(session.device_id.encode(), session_message(session))

    def _publish_partials(self, partition: int, partials: list[MetricPartial], watermark: int) -> None:
        """Send every lane its share of the flush's partials, then the partition's new watermark, as one batch.

        A lane completes a window when every source partition's announced watermark passed
        the window's end plus the grace. The partials carry the watermark announced before
        this flush; the one it reached is announced after them (``announced``), never on a
        partial itself, so a lane cannot complete a window whose last partial from this
        partition is still behind in the same flush. A lane this partition sent nothing
        to still learns how far it has got.
        """
        previous = self._announced.get(partition, -1)
        by_lane: dict[int, list[dict[str, Any]]] = defaultdict(list)
        lanes, lane_of = self._lanes, self.partial_lanes
        carried = previous
        encoded: dict[int, bytes] = {}  # ``partials`` keeps every state alive meanwhile, so ids stay unique
        for partial in partials:
            series = (partial.metric, partial.period, partial.dimension, partial.dimension_value)
            lane = lanes.get(series)
            if lane is None:
                lane = lanes[series] = series_lane(partial.series_key, lane_of)
            by_lane[lane].append(partial_entry(partial, state_json(partial.state, encoded)))
            carried = partial.watermark
        advanced = watermark > previous
        if not (by_lane or advanced):
            return
        key = str(partition).encode()
        for lane in range(self.partial_lanes):
            entries = by_lane.get(lane)
            if entries is None and not advanced:
                continue
            chunks = partial_chunks(entries or [], self.partial_batch_bytes)
            for i, chunk in enumerate(chunks):
                # Only the last message of the flush announces the new watermark: the lane must
                # not complete a window while a partial of it is still in a later message.
                announced = max(watermark, previous) if i == len(chunks) - 1 else max(carried, 0)
                record = {"partition": partition, "watermark": max(carried, 0), "announced": announced,
                          "partials": chunk}
                self.publish_partials(key, self._partial_codec.encode(record), lane)
        if advanced:
            self._announced[partition] = watermark

    def flush_all(self, force_checkpoint: bool = False) -> None:
        """Flush every partition (the periodic timer); ``force_checkpoint`` checkpoints each one too."""
        self.flush_partitions(list(self.processors), force_checkpoint)

    def unacknowledged(self) -> list[int]:
        """The partitions holding events not yet reflected in a checkpoint."""
        return [partition for partition, waiting in self.waiting.items() if waiting]

    def forget(self, partitions: set[int]) -> None:
        """Partitions moved to another worker: drop their state (the new owner restores the checkpoint)."""
        for partition in partitions:
            self.processors.pop(partition, None)
            self.consumed.pop(partition, None)
            self._sessions_waiting.pop(partition, None)
            dropped = self.waiting.pop(partition, 0)
            self._checkpointed_at.pop(partition, None)
            if dropped:
                log.info("Partition %d revoked: %d events not checkpointed will be replayed by its new owner",
                         partition, dropped)

    def _count_applied(self) -> None:
        # Counted here, not per event: a metric's lock costs as much as a small event's processing.
        if self._applied:
            EVENTS_PROCESSED.inc(self._applied)
            self._applied = 0
        if self._undecodable:
            EVENTS_SKIPPED.labels("undecodable").inc(self._undecodable)
            self._undecodable = 0

    def _report_late(self, partition: int, processor: PartitionProcessor) -> None:
        seen = self._late_reported[partition]
        for period, count in processor.late_events.items():
            new = count - seen.get(period, 0)
            if new > 0:
                LATE_EVENTS.labels(period).inc(new)
                log.warning("Partition %d: %d events later than the %s grace (left to the batch recompute)",
                            partition, new, period)
                seen[period] = count


class EventsConsumer(ConsumerThread):
    """Reads ``events.raw`` with librdkafka in a thread of its own and drives an :class:`EventsAgent`.

    Sessions, partials and checkpoints go out through one librdkafka producer whose every
    delivery is confirmed before a checkpoint counts as durable; offsets are committed
    only up to what a durable checkpoint reflects, and at most every
    ``stream_commit_seconds``. A failure stops the thread and is kept in :attr:`failure`
    (the worker then stops: whatever was not checkpointed is replayed by the next owner).
    """

    thread_name = "events-consumer"

    def __init__(
        self,
        settings: Settings,
        aggregators: dict[str, MetricAggregator],
        partials_topic: str,
        batch_size: int = 5_000,
        partial_lanes: int = 1,
    ) -> None:
        from tidemark.topics import EVENTS_RAW, SESSIONS

        # The group the stream worker has always consumed events.raw in (committed offsets carry over).
        super().__init__(settings, EVENTS_RAW.name, f"{settings.topic_prefix}{settings.stream_app_id}", batch_size)
        self._checkpoints = checkpoint_topic(settings)
        self.producer = DurableProducer(settings)
        self.outputs_durable = self.producer.durable
        self.agent = EventsAgent(
            settings,
            aggregators,
            publish_session=self.producer.publisher(settings.topic(SESSIONS.name)),
            publish_partials=self.producer.publisher(partials_topic),
            save_checkpoint=self._save_checkpoint,
            load_checkpoint=lambda partition: read_partition_checkpoint(settings, partition),
            commit=self._checkpointed,
            outputs_durable=self.outputs_durable,
            partial_lanes=partial_lanes,
        )

    def _save_checkpoint(self, partition: int, blob: bytes) -> None:
        # The agent makes it durable (with the other partitions' checkpoints) before it commits.
        self.producer.publisher(self._checkpoints)(checkpoint_key(partition), blob, partition)

    def _checkpointed(self, partition: int, offset: int) -> None:
        self._to_commit[partition] = offset + 1

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        super()._on_assign(consumer, partitions)
        # Restore at once rather than at the partition's next event: windows its checkpoint holds
        # changed but unpublished (rate-limited, or a previous owner's) go out at the next flush
        # even if no event comes for a while (a handover after the traffic, a restart at night).
        for tp in partitions:
            if tp.topic == self.topic:
                self.agent.processor(tp.partition)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        revoked = {tp.partition for tp in partitions if tp.topic == self.topic}
        if not self._closing:
            # Hand over cleanly: the next owner starts right after what is checkpointed here.
            self.agent.flush_partitions(sorted(revoked & set(self.agent.processors)), force_checkpoint=True)
            self._commit(consumer, revoked)
        self.agent.forget(revoked)
        for partition in revoked:
            self._to_commit.pop(partition, None)

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        lost = {tp.partition for tp in partitions if tp.topic == self.topic}
        log.warning("Partitions %s lost to another worker: their state is dropped, not committed", sorted(lost))
        self.agent.forget(lost)
        for partition in lost:
            self._to_commit.pop(partition, None)

    def _loop(self, consumer: Consumer) -> None:
        settings = self.settings
        flush_every = settings.stream_flush_seconds
        commit_every = settings.stream_commit_seconds
        consumer.subscribe([self.topic], on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost)
        flushed_at = committed_at = received_at = time.monotonic()
        on_message = self.agent.on_message
        while not self._stopping.is_set():
            messages = self._consume(consumer, min(0.2, flush_every))
            for message in messages:
                on_message(message.partition(), message.offset(), message.value())
            now = time.monotonic()
            if messages:
                received_at = now
            if now - received_at >= CHECKPOINT_IDLE_SECONDS:
                # Traffic paused: checkpoint the partitions with events since their checkpoint now
                # rather than at their next due time, so their offsets are committed (and a restart
                # replays nothing) within seconds of the last event.
                pending = self.agent.unacknowledged()
                if pending:
                    self.agent.flush_partitions(pending, force_checkpoint=True)
            if now - flushed_at >= flush_every:
                self.agent.flush_all()
                self.producer.poll(0)  # serve delivery reports
                flushed_at = now
            if self._to_commit and now - committed_at >= commit_every:
                self._commit(consumer)
                committed_at = now
        # Stopping: checkpoint and commit every partition, so the next owner replays nothing.
        self.agent.flush_all(force_checkpoint=True)
        self._commit(consumer)
        log.info("Events consumer stopped: %d partitions checkpointed and committed", len(self.agent.processors))
