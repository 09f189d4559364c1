"""API keys and the caller's identity: ``/v1/me``, ``/v1/keys``."""

from __future__ import annotations

from datetime import UTC, datetime

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field
from sqlalchemy import func, select

from api.auth import (
    ERROR_RESPONSES,
    ApiError,
    CurrentPrincipal,
    DbSession,
    Role,
    find_or_create_user,
    forbidden,
    issue_key,
    not_found,
)
from api.dashboards.models import EMAIL_PATTERN, Page
from api.deps import RowId
from api.metadata.models import ApiKey, User

router = APIRouter(prefix="/v1", tags=["keys"], responses=ERROR_RESPONSES)


class Me(BaseModel):
    """Who the presented key belongs to."""

    key_id: int
    user_id: int
    email: str
    role: Role


class KeyIn(BaseModel):
    """A key to create. Admins create keys for anyone at any role; others only for themselves at their role or below."""

    name: str = Field("", max_length=200)
    role: Role = Role.viewer
    owner_email: str | None = Field(None, min_length=3, max_length=320, pattern=EMAIL_PATTERN)


class KeyOut(BaseModel):
    """A key as listed (never its secret)."""

    id: int
    name: str
    prefix: str
    role: Role
    owner_email: str
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


class NewKey(KeyOut):
    """A key just created: ``key`` is shown this once and never again."""

    key: str


def _out(key: ApiKey) -> KeyOut:
    return KeyOut(
        id=key.id,
        name=key.name,
        prefix=key.prefix,
        role=Role(key.role),
        owner_email=key.owner.email,
        created_at=key.created_at,
        last_used_at=key.last_used_at,
        revoked_at=key.revoked_at,
    )


@router.get("/me", response_model=Me, summary="The caller's identity and role")
def me(principal: CurrentPrincipal) -> Me:
    """Who the key in this request belongs to."""
    return Me(key_id=principal.key_id, user_id=principal.user_id, email=principal.email, role=principal.role)


@router.get("/keys", response_model=Page[KeyOut], summary="List API keys")
def list_keys(
    principal: CurrentPrincipal,
    session: DbSession,
    limit: int = Query(50, ge=1, le=500),
    offset: int = Query(0, ge=0, le=1_000_000),
) -> Page[KeyOut]:
    """Admins see every key; others see their own."""
    query = select(ApiKey)
    if principal.role is not Role.admin:
        query = query.where(ApiKey.owner_id == principal.user_id)
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    keys = session.scalars(query.order_by(ApiKey.id).limit(limit).offset(offset)).all()
    return Page[KeyOut](items=[_out(k) for k in keys], total=total, limit=limit, offset=offset)


@router.post("/keys", response_model=NewKey, status_code=201, summary="Create an API key")
def create_key(body: KeyIn, principal: CurrentPrincipal, session: DbSession) -> NewKey:
    """A new key; its secret is in the response only."""
    if principal.role is not Role.admin:
        if body.owner_email is not None and body.owner_email.lower() != principal.email:
            raise forbidden("only admins create keys for other people")
        if body.role.rank > principal.role.rank:
            raise forbidden(f"a {principal.role.value} key cannot create a {body.role.value} key")
    owner = find_or_create_user(session, body.owner_email) if body.owner_email else session.get(User, principal.user_id)
    assert owner is not None
    key, raw = issue_key(session, owner, body.role, body.name)
    session.commit()
    return NewKey(key=raw, **_out(key).model_dump())


@router.delete("/keys/{key_id}", status_code=204, summary="Revoke an API key")
def revoke_key(key_id: RowId, principal: CurrentPrincipal, session: DbSession) -> None:
    """Revoke a key: admins any key, others their own."""
    key = session.get(ApiKey, key_id)
    if key is None or (principal.role is not Role.admin and key.owner_id != principal.user_id):
        raise not_found(f"key {key_id}")
    if key.revoked_at is None:
        if key.role == Role.admin.value:
            live_admins = session.scalar(
                select(func.count()).where(ApiKey.role == Role.admin.value, ApiKey.revoked_at.is_(None))
            )
            if (live_admins or 0) <= 1:
                raise ApiError(409, "conflict", "this is the last admin key: create another admin key first")
        key.revoked_at = datetime.now(UTC)
        session.commit()
