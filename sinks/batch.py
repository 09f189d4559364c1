"""A Kafka → ClickHouse batch sink: consume, insert one batch, and only then commit.

The life of a message:

1. ``consume`` hands the sink up to a few thousand messages at a time; each one is
   turned into a row (``to_row``) and appended to the open :class:`PendingBatch`.
   A message that cannot be turned into a row becomes a dead letter instead.
2. The batch is flushed when it holds ``sink_batch_max_rows`` rows or is
   ``sink_batch_max_seconds`` old: dead letters are delivered first, then the rows go
   to ClickHouse in ONE insert, then — and only then — the offsets are committed
   synchronously. ``_make_durable`` is the one place where an offset becomes durable.
3. If the insert (or the dead-letter delivery) fails, nothing is committed. The sink
   keeps the same batch, pauses its partitions (it still polls, so it stays in the
   group) and retries with capped exponential backoff, forever: nothing is skipped.

Why a replay is harmless
------------------------
Every insert carries ``insert_deduplication_token`` = the batch's offset ranges over
all its partitions, e.g. ``events.raw:0:100-199,events.raw:3:40-57``. One insert per
batch (not per partition) keeps the insert count low, which is what ClickHouse is
fast at. An exact retry of a batch whose insert did land (the reply was lost) has the
same ranges, so ClickHouse drops it. A replay after a crash or a rebalance starts at
the last committed offset but may end elsewhere, so its token differs: the target
tables are ``ReplacingMergeTree`` keyed by the message's own id, which collapses
those rows (readers use ``FINAL``).

Rebalance
---------
When partitions are revoked the sink still owns them for the duration of the
callback, so it tries once to flush the open batch (insert + commit). If that fails
it drops the batch without committing: the next owner re-reads from the last
committed offset, and the table collapses whatever may have landed. When partitions
are lost (the group moved on without us) committing is impossible, so the batch is
dropped straight away.

Graceful stop flushes and commits the open batch (retrying until the stop timeout).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from clickhouse_connect.driver.client import Client
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from schemas.codec import dead_letter_codec
from schemas.models import DeadLetter
from sinks import metrics
from tidemark.settings import Settings
from tidemark.topics import EVENTS_DLQ

log = logging.getLogger(__name__)

Row = tuple[Any, ...]

# How many messages one ``consume`` call may return; bounded so a flush is never far away.
CONSUME_CHUNK = 5_000
# First and largest wait between attempts to make a failed batch durable.
RETRY_BACKOFF_FIRST_SECONDS = 0.2
LAG_REFRESH_SECONDS = 2.0


class UndecodableMessage(ValueError):
    """A message that can never become a row; it is dead-lettered and the sink moves on."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class SinkSpec:
    """What a sink reads and where it writes.

    ``name`` names the consumer group (``settings.group(f"sink.{name}")``) and labels the
    metrics; ``topic`` is the logical topic name (before the prefix); ``columns`` are the
    target columns in the order ``to_row`` returns them.
    """

    name: str
    topic: str
    table: str
    columns: tuple[str, ...]


@dataclass
class PendingBatch:
    """Rows consumed but not yet durable, with the offset range they came from per partition."""

    rows: list[Row] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    # (topic, partition) -> [first offset, last offset]
    ranges: dict[tuple[str, int], list[int]] = field(default_factory=dict)
    messages: int = 0
    opened_at: float = field(default_factory=time.monotonic)

    def track(self, topic: str, partition: int, offset: int) -> None:
        """Record that the message at ``offset`` belongs to this batch."""
        span = self.ranges.get((topic, partition))
        if span is None:
            self.ranges[(topic, partition)] = [offset, offset]
        else:
            span[1] = offset
        self.messages += 1

    def dedup_token(self) -> str:
        """The insert deduplication token: every partition's offset range, in a stable order."""
        return ",".join(f"{t}:{p}:{first}-{last}" for (t, p), (first, last) in sorted(self.ranges.items()))

    def offsets_to_commit(self) -> list[TopicPartition]:
        """The next offset to read in every partition of the batch (what gets committed)."""
        return [TopicPartition(t, p, last + 1) for (t, p), (_, last) in sorted(self.ranges.items())]


