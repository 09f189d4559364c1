"""The metrics agent: ``metrics.partials`` → one ``MetricSnapshot`` per window on topic ``metrics``.

Partials of one window (from every partition of ``events.raw``) share a key, so they meet
in one partition of ``metrics.partials`` and one instance of this agent, which keeps the
latest partial of each source partition (:class:`~streams.windows.SnapshotMerger`) and
publishes the merged value. Its state is written through to a Faust table (one entry per
window and source partition, plus a small index per window), so a restarted worker
rebuilds it from the changelog. Replacing makes a replayed partial harmless.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import MutableMapping
from typing import Any

import orjson
from prometheus_client import Counter

from schemas.streams import metric_snapshot_codec
from streams.aggregators import MetricAggregator, decode_state
from streams.periods import Period
from streams.windows import MetricPartial, SnapshotMerger

log = logging.getLogger(__name__)

SNAPSHOTS_PUBLISHED = Counter("tidemark_stream_snapshots_total", "Metric snapshots published.")
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


class MetricsAgent:
    """Stage two: merges partials and publishes snapshots; ``store`` persists what it merged."""

    def __init__(
        self,
        aggregators: dict[str, MetricAggregator],
        publish_snapshot: Any,
        store: MutableMapping[str, bytes] | None = None,
        source_partitions: int | None = None,
    ) -> None:
        self.merger = SnapshotMerger(aggregators, source_partitions=source_partitions)
        self.publish_snapshot = publish_snapshot
        self.store = store if store is not None else {}
        self._codec = metric_snapshot_codec()
        self._since_evict = 0
        self._indexed: dict[Any, int] = {}
        self.unacked: list[Any] = []

    def on_partial(self, key: str, record: dict[str, Any]) -> None:
        """Take one partial; publish the window's merged snapshot."""
        if record["metric"] not in self.merger.aggregators:
            return  # a metric removed from the catalogue since the partial was written
        partial = decode_partial(record)
        wkey = partial.window_key
        if wkey not in self.merger.parts:
            self._load(key, partial)
        late_before = self.merger.late_partials
        value = self.merger.add(partial)
        if self.merger.late_partials != late_before:
            LATE_PARTIALS.inc()
            return
        # Write through: this partition's state of the window, and (when it grows) the window's index.
        self.store[f"{key}#{partial.partition}"] = record["state"].encode()
        if len(self.merger.parts[wkey]) != self._indexed.get(wkey):
            self._indexed[wkey] = len(self.merger.parts[wkey])
            self.store[key] = json.dumps(
                {"end": partial.period_end, "partitions": sorted(self.merger.parts[wkey])}
            ).encode()
        self._since_evict += 1
        if self._since_evict >= EVICT_EVERY_PARTIALS:
            # Here, not on a timer: a Faust table can only be changed while handling a message.
            self._since_evict = 0
            self.evict()
        if value is not None:
            computed_at = int(time.time() * 1000)
            self.publish_snapshot(key.encode(), self._codec.encode(value.to_avro(computed_at)))
            SNAPSHOTS_PUBLISHED.inc()

    def _load(self, key: str, partial: MetricPartial) -> None:
        # After a restart the merger is empty but the table has the window's other partials.
        index = self.store.get(key)
        if not index:
            return
        entry = json.loads(index)
        parts = self.merger.parts.setdefault(partial.window_key, {})
        for source in entry["partitions"]:
            state = self.store.get(f"{key}#{source}")
            if state is not None:
                parts[int(source)] = decode_state(orjson.loads(state))
        self.merger.ends[partial.window_key] = entry["end"]

    def evict(self) -> int:
        """Forget windows long closed (memory and table)."""
        before = dict(self.merger.parts)
        dropped = self.merger.evict()
        if dropped:
            from streams.agents.events import window_key_text

            for wkey, parts in before.items():
                if wkey in self.merger.parts:
                    continue
                metric, dim, value, period, start = wkey
                key = window_key_text(metric, dim, value, period.value, start)
                for source in parts:
                    self.store.pop(f"{key}#{source}", None)
                self.store.pop(key, None)
                self._indexed.pop(wkey, None)
            log.info("Evicted %d merged windows", dropped)
        return dropped
