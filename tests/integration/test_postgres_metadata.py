"""The metadata database on PostgreSQL: Alembic migrations, constraints and the dashboards API.

A throwaway PostgreSQL cluster is created with ``initdb`` in a temporary directory and started
with ``pg_ctl`` on a free loopback port (as the ``postgres`` system user when running as root,
since PostgreSQL refuses to run as root). The test is skipped when the PostgreSQL server
binaries are not installed (Debian: ``apt-get install -y postgresql``).
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from clickhouse_connect.driver.client import Client
from fastapi.testclient import TestClient
from sqlalchemy import inspect, text
from sqlalchemy.exc import IntegrityError

from api.metadata.db import make_engine, session_factory, upgrade
from api.metadata.models import Dashboard, DashboardShare, User
from tests.integration.query_api_support import build_app, close, make_keys

pytestmark = pytest.mark.integration


def _pg_bin() -> Path | None:
    found = shutil.which("pg_ctl")
    if found:
        return Path(os.path.realpath(found)).parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return Path(candidates[-1]).parent if candidates else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    bindir = _pg_bin()
    if bindir is None or not (bindir / "initdb").exists():
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed: apt-get install -y postgresql")
    as_root = os.geteuid() == 0
    if as_root and shutil.which("runuser") is None:
        pytest.skip("running as root without runuser: cannot start PostgreSQL as an unprivileged user")
    prefix = ["runuser", "-u", "postgres", "--"] if as_root else []
    base = Path(tempfile.mkdtemp(prefix="tidemark-pg-"))
    data = base / "data"
    if as_root:
        shutil.chown(base, user="postgres")
    port = _free_port()
    run = {"check": True, "capture_output": True, "timeout": 120}
    subprocess.run(
        [*prefix, str(bindir / "initdb"), "-D", str(data), "-U", "tidemark", "--auth=trust", "-E", "UTF8", "--no-sync"],
        **run,
    )  # type: ignore[call-overload]
    subprocess.run(
        [
            *prefix,
            str(bindir / "pg_ctl"),
            "-D",
            str(data),
            "-l",
            str(base / "log"),
            "-w",
            "-t",
            "60",
            "-o",
            f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off",
            "start",
        ],
        **run,
    )  # type: ignore[call-overload]
    try:
        url = f"postgresql+psycopg://tidemark@127.0.0.1:{port}/postgres"
        engine = make_engine(url)
        deadline = time.monotonic() + 30
        while True:  # pg_ctl -w waits for readiness; this double-checks TCP accepts connections
            try:
                with engine.connect() as conn:
                    conn.execute(text("SELECT 1"))
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        engine.dispose()
        yield url
    finally:
        subprocess.run(
            [*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
            capture_output=True,
            timeout=60,
            check=False,
        )
        shutil.rmtree(base, ignore_errors=True)


def _fresh_database(url: str, name: str) -> str:
    engine = make_engine(url)
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return url.rsplit("/", 1)[0] + f"/{name}"


def test_migrations_and_constraints_on_postgres(postgres_url: str) -> None:
    url = _fresh_database(postgres_url, "migrations")
    engine = make_engine(url)
    upgrade(engine)
    upgrade(engine)  # idempotent
    tables = set(inspect(engine).get_table_names())
    assert tables >= {
        "users",
        "api_keys",
        "dashboards",
        "dashboard_widgets",
        "dashboard_shares",
        "funnels",
        "experiments",
        "experiment_assignments",
        "saved_queries",
        "cohorts",
        "alembic_version",
    }
    sessions = session_factory(engine)
    with sessions() as session:
        user = User(email="ana@example.org")
        session.add(user)
        session.flush()
        dashboard = Dashboard(name="d", owner_id=user.id, layout={"columns": 12}, default_filters={})
        session.add(dashboard)
        session.flush()
        session.add(DashboardShare(dashboard_id=dashboard.id, email="bob@example.org", permission="view"))
        session.commit()
        session.add(DashboardShare(dashboard_id=dashboard.id, email="bob@example.org", permission="edit"))
        with pytest.raises(IntegrityError):
            session.commit()
        session.rollback()
        session.delete(session.get(User, user.id))
        session.commit()
        # ON DELETE CASCADE: the owner's dashboards and their shares go with the owner.
        assert session.query(Dashboard).count() == 0 and session.query(DashboardShare).count() == 0
    engine.dispose()


def test_dashboards_api_on_postgres(postgres_url: str, ch_db: Client, tmp_path: Path) -> None:
    url = _fresh_database(postgres_url, "api")
    app = build_app(ch_db, tmp_path, metadata_url=url)
    try:
        with TestClient(app) as client:
            keys = make_keys(app)
            created = client.post(
                "/v1/dashboards",
                headers=keys.ana,
                json={
                    "name": "On Postgres",
                    "widgets": [
                        {
                            "title": "Signups",
                            "widget_type": "line",
                            "data_source": {"kind": "metric", "metric": "signups"},
                        }
                    ],
                },
            )
            assert created.status_code == 201, created.text
            dash = created.json()["id"]
            assert client.get(f"/v1/dashboards/{dash}", headers=keys.bob).status_code == 404
            shared = client.post(
                f"/v1/dashboards/{dash}/shares",
                headers=keys.ana,
                json={"email": "bob@example.org", "permission": "edit"},
            )
            assert shared.status_code == 201
            again = client.post(
                f"/v1/dashboards/{dash}/shares",
                headers=keys.ana,
                json={"email": "bob@example.org", "permission": "view"},
            )
            assert again.status_code == 409
            assert client.patch(f"/v1/dashboards/{dash}", headers=keys.bob, json={"name": "by bob"}).status_code == 200
            assert client.patch(f"/v1/dashboards/{dash}", headers=keys.vic, json={"name": "x"}).status_code == 404
            listed = client.get("/v1/dashboards", headers=keys.bob).json()
            assert {d["prebuilt"] for d in listed["items"]} >= {"executive", "financial", "community", "projects"}
            data = client.get(
                f"/v1/dashboards/{dash}/widgets/{created.json()['widgets'][0]['id']}/data",
                headers=keys.bob,
                params={"start": "2026-03-01", "end": "2026-03-03"},
            )
            assert data.status_code == 200 and [p["value"] for p in data.json()["series"][0]["points"]] == [0, 0]
    finally:
        close(app)
    # A second start neither duplicates the pre-built dashboards nor the admin key.
    again = build_app(ch_db, tmp_path, metadata_url=url)
    try:
        with again.state.metadata_sessions() as session:
            assert session.query(Dashboard).filter(Dashboard.prebuilt_slug.is_not(None)).count() == 4
    finally:
        close(again)
