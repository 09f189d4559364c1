"""The four pre-built dashboards (Executive, Financial, Community, Projects), created on first start.

They are owned by the bootstrap admin, readable by every key and editable by admins; anyone
with the analyst role duplicates one to make it their own. Each is identified by a slug, so
seeding is idempotent and never overwrites an admin's edits.

Definitions that are not plain catalogue metrics live here as read-only SQL, documented:

- retention rate (weekly): of the people active in the previous week, the share active again
  in this week (weeks start on ``settings.week_start`` in the reporting timezone). It reads the
  activity spans ``activity_spans`` (first and last instant per actor and 7-day UTC bucket,
  exact for any zone, one row per actor and 12-bucket span: see sinks/migrations.py), so a
  range of up to 7 buckets (30 days and the week before) is one row per actor, and stitches
  anonymous devices to people through ``identities`` as ``events_resolved`` does. Each bucket
  holds at most one week start, its *turn*: the widget computes the turns once per request and
  places an actor's first and last instant in a bucket on either side of it, with no date
  arithmetic per row. A bucket (Thursday 00:00 UTC to the next) can hold two week starts only
  when weeks start on Thursday, which falls within an hour or so of the buckets' edges in zones
  near UTC: it happened where a date was skipped (Kiritimati 1994, Samoa 2011). Every other week
  start lies at least 10 hours from the edges in every zone (offsets are within -12:00..+14:00).
  The events themselves are read only for the stretch between the last week start and a range
  end with events after it in its bucket, for weeks starting on Thursday, and for ranges over 62
  weeks (a person's weeks are bits of one UInt64), stitched the same way;
- float balance: running sum over the range of money entering the platform's hands
  (contributions net of fees, loan repayments) minus money leaving it (payouts of funded
  projects, refunds of expired ones, loan disbursements);
- gross margin: (revenue - cost of revenue) / revenue per day, where revenue is processing fees
  plus ad revenue and the cost of revenue is what the card network charges on each contribution
  (``CARD_COST_RATE`` of the amount plus ``CARD_COST_FIXED``).
"""

from __future__ import annotations

import hashlib
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from api.auth import BOOTSTRAP_ADMIN_EMAIL, find_or_create_user
from api.dashboards.models import DashboardIn
from api.metadata.models import Dashboard, DashboardWidget
from sinks.migrations import ACTIVITY_BUCKET_SECONDS, ACTIVITY_SPAN_STRIDE_SECONDS

CARD_COST_RATE = 0.022
CARD_COST_FIXED = 0.20


def _week_of(instant: str) -> str:
    """SQL for the start (a Date) of the reporting week containing ``instant``.

    The Monday on or before the local date moved back by ``week_start - 1`` days, moved forward
    again: the latest day on or before the local date that is a ``week_start`` weekday.
    """
    return f"(toMonday(toDate({instant}, {{tz:String}}) - ({{week_start:UInt8}} - 1)) + ({{week_start:UInt8}} - 1))"


_START = "{start:DateTime64(3, 'UTC')}"
_END = "{end:DateTime64(3, 'UTC')}"
_BUCKET = ACTIVITY_BUCKET_SECONDS
_STRIDE = ACTIVITY_SPAN_STRIDE_SECONDS
#: The spans the widget reads: every second one from ``first_span`` on (spans cover two strides).
_TILES = (
    f"span >= first_span AND span < {_END} "
    f"AND (toUnixTimestamp(span) - toUnixTimestamp(first_span)) % {2 * _STRIDE} = 0"
)
#: Index of bucket ``b`` in the per-bucket arrays (``week_bits``, ``turns``, ``cuts``), which start at ``first_span``.
_AT = f"intDiv(toUInt32(b) - toUInt32(first_span), {_BUCKET}) + 1"

