"""Tumbling metric windows on event time, with a named grace period and late-event accounting.

Two stages, because a window's events are spread over every partition of ``events.raw``:

1. :class:`WindowedMetrics` runs per source partition. Each event is folded into a
   pending accumulator of its (metric, dimension value, minute); on :meth:`flush` the
   pending minutes are merged into the minute, hour, day, week and month windows each
   metric is reported at (week and month are thereby derived from the same minute
   deltas as days; distinct counts merge as sets/sketches, never as sums). Every window
   changed since the last flush is published as a :class:`MetricPartial`: this
   partition's full aggregate for the window, not a delta. Metrics whose windows would
   hold the same data share them (dau and active_users; a ratio and its parts; every
   session metric): see :class:`_WindowGroup`.
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

import heapq
import logging
import operator
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, NamedTuple

from schemas.streams import MetricSnapshot, dimensions_key, series_key  # noqa: F401  (re-exported)
from streams.aggregators import (
    SKIP,
    MetricAggregator,
    RatioAccumulator,
    SessionTotals,
    decode_state,
    encode_state,
)
from streams.catalogue import Aggregation, Source
from streams.events import StreamEvent, texts_reader
from streams.periods import MINUTE_MS, PERIODS, Period, PeriodCalendar
from streams.sessions import SessionWindow
from streams.sketches import DistinctCounter

log = logging.getLogger(__name__)

DEFAULT_GRACE = timedelta(minutes=5)

# (metric name, dimension name or "", dimension value or "")
SeriesKey = tuple[str, str, str]
# (metric name, dimension, value, period, period start ms); in stage one's own windows the first
# element is the id of the group of metrics sharing the window (see _WindowGroup).
WindowKey = tuple[str, str, str, Period, int]


def series_lane(key: str, lanes: int) -> int:
    """The lane (partition of ``metrics.partials``) of a series: where all its windows are merged.

    ``key`` is :func:`~schemas.streams.series_key`'s text; CRC-32 makes it the same in every
    process (the anomaly agent computes it too, to know which lane's progress a series follows).

    >>> series_lane("signups|hour|", 6) == series_lane(series_key("signups", "hour", {}), 6)
    True
    """
    return zlib.crc32(key.encode()) % lanes


class MetricPartial(NamedTuple):
    """One source partition's aggregate of one window (stage one → stage two).

    A named tuple rather than a frozen dataclass: a flush makes about one per event, and a
    tuple is built in a third of the time.
    """

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
    """Stage one: one partition's open windows of every streamed metric.

    Metrics whose windows would hold the same data share them (see :class:`_WindowGroup`):
    ``windows`` is keyed by (group id, dimension, value, period, start), and the partials
    of every metric a window serves are made from it at publication.
    """

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
        self.windows: dict[WindowKey, Any] = {}
        self.ends: dict[WindowKey, int] = {}
        self.dirty: set[WindowKey] = set()
        self.late_events: Counter[str] = Counter()
        # Seconds between publications of a changed window, per period (empty: every flush).
        self.publish_every: dict[Period, float] = {}
        self._published_at: dict[Period, float] = {}
        self.groups, self._sessions = _window_groups(self.aggregators.values())
        self._event_groups = [g for g in self.groups.values() if g.kind != _SESSIONS]
        self._stitched = {g.id for g in self._event_groups if g.stitched}
        self._new_links: dict[str, tuple[str, int]] = {}
        self._routes: dict[str, _EventRoute] = {}
        # Windows by end, to close them without scanning every open window at every flush.
        self._closing: dict[int, list[WindowKey]] = {}
        self._ends_heap: list[int] = []
        # Session windows past end + grace that still wait for a session started in them.
        self._blocked: list[WindowKey] = []
        # Per open session: what it contributed when last folded into its windows (duration ms,
        # page views, events), so that an update folds in as a difference.
        self._session_folds: dict[str, tuple[int, int, int]] = {}
        # Sessions that were late for some of their windows when they started: the windows they count in.
        self._session_windows: dict[str, list[WindowKey]] = {}
        # Sessions started on time since the last flush: their windows are made when they are first folded.
        self._opened: list[SessionWindow] = []

    def _route(self, event_name: str) -> _EventRoute:
        # Which windows an event of this name feeds is decided once per name, not per event.
        route = self._routes.get(event_name)
        if route is None:
            groups = [
                g for g in self._event_groups if g.agg.event_names is None or event_name in g.agg.event_names
            ]
            route = self._routes[event_name] = _EventRoute(event_name, groups)
        return route

    def add(self, event: StreamEvent) -> None:
        """Fold one event (``event.person`` already resolved) into its windows."""
        ts = event.ts
        watermark = self.watermark
        if ts > watermark:
            self.watermark = watermark = ts
        minute = ts - ts % MINUTE_MS
        route = self._routes.get(event.event_name) or self._route(event.event_name)
        present = route.read_dimensions(event)  # as_text: only strings are dimension values
        if minute + MINUTE_MS + self.grace_ms <= watermark:
            self._add_late(route, event, ts, [(dim, value) for (dim, _bit), value in present])
            return
        # On time: into the pending minute of every group and key (merged into windows at the flush).
        every = [("", "", minute)]
        present_dims = 0
        for (dim, bit), value in present:
            every.append((dim, value, minute))
            present_dims |= bit
        # The pending dicts make what a new key starts from (0, 0.0, an empty set, [0.0, 0]).
        for mode, kind, pending, observe, select in route.plans.get(present_dims) or route.plan(present_dims):
            # A group that reads fewer dimensions than the event carries takes its subset of the keys.
            keys = every if select is None else select(every)
            if mode == _COUNT_EVERY:
                for key in keys:
                    pending[key] += 1
                continue
            observation: Any
            if mode == _PERSON:
                observation = event.person
            elif mode == _OBSERVE:
                observation = observe(event)
                if observation is SKIP:
                    continue
            else:  # _TEXT: a text field read here rather than through two closures
                root, outer, inner = observe
                observation = (event.properties, event.context)[root].get(outer)
                if inner is not None and observation is not None:
                    observation = observation.get(inner) if isinstance(observation, Mapping) else None
                if not isinstance(observation, str):
                    observation = ""
            if kind == _DISTINCT:
                if observation:
                    for key in keys:
                        pending[key].add(observation)
                else:  # counts nothing, but the window exists
                    for key in keys:
                        pending[key]  # noqa: B018
            elif kind == _COUNT:
                for key in keys:
                    pending[key] += 1
            elif kind == _SUM:
                if observation is None:
                    for key in keys:
                        pending[key]  # noqa: B018
                else:
                    for key in keys:
                        pending[key] += observation
            else:  # _AVERAGE: [total, count]
                for key in keys:
                    sums = pending[key]
                    if observation is not None:
                        sums[0] += observation
                        sums[1] += 1

    def _add_late(self, route: _EventRoute, event: StreamEvent, ts: int, present: list[tuple[str, str]]) -> None:
        # Slow path: the event's minute is closed; count it in the longer periods still open.
        bounds, horizon = self.calendar.bounds, self.watermark - self.grace_ms
        late: set[str] = set()  # an event is late once per period, however many metrics it feeds
        for group, observe in route.observers:
            observation = observe(event)
            if observation is SKIP:
                continue
            keys = [("", ""), *((d, v) for d, v in present if d in group.dimensions)]
            for period in group.targets[""]:
                start, end = bounds(period, ts)
                if end <= horizon:
                    late.add(period.value)
                    continue
                for dim, value in keys:
                    if dim and period not in group.targets[dim]:
                        continue
                    wkey = (group.id, dim, value, period, start)
                    acc = self.windows.get(wkey)
                    if acc is None:
                        acc = self._new_window(wkey, group.new(), end)
                    acc.add(observation)
                    self.dirty.add(wkey)
        for period_name in late:
            self.late_events[period_name] += 1

    def _new_window(self, wkey: WindowKey, acc: Any, end: int) -> Any:
        self.windows[wkey] = acc
        self.ends[wkey] = end
        bucket = self._closing.get(end)
        if bucket is None:
            self._closing[end] = [wkey]
            heapq.heappush(self._ends_heap, end)
        else:
            bucket.append(wkey)
        return acc

    def open_session(self, session: SessionWindow) -> None:
        """A session just started: judge now, while its windows are open or not, which ones it counts in.

        Lateness is decided when the session's first event arrives, not at the next flush
        (by then the watermark may have moved past a short window that was open on arrival).
        A session on time for its minute is on time for every period: its windows are made
        when it is first folded (:meth:`add_sessions`).
        """
        if self._sessions is None:
            return
        started = session.started_at
        if started - started % MINUTE_MS + MINUTE_MS + self.grace_ms > self.watermark:
            self._opened.append(session)
            return
        # Late for some period. A window it would share with a session started on time since the
        # last flush counts it as long as that window exists, so those windows are made first.
        for opened in self._opened:
            self._session_windows_of(opened, opening=True)
        self._opened.clear()
        self._session_windows[session.session_id] = self._session_windows_of(session, opening=True)

    def _session_windows_of(self, session: SessionWindow, opening: bool) -> list[WindowKey]:
        # The windows a session counts in: those that exist, and when it is opening, those not closed
        # yet (made now; a closed one it misses is counted late).
        group = self._sessions
        assert group is not None
        bounds, closed_before = self.calendar.bounds, self.watermark - self.grace_ms
        windows, counted = self.windows, []
        keys = _session_keys(session, group.dimensions)
        for period in group.targets[""]:
            start, end = bounds(period, session.started_at)
            for dim, value in keys:
                if dim and period not in group.targets[dim]:
                    continue
                wkey = (group.id, dim, value, period, start)
                if wkey in windows:
                    counted.append(wkey)
                elif not opening:
                    continue
                elif end <= closed_before:
                    # Counted once per session metric the window would have served.
                    self.late_events[f"session_{period.value}"] += len(group.publishers[(dim, period)].sessions)
                else:
                    self._new_window(wkey, SessionTotals(), end)
                    counted.append(wkey)
        return counted

    def add_sessions(self, sessions: Iterable[SessionWindow]) -> None:
        """Fold session updates into the session metrics' windows (by the session's start).

        A session is folded in as the difference from what it contributed at its previous
        fold, into the pending minute of its start (merged into its windows at the flush).
        What a session contributed is forgotten once it is closed: should a device's late
        event start a session at the very millisecond of an expired one (so with its id),
        the windows count both, where the sessions table keeps only the later.
        """
        group = self._sessions
        if group is None:
            return
        folds, late_sessions = self._session_folds, self._session_windows
        pending, dims = group.pending, group.dimensions
        windows, dirty = self.windows, self.dirty
        for session in sessions:
            session_id = session.session_id
            duration, page_views, events = session.last_seen_at - session.started_at, session.page_views, session.events
            before = folds.get(session_id)
            if before is None:
                delta = (1, duration, page_views, events)
            else:
                delta = (0, duration - before[0], page_views - before[1], events - before[2])
            if session.closed:  # never updated again
                folds.pop(session_id, None)
                counted = late_sessions.pop(session_id, None)
            else:
                folds[session_id] = (duration, page_views, events)
                counted = late_sessions.get(session_id)
            if delta == _NO_CHANGE:
                continue
            if counted is not None:
                for wkey in counted:
                    totals = windows.get(wkey)
                    if totals is not None:
                        totals.add(delta)
                        dirty.add(wkey)
                continue
            started = session.started_at
            minute = started - started % MINUTE_MS
            for dim, value in _session_keys(session, dims):
                sums = pending[(dim, value, minute)]
                sums[0] += delta[0]
                sums[1] += delta[1]
                sums[2] += delta[2]
                sums[3] += delta[3]

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
        olds = set(links)
        grace, stitched, ends, dirty = self.grace_ms, self._stitched, self.ends, self.dirty
        for wkey, acc in self.windows.items():
            if wkey[0] not in stitched:
                continue
            counter = acc.counter
            keys = counter.keys
            if keys is None or keys.isdisjoint(olds):  # both walk the smaller set
                continue
            for old in keys & olds:
                new, learned_at = links[old]
                if ends[wkey] + grace > learned_at:
                    counter.rename(old, new)
                    dirty.add(wkey)
        self._new_links = {}

    def _merge_pending(self) -> None:
        windows, dirty = self.windows, self.dirty
        bounds = self.calendar.bounds
        # Many pending minutes share a minute: its periods are looked up once.
        minute_bounds: dict[int, dict[Period, tuple[int, int]]] = {}
        for group in self.groups.values():
            pending = group.pending
            if not pending:
                continue
            gid, kind, targets = group.id, group.kind, group.targets
            for (dim, value, minute), raw in pending.items():
                spans = minute_bounds.get(minute)
                if spans is None:
                    spans = minute_bounds[minute] = {period: bounds(period, minute) for period in PERIODS}
                owner: tuple[WindowKey, int] | None = None
                for period in targets[dim]:
                    start, end = spans[period]
                    wkey = (gid, dim, value, period, start)
                    acc = windows.get(wkey)
                    if acc is None:
                        # One new window may take the pending data itself (nothing reads it after).
                        if owner is None:
                            owner = (wkey, end)
                            continue
                        self._new_window(wkey, group.from_raw(group.copy_raw(raw)), end)
                    elif kind == _COUNT:
                        acc.n += raw
                    elif kind == _DISTINCT:
                        acc.counter.update(raw)
                    elif kind == _SUM:
                        acc.total += raw
                    elif kind == _AVERAGE:
                        acc.total += raw[0]
                        acc.n += raw[1]
                    else:  # _SESSIONS: the sessions' differences
                        acc.add(raw)
                    dirty.add(wkey)
                if owner is not None:
                    self._new_window(owner[0], group.from_raw(raw), owner[1])
                    dirty.add(owner[0])
            pending.clear()

    def flush(
        self, oldest_open_session: int | None = None, now: float | None = None, copy: bool = True
    ) -> list[MetricPartial]:
        """Merge pending minutes into their windows, publish changed windows, close finished ones.

        With ``now`` (seconds, monotonic) and ``publish_every`` set, a changed window of a
        long period is published at most every ``publish_every[period]`` seconds (a day
        window touched by every event need not be re-sent every second); a window that
        closes is always published. Without ``now`` every changed window is published.

        A partial of an open window holds a copy of its state, since the window keeps
        changing; ``copy=False`` hands over the window itself, for a caller that encodes the
        partials before the next event (copying a set of thousands of ids to encode it once
        cost as much as encoding it).
        """
        self._merge_pending()
        self._apply_links()
        self._opened.clear()  # their windows exist now
        closed = self._close(self.watermark - self.grace_ms, oldest_open_session)
        dirty = self.dirty
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
        partials = self._partials(due, closed, copy)
        if due is dirty:
            dirty.clear()
        else:
            dirty.difference_update(due)
        windows, ends = self.windows, self.ends
        for wkey in closed:
            del windows[wkey]
            del ends[wkey]
        if closed:
            dirty.difference_update(closed)
            log.debug("Partition %d closed %d windows at watermark %d", self.partition, len(closed), self.watermark)
        self.announced = self.watermark
        return partials

    def _close(self, horizon: int, oldest_open_session: int | None) -> set[WindowKey]:
        # The windows whose end + grace the watermark passed; a session window also waits for the
        # sessions that started in it.
        heap, closing = self._ends_heap, self._closing
        candidates, self._blocked = self._blocked, []
        while heap and heap[0] <= horizon:
            candidates.extend(closing.pop(heapq.heappop(heap)))
        sessions = self._sessions.id if self._sessions is not None else None
        closed = set()
        for wkey in candidates:
            if wkey[0] == sessions and oldest_open_session is not None and oldest_open_session < self.ends[wkey]:
                self._blocked.append(wkey)
            else:
                closed.add(wkey)
        return closed

    def _partials(self, due: Iterable[WindowKey], closed: set[WindowKey], copy: bool = True) -> list[MetricPartial]:
        # A closing window's accumulator is handed over as the partial's state (nothing changes it
        # any more); an open one is copied (unless ``copy`` is False), since it keeps changing.
        windows, ends, groups = self.windows, self.ends, self.groups
        partition, watermark = self.partition, self.announced
        out: list[MetricPartial] = []
        ratios: dict[tuple[_RatioView, str, str, Period, int, int], None] = {}
        states: dict[WindowKey, Any] = {}  # copies made for members, reused by the ratios
        for wkey in due:
            gid, dim, value, period, start = wkey
            group = groups[gid]
            publishers = group.publishers[(dim, period)]
            acc, end = windows[wkey], ends[wkey]
            if publishers.members:
                state = acc if not copy or wkey in closed else acc.partial()
                if publishers.ratios:
                    states[wkey] = state
                for name in publishers.members:
                    out.append(MetricPartial(name, period, start, end, dim, value, partition, watermark, state))
            for name, field, average in publishers.sessions:
                out.append(MetricPartial(name, period, start, end, dim, value, partition, watermark,
                                         acc.session_partial(field, average)))
            for view in publishers.ratios:
                ratios[(view, dim, value, period, start, end)] = None
        for view, dim, value, period, start, end in ratios:
            parts = []
            for group in (view.num, view.den):
                wkey = (group.id, dim, value, period, start)
                acc = windows.get(wkey)
                if acc is None:
                    parts.append(group.new())
                else:
                    parts.append(acc if not copy or wkey in closed else states.get(wkey) or acc.partial())
            out.append(MetricPartial(view.name, period, start, end, dim, value, partition, watermark,
                                     RatioAccumulator(parts[0], parts[1])))
        return out

    def state(self) -> dict[str, Any]:
        """Everything needed to resume, as JSON-able data (what a checkpoint carries; see :meth:`restore`)."""
        return {
            "watermark": self.watermark,
            "late": dict(self.late_events),
            "windows": [[*wkey, encode_state(acc)] for wkey, acc in self.windows.items()],
            "dirty": list(self.dirty),
            "pending": [
                [g.id, dim, value, minute, g.encode_raw(raw)]
                for g in self.groups.values() for (dim, value, minute), raw in g.pending.items()
            ],
            "links": self._new_links,
            "session_folds": self._session_folds,
            "session_windows": self._session_windows,
            "opened": [s.session_id for s in self._opened],
        }

    def restore(self, state: Mapping[str, Any], open_sessions: Mapping[str, SessionWindow] | None = None) -> None:
        """Resume from :meth:`state` (windows of metrics no longer in the catalogue are dropped).

        ``open_sessions`` (by session id) are the restored tracker's, for the sessions started
        since the last flush.
        """
        groups = self.groups
        self.watermark = state["watermark"]
        self.late_events = Counter(state["late"])
        self._clear_windows()
        bounds = self.calendar.bounds
        for gid, dim, value, period, start, encoded in state["windows"]:
            group = groups.get(gid)
            if group is not None and dim in group.targets and Period(period) in group.targets[dim]:
                wkey = (gid, dim, value, Period(period), int(start))
                self._new_window(wkey, decode_state(encoded), bounds(wkey[3], wkey[4])[1])
        self.dirty = {k for k in ((g, d, v, Period(p), int(t)) for g, d, v, p, t in state["dirty"]) if k in self.ends}
        for gid, dim, value, minute, raw in state["pending"]:
            group = groups.get(gid)
            if group is not None and dim in group.targets:
                group.pending[(dim, value, int(minute))] = group.decode_raw(raw)
        self._new_links = {old: (new, int(at)) for old, (new, at) in state["links"].items()}
        self._session_folds = {k: (int(d), int(p), int(e)) for k, (d, p, e) in state["session_folds"].items()}
        self._session_windows = {
            k: [(g, d, v, Period(p), int(t)) for g, d, v, p, t in wkeys]
            for k, wkeys in state["session_windows"].items()
        }
        self._opened = [open_sessions[k] for k in state["opened"] if open_sessions and k in open_sessions]

    def restore_format_1(self, document: Mapping[str, Any], sessions: Iterable[SessionWindow]) -> None:
        """Resume from a format-1 checkpoint, whose windows were kept per metric.

        A metric's window becomes its group's window (metrics of one group held the same
        data); a ratio's window gives its parts' windows only where no metric of the part's
        group kept them itself; a session metric's window (session id -> value) becomes its
        group's :class:`~streams.aggregators.SessionTotals`, and what each of ``sessions``
        (the restored open and changed ones) contributed to it becomes its last fold.
        """
        self.watermark = document["watermark"]
        self.late_events = Counter(document["late"])
        self._clear_windows()
        bounds = self.calendar.bounds
        served = self._served_by()
        ratios: list[tuple[_RatioView, WindowKey, Any]] = []
        session_maps: dict[WindowKey, dict[str, dict[str | None, float]]] = {}
        for name, dim, value, period_name, start, encoded in document["windows"]:
            served_by = served.get(name)
            period = Period(period_name)
            if served_by is None:
                continue
            if isinstance(served_by, _RatioView):
                ratios.append((served_by, (name, dim, value, period, int(start)), decode_state(encoded)))
                continue
            group, field = served_by
            if dim not in group.targets or period not in group.targets[dim]:
                continue
            wkey = (group.id, dim, value, period, int(start))
            if group.kind == _SESSIONS:
                by_session = session_maps.setdefault(wkey, {})
                for session_id, observed in encoded[2].items():
                    by_session.setdefault(session_id, {})[field] = float(observed)
            elif wkey not in self.windows:
                self._new_window(wkey, decode_state(encoded), bounds(period, wkey[4])[1])
        for view, (_name, dim, value, period, start), ratio in ratios:
            for group, part in ((view.num, ratio.num), (view.den, ratio.den)):
                wkey = (group.id, dim, value, period, start)
                if wkey not in self.windows and not group.publishers[(dim, period)].members:
                    self._new_window(wkey, part, bounds(period, start)[1])
        last_fold: dict[str, dict[str | None, float]] = {}
        for wkey, by_session in session_maps.items():
            totals = SessionTotals(n=len(by_session))
            for session_id, observed in by_session.items():
                totals.duration_ms += round(observed.get("duration_seconds", 0.0) * 1000)
                totals.page_views += round(observed.get("page_views", 0.0))
                totals.events += round(observed.get("events", 0.0))
                last_fold[session_id] = observed
            self._new_window(wkey, totals, bounds(wkey[3], wkey[4])[1])
        for session in sessions:
            if session.session_id in self._session_windows:
                continue
            observed = last_fold.get(session.session_id)
            if observed is not None:
                self._session_folds[session.session_id] = (
                    round(observed["duration_seconds"] * 1000) if "duration_seconds" in observed
                    else session.duration_ms,
                    round(observed.get("page_views", session.page_views)),
                    round(observed.get("events", session.events)),
                )
            # Its windows were made when it started: those that exist are the ones it counts in.
            self._session_windows[session.session_id] = self._session_windows_of(session, opening=False)
        for name, dim, value, minute, encoded in document["pending"]:
            self._merge_format_1_pending(served.get(name), dim, value, int(minute), decode_state(encoded))
        for name, dim, value, period_name, start in document["dirty"]:
            served_by = served.get(name)
            groups = (
                [] if served_by is None else
                [served_by.num, served_by.den] if isinstance(served_by, _RatioView) else [served_by[0]]
            )
            for group in groups:
                wkey = (group.id, dim, value, Period(period_name), int(start))
                if wkey in self.windows:
                    self.dirty.add(wkey)

    def _served_by(self) -> dict[str, tuple[_WindowGroup, str | None] | _RatioView]:
        # Metric name -> (its group, its session field) or its ratio view.
        served: dict[str, tuple[_WindowGroup, str | None] | _RatioView] = {}
        for group in self.groups.values():
            for publishers in group.publishers.values():
                for name in publishers.members:
                    served[name] = (group, None)
                for name, field, _average in publishers.sessions:
                    served[name] = (group, field)
                for view in publishers.ratios:
                    served[view.name] = view
        return served

    def _merge_format_1_pending(
        self, served_by: tuple[_WindowGroup, str | None] | _RatioView | None, dim: str, value: str, minute: int,
        acc: Any,
    ) -> None:
        # A format-1 pending minute (one exists only in a checkpoint not taken right after a flush),
        # merged into its windows at once: a ratio's into the parts that no metric of the part's group keeps.
        if served_by is None:
            return
        if isinstance(served_by, _RatioView):
            parts = [(g, part) for g, part in ((served_by.num, acc.num), (served_by.den, acc.den))
                     if not any(p.members for p in g.publishers.values())]
        else:
            parts = [(served_by[0], acc)]
        for group, part in parts:
            for period in group.targets.get(dim, ()):
                start, end = self.calendar.bounds(period, minute)
                wkey = (group.id, dim, value, period, start)
                window = self.windows.get(wkey)
                if window is None:
                    self._new_window(wkey, part.partial(), end)
                else:
                    window.merge(part)
                self.dirty.add(wkey)

    def _clear_windows(self) -> None:
        self.windows, self.ends, self.dirty = {}, {}, set()
        self._closing, self._ends_heap, self._blocked = {}, [], []
        for group in self.groups.values():
            group.pending.clear()
        self._session_folds, self._session_windows, self._opened, self._new_links = {}, {}, [], {}


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


# How a window group keeps its pending minutes and merges them: the accumulator behind its windows.
_COUNT, _SUM, _AVERAGE, _DISTINCT, _SESSIONS = range(5)
_KINDS = {Aggregation.count: _COUNT, Aggregation.sum: _SUM, Aggregation.average: _AVERAGE,
          Aggregation.distinct: _DISTINCT}
# How a route reads a group's observation of an event: every event counts once, the person, the observer,
# or a text field read inline.
_COUNT_EVERY, _PERSON, _OBSERVE, _TEXT = range(4)
_NO_CHANGE = (0, 0, 0, 0)
# What a pending entry starts from, by kind.
_PENDING_START: dict[int, Callable[[], Any]] = {
    _COUNT: int, _SUM: float, _AVERAGE: lambda: [0.0, 0], _DISTINCT: set, _SESSIONS: lambda: [0, 0, 0, 0],
}


class _RatioView:
    """A ratio metric: published from its parts' windows, never kept on its own."""

    __slots__ = ("name", "num", "den")

    def __init__(self, name: str, num: _WindowGroup, den: _WindowGroup) -> None:
        self.name, self.num, self.den = name, num, den


