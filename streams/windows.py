"""Tumbling metric windows on event time, with a named grace period and late-event accounting.

Two stages, because a window's events are spread over every partition of ``events.raw``:

1. :class:`WindowedMetrics` runs per source partition. Each event is folded into a
   pending accumulator of its (metric, dimension value, minute); on :meth:`flush` the
   pending minutes are merged into the minute, hour, day, week and month windows each
   metric is reported at (week and month are thereby derived from the same minute
   deltas as days; distinct counts merge as sets/sketches, never as sums). Every window
   changed since the last flush is published as a :class:`MetricPartial`: this
   partition's full aggregate for the window, not a delta.
2. :class:`~streams.merging.SnapshotMerger` runs per *lane* of ``metrics.partials``. Partials are routed to
   a lane by their series (:func:`series_lane`), so every window of a series meets in one
   lane. It keeps the latest partial of each source partition per window and merges them
   into the window's value, a ``MetricSnapshot``.

Completeness
------------
A snapshot published while a window fills up is provisional. A source partition closes a
window -- publishes its last partial of it -- once its watermark passes ``end + grace``.
After each flush's partials it *announces* its new watermark to every lane (a partial
itself carries only the watermark announced before, never the one its own flush reached).
Within a lane, the messages of one source arrive in the order they were published; so
once every source partition's announced watermark has passed ``end + grace``, every
window of that lane ending at ``end`` or earlier has its last partial from every source,
and :meth:`~streams.merging.SnapshotMerger.finalize` publishes it once more,
marked ``final``, in order of window end. That is what the anomaly agent judges: a
window is judged complete when it *is* complete, not when a later one shows up (one
source partition may run hours of event time ahead of another while catching up).
Session metrics are the exception: a source keeps their windows open while a session
that started in them is open, so their final value is the value at the watermark and a
later correction is published as provisional (ClickHouse keeps the latest; the anomaly
bank has judged the window by then, on the same footing every period).

Both stages replace rather than add (a partial replaces the partition's previous
partial; a snapshot replaces the previous snapshot of its key in ClickHouse), so a
replay after a crash re-publishes the same values and never double counts.

Event time and lateness
-----------------------
The *watermark* of a partition is the largest event time it has seen. A window
``[start, end)`` accepts events while ``end + grace > watermark``; after that it is
closed, and an event for it is *late*: counted in ``late_events`` (per period), logged,
and left to the batch recompute (``tidemark backfill``). An event late for its minute
may still count for its hour, day, week and month.

Session metrics aggregate sessions by the window their first event falls in; such a
window also waits until no session that started in it is still open.
"""

from __future__ import annotations

import logging
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from schemas.streams import MetricSnapshot, dimensions_key, series_key  # noqa: F401  (re-exported)
from streams.aggregators import SKIP, MetricAggregator
from streams.catalogue import Source
from streams.events import StreamEvent, field_reader
from streams.periods import MINUTE_MS, Period, PeriodCalendar
from streams.sessions import SessionWindow

log = logging.getLogger(__name__)

DEFAULT_GRACE = timedelta(minutes=5)

# (metric name, dimension name or "", dimension value or "")
SeriesKey = tuple[str, str, str]
# (metric name, dimension, value, period, period start ms)
WindowKey = tuple[str, str, str, Period, int]


def series_lane(key: str, lanes: int) -> int:
    """The lane (partition of ``metrics.partials``) of a series: where all its windows are merged.

    ``key`` is :func:`~schemas.streams.series_key`'s text; CRC-32 makes it the same in every
    process (the anomaly agent computes it too, to know which lane's progress a series follows).

    >>> series_lane("signups|hour|", 6) == series_lane(series_key("signups", "hour", {}), 6)
    True
    """
    return zlib.crc32(key.encode()) % lanes


