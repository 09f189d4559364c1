"""Dashboards, their widgets and shares, and widget data: ``/v1/dashboards``."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from api.auth import (
    ERROR_RESPONSES,
    OPTIONAL_AUTH,
    Analyst,
    ApiError,
    CurrentPrincipal,
    DbSession,
    MaybePrincipal,
    Principal,
    Role,
    find_or_create_user,
    forbidden,
    not_found,
)
from api.dashboards.access import Access, access_of, load_editable, load_visible, visible_query
from api.dashboards.models import (
    DashboardFilters,
    DashboardIn,
    DashboardOut,
    DashboardPatch,
    DashboardSummary,
    DayOrInstant,
    DuplicateIn,
    Page,
    Permission,
    Position,
    ShareIn,
    ShareOut,
    WidgetData,
    WidgetIn,
    WidgetOut,
    WidgetPatch,
    WidgetType,
)
from api.dashboards.widgets import WidgetContext, WidgetDataError, merge_filters, resolve_cached
from api.deps import RowId
from api.metadata.models import Dashboard, DashboardShare, DashboardWidget, User
from api.metrics_query import DimensionFilter, Granularity, QueryError, RelativeRange, UnknownMetric

router = APIRouter(prefix="/v1/dashboards", tags=["dashboards"], responses=ERROR_RESPONSES)


# --- conversions ----------------------------------------------------------------------------------


def widget_out(widget: DashboardWidget) -> WidgetOut:
    """The API view of a stored widget."""
    return WidgetOut(
        id=widget.id,
        dashboard_id=widget.dashboard_id,
        title=widget.title,
        widget_type=WidgetType(widget.widget_type),
        data_source=widget.data_source,
        config=widget.config,
        position=Position.model_validate(widget.position),
        refresh_seconds=widget.refresh_seconds,
        created_at=widget.created_at,
        updated_at=widget.updated_at,
    )


def _owner_email(session: Any, dashboard: Dashboard) -> str:
    owner = session.get(User, dashboard.owner_id)
    return owner.email if owner is not None else ""


def summary_out(session: Any, dashboard: Dashboard, access: Access) -> DashboardSummary:
    """The list view of a dashboard."""
    return DashboardSummary(
        id=dashboard.id,
        name=dashboard.name,
        description=dashboard.description,
        owner_email=_owner_email(session, dashboard),
        is_public=dashboard.is_public,
        prebuilt=dashboard.prebuilt_slug,
        permission=access,
        widget_count=len(dashboard.widgets),
        updated_at=dashboard.updated_at,
    )


def dashboard_out(session: Any, dashboard: Dashboard, access: Access) -> DashboardOut:
    """The full view of a dashboard."""
    return DashboardOut(
        **summary_out(session, dashboard, access).model_dump(),
        layout=dashboard.layout,
        default_filters=DashboardFilters.model_validate(dashboard.default_filters),
        widgets=[widget_out(w) for w in dashboard.widgets],
        created_at=dashboard.created_at,
    )


def new_widget(body: WidgetIn) -> DashboardWidget:
    """A stored widget from its API form."""
    return DashboardWidget(
        title=body.title,
        widget_type=body.widget_type.value,
        config=body.config,
        data_source=body.data_source.model_dump(mode="json"),
        position=body.position.model_dump(),
        refresh_seconds=body.refresh_seconds,
    )


def create_dashboard_row(session: Any, owner_id: int, body: DashboardIn, prebuilt_slug: str | None = None) -> Dashboard:
    """Store a dashboard with its widgets (shared by the API and the pre-built seeding)."""
    dashboard = Dashboard(
        name=body.name,
        description=body.description,
        owner_id=owner_id,
        is_public=body.is_public,
        layout=body.layout,
        default_filters=body.default_filters.model_dump(mode="json"),
        prebuilt_slug=prebuilt_slug,
    )
    dashboard.widgets = [new_widget(w) for w in body.widgets]
    session.add(dashboard)
    session.flush()
    return dashboard


# --- dashboards -----------------------------------------------------------------------------------


@router.get("", response_model=Page[DashboardSummary], summary="List dashboards the caller can see")
def list_dashboards(
    principal: CurrentPrincipal,
    session: DbSession,
    limit: int = Query(50, ge=1, le=500),
    offset: int = Query(0, ge=0, le=1_000_000),
) -> Page[DashboardSummary]:
    """Own dashboards, those shared with the caller, pre-built and public ones."""
    query = visible_query(principal)
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    rows = session.scalars(query.order_by(Dashboard.id).limit(limit).offset(offset)).all()
    items = []
    for dashboard in rows:
        access = access_of(dashboard, principal)
        if access is not None:
            items.append(summary_out(session, dashboard, access))
    return Page[DashboardSummary](items=items, total=total, limit=limit, offset=offset)


@router.post("", response_model=DashboardOut, status_code=201, summary="Create a dashboard")
def create_dashboard(body: DashboardIn, principal: Analyst, session: DbSession) -> DashboardOut:
    """A new dashboard owned by the caller (analyst role or above)."""
    dashboard = create_dashboard_row(session, principal.user_id, body)
    session.commit()
    return dashboard_out(session, dashboard, "owner")


@router.get("/{dashboard_id}", response_model=DashboardOut, summary="Read a dashboard", openapi_extra=OPTIONAL_AUTH)
def get_dashboard(dashboard_id: RowId, principal: MaybePrincipal, session: DbSession) -> DashboardOut:
    """A dashboard the caller can see; public dashboards need no key."""
    dashboard, access = load_visible(session, dashboard_id, principal)
    return dashboard_out(session, dashboard, access)


@router.patch("/{dashboard_id}", response_model=DashboardOut, summary="Change a dashboard")
def update_dashboard(
    dashboard_id: RowId, body: DashboardPatch, principal: CurrentPrincipal, session: DbSession
) -> DashboardOut:
    """Change name, description, visibility, layout or default filters (owner or edit share)."""
    dashboard = load_editable(session, dashboard_id, principal)
    changes = body.model_dump(exclude_unset=True, mode="json")
    if "is_public" in changes and access_of(dashboard, principal) != "owner" and principal.role is not Role.admin:
        raise forbidden("only the owner makes a dashboard public or private")
    for field, value in changes.items():
        if value is not None:
            setattr(dashboard, field, value)
    session.commit()
    return dashboard_out(session, dashboard, access_of(dashboard, principal) or "view")


@router.delete("/{dashboard_id}", status_code=204, summary="Delete a dashboard")
def delete_dashboard(dashboard_id: RowId, principal: CurrentPrincipal, session: DbSession) -> None:
    """Delete a dashboard (its owner; admins for pre-built ones)."""
    dashboard, access = load_visible(session, dashboard_id, principal)
    if access != "owner" and not (dashboard.prebuilt_slug and principal.role is Role.admin):
        raise forbidden("only the owner deletes a dashboard")
    if not principal.at_least(Role.analyst):
        raise forbidden("this needs the analyst role")
    session.delete(dashboard)
    session.commit()


@router.post("/{dashboard_id}/duplicate", response_model=DashboardOut, status_code=201, summary="Duplicate a dashboard")
def duplicate_dashboard(
    dashboard_id: RowId, principal: Analyst, session: DbSession, body: DuplicateIn | None = None
) -> DashboardOut:
    """A private copy (with widgets, without shares) owned by the caller."""
    source, _ = load_visible(session, dashboard_id, principal)
    copy = Dashboard(
        name=(body.name if body and body.name else f"{source.name} (copy)")[:200],
        description=source.description,
        owner_id=principal.user_id,
        is_public=False,
        layout=dict(source.layout),
        default_filters=dict(source.default_filters),
    )
    copy.widgets = [
        DashboardWidget(
            title=w.title,
            widget_type=w.widget_type,
            config=dict(w.config),
            data_source=dict(w.data_source),
            position=dict(w.position),
            refresh_seconds=w.refresh_seconds,
        )
        for w in source.widgets
    ]
    session.add(copy)
    session.commit()
    return dashboard_out(session, copy, "owner")


# --- widgets --------------------------------------------------------------------------------------


def _widget_of(dashboard: Dashboard, widget_id: int) -> DashboardWidget:
    for widget in dashboard.widgets:
        if widget.id == widget_id:
            return widget
    raise not_found(f"widget {widget_id}")


@router.post("/{dashboard_id}/widgets", response_model=WidgetOut, status_code=201, summary="Add a widget")
def add_widget(dashboard_id: RowId, body: WidgetIn, principal: CurrentPrincipal, session: DbSession) -> WidgetOut:
    """Add a widget to a dashboard the caller may edit."""
    dashboard = load_editable(session, dashboard_id, principal)
    widget = new_widget(body)
    dashboard.widgets.append(widget)
    session.commit()
    return widget_out(widget)


@router.patch("/{dashboard_id}/widgets/{widget_id}", response_model=WidgetOut, summary="Change a widget")
def update_widget(
    dashboard_id: RowId, widget_id: RowId, body: WidgetPatch, principal: CurrentPrincipal, session: DbSession
) -> WidgetOut:
    """Change a widget's type, source, options, position/size or refresh rate."""
    dashboard = load_editable(session, dashboard_id, principal)
    widget = _widget_of(dashboard, widget_id)
    changes = body.model_dump(exclude_unset=True, mode="json")
    for field, value in changes.items():
        if value is not None:
            setattr(widget, field, value)
    session.commit()
    return widget_out(widget)


