"""Drives the stream processors in-process (no Kafka): partitions by device like ``events.raw``, two stages."""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from datetime import timedelta

from schemas.models import AnalyticsEvent
from streams.aggregators import compile_catalogue
from streams.catalogue import CATALOGUE, Catalogue
from streams.events import StreamEvent
from streams.merging import SnapshotMerger
from streams.periods import PeriodCalendar
from streams.processor import PartitionProcessor
from streams.sketches import DEFAULT_EXACT_LIMIT


class LocalPipeline:
    """``partitions`` partition processors feeding one snapshot merger; ``snapshots`` holds the latest values."""

    def __init__(
        self,
        catalogue: Catalogue = CATALOGUE,
        tz: str = "UTC",
        partitions: int = 3,
        grace: timedelta = timedelta(minutes=5),
        names: Iterable[str] | None = None,
        exact_limit: int = DEFAULT_EXACT_LIMIT,
    ) -> None:
        self.calendar = PeriodCalendar(tz)
        self.aggregators = compile_catalogue(catalogue, names, exact_limit)
        self.grace = grace
        self.processors = [self.new_processor(p) for p in range(partitions)]
        self.offsets = [0] * partitions
        self.merger = SnapshotMerger(self.aggregators)
        self.snapshots: dict[tuple[str, str, int, str], float] = {}
        self.sessions: dict[str, object] = {}

    def new_processor(self, partition: int) -> PartitionProcessor:
        """A fresh processor for ``partition``."""
        return PartitionProcessor(partition, self.aggregators, self.calendar, grace=self.grace)

    def partition_of(self, event: StreamEvent) -> int:
        """The partition ``events.raw`` would put the event in (stable hash of the device id)."""
        return zlib.crc32(event.device_id.encode()) % len(self.processors)

    def log(self, events: Iterable[AnalyticsEvent]) -> list[tuple[int, int, StreamEvent]]:
        """(partition, offset, event) of each event, in order, as ``events.raw`` would hold them after what was fed."""
        offsets, log = list(self.offsets), []
        for model in events:
            event = StreamEvent.from_model(model)
            p = self.partition_of(event)
            log.append((p, offsets[p], event))
            offsets[p] += 1
        return log

    def feed(self, events: Iterable[AnalyticsEvent], flush_every: int = 50) -> list[tuple[int, int, StreamEvent]]:
        """Process events in order; returns (partition, offset, event) as a log, for replays."""
        log = self.log(events)
        for i, (p, offset, event) in enumerate(log, 1):
            self.offsets[p] = offset + 1
            self.processors[p].process(event, offset)
            if i % flush_every == 0:
                self.flush()
        self.flush()
        return log

    def flush(self, now: float | None = None) -> None:
        """Flush every partition and merge what they publish (``now``: see :meth:`WindowedMetrics.flush`)."""
        for processor in self.processors:
            self.publish(processor, now)

    def publish(self, processor: PartitionProcessor, now: float | None = None) -> None:
        """Flush one partition and apply its outputs downstream (latest value wins)."""
        result = processor.flush(now)
        for session in result.sessions:
            self.sessions[session.session_id] = session
        for partial in result.partials:
            snapshot = self.merger.add(partial)
            if snapshot is not None:
                self.snapshots[snapshot.key] = snapshot.value
