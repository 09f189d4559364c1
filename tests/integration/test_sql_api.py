"""``POST /v1/sql`` and ``tidemark sql`` on the real embedded ClickHouse engine.

Checks the answers against a plain-Python count of the seeded rows, and checks that nothing an
analyst sends can write: ClickHouse's ``readonly`` blocks DDL and INSERT, and the guard blocks
what chDB's ``readonly`` lets through (INTO OUTFILE, INSERT INTO FUNCTION, file()/url()).
"""

from __future__ import annotations

import csv
import io
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import pytest
import uvicorn
from clickhouse_connect.driver.client import Client
from fastapi.testclient import TestClient

from api.app import create_app
from api.auth import Role, find_or_create_user, issue_key
from api.readonly import QueryFailed, QueryRefused, ReadOnlyGuard, run_readonly
from tests.fixtures.server import free_port, wait_until
from tidemark.cli import main as tidemark_main
from tidemark.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

START = datetime(2026, 3, 1, tzinfo=UTC)
NAMES = ["page_view", "signup", "fund_project", "page_view", "login", "fund_project", "page_view"]


def seed_events(client: Client) -> list[dict[str, Any]]:
    """A few events written straight into ``events`` (the test stands in for the raw sink)."""
    rows = []
    for i, name in enumerate(NAMES * 3):
        rows.append(
            {
                "event_id": uuid.uuid4(),
                "event_type": "action",
                "event_name": name,
                "user_id": f"u{i % 4}",
                "anonymous_id": f"a{i % 5}",
                "session_id": "",
                "timestamp": START + timedelta(minutes=i),
                "received_at": START + timedelta(minutes=i, seconds=1),
                "source": "test",
                "properties": f'{{"amount": {i}}}',
                "context": "{}",
            }
        )
    columns = list(rows[0])
    client.insert("events", [[r[c] for c in columns] for r in rows], column_names=columns)
    return rows


ADMIN_KEY = "sql-test-admin-key"


@pytest.fixture
def api(kafka_settings: Settings, ch_db: Client, tmp_path: Path) -> Iterator[TestClient]:
    settings = kafka_settings.model_copy(
        update={
            "sql_max_result_rows": 50,
            "admin_api_key": ADMIN_KEY,
            "metadata_url": f"sqlite:///{tmp_path / 'metadata.db'}",
        }
    )
    with TestClient(create_app(settings, clickhouse=ch_db), headers={"X-API-Key": ADMIN_KEY}) as client:
        yield client


def _key(api: TestClient, role: Role) -> str:
    """A fresh key of ``role`` for a new person."""
    with api.app.state.metadata_sessions() as session:  # type: ignore[attr-defined]
        user = find_or_create_user(session, f"{role.value}@example.org")
        _, raw = issue_key(session, user, role, f"{role.value}'s key")
        session.commit()
    return raw


