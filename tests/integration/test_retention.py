"""Retention, churn/reactivation and lifecycle against the plain-Python reference."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from api.analyses.models import AnalysisSettings
from api.analyses.query import PropertyFilter, TimeRange
from api.analyses.retention import (
    ActivityDefinition,
    EventSpec,
    RetentionDefinition,
    compute_churn,
    compute_lifecycle,
    compute_retention,
)
from tests.analysis_reference import (
    Event,
    at,
    churn_reference,
    insert_events,
    lifecycle_reference,
    retention_reference,
)

pytestmark = pytest.mark.integration


def local(text: str, tz: str) -> datetime:
    """A wall-clock time in ``tz`` as an aware UTC datetime."""
    return datetime.strptime(text, "%Y-%m-%d %H:%M").replace(tzinfo=ZoneInfo(tz)).astimezone(UTC)


def random_events(rng: random.Random, start: datetime, span: timedelta, people: int = 60) -> list[Event]:
    events = []
    for p in range(people):
        user = f"u{p:03d}"
        for _ in range(rng.randint(1, 10)):
            t = start - span / 10 + timedelta(seconds=rng.uniform(0, span.total_seconds() * 1.2))
            t = t.replace(microsecond=t.microsecond // 1000 * 1000)
            name = rng.choice(["signup", "login", "fund_project", "page_view"])
            events.append(Event(name, t, user_id=user, properties={"community": rng.choice(["a", "b"])}))
    return events


def check_retention(ch_db, events, definition, start, end, settings, filters=()):
    insert_events(ch_db, events)
    got = compute_retention(ch_db, definition, TimeRange(start=start, end=end), settings, filters=tuple(filters))
    want = retention_reference(events, definition, start, end, settings.timezone, settings.week_start, filters)
    assert [c.counts for c in got.cohorts] == want
    # averages from the same counts, by formula
    for k, (w, s) in enumerate(zip(got.weighted_average, got.simple_average, strict=True)):
        rows = [r for r in want if len(r) > k and r[0] > 0]
        if not rows:
            assert w is None and s is None
            continue
        assert w == pytest.approx(sum(r[k] for r in rows) / sum(r[0] for r in rows))
        assert s == pytest.approx(sum(r[k] / r[0] for r in rows) / len(rows))
    return got, want


def test_berlin_dst_day_boundaries(ch_db):
    """2026-03-29 in Berlin has 23 hours; events at local 23:30 belong to that day, not the next."""
    tz = "Europe/Berlin"
    events = [
        Event("signup", local("2026-03-28 23:30", tz), user_id="a"),  # 22:30 UTC, day 0
        Event("login", local("2026-03-29 23:30", tz), user_id="a"),  # 21:30 UTC, day 1 (DST day)
        Event("signup", local("2026-03-29 00:30", tz), user_id="b"),  # 23:30 UTC on the 28th, day 1
        Event("login", local("2026-03-30 00:10", tz), user_id="b"),  # 22:10 UTC on the 29th, day 2
    ]
    settings = AnalysisSettings(timezone=tz)
    definition = RetentionDefinition(
        start_event=EventSpec(event_name="signup"), return_event=EventSpec(event_name="login"), period="day", periods=4
    )
    start, end = local("2026-03-28 00:00", tz), local("2026-04-01 00:00", tz)
    got, want = check_retention(ch_db, events, definition, start, end, settings)
    assert want[0][:2] == [1, 1] and want[1][:2] == [1, 1]
    # the same events in UTC fall into other days: the timezone really matters
    utc = retention_reference(events, definition, start, end, "UTC", 1)
    assert utc != want
    assert got.cohorts[1].period_start == datetime(2026, 3, 29, tzinfo=ZoneInfo(tz))


def test_new_york_fall_back_hours(ch_db):
    """2026-11-01 01:00-02:00 happens twice in New York: two hourly periods."""
    tz = "America/New_York"
    first_one = datetime(2026, 11, 1, 5, 30, tzinfo=UTC)  # 01:30 EDT
    second_one = datetime(2026, 11, 1, 6, 30, tzinfo=UTC)  # 01:30 EST
    events = [
        Event("signup", first_one, user_id="x"),
        Event("login", second_one, user_id="x"),
        Event("signup", datetime(2026, 11, 1, 4, 10, tzinfo=UTC), user_id="y"),  # 00:10 EDT
        Event("login", datetime(2026, 11, 1, 7, 10, tzinfo=UTC), user_id="y"),  # 02:10 EST = 3 real hours later
    ]
    definition = RetentionDefinition(
        start_event=EventSpec(event_name="signup"), return_event=EventSpec(event_name="login"), period="hour", periods=5
    )
    start, end = datetime(2026, 11, 1, 4, 0, tzinfo=UTC), datetime(2026, 11, 1, 9, 0, tzinfo=UTC)
    got, want = check_retention(ch_db, events, definition, start, end, AnalysisSettings(timezone=tz))
    assert want[0] == [1, 0, 0, 1, 0] and want[1] == [1, 1, 0, 0]


@pytest.mark.parametrize("week_start", [1, 7])
def test_week_start_setting(ch_db, week_start):
    """A Sunday event is in the same week as the following Monday only when weeks start on Sunday."""
    tz = "America/New_York"
    events = [
        Event("signup", local("2026-03-01 10:00", tz), user_id="s"),  # Sunday
        Event("login", local("2026-03-02 10:00", tz), user_id="s"),  # Monday
        Event("login", local("2026-03-08 12:00", tz), user_id="s"),  # Sunday of the DST change
        Event("signup", local("2026-03-03 10:00", tz), user_id="t"),
        Event("login", local("2026-03-14 10:00", tz), user_id="t"),  # Saturday
    ]
    definition = RetentionDefinition(
        start_event=EventSpec(event_name="signup"), return_event=EventSpec(event_name="login"), period="week", periods=3
    )
    start, end = local("2026-02-23 00:00", tz), local("2026-03-20 00:00", tz)
    settings = AnalysisSettings(timezone=tz, week_start=week_start)
    _, want = check_retention(ch_db, events, definition, start, end, settings)
    other = retention_reference(events, definition, start, end, tz, 8 - week_start)
    assert want != other


@pytest.mark.parametrize(
    ("period", "cohort_type", "return_type", "tz"),
    [
        ("day", "first_time", "on", "Europe/Berlin"),
        ("day", "recurring", "on_or_after", "Europe/Berlin"),
        ("week", "recurring", "on", "America/New_York"),
        ("week", "first_time", "on_or_after", "UTC"),
        ("month", "first_time", "on", "Asia/Kolkata"),
        ("hour", "recurring", "on_or_after", "America/New_York"),
    ],
)
def test_random_retention_matches_reference(ch_db, period, cohort_type, return_type, tz):
    rng = random.Random(f"{period}{cohort_type}{return_type}")
    span = {"hour": timedelta(hours=10), "day": timedelta(days=10), "week": timedelta(weeks=8)}.get(
        period, timedelta(days=200)
    )
    start = local("2026-03-01 00:00", tz) if period != "hour" else datetime(2026, 11, 1, 0, 0, tzinfo=UTC)
    events = random_events(rng, start, span)
    n = 8
    definition = RetentionDefinition(
        start_event=EventSpec(event_name="signup"),
        return_event=EventSpec(event_name="$any"),
        period=period,
        periods=n,
        cohort_type=cohort_type,
        return_type=return_type,
    )
    end = start + span * 0.8
    filters = [PropertyFilter(key="community", value="a")]
    got, want = check_retention(ch_db, events, definition, start, end, AnalysisSettings(timezone=tz), filters)
    assert sum(r[0] for r in want) > 3


def test_first_time_cohort_ignores_people_who_started_earlier(ch_db):
    events = [
        Event("signup", at("2026-01-05 10:00:00"), user_id="old"),
        Event("signup", at("2026-03-02 10:00:00"), user_id="old"),
        Event("signup", at("2026-03-02 11:00:00"), user_id="new"),
    ]
    definition = RetentionDefinition(start_event=EventSpec(event_name="signup"), period="day", periods=2)
    got, _ = check_retention(
        ch_db, events, definition, at("2026-03-02 00:00:00"), at("2026-03-04 00:00:00"), AnalysisSettings()
    )
    assert got.cohorts[0].size == 1


@pytest.mark.parametrize("period", ["day", "week"])
def test_churn_and_lifecycle_match_reference(ch_db, period):
    tz = "Europe/Berlin"
    rng = random.Random(period)
    start = local("2026-03-02 00:00", tz)
    span = timedelta(days=12) if period == "day" else timedelta(weeks=10)
    events = random_events(rng, start, span, people=50)
    insert_events(ch_db, events)
    definition = ActivityDefinition(event=EventSpec(event_name="$any"), period=period, periods=8)
    settings = AnalysisSettings(timezone=tz, week_start=7)
    end = start + span * 0.7
    churn = compute_churn(ch_db, definition, TimeRange(start=start, end=end), settings)
    want = churn_reference(events, definition, start, end, tz, 7)
    assert [(p.active, p.churned_people, p.reactivated_people) for p in churn.periods] == want
    assert [p.churned for p in churn.periods] == [len(w[1]) for w in want]
    assert any(w[1] for w in want) and any(w[2] for w in want)
    life = compute_lifecycle(ch_db, definition, TimeRange(start=start, end=end), settings)
    want_life = lifecycle_reference(events, definition, start, end, tz, 7)
    assert [(p.new, p.returning, p.resurrecting, p.dormant) for p in life.periods] == want_life
    assert all(sum(w) > 0 for w in want_life)


def test_lifecycle_stitched_person_is_one_person(ch_db):
    events = [
        Event("page_view", at("2026-03-02 10:00:00"), anonymous_id="d1"),
        Event("login", at("2026-03-03 10:00:00"), anonymous_id="d1", user_id="amy"),
        Event("page_view", at("2026-03-05 10:00:00"), user_id="amy"),
    ]
    insert_events(ch_db, events)
    definition = ActivityDefinition(period="day", periods=5)
    time_range = TimeRange(start=at("2026-03-02 00:00:00"), end=at("2026-03-07 00:00:00"))
    life = compute_lifecycle(ch_db, definition, time_range)
    assert [(p.new, p.returning, p.resurrecting, p.dormant) for p in life.periods] == [
        (1, 0, 0, 0), (0, 1, 0, 0), (0, 0, 0, 1), (0, 0, 1, 0), (0, 0, 0, 1)
    ]


@pytest.mark.parametrize(("periods", "return_type"), [(64, "on"), (70, "on"), (70, "on_or_after")])
def test_many_periods_bitmask_and_array_paths(ch_db, periods, return_type):
    """Up to 64 periods a person's periods are bits; beyond, arrays. Both agree with the reference."""
    rng = random.Random(periods)
    start = local("2026-01-01 00:00", "Europe/Berlin")
    events = random_events(rng, start, timedelta(days=75), people=40)
    definition = RetentionDefinition(
        start_event=EventSpec(event_name="signup"), period="day", periods=periods, cohort_type="recurring",
        return_type=return_type,
    )
    settings = AnalysisSettings(timezone="Europe/Berlin")
    check_retention(ch_db, events, definition, start, start + timedelta(days=80), settings)
