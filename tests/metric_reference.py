"""An independent plain-Python computation of every catalogue metric, and the datasets it is checked on.

Nothing here imports the stream or SQL code under test: periods come from ``zoneinfo``
wall-clock arithmetic (not the offset arithmetic of ``streams.periods``), sessions from
sorting each device's events, identity from the earliest event that carries both ids.
The only shared input is the catalogue itself (the definitions being computed).
"""

from __future__ import annotations

import json
import random
import uuid
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from urllib.parse import quote
from zoneinfo import ZoneInfo

from schemas.models import AnalyticsEvent, EventType

Key = tuple[str, str, int, str]  # metric, period, period start ms, dimensions key

DIMENSION_PATHS = {
    "community": ("properties", "community"),
    "category": ("properties", "category"),
    "country": ("context", "location", "country"),
    "device": ("context", "device", "type"),
    "utm_source": ("context", "campaign", "source"),
    "utm_medium": ("context", "campaign", "medium"),
    "utm_campaign": ("context", "campaign", "name"),
}


def ms(value: datetime) -> int:
    """Epoch milliseconds."""
    return round(value.timestamp() * 1000)


def period_bounds(period: str, ts_ms: int, tz: str, week_start: int = 1) -> tuple[int, int]:
    """The reporting period containing ``ts_ms``, by wall-clock arithmetic in ``tz``."""
    zone = ZoneInfo(tz)
    local = datetime.fromtimestamp(ts_ms / 1000, tz=UTC).astimezone(zone)
    if period == "minute":
        start = local.replace(second=0, microsecond=0)
        return ms(start), ms(start) + 60_000
    if period == "hour":
        start = local.replace(minute=0, second=0, microsecond=0)
        return ms(start), ms(start) + 3_600_000

    def midnight(day: date) -> int:
        return ms(datetime.combine(day, time(0), tzinfo=zone))

    day = local.date()
    if period == "day":
        return midnight(day), midnight(day + timedelta(days=1))
    if period == "week":
        first = day - timedelta(days=(day.isoweekday() - week_start) % 7)
        return midnight(first), midnight(first + timedelta(days=7))
    first = day.replace(day=1)
    nxt = (first + timedelta(days=32)).replace(day=1)
    return midnight(first), midnight(nxt)


def dims_key(dims: Mapping[str, str]) -> str:
    """Canonical dimension key (same text format as the snapshots')."""
    return "&".join(f"{k}={quote(v, safe='')}" for k, v in sorted(dims.items()))


def _path(event: AnalyticsEvent, path: Iterable[str]) -> Any:
    parts = list(path)
    node: Any = event.properties if parts[0] == "properties" else event.context
    for key in parts[1:]:
        if not isinstance(node, dict):
            return None
        node = node.get(key)
    return node


def _read(event: AnalyticsEvent, field: str, person: str) -> Any:
    if field == "person":
        return person
    if field in ("event_name", "event_type", "user_id", "anonymous_id"):
        value = getattr(event, field)
        return value.value if isinstance(value, EventType) else (value or "")
    return _path(event, field.split("."))


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _condition(event: AnalyticsEvent, cond: Any, person: str) -> bool:
    value = _read(event, cond.field, person)
    op = cond.op.value
    if op in ("eq", "ne", "in", "not_in"):
        text = _text(value)
        return {
            "eq": text == cond.value,
            "ne": text != cond.value,
            "in": text in cond.value,
            "not_in": text not in cond.value,
        }[op]
    number = _number(value)
    if number is None:
        return False
    return {"gt": number > cond.value, "gte": number >= cond.value, "lt": number < cond.value,
            "lte": number <= cond.value}[op]


@dataclass
class ReferenceSession:
    """A session as the reference computes it."""

    device_id: str
    started_at: int
    last_seen_at: int
    page_views: int
    events: int
    first: AnalyticsEvent


def reference_sessions(events: Iterable[AnalyticsEvent], gap_ms: int, max_length_ms: int) -> list[ReferenceSession]:
    """Sessions by sorting each device's events: a gap >= ``gap_ms`` or length >= ``max_length_ms`` splits."""
    by_device: dict[str, list[AnalyticsEvent]] = defaultdict(list)
    for event in events:
        by_device[event.anonymous_id or event.user_id or ""].append(event)
    sessions: list[ReferenceSession] = []
    for device, evs in by_device.items():
        evs.sort(key=lambda e: e.timestamp)
        current: ReferenceSession | None = None
        for event in evs:
            t = ms(event.timestamp)
            if current is None or t - current.last_seen_at >= gap_ms or t - current.started_at >= max_length_ms:
                current = ReferenceSession(device, t, t, 0, 0, event)
                sessions.append(current)
            current.last_seen_at = t
            current.events += 1
            current.page_views += event.event_type is EventType.page_view
    return sessions


def _session_dim(session: ReferenceSession, dim: str) -> str:
    return _text(_path(session.first, ("context", *DIMENSION_PATHS[dim][1:])))


