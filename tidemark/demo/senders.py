"""Where demo traffic goes: straight into Kafka through the SDK, or through the HTTP collector.

Both senders take events as Avro-shaped records (``AnalyticsEvent.to_avro()``, or the demo's
fast :func:`~tidemark.demo.traffic.generate_records`) one at a time (``send``), can be
nudged while the stream is idle (``tick``, which ships a partial batch), and report what
happened in :class:`SenderCounts`. ``close`` delivers what is pending.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Protocol

import httpx

from tidemark.demo.traffic import EPOCH
from tidemark.settings import Settings
from tidemark.tracker import Tracker

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SenderCounts:
    """What a sender did so far: handed over, confirmed by the receiver, refused, lost."""

    sent: int
    accepted: int
    rejected: int
    failed: int


class EventSender(Protocol):
    """Something demo events can be sent to."""

    def send(self, record: dict[str, Any]) -> None:
        """Hand over one event record (may be buffered)."""

    def tick(self) -> None:
        """Ship whatever is buffered (called while the stream waits for the clock)."""

    def counts(self) -> SenderCounts:
        """What happened to the events so far."""

    def close(self) -> None:
        """Deliver what is pending and release connections."""


class KafkaSender:
    """Sends through the SDK :class:`~tidemark.tracker.Tracker` to ``events.raw`` (ids and times kept)."""

    def __init__(self, settings: Settings) -> None:
        # A backfill produces far faster than the broker acknowledges: let the demo wait for room
        # (it has no user to keep waiting) rather than drop events as an application would.
        self.tracker = Tracker(settings=settings, source="demo", max_block_ms=30_000, linger_ms=50)
        self._sent = 0

    def send(self, record: dict[str, Any]) -> None:
        """Queue the record on the SDK's producer."""
        self.tracker.send_record(record)
        self._sent += 1

    def tick(self) -> None:
        """Nothing to do: the producer batches and sends on its own."""

    def counts(self) -> SenderCounts:
        """Delivered = acknowledged by the broker; failed includes events dropped on a full queue."""
        stats = self.tracker.stats
        return SenderCounts(self._sent, stats.delivered, 0, stats.failed + stats.dropped)

    def close(self) -> None:
        """Flush (up to 30 s) and close the tracker."""
        self.tracker.close(timeout=30)


def to_segment_message(record: dict[str, Any]) -> dict[str, Any]:
    """The Segment HTTP API message that the collector maps back to the event ``record``.

    page views become ``page`` messages, ``identify`` an identify message with the
    properties as traits, anything else a ``track`` message; ``messageId`` carries the id.
    """
    moment = record["timestamp"]
    if isinstance(moment, int):
        moment = EPOCH + timedelta(milliseconds=moment)
    properties = json.loads(record["properties"])
    message: dict[str, Any] = {
        "messageId": record["id"],
        "timestamp": moment.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "context": json.loads(record["context"]),
    }
    for field in ("userId", "anonymousId", "sessionId"):
        if record.get(field):
            message[field] = record[field]
    if record["eventName"] == "page_view":
        message.update(type="page", properties=properties)
    elif record["eventName"] == "identify":
        message.update(type="identify", traits=properties)
    else:
        message.update(type="track", event=record["eventName"], properties=properties)
    return message


class CollectorSender:
    """Posts events to the collector's ``/v1/batch`` in batches, retrying 429/5xx and network errors."""

    def __init__(
        self,
        url: str,
        write_key: str,
        batch_size: int = 100,
        timeout: float = 30.0,
        max_attempts: int = 6,
        client: httpx.Client | None = None,
    ) -> None:
        self.client = client or httpx.Client(base_url=url.rstrip("/"), auth=(write_key, ""), timeout=timeout)
        self.batch_size = batch_size
        self.max_attempts = max_attempts
        self._batch: list[dict[str, Any]] = []
        self._sent = self._accepted = self._rejected = self._failed = 0

    def send(self, record: dict[str, Any]) -> None:
        """Buffer the event; post when the batch is full."""
        self._batch.append(to_segment_message(record))
        self._sent += 1
        if len(self._batch) >= self.batch_size:
            self._post()

    def tick(self) -> None:
        """Post a partial batch."""
        if self._batch:
            self._post()

    def counts(self) -> SenderCounts:
        """Accepted/rejected as the collector answered; failed = batches given up after retries."""
        return SenderCounts(self._sent, self._accepted, self._rejected, self._failed)

    def close(self) -> None:
        """Post what is buffered and close the connection pool."""
        self.tick()
        self.client.close()

    def _post(self) -> None:
        batch, self._batch = self._batch, []
        delay = 0.5
        for attempt in range(1, self.max_attempts + 1):
            try:
                response = self.client.post("/v1/batch", json={"batch": batch})
            except httpx.TransportError as exc:
                problem = f"{type(exc).__name__}: {exc}"
            else:
                if response.status_code == 200:
                    answer = response.json()
                    self._accepted += int(answer.get("accepted", 0))
                    self._rejected += int(answer.get("rejected", 0))
                    if answer.get("rejected"):
                        log.warning("Collector dead-lettered %d items: %s", answer["rejected"], answer.get("errors"))
                    return
                if response.status_code != 429 and response.status_code < 500:
                    # The request itself was refused (bad key, too large, ...): retrying will not help.
                    self._rejected += len(batch)
                    log.error("Collector refused a batch of %d: %s %s", len(batch), response.status_code, response.text)
                    return
                problem = f"HTTP {response.status_code}"
            if attempt < self.max_attempts:
                log.warning("Posting a batch failed (%s); retry %d in %.1fs", problem, attempt, delay)
                time.sleep(delay)
                delay = min(delay * 2, 10.0)
        self._failed += len(batch)
        log.error("Gave up on a batch of %d events after %d attempts", len(batch), self.max_attempts)
