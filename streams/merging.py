"""Stage two of the metric windows: every source partition's partials of a window merged into its value.

A window's events are spread over every partition of ``events.raw``; each partition's
owner publishes its own aggregate of the window (a :class:`~streams.windows.MetricPartial`,
its full value, never a delta). A :class:`SnapshotMerger` keeps the latest partial of each
source partition per window and merges them into the window's value, a
:class:`~streams.windows.MetricValue`. One merger serves one *lane* of
``metrics.partials`` (:func:`~streams.windows.series_lane`): every window of a series meets
in one lane.

Completeness: a source partition announces how far it has got (its watermark) after the
partials of each flush. Once every source's announced watermark has passed a window's end
plus the grace period, every partial of the window is in, and :meth:`SnapshotMerger.finalize`
returns it once more, marked ``final`` (see :mod:`streams.windows`, "Completeness").

Memory: a window of an event metric is complete for good once final -- no source sends it
again, but for a replay after a crash, which re-sends values the merger already has -- so it
is dropped then, and a partial for a window already finalised is counted in
``late_partials`` and ignored (it cannot improve a complete value; merged alone it would
replace that value with one partition's fragment). Session metrics are the exception: a
source keeps their windows open while a session that started in them is open, so they may
change after their final snapshot; they are kept until ``evict_after`` behind the slowest
source.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

import orjson

from streams.aggregators import MetricAggregator, decode_state, encode_state, merged_value
from streams.catalogue import Source
from streams.periods import Period
from streams.windows import DEFAULT_GRACE, MetricPartial, MetricValue, WindowKey

NEVER = -(1 << 62)


class SnapshotMerger:
    """Merges the partials of every source partition into one value per window (one lane's state).

    >>> from streams.aggregators import CountAccumulator, compile_catalogue
    >>> from streams.catalogue import CATALOGUE
    >>> merger = SnapshotMerger(compile_catalogue(CATALOGUE, ["signups"]), source_partitions=2,
    ...                         grace=timedelta(0))
    >>> def count(n):
    ...     acc = CountAccumulator(); acc.n = n; return acc
    >>> window = ("signups", "", "", Period.hour, 0)
    >>> merger.put(window, 3_600_000, source=0, state=count(2)), merger.put(window, 3_600_000, 1, count(3))
    (True, True)
    >>> merger.value(window).value
    5.0
    >>> merger.note_watermark(0, 3_600_000); merger.finalize()  # partition 1 has not got there yet
    []
    >>> merger.note_watermark(1, 3_700_000); [(v.value, v.final) for v in merger.finalize()]
    [(5.0, True)]
    >>> merger.put(window, 3_600_000, 1, count(3)), merger.late_partials  # a replay: already complete
    (False, 1)
    """

    def __init__(
        self,
        aggregators: Mapping[str, MetricAggregator],
        evict_after: timedelta = timedelta(days=2),
        source_partitions: int | None = None,
        grace: timedelta = DEFAULT_GRACE,
    ) -> None:
        self.aggregators = dict(aggregators)
        self.source_partitions = source_partitions
        self.evict_after_ms = int(evict_after.total_seconds() * 1000)
        self.grace_ms = int(grace.total_seconds() * 1000)
        self.parts: dict[WindowKey, dict[int, Any]] = {}
        # The JSON each part came as (what a checkpoint stores again without re-encoding it).
        self.texts: dict[WindowKey, dict[int, bytes]] = {}
        self.ends: dict[WindowKey, int] = {}
        self.partition_watermarks: dict[int, int] = {}
        self.evicted_through = NEVER  # windows ending at or before this were dropped
        self.final_through = NEVER  # windows ending at or before this were published final
        self._by_end: list[tuple[int, int, WindowKey]] = []  # heap of windows not yet final
        self._kept_after_final = {name for name, agg in self.aggregators.items() if agg.source is Source.sessions}
        self.late_partials = 0

    @property
    def watermark(self) -> int:
        """The slowest source partition's watermark: no window ending later can be complete yet.

        With ``source_partitions`` known, a partition not heard from yet holds it at 0.
        """
        if self.source_partitions is not None and len(self.partition_watermarks) < self.source_partitions:
            return 0
        return min(self.partition_watermarks.values(), default=0)

    def note_watermark(self, partition: int, watermark: int) -> None:
        """Record a source partition's progress (announced after its partials of a flush)."""
        if watermark > self.partition_watermarks.get(partition, -1):
            self.partition_watermarks[partition] = watermark

    def put(self, wkey: WindowKey, end: int, source: int, state: Any, text: bytes | None = None) -> bool:
        """Keep ``source``'s partial of a window (replacing its previous one); False if it came too late.

        ``text`` is the partial's JSON as received, kept for checkpoints. Nothing is merged
        here: :meth:`value` merges a window's parts when its value is wanted.
        """
        parts = self.parts.get(wkey)
        if parts is None:
            kept = wkey[0] in self._kept_after_final
            if end <= self.evicted_through or (not kept and end <= self.final_through):
                self.late_partials += 1
                return False
            parts = self.parts[wkey] = {}
            self.ends[wkey] = end
            if end > self.final_through:
                heapq.heappush(self._by_end, (end, wkey[4], wkey))
        parts[source] = state
        if text is not None:
            self.texts.setdefault(wkey, {})[source] = text
        else:
            texts = self.texts.get(wkey)
            if texts is not None:
                texts.pop(source, None)
        return True

    def add(self, partial: MetricPartial) -> MetricValue | None:
        """Take one partial (its watermark noted too); return the window's merged value (None if undefined)."""
        self.note_watermark(partial.partition, partial.watermark)
        wkey = partial.window_key
        if not self.put(wkey, partial.period_end, partial.partition, partial.state):
            return None
        return self.value(wkey)

    def value(self, wkey: WindowKey, final: bool = False) -> MetricValue | None:
        """The window's value merged from every part it has (None when undefined, or not held)."""
        parts = self.parts.get(wkey)
        if parts is None:
            return None
        metric, dimension, dimension_value, period, start = wkey
        value = merged_value(self.aggregators[metric].new_partial(), list(parts.values()))
        if value is None:
            return None
        dims = {dimension: dimension_value} if dimension else {}
        return MetricValue(metric, period, start, self.ends[wkey], dims, value, final)

    def finalize(self) -> list[MetricValue]:
        """The windows that became complete since the last call, marked ``final``, in order of their end.

        Complete: every source partition's watermark (as seen by this merger) passed the
        window's end plus the grace period. Each window is returned once (after a restore
        from a checkpoint, a window may come a second time: a consumer ignores a period it
        already judged). A window whose value is undefined (a ratio over nothing) is skipped.
        Windows of event metrics are dropped once final (see the module's docstring).
        """
        horizon = self.watermark - self.grace_ms
        if horizon <= self.final_through:
            return []
        self.final_through = horizon
        done: list[MetricValue] = []
        heap = self._by_end
        while heap and heap[0][0] <= horizon:
            _end, _start, wkey = heapq.heappop(heap)
            if wkey in self.parts:  # not evicted meanwhile
                value = self.value(wkey, final=True)
                if value is not None:
                    done.append(value)
                if wkey[0] not in self._kept_after_final:
                    self._drop(wkey)
        return done

    def evict(self) -> int:
        """Drop windows that ended ``evict_after`` before the slowest partition's watermark."""
        horizon = self.watermark - self.evict_after_ms
        old = [k for k, end in self.ends.items() if end <= horizon]
        self.evicted_through = max(self.evicted_through, horizon)
        for key in old:
            self._drop(key)
        return len(old)

    def _drop(self, wkey: WindowKey) -> None:
        del self.parts[wkey]
        del self.ends[wkey]
        self.texts.pop(wkey, None)

    def to_document(self) -> dict[str, Any]:
        """Everything needed to resume, as JSON-able data (parts that came as JSON are embedded as they came)."""
        windows = []
        for wkey, parts in self.parts.items():
            texts = self.texts.get(wkey, {})
            encoded = [
                [source, orjson.Fragment(texts[source]) if source in texts else encode_state(state)]
                for source, state in parts.items()
            ]
            metric, dimension, value, period, start = wkey
            windows.append([metric, dimension, value, period.value, start, self.ends[wkey], encoded])
        return {
            "watermarks": [[p, w] for p, w in self.partition_watermarks.items()],
            "evicted_through": self.evicted_through,
            "final_through": self.final_through,
            "late_partials": self.late_partials,
            "windows": windows,
        }

    def restore_document(self, document: Mapping[str, Any]) -> None:
        """Resume from :meth:`to_document` (windows of metrics no longer in the catalogue are dropped)."""
        self.partition_watermarks = {int(p): int(w) for p, w in document["watermarks"]}
        self.evicted_through = int(document["evicted_through"])
        self.final_through = int(document["final_through"])
        self.late_partials = int(document["late_partials"])
        self.parts, self.texts, self.ends, self._by_end = {}, {}, {}, []
        for metric, dimension, value, period, start, end, encoded in document["windows"]:
            if metric not in self.aggregators:
                continue
            wkey = (metric, dimension, value, Period(period), int(start))
            self.parts[wkey] = {int(source): decode_state(state) for source, state in encoded}
            self.ends[wkey] = int(end)
            if int(end) > self.final_through:
                self._by_end.append((int(end), int(start), wkey))
        heapq.heapify(self._by_end)
