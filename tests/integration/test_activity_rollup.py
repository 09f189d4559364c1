"""The weekly activity rollups (``activity_weeks``, ``activity_spans``) and the retention widget, against plain Python.

The Executive dashboard's weekly retention rate reads ``activity_spans`` (first and last instant
per actor and 7-day UTC bucket, one row per actor and 12-bucket span) and stitches anonymous
devices to people through ``identities``. Each test recomputes the widget's figures from the same
events with no SQL: people after identity stitching, local weeks in the reporting timezone
(``zoneinfo``), the range end as a cut.
"""

from __future__ import annotations

import hashlib
import random
import uuid
from collections import defaultdict
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from clickhouse_connect.driver.client import Client
from sqlalchemy import select

from api.dashboards.prebuilt import RETENTION_SQL, SUPERSEDED_RETENTION_SQL, ensure_prebuilt
from api.dashboards.widgets import run_read_only
from api.metadata.models import DashboardWidget
from sinks.migrations import ACTIVITY_BUCKET_SECONDS, ACTIVITY_SPAN_STRIDE_SECONDS, ANY_EVENT_NAME, apply_migrations
from tests.analysis_reference import Event, insert_events, resolve_people
from tests.integration.query_api_support import build_app, close

pytestmark = pytest.mark.integration


def local(text: str, tz: str) -> datetime:
    """A wall-clock time in ``tz`` as an aware UTC datetime."""
    return datetime.strptime(text, "%Y-%m-%d %H:%M").replace(tzinfo=ZoneInfo(tz)).astimezone(UTC)


def week_of(ts: datetime, tz: str, week_start: int) -> date:
    """The local date the reporting week containing ``ts`` starts on."""
    day = ts.astimezone(ZoneInfo(tz)).date()
    return day - timedelta(days=(day.isoweekday() - week_start) % 7)


def local_midnight(day: date, tz: str) -> datetime:
    """The first instant of ``day`` in ``tz`` (a day starting in a DST gap starts after it)."""
    zone = ZoneInfo(tz)
    start = datetime(day.year, day.month, day.day, tzinfo=zone)
    if start.astimezone(UTC).astimezone(zone).replace(tzinfo=None) != start.replace(tzinfo=None):
        start = datetime(day.year, day.month, day.day, 1, tzinfo=zone)  # midnight skipped by DST
    return start.astimezone(UTC)


def retention_rate_reference(
    events: list[Event], start: datetime, end: datetime, tz: str, week_start: int
) -> dict[datetime, float]:
    """Weekly retention rate as the widget documents it, in plain Python.

    Of the people active in the week before, the share active again in the week; weeks from the
    first one starting on or after ``start``'s local date, while they start before ``end``; only
    events before ``end`` count. A replayed event (same event id) is one event.
    """
    unique = {e.event_id: e for e in events}
    people = resolve_people(list(unique.values()))
    weeks: dict[str, set[date]] = defaultdict(set)
    for e in unique.values():
        if start - timedelta(days=14) <= e.ts < end:
            weeks[people[e.event_id]].add(week_of(e.ts, tz, week_start))
    first = start.astimezone(ZoneInfo(tz)).date()
    week = first + timedelta(days=(week_start - first.isoweekday()) % 7)
    out: dict[datetime, float] = {}
    while local_midnight(week, tz) < end:
        before = {p for p, ws in weeks.items() if week - timedelta(days=7) in ws}
        if before:
            again = {p for p in before if week in weeks[p]}
            out[local_midnight(week, tz)] = len(again) / len(before)
        week += timedelta(days=7)
    return out


def widget_rates(client: Client, start: datetime, end: datetime, tz: str, week_start: int) -> dict[datetime, float]:
    """The widget's SQL through the dashboards' read-only path, as instants -> rate."""
    parameters = {
        "start": start.replace(tzinfo=None),
        "end": end.replace(tzinfo=None),
        "tz": tz,
        "week_start": week_start,
        "granularity": "day",
    }
    columns, rows = run_read_only(client, RETENTION_SQL, parameters, max_seconds=30, max_rows=10_000)
    assert columns == ["t", "retention_rate"] or not rows
    out = {}
    for t, rate in rows:
        out[(t.replace(tzinfo=UTC) if t.tzinfo is None else t).astimezone(UTC)] = rate  # as the widget reads it
    return out


