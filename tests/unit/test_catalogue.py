"""The metric catalogue: the seed's Key Metrics are there, definitions are validated, files extend it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from streams.aggregators import compile_catalogue, decode_state, encode_state
from streams.catalogue import (
    CATALOGUE,
    Aggregation,
    Catalogue,
    Condition,
    MetricDefinition,
    Operator,
    get_catalogue,
    load_definitions,
)
from streams.events import StreamEvent

KEY_METRICS = [
    "dau", "wau", "mau", "session_duration", "pages_per_session", "signups", "activation_rate", "referral_rate",
    "churn_rate", "gmv", "revenue", "ad_revenue", "processing_fees", "loan_revenue", "arpu", "transaction_volume",
    "average_transaction_size", "projects_created", "projects_funded", "success_rate", "average_funding_time",
    "loans_disbursed", "active_communities", "members", "projects_per_community",
]


def test_key_metrics_are_catalogued_with_units_and_dimensions() -> None:
    for name in KEY_METRICS:
        definition = CATALOGUE[name]
        assert definition.description and definition.unit
    assert CATALOGUE["gmv"].dimensions == ("community", "category", "country", "device", "utm_source")
    assert CATALOGUE["revenue"].value_fields()["watch_ad"] == "properties.revenue"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "Bad-Name", "aggregation": "count"}, "bad metric name"),
        ({"name": "x", "aggregation": "sum"}, "needs a value field"),
        ({"name": "x", "aggregation": "count", "dimensions": ("planet",)}, "dimension"),
        ({"name": "x", "aggregation": "sum", "value": "properties.a; DROP"}, "bad value field"),
        ({"name": "x", "aggregation": "ratio"}, "numerator"),
    ],
)
def test_invalid_definitions_are_rejected(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MetricDefinition(description="d", unit="u", **kwargs)


def test_catalogue_checks_ratio_parts() -> None:
    ratio = MetricDefinition("r", "d", "ratio", Aggregation.ratio, numerator="gmv", denominator="nope")
    with pytest.raises(ValueError, match="not in the catalogue"):
        CATALOGUE.extended([ratio])
    with pytest.raises(ValueError, match="twice"):
        Catalogue([CATALOGUE["gmv"], CATALOGUE["gmv"]])


def test_extra_definitions_from_json_and_yaml(tmp_path: Path) -> None:
    entry = {"name": "email_signups", "description": "Signups by email.", "unit": "count", "aggregation": "count",
             "events": ["signup"], "where": [{"field": "properties.method", "op": "eq", "value": "email"}],
             "dimensions": ["country"]}
    json_file = tmp_path / "metrics.json"
    json_file.write_text(json.dumps({"metrics": [entry]}))
    yaml_file = tmp_path / "metrics.yaml"
    yaml_file.write_text("- name: big_fundings\n  description: Fundings of 100 or more.\n  unit: count\n"
                         "  aggregation: count\n  events: [fund_project]\n"
                         "  where: [{field: properties.amount, op: gte, value: 100}]\n")
    catalogue = get_catalogue(json_file).extended(load_definitions(yaml_file))
    assert catalogue["email_signups"].where == (Condition("properties.method", Operator.eq, "email"),)
    assert MetricDefinition.from_dict(catalogue["email_signups"].to_dict()) == catalogue["email_signups"]
    aggs = compile_catalogue(catalogue, ["email_signups", "big_fundings"])
    from datetime import UTC, datetime

    from tests.metric_reference import event

    t = datetime(2026, 3, 2, tzinfo=UTC)
    email = StreamEvent.from_model(event("signup", t, properties={"method": "email"}))
    google = StreamEvent.from_model(event("signup", t, properties={"method": "google"}))
    big = StreamEvent.from_model(event("fund_project", t, properties={"amount": 100}))
    text = StreamEvent.from_model(event("fund_project", t, properties={"amount": "500"}))
    assert aggs["email_signups"].matches(email) and not aggs["email_signups"].matches(google)
    assert aggs["big_fundings"].matches(big) and not aggs["big_fundings"].matches(text)


def test_accumulators_round_trip_through_state() -> None:
    aggs = compile_catalogue(CATALOGUE)
    for name, agg in aggs.items():
        acc = agg.new()
        again = decode_state(encode_state(acc))
        assert type(again) is type(acc), name
        assert decode_state(encode_state(acc.partial())).value() == acc.partial().value()
