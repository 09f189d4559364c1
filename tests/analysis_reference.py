"""Plain-Python references for the analyses, written from their documented semantics.

Nothing here reads SQL or ClickHouse results: each function loops over a list of
:class:`Event` in Python (``zoneinfo`` for timezones) and returns plain numbers that the
tests compare with what the ClickHouse implementation returns for the same events.
"""

from __future__ import annotations

import json
import uuid
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np

# --- events ---------------------------------------------------------------------------------

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass
class Event:
    """One synthetic tracked event."""

    name: str
    ts: datetime
    user_id: str = ""
    anonymous_id: str = ""
    properties: dict[str, Any] = field(default_factory=dict)
    context: dict[str, Any] = field(default_factory=dict)
    event_id: str = field(default_factory=lambda: str(uuid.uuid4()))

    @property
    def ms(self) -> int:
        """Event time in epoch milliseconds."""
        return (self.ts - _EPOCH) // timedelta(milliseconds=1)


def at(text: str) -> datetime:
    """A UTC datetime from ``YYYY-mm-dd HH:MM:SS[.fff]``."""
    fmt = "%Y-%m-%d %H:%M:%S.%f" if "." in text else "%Y-%m-%d %H:%M:%S"
    return datetime.strptime(text, fmt).replace(tzinfo=UTC)


def insert_events(client: Any, events: Sequence[Event]) -> None:
    """Insert ``events`` into the ``events`` table, column-oriented."""
    if not events:
        return
    columns = {
        "event_id": [uuid.UUID(e.event_id) for e in events],
        "event_type": ["action"] * len(events),
        "event_name": [e.name for e in events],
        "user_id": [e.user_id for e in events],
        "anonymous_id": [e.anonymous_id for e in events],
        "session_id": [""] * len(events),
        "timestamp": [e.ts for e in events],
        "received_at": [e.ts for e in events],
        "source": ["test"] * len(events),
        "properties": [json.dumps(e.properties) for e in events],
        "context": [json.dumps(e.context) for e in events],
    }
    client.insert("events", list(columns.values()), column_names=list(columns), column_oriented=True)


def resolve_people(events: Iterable[Event]) -> dict[str, str]:
    """event_id -> person: the user id, else the user first seen with the device, else the device."""
    first_link: dict[str, tuple[datetime, str]] = {}
    for e in events:
        if e.user_id and e.anonymous_id:
            seen = first_link.get(e.anonymous_id)
            if seen is None or e.ts < seen[0]:
                first_link[e.anonymous_id] = (e.ts, e.user_id)
    out = {}
    for e in events:
        if e.user_id:
            out[e.event_id] = e.user_id
        elif e.anonymous_id in first_link:
            out[e.event_id] = first_link[e.anonymous_id][1]
        else:
            out[e.event_id] = e.anonymous_id
    return out


def by_person(events: Sequence[Event]) -> dict[str, list[Event]]:
    """Events grouped by person (after stitching), each list sorted by time."""
    people = resolve_people(events)
    grouped: dict[str, list[Event]] = defaultdict(list)
    for e in events:
        grouped[people[e.event_id]].append(e)
    for lst in grouped.values():
        lst.sort(key=lambda e: e.ms)
    return grouped


# --- property filters ------------------------------------------------------------------------


def _lookup(e: Event, key: str, source: str) -> tuple[bool, Any]:
    if source == "event":
        return (key in e.properties, e.properties.get(key))
    node: Any = e.context
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return (False, None)
        node = node[part]
    return (True, node)


def filter_matches(e: Event, f: Any) -> bool:
    """The documented semantics of one PropertyFilter (see api/analyses/query.py)."""
    present, raw = _lookup(e, f.key, f.source)
    as_str = raw if isinstance(raw, str) else ""
    as_num = float(raw) if isinstance(raw, int | float) and not isinstance(raw, bool) else None
    op, v = f.operator, f.value
    if op == "is_set":
        if f.source == "event" and f.key == "amount":
            return as_num is not None
        if (f.source, f.key) in {("event", k) for k in ("currency", "project_id", "community", "category")} or (
            f.source == "context" and f.key in ("location.country", "device.type", "campaign.source")
        ):
            return as_str != ""
        return present
    if op in ("gt", "lt"):
        if as_num is None:
            return False
        return as_num > v if op == "gt" else as_num < v
    if op == "contains":
        return v.lower() in as_str.lower()
    if op in ("in", "not_in"):
        if all(isinstance(x, str) for x in v):
            hit = as_str in v
        else:
            hit = as_num is not None and as_num in [float(x) for x in v]
        return hit if op == "in" else not hit
    hit = as_str == v if isinstance(v, str) else (as_num is not None and as_num == float(v))
    return hit if op == "eq" else not hit