RETENTION_SQL = f"""
WITH
    -- the range's 7-day UTC buckets: from the one holding start - 10 days (the week before the first
    -- reported one starts at most 8 days 16 hours before start, in any zone) to the one holding the end
    toDateTime(intDiv(toUnixTimestamp({_START} - INTERVAL 10 DAY), {_BUCKET}) * {_BUCKET}, 'UTC') AS first_bucket,
    toDateTime(intDiv(toUnixTimestamp({_END}), {_BUCKET}) * {_BUCKET}, 'UTC') AS end_bucket,
    toDateTime(intDiv(toUnixTimestamp(first_bucket), {_STRIDE}) * {_STRIDE}, 'UTC') AS first_span,
    {_week_of("first_bucket")} AS base_week,
    {_week_of(f"{_END} - INTERVAL 1 MILLISECOND")} AS last_week,
    toDateTime64(toDateTime(last_week, {{tz:String}}), 3, 'UTC') AS last_turn,
    -- per bucket from first_span on: the bit of the week it starts in (bit i = base_week + 7 i); its
    -- turn, the start of the next week (the one week start inside it, when it holds one); and its cut,
    -- the turn or the end if earlier. Buckets before first_bucket place nothing: cut at the epoch,
    -- turn at the end.
    arrayMap(n -> toDateTime(n * {_BUCKET}, 'UTC'),
             range(intDiv(toUnixTimestamp(first_span), {_BUCKET}), intDiv(toUnixTimestamp(end_bucket), {_BUCKET}) + 1))
        AS buckets,
    arrayMap(b -> if(b < first_bucket, 0, intDiv({_week_of("b")} - base_week, 7)), buckets) AS week_bits,
    arrayMap(b -> if(b < first_bucket, {_END}, toDateTime64(toDateTime({_week_of("b")} + 7, {{tz:String}}), 3, 'UTC')),
             buckets) AS turns,
    arrayMap((b, t) -> if(b < first_bucket, toDateTime64(0, 3, 'UTC'), least(t, {_END})), buckets, turns) AS cuts,
    -- a person's active weeks are bits of one UInt64, and each bucket must hold at most one week
    -- start: so for every week start but Thursday (see the module docstring); else the events answer
    {{week_start:UInt8}} != 4 AND intDiv(last_week - base_week, 7) <= 62 AS from_rollup,
    -- events after the end inside its bucket: someone's last instant there may then be after the
    -- end, and which of their events fall between the last week start and the end only the events say
    (SELECT count() > 0 FROM (
        SELECT 1 FROM events WHERE timestamp >= {_END} AND timestamp < end_bucket + INTERVAL 7 DAY LIMIT 1
     )) AS end_cut,
    activity AS (
        -- actors' active weeks from the spans (see sinks/migrations.py, migrations 8 and 9): in each
        -- bucket, the week before its turn if first seen before it (and before the end), the week
        -- from its turn if last seen at or after it (first seen, when last seen after the end)
        SELECT anonymous, actor,
               arrayReduce('groupBitOr', arrayMap((i, f, l) -> bitOr(
                   bitShiftLeft(toUInt64(f < cuts[i]), week_bits[i]),
                   bitShiftLeft(toUInt64(f < {_END} AND if(l < {_END}, l, f) >= turns[i]), week_bits[i] + 1)),
                   arrayMap(b -> {_AT}, first_seen.1), first_seen.2, last_seen.2)) AS weeks
        FROM activity_spans
        WHERE from_rollup AND {_TILES}
        UNION ALL
        SELECT user_id = '' AS anonymous, if(user_id != '', user_id, anonymous_id) AS actor,
               bitShiftLeft(toUInt64(1), intDiv(last_week - base_week, 7)) AS weeks
        FROM events
        WHERE from_rollup AND end_cut AND timestamp >= last_turn AND timestamp < {_END}
    ),
    per_person AS (
        -- people as events_resolved stitches them: a device linked to a user is that user (only the
        -- links of the range's anonymous actors are read)
        SELECT if(a.anonymous AND l.user_id != '', l.user_id, a.actor) AS person_id, groupBitOr(a.weeks) AS weeks
        FROM activity AS a
        LEFT ANY JOIN (
            SELECT anonymous_id, argMin(user_id, linked_at) AS user_id FROM identities
            WHERE anonymous_id IN (SELECT actor FROM activity_spans WHERE from_rollup AND anonymous AND {_TILES})
            GROUP BY anonymous_id
        ) AS l ON l.anonymous_id = if(a.anonymous, a.actor, '')
        GROUP BY person_id
    ),
    per_person_raw AS (
        -- every person's active weeks from the events, when the rollup cannot answer (both sides
        -- read nothing otherwise); duplicates of an event change no set, so no FINAL
        SELECT if(e.user_id != '', e.user_id, if(l.user_id != '', l.user_id, e.anonymous_id)) AS person_id,
               groupUniqArray({_week_of("e.timestamp")}) AS weeks
        FROM (
            SELECT user_id, anonymous_id, timestamp FROM events
            WHERE NOT from_rollup AND timestamp >= {_START} - INTERVAL 14 DAY AND timestamp < {_END}
        ) AS e
        LEFT ANY JOIN (
            SELECT anonymous_id, argMin(user_id, linked_at) AS user_id FROM identities
            WHERE NOT from_rollup GROUP BY anonymous_id
        ) AS l ON l.anonymous_id = if(e.user_id = '', e.anonymous_id, '')
        GROUP BY person_id
    )
SELECT t, retention_rate FROM (
    SELECT toDateTime(week, {{tz:String}}) AS t, again / before AS retention_rate
    FROM (
        -- people per combination of active weeks first: far fewer rows than people
        SELECT base_week + 7 * (p + 1) AS week, sum(people) AS before, sumIf(people, bitTest(weeks, p + 1)) AS again
        FROM (SELECT weeks, count() AS people FROM per_person GROUP BY weeks)
        ARRAY JOIN bitPositionsToArray(weeks) AS p
        GROUP BY week
    )
    WHERE week >= toDate({_START}, {{tz:String}}) AND toDateTime(week, {{tz:String}}) < {_END}
    UNION ALL
    SELECT toDateTime(week, {{tz:String}}) AS t,
           countIf(has(weeks, week) AND has(weeks, week - 7)) / countIf(has(weeks, week - 7)) AS retention_rate
    FROM per_person_raw
    ARRAY JOIN arrayDistinct(arrayConcat(weeks, arrayMap(x -> x + 7, weeks))) AS week
    WHERE week >= toDate({_START}, {{tz:String}}) AND toDateTime(week, {{tz:String}}) < {_END}
    GROUP BY week
    HAVING countIf(has(weeks, week - 7)) > 0
)
ORDER BY t
""".strip()