@router.delete("/{dashboard_id}/widgets/{widget_id}", status_code=204, summary="Remove a widget")
def delete_widget(dashboard_id: RowId, widget_id: RowId, principal: CurrentPrincipal, session: DbSession) -> None:
    """Remove a widget from a dashboard the caller may edit."""
    dashboard = load_editable(session, dashboard_id, principal)
    widget = _widget_of(dashboard, widget_id)
    dashboard.widgets.remove(widget)
    session.delete(widget)
    session.commit()


def _parse_filter(text: str) -> DimensionFilter:
    dimension, sep, rest = text.partition(":")
    op, sep2, value = rest.partition(":")
    if not sep or not sep2:
        raise ApiError(
            422,
            "validation_error",
            f"filter {text!r}: use dimension:op:value (op: eq, neq, in, not_in, contains; in-lists separated by |)",
        )
    try:
        values: str | list[str] = value.split("|") if op in ("in", "not_in") else value
        return DimensionFilter.model_validate({"dimension": dimension, "op": op, "value": values})
    except ValueError as exc:
        raise ApiError(400, "invalid_request", f"filter {text!r}: {exc}") from exc


@router.get(
    "/{dashboard_id}/widgets/{widget_id}/data",
    response_model=WidgetData,
    summary="A widget's data",
    openapi_extra=OPTIONAL_AUTH,
)
def widget_data(
    request: Request,
    dashboard_id: RowId,
    widget_id: RowId,
    principal: MaybePrincipal,
    session: DbSession,
    range: Annotated[RelativeRange | None, Query(description="Override the dashboard's range.")] = None,
    start: Annotated[DayOrInstant | None, Query(description="Override: range start (date or instant).")] = None,
    end: Annotated[DayOrInstant | None, Query(description="Override: range end, exclusive.")] = None,
    granularity: Annotated[Granularity | None, Query()] = None,
    filter: Annotated[list[str] | None, Query(description="dimension:op:value, repeatable")] = None,  # noqa: A002
    refresh: Annotated[
        bool, Query(description="Recompute even if a cached result younger than the refresh interval exists.")
    ] = False,
) -> WidgetData:
    """Resolve a widget into chart-ready data with the dashboard's filters and these overrides.

    Results are reused while younger than the widget's ``refresh_seconds`` (see
    ``computed_at`` and ``cached`` in the response); ``refresh=true`` recomputes.
    """
    dashboard, _ = load_visible(session, dashboard_id, principal)
    widget = _widget_of(dashboard, widget_id)
    overrides: dict[str, Any] = {"range": range, "start": start, "end": end, "granularity": granularity}
    if filter:
        overrides["filters"] = [_parse_filter(f) for f in filter[:20]]
    try:
        filters = merge_filters(DashboardFilters.model_validate(dashboard.default_filters), overrides)
    except ValueError as exc:
        raise ApiError(400, "invalid_request", str(exc)) from exc
    state = request.app.state
    ctx = WidgetContext.of_app(state, filters, session)
    if not filter and all(value is None for value in overrides.values()):
        state.dashboard_warmer.viewed(dashboard_id)
    try:
        return resolve_cached(widget, ctx, state.widget_cache, max_age_share=0.0 if refresh else 1.0)
    except UnknownMetric as exc:
        raise ApiError(404, "unknown_metric", f"metric {exc.args[0]!r} is not in the catalogue") from exc
    except WidgetDataError as exc:
        raise ApiError(422, exc.code, exc.message) from exc
    except QueryError as exc:
        raise ApiError(400, exc.code, exc.message) from exc