@dataclass(frozen=True, slots=True)
class MetricPartial:
    """One source partition's aggregate of one window (stage one → stage two)."""

    metric: str
    period: Period
    period_start: int
    period_end: int
    dimension: str
    dimension_value: str
    partition: int
    watermark: int
    state: Any

    @property
    def series_key(self) -> str:
        """The :func:`~schemas.streams.series_key` of the window's series."""
        dims = {self.dimension: self.dimension_value} if self.dimension else {}
        return series_key(self.metric, self.period.value, dims)

    @property
    def window_key(self) -> WindowKey:
        """The key stage two merges partials under."""
        return (self.metric, self.dimension, self.dimension_value, self.period, self.period_start)


class WindowedMetrics:
    """Stage one: one partition's open windows of every streamed metric."""

    def __init__(
        self,
        aggregators: Mapping[str, MetricAggregator],
        calendar: PeriodCalendar,
        grace: timedelta = DEFAULT_GRACE,
        partition: int = 0,
    ) -> None:
        self.aggregators = dict(aggregators)
        self.calendar = calendar
        self.grace_ms = int(grace.total_seconds() * 1000)
        self.partition = partition
        self.watermark = 0
        # What partials carry: the watermark at the end of the previous flush. The one a flush
        # reaches is announced separately after its partials (see "Completeness").
        self.announced = 0
        self.pending: dict[tuple[str, str, str, int], Any] = {}
        self.windows: dict[WindowKey, Any] = {}
        self.dirty: set[WindowKey] = set()
        self.late_events: Counter[str] = Counter()
        # Seconds between publications of a changed window, per period (empty: every flush).
        self.publish_every: dict[Period, float] = {}
        self._published_at: dict[Period, float] = {}
        self.ends: dict[WindowKey, int] = {}
        self._routes: dict[str, _EventRoute] = {}
        self._groups = _share_observations(a for a in self.aggregators.values() if a.source is Source.events)
        self._session_aggs = [a for a in self.aggregators.values() if a.source is Source.sessions]
        self._session_aggs_names = {a.name for a in self._session_aggs}
        # Session dimensions are SessionWindow attributes of the same name.
        self._session_plan = [(a, tuple(a.dimensions), tuple(a.periods)) for a in self._session_aggs]
        self._session_periods = sorted({p for a in self._session_aggs for p in a.periods})
        self._stitched = {a.name for a in self.aggregators.values() if a.stitched}
        self._new_links: dict[str, tuple[str, int]] = {}
        used = {d for a in self.aggregators.values() if a.source is Source.events for d in a.dimensions}
        from streams.catalogue import DIMENSIONS

        self._dim_readers = {d: field_reader(DIMENSIONS[d]) for d in sorted(used)}

    def _groups_for(self, event_name: str) -> list[_SharedObservation]:
        return self._route(event_name).groups

    def _route(self, event_name: str) -> _EventRoute:
        # Which metrics an event of this name feeds is decided once per name, not per event.
        route = self._routes.get(event_name)
        if route is None:
            groups = [
                g for g in self._groups.values()
                if g.agg.event_names is None or event_name in g.agg.event_names
            ]
            dims = sorted({d for g in groups for d in g.dimensions})
            route = _EventRoute(
                groups,
                [(g, g.agg.observer(event_name)) for g in groups],
                [(d, self._dim_readers[d]) for d in dims],
            )
            self._routes[event_name] = route
        return route

    def _window(self, wkey: WindowKey, agg: MetricAggregator) -> Any:
        acc = self.windows.get(wkey)
        if acc is None:
            acc = self.windows[wkey] = agg.new()
            self.ends[wkey] = self.calendar.bounds(wkey[3], wkey[4])[1]
        return acc

    def add(self, event: StreamEvent) -> None:
        """Fold one event (``event.person`` already resolved) into its windows."""
        ts = event.ts
        if ts > self.watermark:
            self.watermark = ts
        minute = ts - ts % MINUTE_MS
        on_time = minute + MINUTE_MS + self.grace_ms > self.watermark
        route = self._route(event.event_name)
        present = []
        for dim, read in route.dimensions:
            value = read(event)
            if value and isinstance(value, str):  # as_text: only strings are dimension values
                present.append((dim, value))
        pending = self.pending
        late_periods: set[str] = set()
        keysets: dict[tuple[str, ...], list[tuple[str, str]]] = {}
        for group, observe in route.observers:
            observation = observe(event)
            if observation is SKIP:
                continue
            dims = group.dimensions
            keys = keysets.get(dims)
            if keys is None:
                keys = keysets[dims] = [("", ""), *(kv for kv in present if kv[0] in dims)]
            if on_time:
                gid, agg = group.id, group.agg
                for dim, value in keys:
                    pkey = (gid, dim, value, minute)
                    acc = pending.get(pkey)
                    if acc is None:
                        acc = pending[pkey] = agg.new()
                    acc.add(observation)
            else:
                for member in group.members:
                    member_keys = [k for k in keys if not k[0] or k[0] in member.dimensions]
                    self._add_late(member, member_keys, ts, observation, late_periods)
        for period in late_periods:  # an event is late once per period, however many metrics it feeds
            self.late_events[period] += 1

    def _add_late(
        self, agg: MetricAggregator, keys: list[tuple[str, str]], ts: int, observation: Any, late: set[str]
    ) -> None:
        # Slow path: the event's minute is closed; count it in the longer periods still open.
        for period in agg.periods:
            start, end = self.calendar.bounds(period, ts)
            if end + self.grace_ms <= self.watermark:
                late.add(period.value)
                continue
            for dim, value in keys:
                wkey = (agg.name, dim, value, period, start)
                self._window(wkey, agg).add(observation)
                self.dirty.add(wkey)

    def open_session(self, session: SessionWindow) -> None:
        """A session just started: open its session-metric windows now, while lateness is judged.

        Lateness is decided when the session's first event arrives, not at the next flush
        (by then the watermark may have moved past a short window that was open on arrival).
        """
        windows, closed_before = self.windows, self.watermark - self.grace_ms
        bounds = self._session_bounds(session.started_at)
        for agg, dims, periods in self._session_plan:
            keys = [("", ""), *((d, v) for d in dims if (v := getattr(session, d)))]
            for period in periods:
                start, end = bounds[period]
                for dim, value in keys:
                    wkey = (agg.name, dim, value, period, start)
                    if wkey in windows:
                        continue
                    if end <= closed_before:
                        self.late_events[f"session_{period.value}"] += 1
                        continue
                    windows[wkey] = agg.new()
                    self.ends[wkey] = end

    def add_sessions(self, sessions: Iterable[SessionWindow]) -> None:
        """Fold session updates into the session metrics' windows (by the session's start)."""
        if not self._session_aggs:
            return
        windows, dirty = self.windows, self.dirty
        for session in sessions:
            bounds = self._session_bounds(session.started_at)
            keysets: dict[tuple[str, ...], list[tuple[str, str]]] = {}
            for agg, dims, periods in self._session_plan:
                keys = keysets.get(dims)
                if keys is None:
                    keys = keysets[dims] = [("", ""), *((d, v) for d in dims if (v := getattr(session, d)))]
                session_id, observation = agg.observe_session(session)
                name = agg.name
                for period in periods:
                    start = bounds[period][0]
                    for dim, value in keys:
                        wkey = (name, dim, value, period, start)
                        acc = windows.get(wkey)
                        if acc is None:  # the session was late when it started (counted then)
                            continue
                        acc.values[session_id] = observation  # SessionAccumulator.add, inlined: the hot loop
                        dirty.add(wkey)

    def _session_bounds(self, started_at: int) -> dict[Period, tuple[int, int]]:
        # The periods around a session's start, computed once for all session metrics.
        bounds = self.calendar.bounds
        return {period: bounds(period, started_at) for period in self._session_periods}

    def rename_person(self, old: str, new: str, ts: int) -> None:
        """Identity stitching, learned from an event at ``ts``: ``old`` is ``new`` in every window still open.

        "Open" is judged on event time (``end + grace`` after the watermark when the link
        was learned), not on when the last flush happened, so the outcome does not depend on
        flush timing. The renaming itself waits for the next flush, which does it for all the
        links learned since in one pass (a set intersection per window). Windows closed
        before the link was learned keep counting ``old``; the batch recompute attributes them.
        """
        if not self._stitched:
            return
        if ts > self.watermark:
            self.watermark = ts
        self._new_links.setdefault(old, (new, self.watermark))

    def _apply_links(self) -> None:
        links = self._new_links
        if not links:
            return
        olds = links.keys()
        grace = self.grace_ms
        for wkey, acc in self.windows.items():
            if wkey[0] not in self._stitched:
                continue
            end = self.ends[wkey]
            for counter in _person_counters(acc):
                if counter.keys is None:
                    continue
                keys = counter.keys
                hits = (olds & keys) if len(keys) > len(links) else [k for k in keys if k in links]
                for old in hits:
                    new, learned_at = links[old]
                    if end + grace > learned_at:
                        counter.rename(old, new)
                        self.dirty.add(wkey)
        self._new_links = {}

    def _merge_pending(self) -> None:
        windows, dirty, bounds, ends = self.windows, self.dirty, self.calendar.bounds, self.ends
        groups = self._groups
        minute_bounds: dict[tuple[Period, int], tuple[int, int]] = {}
        for (gid, dim, value, minute), acc in self.pending.items():
            targets = groups[gid].targets(dim)
            last = len(targets) - 1
            for i, (member, period) in enumerate(targets):
                # Many pending minutes share a minute: its periods are looked up once.
                found = minute_bounds.get((period, minute))
                if found is None:
                    found = minute_bounds[(period, minute)] = bounds(period, minute)
                start, end = found
                wkey = (member.name, dim, value, period, start)
                target = windows.get(wkey)
                if target is None:
                    # The last target may take the pending accumulator itself: nothing reads it after.
                    windows[wkey] = acc if i == last else acc.partial()
                    ends[wkey] = end
                else:
                    target.merge(acc)
                dirty.add(wkey)
        self.pending = {}

    def flush(self, oldest_open_session: int | None = None, now: float | None = None) -> list[MetricPartial]:
        """Merge pending minutes into their windows, publish changed windows, close finished ones.

        With ``now`` (seconds, monotonic) and ``publish_every`` set, a changed window of a
        long period is published at most every ``publish_every[period]`` seconds (a day
        window touched by every event need not be re-sent every second); a window that
        closes is always published. Without ``now`` every changed window is published.
        """
        self._merge_pending()
        self._apply_links()
        windows, dirty = self.windows, self.dirty
        horizon = self.watermark - self.grace_ms
        sessions = self._session_aggs_names
        closed = {
            wkey
            for wkey, end in self.ends.items()
            if end <= horizon
            and (wkey[0] not in sessions or oldest_open_session is None or oldest_open_session >= end)
        }
        if now is None or not self.publish_every:
            due = dirty
        else:
            periods_due = {
                period for period, every in self.publish_every.items()
                if now - self._published_at.get(period, -1e18) >= every
            }
            for period in periods_due:
                self._published_at[period] = now
            due = {w for w in dirty if w[3] in periods_due or w in closed or w[3] not in self.publish_every}
        partials = [self._partial(wkey) for wkey in due]
        if due is dirty:
            dirty.clear()
        else:
            dirty.difference_update(due)
        for wkey in closed:
            del windows[wkey]
            del self.ends[wkey]
            dirty.discard(wkey)
        if closed:
            log.debug("Partition %d closed %d windows at watermark %d", self.partition, len(closed), self.watermark)
        self.announced = self.watermark
        return partials

    def _partial(self, wkey: WindowKey) -> MetricPartial:
        name, dim, value, period, start = wkey
        end = self.calendar.bounds(period, start)[1]
        return MetricPartial(
            metric=name,
            period=period,
            period_start=start,
            period_end=end,
            dimension=dim,
            dimension_value=value,
            partition=self.partition,
            watermark=self.announced,
            state=self.windows[wkey].partial(),
        )

    def state(self) -> dict[str, Any]:
        """Everything needed to resume (picklable)."""
        return {
            "watermark": self.watermark,
            "pending": self.pending,
            "windows": self.windows,
            "dirty": self.dirty,
            "late": dict(self.late_events),
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        """Resume from :meth:`state`."""
        self.watermark = state["watermark"]
        self.announced = self.watermark  # a checkpoint follows a flush, and the flush's announcement
        self.pending = state["pending"]
        self.windows = state["windows"]
        self.dirty = state["dirty"]
        self.late_events = Counter(state["late"])
        self.ends = {w: self.calendar.bounds(w[3], w[4])[1] for w in self.windows}


@dataclass(frozen=True, slots=True)
class MetricValue:
    """A merged window value: what becomes a ``MetricSnapshot`` on the ``metrics`` topic."""

    metric: str
    period: Period
    period_start: int
    period_end: int
    dimensions: dict[str, str]
    value: float
    final: bool = False

    @property
    def window_key(self) -> WindowKey:
        """The merger's key of the window this value is of."""
        dimension, value = next(iter(self.dimensions.items()), ("", ""))
        return (self.metric, dimension, value, self.period, self.period_start)

    @property
    def key(self) -> tuple[str, str, int, str]:
        """(metric, period, period start ms, dimensions key): what a later value replaces."""
        return (self.metric, self.period.value, self.period_start, dimensions_key(self.dimensions))

    def to_avro(self, computed_at: int, source: str = "stream") -> dict[str, Any]:
        """The ``metric_snapshot.avsc`` record (built without a pydantic round trip: this is the hot path)."""
        return {
            "metricType": self.metric,
            "period": self.period.value,
            "periodStart": self.period_start,
            "periodEnd": self.period_end,
            "value": self.value,
            "dimensions": self.dimensions,
            "dimensionsKey": dimensions_key(self.dimensions),
            "source": source,
            "computedAt": computed_at,
            "final": self.final,
        }

    def to_snapshot(self, computed_at: int, source: str = "stream") -> MetricSnapshot:
        """The pydantic model of the snapshot."""
        return MetricSnapshot.from_avro(self.to_avro(computed_at, source))


def _person_counters(acc: Any) -> list[Any]:
    """The distinct counters inside an accumulator that identity stitching may rename."""
    from streams.aggregators import DistinctAccumulator, RatioAccumulator

    if isinstance(acc, DistinctAccumulator):
        return [acc.counter]
    if isinstance(acc, RatioAccumulator):
        return [p.counter for p in (acc.num, acc.den) if isinstance(p, DistinctAccumulator)]
    return []


class _EventRoute:
    """What an event of one name feeds: metric groups, their observers, the dimensions to read."""

    __slots__ = ("groups", "observers", "dimensions")

    def __init__(
        self,
        groups: list[_SharedObservation],
        observers: list[tuple[_SharedObservation, Callable[[StreamEvent], Any]]],
        dimensions: list[tuple[str, Callable[[StreamEvent], Any]]],
    ) -> None:
        self.groups = groups
        self.observers = observers
        self.dimensions = dimensions


class _SharedObservation:
    """Metrics that observe events identically (dau, wau, mau, active_users): one pending accumulator each
    minute serves all of them; they differ only in their periods and dimensions."""

    def __init__(self, members: list[MetricAggregator]) -> None:
        self.agg = members[0]
        self.id = members[0].name
        self.members = members
        self.dimensions = tuple(sorted({d for m in members for d in m.dimensions}))
        self._targets: dict[str, list[tuple[MetricAggregator, Period]]] = {}

    def targets(self, dimension: str) -> list[tuple[MetricAggregator, Period]]:
        """(metric, period) windows a pending accumulator of ``dimension`` ('' = total) merges into."""
        found = self._targets.get(dimension)
        if found is None:
            found = [
                (m, p) for m in self.members if not dimension or dimension in m.dimensions for p in m.periods
            ]
            self._targets[dimension] = found
        return found


def _share_observations(aggregators: Iterable[MetricAggregator]) -> dict[str, _SharedObservation]:
    groups: dict[Any, list[MetricAggregator]] = {}
    for agg in aggregators:
        groups.setdefault(agg.observation_signature(), []).append(agg)
    shared = [_SharedObservation(members) for members in groups.values()]
    return {g.id: g for g in shared}
