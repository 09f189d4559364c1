"""Publishing collected events to Kafka, answering only once the broker has them.

One idempotent confluent-kafka producer per process (acks=all, lz4, a few ms of linger so
concurrent requests share broker round trips) and one thread serving its delivery reports.
A request's records are produced together and the request awaits a single future that the
delivery callbacks complete (through ``loop.call_soon_threadsafe``) when the last record is
acknowledged or the first one fails — so a 200 means "durable in Kafka" without a flush per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from typing import Any

from confluent_kafka import KafkaError, Producer

from api.metrics import PRODUCE_FAILURES, PRODUCE_LATENCY
from schemas.codec import dead_letter_codec, event_codec
from schemas.models import AnalyticsEvent, DeadLetter
from tidemark.settings import Settings

log = logging.getLogger(__name__)


class PublishError(RuntimeError):
    """Kafka did not take the records (broker unreachable, timeout, publisher not running)."""


class _Delivery:
    """Completion of one request's records: resolves its future on the last ack or the first error."""

    __slots__ = ("future", "loop", "pending", "lock", "failed")

    def __init__(self, loop: asyncio.AbstractEventLoop, count: int) -> None:
        self.loop = loop
        self.future: asyncio.Future[None] = loop.create_future()
        self.pending = count
        self.lock = threading.Lock()
        self.failed = False

    def report(self, err: KafkaError | None, _msg: Any) -> None:
        # Runs on the producer's poll thread (or the thread flushing it): only touch the loop thread-safely.
        with self.lock:
            if self.failed:
                return
            if err is not None:
                self.failed = True
                self._wake(self._fail, f"{err.name()}: {err.str()}")
                return
            self.pending -= 1
            if self.pending:
                return
        self._wake(self._succeed)

    def _wake(self, callback: Any, *args: Any) -> None:
        # A closed loop (shutdown) means nobody waits for this answer any more.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(callback, *args)

    def _succeed(self) -> None:
        if not self.future.done():
            self.future.set_result(None)

    def _fail(self, reason: str) -> None:
        if not self.future.done():
            self.future.set_exception(PublishError(reason))


class EventPublisher:
    """The collector's Kafka producer, as a :class:`tidemark.service.Service`.

    ``publish`` sends events to ``events.raw`` (key = the event's distinct id, so one device's events
    stay in order on one partition) and dead letters to ``events.dlq``, both Avro single-object encoded.
    """

    name = "event-publisher"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.events_topic = settings.topic("events.raw")
        self.dead_topic = settings.topic("events.dlq")
        self._producer: Producer | None = None
        self._running = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def producer(self) -> Producer:
        """The running producer (raises :class:`PublishError` before ``start`` or after ``stop``)."""
        if self._producer is None or not self._running.is_set():
            raise PublishError("the event publisher is not running")
        return self._producer

    def start(self) -> None:
        """Create the producer and start the thread that serves its delivery reports."""
        timeout_ms = int(self.settings.publish_timeout_seconds * 1000)
        self._producer = Producer(
            {
                "bootstrap.servers": self.settings.kafka_bootstrap,
                "enable.idempotence": True,
                "acks": "all",
                "linger.ms": 5,
                "compression.type": "lz4",
                "delivery.timeout.ms": timeout_ms,
                "request.timeout.ms": min(timeout_ms, 30_000),
                "client.id": "tidemark-collector",
            }
        )
        self._running.set()
        self._thread = threading.Thread(target=self._serve_reports, name="tidemark-publisher-poll", daemon=True)
        self._thread.start()

    def _serve_reports(self) -> None:
        producer = self._producer
        assert producer is not None
        while self._running.is_set():
            try:
                producer.poll(0.1)
            except Exception:  # a failing callback must not end the thread every request relies on
                log.exception("Delivery report handling failed")

    def stop(self, timeout: float = 10.0) -> None:
        """Deliver what is in flight (within ``timeout``), then stop the poll thread."""
        if self._producer is None:
            return
        self._running.clear()
        if self._thread is not None:
            self._thread.join(timeout)
        left = self._producer.flush(timeout)
        if left:
            log.warning("Event publisher stopped with %d records undelivered", left)
        self._producer = None

    async def publish(self, events: list[AnalyticsEvent], dead: list[DeadLetter]) -> None:
        """Produce ``events`` and ``dead`` letters and wait until the broker acknowledged every one.

        Raises :class:`PublishError` (answered 503 by the collector) when any record is refused or
        not acknowledged within ``publish_timeout_seconds``.
        """
        count = len(events) + len(dead)
        if not count:
            return
        producer = self.producer
        delivery = _Delivery(asyncio.get_running_loop(), count)
        started = time.perf_counter()
        encode_event = event_codec().encode
        encode_dead = dead_letter_codec().encode
        try:
            for event in events:
                self._produce(
                    producer,
                    self.events_topic,
                    event.distinct_id.encode("utf-8"),
                    encode_event(event.to_avro()),
                    delivery,
                )
            for letter in dead:
                self._produce(
                    producer, self.dead_topic, letter.reason.encode("utf-8"), encode_dead(letter.to_avro()), delivery
                )
        except PublishError:
            with delivery.lock:
                delivery.failed = True  # reports of what was already queued are ignored
            PRODUCE_FAILURES.labels("enqueue").inc()
            raise
        try:
            await asyncio.wait_for(delivery.future, timeout=self.settings.publish_timeout_seconds + 5)
        except PublishError:
            PRODUCE_FAILURES.labels("delivery").inc()
            raise
        except TimeoutError as exc:
            PRODUCE_FAILURES.labels("timeout").inc()
            raise PublishError("Kafka did not acknowledge the events in time") from exc
        PRODUCE_LATENCY.observe(time.perf_counter() - started)

    def _produce(self, producer: Producer, topic: str, key: bytes, value: bytes, delivery: _Delivery) -> None:
        for _ in range(50):
            try:
                producer.produce(topic, value=value, key=key, on_delivery=delivery.report)
                return
            except BufferError:
                # The local queue is full: let delivery reports drain it briefly, then retry.
                producer.poll(0.05)
            except Exception as exc:  # KafkaException: unknown topic, fatal producer state, ...
                raise PublishError(str(exc)) from exc
        raise PublishError("the Kafka producer's queue stayed full")

    def ping(self, timeout: float = 2.0) -> None:
        """Ask the broker for cluster metadata; raises if it does not answer (what ``/readyz`` checks)."""
        try:
            self.producer.list_topics(self.events_topic, timeout=timeout)
        except PublishError:
            raise
        except Exception as exc:
            raise PublishError(f"Kafka is not reachable: {exc}") from exc
