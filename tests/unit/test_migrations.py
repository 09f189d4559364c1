"""ClickHouse migrations apply once, idempotently, on the embedded engine."""

from __future__ import annotations

import pytest
from clickhouse_connect.driver.client import Client

from sinks.migrations import MIGRATIONS, apply_migrations

pytestmark = pytest.mark.integration


def test_migrations_are_recorded_and_idempotent(ch_db: Client) -> None:
    assert apply_migrations(ch_db) == []  # the fixture already applied them
    versions = [r[0] for r in ch_db.query("SELECT version FROM schema_migrations FINAL ORDER BY version").result_rows]
    assert versions == [m.version for m in MIGRATIONS]


def test_replayed_events_collapse_on_event_id(ch_db: Client) -> None:
    rows = [
        ["00000000-0000-4000-8000-000000000001", "action", "login", "u1", "", "", 1_700_000_000_000, 0, "t", "{}",
         "{}"],
        ["00000000-0000-4000-8000-000000000002", "conversion", "fund_project", "u1", "", "", 1_700_000_000_001, 0,
         "t", '{"amount": 12.5, "community": "Lagos"}', "{}"],
    ]
    names = ["event_id", "event_type", "event_name", "user_id", "anonymous_id", "session_id", "timestamp",
             "received_at", "source", "properties", "context"]
    ch_db.insert("events", rows, column_names=names)
    ch_db.insert("events", rows, column_names=names)  # a replay with a different batch boundary
    count, ids, amount, community = ch_db.query(
        "SELECT count(), uniqExact(event_id), sum(amount), anyIf(community, community != '') FROM events FINAL"
    ).result_rows[0]
    assert (count, ids, amount, community) == (2, 2, 12.5, "Lagos")


def test_identity_stitching_attributes_pre_signup_events_to_the_user(ch_db: Client) -> None:
    names = ["event_id", "event_type", "event_name", "user_id", "anonymous_id", "timestamp", "properties"]
    ch_db.insert(
        "events",
        [
            ["00000000-0000-4000-8000-00000000000a", "page_view", "page_view", "", "anon-1", 1_700_000_000_000, "{}"],
            ["00000000-0000-4000-8000-00000000000b", "conversion", "signup", "user-1", "anon-1", 1_700_000_100_000,
             "{}"],
            ["00000000-0000-4000-8000-00000000000c", "action", "login", "user-1", "", 1_700_000_200_000, "{}"],
            ["00000000-0000-4000-8000-00000000000d", "page_view", "page_view", "", "anon-2", 1_700_000_000_000, "{}"],
        ],
        column_names=names,
    )
    rows = ch_db.query("SELECT event_name, person_id FROM events_resolved ORDER BY timestamp, event_name").result_rows
    assert sorted(rows) == sorted(
        [("page_view", "user-1"), ("signup", "user-1"), ("login", "user-1"), ("page_view", "anon-2")]
    )


def test_a_device_keeps_its_first_person_after_merges(ch_db: Client) -> None:
    names = ["event_id", "event_type", "event_name", "user_id", "anonymous_id", "timestamp", "properties"]
    rows = [
        ["00000000-0000-4000-8000-0000000000e1", "page_view", "page_view", "", "tablet", 1_700_000_000_000, "{}"],
        ["00000000-0000-4000-8000-0000000000e2", "conversion", "signup", "first", "tablet", 1_700_000_100_000,
         "{}"],
        ["00000000-0000-4000-8000-0000000000e3", "action", "login", "second", "tablet", 1_700_000_900_000, "{}"],
    ]
    for row in rows:  # separate inserts: separate link rows, as in production
        ch_db.insert("events", [row], column_names=names)
    ch_db.command("OPTIMIZE TABLE identities FINAL")
    person = ch_db.query(
        "SELECT person_id FROM events_resolved WHERE event_id = toUUID('00000000-0000-4000-8000-0000000000e1')"
    ).result_rows[0][0]
    assert person == "first"
