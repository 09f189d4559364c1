"""API keys, roles and the person behind a request.

A key is shown once, when it is created; only its sha256 is stored. A request
names its key in ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``.

Roles, from most to least powerful:

- ``admin``   — everything, plus managing keys and people;
- ``analyst`` — creates and edits dashboards and analyses, runs read-only SQL;
- ``viewer``  — reads what it owns, what is shared with it, and public dashboards.

Every key has an owner (a person identified by email). Privacy follows the owner,
not the role: no key sees another owner's private dashboard unless it is shared
with that key's owner — not even an admin key.

Bootstrap: when the API starts and no admin key exists, it creates one for
``admin@localhost``: the value of ``settings.admin_api_key`` when set (``TIDEMARK_ADMIN_API_KEY``;
local runs use ``dev-admin-key``), otherwise a random key that is logged once.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from api.metadata.models import ApiKey, User

log = logging.getLogger(__name__)

KEY_PREFIX = "tmk_"
BOOTSTRAP_ADMIN_EMAIL = "admin@localhost"
# Refreshing last_used_at on every request would turn reads into writes; once a minute is plenty.
LAST_USED_RESOLUTION = timedelta(minutes=1)


class Role(StrEnum):
    """What a key may do; see the module docstring."""

    admin = "admin"
    analyst = "analyst"
    viewer = "viewer"

    @property
    def rank(self) -> int:
        """Higher is more powerful."""
        return {"viewer": 0, "analyst": 1, "admin": 2}[self.value]


@dataclass(frozen=True)
class Principal:
    """The authenticated caller: which key, which person, which role."""

    key_id: int
    user_id: int
    email: str
    role: Role

    def at_least(self, role: Role) -> bool:
        """Whether this caller's role is ``role`` or more powerful."""
        return self.role.rank >= role.rank


# --- errors -------------------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    """What went wrong, for machines (``code``) and people (``message``)."""

    code: str
    message: str


class ErrorBody(BaseModel):
    """Every error response of the API has this shape."""

    error: ErrorDetail


class ApiError(HTTPException):
    """An HTTP error with a stable machine-readable ``code``."""

    def __init__(self, status_code: int, code: str, message: str) -> None:
        super().__init__(status_code=status_code, detail={"code": code, "message": message})
        self.code = code
        self.message = message


def not_found(what: str) -> ApiError:
    """404 for something that does not exist or that the caller may not know exists."""
    return ApiError(404, "not_found", f"{what} not found")


def forbidden(message: str) -> ApiError:
    """403 for something the caller can see but may not do."""
    return ApiError(403, "forbidden", message)


def unauthorized(message: str = "a valid API key is required") -> ApiError:
    """401 when no (valid) key was given."""
    return ApiError(401, "unauthorized", message)


ERROR_RESPONSES: dict[int | str, dict[str, object]] = {
    status: {"model": ErrorBody, "description": text}
    for status, text in (
        (400, "Invalid request"),
        (401, "Missing or invalid API key"),
        (403, "Not permitted"),
        (404, "Not found"),
        (409, "Conflict"),
    )
}


# --- keys ---------------------------------------------------------------------------------------


def hash_key(raw_key: str) -> str:
    """The sha256 (hex) under which a key is stored and looked up."""
    return hashlib.sha256(raw_key.encode("utf-8")).hexdigest()