class BatchSink:
    """A :class:`~tidemark.service.Service` that lands one Kafka topic in one ClickHouse table.

    Subclasses give a :class:`SinkSpec` and implement :meth:`to_row`. The consumer runs
    on its own thread; ``stop`` flushes and commits what was consumed.
    """

    def __init__(self, spec: SinkSpec, settings: Settings, client: Client) -> None:
        self.spec = spec
        self.name = f"sink.{spec.name}"
        self.settings = settings
        self.client = client
        # Captured once: the client's current database may be changed by others later.
        self.database = client.database
        self.topic = settings.topic(spec.topic)
        self.group_id = settings.group(f"sink.{spec.name}")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._consumer: Consumer | None = None
        self._producer: Producer | None = None
        self._batch = PendingBatch()
        self._paused = False
        self._committed: dict[tuple[str, int], int] = {}
        self._lag_refreshed_at = 0.0
        self._stop_deadline = 0.0
        self._error: BaseException | None = None
        self._labels = {"sink": spec.name}
        # Plain counters mirroring the Prometheus ones, per instance (metrics are process-wide).
        self.rows_inserted = 0
        self.insert_failures = 0
        self.dead_lettered = 0
        self.committed_messages = 0

    # --- what a subclass provides -------------------------------------------------------

    def to_row(self, message: Message) -> Row:
        """The row (values in ``spec.columns`` order) for one message; raise :class:`UndecodableMessage`."""
        raise NotImplementedError

    def undecodable(self, message: Message, error: UndecodableMessage) -> Row | None:
        """What to do with a message ``to_row`` refused: by default dead-letter it (and keep no row)."""
        self._batch.dead_letters.append(
            DeadLetter(source="sink", reason=error.reason, detail=error.detail[:2000], payload=message.value() or b"")
        )
        return None

    # --- Service ------------------------------------------------------------------------

    def start(self) -> None:
        """Subscribe and start consuming on a background thread."""
        if self._thread is not None:
            raise RuntimeError(f"{self.name} already started")
        self._consumer = Consumer(self._consumer_config())
        self._consumer.subscribe(
            [self.topic], on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost
        )
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()
        log.info("Started %s: %s → %s.%s (group %s)", self.name, self.topic, self.database, self.spec.table,
                 self.group_id)

    def stop(self, timeout: float = 10.0) -> None:
        """Flush and commit the open batch, leave the group, and stop within ``timeout`` seconds."""
        self._stop_deadline = time.monotonic() + max(timeout - 1.0, 0.5)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.error("%s did not stop within %.1fs", self.name, timeout)

    @property
    def running(self) -> bool:
        """Whether the consuming thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def pending_messages(self) -> int:
        """Messages consumed into the open batch and not yet committed."""
        return self._batch.messages

    @property
    def error(self) -> BaseException | None:
        """The exception that ended the consuming thread, if one did."""
        return self._error

    # --- the loop -----------------------------------------------------------------------

    def _consumer_config(self) -> dict[str, Any]:
        return {
            "bootstrap.servers": self.settings.kafka_bootstrap,
            "group.id": self.group_id,
            "enable.auto.commit": False,  # offsets are committed by _make_durable only
            "auto.offset.reset": "earliest",
            "session.timeout.ms": self.settings.sink_session_timeout_ms,
            "client.id": f"tidemark-{self.name}",
            # Keep more in the local queue so a fast consume never waits on a fetch.
            "fetch.min.bytes": 1,
            "queued.min.messages": 100_000,
        }

    def _run(self) -> None:
        assert self._consumer is not None
        consumer = self._consumer
        max_rows = self.settings.sink_batch_max_rows
        max_age = self.settings.sink_batch_max_seconds
        retry_at = 0.0
        backoff = RETRY_BACKOFF_FIRST_SECONDS
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                batch = self._batch
                due = batch.messages and (len(batch.rows) >= max_rows or now - batch.opened_at >= max_age)
                if due and now >= retry_at:
                    if self._make_durable():
                        backoff, retry_at = RETRY_BACKOFF_FIRST_SECONDS, 0.0
                        self._resume()
                    else:
                        # Keep the batch, stop fetching more, poll only to stay in the group.
                        self._pause()
                        retry_at = time.monotonic() + backoff
                        backoff = min(backoff * 2, self.settings.sink_retry_backoff_max_seconds)
                    continue
                if due:
                    timeout = min(retry_at - now, 0.5)
                elif batch.messages:
                    timeout = max(min(batch.opened_at + max_age - now, 0.5), 0.0)
                else:
                    timeout = 0.5
                room = max(max_rows - len(batch.rows), 1)
                messages = consumer.consume(num_messages=min(room, CONSUME_CHUNK), timeout=timeout)
                if messages:
                    self._add(messages)
                self._refresh_lag()
            self._flush_on_stop()
        except BaseException as exc:  # a dead sink must be visible, not silent
            self._error = exc
            log.exception("%s stopped by an unexpected error; uncommitted messages will be re-read", self.name)
        finally:
            try:
                consumer.close()  # leaves the group (on_revoke runs with an empty batch)
            except Exception:
                log.exception("%s: closing the consumer failed", self.name)
            if self._producer is not None:
                self._producer.flush(5)

    def _add(self, messages: Sequence[Message]) -> None:
        """Append a chunk of messages to the open batch (the hot loop: one ``to_row`` per message)."""
        batch = self._batch
        if not batch.messages:
            batch.opened_at = time.monotonic()
        rows = batch.rows
        to_row = self.to_row
        for message in messages:
            error = message.error()
            if error is not None:
                if error.fatal():
                    raise KafkaException(error)
                if error.code() != KafkaError._PARTITION_EOF:
                    log.warning("%s: consumer error: %s", self.name, error)
                continue
            try:
                rows.append(to_row(message))
            except UndecodableMessage as exc:
                row = self.undecodable(message, exc)
                if row is not None:
                    rows.append(row)
            batch.track(message.topic(), message.partition(), message.offset())

    def _make_durable(self) -> bool:
        """Deliver the batch's dead letters, insert its rows, THEN commit its offsets.

        Returns whether the batch is now durable (and committed); on ``False`` the batch is
        kept untouched for a retry. This is the only place where offsets are committed.
        """
        assert self._consumer is not None
        batch = self._batch
        if not batch.messages:
            return True
        started = time.monotonic()
        dead_letters = len(batch.dead_letters)
        try:
            self._deliver_dead_letters(batch)
            if batch.rows:
                self.insert_batch(batch)
        except Exception as exc:
            self.insert_failures += 1
            metrics.INSERT_FAILURES.labels(**self._labels).inc()
            log.warning("%s: could not make %d rows from %d partitions durable (attempt kept for retry): %s",
                        self.name, len(batch.rows), len(batch.ranges), exc)
            return False
        inserted = time.monotonic()
        # ---- the rows are in ClickHouse: from here on the offsets may become durable ----
        offsets = batch.offsets_to_commit()
        try:
            self._consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:
            # The rows are durable; only the bookkeeping failed (typically a rebalance in
            # flight). Whoever reads these offsets next replays them harmlessly.
            log.warning("%s: commit after insert failed, batch will be replayed: %s", self.name, exc)
        else:
            for tp in offsets:
                self._committed[(tp.topic, tp.partition)] = tp.offset
            self.committed_messages += batch.messages
            metrics.COMMITTED_MESSAGES.labels(**self._labels).inc(batch.messages)
        self._batch = PendingBatch()
        log.info("Inserted %d rows into %s (%d dead letters) from %d partitions in %.2fs, committed in %.3fs",
                 len(batch.rows), self.spec.table, dead_letters, len(batch.ranges),
                 inserted - started, time.monotonic() - inserted)
        return True

    def insert_batch(self, batch: PendingBatch) -> None:
        """One column-oriented insert of the whole batch, deduplicated by its offset ranges."""
        columns = list(zip(*batch.rows, strict=True))
        started = time.perf_counter()
        self.client.insert(
            self.spec.table,
            columns,
            column_names=list(self.spec.columns),
            database=self.database,
            column_oriented=True,
            settings={"insert_deduplication_token": batch.dedup_token()},
        )
        metrics.INSERT_SECONDS.labels(**self._labels).observe(time.perf_counter() - started)
        metrics.BATCH_ROWS.labels(**self._labels).observe(len(batch.rows))
        metrics.ROWS_INSERTED.labels(**self._labels).inc(len(batch.rows))
        self.rows_inserted += len(batch.rows)

    def _deliver_dead_letters(self, batch: PendingBatch) -> None:
        """Produce the batch's dead letters and wait until the broker has every one of them."""
        if not batch.dead_letters:
            return
        if self._producer is None:
            self._producer = Producer(
                {"bootstrap.servers": self.settings.kafka_bootstrap, "enable.idempotence": True, "linger.ms": 5}
            )
        codec = dead_letter_codec()
        failures: list[str] = []

        def delivered(err: KafkaError | None, _msg: Message) -> None:
            if err is not None:
                failures.append(str(err))

        topic = self.settings.topic(EVENTS_DLQ.name)
        for letter in batch.dead_letters:
            self._producer.produce(topic, codec.encode(letter.to_avro()), key=str(letter.id), on_delivery=delivered)
        remaining = self._producer.flush(30)
        if remaining or failures:
            raise KafkaException(f"{remaining} dead letters undelivered, {len(failures)} failed: {failures[:3]}")
        # Each letter keeps its id on a retry, so a re-produced one collapses in events_rejected.
        for letter in batch.dead_letters:
            metrics.DEAD_LETTERED.labels(sink=self.spec.name, reason=letter.reason).inc()
        self.dead_lettered += len(batch.dead_letters)
        batch.dead_letters = []

    def _flush_on_stop(self) -> None:
        """On a graceful stop, keep trying to make the open batch durable until the stop deadline."""
        deadline = self._stop_deadline
        backoff = RETRY_BACKOFF_FIRST_SECONDS
        while self._batch.messages:
            if self._make_durable():
                return
            if time.monotonic() + backoff > deadline:
                log.error("%s: stopping with %d uncommitted messages; they will be re-read on the next start",
                          self.name, self._batch.messages)
                return
            time.sleep(backoff)  # waiting out a failing ClickHouse before the next attempt, not synchronising
            backoff = min(backoff * 2, self.settings.sink_retry_backoff_max_seconds)

    # --- partition lifecycle -------------------------------------------------------------

    def _pause(self) -> None:
        assert self._consumer is not None
        if not self._paused:
            self._consumer.pause(self._consumer.assignment())
            self._paused = True

    def _resume(self) -> None:
        assert self._consumer is not None
        if self._paused:
            self._consumer.resume(self._consumer.assignment())
            self._paused = False

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        log.info("%s assigned %s", self.name, _describe(partitions))
        self._paused = False  # a fresh assignment starts unpaused
        try:
            for tp in consumer.committed(partitions, timeout=10):
                if tp.offset < 0:  # nothing committed yet: everything from the low watermark is lag
                    tp.offset, _high = consumer.get_watermark_offsets(tp, timeout=10)
                self._committed[(tp.topic, tp.partition)] = tp.offset
        except KafkaException as exc:
            log.warning("%s: could not read committed offsets: %s", self.name, exc)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        log.info("%s revoked %s with %d messages pending", self.name, _describe(partitions), self._batch.messages)
        if self._batch.messages and not self._make_durable():
            log.warning("%s: partitions revoked with an undurable batch: dropping %d messages for the next owner",
                        self.name, self._batch.messages)
            self._batch = PendingBatch()
        self._forget(partitions)

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        if self._batch.messages:
            log.warning("%s: partitions lost: dropping %d uncommitted messages for the next owner",
                        self.name, self._batch.messages)
            self._batch = PendingBatch()
        self._forget(partitions)

    def _forget(self, partitions: list[TopicPartition]) -> None:
        self._paused = False
        for tp in partitions:
            self._committed.pop((tp.topic, tp.partition), None)
            with contextlib.suppress(KeyError):  # no lag was reported for it yet
                metrics.CONSUMER_LAG.remove(self.spec.name, tp.topic, str(tp.partition))

    def _refresh_lag(self) -> None:
        """Update the consumer-lag gauge from the locally cached high watermarks (no broker round trip)."""
        now = time.monotonic()
        if now - self._lag_refreshed_at < LAG_REFRESH_SECONDS:
            return
        self._lag_refreshed_at = now
        assert self._consumer is not None
        for (topic, partition), committed in list(self._committed.items()):
            try:
                _low, high = self._consumer.get_watermark_offsets(TopicPartition(topic, partition), cached=True)
            except KafkaException:
                continue
            if high >= 0:
                metrics.CONSUMER_LAG.labels(self.spec.name, topic, str(partition)).set(max(high - committed, 0))


def _describe(partitions: list[TopicPartition]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]" for tp in partitions) or "nothing"