FLOAT_BALANCE_SQL = """
SELECT t, sum(net) OVER (ORDER BY t ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW) AS float_balance
FROM (
    SELECT toDateTime(toDate(timestamp, {tz:String}), {tz:String}) AS t,
           sum(multiIf(
               event_name = 'fund_project', ifNull(amount, 0) - JSONExtractFloat(properties, 'fee'),
               event_name = 'loan_repaid', ifNull(amount, 0),
               event_name = 'loan_disbursed', -ifNull(amount, 0),
               -JSONExtractFloat(properties, 'raised_amount'))) AS net
    FROM events_resolved
    WHERE timestamp >= {start:DateTime64(3, 'UTC')} AND timestamp < {end:DateTime64(3, 'UTC')}
      AND event_name IN ('fund_project', 'loan_repaid', 'loan_disbursed', 'project_funded', 'project_expired')
    GROUP BY t
)
ORDER BY t
""".strip()

GROSS_MARGIN_SQL = f"""
SELECT t, (revenue - cost) / revenue AS gross_margin
FROM (
    SELECT toDateTime(toDate(timestamp, {{tz:String}}), {{tz:String}}) AS t,
           sumIf(JSONExtractFloat(properties, 'fee'), event_name = 'fund_project')
             + sumIf(JSONExtractFloat(properties, 'revenue'), event_name = 'watch_ad') AS revenue,
           sumIf(ifNull(amount, 0) * {CARD_COST_RATE} + {CARD_COST_FIXED}, event_name = 'fund_project') AS cost
    FROM events_resolved
    WHERE timestamp >= {{start:DateTime64(3, 'UTC')}} AND timestamp < {{end:DateTime64(3, 'UTC')}}
      AND event_name IN ('fund_project', 'watch_ad')
    GROUP BY t
)
WHERE revenue > 0
ORDER BY t
""".strip()

