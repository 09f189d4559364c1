"""Versioned ClickHouse DDL, applied idempotently at start.

Each table's DDL, engine and sort key live here, next to the sinks that write them.
A migration is (version, description, statements); applied versions are recorded in
``schema_migrations``. Statements use ``IF NOT EXISTS`` so a half-applied migration
can be re-run safely. Never edit an applied migration: append a new one.

Why these engines
-----------------
``events`` is a ``ReplacingMergeTree`` whose sort key ends in ``event_id``: a batch
replayed after a crash (same events, possibly different batch boundaries) collapses
into the rows already there. Readers that need exact counts before background merges
use ``FINAL`` (cheap here: an event's partition is fixed by its own timestamp, so
``do_not_merge_across_partitions_select_final`` applies). Sinks also pass an
``insert_deduplication_token`` (topic:partition:first-last offset) so that an exact
retry of the same batch is dropped at insert time.

``activity_weeks`` (migration 8)
--------------------------------
One row per (event name, actor, bucket) with the first and last instant the actor did that
event in the bucket; the event name ``$any`` covers every event. An actor is the event's
``user_id``, or its ``anonymous_id`` when it has none (``anonymous`` is then true): readers
stitch anonymous actors to people through ``identities`` exactly as ``events_resolved`` does,
so links that arrive later still apply. A bucket is a 7-day UTC interval starting Thursday
00:00 UTC (whole multiples of 7 days from the epoch).

Exact for any reporting timezone: a period boundary (a local week start or a local first of
the month) inside a bucket splits the actor's activity there into at most two periods; the
first instant lies in the earlier one and the last instant in the later one, and both are
real events. So the periods an actor was active in during the bucket are exactly
{period(first_seen), period(last_seen)}, whatever the zone's offset (whole hours, :30, :45)
or DST, as long as a bucket holds at most one boundary. Week starts on Monday or Sunday fall
between Saturday 10:00 and Monday 12:00 UTC in every zone (offsets are within -12:00..+14:00),
far from the Thursday bucket edges, so each bucket holds exactly one; readers check the
property for other week starts and read raw events where it fails. Months are longer than a
bucket, so a bucket never holds two month starts. A range ending inside a bucket is one more
cut: readers take the events between the last boundary and the range end from ``events`` when
an actor's row straddles both.

Idempotent: ``events`` is a ReplacingMergeTree, so a replayed event is a second row until a
merge; the view sees it twice, and a minimum and a maximum do not change when a value is
added twice. Rows of the same key from different inserts are combined by merges
(AggregatingMergeTree); readers group by actor anyway, so unmerged rows are correct too.

``activity_spans`` (migration 9)
--------------------------------
The same first and last instants of any event per actor and bucket, packed into one row per
actor and *span*: 12 consecutive buckets, with a span starting every 6 buckets (at multiples of
6 weeks from the epoch), so every bucket lies in exactly two spans. ``first_seen`` and
``last_seen`` map each bucket start of the span in which the actor was active to its first and
last instant (``minMap``/``maxMap`` tuples of sorted keys and values).

Why: a reader that needs up to 7 consecutive buckets (a 30-day range and the week before it)
finds them all in one span, the one starting at or before the first of them within 6 buckets,
so it reads and groups one row per actor instead of one per actor and bucket. Longer ranges
read every second span from that one on, which tile the range without overlap. The price is at
insert: every bucket row is written to two spans. The view reads the ``$any`` rows that the
``activity_weeks`` view writes (a view on a view's table sees each of its inserted blocks), so
an insert's events are grouped by actor and bucket once, not once per view.

Idempotent for the same reasons as ``activity_weeks``: per bucket a minimum and a maximum,
combined by merges key by key.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from clickhouse_connect.driver.client import Client

log = logging.getLogger(__name__)


#: Columns of ``events_resolved`` besides ``person_id`` (the event's own, materialised ones included).
_RESOLVED_COLUMNS = (
    "event_id, event_type, event_name, user_id, anonymous_id, session_id, timestamp, received_at, properties, "
    "context, amount, currency, project_id, community, category, country, device_type, utm_source"
)
_JOINED_COLUMNS = ", ".join(f"e.{name} AS {name}" for name in _RESOLVED_COLUMNS.split(", "))
#: Version of an identity link: larger for earlier links, so merges keep a device's first person.
_LINK_EARLINESS = "toUInt64(greatest(0, 99999999999999 - toUnixTimestamp64Milli(linked_at)))"

#: Length of an ``activity_weeks`` bucket in seconds; buckets start at multiples of it from the
#: Unix epoch, a Thursday, so every bucket runs from Thursday 00:00 UTC to the next.
ACTIVITY_BUCKET_SECONDS = 7 * 86400
#: ``activity_weeks`` rows of this event name cover every event.
ANY_EVENT_NAME = "$any"
_ACTIVITY_WEEKS_SELECT = f"""
SELECT name AS event_name, user_id = '' AS anonymous,
       toDateTime(intDiv(toUnixTimestamp(ts), {ACTIVITY_BUCKET_SECONDS}) * {ACTIVITY_BUCKET_SECONDS}, 'UTC') AS bucket,
       if(user_id != '', user_id, anonymous_id) AS actor, min(ts) AS first_seen, max(ts) AS last_seen