def assert_same(got: dict[datetime, float], want: dict[datetime, float]) -> None:
    assert list(got) == list(want)
    for t, rate in want.items():
        assert got[t] == pytest.approx(rate, abs=1e-12), t


def assert_widget_matches(
    client: Client, events: list[Event], start: datetime, end: datetime, tz: str, week_start: int
) -> dict[datetime, float]:
    """The widget's rates over ``[start, end)`` equal the reference's over ``events``; returns the reference's."""
    want = retention_rate_reference(events, start, end, tz, week_start)
    assert_same(widget_rates(client, start, end, tz, week_start), want)
    return want


def replay(e: Event) -> Event:
    """The same event again (same id), as a replayed batch delivers it."""
    return Event(e.name, e.ts, e.user_id, e.anonymous_id, dict(e.properties), dict(e.context), e.event_id)


def story(tz: str) -> list[list[Event]]:
    """Insert batches around Berlin's spring DST change (2026-03-29), in ``tz`` wall-clock times."""
    week1 = [
        Event("page_view", local("2026-03-16 09:00", tz), user_id="alice"),
        Event("page_view", local("2026-03-17 10:00", tz), anonymous_id="tablet-b"),  # bob, before signing up
        Event("page_view", local("2026-03-18 23:30", tz), anonymous_id="phone-c"),  # never signs up
        Event("login", local("2026-03-22 23:30", tz), user_id="dave"),  # Sunday night
    ]
    week2 = [
        Event("login", local("2026-03-23 00:10", tz), user_id="alice"),  # Monday just after midnight
        Event("login", local("2026-03-24 12:00", tz), user_id="erin"),
        Event("page_view", local("2026-03-29 01:30", tz), anonymous_id="phone-c"),  # the DST night (Berlin)
        Event("page_view", local("2026-03-29 23:50", tz), user_id="dave"),  # Sunday of the 23-hour day
    ]
    week3 = [
        Event("signup", local("2026-03-30 08:00", tz), user_id="bob", anonymous_id="tablet-b"),  # links the tablet
        Event("login", local("2026-03-31 08:00", tz), user_id="erin"),
        Event("page_view", local("2026-04-02 18:00", tz), anonymous_id="phone-c"),
    ]
    week4 = [
        Event("login", local("2026-04-06 08:00", tz), user_id="bob"),
        Event("login", local("2026-04-07 08:00", tz), user_id="alice"),
    ]
    replayed = [replay(week2[1]), replay(week1[1])]  # erin's login and bob's anonymous visit, delivered twice
    return [week1, week2, week3, week4, replayed]


@pytest.mark.parametrize(
    ("tz", "week_start"),
    [("Europe/Berlin", 1), ("Europe/Berlin", 7), ("Asia/Kolkata", 1), ("America/New_York", 7), ("UTC", 1)],
)
def test_rollup_path_equals_reference(ch_db: Client, tz: str, week_start: int) -> None:
    """Duplicates, a device stitched to the user who signs up on it later, DST and :30 zones."""
    batches = story(tz)
    for batch in batches:
        insert_events(ch_db, batch)
    events = [e for batch in batches for e in batch]
    start, end = local("2026-03-23 00:00", tz), local("2026-04-20 00:00", tz)
    want = retention_rate_reference(events, start, end, tz, week_start)
    assert len(want) >= 3 and any(0 < r < 1 for r in want.values())
    # Without events: the answer must come from the rollup and the identity links alone.
    ch_db.command("TRUNCATE TABLE events")
    assert_same(widget_rates(ch_db, start, end, tz, week_start), want)


