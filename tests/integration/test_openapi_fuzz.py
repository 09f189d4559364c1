"""Property-based requests generated from the query API's OpenAPI schema find no server error.

schemathesis derives requests (valid and invalid) for every operation of the keys, dashboards
and metrics routers, sends them to the in-process app with an admin key, and checks that no
response is a 5xx and that responses conform to the documented schema. A dashboard with one
widget of each data-source kind exists, so ids 1..n reach real rows. Examples per operation are
bounded to keep the run short.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from clickhouse_connect.driver.client import Client
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from tests.integration.query_api_support import ADMIN_KEY, build_app

pytestmark = pytest.mark.integration

AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}
SEED_WIDGETS: list[dict[str, Any]] = [
    {"title": "m", "widget_type": "line", "data_source": {"kind": "metric", "metric": "gmv", "breakdown": "country"}},
    {"title": "c", "widget_type": "metric_card", "data_source": {"kind": "metric", "metric": "dau"}},
    {"title": "s", "widget_type": "table", "data_source": {"kind": "sql", "sql": "SELECT 1 AS x"}},
    {"title": "a", "widget_type": "funnel", "data_source": {"kind": "analysis", "saved_query_id": 1}},
]


QUERY_API_PREFIXES = ("/v1/me", "/v1/keys", "/v1/dashboards", "/v1/metrics")


@pytest.fixture
def query_api_schema(ch_db: Client, tmp_path: Path) -> Any:
    app = build_app(ch_db, tmp_path)
    with TestClient(app) as client:
        created = client.post("/v1/dashboards", headers=AUTH, json={"name": "seed", "widgets": SEED_WIDGETS})
        assert created.status_code == 201, created.text
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def test_no_server_errors(query_api_schema: Any) -> None:
    operations = [result.ok() for result in query_api_schema.get_all_operations()]
    # Deletions last, so revoked keys and deleted rows do not hide the other operations' paths.
    operations = sorted(
        (op for op in operations if op.path.startswith(QUERY_API_PREFIXES)), key=lambda op: op.method == "DELETE"
    )
    assert len(operations) >= 15
    failures: list[str] = []

    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case: Any) -> None:
            response = case.call(headers=AUTH)
            assert response.status_code < 500, (
                f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:300]}"
            )
            # Not "schema-valid data is accepted": some rules are beyond what the schema can say (a
            # dimension must be a catalogue one or properties.<key>), and such a request rightly gets
            # a 400 with the reason.
            case.validate_response(response, excluded_checks=[positive_data_acceptance])

        try:
            check()
        except Exception as exc:  # collect every operation's failure, then report them together
            failures.append(f"{operation.label}: {str(exc)[:1500]}")
    assert not failures, "\n\n".join(failures)


def test_operations_declare_whether_a_key_is_required(ch_db: Client, tmp_path: Path) -> None:
    # Every operation either refuses a caller without a key (401) or says in its security list,
    # with the empty requirement, that a key is optional (public dashboards and their widgets).
    app = build_app(ch_db, tmp_path)
    with TestClient(app) as client:
        created = client.post("/v1/dashboards", headers=AUTH, json={"name": "seed", "widgets": SEED_WIDGETS})
        assert created.status_code == 201, created.text
        optional, checked = [], 0
        for path, operations in app.openapi()["paths"].items():
            if not path.startswith(QUERY_API_PREFIXES):
                continue
            for method, operation in operations.items():
                assert operation.get("security"), f"{method} {path} declares no authentication"
                response = client.request(method.upper(), re.sub(r"\{\w+\}", "1", path), json={})
                checked += 1
                if {} in operation["security"]:
                    optional.append(f"{method} {path}")
                    assert response.status_code in (200, 404), f"{method} {path}: {response.text[:200]}"
                else:
                    assert response.status_code == 401, f"{method} {path} -> {response.status_code} without a key"
    assert checked >= 15
    assert optional == [
        "get /v1/dashboards/{dashboard_id}",
        "get /v1/dashboards/{dashboard_id}/widgets/{widget_id}/data",
    ]
