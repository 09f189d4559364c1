"""Every catalogue metric compiled to ClickHouse SQL equals the plain-Python reference on the same events."""

from __future__ import annotations

import math

import pytest

from streams.catalogue import CATALOGUE
from streams.periods import PeriodCalendar
from streams.sql import MetricSql, compute_metrics
from tests.metric_reference import DATASET_END, DATASET_START, demo_dataset, ms, reference_snapshots, to_json_row

pytestmark = pytest.mark.integration

COLUMNS = ["event_id", "event_type", "event_name", "user_id", "anonymous_id", "session_id", "timestamp",
           "received_at", "source", "properties", "context"]


def insert_events(client, events) -> None:
    """Insert events like the raw sink does (the identities view is filled by its materialised view)."""
    rows = [[to_json_row(e)[c] for c in COLUMNS] for e in events]
    client.insert("events", rows, column_names=COLUMNS)


@pytest.fixture(scope="module")
def dataset():
    return demo_dataset(sessions_per_day=30, seed=21)


@pytest.mark.parametrize(
    ("tz", "names"),
    [("Europe/Berlin", None), ("America/New_York", ["dau", "gmv", "arpu", "session_duration", "churn_rate"])],
)
def test_sql_equals_reference_for_every_metric(ch_db, dataset, tz: str, names: list[str] | None) -> None:
    insert_events(ch_db, dataset)
    builder = MetricSql(CATALOGUE, PeriodCalendar(tz))
    definitions = CATALOGUE.select(names)
    values = compute_metrics(ch_db, builder, definitions, ms(DATASET_START), ms(DATASET_END))
    actual = {v.key: v.value for v in values}
    expected = reference_snapshots(dataset, CATALOGUE, tz=tz, names=[d.name for d in definitions])
    diff = sorted(
        (k, expected.get(k), actual.get(k))
        for k in set(expected) | set(actual)
        if k not in expected or k not in actual or not math.isclose(expected[k], actual[k], rel_tol=1e-9, abs_tol=1e-9)
    )
    assert diff == []
    assert {k[0] for k in actual} == {d.name for d in definitions}  # every metric, churn included, has values
    for v in values:  # period ends come from the same calendar
        assert v.period_end > v.period_start