def test_replayed_events_leave_the_rollup_and_the_widget_unchanged(ch_db: Client) -> None:
    tz = "Asia/Kolkata"
    events = [e for batch in story(tz)[:4] for e in batch]
    insert_events(ch_db, events)
    query = (
        "SELECT event_name, anonymous, bucket, actor, min(first_seen), max(last_seen) "
        "FROM activity_weeks GROUP BY ALL ORDER BY ALL"
    )
    before = ch_db.query(query).result_rows
    start, end = local("2026-03-23 00:00", tz), local("2026-04-20 00:00", tz)
    rates = widget_rates(ch_db, start, end, tz, 1)
    for e in reversed(events):  # replayed one by one: other batch boundaries, so no insert-time dedup
        insert_events(ch_db, [replay(e)])
    assert ch_db.query(query).result_rows == before
    assert widget_rates(ch_db, start, end, tz, 1) == rates
    assert_same(rates, retention_rate_reference(events, start, end, tz, 1))
    anys = {r[3] for r in before if r[0] == ANY_EVENT_NAME}
    assert anys == {"alice", "tablet-b", "phone-c", "dave", "erin", "bob"}


def test_range_ending_inside_a_bucket_reads_the_straddled_events(ch_db: Client) -> None:
    """The range ends on a Tuesday; people active both before Monday and after the end in that bucket."""
    tz = "Europe/Berlin"
    events = [
        Event("login", local("2026-04-13 09:00", tz), user_id="ann"),
        Event("login", local("2026-04-16 10:00", tz), user_id="ann"),  # Thursday: bucket start is 02:00 local
        Event("login", local("2026-04-19 10:00", tz), user_id="ann"),  # Sunday, before the last week start
        Event("login", local("2026-04-20 10:00", tz), user_id="ann"),  # Monday, inside the range
        Event("login", local("2026-04-22 10:00", tz), user_id="ann"),  # after the end
        Event("login", local("2026-04-13 09:00", tz), user_id="ben"),
        Event("login", local("2026-04-18 10:00", tz), user_id="ben"),  # Saturday
        Event("login", local("2026-04-23 10:00", tz), user_id="ben"),  # only after the end: not retained
        Event("login", local("2026-04-18 10:00", tz), anonymous_id="kiosk"),
        Event("signup", local("2026-04-21 08:00", tz), user_id="cat", anonymous_id="kiosk"),  # in range, Tuesday
        Event("login", local("2026-04-22 08:00", tz), user_id="cat"),
    ]
    insert_events(ch_db, events)
    start, end = local("2026-04-06 00:00", tz), local("2026-04-21 12:00", tz)
    want = assert_widget_matches(ch_db, events, start, end, tz, 1)
    assert want[local("2026-04-20 00:00", tz)] == pytest.approx(2 / 3)


def test_weeks_starting_thursday_across_a_dst_week(ch_db: Client) -> None:
    """London's spring week is 167 hours; with Thursday weeks its start meets a bucket edge."""
    tz = "Europe/London"
    events = [
        Event("login", local("2026-03-19 09:00", tz), user_id="a"),
        Event("login", local("2026-03-26 00:30", tz), user_id="a"),  # Thursday of the short week
        Event("login", local("2026-04-01 23:30", tz), user_id="a"),  # Wednesday night, same bucket
        Event("login", local("2026-04-02 00:30", tz), user_id="a"),  # next Thursday (bucket: 23:30 UTC)
        Event("login", local("2026-03-20 09:00", tz), user_id="b"),
        Event("login", local("2026-04-02 09:00", tz), user_id="b"),
    ]
    insert_events(ch_db, events)
    start, end = local("2026-03-19 00:00", tz), local("2026-04-16 00:00", tz)
    for week_start in (4, 1, 7):
        assert_widget_matches(ch_db, events, start, end, tz, week_start)


def test_range_longer_than_62_weeks_reads_the_events(ch_db: Client) -> None:
    """Active weeks are bits of one UInt64: a longer range is answered from events_resolved."""
    tz = "America/Sao_Paulo"
    rng = random.Random(7)
    origin = datetime(2025, 1, 2, tzinfo=UTC)
    events = [
        Event("login", origin + timedelta(hours=rng.randint(0, 80 * 7 * 24)), user_id=f"u{rng.randrange(12)}")
        for _ in range(400)
    ]
    insert_events(ch_db, events)
    start, end = origin + timedelta(days=14), origin + timedelta(weeks=75)
    want = assert_widget_matches(ch_db, events, start, end, tz, 7)
    assert len(want) > 62
    ch_db.command("TRUNCATE TABLE events")  # the rollup alone cannot answer this range
    assert widget_rates(ch_db, start, end, tz, 7) == {}