def test_sql_needs_an_analyst_key(api: TestClient) -> None:
    body = {"query": "SELECT 1 AS one"}
    anonymous = api.post("/v1/sql", json=body, headers={"X-API-Key": ""})
    assert anonymous.status_code == 401, anonymous.text
    wrong = api.post("/v1/sql", json=body, headers={"X-API-Key": "", "Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "unauthorized"
    viewer = api.post("/v1/sql", json=body, headers={"X-API-Key": _key(api, Role.viewer)})
    assert viewer.status_code == 403 and viewer.json()["error"]["code"] == "forbidden"
    analyst = api.post(
        "/v1/sql", json=body, headers={"X-API-Key": "", "Authorization": f"Bearer {_key(api, Role.analyst)}"}
    )
    assert analyst.status_code == 200 and analyst.json()["rows"] == [[1]]


def sql(api: TestClient, query: str, **extra: Any) -> Any:
    return api.post("/v1/sql", json={"query": query, **extra})


def refused(response: Any, code: str) -> str:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == code
    return str(error["message"])


def test_json_result_matches_python_counts(api: TestClient, ch_db: Client) -> None:
    rows = seed_events(ch_db)
    expected = Counter(r["event_name"] for r in rows)
    response = sql(api, "SELECT event_name, count() AS n FROM events FINAL GROUP BY event_name ORDER BY event_name")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["columns"] == ["event_name", "n"]
    assert body["types"] == ["LowCardinality(String)", "UInt64"]
    assert body["rows"] == [[name, expected[name]] for name in sorted(expected)]
    assert body["row_count"] == len(expected)
    assert body["truncated"] is False
    assert body["elapsed_ms"] >= 0


def test_json_values_of_many_types(api: TestClient) -> None:
    response = sql(
        api,
        "SELECT toUUID('6f1f3c3e-4b4e-4d7a-9a51-000000000001') AS u,"
        " toDateTime64('2026-03-01 10:00:00.250', 3, 'UTC') AS t, toDecimal64(12.5, 2) AS d, nan AS f,"
        " [1, 2] AS a, map('k', 'v') AS m, NULL AS n, toDate('2026-03-01') AS day",
    )
    assert response.status_code == 200, response.text
    assert response.json()["rows"] == [
        [
            "6f1f3c3e-4b4e-4d7a-9a51-000000000001",
            "2026-03-01T10:00:00.250000",
            "12.50",
            None,
            [1, 2],
            {"k": "v"},
            None,
            "2026-03-01",
        ]
    ]


def test_csv_result(api: TestClient, ch_db: Client) -> None:
    rows = seed_events(ch_db)
    response = sql(
        api, "SELECT user_id, count() AS n FROM events FINAL GROUP BY user_id ORDER BY user_id", format="csv"
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/csv")
    parsed = list(csv.reader(io.StringIO(response.text)))
    expected = Counter(r["user_id"] for r in rows)
    assert parsed == [["user_id", "n"]] + [[u, str(expected[u])] for u in sorted(expected)]


def test_row_limit_cuts_and_says_so(api: TestClient) -> None:
    cut = sql(api, "SELECT number FROM numbers(1000)", max_rows=10).json()
    assert cut["rows"] == [[i] for i in range(10)] and cut["truncated"] is True and cut["row_count"] == 10
    exact = sql(api, "SELECT number FROM numbers(10)", max_rows=10).json()
    assert exact["row_count"] == 10 and exact["truncated"] is False
    capped = sql(api, "SELECT number FROM numbers(1000)", max_rows=100000).json()
    assert capped["row_count"] == 50 and capped["truncated"] is True, "the server's limit caps max_rows"


@pytest.mark.parametrize(
    "statement",
    [
        "INSERT INTO events (event_id, event_name) VALUES (generateUUIDv4(), 'forged')",
        "CREATE TABLE forged (x UInt8) ENGINE = Memory",
        "DROP TABLE events",
        "ALTER TABLE events DELETE WHERE 1",
        "TRUNCATE TABLE events",
        "OPTIMIZE TABLE events FINAL",
        "SYSTEM STOP MERGES",
        "RENAME TABLE events TO gone",
    ],
)
def test_writes_and_ddl_are_refused(api: TestClient, ch_db: Client, statement: str) -> None:
    rows = seed_events(ch_db)
    response = sql(api, statement)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] in ("query_not_allowed", "query_failed")
    assert ch_db.command("SELECT count() FROM events") == len(rows)
    assert ch_db.command("EXISTS TABLE forged") == 0


@pytest.mark.parametrize(
    "statement",
    [
        "INSERT INTO events (event_id, event_name) SELECT generateUUIDv4(), 'forged'",
        "CREATE TABLE forged (x UInt8) ENGINE = Memory",
        "DROP TABLE events",
        "ALTER TABLE events DELETE WHERE 1",
        "TRUNCATE TABLE events",
    ],
)
def test_readonly_setting_alone_blocks_writes_in_the_engine(ch_db: Client, statement: str) -> None:
    """Without the guard, ClickHouse's ``readonly = 2`` itself refuses the statement (READONLY)."""
    rows = seed_events(ch_db)
    with pytest.raises(QueryFailed, match="READONLY|readonly"):
        run_readonly(ch_db, statement, max_rows=10, max_seconds=5, guard=None)
    assert ch_db.command("SELECT count() FROM events") == len(rows)
    assert ch_db.command("EXISTS TABLE forged") == 0


def test_read_only_queries_leave_the_shared_session_writable(api: TestClient, ch_db: Client) -> None:
    """The engine's one session must not stay read-only after analysts' queries (the sinks write on it)."""
    for statement in ("SELECT 1", "INSERT INTO events (event_name) VALUES ('x')", "DROP TABLE events", "SELEC"):
        sql(api, statement)
    run_readonly(ch_db, "SELECT 1", max_rows=1, max_seconds=5, guard=None)
    rows = seed_events(ch_db)
    assert ch_db.command("SELECT count() FROM events") == len(rows)
    ch_db.command("CREATE TABLE probe (x UInt8) ENGINE = Memory")
    ch_db.command("DROP TABLE probe")


@pytest.mark.parametrize(
    "template",
    [
        "SELECT 1 INTO OUTFILE '{path}'",
        "INSERT INTO FUNCTION file('{path}', 'CSV') SELECT 1",
        "SELECT * FROM file('{path}', 'LineAsString')",
        "SELECT file('{path}')",
        "SELECT * FROM url('http://127.0.0.1:9/x', 'CSV', 'a String')",
        "SELECT 1 WHERE 1 IN (SELECT * FROM s3('http://127.0.0.1:9/b/x.csv'))",
        "EXPLAIN SELECT * FROM file('{path}', 'LineAsString')",
    ],
)
def test_what_chdb_readonly_lets_through_is_refused_by_the_guard(
    api: TestClient, tmp_path: Path, template: str
) -> None:
    path = tmp_path / "leak.csv"
    message = refused(sql(api, template.format(path=path)), "query_not_allowed")
    assert message
    assert not path.exists()


def test_limits_cannot_be_raised_in_the_query(api: TestClient) -> None:
    refused(sql(api, "SELECT 1 SETTINGS readonly = 0"), "query_not_allowed")
    refused(sql(api, "SELECT 1 SETTINGS max_execution_time = 100000"), "query_not_allowed")
    refused(sql(api, "SELECT 1 SETTINGS max_result_rows=0, result_overflow_mode = 'throw'"), "query_not_allowed")
    assert sql(api, "SELECT 'max_execution_time = 5' AS s").status_code == 200, "words inside strings are fine"


class CountingClient:
    """A client that counts the statements the guard parses (``EXPLAIN AST``)."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.parsed: list[str] = []

    def query(self, query: str, parameters: dict[str, Any] | None = None) -> Any:
        if query.startswith("EXPLAIN AST"):
            self.parsed.append(query)
        return self.client.query(query, parameters=parameters)


def test_guard_parses_an_allowed_text_once_and_a_refused_one_every_time(ch_db: Client) -> None:
    counting = CountingClient(ch_db)
    client = cast(Client, counting)
    guard = ReadOnlyGuard(remember=2)
    allowed = "SELECT count() FROM events WHERE event_name = {name:String}"
    for name in ("login", "signup", "page_view"):
        guard.check(client, allowed, {"name": name})
    assert len(counting.parsed) == 1
    refused_text = "SELECT * FROM file('x.csv', 'LineAsString')"
    for _ in range(2):
        with pytest.raises(QueryRefused):
            guard.check(client, refused_text)
    assert len(counting.parsed) == 3
    # Only the most recently used texts are kept.
    guard.check(client, "SELECT 1")
    guard.check(client, "SELECT 2")
    guard.check(client, allowed, {"name": "login"})
    assert len(counting.parsed) == 6


def test_clickhouse_errors_are_400_with_its_message(api: TestClient) -> None:
    assert "Syntax error" in refused(sql(api, "SELEC 1"), "query_failed")
    assert "UNKNOWN_TABLE" in refused(sql(api, "SELECT * FROM no_such_table"), "query_failed")
    refused(sql(api, "SELECT 1; SELECT 2"), "query_failed")
    refused(sql(api, "   "), "query_not_allowed")


def test_time_limit_stops_a_long_query(kafka_settings: Settings, ch_db: Client) -> None:
    # Authorised by the service token this time (TIDEMARK_API_TOKEN) instead of a key.
    settings = kafka_settings.model_copy(update={"sql_max_execution_seconds": 1, "api_token": "service-token"})
    with TestClient(create_app(settings, clickhouse=ch_db), headers={"Authorization": "Bearer service-token"}) as api:
        message = refused(
            sql(api, "SELECT count() FROM numbers_mt(100000000000) WHERE sipHash64(number) = 0"), "query_failed"
        )
    assert "TIMEOUT_EXCEEDED" in message or "Timeout exceeded" in message or "too long" in message.lower()


def test_server_side_parameters_and_read_statements(api: TestClient, ch_db: Client) -> None:
    rows = seed_events(ch_db)
    response = sql(api, "SELECT count() FROM events WHERE event_name = {name:String}", parameters={"name": "login"})
    assert response.json()["rows"] == [[sum(r["event_name"] == "login" for r in rows)]]
    tables = {row[0] for row in sql(api, "SHOW TABLES").json()["rows"]}
    assert {"events", "events_rejected", "sessions"} <= tables
    described = sql(api, "DESCRIBE TABLE events").json()
    assert "event_id" in [row[0] for row in described["rows"]]
    assert sql(api, "EXISTS TABLE events").json()["rows"] == [[1]]


def test_bad_request_body_is_400(api: TestClient) -> None:
    response = api.post("/v1/sql", json={"query": "SELECT 1", "format": "xml"})
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_request"
    response = api.post("/v1/sql", json={"query": "SELECT 1", "max_rows": 0})
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_request"


@pytest.fixture
def served(kafka_settings: Settings, ch_db: Client, tmp_path: Path) -> Iterator[str]:
    """The app behind a real HTTP server (uvicorn, in a thread of this process, on a free port)."""
    port = free_port()
    settings = kafka_settings.model_copy(
        update={"admin_api_key": ADMIN_KEY, "metadata_url": f"sqlite:///{tmp_path / 'metadata.db'}"}
    )
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings, clickhouse=ch_db), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started, 60, "the API server to start")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def test_tidemark_sql_command(served: str, ch_db: Client, capsys: pytest.CaptureFixture[str]) -> None:
    rows = seed_events(ch_db)
    expected = Counter(r["event_name"] for r in rows)
    query = "SELECT event_name, count() AS n FROM events FINAL GROUP BY event_name ORDER BY event_name"

    assert tidemark_main(["sql", "--url", served, query]) == 1  # no key
    assert "analyst" in capsys.readouterr().err
    key = ["--api-key", ADMIN_KEY]
    assert tidemark_main(["sql", "--url", served, *key, query]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["event_name", "|", "n"]
    body = [line.split(" | ") for line in table[2:-1]]
    assert [(name.strip(), int(n)) for name, n in body] == sorted(expected.items())
    assert table[-1].startswith(f"({len(expected)} rows")

    assert tidemark_main(["sql", "--url", served, *key, "--format", "csv", query]) == 0
    assert list(csv.reader(io.StringIO(capsys.readouterr().out)))[1:] == [
        [name, str(n)] for name, n in sorted(expected.items())
    ]

    assert tidemark_main(["sql", "--url", served, *key, "DROP TABLE events"]) == 1
    assert "query_" in capsys.readouterr().err
    assert tidemark_main(["sql", "--url", f"http://127.0.0.1:{free_port()}", "SELECT 1"]) == 2
