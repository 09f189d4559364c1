"""A Kafka → ClickHouse batch sink: consume, insert one batch, and only then commit.

The life of a message:

1. ``consume`` hands the sink up to a few thousand messages at a time; each one is
   turned into a row (``to_row``) and appended to the open :class:`PendingBatch`.
   A message that cannot be turned into a row becomes a dead letter instead.
2. The batch is sealed when it holds ``sink_batch_max_rows`` rows or is
   ``sink_batch_max_seconds`` old, and handed to the sink's writer thread: dead letters
   are delivered, then the rows go to ClickHouse in ONE insert. Meanwhile the consumer
   thread keeps decoding the next batch (the insert runs in ClickHouse's C++ code,
   without Python's lock, so the two overlap).
3. Only when the writer reports success does the consumer thread commit the batch's
   offsets, synchronously: ``_commit`` is the one place where an offset becomes durable.
   At most one batch is being written at a time, and a batch is never handed over
   before the previous one is committed, so offsets are committed in order.
4. If the insert (or the dead-letter delivery) fails, nothing is committed. The sink
   keeps the failed batch and retries it with capped exponential backoff, forever;
   nothing overtakes it. Once the open batch is full too, the sink pauses its
   partitions (still polling, so it stays in the group): nothing is skipped. (While a
   write is merely in progress, a full open batch just waits for it.)

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
callback, so it makes what it consumed durable then, in order: it waits for the batch
being written, then writes the failed and the open batch once each, committing each
after its insert. Whatever cannot be made durable (ClickHouse is down) is dropped
without a commit, and so is everything after it: the next owner re-reads from the
last committed offset, and the table collapses whatever may have landed. When
partitions are lost (the group moved on without us) committing is impossible, so
everything uncommitted is dropped straight away.

Graceful stop does the same as a revoke, retrying until the stop timeout.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
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
# How long a revoke waits for the batch being written before giving the partitions up.
REVOKE_WAIT_SECONDS = 10.0


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
    # Arrow types of the columns: insert through Arrow (conversion in C++) instead of
    # clickhouse-connect's column encoder. Only for rows of plain values (str, int, float).
    arrow_types: tuple[pa.DataType, ...] | None = None


@dataclass
class PendingBatch:
    """Rows consumed but not yet durable, with the offset range they came from per partition."""

    # The rows column by column (the insert's shape), filled as messages arrive: keeping one
    # tuple per row alive until the insert cost a fifth more CPU per event (allocation, the
    # garbage collector's passes over them, and the transposition before the insert).
    columns: list[list[Any]] = field(default_factory=list)
    row_count: int = 0
    dead_letters: list[DeadLetter] = field(default_factory=list)
    # (topic, partition) -> [first offset, last offset]
    ranges: dict[tuple[str, int], list[int]] = field(default_factory=dict)
    messages: int = 0
    opened_at: float = field(default_factory=time.monotonic)
    dead_lettered: int = 0
    write_seconds: float = 0.0

    def add_row(self, row: Row) -> None:
        """Append one row (values in the sink's column order)."""
        self.add_rows([row])

    def add_rows(self, rows: list[Row]) -> None:
        """Append a chunk of rows: transposed once per chunk, which costs a third of appending value by value."""
        if not rows:
            return
        if not self.columns:
            self.columns = [[] for _ in rows[0]]
        for column, values in zip(self.columns, zip(*rows, strict=True), strict=True):
            column.extend(values)
        self.row_count += len(rows)

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
    on its own thread, the inserts on a writer thread; ``stop`` flushes and commits
    what was consumed.
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
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{self.name}.writer")
        self._consumer: Consumer | None = None
        self._producer: Producer | None = None
        # The three places a consumed message can be, oldest first: being written, waiting
        # for a retry (never both at once), and the open batch still being filled.
        self._inflight: tuple[PendingBatch, Future[None]] | None = None
        self._failed: PendingBatch | None = None
        self._batch = PendingBatch()
        self._retry_at = 0.0
        self._backoff = RETRY_BACKOFF_FIRST_SECONDS
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
        """Flush and commit what was consumed, leave the group, and stop within ``timeout`` seconds."""
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
        """Messages consumed and not yet committed (being written, waiting for a retry, or open)."""
        inflight, failed = self._inflight, self._failed
        return (inflight[0].messages if inflight else 0) + (failed.messages if failed else 0) + self._batch.messages

    @property
    def error(self) -> BaseException | None:
        """The exception that ended the consuming thread, if one did."""
        return self._error

    # --- the consumer thread ------------------------------------------------------------

    def _consumer_config(self) -> dict[str, Any]:
        return {
            "bootstrap.servers": self.settings.kafka_bootstrap,
            "group.id": self.group_id,
            "enable.auto.commit": False,  # offsets are committed by _commit only
            "auto.offset.reset": "earliest",
            "session.timeout.ms": self.settings.sink_session_timeout_ms,
            "client.id": f"tidemark-{self.name}",
            # Fetch in large chunks and keep a deep local queue so consume never waits on a fetch.
            "queued.min.messages": 100_000,
            "max.partition.fetch.bytes": 4 * 1024 * 1024,
        }

    def _run(self) -> None:
        assert self._consumer is not None
        consumer = self._consumer
        max_rows = self.settings.sink_batch_max_rows
        try:
            while not self._stop.is_set():
                self._settle()
                self._hand_over()
                full = self._batch.row_count >= max_rows
                if full and self._inflight is not None:
                    # The writer is busy with the previous batch: wait for it rather than pause,
                    # because pausing makes librdkafka drop the messages it has prefetched.
                    self._settle(timeout=1.0)
                    continue
                # Full while a failed batch waits out its backoff (maybe long): stop fetching, keep polling.
                self._set_paused(full)
                room = max(max_rows - self._batch.row_count, 1)
                messages = consumer.consume(num_messages=min(room, CONSUME_CHUNK), timeout=self._poll_timeout())
                if messages:
                    self._add(messages)
                self._refresh_lag()
            self._make_all_durable(self._stop_deadline, retry=True)
        except BaseException as exc:  # a dead sink must be visible, not silent
            self._error = exc
            log.exception("%s stopped by an unexpected error; uncommitted messages will be re-read", self.name)
        finally:
            try:
                consumer.close()  # leaves the group (on_revoke runs with nothing pending)
            except Exception:
                log.exception("%s: closing the consumer failed", self.name)
            self._writer.shutdown(wait=False)
            if self._producer is not None:
                self._producer.flush(5)

    def _poll_timeout(self) -> float:
        """How long ``consume`` may wait: short while a write may finish or a batch falls due."""
        if self._inflight is not None or self._failed is not None:
            return 0.05
        if self._batch.messages:
            age = time.monotonic() - self._batch.opened_at
            return min(max(self.settings.sink_batch_max_seconds - age, 0.0), 0.5)
        return 0.5

    def _add(self, messages: Sequence[Message]) -> None:
        """Append a chunk of messages to the open batch (the hot loop: one ``to_row`` per message)."""
        batch = self._batch
        if not batch.messages:
            batch.opened_at = time.monotonic()
        rows: list[Row] = []  # this chunk's rows, added to the batch's columns at the end
        add_row, ranges = rows.append, batch.ranges
        to_row = self.to_row
        tracked = 0
        span_partition: int | None = None  # one sink reads one topic: the partition names the span
        span: list[int] = []
        for message in messages:
            error = message.error()
            if error is not None:
                if error.fatal():
                    raise KafkaException(error)
                if error.code() != KafkaError._PARTITION_EOF:
                    log.warning("%s: consumer error: %s", self.name, error)
                continue
            try:
                add_row(to_row(message))
            except UndecodableMessage as exc:
                row = self.undecodable(message, exc)
                if row is not None:
                    add_row(row)
            # PendingBatch.track, inlined: this loop runs once per message, and consecutive
            # messages mostly come from one partition, so its span is looked up once per run.
            partition, offset = message.partition(), message.offset()
            if partition != span_partition:
                key = (message.topic(), partition)
                span = ranges.get(key)  # type: ignore[arg-type]
                if span is None:
                    span = ranges[key] = [offset, offset]  # type: ignore[index]
                span_partition = partition
            span[1] = offset
            tracked += 1
        batch.add_rows(rows)
        batch.messages += tracked

    def _due(self, batch: PendingBatch) -> bool:
        return bool(batch.messages) and (
            batch.row_count >= self.settings.sink_batch_max_rows
            or time.monotonic() - batch.opened_at >= self.settings.sink_batch_max_seconds
        )

    def _hand_over(self) -> None:
        """Give the writer its next batch: the failed one once its backoff is over, else a due open one."""
        if self._inflight is not None:
            return
        if self._failed is not None:  # nothing overtakes a failed batch
            if time.monotonic() >= self._retry_at:
                batch, self._failed = self._failed, None
                self._inflight = (batch, self._writer.submit(self._write, batch))
            return
        if self._due(self._batch):
            batch, self._batch = self._batch, PendingBatch()
            self._inflight = (batch, self._writer.submit(self._write, batch))

    def _settle(self, timeout: float | None = 0.0) -> bool:
        """Collect the writer's result: commit the batch on success, keep it for a retry on failure.

        Returns whether nothing is being written any more (``timeout`` None waits for it).
        """
        if self._inflight is None:
            return True
        batch, future = self._inflight
        if timeout is not None and not future.done():
            try:
                future.exception(timeout)
            except FutureTimeout:
                return False
        self._inflight = None
        error = future.exception()
        if error is None:
            self._backoff = RETRY_BACKOFF_FIRST_SECONDS
            self._commit(batch)
        else:
            self._count_failure(batch, error)
            self._failed = batch
            self._retry_at = time.monotonic() + self._backoff
            self._backoff = min(self._backoff * 2, self.settings.sink_retry_backoff_max_seconds)
        return True

    def _count_failure(self, batch: PendingBatch, error: BaseException) -> None:
        self.insert_failures += 1
        metrics.INSERT_FAILURES.labels(**self._labels).inc()
        log.warning("%s: could not make %d rows from %d partitions durable (retry in %.1fs): %s",
                    self.name, batch.row_count, len(batch.ranges), self._backoff, error)

    def _commit(self, batch: PendingBatch) -> None:
        """THE DURABLE POINT: the batch's rows are in ClickHouse, so its offsets may now be committed."""
        assert self._consumer is not None
        offsets = batch.offsets_to_commit()
        started = time.monotonic()
        try:
            self._consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:
            # The rows are durable; only the bookkeeping failed (typically a rebalance in
            # flight). Whoever reads these offsets next replays them harmlessly.
            log.warning("%s: commit after insert failed, batch will be replayed: %s", self.name, exc)
            return
        for tp in offsets:
            self._committed[(tp.topic, tp.partition)] = tp.offset
        self.committed_messages += batch.messages
        metrics.COMMITTED_MESSAGES.labels(**self._labels).inc(batch.messages)
        log.info("Inserted %d rows into %s (%d dead letters) from %d partitions in %.2fs, committed in %.3fs",
                 batch.row_count, self.spec.table, batch.dead_lettered, len(batch.ranges), batch.write_seconds,
                 time.monotonic() - started)

    def _make_all_durable(self, deadline: float, retry: bool) -> bool:
        """Write and commit everything consumed, oldest first, on this thread (rebalance and stop).

        Each batch gets one attempt, or (``retry``) attempts until ``deadline``. A batch that
        cannot be made durable stops the walk: committing a later batch would commit past it.
        Returns whether everything was committed.
        """
        if not self._settle(timeout=max(deadline - time.monotonic(), 0.1)):
            return False  # still being written at the deadline
        for batch in (self._failed, self._batch):
            if batch is None or not batch.messages:
                continue
            while True:
                try:
                    self._write(batch)
                    break
                except Exception as exc:
                    self._count_failure(batch, exc)
                    if not retry or time.monotonic() + self._backoff > deadline:
                        return False
                    time.sleep(self._backoff)  # waiting out a failing ClickHouse, not synchronising
                    self._backoff = min(self._backoff * 2, self.settings.sink_retry_backoff_max_seconds)
            self._commit(batch)
            if batch is self._failed:
                self._failed = None
            else:
                self._batch = PendingBatch()
        return True

    def _drop_uncommitted(self, why: str) -> None:
        """Forget everything not committed; the next owner of the partitions re-reads it."""
        dropped = self.pending_messages
        if dropped:
            log.warning("%s: %s: dropping %d uncommitted messages for the next owner", self.name, why, dropped)
        self._inflight = None  # a write still running may land: a replay collapses onto it
        self._failed = None
        self._batch = PendingBatch()
        self._backoff = RETRY_BACKOFF_FIRST_SECONDS

    # --- the writer thread --------------------------------------------------------------

    def _write(self, batch: PendingBatch) -> None:
        """Deliver the batch's dead letters and insert its rows; raise if either fails."""
        started = time.monotonic()
        self._deliver_dead_letters(batch)
        if batch.row_count:
            self.insert_batch(batch)
        batch.write_seconds = time.monotonic() - started

    def insert_batch(self, batch: PendingBatch) -> None:
        """One insert of the whole batch, deduplicated by its offset ranges."""
        columns = batch.columns
        settings = {
            "insert_deduplication_token": batch.dedup_token(),
            # A batch spanning many months (a backfill) must not be refused forever.
            "max_partitions_per_insert_block": 0,
        }
        started = time.perf_counter()
        if self.spec.arrow_types is not None:
            # Arrow keeps the conversion in C++: the consumer thread keeps Python's lock meanwhile.
            table = pa.Table.from_arrays(
                [pa.array(column, type=kind) for column, kind in zip(columns, self.spec.arrow_types, strict=True)],
                names=list(self.spec.columns),
            )
            self.client.insert_arrow(self.spec.table, table, database=self.database, settings=settings)
        else:
            self.client.insert(
                self.spec.table,
                columns,
                column_names=list(self.spec.columns),
                database=self.database,
                column_oriented=True,
                settings=settings,
            )
        metrics.INSERT_SECONDS.labels(**self._labels).observe(time.perf_counter() - started)
        metrics.BATCH_ROWS.labels(**self._labels).observe(batch.row_count)
        metrics.ROWS_INSERTED.labels(**self._labels).inc(batch.row_count)
        self.rows_inserted += batch.row_count

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
        batch.dead_lettered += len(batch.dead_letters)
        batch.dead_letters = []

    # --- partition lifecycle (callbacks run on the consumer thread, inside consume) -------

    def _set_paused(self, paused: bool) -> None:
        assert self._consumer is not None
        if paused != self._paused:
            assignment = self._consumer.assignment()
            if paused:
                self._consumer.pause(assignment)
            else:
                self._consumer.resume(assignment)
            self._paused = paused

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
        log.info("%s revoked %s with %d messages pending", self.name, _describe(partitions), self.pending_messages)
        if self.pending_messages and not self._make_all_durable(time.monotonic() + REVOKE_WAIT_SECONDS, retry=False):
            self._drop_uncommitted("partitions revoked before the batch was durable")
        self._forget(partitions)

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._drop_uncommitted("partitions lost")
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
