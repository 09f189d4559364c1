"""Who may see and change a dashboard.

- The owner: everything (a viewer-role owner still cannot edit: roles cap what a key may do).
- A person the dashboard is shared with (by email or user id): view, or edit if the share says so.
- Pre-built dashboards: every key reads them; admins edit them; others duplicate them to customise.
- Public dashboards: anyone reads them, even without a key.
- Everybody else: the dashboard does not exist for them (404, so private names do not leak).
Editing also needs the analyst role or above.
"""

from __future__ import annotations

from typing import Any, Literal

from sqlalchemy import Select, or_, select
from sqlalchemy.orm import Session

from api.auth import Principal, Role, forbidden, not_found
from api.metadata.models import Dashboard, DashboardShare

Access = Literal["owner", "edit", "view"]


def access_of(dashboard: Dashboard, principal: Principal | None) -> Access | None:
    """The caller's access to ``dashboard`` (None: it does not exist for them)."""
    if principal is None:
        return "view" if dashboard.is_public else None
    if dashboard.owner_id == principal.user_id:
        return "owner"
    best: Access | None = None
    for share in dashboard.shares:
        if share.user_id == principal.user_id or share.email == principal.email:
            best = "edit" if share.permission == "edit" else (best or "view")
    if dashboard.prebuilt_slug is not None:
        best = "edit" if principal.role is Role.admin else (best or "view")
    if best is None and dashboard.is_public:
        best = "view"
    return best


def can_edit(access: Access | None, principal: Principal | None) -> bool:
    """Whether the caller may change the dashboard and its widgets."""
    return principal is not None and access in ("owner", "edit") and principal.at_least(Role.analyst)


def load_visible(session: Session, dashboard_id: int, principal: Principal | None) -> tuple[Dashboard, Access]:
    """The dashboard and the caller's access, or 404 when it does not exist for the caller."""
    dashboard = session.get(Dashboard, dashboard_id)
    access = access_of(dashboard, principal) if dashboard is not None else None
    if dashboard is None or access is None:
        raise not_found(f"dashboard {dashboard_id}")
    return dashboard, access


def load_editable(session: Session, dashboard_id: int, principal: Principal | None) -> Dashboard:
    """The dashboard if the caller may edit it; 404 if they cannot see it, 403 if they only may read it."""
    dashboard, access = load_visible(session, dashboard_id, principal)
    if not can_edit(access, principal):
        raise forbidden("this dashboard is read-only for this key")
    return dashboard


def visible_query(principal: Principal) -> Select[Any]:
    """Dashboards the caller may see: own, shared with them, pre-built, public."""
    shared = select(DashboardShare.dashboard_id).where(
        or_(DashboardShare.user_id == principal.user_id, DashboardShare.email == principal.email)
    )
    return select(Dashboard).where(
        or_(
            Dashboard.owner_id == principal.user_id,
            Dashboard.id.in_(shared),
            Dashboard.prebuilt_slug.is_not(None),
            Dashboard.is_public.is_(True),
        )
    )
