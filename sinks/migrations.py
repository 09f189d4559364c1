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
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from clickhouse_connect.driver.client import Client

log = logging.getLogger(__name__)


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
