"""Property-based requests generated from the collector's and /v1/sql's OpenAPI schema: never a 5xx.

schemathesis derives valid and invalid bodies for every collector operation (and the analysts'
SQL endpoint) and sends them to the app running on the real broker and the embedded engine:
bad input must always be a documented 4xx with a reason, valid input a 200 — never a crash.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from clickhouse_connect.driver.client import Client
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings

from api.app import create_app
from tidemark.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

AUTH = {"Authorization": "Basic " + base64.b64encode(b"demo-write-key:").decode()}
PATHS = ("/v1/track", "/v1/identify", "/v1/page", "/v1/screen", "/v1/group", "/v1/alias", "/v1/batch", "/v1/sql")


@pytest.fixture
def running_app(kafka_settings: Settings, ch_db: Client) -> Iterator[FastAPI]:
    app = create_app(kafka_settings, clickhouse=ch_db)
    with TestClient(app):  # runs the lifespan: publisher started, topics and tables ready
        yield app


def test_no_server_errors(running_app: FastAPI) -> None:
    schema = schemathesis.openapi.from_asgi("/openapi.json", running_app)
    operations = [result.ok() for result in schema.get_all_operations()]
    operations = [op for op in operations if op.path in PATHS and op.method.upper() == "POST"]
    assert len(operations) == len(PATHS)
    failures: list[str] = []
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case: Any) -> None:
            response = case.call(headers=AUTH)
            assert response.status_code < 500, (
                f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:300]}"
            )
            if response.status_code >= 400:
                assert response.json()["error"]["code"], response.text
            # The schema cannot say everything the collector checks (one of userId/anonymousId, time
            # range, sizes), so a schema-valid body may still be a documented 400: not a failure.
            case.validate_response(response, excluded_checks=[schemathesis.checks.positive_data_acceptance])

        try:
            check()
        except Exception as exc:  # collect every operation's failure, then report them together
            failures.append(f"{operation.label}: {str(exc)[:1500]}")
    assert not failures, "\n\n".join(failures)