ZONES = [
    "UTC",
    "Europe/Berlin",
    "Asia/Kolkata",
    "Asia/Kathmandu",
    "America/Sao_Paulo",
    "Australia/Lord_Howe",
    "America/Santiago",
    "Pacific/Kiritimati",
    "Etc/GMT+12",
]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_activity_matches_reference(ch_db: Client, seed: int) -> None:
    rng = random.Random(seed)
    origin = datetime(2026, 2, 26, tzinfo=UTC)
    events: list[Event] = []
    batches: list[list[Event]] = [[] for _ in range(4)]
    for p in range(50):
        user, device = f"u{p}", f"d{p}"
        signs_up = rng.random() < 0.7
        signup_at = origin + timedelta(hours=rng.uniform(0, 70 * 24))
        for _ in range(rng.randint(1, 12)):
            ts = origin + timedelta(seconds=rng.randint(0, 70 * 86400), milliseconds=rng.randint(0, 999))
            if signs_up and ts >= signup_at:
                e = Event("login", ts, user_id=user, anonymous_id=rng.choice(["", device]))
            else:
                e = Event("page_view", ts, anonymous_id=device)
            events.append(e)
            batches[rng.randrange(4)].append(e)
        if signs_up:
            e = Event("signup", signup_at, user_id=user, anonymous_id=device)
            events.append(e)
            batches[rng.randrange(4)].append(e)
    for e in rng.sample(events, 15):
        batches[rng.randrange(4)].append(replay(e))
    for batch in batches:
        insert_events(ch_db, batch)
    for _ in range(6):
        tz, week_start = rng.choice(ZONES), rng.choice([1, 7, 1, 7, 3])
        start = origin + timedelta(days=rng.randint(3, 20), minutes=rng.choice([0, rng.randint(0, 1439)]))
        end = start + timedelta(days=rng.randint(10, 45), seconds=rng.choice([0, rng.randint(0, 86399)]))
        assert_widget_matches(ch_db, events, start, end, tz, week_start)


def test_migration_backfills_events_already_present(ch_db: Client) -> None:
    events = [e for batch in story("Asia/Kolkata") for e in batch]
    insert_events(ch_db, events)
    rollup = (
        "SELECT event_name, anonymous, bucket, actor, min(first_seen), max(last_seen) FROM activity_weeks "
        "GROUP BY ALL ORDER BY ALL"
    )
    live = ch_db.query(rollup).result_rows
    # A database migrated before the rollup existed: events there, no rollup yet.
    ch_db.command("DROP VIEW activity_weeks_mv")
    ch_db.command("DROP TABLE activity_weeks")
    ch_db.command("DELETE FROM schema_migrations WHERE version = 8")
    assert apply_migrations(ch_db) == [8]
    assert ch_db.query(rollup).result_rows == live
    start, end = local("2026-03-23 00:00", "Asia/Kolkata"), local("2026-04-20 00:00", "Asia/Kolkata")
    assert_widget_matches(ch_db, events, start, end, "Asia/Kolkata", 1)
    # ...and the view keeps it current afterwards.
    late = Event("login", local("2026-04-13 10:00", "Asia/Kolkata"), user_id="dave", event_id=str(uuid.uuid4()))
    insert_events(ch_db, [late])
    assert_widget_matches(ch_db, [*events, late], start, end, "Asia/Kolkata", 1)


def test_seeded_dashboards_get_the_current_retention_sql_unless_edited(ch_db: Client, tmp_path: Path) -> None:
    """A database seeded with an earlier text of the widget's SQL gets the current one at start."""
    earlier = (Path(__file__).parent / "retention_sql_before_rollup.sql").read_text().strip()
    assert hashlib.sha256(earlier.encode()).hexdigest() in SUPERSEDED_RETENTION_SQL
    app = build_app(ch_db, tmp_path)
    try:
        sessions = app.state.metadata_sessions
        with sessions() as session:
            widgets = session.scalars(select(DashboardWidget).order_by(DashboardWidget.id)).all()
            retention = next(w for w in widgets if w.title == "Weekly retention rate")
            margin = next(w for w in widgets if w.title == "Gross margin")
            retention.data_source = {"kind": "sql", "sql": earlier}
            margin.data_source = {"kind": "sql", "sql": earlier + "\n-- edited"}  # someone's own edit
            session.commit()
            ids = retention.id, margin.id
        assert ensure_prebuilt(sessions) == []
        with sessions() as session:
            assert session.get(DashboardWidget, ids[0]).data_source == {"kind": "sql", "sql": RETENTION_SQL}
            assert session.get(DashboardWidget, ids[1]).data_source["sql"] == earlier + "\n-- edited"
    finally:
        close(app)


