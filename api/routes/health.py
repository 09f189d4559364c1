"""Liveness, readiness and Prometheus metrics: ``/healthz``, ``/readyz``, ``/metrics``."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from api.deps import PublisherDep

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness")
def healthz() -> dict[str, str]:
    """The process is up and serving HTTP (says nothing about Kafka or ClickHouse)."""
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness", responses={503: {"description": "A dependency is unreachable"}})
def readyz(request: Request, publisher: PublisherDep) -> JSONResponse:
    """Ready when ClickHouse answers a query and the Kafka broker answers a metadata request."""
    checks: dict[str, str] = {}
    clickhouse = getattr(request.app.state, "clickhouse", None)
    try:
        if clickhouse is None:
            raise RuntimeError("not connected")
        clickhouse.command("SELECT 1")
        checks["clickhouse"] = "ok"
    except Exception as exc:  # any failure means "not ready"; the reason is reported
        checks["clickhouse"] = f"error: {exc}"
    try:
        publisher.ping()
        checks["kafka"] = "ok"
    except Exception as exc:
        checks["kafka"] = f"error: {exc}"
    ready = all(value == "ok" for value in checks.values())
    return JSONResponse(
        {"status": "ready" if ready else "not ready", "checks": checks}, status_code=200 if ready else 503
    )


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
def metrics() -> Response:
    """Every metric of this process in the Prometheus text exposition format."""
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