LEADERBOARD_SQL = """
SELECT community,
       uniqExactIf(person_id, event_name = 'join_community') AS new_members,
       uniqExactIf(person_id, event_name = 'fund_project') AS backers,
       sumIf(ifNull(amount, 0), event_name = 'fund_project') AS raised,
       countIf(event_name = 'project_funded') AS projects_funded
FROM events_resolved
WHERE timestamp >= {start:DateTime64(3, 'UTC')} AND timestamp < {end:DateTime64(3, 'UTC')} AND community != ''
GROUP BY community
ORDER BY raised DESC, community
LIMIT 20
""".strip()


def _metric(
    title: str, widget_type: str, metric: str, x: int, y: int, w: int = 4, h: int = 3, **source: Any
) -> dict[str, Any]:
    return {
        "title": title,
        "widget_type": widget_type,
        "position": {"x": x, "y": y, "w": w, "h": h},
        "data_source": {"kind": "metric", "metric": metric, **source},
    }


def _metrics(
    title: str, widget_type: str, metrics: list[str], labels: list[str], x: int, y: int, w: int = 6, h: int = 4
) -> dict[str, Any]:
    return {
        "title": title,
        "widget_type": widget_type,
        "position": {"x": x, "y": y, "w": w, "h": h},
        "data_source": {"kind": "metrics", "metrics": metrics, "labels": labels},
    }


def _sql(title: str, widget_type: str, sql: str, x: int, y: int, w: int = 6, h: int = 4) -> dict[str, Any]:
    return {
        "title": title,
        "widget_type": widget_type,
        "position": {"x": x, "y": y, "w": w, "h": h},
        "data_source": {"kind": "sql", "sql": sql},
    }


REVENUE_SOURCES = (["ad_revenue", "processing_fees"], ["Ads", "Processing fees"])

PREBUILT: dict[str, dict[str, Any]] = {
    "executive": {
        "name": "Executive",
        "description": "Revenue, active people, projects, loans, community growth and retention at a glance.",
        "widgets": [
            _metrics("Total revenue by source", "bar", *REVENUE_SOURCES, x=0, y=0, w=8),
            _metric("Daily active users", "line", "dau", 8, 0, granularity="day"),
            _metric("Weekly active users", "line", "wau", 0, 4, granularity="week"),
            _metric("Monthly active users", "line", "mau", 4, 4, granularity="month"),
            _metric("Projects funded", "metric_card", "projects_funded", 8, 4),
            _metric("Loans disbursed (amount)", "metric_card", "loans_disbursed", 0, 7),
            _metric("Community growth (joins)", "line", "new_members", 4, 7),
            _sql("Weekly retention rate", "line", RETENTION_SQL, 8, 7, w=4, h=3),
        ],
    },
    "financial": {
        "name": "Financial",
        "description": "Revenue by stream, transaction volume and size, float, fees and margin.",
        "widgets": [
            _metrics("Revenue by stream", "bar", *REVENUE_SOURCES, x=0, y=0),
            _metric("Transaction volume", "line", "gmv", 6, 0, w=6, h=4),
            _metric("Average transaction size", "line", "average_transaction_size", 0, 4),
            _sql("Float balance (running net inflow)", "line", FLOAT_BALANCE_SQL, 4, 4, w=4, h=3),
            _metric("Processing fees", "metric_card", "processing_fees", 8, 4),
            _sql("Gross margin", "line", GROSS_MARGIN_SQL, 0, 7),
        ],
    },
    "community": {
        "name": "Community",
        "description": "Community activity, engagement, project success, geography and the leaderboard.",
        "widgets": [
            _metric("Community activity", "line", "community_activity", 0, 0, w=6, h=4, breakdown="community", top_n=5),
            _metric("Member engagement (events per active person)", "line", "events_per_user", 6, 0, w=6, h=4),
            _metric("Project success rate", "line", "success_rate", 0, 4, granularity="week"),
            _metric(
                "Geographic distribution (active people)",
                "geo_map",
                "active_users",
                4,
                4,
                breakdown="country",
                top_n=50,
            ),
            _sql("Community leaderboard", "table", LEADERBOARD_SQL, 0, 8, w=12, h=5),
        ],
    },
    "projects": {
        "name": "Projects",
        "description": "Funding velocity, success rates, categories, time to fund and backer conversion.",
        "widgets": [
            _metric("Funding velocity (money contributed)", "line", "gmv", 0, 0, w=6, h=4),
            _metric("Success rate", "metric_card", "success_rate", 6, 0),
            _metric("Projects by category", "pie", "projects_created", 0, 4, breakdown="category", top_n=10),
            _metric("Average funding time (days)", "metric_card", "average_funding_time", 4, 4),
            _metric("Backer conversion", "line", "backer_conversion", 8, 4, granularity="week"),
        ],
    },
}