class _Publishers:
    """What one window of a group is published as (for one dimension and period)."""

    __slots__ = ("members", "sessions", "ratios")

    def __init__(self) -> None:
        self.members: list[str] = []  # metrics whose partial is the window's state
        self.sessions: list[tuple[str, str | None, bool]] = []  # session metrics: (name, field, average)
        self.ratios: list[_RatioView] = []  # ratios this window is a part of


class _WindowGroup:
    """Metrics whose windows hold the same data, and so share them.

    Metrics that observe events identically (dau, wau, mau and active_users; or a ratio's
    part and the metric it is) keep one window per (dimension value, period, start), and
    every session metric reads one :class:`~streams.aggregators.SessionTotals` per window.
    A ratio keeps nothing of its own: its partial pairs its parts' windows. A part that is
    not itself a streamed metric still gets a group, published only through its ratios.

    On-time events and sessions go first to ``pending``, one entry per (dimension,
    value, minute) in the group's raw form (a count, a sum, ``[sum, count]``, a set of
    keys, or ``[sessions, duration, page views, events]`` differences); the flush merges
    each entry into the group's windows of every period it keeps for that dimension
    (``targets``).
    """

    __slots__ = ("id", "agg", "kind", "stitched", "publishers", "targets", "dimensions", "pending")

    def __init__(self, agg: MetricAggregator, kind: int) -> None:
        self.id = agg.name
        self.agg = agg
        self.kind = kind
        self.stitched = agg.stitched
        self.publishers: dict[tuple[str, Period], _Publishers] = {}
        self.targets: dict[str, tuple[Period, ...]] = {}
        self.dimensions: tuple[str, ...] = ()
        self.pending: defaultdict[tuple[str, str, int], Any] = defaultdict(_PENDING_START[kind])

    def publish(self, agg: MetricAggregator, view: _RatioView | None = None) -> None:
        """Serve ``agg`` (a member, a session metric, or a ratio through ``view``) from this group's windows."""
        for dim in ("", *agg.dimensions):
            for period in agg.periods:
                publishers = self.publishers.get((dim, period))
                if publishers is None:
                    publishers = self.publishers[(dim, period)] = _Publishers()
                if view is not None:
                    if view not in publishers.ratios:
                        publishers.ratios.append(view)
                elif self.kind == _SESSIONS:
                    publishers.sessions.append((agg.name, agg.session_field, agg.definition.aggregation
                                                is Aggregation.average))
                else:
                    publishers.members.append(agg.name)
        dims = {d for d, _p in self.publishers}
        self.targets = {d: tuple(p for p in PERIODS if (d, p) in self.publishers) for d in dims}
        self.dimensions = tuple(sorted(dims - {""}))

    def new(self) -> Any:
        """An empty window."""
        return SessionTotals() if self.kind == _SESSIONS else self.agg.new()

    def from_raw(self, raw: Any) -> Any:
        """A window holding a pending entry (taken over, not copied)."""
        kind = self.kind
        if kind == _DISTINCT:
            acc = self.agg.new()
            acc.counter = DistinctCounter.of_keys(raw, acc.counter.exact_limit)
            return acc
        if kind == _SESSIONS:
            return SessionTotals(*raw)
        acc = self.agg.new()
        if kind == _COUNT:
            acc.n = raw
        elif kind == _SUM:
            acc.total = raw
        else:
            acc.total, acc.n = raw
        return acc

    def copy_raw(self, raw: Any) -> Any:
        """An independent copy of a pending entry."""
        return raw.copy() if isinstance(raw, set | list) else raw

    def encode_raw(self, raw: Any) -> Any:
        """A pending entry as JSON-able data."""
        return list(raw) if isinstance(raw, set) else raw

    def decode_raw(self, data: Any) -> Any:
        """The inverse of :meth:`encode_raw`."""
        if self.kind == _DISTINCT:
            return set(data)
        if self.kind == _COUNT:
            return int(data)
        if self.kind == _SUM:
            return float(data)
        if self.kind == _AVERAGE:
            return [float(data[0]), int(data[1])]
        return [int(x) for x in data]


