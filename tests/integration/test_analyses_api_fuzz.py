"""Property-based requests against the analyses' routes find no server error.

schemathesis derives requests (valid and invalid) for every operation of the funnels,
retention, cohorts and experiments routers from the OpenAPI schema, sends them with an admin
key, and checks that no response is a 5xx and that responses conform to the schema (schema-valid
requests may still be refused with a 400 by the definitions' cross-field rules). A funnel,
a cohort and a running experiment exist (id 1 of each), over a few events, so ids reach real rows.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from clickhouse_connect.driver.client import Client
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from api.routes import cohorts, experiments, funnels, retention
from tests.analysis_reference import Event, at, insert_events
from tests.integration.query_api_support import ADMIN_KEY, build_app

pytestmark = pytest.mark.integration

AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}
PREFIXES = ("/v1/funnels", "/v1/retention", "/v1/cohorts", "/v1/experiments")


@pytest.fixture
def analyses_schema(ch_db: Client, tmp_path: Path) -> Any:
    app = build_app(ch_db, tmp_path)
    for router in (funnels.router, retention.router, cohorts.router, experiments.router):
        app.include_router(router)
    t0 = at("2026-03-02 10:00:00")
    insert_events(
        ch_db,
        [Event("signup", t0 + timedelta(hours=i), user_id=f"u{i}") for i in range(5)]
        + [Event("fund_project", t0 + timedelta(hours=i, minutes=3), user_id=f"u{i}") for i in range(3)],
    )
    steps = [{"name": "s", "event_name": "signup"}, {"name": "f", "event_name": "fund_project"}]
    with TestClient(app) as client:
        for path, body in (
            ("/v1/funnels", {"name": "f", "steps": steps}),
            ("/v1/cohorts", {"name": "c", "definition": {"kind": "behavioural", "event_name": "s", "within_days": 9}}),
            ("/v1/experiments", {"key": "e", "name": "e", "conversion": {"event_name": "fund_project"}}),
        ):
            created = client.post(path, headers=AUTH, json=body)
            assert created.status_code == 201, created.text
        assert client.patch("/v1/experiments/1", headers=AUTH, json={"status": "running"}).status_code == 200
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def test_no_server_errors(analyses_schema: Any) -> None:
    operations = [result.ok() for result in analyses_schema.get_all_operations()]
    operations = sorted(
        (op for op in operations if op.path.startswith(PREFIXES)), key=lambda op: op.method == "DELETE"
    )
    assert len(operations) >= 18
    failures: list[str] = []

    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=5,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            database=None,
            phases=[Phase.explicit, Phase.generate],  # no shrinking: the first failing request is reported as is
        )
        def check(case: Any) -> None:
            response = case.call(headers=AUTH)
            assert response.status_code < 500, (
                f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:300]}"
            )
            # Definitions have cross-field rules (exclusion steps within the steps, control among
            # the variants) that JSON Schema cannot state: their 400s are expected for schema-valid data.
            case.validate_response(response, excluded_checks=[positive_data_acceptance])

        try:
            check()
        except Exception as exc:  # collect every operation's failure, then report them together
            failures.append(f"{operation.label}: {str(exc)[:1500]}")
    assert not failures, "\n\n".join(failures)