def event_matches(e: Event, name: str, filters: Sequence[Any] = ()) -> bool:
    """Event name (or ``$any``) and every filter."""
    return (name == "$any" or e.name == name) and all(filter_matches(e, f) for f in filters)


# --- funnels --------------------------------------------------------------------------------


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values, dtype=float), q * 100, method="linear"))


def _times(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "median": None, "p90": None}
    return {"mean": sum(values) / len(values), "median": _percentile(values, 0.5), "p90": _percentile(values, 0.9)}


def funnel_attempt(
    entries: list[tuple[int, int]], n: int, window: int, order: str
) -> list[int]:
    """Step times of the attempt that gives a person's level (``entries`` = (ms, step), step 0 = other).

    Which attempt, as a user reads it (api/analyses/funnels.py says the same): unordered, the
    earliest window with the most steps; strict, the latest attempt that reached the level;
    ordered, the first attempt to reach the level, a repeated step 1 restarting the clock.
    """
    entries = sorted(entries)
    if order == "unordered":
        best: list[int] = []
        for anchor, step in entries:
            if step == 0:
                continue
            first: dict[int, int] = {}
            for t, s in entries:
                if s and anchor <= t <= anchor + window and s not in first:
                    first[s] = t
            chain = sorted(first.values())
            if len(chain) > len(best):
                best = chain
        return best
    attempts: list[list[int] | None] = [None] * n
    seen_first = False
    for t, s in entries:
        if attempts[n - 1] is not None:
            break
        if s == 0:
            if order == "strict" and seen_first:
                break
            continue
        if s == 1:
            attempts[0] = [t]
            seen_first = True
            continue
        prev = attempts[s - 2]
        if prev is None:
            if order == "strict" and seen_first:
                break
            continue
        if t <= prev[0] + window:
            attempts[s - 1] = prev + [t]
    reached = [a for a in attempts if a is not None]
    replayed = reached[-1] if reached else []
    if order == "strict":
        return replayed
    # Ordered, replayed the way PostHog reports time to convert: for each step, the latest
    # attempt (by start) that reached it so far. A step-1 event starts a new attempt; an
    # attempt takes the first event of its next step within start + window; the attempt
    # reported is the first to reach the person's furthest step.
    latest: dict[int, list[int]] = {}
    best: list[int] = []
    for t, s in entries:
        if s == 1:
            latest[1] = [t]
        elif s - 1 in latest:
            before = latest[s - 1]
            if t > before[0] + window or (s in latest and latest[s][0] == before[0]):
                continue  # out of its window, or this attempt already took an earlier step-s event
            latest[s] = before + [t]
        else:
            continue
        if len(latest[s]) > len(best):
            best = latest[s]
    assert len(best) == len(replayed), "ordered replay and windowFunnel replay disagree on the level"
    return best


