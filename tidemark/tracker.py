"""The Python SDK: applications track events straight into Kafka.

>>> from tidemark.tracker import Tracker
>>> with Tracker("127.0.0.1:9092") as tracker:                      # doctest: +SKIP
...     tracker.track("fund_project", user_id="usr_1", properties={"amount": 25, "currency": "USD"})
...     tracker.identify("usr_1", anonymous_id="3f0c...", traits={"country": "KE"})
...     tracker.page("/projects/prj_1", anonymous_id="3f0c...", title="Clean water for Kisumu")

How it behaves, and why
-----------------------
- **Validation happens in the caller's thread, at once.** An event that cannot be valid
  (no user and no anonymous id, blank name, naive timestamp, properties that are not
  JSON, larger than ``max_event_bytes``) raises :class:`ValueError` from ``track``:
  that is a bug in the calling code, and hiding it would lose data silently.
- **Sending happens in the background.** ``track`` encodes the event (Avro, single-object
  encoding) and hands it to confluent-kafka's producer, which batches (``linger.ms``,
  ``batch.size``), compresses (lz4) and retries on its own threads; a poll thread of ours
  serves the delivery reports. The producer is idempotent with ``acks=all``, so retries
  never duplicate or reorder a partition's records; ``delivery.timeout.ms`` bounds how
  long a record may be retried before it counts as failed.
- **``track`` never blocks the caller for long.** When the producer's local queue is full
  (the broker is slow or gone), ``track`` waits at most ``max_block_ms`` for room, serving
  delivery reports meanwhile, and then *drops* the event and counts it in
  :attr:`Tracker.dropped`. Analytics must not take the application down with it: a
  request handler that stalls because Kafka is away is worse than a gap in the charts,
  and the counter (also exported to Prometheus) makes the gap visible.
- **Nothing is lost quietly.** Delivery failures are counted (:attr:`Tracker.failed`) and
  logged (at most one line every few seconds, with the count); ``flush`` returns the
  number of events still undelivered; ``close`` (also on ``with`` exit and at interpreter
  exit) flushes, and events still undelivered after its timeout are purged and counted
  as failed.
- Events are keyed by their distinct id (the device's anonymous id, else the user id), so
  one device's events stay in order on one partition.
"""

from __future__ import annotations

import atexit
import json
import logging
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from typing import Any
from urllib.parse import urlparse

from confluent_kafka import KafkaError, KafkaException, Message, Producer
from prometheus_client import Counter
from pydantic import ValidationError

from schemas.codec import event_codec
from schemas.models import AnalyticsEvent, now_millis
from schemas.taxonomy import event_type_for
from tidemark.settings import Settings, get_settings

log = logging.getLogger(__name__)

LIBRARY = {"name": "tidemark-python", "version": "0.1.0"}
FAILURE_LOG_INTERVAL_SECONDS = 5.0

SDK_EVENTS = Counter(
    "tidemark_sdk_events_total",
    "Events handled by the Python SDK, by outcome (enqueued, delivered, failed, dropped).",
    ["outcome"],
)
# Label lookups cost more than the increments: resolve each child once.
_ENQUEUED, _DELIVERED, _FAILED, _DROPPED = (
    SDK_EVENTS.labels(outcome) for outcome in ("enqueued", "delivered", "failed", "dropped")
)


@dataclass(frozen=True)
class TrackerStats:
    """Counts since the tracker started: what was queued and what became of it."""

    enqueued: int
    delivered: int
    failed: int
    dropped: int