def spans_reference(events: list[Event]) -> set[tuple[bool, datetime, str, datetime, datetime, datetime]]:
    """``activity_spans`` as plain Python: (anonymous, span, actor, bucket, first, last) per bucket of each span."""
    seen: dict[tuple[bool, str, int], tuple[datetime, datetime]] = {}
    for e in {e.event_id: e for e in events}.values():
        key = (e.user_id == "", e.user_id or e.anonymous_id, int(e.ts.timestamp()) // ACTIVITY_BUCKET_SECONDS)
        first, last = seen.get(key, (e.ts, e.ts))
        seen[key] = (min(first, e.ts), max(last, e.ts))
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    out = set()
    for (anonymous, actor, bucket), (first, last) in seen.items():
        stride = bucket * ACTIVITY_BUCKET_SECONDS // ACTIVITY_SPAN_STRIDE_SECONDS
        for span in (stride, stride - 1):  # every bucket lies in two spans
            out.add(
                (
                    anonymous,
                    epoch + timedelta(seconds=span * ACTIVITY_SPAN_STRIDE_SECONDS),
                    actor,
                    epoch + timedelta(seconds=bucket * ACTIVITY_BUCKET_SECONDS),
                    first,
                    last,
                )
            )
    return out


def stored_spans(client: Client) -> set[tuple[bool, datetime, str, datetime, datetime, datetime]]:
    """``activity_spans`` merged as readers see it (minimum and maximum per bucket over unmerged rows)."""
    rows = client.query(
        "SELECT anonymous, span, actor, b, min(f), max(l) FROM ("
        "  SELECT anonymous, span, actor, b, f, NULL AS l FROM activity_spans"
        "  ARRAY JOIN first_seen.1 AS b, first_seen.2 AS f"
        "  UNION ALL"
        "  SELECT anonymous, span, actor, b, NULL AS f, l FROM activity_spans"
        "  ARRAY JOIN last_seen.1 AS b, last_seen.2 AS l"
        ") GROUP BY ALL"
    ).result_rows

    def aware(t: datetime) -> datetime:
        return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)

    return {(bool(a), aware(s), actor, aware(b), aware(f), aware(last)) for a, s, actor, b, f, last in rows}


def test_spans_hold_each_buckets_first_and_last_instant_in_both_spans(ch_db: Client) -> None:
    """Several inserts (unmerged parts, replays): every bucket of an actor is in its two spans, exactly."""
    rng = random.Random(21)
    origin = datetime(2026, 1, 1, tzinfo=UTC)
    events = [
        Event(
            "login",
            origin + timedelta(seconds=rng.randint(0, 200 * 86400), milliseconds=rng.randint(0, 999)),
            user_id=rng.choice(["", f"u{rng.randrange(6)}"]),
            anonymous_id=f"d{rng.randrange(8)}",
        )
        for _ in range(300)
    ]
    for i in range(0, len(events), 40):
        insert_events(ch_db, events[i : i + 40])
    insert_events(ch_db, [replay(e) for e in rng.sample(events, 30)])
    want = spans_reference(events)
    assert stored_spans(ch_db) == want
    ch_db.command("OPTIMIZE TABLE activity_spans FINAL")
    assert stored_spans(ch_db) == want
    # After the merge: one row per actor and span, with the buckets in order.
    rows = ch_db.query("SELECT count(), uniqExact(anonymous, span, actor) FROM activity_spans").result_rows
    assert rows[0][0] == rows[0][1]
    unsorted = ch_db.query(
        "SELECT count() FROM activity_spans "
        "WHERE first_seen.1 != arraySort(first_seen.1) OR first_seen.1 != last_seen.1"
    ).result_rows
    assert unsorted[0][0] == 0


