"""The metrics agent: ``metrics.partials`` → one ``MetricSnapshot`` per window on topic ``metrics``.

Partials of one series (from every partition of ``events.raw``) are published to one
partition of ``metrics.partials`` -- its *lane* (:func:`~streams.windows.series_lane`) --
so they meet in one instance of this agent, which keeps one
:class:`~streams.windows.SnapshotMerger` per lane: the latest partial of each source
partition per window, merged and published. When a lane's slowest source partition has
passed a window's end plus the grace period, the window is published once more marked
``final`` (:meth:`~streams.windows.SnapshotMerger.finalize`). Everything a lane publishes
goes to one partition of ``metrics`` (:func:`snapshot_partition`), in order, so a consumer
that sees a lane's final snapshot up to some end has seen every earlier one of that lane.

Its state is written through to a Faust table (one entry per window and source partition,
plus a small index per window), so a restarted worker rebuilds it from the changelog.
Replacing makes a replayed partial harmless.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import MutableMapping
from datetime import timedelta
from typing import Any

import orjson
from prometheus_client import Counter

from schemas.streams import metric_snapshot_codec
from streams.agents.events import window_key_text
from streams.aggregators import MetricAggregator, decode_state
from streams.periods import Period
from streams.windows import DEFAULT_GRACE, MetricPartial, MetricValue, SnapshotMerger

log = logging.getLogger(__name__)

SNAPSHOTS_PUBLISHED = Counter("tidemark_stream_snapshots_total", "Metric snapshots published.")
FINAL_SNAPSHOTS = Counter(
    "tidemark_stream_final_snapshots_total", "Metric snapshots published as final (window complete)."
)
EVICT_EVERY_PARTIALS = 20_000

LATE_PARTIALS = Counter("tidemark_stream_late_partials_total", "Partials for windows already evicted.")


def decode_partial(record: dict[str, Any]) -> MetricPartial:
    """A :class:`MetricPartial` from its ``metric_partial.avsc`` record."""
    return MetricPartial(
        metric=record["metric"],
        period=Period(record["period"]),
        period_start=record["periodStart"],
        period_end=record["periodEnd"],
        dimension=record["dimension"],
        dimension_value=record["dimensionValue"],
        partition=record["partition"],
        watermark=record["watermark"],
        state=decode_state(orjson.loads(record["state"])),
    )


def snapshot_partition(lane: int, metrics_partitions: int) -> int:
    """The partition of ``metrics`` a lane publishes to: always the same one, so its snapshots stay in order."""
    return lane % metrics_partitions


class MetricsAgent:
    """Stage two: merges partials per lane and publishes snapshots; ``store`` persists what it merged.

    ``publish_snapshot(key, value, lane)`` sends one snapshot (the lane picks its partition).
    A window's final snapshot goes out as soon as it is complete; provisional values are
    collected and go out at :meth:`publish_changed`.
    """

    def __init__(
        self,
        aggregators: dict[str, MetricAggregator],
        publish_snapshot: Any,
        store: MutableMapping[str, bytes] | None = None,
        source_partitions: int | None = None,
        grace: timedelta = DEFAULT_GRACE,
    ) -> None:
        self.aggregators = aggregators
        self.source_partitions = source_partitions
        self.grace = grace
        self.mergers: dict[int, SnapshotMerger] = {}
        self.publish_snapshot = publish_snapshot
        self.store = store if store is not None else {}
        self._codec = metric_snapshot_codec()
        self._since_evict = 0
        self._indexed: dict[Any, int] = {}
        self.unacked: list[Any] = []
        self.changed: dict[tuple[int, Any], MetricValue] = {}  # (lane, window) -> latest provisional value

    def merger(self, lane: int) -> SnapshotMerger:
        """The merger of one lane (partition of ``metrics.partials``)."""
        merger = self.mergers.get(lane)
        if merger is None:
            merger = self.mergers[lane] = SnapshotMerger(
                self.aggregators, source_partitions=self.source_partitions, grace=self.grace
            )
        return merger

    def on_partial(self, key: str, record: dict[str, Any], lane: int = 0) -> None:
        """Take one partial from ``lane``; publish the window's merged snapshot, then any window it completed."""
        merger = self.merger(lane)
        if record["metric"] not in self.aggregators:
            # A watermark record (metric ""), or a metric removed from the catalogue since: its
            # source partition's progress still counts.
            merger.note_watermark(record["partition"], record["watermark"])
            self._publish_finals(merger, lane)
            return
        partial = decode_partial(record)
        wkey = partial.window_key
        if wkey not in merger.parts:
            self._load(merger, key, partial)
        late_before = merger.late_partials
        value = merger.add(partial)
        if merger.late_partials != late_before:
            LATE_PARTIALS.inc()
            return
        # Write through: this partition's state of the window, and (when it grows) the window's index.
        self.store[f"{key}#{partial.partition}"] = record["state"].encode()
        if len(merger.parts[wkey]) != self._indexed.get(wkey):
            self._indexed[wkey] = len(merger.parts[wkey])
            self.store[key] = json.dumps(
                {"end": partial.period_end, "partitions": sorted(merger.parts[wkey])}
            ).encode()
        self._since_evict += 1
        if self._since_evict >= EVICT_EVERY_PARTIALS:
            # Here, not on a timer: a Faust table can only be changed while handling a message.
            self._since_evict = 0
            self.evict()
        if value is not None:
            self.changed[(lane, wkey)] = value
        self._publish_finals(merger, lane)

    def _publish_finals(self, merger: SnapshotMerger, lane: int) -> None:
        finals = merger.finalize()
        if finals:
            computed_at = int(time.time() * 1000)
            for final in finals:
                self.changed.pop((lane, final.window_key), None)  # the final value supersedes it
                self._publish(final, computed_at, lane)

    def publish_changed(self) -> int:
        """Publish the latest value of every window changed since the last call and not final yet.

        Called on the flush timer, before the consumed partials are acknowledged. A window
        gets one partial per source partition per flush of theirs; publishing on every one
        would send the same window many times a second (while a backlog is caught up, most
        windows would go out six times provisional and once final).
        """
        changed, self.changed = self.changed, {}
        computed_at = int(time.time() * 1000)
        for (lane, _wkey), value in changed.items():
            self._publish(value, computed_at, lane)
        return len(changed)

    def _publish(self, value: MetricValue, computed_at: int, lane: int) -> None:
        dimension, dimension_value = next(iter(value.dimensions.items()), ("", ""))
        key = window_key_text(value.metric, dimension, dimension_value, value.period.value, value.period_start)
        self.publish_snapshot(key.encode(), self._codec.encode(value.to_avro(computed_at)), lane)
        SNAPSHOTS_PUBLISHED.inc()
        if value.final:
            FINAL_SNAPSHOTS.inc()

    def _load(self, merger: SnapshotMerger, key: str, partial: MetricPartial) -> None:
        # After a restart the merger is empty but the table has the window's other partials.
        index = self.store.get(key)
        if not index:
            return
        entry = json.loads(index)
        states = {}
        for source in entry["partitions"]:
            state = self.store.get(f"{key}#{source}")
            if state is not None:
                states[int(source)] = decode_state(orjson.loads(state))
        merger.restore_window(partial.window_key, entry["end"], states)

    def evict(self) -> int:
        """Forget windows long closed (memory and table)."""
        dropped = 0
        for merger in self.mergers.values():
            before = dict(merger.parts)
            evicted = merger.evict()
            if not evicted:
                continue
            dropped += evicted
            for wkey, parts in before.items():
                if wkey in merger.parts:
                    continue
                metric, dim, value, period, start = wkey
                key = window_key_text(metric, dim, value, period.value, start)
                for source in parts:
                    self.store.pop(f"{key}#{source}", None)
                self.store.pop(key, None)
                self._indexed.pop(wkey, None)
        if dropped:
            log.info("Evicted %d merged windows", dropped)
        return dropped