def generate_key() -> str:
    """A fresh random key (256 bits), recognisable by its prefix."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def find_or_create_user(session: Session, email: str, name: str = "") -> User:
    """The person with ``email`` (case-insensitive), created on first mention."""
    email = email.strip().lower()
    user = session.scalar(select(User).where(User.email == email))
    if user is None:
        user = User(email=email, name=name or email.split("@")[0])
        session.add(user)
        session.flush()
    return user


def issue_key(
    session: Session, owner: User, role: Role, name: str = "", raw_key: str | None = None
) -> tuple[ApiKey, str]:
    """Store a new key for ``owner`` and return it with its plaintext (shown to the caller once)."""
    raw = raw_key or generate_key()
    key = ApiKey(name=name, prefix=raw[:8], key_hash=hash_key(raw), role=role.value, owner_id=owner.id)
    session.add(key)
    session.flush()
    return key, raw


def authenticate(session: Session, raw_key: str) -> Principal | None:
    """The principal of a live key, or None for an unknown or revoked one."""
    key = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(raw_key)))
    if key is None or key.revoked_at is not None:
        return None
    now = datetime.now(UTC)
    last = key.last_used_at
    if last is None or now - last > LAST_USED_RESOLUTION:
        key.last_used_at = now
        session.commit()
    return Principal(key_id=key.id, user_id=key.owner_id, email=key.owner.email, role=Role(key.role))


def ensure_bootstrap_admin(sessions: sessionmaker[Session], admin_api_key: str | None) -> str | None:
    """Make sure an admin key exists; return the plaintext of a key created just now (else None).

    With ``admin_api_key`` set, that exact key is (re)registered for the bootstrap admin, so a
    deployment can rotate it through configuration.
    """
    with sessions() as session:
        admin = find_or_create_user(session, BOOTSTRAP_ADMIN_EMAIL, "Administrator")
        if admin_api_key:
            existing = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(admin_api_key)))
            if existing is None:
                issue_key(session, admin, Role.admin, "bootstrap admin", raw_key=admin_api_key)
                session.commit()
            return None
        if session.scalar(select(ApiKey.id).where(ApiKey.role == Role.admin.value, ApiKey.revoked_at.is_(None))):
            session.commit()
            return None
        _, raw = issue_key(session, admin, Role.admin, "bootstrap admin")
        session.commit()
    log.warning("Created the bootstrap admin API key (shown once): %s", raw)
    return raw


# --- FastAPI dependencies -----------------------------------------------------------------------


def metadata_session(request: Request) -> Iterator[Session]:
    """A metadata session for one request (closed afterwards; handlers commit what they change)."""
    factory: sessionmaker[Session] = request.app.state.metadata_sessions
    session = factory()
    try:
        yield session
    finally:
        session.close()


DbSession = Annotated[Session, Depends(metadata_session)]


# Declared as security schemes so the OpenAPI document says how to authenticate.
_bearer = HTTPBearer(auto_error=False, description="An API key as a bearer token.")
_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="An API key.")
BearerKey = Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)]
HeaderKey = Annotated[str | None, Security(_api_key_header)]
#: ``openapi_extra`` of a route that also serves callers without a key (``MaybePrincipal``): the
#: empty requirement, appended to the two schemes, is how OpenAPI says authentication is optional.
OPTIONAL_AUTH: dict[str, Any] = {"security": [{}]}


def presented_key(bearer: HTTPAuthorizationCredentials | None, api_key: str | None) -> str | None:
    """The key a request presents: the bearer token, else the ``X-API-Key`` header (None when neither)."""
    return (bearer.credentials.strip() if bearer is not None else None) or api_key or None


def optional_principal(session: DbSession, bearer: BearerKey, api_key: HeaderKey) -> Principal | None:
    """The caller, or None when no key was presented; a presented but invalid key is a 401."""
    raw = presented_key(bearer, api_key)
    if raw is None:
        return None
    principal = authenticate(session, raw)
    if principal is None:
        raise unauthorized("unknown or revoked API key")
    return principal


def current_principal(principal: Annotated[Principal | None, Depends(optional_principal)]) -> Principal:
    """The caller; 401 without a key."""
    if principal is None:
        raise unauthorized()
    return principal


def require_role(role: Role):  # type: ignore[no-untyped-def]
    """A dependency that admits callers with ``role`` or a more powerful one (else 403)."""

    def check(principal: Annotated[Principal, Depends(current_principal)]) -> Principal:
        if not principal.at_least(role):
            raise forbidden(f"this needs the {role.value} role; the key has {principal.role.value}")
        return principal

    return check


CurrentPrincipal = Annotated[Principal, Depends(current_principal)]
MaybePrincipal = Annotated[Principal | None, Depends(optional_principal)]
Analyst = Annotated[Principal, Depends(require_role(Role.analyst))]
Admin = Annotated[Principal, Depends(require_role(Role.admin))]