def test_migration_9_backfills_spans_from_the_weekly_rollup(ch_db: Client) -> None:
    events = [e for batch in story("Europe/Berlin") for e in batch]
    insert_events(ch_db, events)
    live = stored_spans(ch_db)
    assert live == spans_reference(events)
    ch_db.command("DROP VIEW activity_spans_mv")
    ch_db.command("DROP TABLE activity_spans")
    ch_db.command("DELETE FROM schema_migrations WHERE version = 9")
    assert apply_migrations(ch_db) == [9]
    assert stored_spans(ch_db) == live
    start, end = local("2026-03-23 00:00", "Europe/Berlin"), local("2026-04-20 00:00", "Europe/Berlin")
    assert_widget_matches(ch_db, events, start, end, "Europe/Berlin", 1)
    late = Event("login", local("2026-04-13 10:00", "Europe/Berlin"), user_id="dave")
    insert_events(ch_db, [late])
    assert stored_spans(ch_db) == spans_reference([*events, late])


@pytest.mark.parametrize("seed", [4, 5, 6])
def test_ranges_over_several_spans_match_reference(ch_db: Client, seed: int) -> None:
    """Ranges of 8 to 62 weeks read several spans (every second one); people seen in several of them."""
    rng = random.Random(seed)
    origin = datetime(2025, 9, 4, tzinfo=UTC)
    days = 460
    events: list[Event] = []
    for p in range(40):
        user, device = f"u{p}", f"d{p}"
        signs_up = rng.random() < 0.7
        signup_at = origin + timedelta(hours=rng.uniform(0, days * 24))
        for _ in range(rng.randint(2, 40)):
            ts = origin + timedelta(seconds=rng.randint(0, days * 86400), milliseconds=rng.randint(0, 999))
            if signs_up and ts >= signup_at:
                events.append(Event("login", ts, user_id=user, anonymous_id=rng.choice(["", device])))
            else:
                events.append(Event("page_view", ts, anonymous_id=device))
        if signs_up:
            events.append(Event("signup", signup_at, user_id=user, anonymous_id=device))
    batches: list[list[Event]] = [[] for _ in range(5)]
    for e in events:
        batches[rng.randrange(5)].append(e)
    for e in rng.sample(events, 25):
        batches[rng.randrange(5)].append(replay(e))
    for batch in batches:
        insert_events(ch_db, batch)
    for _ in range(5):
        tz, week_start = rng.choice(ZONES), rng.choice([1, 7])
        start = origin + timedelta(days=rng.randint(3, 60), minutes=rng.choice([0, rng.randint(0, 1439)]))
        end = start + timedelta(days=rng.randint(50, 420), seconds=rng.choice([0, rng.randint(0, 86399)]))
        want = assert_widget_matches(ch_db, events, start, end, tz, week_start)
        assert len(want) >= 6


@pytest.mark.parametrize(
    ("tz", "day"),
    [("America/Santiago", "2026-09-06"), ("Asia/Beirut", "2026-03-29"), ("America/Havana", "2026-03-08")],
)
def test_week_starting_in_a_skipped_midnight(ch_db: Client, tz: str, day: str) -> None:
    """Sunday weeks in zones whose clocks jump from 00:00 to 01:00 on that Sunday: the week starts at 01:00."""
    sunday = datetime.strptime(day, "%Y-%m-%d").date()
    turn = local_midnight(sunday, tz)
    assert turn.astimezone(ZoneInfo(tz)).hour == 1
    events = [
        Event("login", turn - timedelta(days=8), user_id="a"),
        Event("login", turn - timedelta(milliseconds=1), user_id="a"),  # Saturday's last instant
        Event("login", turn - timedelta(days=3), user_id="b"),
        Event("login", turn, user_id="b"),  # the week's first instant
        Event("login", turn + timedelta(days=2), user_id="b"),
        Event("login", turn - timedelta(days=4), anonymous_id="k"),
        Event("login", turn + timedelta(hours=5), user_id="c", anonymous_id="k"),
    ]
    insert_events(ch_db, events)
    start, end = turn - timedelta(days=14), turn + timedelta(days=9)
    want = assert_widget_matches(ch_db, events, start, end, tz, 7)
    assert want[turn] == pytest.approx(2 / 3)


