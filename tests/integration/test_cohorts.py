"""Cohorts computed in ClickHouse against the plain-Python reference; cohorts filtering analyses; LTV."""

from __future__ import annotations

import random
from datetime import timedelta

import pytest

from api.analyses.cohorts import (
    CohortDefinition,
    LifetimeValueDefinition,
    RevenueSource,
    cohort_is_stale,
    cohort_members,
    compare_cohorts,
    compute_cohort,
    latest_computation,
    lifetime_value,
)
from api.analyses.funnels import FunnelDefinition, FunnelStep, compute_funnel
from api.analyses.models import AnalysisSettings
from api.analyses.query import PropertyFilter, TimeRange
from api.analyses.retention import EventSpec, RetentionDefinition, compute_retention
from tests.analysis_reference import (
    Event,
    acquisition_reference,
    at,
    behavioural_reference,
    demographic_reference,
    funnel_reference,
    insert_events,
    lifetime_value_reference,
    retention_reference,
)

pytestmark = pytest.mark.integration

START = at("2026-01-01 00:00:00")
NOW = at("2026-04-01 00:00:00")


def world(seed: int = 4, people: int = 150) -> list[Event]:
    """Signups over three months, identify traits that change, funding with fees, ads with revenue."""
    rng = random.Random(seed)
    events: list[Event] = []
    for i in range(people):
        user = f"u{i:03d}"
        device = f"d{i:03d}"
        t = START + timedelta(days=rng.uniform(0, 80))
        t = t.replace(microsecond=t.microsecond // 1000 * 1000)
        events.append(Event("page_view", t - timedelta(minutes=5), anonymous_id=device))
        events.append(Event("signup", t, user_id=user, anonymous_id=device))
        country = rng.choice(["NG", "KE", "GH"])
        events.append(Event("identify", t, user_id=user, properties={"country": country, "plan": "free"}))
        if rng.random() < 0.3:  # moved: the latest value wins
            events.append(Event("identify", t + timedelta(days=3), user_id=user,
                                properties={"country": rng.choice(["NG", "KE"])}))
        for _ in range(rng.randint(0, 8)):
            u = t + timedelta(days=rng.uniform(0, 90))
            u = u.replace(microsecond=u.microsecond // 1000 * 1000)
            if rng.random() < 0.5:
                amount = rng.choice([5, 20, 100])
                events.append(Event("fund_project", u, user_id=user, properties={
                    "amount": amount, "fee": round(amount * 0.03, 2), "community": rng.choice(["lagos", "kano"])}))
            else:
                events.append(Event("watch_ad", u, user_id=user, properties={"revenue": 0.05}))
    return events


def members(client, cohort_id):
    return set(cohort_members(client, cohort_id, limit=100_000))


def test_acquisition_behavioural_demographic_custom(ch_db):
    events = world()
    insert_events(ch_db, events)
    feb, mar = at("2026-02-01 00:00:00"), at("2026-03-01 00:00:00")

    acq = compute_cohort(ch_db, "feb", CohortDefinition(kind="acquisition", start=feb, end=mar), now=NOW)
    want = acquisition_reference(events, "signup", feb, mar)
    assert members(ch_db, "feb") == want and acq.user_count == len(want) > 10

    filters = (PropertyFilter(key="community", value="lagos"), PropertyFilter(key="amount", operator="gt", value=10))
    behavioural = CohortDefinition(
        kind="behavioural", event_name="fund_project", filters=filters, min_count=2, within_days=60
    )
    compute_cohort(ch_db, "backers", behavioural, now=NOW)
    want = behavioural_reference(events, "fund_project", filters, 2, NOW - timedelta(days=60), NOW)
    assert members(ch_db, "backers") == want and len(want) > 3

    traits = (PropertyFilter(key="country", value="NG"), PropertyFilter(key="plan", operator="in", value=["free"]))
    compute_cohort(ch_db, "ng", CohortDefinition(kind="demographic", traits=traits), now=NOW)
    want = demographic_reference(events, traits)
    assert members(ch_db, "ng") == want and len(want) > 10
    # the latest trait matters: someone who moved away from NG is not in the cohort
    first_ng = {e.user_id for e in events if e.name == "identify" and e.properties.get("country") == "NG"}
    assert first_ng - want

    custom = CohortDefinition(
        kind="custom", sql="SELECT person_id, count() FROM events_resolved WHERE event_name = 'watch_ad' "
        "GROUP BY person_id HAVING count() >= 3"
    )
    compute_cohort(ch_db, "ad_fans", custom, now=NOW)
    want = behavioural_reference(events, "watch_ad", (), 3, START, NOW + timedelta(days=365))
    assert members(ch_db, "ad_fans") == want


def test_custom_sql_is_read_only(ch_db):
    insert_events(ch_db, [Event("signup", at("2026-01-02 00:00:00"), user_id="x")])
    for sql in ["INSERT INTO cohort_members VALUES ('x', 'y', now64(3))", "DROP TABLE events",
                "SELECT 1; DROP TABLE events"]:
        with pytest.raises(Exception):  # noqa: B017 - syntax, readonly or validation errors all refuse it
            compute_cohort(ch_db, "evil", CohortDefinition(kind="custom", sql=sql), now=NOW)
    assert ch_db.query("SELECT count() FROM events").result_rows[0][0] == 1
    assert ch_db.query("SELECT count() FROM cohort_members").result_rows[0][0] == 0
    # the shared handle is still writable afterwards (no read-only setting leaked)
    assert ch_db.query("SELECT getSetting('readonly')").result_rows[0][0] == 0


def test_custom_sql_cannot_read_files_or_urls(ch_db, tmp_path):
    from api.readonly import QueryRefused

    secret = tmp_path / "secret.csv"
    secret.write_text("stolen\n")
    attempts = [f"SELECT * FROM file('{secret}', 'CSV', 'c String')", "SELECT * FROM url('http://127.0.0.1:9/', 'CSV')"]
    for sql in attempts:
        with pytest.raises(QueryRefused):
            compute_cohort(ch_db, "leak", CohortDefinition(kind="custom", sql=sql), now=NOW)
    assert ch_db.query("SELECT count() FROM cohort_members").result_rows[0][0] == 0


def test_recomputation_freshness_and_latest_wins(ch_db):
    events = world(seed=5, people=40)
    insert_events(ch_db, events)
    definition = CohortDefinition(kind="behavioural", event_name="watch_ad", start=START, end=NOW, ttl_seconds=3600)
    assert cohort_is_stale(ch_db, "ads")
    first = compute_cohort(ch_db, "ads", definition, now=NOW)
    assert not cohort_is_stale(ch_db, "ads", now=NOW + timedelta(minutes=59))
    assert cohort_is_stale(ch_db, "ads", now=NOW + timedelta(minutes=60))
    more = [Event("watch_ad", NOW - timedelta(days=1), user_id="newcomer", properties={"revenue": 0.1})]
    insert_events(ch_db, more)
    second = compute_cohort(ch_db, "ads", definition, now=NOW + timedelta(hours=2))
    assert second.user_count == first.user_count + 1
    assert latest_computation(ch_db, "ads").computed_at == second.computed_at
    assert "newcomer" in members(ch_db, "ads")


def test_cohort_filters_funnel_and_retention_and_comparison(ch_db):
    events = world(seed=6)
    insert_events(ch_db, events)
    feb, mar = at("2026-02-01 00:00:00"), at("2026-03-01 00:00:00")
    compute_cohort(ch_db, "feb", CohortDefinition(kind="acquisition", start=feb, end=mar), now=NOW)
    compute_cohort(ch_db, "jan", CohortDefinition(kind="acquisition", start=START, end=feb), now=NOW)
    feb_people = acquisition_reference(events, "signup", feb, mar)

    funnel = FunnelDefinition(
        name="signup to fund",
        steps=(FunnelStep(name="signup", event_name="signup"), FunnelStep(name="fund", event_name="fund_project")),
        window_seconds=30 * 86400,
    )
    time_range = TimeRange(start=START, end=NOW)
    got = compute_funnel(ch_db, funnel, time_range, cohort_id="feb")
    want = funnel_reference(events, funnel, START, NOW, people_filter=feb_people)
    assert [s.count for s in got.steps] == want["counts"] and want["counts"][0] == len(feb_people)

    retention = RetentionDefinition(
        start_event=EventSpec(event_name="signup"), return_event=EventSpec(event_name="fund_project"),
        period="week", periods=10,
    )
    settings = AnalysisSettings(timezone="Africa/Lagos")
    got_r = compute_retention(ch_db, retention, time_range, settings, cohort_id="feb")
    only_feb = [e for e in events if (e.user_id or "") in feb_people or e.anonymous_id.replace("d", "u") in feb_people]
    assert [c.counts for c in got_r.cohorts] == retention_reference(only_feb, retention, START, NOW, "Africa/Lagos")

    comparison = compare_cohorts(ch_db, ["jan", "feb"], retention, time_range, settings)
    assert [c.size for c in comparison.cohorts] == [
        len(acquisition_reference(events, "signup", START, feb)), len(feb_people)
    ]
    assert comparison.cohorts[1].retention == got_r


@pytest.mark.parametrize(("period", "tz"), [("month", "UTC"), ("week", "Europe/Berlin"), ("day", "America/New_York")])
def test_lifetime_value_matches_reference(ch_db, period, tz):
    events = world(seed=7)
    insert_events(ch_db, events)
    compute_cohort(ch_db, "early", CohortDefinition(kind="acquisition", start=START, end=at("2026-02-15 00:00:00")),
                   now=NOW)
    definition = LifetimeValueDefinition(period=period, periods=6)
    end = at("2026-03-20 00:00:00")
    settings = AnalysisSettings(timezone=tz, week_start=7)
    got = lifetime_value(ch_db, definition, TimeRange(start=START, end=end), cohort_id="early", settings=settings)
    early = acquisition_reference(events, "signup", START, at("2026-02-15 00:00:00"))
    counts, values = lifetime_value_reference(
        events, early, "signup", [("fund_project", "fee"), ("watch_ad", "revenue")], period, 6, end, tz, 7
    )
    assert got.members == counts
    assert got.cumulative_revenue_per_member == pytest.approx(values, abs=1e-9)
    seen = [v for v in values if v is not None]
    assert len(seen) >= 2 and seen[-1] > seen[0] > 0


def test_lifetime_value_without_cohort_uses_acquisitions_in_range(ch_db):
    events = world(seed=8, people=60)
    insert_events(ch_db, events)
    feb, mar = at("2026-02-01 00:00:00"), at("2026-03-01 00:00:00")
    definition = LifetimeValueDefinition(revenue=(RevenueSource(event_name="fund_project", property="amount"),),
                                         period="week", periods=4)
    got = lifetime_value(ch_db, definition, TimeRange(start=feb, end=mar))
    people = acquisition_reference(events, "signup", feb, mar)
    counts, values = lifetime_value_reference(events, people, "signup", [("fund_project", "amount")], "week", 4, mar)
    assert got.members == counts and got.cumulative_revenue_per_member == pytest.approx(values, abs=1e-9)