def funnel_reference(
    events: Sequence[Event],
    definition: Any,
    start: datetime,
    end: datetime,
    filters: Sequence[Any] = (),
    people_filter: set[str] | None = None,
) -> dict[str, Any]:
    """Counts, times, exclusions, breakdown and per-person levels of a funnel, by looping."""
    n = len(definition.steps)
    window = definition.window_ms
    per_person: dict[str, dict[str, Any]] = {}
    in_range = [e for e in events if start <= e.ts < end]
    # Stitching uses every event (as the identities table does), not only those in range.
    people = resolve_people(events)
    grouped: dict[str, list[Event]] = defaultdict(list)
    for e in in_range:
        grouped[people[e.event_id]].append(e)
    for person, evs in grouped.items():
        if people_filter is not None and person not in people_filter:
            continue
        entries: list[tuple[int, int]] = []
        first_step: tuple[int, str] | None = None
        for e in evs:
            matched = [
                k for k, s in enumerate(definition.steps, 1) if event_matches(e, s.event_name, [*s.filters, *filters])
            ]
            for k in matched:
                entries.append((e.ms, k))
            if not matched and definition.order == "strict":
                entries.append((e.ms, 0))
            if 1 in matched and definition.breakdown is not None:
                present, raw = _lookup(e, definition.breakdown.key, definition.breakdown.source)
                value = raw if isinstance(raw, str) else ""
                if first_step is None or (e.ms, value) < first_step:
                    first_step = (e.ms, value)
        chain = funnel_attempt(entries, n, window, definition.order)
        level = len(chain)
        excluded = False
        for x in definition.exclusions:
            if level < x.from_step:
                continue
            lo = chain[x.from_step - 1]
            for e in evs:
                if not event_matches(e, x.event_name, x.filters):
                    continue
                hi_ok = e.ms < chain[x.to_step - 1] if level >= x.to_step else e.ms <= chain[0] + window
                if e.ms > lo and hi_ok:
                    excluded = True
        if level >= 1 or excluded:
            per_person[person] = {
                "level": level,
                "chain": chain,
                "excluded": excluded,
                "breakdown": first_step[1] if first_step else "",
            }

    def series(members: list[dict[str, Any]]) -> dict[str, Any]:
        counts = [sum(1 for p in members if p["level"] >= k) for k in range(1, n + 1)]
        step_times = [
            _times([(p["chain"][k - 1] - p["chain"][k - 2]) / 1000 for p in members if p["level"] >= k])
            for k in range(2, n + 1)
        ]
        total = _times([(p["chain"][n - 1] - p["chain"][0]) / 1000 for p in members if p["level"] >= n])
        return {"counts": counts, "step_times": step_times, "total_time": total}

    kept = [p for p in per_person.values() if not p["excluded"]]
    out = series(kept)
    out["excluded"] = sum(1 for p in per_person.values() if p["excluded"])
    out["levels"] = {person: p["level"] for person, p in per_person.items() if not p["excluded"]}
    if definition.breakdown is not None:
        sizes: dict[str, int] = defaultdict(int)
        for p in kept:
            sizes[p["breakdown"]] += 1
        top = sorted(sizes, key=lambda v: (-sizes[v], v))[: definition.breakdown.limit]
        groups: dict[tuple[bool, str], list[dict[str, Any]]] = defaultdict(list)
        for p in kept:
            is_top = p["breakdown"] in top
            groups[(is_top, p["breakdown"] if is_top else "Other")].append(p)
        out["breakdown"] = {value: series(members)["counts"] for (_, value), members in groups.items()}
    return out


def local_start(ts: datetime, period: str, tz: str, week_start: int = 1) -> datetime:
    """Start of ``ts``'s period in ``tz`` (a naive local datetime), weeks starting Monday (1) or Sunday (7)."""
    local = ts.astimezone(ZoneInfo(tz)).replace(tzinfo=None)
    if period == "hour":
        return local.replace(minute=0, second=0, microsecond=0)
    day = local.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "day":
        return day
    if period == "week":
        # Python weekday(): Monday 0 .. Sunday 6
        back = day.weekday() if week_start == 1 else (day.weekday() + 1) % 7
        return day - timedelta(days=back)
    if period == "month":
        return day.replace(day=1)
    raise ValueError(period)


# --- periods, retention, churn, lifecycle --------------------------------------------------------


def period_index(ts: datetime, origin: datetime, period: str, tz: str, week_start: int = 1) -> int:
    """Index of ``ts``'s period counted from the period containing ``origin`` (local calendar of ``tz``)."""
    if period == "hour":
        zone = ZoneInfo(tz)

        def hour_start(x: datetime) -> float:
            return x.astimezone(zone).replace(minute=0, second=0, microsecond=0).timestamp()

        return int(hour_start(ts) - hour_start(origin)) // 3600
    a, b = local_start(ts, period, tz, week_start), local_start(origin, period, tz, week_start)
    if period == "day":
        return (a - b).days
    if period == "week":
        return (a - b).days // 7
    return (a.year * 12 + a.month) - (b.year * 12 + b.month)


