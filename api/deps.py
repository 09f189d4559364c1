"""Shared dependencies of the API's routes, injected with FastAPI's ``Depends``.

The app's lifespan (``api.app``) puts the process's shared objects on ``app.state``; routes reach
them only through the annotated types below, so a route's signature says what it uses.
Authorisation of the query API is one dependency (``Analyst``): a later role-based scheme replaces
``require_analyst`` without touching the routes.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Annotated

from clickhouse_connect.driver.client import Client
from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

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
    """Who is calling the query API (for now: an analyst holding the API token, or anyone when none is set)."""

    name: str


_bearer = HTTPBearer(auto_error=False)


def require_analyst(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    """Allow the call when no ``TIDEMARK_API_TOKEN`` is configured, or when the bearer token matches it."""
    token = get_settings(request).api_token
    if not token:
        return Principal("anonymous")
    if credentials is None or not hmac.compare_digest(credentials.credentials.encode(), token.encode()):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            detail={"code": "unauthorized", "message": "a valid bearer token is required"},
            headers={"WWW-Authenticate": "Bearer"},
        )
    return Principal("analyst")


SettingsDep = Annotated[Settings, Depends(get_settings)]
ClickHouseDep = Annotated[Client, Depends(get_clickhouse)]
PublisherDep = Annotated[EventPublisher, Depends(get_publisher)]
Analyst = Annotated[Principal, Depends(require_analyst)]
