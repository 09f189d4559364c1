"""Dashboards: widgets resolved into chart-ready data, sharing, and the pre-built dashboards.

Wiring into the API process (``api.app.create_app``):

- the routers ``api.routes.keys``, ``api.routes.dashboards`` and ``api.routes.metrics`` go into
  the app's router list;
- ``open_query_api(app, settings, clickhouse)`` runs at start: it opens and migrates the metadata
  database, makes sure an admin key exists, seeds the pre-built dashboards, and puts what the
  routes need on ``app.state``.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from tidemark.settings import Settings


def open_query_api(app: FastAPI, settings: Settings, clickhouse: Any) -> None:
    """Open the metadata database (migrated), bootstrap the admin key and pre-built dashboards, fill app.state."""
    from api.auth import ensure_bootstrap_admin
    from api.dashboards.prebuilt import ensure_prebuilt
    from api.metadata.db import make_engine, metadata_url_for, session_factory, upgrade
    from api.metrics_query import MetricsEngine, default_catalogue

    engine = make_engine(metadata_url_for(settings))
    upgrade(engine)
    sessions = session_factory(engine)
    ensure_bootstrap_admin(sessions, settings.admin_api_key)
    ensure_prebuilt(sessions)
    catalogue = default_catalogue()

    state = app.state
    state.metadata_engine = engine
    state.metadata_sessions = sessions
    state.query_clickhouse = clickhouse
    state.week_start = settings.week_start
    state.sql_max_seconds = settings.sql_max_execution_seconds
    state.sql_max_rows = settings.sql_max_result_rows
    state.metrics_engine_factory = lambda: MetricsEngine(
        clickhouse, catalogue, settings.report_timezone, settings.week_start
    )


def close_query_api(app: FastAPI) -> None:
    """Release the metadata database's connections."""
    engine = getattr(app.state, "metadata_engine", None)
    if engine is not None:
        engine.dispose()