# --- shares ---------------------------------------------------------------------------------------


def _share_out(share: DashboardShare) -> ShareOut:
    return ShareOut(
        id=share.id,
        dashboard_id=share.dashboard_id,
        email=share.email,
        user_id=share.user_id,
        permission=Permission(share.permission),
        created_at=share.created_at,
    )


def _load_owned(session: Any, dashboard_id: int, principal: Principal) -> Dashboard:
    dashboard, access = load_visible(session, dashboard_id, principal)
    if access != "owner" and not (access == "edit" and principal.role is Role.admin):
        raise forbidden("only the owner manages a dashboard's shares")
    if not principal.at_least(Role.analyst):
        raise forbidden("this needs the analyst role")
    return dashboard


@router.get("/{dashboard_id}/shares", response_model=Page[ShareOut], summary="List a dashboard's shares")
def list_shares(
    dashboard_id: RowId,
    principal: CurrentPrincipal,
    session: DbSession,
    limit: int = Query(50, ge=1, le=500),
    offset: int = Query(0, ge=0, le=1_000_000),
) -> Page[ShareOut]:
    """The people a dashboard is shared with (visible to anyone who can see the dashboard)."""
    dashboard, _ = load_visible(session, dashboard_id, principal)
    shares = dashboard.shares
    return Page[ShareOut](
        items=[_share_out(s) for s in shares[offset : offset + limit]], total=len(shares), limit=limit, offset=offset
    )