def test_events_after_the_end_in_its_bucket(ch_db: Client) -> None:
    """Actors seen after the range end in its bucket, with and without events between the last week start and it."""
    tz = "Asia/Kolkata"
    events = [
        Event("login", local("2026-04-14 09:00", tz), user_id="a"),
        Event("login", local("2026-04-17 09:00", tz), user_id="a"),  # Friday: the end's bucket, before Monday
        Event("login", local("2026-04-22 21:00", tz), user_id="a"),  # after the end, same bucket: not retained
        Event("login", local("2026-04-14 09:00", tz), user_id="b"),
        Event("login", local("2026-04-17 09:00", tz), user_id="b"),
        Event("login", local("2026-04-21 09:00", tz), user_id="b"),  # Tuesday, inside the range
        Event("login", local("2026-04-22 20:00", tz), user_id="b"),  # after the end
        Event("login", local("2026-04-14 09:00", tz), anonymous_id="t"),
        Event("login", local("2026-04-20 02:00", tz), anonymous_id="t"),  # Monday, inside the range, linked later
        Event("signup", local("2026-04-22 19:00", tz), user_id="c", anonymous_id="t"),  # after the end
    ]
    insert_events(ch_db, events)
    start, end = local("2026-04-06 00:00", tz), local("2026-04-22 12:00", tz)
    want = assert_widget_matches(ch_db, events, start, end, tz, 1)
    assert want[local("2026-04-20 00:00", tz)] == pytest.approx(2 / 3)


def test_weeks_starting_thursday_in_samoa_when_it_skipped_a_date(ch_db: Client) -> None:
    """Samoa skipped Friday 30 December 2011: the bucket from Thursday 29 December (UTC) holds two Thursday starts."""
    tz = "Pacific/Apia"
    at = datetime.fromisoformat
    events = [
        Event("login", at("2011-12-29T05:00:00+00:00"), user_id="a"),  # the week from Thursday 22 December
        Event("login", at("2012-01-01T00:00:00+00:00"), user_id="a"),  # the six-day week from Thursday 29
        Event("login", at("2012-01-04T12:00:00+00:00"), user_id="a"),  # the week from Thursday 5 January
        Event("login", at("2011-12-29T05:00:00+00:00"), user_id="b"),
        Event("login", at("2012-01-04T12:00:00+00:00"), user_id="b"),
        Event("login", at("2011-12-27T00:00:00+00:00"), user_id="c"),
        Event("login", at("2012-01-01T00:00:00+00:00"), user_id="c"),
    ]
    insert_events(ch_db, events)
    start, end = local("2011-12-22 00:00", tz), local("2012-01-19 00:00", tz)
    want = assert_widget_matches(ch_db, events, start, end, tz, 4)
    assert list(want.values()) == [pytest.approx(2 / 3), pytest.approx(1 / 2), 0.0]


def test_only_weeks_starting_thursday_put_two_week_starts_in_one_bucket(ch_db: Client) -> None:
    """Why the widget answers from the rollup for every week start but Thursday, in every zone the engine knows.

    A bucket holds two week starts when the week of its last second starts two weeks after the
    week of its first second (local dates in the zone, 1995 to 2045).
    """
    zones = [row[0] for row in ch_db.query("SELECT time_zone FROM system.time_zones").result_rows]
    assert len(zones) > 400
    week = "toMonday(toDate(toDateTime({at}, 'UTC'), {{tz:String}}) - (week_start - 1)) + (week_start - 1)"
    crowded: set[tuple[str, int]] = set()
    for tz in zones:
        rows = ch_db.query(
            "SELECT DISTINCT week_start FROM ("
            "  SELECT arrayJoin(range(intDiv(toUnixTimestamp(toDateTime('1995-01-05', 'UTC')), 604800),"
            "                         intDiv(toUnixTimestamp(toDateTime('2045-01-01', 'UTC')), 604800))) * 604800 AS b,"
            "         arrayJoin([1, 2, 3, 4, 5, 6, 7]) AS week_start"
            f") WHERE ({week.format(at='b + 604799')}) - ({week.format(at='b')}) > 7",
            parameters={"tz": tz},
        ).result_rows
        crowded.update((tz, row[0]) for row in rows)
    assert {week_start for _, week_start in crowded} == {4}
    assert ("Pacific/Apia", 4) in crowded  # Samoa skipped Friday 30 December 2011
