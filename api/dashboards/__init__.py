"""Dashboards: widgets resolved into chart-ready data, sharing, and the pre-built dashboards.

Wiring into the API process (``api.app.create_app``):

- the routers ``api.routes.keys``, ``api.routes.dashboards`` and ``api.routes.metrics`` go into
  the app's router list;
- ``open_query_api(app, settings, clickhouse)`` runs at start: it opens and migrates the metadata
  database, makes sure an admin key exists, seeds the pre-built dashboards, and puts what the
  routes need on ``app.state``.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI

from api.dashboards.cache import DashboardWarmer, WidgetCache
from tidemark.settings import Settings

log = logging.getLogger(__name__)


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
    state.widget_cache = WidgetCache()
    state.dashboard_warmer = DashboardWarmer(
        lambda dashboard_id, share: warm_dashboard(state, dashboard_id, share),
        lambda: prebuilt_ids(sessions),
        settings.dashboard_warm_seconds,
    )
    if settings.dashboard_warm_seconds > 0:
        state.dashboard_warmer.start()


def prebuilt_ids(sessions: Any) -> list[int]:
    """Ids of the pre-built dashboards."""
    from sqlalchemy import select

    from api.metadata.models import Dashboard

    with sessions() as session:
        return list(session.scalars(select(Dashboard.id).where(Dashboard.prebuilt_slug.is_not(None))))


def warm_dashboard(state: Any, dashboard_id: int, max_age_share: float) -> int:
    """Recompute the default view of a dashboard's widgets whose cached result is old; return how many."""
    from api.dashboards.models import DashboardFilters
    from api.dashboards.widgets import WidgetContext, resolve_cached
    from api.metadata.models import Dashboard

    computed = 0
    with state.metadata_sessions() as session:
        dashboard = session.get(Dashboard, dashboard_id)
        if dashboard is None:
            return 0
        ctx = WidgetContext.of_app(state, DashboardFilters.model_validate(dashboard.default_filters), session)
        for widget in dashboard.widgets:
            try:
                data = resolve_cached(widget, ctx, state.widget_cache, max_age_share)
            except Exception as exc:  # one broken widget must not keep the others cold
                log.warning("warming widget %s of dashboard %s failed: %s", widget.id, dashboard_id, exc)
                continue
            computed += not data.cached
    return computed


def close_query_api(app: FastAPI) -> None:
    """Release the metadata database's connections."""
    warmer = getattr(app.state, "dashboard_warmer", None)
    if warmer is not None:
        warmer.stop()
    engine = getattr(app.state, "metadata_engine", None)
    if engine is not None:
        engine.dispose()