def _window_groups(aggregators: Iterable[MetricAggregator]) -> tuple[dict[str, _WindowGroup], _WindowGroup | None]:
    """The window groups serving ``aggregators`` (by group id), and the session metrics' group if any."""
    by_signature: dict[Any, _WindowGroup] = {}
    sessions: _WindowGroup | None = None

    def group_of(agg: MetricAggregator) -> _WindowGroup:
        group = by_signature.get(agg.observation_signature())
        if group is None:
            group = by_signature[agg.observation_signature()] = _WindowGroup(agg, _KINDS[agg.definition.aggregation])
        return group

    aggregators = list(aggregators)
    for agg in aggregators:
        if agg.source is Source.sessions:
            if sessions is None:
                sessions = _WindowGroup(agg, _SESSIONS)
            sessions.publish(agg)
        elif agg.ratio_parts is None:
            group_of(agg).publish(agg)
    for agg in aggregators:
        parts = agg.ratio_parts
        if agg.source is Source.events and parts is not None:
            view = _RatioView(agg.name, group_of(parts[0]), group_of(parts[1]))
            view.num.publish(agg, view)
            view.den.publish(agg, view)
    groups = {g.id: g for g in by_signature.values()}
    if sessions is not None:
        groups[sessions.id] = sessions
    return groups, sessions