def observed_periods(origin: datetime, end: datetime, period: str, tz: str, week_start: int, n: int) -> int:
    """How many of the ``n`` periods from ``origin``'s start before ``end``."""
    count = 0
    for i in range(n):
        if period == "hour":
            first = origin.astimezone(ZoneInfo(tz)).replace(minute=0, second=0, microsecond=0)
            begins = datetime.fromtimestamp(first.timestamp() + 3600 * i, UTC)
        else:
            base = local_start(origin, period, tz, week_start)
            if period == "day":
                naive = base + timedelta(days=i)
            elif period == "week":
                naive = base + timedelta(days=7 * i)
            else:
                m = base.year * 12 + base.month - 1 + i
                naive = datetime(m // 12, m % 12 + 1, 1)
            begins = naive.replace(tzinfo=ZoneInfo(tz))
        if begins < end:
            count += 1
    return count


def retention_reference(
    events: Sequence[Event],
    definition: Any,
    start: datetime,
    end: datetime,
    tz: str = "UTC",
    week_start: int = 1,
    filters: Sequence[Any] = (),
) -> list[list[int]]:
    """The retention matrix counts (observed cohorts and cells only)."""
    n = definition.periods
    people = resolve_people(events)
    cohorts: dict[str, set[int]] = defaultdict(set)
    back: dict[str, set[int]] = defaultdict(set)
    first_start: dict[str, datetime] = {}
    for e in events:
        p = people[e.event_id]
        if event_matches(e, definition.start_event.event_name, [*definition.start_event.filters, *filters]):
            if p not in first_start or e.ts < first_start[p]:
                first_start[p] = e.ts
            i = period_index(e.ts, start, definition.period, tz, week_start)
            if definition.cohort_type == "recurring" and e.ts < end and 0 <= i < n:
                cohorts[p].add(i)
        if event_matches(e, definition.return_event.event_name, [*definition.return_event.filters, *filters]):
            i = period_index(e.ts, start, definition.period, tz, week_start)
            if e.ts < end and 0 <= i < n:
                back[p].add(i)
    if definition.cohort_type == "first_time":
        for p, ts in first_start.items():
            i = period_index(ts, start, definition.period, tz, week_start)
            if ts < end and 0 <= i < n:
                cohorts[p].add(i)
    observed = observed_periods(start, end, definition.period, tz, week_start, n)
    matrix = [[0] * (observed - i) for i in range(observed)]
    for p, cs in cohorts.items():
        for c in cs:
            if c >= observed:
                continue
            for k in range(observed - c):
                if k == 0:
                    hit = True
                elif definition.return_type == "on":
                    hit = (c + k) in back[p]
                else:
                    hit = any(r >= c + k for r in back[p])
                matrix[c][k] += hit
    return matrix


def _activity(
    events: Sequence[Event], definition: Any, start: datetime, end: datetime, tz: str, week_start: int
) -> tuple[dict[str, set[int]], dict[str, int]]:
    people = resolve_people(events)
    active: dict[str, set[int]] = defaultdict(set)
    first: dict[str, datetime] = {}
    for e in events:
        if e.ts >= end or not event_matches(e, definition.event.event_name, definition.event.filters):
            continue
        p = people[e.event_id]
        active[p].add(period_index(e.ts, start, definition.period, tz, week_start))
        if p not in first or e.ts < first[p]:
            first[p] = e.ts
    return active, {p: period_index(t, start, definition.period, tz, week_start) for p, t in first.items()}


def churn_reference(
    events: Sequence[Event], definition: Any, start: datetime, end: datetime, tz: str = "UTC", week_start: int = 1
) -> list[tuple[int, list[str], list[str]]]:
    """Per observed period: (active, churned people, reactivated people)."""
    observed = observed_periods(start, end, definition.period, tz, week_start, definition.periods)
    active, _ = _activity(events, definition, start, end, tz, week_start)
    out = []
    for p in range(observed):
        act, churned, back = 0, [], []
        for person, periods in active.items():
            seen = {x for x in periods if 0 <= x < definition.periods}
            if p not in seen:
                continue
            act += 1
            if p == max(seen) and p < observed - 1:
                churned.append(person)
            if (p - 1) not in seen and min(seen) < p:
                back.append(person)
        out.append((act, sorted(churned), sorted(back)))
    return out


def lifecycle_reference(
    events: Sequence[Event], definition: Any, start: datetime, end: datetime, tz: str = "UTC", week_start: int = 1
) -> list[tuple[int, int, int, int]]:
    """Per observed period: (new, returning, resurrecting, dormant)."""
    observed = observed_periods(start, end, definition.period, tz, week_start, definition.periods)
    active, first = _activity(events, definition, start, end, tz, week_start)
    out = []
    for p in range(observed):
        new = returning = resurrecting = dormant = 0
        for person, periods in active.items():
            now, before = p in periods, (p - 1) in periods
            if now and first[person] == p:
                new += 1
            elif now and before:
                returning += 1
            elif now and first[person] < p:
                resurrecting += 1
            elif before and not now:
                dormant += 1
        out.append((new, returning, resurrecting, dormant))
    return out


# --- experiments --------------------------------------------------------------------------------


def experiment_reference(
    events: Sequence[Event], definition: Any, start: datetime, end: datetime
) -> tuple[dict[str, tuple[int, int, list[float]]], int]:
    """Per variant (exposed, converted, metric values sorted) and the number of multi-variant people."""
    people = resolve_people(events)
    first: dict[str, datetime] = {}
    seen: dict[str, set[str]] = defaultdict(set)
    for e in events:
        if (
            e.name == "experiment_exposure"
            and e.properties.get("experiment") == definition.key
            and start <= e.ts < end
        ):
            p = people[e.event_id]
            seen[p].add(e.properties.get("variant", ""))
            first[p] = min(first.get(p, e.ts), e.ts)
    mine: dict[str, list[Event]] = defaultdict(list)
    for e in events:
        mine[people[e.event_id]].append(e)
    out: dict[str, tuple[int, int, list[float]]] = {}
    multiple = 0
    for p, variants in seen.items():
        if len(variants) > 1:
            multiple += 1
            continue
        (variant,) = variants
        after = [e for e in mine[p] if first[p] <= e.ts < end]
        conversion = definition.conversion
        converted = any(event_matches(e, conversion.event_name, conversion.filters) for e in after)
        value = 0.0
        if definition.continuous is not None:
            for e in after:
                if event_matches(e, definition.continuous.event_name, definition.continuous.filters):
                    raw = e.properties.get(definition.continuous.property)
                    if isinstance(raw, int | float):
                        value += float(raw)
        users, conversions, values = out.get(variant, (0, 0, []))
        out[variant] = (users + 1, conversions + converted, [*values, value])
    return {k: (u, c, sorted(v)) for k, (u, c, v) in out.items()}, multiple


# --- cohorts and lifetime value ---------------------------------------------------------------------


def acquisition_reference(events: Sequence[Event], event_name: str, start: datetime, end: datetime) -> set[str]:
    """People whose first ``event_name`` ever is in ``[start, end)``."""
    people = resolve_people(events)
    first: dict[str, datetime] = {}
    for e in events:
        if e.name == event_name:
            p = people[e.event_id]
            first[p] = min(first.get(p, e.ts), e.ts)
    return {p for p, t in first.items() if start <= t < end}


def behavioural_reference(
    events: Sequence[Event], event_name: str, filters: Sequence[Any], min_count: int, start: datetime, end: datetime
) -> set[str]:
    """People who did the event (with filters) at least ``min_count`` times in ``[start, end)``."""
    people = resolve_people(events)
    counts: dict[str, int] = defaultdict(int)
    for e in events:
        if start <= e.ts < end and event_matches(e, event_name, filters):
            counts[people[e.event_id]] += 1
    return {p for p, c in counts.items() if c >= min_count}


def demographic_reference(events: Sequence[Event], traits: Sequence[Any]) -> set[str]:
    """People whose latest identify value of every filtered trait matches."""
    people = resolve_people(events)
    latest: dict[tuple[str, str], Event] = {}
    for e in events:
        if e.name != "identify":
            continue
        for f in traits:
            if f.key in e.properties:
                k = (people[e.event_id], f.key)
                if k not in latest or e.ts > latest[k].ts:
                    latest[k] = e
    everyone = {people[e.event_id] for e in events if e.name == "identify"}
    out = set()
    for p in everyone:
        ok = True
        for f in traits:
            e = latest.get((p, f.key))
            # the trait's latest event, read as plain JSON (no hot columns)
            if e is None or not filter_matches(Event(e.name, e.ts, properties={f.key: e.properties[f.key]}), f):
                ok = False
        if ok:
            out.add(p)
    return out


def lifetime_value_reference(
    events: Sequence[Event],
    members: set[str],
    acquisition_event: str,
    revenue: Sequence[tuple[str, str]],
    period: str,
    periods: int,
    end: datetime,
    tz: str = "UTC",
    week_start: int = 1,
) -> tuple[list[int], list[float | None]]:
    """(members with period k started, cumulative revenue per such member) for k in 0..periods-1."""
    people = resolve_people(events)
    acquired: dict[str, datetime] = {}
    for e in events:
        p = people[e.event_id]
        if e.name == acquisition_event and p in members:
            acquired[p] = min(acquired.get(p, e.ts), e.ts)
    acquired = {p: t for p, t in acquired.items() if t < end}
    sources = dict(revenue)
    cumulative: dict[str, list[float]] = {}
    last = end - timedelta(milliseconds=1)
    for p, t0 in acquired.items():
        horizon = period_index(last, t0, period, tz, week_start)
        cumulative[p] = [0.0] * min(horizon + 1, periods)
    for e in events:
        p = people[e.event_id]
        if p not in acquired or e.name not in sources or e.ts >= end or e.ts < acquired[p]:
            continue
        raw = e.properties.get(sources[e.name])
        if not isinstance(raw, int | float):
            continue
        k = period_index(e.ts, acquired[p], period, tz, week_start)
        row = cumulative[p]
        for j in range(k, len(row)):
            row[j] += float(raw)
    counts, values = [], []
    for k in range(periods):
        rows = [r[k] for r in cumulative.values() if len(r) > k]
        counts.append(len(rows))
        values.append(sum(rows) / len(rows) if rows else None)
    return counts, values