def identity_links(events: Iterable[AnalyticsEvent]) -> dict[str, tuple[int, str]]:
    """anonymous id -> (time ms, user id) of the earliest event carrying both (ties: any)."""
    links: dict[str, tuple[int, str]] = {}
    for event in events:
        if event.anonymous_id and event.user_id:
            t = ms(event.timestamp)
            seen = links.get(event.anonymous_id)
            if seen is None or t < seen[0]:
                links[event.anonymous_id] = (t, event.user_id)
    return links


def reference_snapshots(
    events: list[AnalyticsEvent],
    catalogue: Mapping[str, Any],
    tz: str = "UTC",
    week_start: int = 1,
    gap_ms: int = 30 * 60_000,
    max_length_ms: int = 24 * 3_600_000,
    names: Iterable[str] | None = None,
    stitch_grace_ms: int | None = None,
) -> dict[Key, float]:
    """Every snapshot (metric, period, period start, dimensions key) -> value the catalogue defines.

    Identity stitching is final (what the SQL over ``events_resolved`` sees) when
    ``stitch_grace_ms`` is None. Otherwise it is what a stream with that grace sees: a
    link learned at time L attributes a window's earlier anonymous events to the user
    only if the window was still open, L < window end + grace.
    """
    links = identity_links(events)

    def person(e: AnalyticsEvent, window_end: int) -> str:
        if e.user_id:
            return e.user_id
        anon = e.anonymous_id or ""
        link = links.get(anon)
        if link is None:
            return anon
        if stitch_grace_ms is None or ms(e.timestamp) >= link[0] or link[0] < window_end + stitch_grace_ms:
            return link[1]
        return anon

    final_person = {id(e): person(e, 1 << 62) for e in events}
    sessions = reference_sessions(events, gap_ms, max_length_ms)
    wanted = list(names) if names is not None else list(catalogue)

    def groups(definition: Any) -> dict[tuple[str, int, str], list[Any]]:
        out: dict[tuple[str, int, str], list[Any]] = defaultdict(list)
        if definition.source.value == "sessions":
            for s in sessions:
                for period in definition.periods:
                    start = period_bounds(period.value, s.started_at, tz, week_start)[0]
                    out[(period.value, start, "")].append(s)
                    for dim in definition.dimensions:
                        value = _session_dim(s, dim)
                        if value:
                            out[(period.value, start, dims_key({dim: value}))].append(s)
            return out
        for e in events:
            if definition.events and e.event_name not in definition.events:
                continue
            if not all(_condition(e, c, final_person[id(e)]) for c in definition.where):
                continue
            t = ms(e.timestamp)
            for period in definition.periods:
                start = period_bounds(period.value, t, tz, week_start)[0]
                out[(period.value, start, "")].append(e)
                for dim in definition.dimensions:
                    value = _text(_path(e, DIMENSION_PATHS[dim]))
                    if value:
                        out[(period.value, start, dims_key({dim: value}))].append(e)
        return out

    def aggregate(definition: Any, members: list[Any] | None, window_end: int) -> float | None:
        agg = definition.aggregation.value
        members = members or []
        if definition.source.value == "sessions":
            if agg == "count":
                return float(len(members))
            field = definition.value
            values = [
                (s.last_seen_at - s.started_at) / 1000.0 if field == "duration_seconds"
                else float(s.page_views if field == "page_views" else s.events)
                for s in members
            ]
            return sum(values) / len(values) if values else None
        if agg == "count":
            return float(len(members))
        if agg == "distinct":
            keys = {_text(_read(e, definition.distinct, person(e, window_end))) for e in members}
            return float(len(keys - {""}))
        fields = definition.value_fields()
        values = [
            v for e in members
            if (f := fields.get("") or fields.get(e.event_name)) and (v := _number(_read(e, f, ""))) is not None
        ]
        if agg == "sum":
            return float(sum(values))
        return sum(values) / len(values) if values else None

    result: dict[Key, float] = {}
    cache: dict[str, dict[tuple[str, int, str], list[Any]]] = {}

    def grouped(name: str) -> dict[tuple[str, int, str], list[Any]]:
        if name not in cache:
            cache[name] = groups(catalogue[name])
        return cache[name]

    for name in wanted:
        d = catalogue[name]
        agg = d.aggregation.value
        if agg == "ratio":
            num, den = catalogue[d.numerator], catalogue[d.denominator]
            keys = set(grouped(num.name)) | set(grouped(den.name))
            for period, start, dkey in keys:
                if period not in [p.value for p in d.periods]:
                    continue
                if dkey and dkey.split("=")[0] not in d.dimensions:
                    continue
                end = period_bounds(period, start, tz, week_start)[1]
                n = aggregate(num, grouped(num.name).get((period, start, dkey)), end)
                m = aggregate(den, grouped(den.name).get((period, start, dkey)), end)
                if n is not None and m:
                    result[(name, period, start, dkey)] = n / m
            continue
        if agg == "churn":
            base = catalogue[d.of]
            for period in d.periods:
                members: dict[int, set[str]] = defaultdict(set)
                for e in events:
                    if base.events and e.event_name not in base.events:
                        continue
                    start = period_bounds(period.value, ms(e.timestamp), tz, week_start)[0]
                    members[start].add(final_person[id(e)])
                for start, current in members.items():
                    prev_start = period_bounds(period.value, start - 1, tz, week_start)[0]
                    previous = members.get(prev_start)
                    if previous:
                        result[(name, period.value, start, "")] = len(previous - current) / len(previous)
            continue
        for (period, start, dkey), members in grouped(name).items():
            value = aggregate(d, members, period_bounds(period, start, tz, week_start)[1])
            if value is not None:
                result[(name, period, start, dkey)] = value
    return result