FROM (SELECT event_name AS own_name, user_id, anonymous_id, timestamp AS ts FROM events)
ARRAY JOIN [toString(own_name), '{ANY_EVENT_NAME}'] AS name
GROUP BY name, anonymous, bucket, actor
"""
#: A span of ``activity_spans`` starts every this many seconds (6 buckets) and covers two of them.
ACTIVITY_SPAN_STRIDE_SECONDS = 6 * ACTIVITY_BUCKET_SECONDS
_ACTIVITY_SPANS_SELECT = f"""
SELECT anonymous, span, actor,
       (arrayMap(x -> x.1, seen), arrayMap(x -> x.2, seen)) AS first_seen,
       (arrayMap(x -> x.1, seen), arrayMap(x -> x.3, seen)) AS last_seen
FROM (
    SELECT anonymous, span, actor, arraySort(groupArray((bucket, first, last))) AS seen
    FROM (
        SELECT anonymous, actor, bucket, intDiv(toUnixTimestamp(bucket), {ACTIVITY_SPAN_STRIDE_SECONDS}) AS stride,
               min(first_seen) AS first, max(last_seen) AS last
        FROM activity_weeks
        WHERE event_name = '{ANY_EVENT_NAME}'
        GROUP BY anonymous, actor, bucket
    )
    -- the two spans holding the bucket: the one starting in its 6-bucket stride and the one before
    -- (none before the epoch)
    ARRAY JOIN arrayMap(k -> toDateTime(k * {ACTIVITY_SPAN_STRIDE_SECONDS}, 'UTC'),
                        arrayFilter(k -> k >= 0, [toInt64(stride), toInt64(stride) - 1])) AS span
    GROUP BY anonymous, span, actor
)
"""


@dataclass(frozen=True)
class Migration:
    """One step of the ClickHouse schema."""

    version: int
    description: str
    statements: tuple[str, ...]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "raw events and rejected input",
        (
            """
            CREATE TABLE IF NOT EXISTS events (
                event_id UUID,
                event_type LowCardinality(String),
                event_name LowCardinality(String),
                user_id String,
                anonymous_id String,
                session_id String,
                timestamp DateTime64(3, 'UTC'),
                received_at DateTime64(3, 'UTC'),
                source LowCardinality(String),
                properties String CODEC(ZSTD(3)),
                context String CODEC(ZSTD(3)),
                amount Nullable(Float64) MATERIALIZED JSONExtract(properties, 'amount', 'Nullable(Float64)'),
                currency LowCardinality(String) MATERIALIZED JSONExtractString(properties, 'currency'),
                project_id String MATERIALIZED JSONExtractString(properties, 'project_id'),
                community LowCardinality(String) MATERIALIZED JSONExtractString(properties, 'community'),
                category LowCardinality(String) MATERIALIZED JSONExtractString(properties, 'category'),
                country LowCardinality(String) MATERIALIZED JSONExtractString(context, 'location', 'country'),
                device_type LowCardinality(String) MATERIALIZED JSONExtractString(context, 'device', 'type'),
                utm_source LowCardinality(String) MATERIALIZED JSONExtractString(context, 'campaign', 'source')
            )
            ENGINE = ReplacingMergeTree
            PARTITION BY toYYYYMM(timestamp)
            ORDER BY (event_name, toDate(timestamp), user_id, timestamp, event_id)
            SETTINGS non_replicated_deduplication_window = 1000
            """,
            """
            CREATE TABLE IF NOT EXISTS events_rejected (
                id UUID,
                rejected_at DateTime64(3, 'UTC'),
                source LowCardinality(String),
                reason LowCardinality(String),
                detail String,
                payload String CODEC(ZSTD(3))
            )
            ENGINE = ReplacingMergeTree
            PARTITION BY toYYYYMM(rejected_at)
            ORDER BY (reason, rejected_at, id)
            SETTINGS non_replicated_deduplication_window = 1000
            """,
        ),
    ),
    Migration(
        2,
        "sessions, metric snapshots, anomalies and identity stitching",
        (
            # Latest version of a session wins (version = events seen so far, then last_seen_at).
            """
            CREATE TABLE IF NOT EXISTS sessions (
                session_id String,
                user_id String,
                device_id String,
                started_at DateTime64(3, 'UTC'),
                last_seen_at DateTime64(3, 'UTC'),
                duration_ms UInt64,
                page_views UInt32,
                events UInt32,
                device LowCardinality(String),
                browser LowCardinality(String),
                os LowCardinality(String),
                country LowCardinality(String),
                referrer String,
                utm_source LowCardinality(String),
                utm_medium LowCardinality(String),
                utm_campaign LowCardinality(String),
                closed UInt8,
                version UInt64
            )
            ENGINE = ReplacingMergeTree(version)
            PARTITION BY toYYYYMM(started_at)
            ORDER BY (toDate(started_at), session_id)
            """,
            # One value per (metric, period, period_start, dimensions): a later update replaces it.
            """
            CREATE TABLE IF NOT EXISTS metric_snapshots (
                metric_type LowCardinality(String),
                period LowCardinality(String),
                period_start DateTime64(3, 'UTC'),
                period_end DateTime64(3, 'UTC'),
                dimensions Map(LowCardinality(String), String),
                dimensions_key String,
                value Float64,
                source LowCardinality(String),
                computed_at DateTime64(3, 'UTC')
            )
            ENGINE = ReplacingMergeTree(computed_at)
            PARTITION BY toYYYYMM(period_start)
            ORDER BY (metric_type, period, period_start, dimensions_key)
            """,
            # Status changes are new versions of the same anomaly id.
            """
            CREATE TABLE IF NOT EXISTS anomalies (
                id UUID,
                metric_type LowCardinality(String),
                period LowCardinality(String),
                dimensions Map(LowCardinality(String), String),
                dimensions_key String,
                detected_at DateTime64(3, 'UTC'),
                window_start DateTime64(3, 'UTC'),
                severity LowCardinality(String),
                expected Float64,
                actual Float64,
                deviation Float64,
                score Float64,
                detector LowCardinality(String),
                description String,
                status LowCardinality(String),
                resolved_by String,
                resolved_at Nullable(DateTime64(3, 'UTC')),
                updated_at DateTime64(3, 'UTC')
            )
            ENGINE = ReplacingMergeTree(updated_at)
            ORDER BY id
            """,
            # Identity stitching: every event that carries both ids links the device to the person.
            """
            CREATE TABLE IF NOT EXISTS identities (
                anonymous_id String,
                user_id String,
                linked_at DateTime64(3, 'UTC')
            )
            ENGINE = ReplacingMergeTree(linked_at)
            ORDER BY anonymous_id
            """,
            """
            CREATE MATERIALIZED VIEW IF NOT EXISTS identities_mv TO identities AS
            SELECT anonymous_id, argMin(uid, ts) AS user_id, min(ts) AS linked_at
            FROM (SELECT anonymous_id, user_id AS uid, timestamp AS ts FROM events
                  WHERE anonymous_id != '' AND user_id != '')
            GROUP BY anonymous_id
            """,
            # What analyses read: deduplicated events with the person they belong to after stitching.
            """
            CREATE VIEW IF NOT EXISTS events_resolved AS
            SELECT
                e.event_id AS event_id, e.event_type AS event_type, e.event_name AS event_name,
                e.user_id AS user_id, e.anonymous_id AS anonymous_id, e.session_id AS session_id,
                e.timestamp AS timestamp, e.received_at AS received_at, e.properties AS properties,
                e.context AS context, e.amount AS amount, e.currency AS currency, e.project_id AS project_id,
                e.community AS community, e.category AS category, e.country AS country,
                e.device_type AS device_type, e.utm_source AS utm_source,
                multiIf(e.user_id != '', e.user_id, i.user_id != '', i.user_id, e.anonymous_id) AS person_id
            FROM events AS e FINAL
            LEFT JOIN (
                SELECT anonymous_id, argMin(user_id, linked_at) AS user_id FROM identities GROUP BY anonymous_id
            ) AS i ON i.anonymous_id = e.anonymous_id
            """,
        ),
    ),
    Migration(
        3,
        "computed cohort membership",
        (
            # One row per (cohort, computation, person); analyses read the latest finished computation.
            """
            CREATE TABLE IF NOT EXISTS cohort_members (
                cohort_id String,
                person_id String,
                computed_at DateTime64(3, 'UTC')
            )
            ENGINE = ReplacingMergeTree
            ORDER BY (cohort_id, computed_at, person_id)
            TTL toDateTime(computed_at) + INTERVAL 30 DAY
            """,
            # Written after the members: a computation is visible once its row is here.
            """
            CREATE TABLE IF NOT EXISTS cohorts_computed (
                cohort_id String,
                user_count UInt64,
                computed_at DateTime64(3, 'UTC'),
                expires_at DateTime64(3, 'UTC')
            )
            ENGINE = ReplacingMergeTree
            ORDER BY (cohort_id, computed_at)
            """,
        ),
    ),
    Migration(
        4,
        "cohort membership kept until superseded, not by age",
        (
            # A wall-clock TTL would drop a cohort that is simply not recomputed for a month;
            # the cohort computation deletes superseded computations itself.
            "ALTER TABLE cohort_members REMOVE TTL",
        ),
    ),
    Migration(
        5,
        "events with the session the stream put them in",
        (
            # Producers cannot know the session an event ends up in; the stream decides it. A
            # device's sessions tile its timeline, so an event belongs to the device's latest
            # session started at or before it: an ASOF join on (device, time) against sessions.
            """
            CREATE VIEW IF NOT EXISTS events_sessionized AS
            SELECT e.*, s.session_id AS stream_session_id
            FROM (
                SELECT *, if(anonymous_id != '', anonymous_id, user_id) AS device_id FROM events_resolved
            ) AS e
            ASOF LEFT JOIN (
                SELECT session_id, device_id, started_at FROM sessions FINAL
            ) AS s ON e.device_id = s.device_id AND e.timestamp >= s.started_at
            """,
        ),
    ),
    Migration(
        6,
        "identity links keep every link, so the earliest one wins after merges",
        (
            # identities was a ReplacingMergeTree(linked_at) keyed by device: background merges kept a
            # device's LATEST link while readers take the earliest (argMin), so a device later used by
            # a second person changed owners after a merge. Links are now kept as inserted (one row per
            # device per insert block) and readers' argMin decides. The links are derivable from
            # events, so the table is rebuilt from them.
            "DROP VIEW IF EXISTS identities_mv",
            "DROP TABLE IF EXISTS identities",
            """
            CREATE TABLE IF NOT EXISTS identities (
                anonymous_id String,
                user_id String,
                linked_at DateTime64(3, 'UTC')
            )
            ENGINE = MergeTree
            ORDER BY (anonymous_id, linked_at)
            """,
            """
            CREATE MATERIALIZED VIEW IF NOT EXISTS identities_mv TO identities AS
            SELECT anonymous_id, argMin(uid, ts) AS user_id, min(ts) AS linked_at
            FROM (SELECT anonymous_id, user_id AS uid, timestamp AS ts FROM events
                  WHERE anonymous_id != '' AND user_id != '')
            GROUP BY anonymous_id
            """,
            """
            INSERT INTO identities
            SELECT anonymous_id, argMin(user_id, timestamp), min(timestamp)
            FROM events FINAL
            WHERE anonymous_id != '' AND user_id != ''
            GROUP BY anonymous_id
            """,
        ),
    ),
    Migration(
        7,
        "identity links collapse to one per device; events_resolved joins only anonymous events",
        (
            # Links were kept as inserted: one row per device per insert block, so a busy device had
            # thousands and every read grouped them all. Now merges keep the earliest link of each
            # device (a ReplacingMergeTree keeps the row with the greatest version, so the version is
            # the link time counted backwards); readers still take argMin, which is exact before
            # merges too. Rebuilt from events like migration 6.
            "DROP VIEW IF EXISTS identities_mv",
            "DROP TABLE IF EXISTS identities",
            f"""
            CREATE TABLE IF NOT EXISTS identities (
                anonymous_id String,
                user_id String,
                linked_at DateTime64(3, 'UTC'),
                earliness UInt64 DEFAULT {_LINK_EARLINESS}
            )
            ENGINE = ReplacingMergeTree(earliness)
            ORDER BY anonymous_id
            """,
            """
            CREATE MATERIALIZED VIEW IF NOT EXISTS identities_mv TO identities AS
            SELECT anonymous_id, argMin(uid, ts) AS user_id, min(ts) AS linked_at
            FROM (SELECT anonymous_id, user_id AS uid, timestamp AS ts FROM events
                  WHERE anonymous_id != '' AND user_id != '')
            GROUP BY anonymous_id
            """,
            """
            INSERT INTO identities (anonymous_id, user_id, linked_at)
            SELECT anonymous_id, argMin(user_id, timestamp), min(timestamp)
            FROM events FINAL
            WHERE anonymous_id != '' AND user_id != ''
            GROUP BY anonymous_id
            """,
            # An event with a user id is that person's: only events without one need the links.
            # Splitting the two keeps the join to the (usually few) anonymous events; predicates
            # on the view reach both branches.
            f"""
            CREATE OR REPLACE VIEW events_resolved AS
            SELECT {_RESOLVED_COLUMNS}, user_id AS person_id
            FROM events FINAL
            WHERE user_id != ''
            UNION ALL
            SELECT {_JOINED_COLUMNS}, if(i.user_id != '', i.user_id, e.anonymous_id) AS person_id
            FROM (SELECT {_RESOLVED_COLUMNS} FROM events FINAL WHERE user_id = '') AS e
            LEFT ANY JOIN (
                SELECT anonymous_id, argMin(user_id, linked_at) AS user_id FROM identities GROUP BY anonymous_id
            ) AS i ON i.anonymous_id = e.anonymous_id
            """,
        ),
    ),
    Migration(
        8,
        "weekly activity rollup: who was active in each 7-day UTC bucket, per event name and for any event",
        (
            # Why the first and last instant per 7-day UTC bucket are enough, in any timezone, and why
            # a replayed event changes nothing: the module docstring.
            """
            CREATE TABLE IF NOT EXISTS activity_weeks (
                event_name LowCardinality(String),
                anonymous Bool,
                bucket DateTime('UTC'),
                actor String,
                first_seen SimpleAggregateFunction(min, DateTime64(3, 'UTC')),
                last_seen SimpleAggregateFunction(max, DateTime64(3, 'UTC'))
            )
            ENGINE = AggregatingMergeTree
            PARTITION BY toYYYYMM(bucket)
            ORDER BY (event_name, anonymous, bucket, actor)
            """,
            f"CREATE MATERIALIZED VIEW IF NOT EXISTS activity_weeks_mv TO activity_weeks AS {_ACTIVITY_WEEKS_SELECT}",
            # Backfill what is already there. The view exists first, so an event inserted meanwhile may
            # be counted by both: harmless, first/last seen are a minimum and a maximum.
            f"INSERT INTO activity_weeks {_ACTIVITY_WEEKS_SELECT}",
        ),
    ),
    Migration(
        9,
        "activity spans: each actor's first and last instant per bucket, one row per 12-bucket span",
        (
            # Why spans of 12 buckets starting every 6, and why a replay changes nothing: the module docstring.
            """
            CREATE TABLE IF NOT EXISTS activity_spans (
                anonymous Bool,
                span DateTime('UTC'),
                actor String,
                first_seen SimpleAggregateFunction(minMap, Tuple(Array(DateTime('UTC')), Array(DateTime64(3, 'UTC')))),
                last_seen SimpleAggregateFunction(maxMap, Tuple(Array(DateTime('UTC')), Array(DateTime64(3, 'UTC'))))
            )
            ENGINE = AggregatingMergeTree
            PARTITION BY toYYYYMM(span)
            ORDER BY (span, anonymous, actor)
            """,
            f"CREATE MATERIALIZED VIEW IF NOT EXISTS activity_spans_mv TO activity_spans AS {_ACTIVITY_SPANS_SELECT}",
            # Backfill from activity_weeks, the view first (a row seen twice changes no minimum or maximum).
            f"INSERT INTO activity_spans {_ACTIVITY_SPANS_SELECT}",
        ),
    ),
)


def apply_migrations(client: Client, migrations: tuple[Migration, ...] = MIGRATIONS) -> list[int]:
    """Apply every migration not yet recorded in ``schema_migrations``; return the versions applied."""
    client.command(
        "CREATE TABLE IF NOT EXISTS schema_migrations "
        "(version UInt32, description String, applied_at DateTime64(3, 'UTC') DEFAULT now64(3)) "
        "ENGINE = ReplacingMergeTree ORDER BY version"
    )
    done = {row[0] for row in client.query("SELECT version FROM schema_migrations FINAL").result_rows}
    applied: list[int] = []
    for migration in sorted(migrations, key=lambda m: m.version):
        if migration.version in done:
            continue
        for statement in migration.statements:
            client.command(statement)
        client.insert(
            "schema_migrations",
            [[migration.version, migration.description]],
            column_names=["version", "description"],
        )
        applied.append(migration.version)
        log.info("Applied ClickHouse migration %d: %s", migration.version, migration.description)
    return applied
