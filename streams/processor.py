"""One partition's stream processing: identity stitching, sessions and metric windows together.

A :class:`PartitionProcessor` owns all the state derived from one partition of
``events.raw``: it is what a worker holds for each partition assigned to it, what it
checkpoints, and what it drops when the partition moves to another worker. Faust is not
needed to use it (tests and the benchmark drive it directly).

Exactly once in effect, with at-least-once delivery
---------------------------------------------------
The state records the offset of the last event applied (``applied_offset``). A
checkpoint (:meth:`checkpoint`) captures state and offset together, in one message.
The worker acknowledges events to Kafka only up to the offset of its latest durable
checkpoint, so after a crash the partition resumes from the checkpoint: events at or
before ``applied_offset`` are skipped (:meth:`process` returns False), later ones are
applied exactly once. Outputs (sessions, partials, snapshots) are full values under a
key, so the ones re-published after a crash replace, never add.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import lz4.frame
import orjson

from streams.aggregators import MetricAggregator
from streams.periods import PeriodCalendar
from streams.sessions import SESSION_WINDOW_FIELDS, SessionTracker, SessionWindow, session_values
from streams.windows import DEFAULT_GRACE, MetricPartial, WindowedMetrics

log = logging.getLogger(__name__)

# 2: windows shared by the metrics that hold the same data, session metrics as totals (1: per metric).
CHECKPOINT_FORMAT = 2
LZ4_FRAME_MAGIC = b"\x04\x22\x4d\x18"


@dataclass
class FlushResult:
    """What one flush publishes."""

    sessions: list[SessionWindow] = field(default_factory=list)
    partials: list[MetricPartial] = field(default_factory=list)
    expired_sessions: int = 0


class PartitionProcessor:
    """Sessions + metric windows + identity links of one source partition."""

    def __init__(
        self,
        partition: int,
        aggregators: Mapping[str, MetricAggregator],
        calendar: PeriodCalendar,
        *,
        grace: timedelta = DEFAULT_GRACE,
        session_gap: timedelta = timedelta(minutes=30),
        session_max_length: timedelta = timedelta(hours=24),
    ) -> None:
        self.partition = partition
        self.grace = grace
        self.links: dict[str, str] = {}
        self.sessions = SessionTracker(
            gap_ms=int(session_gap.total_seconds() * 1000),
            max_length_ms=int(session_max_length.total_seconds() * 1000),
            grace_ms=int(grace.total_seconds() * 1000),
        )
        self.metrics = WindowedMetrics(aggregators, calendar, grace=grace, partition=partition)
        self.applied_offset = -1
        self.events_applied = 0

    def process(self, event: Any, offset: int | None = None) -> bool:
        """Apply one event (a :class:`StreamEvent`); False when ``offset`` was applied already."""
        if offset is not None:
            if offset <= self.applied_offset:
                return False
            self.applied_offset = offset
        anonymous, user = event.anonymous_id, event.user_id
        if anonymous and user and anonymous not in self.links:
            # First time this device is tied to a person: earlier anonymous activity is theirs.
            self.links[anonymous] = user
            self.metrics.rename_person(anonymous, user, event.ts)
            self.sessions.rename_user(anonymous, user)
        event.person = user or self.links.get(anonymous, "") or anonymous
        # Metrics first: the event moves the watermark, and a new session's windows are judged by it.
        self.metrics.add(event)
        session = self.sessions.add(event, self.links.get(anonymous, "") if anonymous else "")
        if session is not None and session.events == 1:
            self.metrics.open_session(session)
        self.events_applied += 1
        return True

    def flush(self, now: float | None = None, copy: bool = True) -> FlushResult:
        """Close idle sessions, fold changed sessions into session metrics, publish changed windows.

        ``now`` (monotonic seconds) lets long periods be published less often; ``copy=False``
        hands over open windows' states uncopied, to be encoded before the next event (see
        :meth:`WindowedMetrics.flush`).
        """
        expired = self.sessions.expire(self.metrics.watermark)
        sessions = self.sessions.take_dirty()
        self.metrics.add_sessions(sessions)
        partials = self.metrics.flush(self.sessions.oldest_open_start(), now, copy)
        return FlushResult(sessions=sessions, partials=partials, expired_sessions=expired)

    @property
    def late_events(self) -> dict[str, int]:
        """Late events by period (metrics) and for sessions."""
        late = dict(self.metrics.late_events)
        if self.sessions.late_events:
            late["sessions"] = self.sessions.late_events
        return late

    def checkpoint(self) -> bytes:
        """The whole state and the offset it reflects, as one compressed (lz4 frame) JSON document.

        Call right after :meth:`flush` (nothing is pending then, so what was published and
        what is checkpointed agree).
        """
        document = {
            "format": CHECKPOINT_FORMAT,
            "partition": self.partition,
            "applied_offset": self.applied_offset,
            "events_applied": self.events_applied,
            "links": self.links,
            "metrics": self.metrics.state(),
            "session_late": self.sessions.late_events,
            # Sessions as arrays of their fields, named once: half the size of objects, and faster to write.
            "session_fields": SESSION_WINDOW_FIELDS,
            "open_sessions": [session_values(s) for s in self.sessions.open.values()],
            "dirty_sessions": [session_values(s) for s in self.sessions.dirty.values()],
        }
        return lz4.frame.compress(orjson.dumps(document))

    def restore(self, blob: bytes) -> None:
        """Resume from a :meth:`checkpoint` (windows of metrics no longer in the catalogue are dropped).

        Checkpoints of the previous format (1: windows kept per metric) still restore: their
        windows are converted to the shared windows of format 2.
        """
        # lz4 frames since checkpoints got large (zlib before: those still restore).
        raw = lz4.frame.decompress(blob) if blob[:4] == LZ4_FRAME_MAGIC else zlib.decompress(blob)
        document = orjson.loads(raw)
        version = document.get("format")
        if version not in (1, CHECKPOINT_FORMAT):
            raise ValueError(
                f"unknown checkpoint format {version!r} (this version reads formats 1 and {CHECKPOINT_FORMAT})"
            )
        self.applied_offset = document["applied_offset"]
        self.events_applied = document["events_applied"]
        self.links = dict(document["links"])
        self.sessions.late_events = document["session_late"]
        if version == 1:  # sessions as objects
            open_sessions = [SessionWindow(**s) for s in document["open_sessions"]]
            dirty_sessions = [SessionWindow(**s) for s in document["dirty_sessions"]]
        else:
            names = document["session_fields"]
            open_sessions = [SessionWindow(**dict(zip(names, s, strict=True))) for s in document["open_sessions"]]
            dirty_sessions = [SessionWindow(**dict(zip(names, s, strict=True))) for s in document["dirty_sessions"]]
        self.sessions.restore(open_sessions, dirty_sessions)
        by_id = {s.session_id: s for s in self.sessions.open.values()}
        if version == 1:
            self.metrics.restore_format_1(document, [*self.sessions.dirty.values(), *by_id.values()])
        else:
            self.metrics.restore(document["metrics"], by_id)