# ----------------------------------------------------------------------------- datasets

DST_DAY = date(2026, 3, 29)  # Europe/Berlin springs forward: a 23-hour day
DATASET_START = datetime(2026, 3, 27, tzinfo=UTC)
DATASET_END = datetime(2026, 4, 2, tzinfo=UTC)  # crosses the Monday 2026-03-30 week and the April month


def demo_dataset(sessions_per_day: float = 50.0, seed: int = 11) -> list[AnalyticsEvent]:
    """The demo generator's events over a DST day, a week and a month boundary, plus loan revenue events.

    The demo does not emit loan interest or fees, and no event exercises property
    conditions or the raw ``user_id``-only path at sub-minute spacing, so a few are added.
    """
    from tidemark.demo.traffic import TrafficConfig, generate_events

    config = TrafficConfig(
        start=DATASET_START, end=DATASET_END, sessions_per_day=sessions_per_day, seed=seed, timezone="Europe/Berlin"
    )
    events = list(generate_events(config))
    rng = random.Random(seed)
    extra: list[AnalyticsEvent] = []
    users = sorted({e.user_id for e in events if e.user_id})
    for i in range(40):
        ts = DATASET_START + timedelta(seconds=rng.randrange(int((DATASET_END - DATASET_START).total_seconds())))
        user = rng.choice(users) if users else f"user-{i}"
        name = rng.choice(("loan_repaid", "loan_disbursed"))
        props: dict[str, Any] = {"loan_id": f"loan-x{i}", "community": rng.choice(("berlin-bees", "lagos-coders")),
                                 "amount": float(rng.choice((100, 250, 500)))}
        if name == "loan_repaid":
            props["interest"] = round(rng.uniform(1, 20), 2)
        else:
            props["fee"] = round(rng.uniform(0.5, 5), 2)
        extra.append(AnalyticsEvent(id=uuid.UUID(int=rng.getrandbits(128), version=4), event_name=name,
                                    event_type=EventType.action, user_id=user, timestamp=ts, properties=props,
                                    context={"location": {"country": rng.choice(("DE", "KE"))}}, source="test"))
    communities = ("berlin-bees", "lagos-coders", "nairobi-water")
    for i in range(30):
        ts = DATASET_START + timedelta(seconds=rng.randrange(int((DATASET_END - DATASET_START).total_seconds())))
        user = rng.choice(users) if users else f"user-{i}"
        name = rng.choice(("project_created", "project_funded", "project_expired", "referral_accepted"))
        props = {"project_id": f"p-x{i}", "community": rng.choice(communities),
                 "category": rng.choice(("water", "education")), "goal_amount": 1000.0}
        if name == "project_funded":
            props["days_to_fund"] = round(rng.uniform(1, 30), 2)
        if name == "referral_accepted":
            props = {"referral_code": f"r{i}"}
        extra.append(AnalyticsEvent(id=uuid.UUID(int=rng.getrandbits(128), version=4), event_name=name,
                                    event_type=EventType.action, user_id=user, timestamp=ts, properties=props,
                                    context={"location": {"country": rng.choice(("DE", "KE"))}}, source="test"))
    return sorted(events + extra, key=lambda e: e.timestamp)


def event(
    name: str,
    ts: datetime,
    anonymous_id: str | None = "dev-1",
    user_id: str | None = None,
    properties: dict[str, Any] | None = None,
    context: dict[str, Any] | None = None,
    event_type: EventType | None = None,
) -> AnalyticsEvent:
    """A hand-made event for boundary tests."""
    from schemas.taxonomy import event_type_for

    return AnalyticsEvent(
        event_name=name,
        event_type=event_type or event_type_for(name),
        anonymous_id=anonymous_id,
        user_id=user_id,
        timestamp=ts,
        properties=properties or {},
        context=context or {},
        source="test",
    )


def to_json_row(e: AnalyticsEvent) -> dict[str, Any]:
    """An event as a row of the ClickHouse ``events`` table (what the raw sink writes)."""
    return {
        "event_id": e.id,
        "event_type": e.event_type.value,
        "event_name": e.event_name,
        "user_id": e.user_id or "",
        "anonymous_id": e.anonymous_id or "",
        "session_id": e.session_id or "",
        "timestamp": e.timestamp,
        "received_at": e.received_at or e.timestamp,
        "source": e.source,
        "properties": json.dumps(e.properties),
        "context": json.dumps(e.context),
    }