class Tracker:
    """Tracks events into ``events.raw`` through a background-batching, idempotent Kafka producer.

    Parameters
    ----------
    bootstrap_servers:
        Kafka bootstrap servers; defaults to ``settings.kafka_bootstrap``.
    settings:
        Topic prefix and event size limit come from here (default: the process settings).
    source:
        What the events' ``source`` field says (``sdk`` unless told otherwise).
    linger_ms, batch_bytes, compression:
        Batching: how long the producer waits to fill a batch, its size cap, and the codec.
    delivery_timeout_ms:
        How long a record may be retried before its delivery counts as failed.
    queue_max_messages:
        Capacity of the local queue; beyond it ``track`` waits up to ``max_block_ms`` then drops.
    max_block_ms:
        The longest ``track`` waits for room in a full queue.
    close_timeout:
        How long the interpreter-exit flush may take.
    producer_config:
        Extra librdkafka settings (override the above), e.g. security settings.
    """

    def __init__(
        self,
        bootstrap_servers: str | None = None,
        settings: Settings | None = None,
        source: str = "sdk",
        *,
        linger_ms: int = 20,
        batch_bytes: int = 1_000_000,
        compression: str = "lz4",
        delivery_timeout_ms: int = 30_000,
        queue_max_messages: int = 100_000,
        max_block_ms: float = 50.0,
        close_timeout: float = 10.0,
        producer_config: Mapping[str, Any] | None = None,
    ) -> None:
        self.settings = settings or get_settings()
        self.source = source
        self.topic = self.settings.topic("events.raw")
        self.max_block_ms = max_block_ms
        self.close_timeout = close_timeout
        config: dict[str, Any] = {
            "bootstrap.servers": bootstrap_servers or self.settings.kafka_bootstrap,
            "client.id": "tidemark-sdk",
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": linger_ms,
            "batch.size": batch_bytes,
            "compression.type": compression,
            "delivery.timeout.ms": delivery_timeout_ms,
            "request.timeout.ms": min(delivery_timeout_ms, 30_000),
            "queue.buffering.max.messages": queue_max_messages,
        }
        config.update(producer_config or {})
        self._producer = Producer(config)
        self._encode = event_codec().encode
        self._lock = threading.Lock()
        self._enqueued = self._delivered = self._failed = self._dropped = 0
        self._unlogged_failures = 0
        self._last_reason = ""
        self._last_failure_log = 0.0
        self._closed = threading.Event()
        self._poller = threading.Thread(target=self._serve_delivery_reports, name="tidemark-sdk-poll", daemon=True)
        self._poller.start()
        atexit.register(self._close_at_exit)

    # ------------------------------------------------------------------ tracking calls
    def track(
        self,
        event_name: str,
        user_id: str | None = None,
        anonymous_id: str | None = None,
        properties: Mapping[str, Any] | None = None,
        context: Mapping[str, Any] | None = None,
        timestamp: datetime | None = None,
        message_id: uuid.UUID | str | None = None,
    ) -> uuid.UUID:
        """Queue one event for delivery and return its id (``message_id`` if given: the idempotency key).

        Raises ``ValueError`` at once when the event is invalid. Returns promptly even when
        Kafka is unreachable (see the module docstring for what happens then).
        """
        event_id, record = self._build(event_name, user_id, anonymous_id, properties, context, timestamp, message_id)
        self.send_record(record)
        return event_id

    def identify(
        self,
        user_id: str,
        anonymous_id: str | None = None,
        traits: Mapping[str, Any] | None = None,
        context: Mapping[str, Any] | None = None,
        timestamp: datetime | None = None,
        message_id: uuid.UUID | str | None = None,
    ) -> uuid.UUID:
        """Say who a user is (Segment's ``identify``): an ``identify`` event with the traits as properties.

        Pass the device's ``anonymous_id`` too when known: an event carrying both ids is what
        links the device's earlier anonymous events to the user (identity stitching).
        """
        if not user_id:
            raise ValueError("identify needs a user_id")
        return self.track("identify", user_id, anonymous_id, traits, context, timestamp, message_id)

    def page(
        self,
        path: str | None = None,
        *,
        name: str | None = None,
        title: str | None = None,
        url: str | None = None,
        referrer: str | None = None,
        user_id: str | None = None,
        anonymous_id: str | None = None,
        properties: Mapping[str, Any] | None = None,
        context: Mapping[str, Any] | None = None,
        timestamp: datetime | None = None,
        message_id: uuid.UUID | str | None = None,
    ) -> uuid.UUID:
        """Record a page view (``page_view`` with ``path``/``title``; the page also goes into ``context.page``).

        ``path`` defaults to the path of ``url``; one of them is required.
        """
        if path is None and url:
            path = urlparse(url).path or "/"
        if not path:
            raise ValueError("page needs a path or a url")
        page: dict[str, Any] = {"path": path, "title": title or name or ""}
        if url:
            page["url"] = url
        if referrer:
            page["referrer"] = referrer
        props: dict[str, Any] = {**page, **({"name": name} if name else {}), **(properties or {})}
        ctx: dict[str, Any] = {"page": page, **(context or {})}
        if referrer and "referrer" not in ctx:
            ctx["referrer"] = {"url": referrer}
        return self.track("page_view", user_id, anonymous_id, props, ctx, timestamp, message_id)

    def send(self, event: AnalyticsEvent) -> None:
        """Queue an already validated event as it is (its own id, timestamp and source).

        Raises ``ValueError`` when its encoding exceeds the event size limit.
        """
        self.send_record(event.to_avro())

    def send_record(self, record: Mapping[str, Any]) -> None:
        """Queue an event given as its Avro record (``AnalyticsEvent.to_avro()``'s shape), as it is.

        For producers that already hold validated records in bulk (the demo generator, replays):
        it skips building the pydantic model. Raises ``ValueError`` when the record does not
        encode or exceeds the event size limit.
        """
        if self._closed.is_set():
            raise RuntimeError("the tracker is closed")
        try:
            value = self._encode(dict(record))
        except (TypeError, ValueError, KeyError) as exc:  # fastavro's complaints about a bad record
            raise ValueError(f"record does not match the event schema: {exc}") from exc
        if len(value) > self.settings.max_event_bytes:
            raise ValueError(f"event is {len(value)} bytes encoded; the limit is {self.settings.max_event_bytes}")
        key = (record.get("anonymousId") or record.get("userId") or "").encode("utf-8")
        deadline = time.monotonic() + self.max_block_ms / 1000
        while True:
            try:
                self._producer.produce(self.topic, value=value, key=key, on_delivery=self._on_delivery)
                break
            except BufferError:
                # The local queue is full: serve delivery reports for a moment to make room,
                # but never hold the caller longer than max_block_ms.
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self._count_dropped()
                    return
                self._producer.poll(min(remaining, 0.01))
            except KafkaException as exc:  # the producer is in a fatal state; the caller is not at fault
                self._count_failed(str(exc))
                return
        with self._lock:
            self._enqueued += 1
        _ENQUEUED.inc()

    # ------------------------------------------------------------------ lifecycle
    def flush(self, timeout: float = 10.0) -> int:
        """Wait up to ``timeout`` seconds for queued events to be delivered; return how many are still not."""
        return int(self._producer.flush(timeout))

    def close(self, timeout: float | None = None) -> int:
        """Flush (up to ``timeout``, default ``close_timeout``), stop the background thread, release the producer.

        Events still undelivered after the timeout are purged and counted as failed; their
        number is returned. Closing twice is harmless.
        """
        if self._closed.is_set():
            return 0
        left = self.flush(self.close_timeout if timeout is None else timeout)
        self._closed.set()
        self._poller.join()
        if left:
            self._producer.purge()
            self._producer.flush(0)  # serve the purge reports so they are counted as failures
            log.warning("Tracker closed with %d events undelivered (counted as failed)", left)
        self._log_failures(force=True)
        atexit.unregister(self._close_at_exit)
        return left

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ counters
    @property
    def stats(self) -> TrackerStats:
        """A consistent snapshot of the counters."""
        with self._lock:
            return TrackerStats(self._enqueued, self._delivered, self._failed, self._dropped)

    @property
    def delivered(self) -> int:
        """Events the broker acknowledged."""
        return self.stats.delivered

    @property
    def failed(self) -> int:
        """Events whose delivery failed (after the producer's retries) or that were purged on close."""
        return self.stats.failed

    @property
    def dropped(self) -> int:
        """Events dropped because the local queue stayed full for ``max_block_ms``."""
        return self.stats.dropped

    # ------------------------------------------------------------------ internals
    def _build(
        self,
        event_name: str,
        user_id: str | None,
        anonymous_id: str | None,
        properties: Mapping[str, Any] | None,
        context: Mapping[str, Any] | None,
        timestamp: datetime | None,
        message_id: uuid.UUID | str | None,
    ) -> tuple[uuid.UUID, dict[str, Any]]:
        """Validate the call's arguments with ``AnalyticsEvent`` and return (id, Avro record)."""
        try:
            event_id = message_id if isinstance(message_id, uuid.UUID) else uuid.UUID(message_id or uuid.uuid4().hex)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"message_id {message_id!r} is not a UUID") from exc
        props = _mapping(properties, "properties")
        ctx = _mapping(context, "context")
        ctx.setdefault("library", LIBRARY)
        # Serialised once, here: this both proves the values are JSON and is the text the wire carries.
        props_text = _json_text(props, "properties")
        ctx_text = _json_text(ctx, "context")
        now = now_millis()
        try:
            event = AnalyticsEvent(
                id=event_id,
                eventType=event_type_for(event_name),
                eventName=event_name,
                userId=user_id,
                anonymousId=anonymous_id,
                sessionId=None,
                properties=props,
                context=ctx,
                timestamp=now if timestamp is None else timestamp,
                receivedAt=now,
                source=self.source,
            )
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'event'}: {e['msg']}" for e in exc.errors())
            raise ValueError(f"invalid event {event_name!r}: {problems}") from exc
        # event.to_avro() with the JSON texts made above (it would serialise both objects again).
        record = {
            "id": str(event.id),
            "eventType": event.event_type.value,
            "eventName": event.event_name,
            "userId": event.user_id,
            "anonymousId": event.anonymous_id,
            "sessionId": None,
            "properties": props_text,
            "context": ctx_text,
            "timestamp": _millis(event.timestamp),
            "receivedAt": _millis(now),
            "source": self.source,
        }
        return event.id, record

    def _serve_delivery_reports(self) -> None:
        while not self._closed.is_set():
            self._producer.poll(0.1)

    def _on_delivery(self, err: KafkaError | None, _msg: Message) -> None:
        if err is None:
            with self._lock:
                self._delivered += 1
            _DELIVERED.inc()
        else:
            self._count_failed(f"{err.name()}: {err.str()}")

    def _count_failed(self, reason: str) -> None:
        with self._lock:
            self._failed += 1
            self._unlogged_failures += 1
            self._last_reason = reason
        _FAILED.inc()
        self._log_failures()

    def _count_dropped(self) -> None:
        with self._lock:
            self._dropped += 1
            dropped = self._dropped
        _DROPPED.inc()
        if dropped == 1 or dropped % 1000 == 0:
            log.warning("Tracker dropped %d events so far: the producer queue stayed full (is Kafka up?)", dropped)

    def _log_failures(self, force: bool = False) -> None:
        # One line every few seconds at most: a broker outage fails thousands of records at once.
        with self._lock:
            now = time.monotonic()
            if not self._unlogged_failures or (
                not force and now - self._last_failure_log < FAILURE_LOG_INTERVAL_SECONDS
            ):
                return
            count, self._unlogged_failures, self._last_failure_log = self._unlogged_failures, 0, now
            reason = self._last_reason
        log.warning("Tracker: %d event deliveries failed (last error: %s)", count, reason)

    def _close_at_exit(self) -> None:
        try:
            self.close()
        except Exception:  # never let analytics break interpreter shutdown
            log.exception("Tracker flush at exit failed")


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, set | frozenset):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _mapping(value: Mapping[str, Any] | None, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"{what} must be a mapping, not {type(value).__name__}")
    return dict(value)


def _json_text(value: dict[str, Any], what: str) -> str:
    """``value`` as compact JSON text (dates as ISO text, decimals as numbers); ValueError if impossible."""
    try:
        return json.dumps(value, default=_json_default, allow_nan=False, separators=(",", ":"), ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} are not JSON: {exc}") from exc


def _millis(moment: datetime) -> int:
    # The same arithmetic as AnalyticsEvent.to_avro, so both paths put identical bytes on the wire.
    return int(moment.timestamp()) * 1000 + moment.microsecond // 1000
