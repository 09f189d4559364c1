"""The events agent: ``events.raw`` → sessions (topic ``sessions``) and per-partition metric partials.

For every partition of ``events.raw`` it holds a :class:`~streams.processor.PartitionProcessor`
(identity links, open sessions, open metric windows). Every ``stream_flush_seconds`` (or
``stream_flush_events`` events) a partition is *flushed*:

1. changed sessions are published to ``sessions`` and changed windows to
   ``metrics.partials`` (full values under a key, never deltas), and the producer is
   flushed: the outputs are durable;
2. at most every ``CHECKPOINT_EVERY_SECONDS`` (or when ``stream_flush_events`` events
   wait), the partition's whole state and the offset it reflects are written, as ONE
   message, to the checkpoint table's changelog (keyed by partition number);
3. only then are the partition's events up to the checkpoint acknowledged.

Faust commits acknowledged offsets after flushing its producer (outputs and checkpoint
durable first). So the committed offset never passes the checkpoint: after a crash the
partition restarts at or before the checkpoint, the processor restored from it skips
what it already applied and re-publishes the same values for the rest. That is the
processing guarantee: at-least-once delivery, exactly-once effect (see
:mod:`streams.app` for why not Kafka transactions).
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from typing import Any

from prometheus_client import Counter

from schemas.streams import metric_partial_codec, session_codec
from streams.aggregators import MetricAggregator, encode_state
from streams.events import StreamEvent
from streams.periods import Period, PeriodCalendar
from streams.processor import PartitionProcessor
from streams.sessions import SessionWindow
from streams.windows import MetricPartial
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

# Outputs are published at every flush; the state is checkpointed (and the events acknowledged)
# at most this often, or when ``stream_flush_events`` events wait. A crash replays since then.
CHECKPOINT_EVERY_SECONDS = 10.0

FLUSHES = Counter("tidemark_stream_flushes_total", "Partition flushes (publish + checkpoint + ack).")


def session_record(session: SessionWindow) -> dict[str, Any]:
    """The ``session.avsc`` record of a session."""
    return {
        "sessionId": session.session_id,
        "userId": session.user_id or None,
        "deviceId": session.device_id,
        "startedAt": session.started_at,
        "lastSeenAt": session.last_seen_at,
        "durationMs": session.duration_ms,
        "pageViews": session.page_views,
        "events": session.events,
        "device": session.device,
        "browser": session.browser,
        "os": session.os,
        "country": session.country,
        "referrer": session.referrer,
        "utmSource": session.utm_source,
        "utmMedium": session.utm_medium,
        "utmCampaign": session.utm_campaign,
        "closed": session.closed,
        "version": session.version,
    }


def partial_record(partial: MetricPartial) -> dict[str, Any]:
    """The ``metric_partial.avsc`` record of a partial."""
    import json

    return {
        "metric": partial.metric,
        "period": partial.period.value,
        "periodStart": partial.period_start,
        "periodEnd": partial.period_end,
        "dimension": partial.dimension,
        "dimensionValue": partial.dimension_value,
        "partition": partial.partition,
        "watermark": partial.watermark,
        "state": json.dumps(encode_state(partial.state), separators=(",", ":")),
    }


def window_key_text(metric: str, dimension: str, value: str, period: str, start: int) -> str:
    """The text key of a window on ``metrics.partials`` (all partitions' partials of a window meet)."""
    return f"{metric}|{period}|{start}|{dimension}|{value}"


class EventsAgent:
    """Stage one of the stream: per-partition state, flushed, checkpointed and acknowledged together.

    ``publish_session``, ``publish_partial`` and ``save_checkpoint`` are the three ways
    out (Faust topics and table in the worker; plain callables in the benchmark).
    """

    def __init__(
        self,
        settings: Settings,
        aggregators: dict[str, MetricAggregator],
        publish_session: Any,
        publish_partial: Any,
        save_checkpoint: Any,
        load_checkpoint: Any,
        ack: Any,
        outputs_durable: Any = lambda: None,
    ) -> None:
        from datetime import timedelta

        self.settings = settings
        self.aggregators = aggregators
        self.calendar = PeriodCalendar(settings.report_timezone, settings.week_start)
        self.grace = timedelta(seconds=settings.stream_grace_seconds)
        self.gap = timedelta(minutes=settings.session_inactivity_minutes)
        self.max_length = timedelta(minutes=settings.session_max_length_minutes)
        self.publish_session = publish_session
        self.publish_partial = publish_partial
        self.save_checkpoint = save_checkpoint
        self.load_checkpoint = load_checkpoint
        self.ack = ack
        self.outputs_durable = outputs_durable
        self.processors: dict[int, PartitionProcessor] = {}
        self.unacked: dict[int, list[Any]] = defaultdict(list)
        self.flush_events = settings.stream_flush_events
        self._late_reported: dict[int, dict[str, int]] = defaultdict(dict)
        self._replayed: dict[int, int] = defaultdict(int)
        self._checkpointed_at: dict[int, float] = {}
        # Serialising a partition's state costs milliseconds to seconds: not at every flush.
        self.checkpoint_seconds = CHECKPOINT_EVERY_SECONDS
        self._session_codec = session_codec()
        self._partial_codec = metric_partial_codec()

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
            processor.metrics.publish_every = dict(PUBLISH_EVERY)
            blob = self.load_checkpoint(partition)
            if blob:
                processor.restore(blob)
                log.info(
                    "Partition %d restored from its checkpoint at offset %d (%d open sessions, %d windows)",
                    partition, processor.applied_offset, len(processor.sessions.open), len(processor.metrics.windows),
                )
            self.processors[partition] = processor
        return processor

    def on_message(self, partition: int, offset: int, value: bytes, message: Any) -> None:
        """Apply one ``events.raw`` message; flush the partition when enough events piled up."""
        processor = self.processor(partition)
        unacked = self.unacked[partition]
        unacked.append(message)
        try:
            event = StreamEvent.decode(value)
        except Exception as exc:  # never stop the stream: the raw sink dead-letters what it cannot read
            EVENTS_SKIPPED.labels("undecodable").inc()
            log.warning("Skipping undecodable event at %d:%d: %s", partition, offset, exc)
            return
        if processor.process(event, offset):
            EVENTS_PROCESSED.inc()
        else:
            EVENTS_SKIPPED.labels("replayed").inc()
            self._replayed[partition] += 1
        if len(unacked) >= self.flush_events:
            self.flush(partition)

    def flush(self, partition: int) -> None:
        """Publish, checkpoint, then acknowledge one partition (the order is the guarantee)."""
        processor = self.processors.get(partition)
        unacked = self.unacked.get(partition)
        if processor is None or not (unacked or processor.metrics.dirty):
            return
        started = time.monotonic()
        result = processor.flush(now=started)
        for session in result.sessions:
            self.publish_session(session.device_id.encode(), self._session_codec.encode(session_record(session)))
        for partial in result.partials:
            key = window_key_text(partial.metric, partial.dimension, partial.dimension_value,
                                  partial.period.value, partial.period_start)
            self.publish_partial(key.encode(), self._partial_codec.encode(partial_record(partial)))
        due = started - self._checkpointed_at.get(partition, -1e18) >= self.checkpoint_seconds
        if not (due or len(unacked) >= self.flush_events):
            self._report_late(partition, processor)
            return  # published; checkpoint and acknowledgement wait for the next checkpoint
        self._checkpointed_at[partition] = started
        self.outputs_durable()
        self.save_checkpoint(partition, processor.checkpoint())
        count = 0
        if unacked:
            for message in unacked:
                self.ack(message)
            count = len(unacked)
            unacked.clear()
        FLUSHES.inc()
        replayed = self._replayed.pop(partition, 0)
        if replayed:
            log.info("Partition %d: skipped %d redelivered events already applied in its checkpoint",
                     partition, replayed)
        self._report_late(partition, processor)
        log.debug(
            "Flushed partition %d: %d events, %d sessions, %d partials, %d sessions expired in %.3fs",
            partition, count, len(result.sessions), len(result.partials), result.expired_sessions,
            time.monotonic() - started,
        )

    def flush_all(self) -> None:
        """Flush every partition with unacknowledged events (the periodic timer)."""
        for partition in list(self.processors):
            self.flush(partition)

    def forget(self, partitions: set[int]) -> None:
        """Partitions moved to another worker: drop their state (the new owner restores the checkpoint)."""
        for partition in partitions:
            self.processors.pop(partition, None)
            dropped = self.unacked.pop(partition, [])
            if dropped:
                log.info("Partition %d revoked: %d unacknowledged events will be replayed by its new owner",
                         partition, len(dropped))

    def _report_late(self, partition: int, processor: PartitionProcessor) -> None:
        seen = self._late_reported[partition]
        for period, count in processor.late_events.items():
            new = count - seen.get(period, 0)
            if new > 0:
                LATE_EVENTS.labels(period).inc(new)
                log.warning("Partition %d: %d events later than the %s grace (left to the batch recompute)",
                            partition, new, period)
                seen[period] = count