@router.post("/{dashboard_id}/shares", response_model=ShareOut, status_code=201, summary="Share a dashboard")
def add_share(dashboard_id: RowId, body: ShareIn, principal: CurrentPrincipal, session: DbSession) -> ShareOut:
    """Share with a person (by email) at view or edit; one share per dashboard and person (409 otherwise)."""
    dashboard = _load_owned(session, dashboard_id, principal)
    if any(s.email == body.email for s in dashboard.shares):
        raise ApiError(409, "conflict", f"dashboard {dashboard_id} is already shared with {body.email}")
    user = session.scalar(select(User).where(User.email == body.email))
    share = DashboardShare(email=body.email, user_id=user.id if user else None, permission=body.permission.value)
    dashboard.shares.append(share)
    try:
        session.commit()
    except IntegrityError as exc:  # a concurrent request shared it first
        session.rollback()
        raise ApiError(409, "conflict", f"dashboard {dashboard_id} is already shared with {body.email}") from exc
    return _share_out(share)


@router.delete("/{dashboard_id}/shares/{share_id}", status_code=204, summary="Stop sharing")
def delete_share(dashboard_id: RowId, share_id: RowId, principal: CurrentPrincipal, session: DbSession) -> None:
    """Remove a share."""
    dashboard = _load_owned(session, dashboard_id, principal)
    share = next((s for s in dashboard.shares if s.id == share_id), None)
    if share is None:
        raise not_found(f"share {share_id}")
    dashboard.shares.remove(share)
    session.delete(share)
    session.commit()


__all__ = ["router", "create_dashboard_row", "find_or_create_user"]
