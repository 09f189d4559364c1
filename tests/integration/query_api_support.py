"""What the query-API tests share: an app on the test's ClickHouse database, API keys, demo events.

The app is the query API's routers on a bare FastAPI app with the API's error handlers; it
uses the pytest process's one chDB engine (the ``ch_db`` database) and a SQLite (or given)
metadata database of its own.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from clickhouse_connect.driver.client import Client
from fastapi import FastAPI
from fastapi.testclient import TestClient

from api.app import install_error_handlers
from api.auth import Role, find_or_create_user, issue_key
from api.dashboards import close_query_api, open_query_api
from api.routes import dashboards, keys, metrics
from sinks.raw import EVENTS_SINK
from tidemark.settings import Settings

ADMIN_KEY = "test-admin-key"
EVENT_COLUMNS = list(EVENTS_SINK.columns)


def build_app(ch: Client, tmp_path: Path, metadata_url: str | None = None, **overrides: Any) -> FastAPI:
    """The query API over database ``ch`` with metadata at ``metadata_url`` (default: SQLite in tmp_path)."""
    # No background warming unless a test asks for it: tests call ``warm_once`` when they mean it.
    overrides.setdefault("dashboard_warm_seconds", 0)
    settings = Settings(
        metadata_url=metadata_url or f"sqlite:///{tmp_path / 'metadata.db'}",
        admin_api_key=ADMIN_KEY,
        **overrides,
    )
    app = FastAPI(title="Tidemark query API (test)")
    install_error_handlers(app)
    for router in (keys.router, dashboards.router, metrics.router):
        app.include_router(router)
    open_query_api(app, settings, ch)
    return app


@dataclass
class Keys:
    """Headers of API keys for several people and roles."""

    admin: dict[str, str]
    ana: dict[str, str]  # analyst ana@example.org
    bob: dict[str, str]  # analyst bob@example.org
    vic: dict[str, str]  # viewer vic@example.org
    eve: dict[str, str]  # analyst eve@example.org (never shared with)


def make_keys(app: FastAPI) -> Keys:
    """One key per person; Bearer and X-API-Key headers are both exercised."""
    out: dict[str, dict[str, str]] = {"admin": {"Authorization": f"Bearer {ADMIN_KEY}"}}
    with app.state.metadata_sessions() as session:
        for name, role, header in (
            ("ana", Role.analyst, "bearer"),
            ("bob", Role.analyst, "x"),
            ("vic", Role.viewer, "bearer"),
            ("eve", Role.analyst, "x"),
        ):
            user = find_or_create_user(session, f"{name}@example.org")
            _, raw = issue_key(session, user, role, f"{name}'s key")
            out[name] = {"Authorization": f"Bearer {raw}"} if header == "bearer" else {"X-API-Key": raw}
        session.commit()
    return Keys(**out)


def close(app: FastAPI) -> None:
    """Dispose of the app's metadata connections."""
    close_query_api(app)


def insert_events(ch: Client, events: list[dict[str, Any]]) -> None:
    """Insert events (dicts with name, ts, user_id, anonymous_id, properties, context) into ``events``."""
    rows = []
    for e in events:
        rows.append(
            [
                uuid.UUID(e["id"]) if "id" in e else uuid.uuid4(),
                e.get("event_type", "action"),
                e["name"],
                e.get("user_id") or "",
                e.get("anonymous_id") or "",
                e.get("session_id") or "",
                e["ts"],
                e["ts"],
                e.get("source", "test"),
                json.dumps(e.get("properties", {})),
                json.dumps(e.get("context", {})),
            ]
        )
    for i in range(0, len(rows), 20_000):
        ch.insert("events", rows[i : i + 20_000], column_names=EVENT_COLUMNS)


def demo_events(start: datetime, days: float, sessions_per_day: float = 250, seed: int = 11) -> list[dict[str, Any]]:
    """The demo generator's events for ``days`` from ``start``, as dicts for insert_events and references."""
    from tidemark.demo.traffic import TrafficConfig, generate_records

    config = TrafficConfig(start=start, end=start + timedelta(days=days), sessions_per_day=sessions_per_day, seed=seed)
    out = []
    for r in generate_records(config):
        out.append(
            {
                "id": r["id"],
                "event_type": r["eventType"],
                "name": r["eventName"],
                "user_id": r["userId"],
                "anonymous_id": r["anonymousId"],
                "session_id": r["sessionId"],
                "ts": datetime.fromtimestamp(r["timestamp"] / 1000, tz=UTC),
                "properties": json.loads(r["properties"]),
                "context": json.loads(r["context"]),
            }
        )
    return out


def person_of(events: list[dict[str, Any]]) -> dict[str, str]:
    """Identity stitching, independently: anonymous id -> the user id it first appeared with."""
    first: dict[str, tuple[datetime, str]] = {}
    for e in events:
        if e.get("anonymous_id") and e.get("user_id"):
            seen = first.get(e["anonymous_id"])
            if seen is None or e["ts"] < seen[0]:
                first[e["anonymous_id"]] = (e["ts"], e["user_id"])
    return {anon: uid for anon, (_, uid) in first.items()}


def person(e: dict[str, Any], links: dict[str, str]) -> str:
    """The person an event belongs to after stitching."""
    return e.get("user_id") or links.get(e.get("anonymous_id") or "", "") or (e.get("anonymous_id") or "")


def client_for(app: FastAPI) -> TestClient:
    """A test client (no lifespan: the query API is opened by build_app)."""
    return TestClient(app)