def _session_keys(session: SessionWindow, dimensions: tuple[str, ...]) -> list[tuple[str, str]]:
    """The (dimension, value) keys a session is counted under: the total, and its first-touch values."""
    return [("", ""), *((d, v) for d in dimensions if (v := getattr(session, d)))]


# (mode, kind, pending minutes, observer or field path, key selection): see _EventRoute.
_PlanStep = tuple[int, int, defaultdict[Any, Any], Any, Callable[[list[Any]], Any] | None]


class _EventRoute:
    """What an event of one name feeds: the groups, how each observes it, and the dimensions to read.

    ``read_dimensions`` returns the event's dimension values as ``((dimension, bit),
    value)``; the bits of the dimensions present select the event's plan (:meth:`plan`,
    made once per set of dimensions): per group, how its observation is read (the mode),
    its kind, its pending minutes, its observer (or the path of a text field read
    inline), and which of the event's keys it takes (None: all of them).
    """

    __slots__ = ("read_dimensions", "observers", "plans", "_bits")

    def __init__(self, event_name: str, groups: list[_WindowGroup]) -> None:
        from streams.catalogue import DIMENSIONS

        dims = sorted({d for g in groups for d in g.dimensions})
        self._bits = {d: 1 << i for i, d in enumerate(dims)}
        self.read_dimensions = texts_reader(((d, self._bits[d]), DIMENSIONS[d]) for d in dims)
        self.observers = [(g, g.agg.observer(event_name)) for g in groups]
        self.plans: dict[int, list[_PlanStep]] = {}

    def plan(self, present: int) -> list[_PlanStep]:
        """The plan for events carrying the dimensions whose bits are ``present``."""
        order = [d for d, bit in self._bits.items() if present & bit]  # the order of the event's keys after the total
        plan: list[_PlanStep] = []
        for group, observe in self.observers:
            taken = [0, *(i for i, d in enumerate(order, 1) if d in group.dimensions)]
            select: Callable[[list[Any]], Any] | None = None
            if len(taken) == 1:
                select = operator.itemgetter(slice(0, 1))
            elif len(taken) <= len(order):
                select = operator.itemgetter(*taken)
            definition = group.agg.definition
            mode, how = _OBSERVE, observe  # type: tuple[int, Any]
            if definition.where:
                pass
            elif group.kind == _COUNT:
                mode = _COUNT_EVERY
            elif group.kind == _DISTINCT and definition.distinct == "person":
                mode = _PERSON
            elif group.kind == _DISTINCT:
                root, _, rest = definition.distinct.partition(".")
                keys = rest.split(".")
                if root in ("properties", "context") and len(keys) <= 2:
                    mode = _TEXT
                    how = (0 if root == "properties" else 1, keys[0], keys[1] if len(keys) == 2 else None)
            plan.append((mode, group.kind, group.pending, how, select))
        self.plans[present] = plan
        return plan
