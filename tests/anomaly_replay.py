"""Demo traffic through the stream processors and the anomaly agent in-process (no Kafka).

:class:`AnomalyReplay` runs what the stream worker runs -- one
:class:`~streams.processor.PartitionProcessor` per ``events.raw`` partition (events routed by
device, as the collector keys them), the :class:`~streams.merging.SnapshotMerger` of the
metrics agent, and the :class:`~streams.agents.anomalies.AnomalyAgent` with the detector
bank its settings describe -- on event time. It flushes at every hour boundary of event
time, and the merger marks windows ``final`` as the worker's metrics stage does, so the
agent judges hours exactly when the worker would.

Only the windows the bank watches are computed (the catalogue trimmed to the settings'
``anomaly_periods`` and ``anomaly_dimensions``): minute, week and month windows are most
of the processing and the bank ignores them.
"""

from __future__ import annotations

import copy
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

from schemas.anomaly import Anomaly, AnomalyStatus, anomaly_codec
from schemas.streams import metric_snapshot_codec
from schemas.taxonomy import event_type_for
from streams.agents.anomalies import AnomalyAgent, additive_metrics
from streams.aggregators import compile_catalogue
from streams.anomaly.series import DetectorBank
from streams.catalogue import Catalogue, get_catalogue
from streams.events import StreamEvent
from streams.merging import SnapshotMerger
from streams.periods import Period, PeriodCalendar
from streams.processor import PartitionProcessor
from tidemark.demo.traffic import TrafficConfig, TrafficSimulator, uuid_text
from tidemark.settings import Settings
from tidemark.topics import EVENTS_RAW

HOUR_MS = 3_600_000


def demo_stream_events(config: TrafficConfig) -> Iterator[StreamEvent]:
    """The demo simulation's events as the stream processors read them off ``events.raw``.

    The same fields :meth:`StreamEvent.from_record` takes from the event's Avro record,
    without the JSON round trip of its properties and context (a long run is millions of them).
    """
    for item in TrafficSimulator(config):
        yield StreamEvent(
            event_id=uuid_text(item.event_id),
            event_name=item.name,
            event_type=event_type_for(item.name).value,
            user_id=item.user_id or "",
            anonymous_id=item.anonymous_id or "",
            ts=item.ts,
            properties=item.properties,
            context=item.context,
        )


def watched_catalogue(settings: Settings) -> Catalogue:
    """The catalogue cut down to the periods and breakdowns the anomaly settings watch."""
    periods = {Period(p) for p in settings.anomaly_periods}
    kept = []
    for definition in get_catalogue(settings.metrics_file).values():
        watched = tuple(p for p in definition.periods if p in periods)
        if definition.streaming and watched:
            dims = tuple(d for d in definition.dimensions if d in settings.anomaly_dimensions)
            kept.append(replace(definition, periods=watched, dimensions=dims))
    # A ratio needs its parts at its periods: keep ratios whose parts survived.
    names = {d.name for d in kept}
    kept = [d for d in kept if {d.numerator, d.denominator} <= names | {None}]
    return Catalogue(kept)


@dataclass
class AnomalyReplay:
    """The worker's processing of ``events.raw`` through to ``anomalies``, in-process."""

    settings: Settings
    partitions: int = EVENTS_RAW.partitions
    published: list[Anomaly] = field(default_factory=list)
    events: int = 0

    def __post_init__(self) -> None:
        catalogue = watched_catalogue(self.settings)
        aggregators = compile_catalogue(catalogue)
        calendar = PeriodCalendar(self.settings.report_timezone, self.settings.week_start)
        grace = timedelta(seconds=self.settings.stream_grace_seconds)
        self.processors = [
            PartitionProcessor(p, aggregators, calendar, grace=grace) for p in range(self.partitions)
        ]
        self.merger = SnapshotMerger(aggregators, source_partitions=self.partitions, grace=grace)
        is_additive = additive_metrics(catalogue)
        codec = anomaly_codec()
        self.agent = AnomalyAgent(
            lambda _state: DetectorBank.from_settings(self.settings, is_additive),
            publish=lambda _key, value: self.published.append(Anomaly.from_avro(codec.decode(value))),
            save_state=lambda _blob: None,
            load_state=lambda: None,
            outputs_durable=lambda: None,
            ack=lambda _message: None,
            grace_seconds=self.settings.stream_grace_seconds,
            wall_clock=lambda: 0.0,  # stream time follows the data only
        )
        self._codec = metric_snapshot_codec()
        self._next_flush: int | None = None
        self.clock_ms = 0

    def feed(self, events: Iterable[StreamEvent], until: datetime | None = None) -> None:
        """Apply events in timestamp order (only those before ``until``, when given), flushing hourly."""
        limit = None if until is None else int(until.timestamp() * 1000)
        for event in events:
            if limit is not None and event.ts >= limit:
                break
            if self._next_flush is None:
                self._next_flush = event.ts - event.ts % HOUR_MS + HOUR_MS
            while event.ts >= self._next_flush:
                self.flush(self._next_flush)
                self._next_flush += HOUR_MS
            partition = zlib.crc32(event.device_id.encode()) % self.partitions
            self.processors[partition].process(event)
            self.events += 1

    def flush(self, clock_ms: int) -> None:
        """Publish every partition's changed windows, merge them, and let the agent judge what is due."""
        self.clock_ms = clock_ms
        for processor in self.processors:
            for partial in processor.flush().partials:
                value = self.merger.add(partial)
                if value is not None:
                    self.agent.on_message(self._codec.encode(value.to_avro(clock_ms)))
            # The flush's watermark, announced after its partials (as the worker's stage one does).
            self.merger.note_watermark(processor.partition, processor.metrics.watermark)
            for final in self.merger.finalize():
                self.agent.on_message(self._codec.encode(final.to_avro(clock_ms)))
        self.merger.evict()
        self.agent.flush()  # judged as the worker judges: on final snapshots and the lane clock

    def fork(self) -> AnomalyReplay:
        """An independent copy of the whole state (to continue one history two ways)."""
        twin = copy.copy(self)
        twin.published = list(self.published)
        twin.processors = copy.deepcopy(self.processors)
        twin.merger = copy.deepcopy(self.merger)
        bank = copy.deepcopy(self.agent.bank)
        codec = anomaly_codec()
        twin.agent = AnomalyAgent(
            lambda _state: bank,
            publish=lambda _key, value: twin.published.append(Anomaly.from_avro(codec.decode(value))),
            save_state=lambda _blob: None,
            load_state=lambda: None,
            outputs_durable=lambda: None,
            ack=lambda _message: None,
            grace_seconds=self.settings.stream_grace_seconds,
            wall_clock=lambda: 0.0,
        )
        twin.agent.stream_ms = self.agent.stream_ms
        twin.agent.lane_ms = dict(self.agent.lane_ms)
        twin.agent._lane_seen_at = dict(self.agent._lane_seen_at)
        return twin

    def opened(self) -> list[Anomaly]:
        """The firing episodes published so far (the first version of each; escalations reuse its id)."""
        first: dict[object, Anomaly] = {}
        for anomaly in self.published:
            if anomaly.status is AnomalyStatus.open:
                first.setdefault(anomaly.id, anomaly)
        return list(first.values())

    def resolved(self) -> list[Anomaly]:
        """The resolved episodes published so far."""
        return [a for a in self.published if a.status is AnomalyStatus.resolved]
