"""Retention matrices read from the weekly activity rollup, against the plain-Python reference.

Week and month retention without property filters reads ``activity_weeks`` (first and last
instant per event name, actor and 7-day UTC bucket) instead of every event. The reference in
tests/analysis_reference.py loops over the events themselves.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from clickhouse_connect.driver.client import Client

from api.analyses.models import AnalysisSettings
from api.analyses.query import PropertyFilter, TimeRange
from api.analyses.retention import EventSpec, RetentionDefinition, compute_retention
from tests.analysis_reference import Event, insert_events, retention_reference

pytestmark = pytest.mark.integration

ORIGIN = datetime(2026, 2, 19, tzinfo=UTC)
ZONES = ["Europe/Berlin", "Asia/Kolkata", "Asia/Kathmandu", "America/Sao_Paulo", "America/New_York", "UTC"]


def replay(e: Event) -> Event:
    """The same event again (same id), as a replayed batch delivers it."""
    return Event(e.name, e.ts, e.user_id, e.anonymous_id, dict(e.properties), dict(e.context), e.event_id)


def random_history(rng: random.Random, people: int = 45, days: int = 120) -> tuple[list[Event], list[list[Event]]]:
    """People who browse anonymously, some sign up (linking their device) and come back; some events replayed."""
    events: list[Event] = []
    batches: list[list[Event]] = [[] for _ in range(4)]
    for p in range(people):
        user, device = f"u{p}", f"d{p}"
        signup_at = ORIGIN + timedelta(seconds=rng.randint(0, days * 86400))
        signs_up = rng.random() < 0.75
        mine = []
        for _ in range(rng.randint(1, 14)):
            ts = ORIGIN + timedelta(seconds=rng.randint(0, days * 86400), milliseconds=rng.randint(0, 999))
            if signs_up and ts >= signup_at:
                mine.append(Event(rng.choice(["login", "fund_project"]), ts, user_id=user))
            else:
                mine.append(Event("page_view", ts, anonymous_id=device))
        if signs_up:
            mine.append(Event("signup", signup_at, user_id=user, anonymous_id=device))
        for e in mine:
            events.append(e)
            batches[rng.randrange(4)].append(e)
    for e in rng.sample(events, 20):
        batches[rng.randrange(4)].append(replay(e))
    return events, batches


@pytest.mark.parametrize("seed", [11, 12, 13, 14])
def test_rollup_retention_matches_reference(ch_db: Client, seed: int) -> None:
    rng = random.Random(seed)
    events, batches = random_history(rng)
    for batch in batches:
        insert_events(ch_db, batch)
    for _ in range(8):
        period = rng.choice(["week", "month"])
        settings = AnalysisSettings(timezone=rng.choice(ZONES), week_start=rng.choice([1, 7]))
        definition = RetentionDefinition(
            start_event=EventSpec(event_name=rng.choice(["signup", "$any", "page_view"])),
            return_event=EventSpec(event_name=rng.choice(["$any", "login"])),
            period=period,
            periods=rng.randint(2, 10) if period == "week" else rng.randint(2, 4),
            cohort_type=rng.choice(["first_time", "recurring"]),
            return_type=rng.choice(["on", "on_or_after"]),
        )
        start = ORIGIN + timedelta(days=rng.randint(0, 40), seconds=rng.randint(0, 86399))
        end = start + timedelta(days=rng.randint(10, 80), seconds=rng.choice([0, rng.randint(0, 86399)]))
        got = compute_retention(ch_db, definition, TimeRange(start=start, end=end), settings)
        want = retention_reference(events, definition, start, end, settings.timezone, settings.week_start)
        assert [c.counts for c in got.cohorts] == want, (definition, start, end, settings)


def test_rollup_alone_answers_once_the_range_ends_after_the_events(ch_db: Client) -> None:
    """With the range ending after every event, no event is read: the rollup and identities answer."""
    rng = random.Random(5)
    events, batches = random_history(rng, days=70)
    for batch in batches:
        insert_events(ch_db, batch)
    settings = AnalysisSettings(timezone="Europe/Berlin")  # the range crosses 2026-03-29 (DST)
    start, end = ORIGIN + timedelta(days=3), ORIGIN + timedelta(days=100)
    definitions = [
        RetentionDefinition(start_event=EventSpec(event_name="signup"), period="week", periods=12, cohort_type=kind)
        for kind in ("first_time", "recurring")
    ]
    wants = [retention_reference(events, d, start, end, settings.timezone, settings.week_start) for d in definitions]
    for want in wants:
        assert sum(row[0] for row in want) > 10 and any(v for row in want for v in row[1:])
    ch_db.command("TRUNCATE TABLE events")
    for definition, want in zip(definitions, wants, strict=True):
        got = compute_retention(ch_db, definition, TimeRange(start=start, end=end), settings)
        assert [c.counts for c in got.cohorts] == want
    # Property filters still read the events (now gone): the rollup has no properties.
    filtered = compute_retention(
        ch_db,
        RetentionDefinition(start_event=EventSpec(event_name="signup"), period="week", periods=12),
        TimeRange(start=start, end=end),
        settings,
        filters=(PropertyFilter(key="community", operator="neq", value="x"),),
    )
    assert all(c.size == 0 for c in filtered.cohorts)


def test_range_ending_inside_a_bucket_reads_the_events_before_the_end(ch_db: Client) -> None:
    """The range ends on a Tuesday: Monday's return is only in the events (the bucket runs on past the end)."""
    tz = "Europe/Berlin"

    def at_local(text: str) -> datetime:
        return datetime.fromisoformat(text).replace(tzinfo=ZoneInfo(tz)).astimezone(UTC)

    events = [
        Event("signup", at_local("2026-04-06 09:00"), user_id="ann"),
        Event("login", at_local("2026-04-16 10:00"), user_id="ann"),  # Thursday: the bucket starts 02:00 local
        Event("login", at_local("2026-04-20 10:00"), user_id="ann"),  # Monday, inside the range
        Event("login", at_local("2026-04-22 10:00"), user_id="ann"),  # after the end, same bucket
        Event("signup", at_local("2026-04-07 09:00"), anonymous_id="kiosk"),
        Event("login", at_local("2026-04-18 10:00"), user_id="ben", anonymous_id="kiosk"),  # links the kiosk
        Event("login", at_local("2026-04-21 08:00"), anonymous_id="kiosk"),  # Tuesday morning, inside the range
        Event("login", at_local("2026-04-22 08:00"), user_id="ben"),
    ]
    insert_events(ch_db, events)
    settings = AnalysisSettings(timezone=tz)
    start, end = at_local("2026-04-06 00:00"), at_local("2026-04-21 12:00")
    for cohort_type in ("first_time", "recurring"):
        definition = RetentionDefinition(
            start_event=EventSpec(event_name="signup"),
            return_event=EventSpec(event_name="login"),
            periods=3,
            cohort_type=cohort_type,
        )
        got = compute_retention(ch_db, definition, TimeRange(start=start, end=end), settings)
        want = retention_reference(events, definition, start, end, tz, 1)
        assert want[0] == [2, 2, 2]
        assert [c.counts for c in got.cohorts] == want