#: SHA-256 of the weekly retention widget's earlier SQL texts: a pre-built widget still holding
#: one of them exactly (nobody edited it) is moved to ``RETENTION_SQL`` at start.
SUPERSEDED_RETENTION_SQL = frozenset(
    {
        "7d087e712b38afe20c8647f352fe06b6aa7103e280b1b7cd09d555d931529cd6",  # every event, events_resolved
        "441977bb8f974ae01714e445d74a051604eb95e6da12e2580a46b48eb32cbe2e",  # the rollup, stitched in two reads
        "c412c96b2120b4365a4e4d9058b9ed0faa3432313ca3da4532e9f2ce9d8e6a6e",  # the rollup, fallback via events_resolved
        "d43672d77923ea040e0a5c46faaa5e50704530eea406ed93b57267037a0cd12c",  # a row per actor and bucket
    }
)


def ensure_prebuilt(sessions: sessionmaker[Session]) -> list[str]:
    """Create the pre-built dashboards that do not exist yet; return the slugs created.

    Existing ones are left as they are, except a widget whose SQL is an earlier text of one of
    ours, unedited (see :data:`SUPERSEDED_RETENTION_SQL`): it gets the current text.
    """
    created: list[str] = []
    from api.routes.dashboards import create_dashboard_row

    with sessions() as session:
        existing = set(session.scalars(select(Dashboard.prebuilt_slug).where(Dashboard.prebuilt_slug.is_not(None))))
        owner = find_or_create_user(session, BOOTSTRAP_ADMIN_EMAIL, "Administrator")
        for slug, definition in PREBUILT.items():
            if slug in existing:
                continue
            create_dashboard_row(session, owner.id, DashboardIn.model_validate(definition), prebuilt_slug=slug)
            created.append(slug)
        _upgrade_superseded_sql(session)
        session.commit()
    return created


def _upgrade_superseded_sql(session: Session) -> None:
    """Give pre-built widgets still holding an earlier SQL text of ours (unedited) the current text."""
    widgets = session.scalars(select(DashboardWidget).join(Dashboard).where(Dashboard.prebuilt_slug.is_not(None))).all()
    for widget in widgets:
        source = dict(widget.data_source or {})
        sql = source.get("sql")
        superseded = isinstance(sql, str) and hashlib.sha256(sql.encode()).hexdigest() in SUPERSEDED_RETENTION_SQL
        if source.get("kind") == "sql" and superseded:
            widget.data_source = {**source, "sql": RETENTION_SQL}
