"""Shared dependencies of the API's routes, injected with FastAPI's ``Depends``.

The app's lifespan (``api.app``) puts the process's shared objects on ``app.state``; routes reach
them only through the annotated types below, so a route's signature says what it uses.
Analysts' SQL is authorised by one dependency (``Analyst``): an API key with the analyst or
admin role (``api.auth``), or the service token ``TIDEMARK_API_TOKEN`` when one is set.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Annotated

from clickhouse_connect.driver.client import Client
from fastapi import Depends, HTTPException, Path, Request, status
from pydantic import Field

from api.auth import BearerKey, HeaderKey, Role, authenticate, forbidden, presented_key, unauthorized
from api.publisher import EventPublisher
from tidemark.settings import Settings


def get_settings(request: Request) -> Settings:
    """The settings the app was created with."""
    settings: Settings = request.app.state.settings
    return settings


def get_clickhouse(request: Request) -> Client:
    """The process's ClickHouse client (503 while the app is not started)."""
    client: Client | None = getattr(request.app.state, "clickhouse", None)
    if client is None:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            detail={"code": "not_ready", "message": "ClickHouse is not connected yet"},
        )
    return client


def get_publisher(request: Request) -> EventPublisher:
    """The process's event publisher (created with the app; publishing needs it started)."""
    publisher: EventPublisher = request.app.state.publisher
    return publisher


@dataclass(frozen=True)
class Principal:
    """Who is running analysts' SQL: the owner of an analyst or admin key, or the service token."""

    name: str


def require_analyst(request: Request, bearer: BearerKey, api_key: HeaderKey) -> Principal:
    """Admit an analyst or admin API key, or the service token ``TIDEMARK_API_TOKEN`` (401 / 403 otherwise).

    Raw SQL reads every event, so it is never open: a viewer key gets 403, no key 401.
    """
    raw = presented_key(bearer, api_key)
    if raw is None:
        raise unauthorized("an API key with the analyst role is required")
    token = get_settings(request).api_token
    if token and hmac.compare_digest(raw.encode(), token.encode()):
        return Principal("service token")
    sessions = getattr(request.app.state, "metadata_sessions", None)
    principal = None
    if sessions is not None:
        with sessions() as session:
            principal = authenticate(session, raw)
    if principal is None:
        raise unauthorized("unknown or revoked API key")
    if not principal.at_least(Role.analyst):
        raise forbidden(f"SQL needs the analyst role; the key has {principal.role.value}")
    return Principal(principal.email)


#: Metadata row ids (SQLite and PostgreSQL integers): larger numbers are refused (400) before the
#: database sees them, where they would not fit its integer and fail the request with a 500.
MAX_ID = 2**31 - 1
RowId = Annotated[int, Path(ge=1, le=MAX_ID)]
RowRef = Annotated[int, Field(ge=1, le=MAX_ID)]

SettingsDep = Annotated[Settings, Depends(get_settings)]
ClickHouseDep = Annotated[Client, Depends(get_clickhouse)]
PublisherDep = Annotated[EventPublisher, Depends(get_publisher)]
Analyst = Annotated[Principal, Depends(require_analyst)]
