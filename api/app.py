"""The API process: the Segment-compatible collector, analysts' SQL, health and metrics.

``create_app`` builds the FastAPI app; its lifespan connects ClickHouse, applies migrations,
makes sure the Kafka topics exist, starts the event publisher and then the given services
(sinks, ...), and stops them in reverse order on shutdown. OpenAPI docs are at ``/docs``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

from clickhouse_connect.driver.client import Client
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.collector.enrich import warm_up as warm_up_enrichment
from api.dashboards import close_query_api, open_query_api
from api.metrics import RequestLatencyMiddleware
from api.publisher import EventPublisher
from api.routes import anomalies as anomaly_routes
from api.routes import cohorts, collector, dashboards, experiments, funnels, health, keys, metrics, retention, sql
from sinks.clickhouse import connect, is_embedded
from sinks.migrations import apply_migrations
from tidemark.service import Service
from tidemark.settings import Settings, get_settings
from tidemark.topics import ensure_topics

log = logging.getLogger(__name__)

# The API's table of contents: one router per resource. New resources add their router here.
ROUTERS: tuple[APIRouter, ...] = (
    health.router,
    collector.router,
    sql.router,
    keys.router,
    dashboards.router,
    metrics.router,
    funnels.router,
    retention.router,
    cohorts.router,
    experiments.router,
    anomaly_routes.router,
)

HTTP_ERROR_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "too_large",
    503: "unavailable",
}


def create_app(
    settings: Settings | None = None,
    services: Sequence[Service] = (),
    clickhouse: Client | None = None,
) -> FastAPI:
    """The Tidemark API.

    ``clickhouse``: an already-open client to use (tests pass the process's chDB handle); otherwise
    the lifespan connects to ``settings.clickhouse_url``. ``services`` are started after the event
    publisher, in order, and stopped before it, in reverse order.
    """
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        owned_client = clickhouse is None
        client = clickhouse or await asyncio.to_thread(connect, settings.clickhouse_url, settings.clickhouse_database)
        app.state.clickhouse = client
        started: list[Service] = []
        try:
            await asyncio.to_thread(apply_migrations, client)
            await asyncio.to_thread(open_query_api, app, settings, client)
            await asyncio.to_thread(ensure_topics, settings)
            await asyncio.to_thread(warm_up_enrichment)
            for service in (app.state.publisher, *services):
                await asyncio.to_thread(service.start)
                started.append(service)
                log.info("Started %s", service.name)
            yield
        finally:
            for service in reversed(started):
                try:
                    await asyncio.to_thread(service.stop)
                    log.info("Stopped %s", service.name)
                except Exception:  # keep stopping the others
                    log.exception("Stopping %s failed", service.name)
            app.state.clickhouse = None
            close_query_api(app)
            if owned_client and not is_embedded(settings.clickhouse_url):
                client.close()

    app = FastAPI(
        title="Tidemark",
        summary="Streaming product analytics: a Segment-compatible collector and a query API over ClickHouse.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.clickhouse = None
    app.state.publisher = EventPublisher(settings)
    app.add_middleware(RequestLatencyMiddleware)
    install_error_handlers(app)
    for router in ROUTERS:
        app.include_router(router)
    return app


def install_error_handlers(app: FastAPI) -> None:
    """Render every HTTP and validation error as ``{"error": {"code", "message"}}``.

    An ``HTTPException`` whose ``detail`` is ``{"code", "message"}`` keeps its code; request bodies
    that do not match a route's model are 400 ``invalid_request`` with pydantic's explanation.
    """

    async def http_error(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        detail = exc.detail
        if isinstance(detail, dict) and "code" in detail:
            body = {"error": {"code": detail["code"], "message": detail.get("message", "")}}
        else:
            body = {"error": {"code": HTTP_ERROR_CODES.get(exc.status_code, "http_error"), "message": str(detail)}}
        return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    async def validation_error(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        parts = [f"{'.'.join(str(p) for p in err.get('loc', ()))}: {err.get('msg', 'invalid')}" for err in exc.errors()]
        return JSONResponse({"error": {"code": "invalid_request", "message": "; ".join(parts)}}, status_code=400)

    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