@pytest.mark.parametrize("period", ["week", "month"])
def test_twelve_weeks_across_dst_ending_inside_a_bucket(ch_db: Client, period: str) -> None:
    """New York, weeks from Sunday, across the 2026-03-08 DST change; the range ends on a Tuesday
    (mid-bucket) with events after the end in the end's bucket.

    ``edgy``'s return in the end's period (Monday 4 May, a week and a month start after the turn
    of their bucket) is known only from the events: their rollup row for the bucket runs from
    Thursday 30 April (the period before) to Wednesday 6 May (after the end).
    """
    rng = random.Random(21)
    events, batches = random_history(rng, people=60, days=110)
    edgy = [
        Event("signup", datetime(2026, 2, 25, 12, tzinfo=UTC), user_id="edgy"),
        Event("login", datetime(2026, 4, 30, 12, tzinfo=UTC), user_id="edgy"),
        Event("login", datetime(2026, 5, 4, 12, tzinfo=UTC), user_id="edgy"),
        Event("login", datetime(2026, 5, 6, 12, tzinfo=UTC), user_id="edgy"),
    ]
    events += edgy
    for batch in [*batches, edgy]:
        insert_events(ch_db, batch)
    settings = AnalysisSettings(timezone="America/New_York", week_start=7)
    start = datetime(2026, 2, 20, 15, tzinfo=UTC)
    end = datetime(2026, 5, 5, 19, 0, 0, 500000, tzinfo=UTC)  # a Tuesday, in period 11 (weeks) or 3 (months)
    for cohort_type in ("first_time", "recurring"):
        for return_type in ("on", "on_or_after"):
            definition = RetentionDefinition(
                start_event=EventSpec(event_name="signup"),
                period=period,
                periods=12 if period == "week" else 4,
                cohort_type=cohort_type,
                return_type=return_type,
            )
            got = compute_retention(ch_db, definition, TimeRange(start=start, end=end), settings)
            want = retention_reference(events, definition, start, end, settings.timezone, settings.week_start)
            assert sum(row[0] for row in want) > 5 and any(v for row in want for v in row[1:])
            assert [c.counts for c in got.cohorts] == want, (definition, start, end)
            # Without the events between the end's period start and the end, edgy's cohort would miss a return.
            without = retention_reference(
                [e for e in events if e is not edgy[2]], definition, start, end, settings.timezone, settings.week_start
            )
            assert without != want


def test_a_first_start_event_in_the_week_before_a_period_starting_on_a_bucket_edge(ch_db: Client) -> None:
    """January 2026 starts on a Thursday, 00:00 UTC: a bucket's first instant. A first signup four days
    before it is before every period (no cohort), however close it is to the first bucket."""
    at = datetime.fromisoformat
    events = [
        Event("signup", at("2025-12-28T10:00:00+00:00"), user_id="early"),  # before period 0: in no cohort
        Event("login", at("2026-01-12T10:00:00+00:00"), user_id="early"),
        Event("login", at("2026-02-03T10:00:00+00:00"), user_id="early"),
        Event("signup", at("2026-01-05T10:00:00+00:00"), user_id="jan"),
        Event("login", at("2026-02-10T10:00:00+00:00"), user_id="jan"),
    ]
    insert_events(ch_db, events)
    settings = AnalysisSettings(timezone="UTC")
    start, end = at("2026-01-10T00:00:00+00:00"), at("2026-03-10T00:00:00+00:00")
    definition = RetentionDefinition(start_event=EventSpec(event_name="signup"), period="month", periods=3)
    got = compute_retention(ch_db, definition, TimeRange(start=start, end=end), settings)
    want = retention_reference(events, definition, start, end, "UTC", 1)
    assert want[0] == [1, 1, 0]
    assert [c.counts for c in got.cohorts] == want
