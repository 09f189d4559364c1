"""A/B experiments over HTTP: definitions and status, variant assignment, results (``/v1/experiments``).

Status moves only forward: ``draft → running``, ``draft → stopped`` (abandoned before it
ran), ``running → completed`` and ``running → stopped``; anything else is 409. Variants,
weights and metrics change only while a draft (changing them under running traffic would
move people between variants).

``POST /v1/experiments/{key}/assign`` is what applications call for each user: any valid key
(viewer included) may call it, only while the experiment is running. The variant is
:func:`assign_variant` of (key, user) against the weights, so it is deterministic; the first
answer is also recorded in ``experiment_assignments`` and later calls return the recorded one
(sticky even if the hashing ever changed). Applications track ``experiment_exposure`` events
(properties ``experiment``, ``variant``) when the user sees the variant; results are computed
from those exposures in ClickHouse (:func:`compute_experiment`).

Experiments are team-wide: every key reads them and their results; analysts create them;
the owner (or an admin) changes them.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from api.analyses.experiments import (
    ExperimentDefinition,
    ExperimentResult,
    MetricSpec,
    Variant,
    assign_variant,
    compute_experiment,
)
from api.analyses.query import TimeRange
from api.auth import ERROR_RESPONSES, Analyst, ApiError, CurrentPrincipal, DbSession, Role, forbidden, not_found
from api.dashboards.models import Page
from api.deps import MAX_ID, RowId
from api.metadata.models import Experiment, ExperimentAssignment
from api.routes.cohorts import AnalysisClickHouse, check_range, invalid, page_of, resolve_cohort

router = APIRouter(prefix="/v1/experiments", tags=["experiments"], responses=ERROR_RESPONSES)

Status = Literal["draft", "running", "completed", "stopped"]

#: The transitions allowed from each status.
TRANSITIONS: dict[str, frozenset[str]] = {
    "draft": frozenset({"running", "stopped"}),
    "running": frozenset({"completed", "stopped"}),
    "completed": frozenset(),
    "stopped": frozenset(),
}


class ExperimentIn(ExperimentDefinition):
    """A new experiment: the analysis definition plus a name and description. It starts as a draft."""

    key: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$")
    name: str = Field(min_length=1, max_length=200)
    description: str = Field("", max_length=10_000)


class ExperimentPatch(BaseModel):
    """Changes to an experiment (omitted fields stay). Definition fields change only in draft."""

    name: str | None = Field(None, min_length=1, max_length=200)
    description: str | None = Field(None, max_length=10_000)
    status: Status | None = None
    variants: list[Variant] | None = None
    control: str | None = None
    conversion: MetricSpec | None = None
    continuous: MetricSpec | None = None
    alpha: float | None = Field(None, gt=0, lt=1)
    minimum_detectable_effect: float | None = None
    power: float | None = Field(None, gt=0, lt=1)


class ExperimentOut(ExperimentDefinition):
    """A stored experiment."""

    id: int
    name: str
    description: str
    status: Status
    owner_id: int | None
    started_at: datetime | None
    ended_at: datetime | None
    created_at: datetime
    updated_at: datetime


class AssignIn(BaseModel):
    """Who to assign."""

    user_id: str = Field(min_length=1, max_length=256)


class AssignmentOut(BaseModel):
    """The variant a user sees in an experiment."""

    experiment: str
    user_id: str
    variant: str
    assigned_at: datetime


# --- conversions ---------------------------------------------------------------------------------

_SETTINGS_FIELDS = ("control", "alpha", "minimum_detectable_effect", "power")
_DEFINITION_FIELDS = ("variants", "conversion", "continuous", *_SETTINGS_FIELDS)


def definition_of(experiment: Experiment) -> ExperimentDefinition:
    """The analysis definition of a stored experiment."""
    return ExperimentDefinition.model_validate(
        {"key": experiment.key, "variants": experiment.variants, **experiment.target_metric, **experiment.settings}
    )


def _store(experiment: Experiment, definition: ExperimentDefinition) -> None:
    doc = definition.model_dump(mode="json")
    experiment.variants = doc["variants"]
    experiment.target_metric = {"conversion": doc["conversion"], "continuous": doc["continuous"]}
    experiment.settings = {k: doc[k] for k in _SETTINGS_FIELDS}


def experiment_out(experiment: Experiment) -> ExperimentOut:
    """The API view of a stored experiment."""
    return ExperimentOut(
        **definition_of(experiment).model_dump(),
        id=experiment.id,
        name=experiment.name,
        description=experiment.description,
        status=experiment.status,  # type: ignore[arg-type]
        owner_id=experiment.owner_id,
        started_at=experiment.started_at,
        ended_at=experiment.ended_at,
        created_at=experiment.created_at,
        updated_at=experiment.updated_at,
    )


def _load(session: Any, experiment_id: RowId) -> Experiment:
    experiment = session.get(Experiment, experiment_id)
    if experiment is None:
        raise not_found(f"experiment {experiment_id}")
    return experiment


def _load_editable(session: Any, experiment_id: RowId, principal: Any) -> Experiment:
    experiment = _load(session, experiment_id)
    if not principal.at_least(Role.analyst):
        raise forbidden("this needs the analyst role")
    if principal.role is not Role.admin and experiment.owner_id != principal.user_id:
        raise forbidden("only the owner changes this experiment")
    return experiment


def conflict(message: str) -> ApiError:
    """409: the experiment's status does not allow this."""
    return ApiError(409, "conflict", message)


# --- routes --------------------------------------------------------------------------------------


@router.get("", response_model=Page[ExperimentOut], summary="List experiments")
def list_experiments(
    principal: CurrentPrincipal,
    session: DbSession,
    status: Annotated[Status | None, Query()] = None,
    limit: int = Query(50, ge=1, le=500),
    offset: int = Query(0, ge=0, le=1_000_000),
) -> Page[ExperimentOut]:
    """All experiments (optionally of one status), by id."""
    query = select(Experiment)
    if status is not None:
        query = query.where(Experiment.status == status)
    rows, total = page_of(session, query, Experiment.id, limit, offset)
    return Page[ExperimentOut](items=[experiment_out(e) for e in rows], total=total, limit=limit, offset=offset)


@router.post("", response_model=ExperimentOut, status_code=201, summary="Create an experiment")
def create_experiment(body: ExperimentIn, principal: Analyst, session: DbSession) -> ExperimentOut:
    """A draft experiment owned by the caller; keys are unique (409 otherwise)."""
    if session.scalar(select(Experiment.id).where(Experiment.key == body.key)) is not None:
        raise conflict(f"an experiment with key {body.key!r} exists")
    experiment = Experiment(
        key=body.key, name=body.name, description=body.description, status="draft", owner_id=principal.user_id
    )
    _store(experiment, ExperimentDefinition.model_validate(body.model_dump(exclude={"name", "description"})))
    session.add(experiment)
    try:
        session.commit()
    except IntegrityError as exc:  # created concurrently
        session.rollback()
        raise conflict(f"an experiment with key {body.key!r} exists") from exc
    return experiment_out(experiment)


@router.get("/{experiment_id}", response_model=ExperimentOut, summary="Read an experiment")
def get_experiment(experiment_id: RowId, principal: CurrentPrincipal, session: DbSession) -> ExperimentOut:
    """An experiment with its status and dates."""
    return experiment_out(_load(session, experiment_id))


@router.patch("/{experiment_id}", response_model=ExperimentOut, summary="Change an experiment or its status")
def update_experiment(
    experiment_id: RowId, body: ExperimentPatch, principal: CurrentPrincipal, session: DbSession
) -> ExperimentOut:
    """Rename, redefine (draft only) or move the status along an allowed transition (409 otherwise)."""
    experiment = _load_editable(session, experiment_id, principal)
    changes = body.model_dump(exclude_unset=True, mode="json")
    new_status = changes.pop("status", None)
    for field in ("name", "description"):
        value = changes.pop(field, None)
        if value is not None:
            setattr(experiment, field, value)
    if changes:
        if experiment.status != "draft":
            raise conflict(f"variants and metrics change only in draft (the experiment is {experiment.status})")
        merged = {**definition_of(experiment).model_dump(mode="json"), **changes}
        try:
            _store(experiment, ExperimentDefinition.model_validate(merged))
        except ValueError as exc:
            raise invalid(exc) from exc
    if new_status is not None and new_status != experiment.status:
        if new_status not in TRANSITIONS[experiment.status]:
            raise conflict(f"an experiment cannot go from {experiment.status} to {new_status}")
        now = datetime.now(UTC)
        if new_status == "running":
            experiment.started_at = now
        else:
            experiment.ended_at = now
        experiment.status = new_status
    session.commit()
    return experiment_out(experiment)


@router.delete("/{experiment_id}", status_code=204, summary="Delete an experiment")
def delete_experiment(experiment_id: RowId, principal: CurrentPrincipal, session: DbSession) -> None:
    """Delete an experiment that is not running (its assignments go with it)."""
    experiment = _load_editable(session, experiment_id, principal)
    if experiment.status == "running":
        raise conflict("stop or complete a running experiment before deleting it")
    session.delete(experiment)
    session.commit()


@router.post("/{key}/assign", response_model=AssignmentOut, summary="Assign a user to a variant")
def assign(key: str, body: AssignIn, principal: CurrentPrincipal, session: DbSession) -> AssignmentOut:
    """The user's variant: recorded if assigned before, else hashed against the weights and recorded."""
    experiment = session.scalar(select(Experiment).where(Experiment.key == key))
    if experiment is None:
        raise not_found(f"experiment {key!r}")
    if experiment.status != "running":
        raise conflict(f"experiment {key!r} is {experiment.status}, not running")

    def recorded() -> ExperimentAssignment | None:
        return session.scalar(
            select(ExperimentAssignment).where(
                ExperimentAssignment.experiment_id == experiment.id, ExperimentAssignment.person_id == body.user_id
            )
        )

    row = recorded()
    if row is None:
        weights = [(v["name"], float(v["weight"])) for v in experiment.variants]
        row = ExperimentAssignment(
            experiment_id=experiment.id, person_id=body.user_id, variant=assign_variant(key, body.user_id, weights)
        )
        session.add(row)
        try:
            session.commit()
        except IntegrityError:  # a concurrent call recorded it first: that one stands
            session.rollback()
            row = recorded()
            assert row is not None
    return AssignmentOut(experiment=key, user_id=body.user_id, variant=row.variant, assigned_at=row.assigned_at)


@router.get("/{experiment_id}/results", response_model=ExperimentResult, summary="Experiment results")
def results(
    experiment_id: RowId,
    principal: CurrentPrincipal,
    session: DbSession,
    client: AnalysisClickHouse,
    start: Annotated[datetime | None, Query(description="Default: when the experiment started.")] = None,
    end: Annotated[datetime | None, Query(description="Default: when it ended, or now.")] = None,
    cohort_id: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None,
) -> ExperimentResult:
    """Per-variant conversion and metric with tests against control, SRM check, sample size, excluded people."""
    experiment = _load(session, experiment_id)
    start = start or experiment.started_at
    if start is None:
        raise conflict(f"experiment {experiment.key!r} has not started; give start and end")
    end = end or experiment.ended_at or datetime.now(UTC)
    try:
        time_range = TimeRange(start=start, end=end)
    except ValueError as exc:
        raise invalid(exc) from exc
    check_range(time_range)
    cohort = resolve_cohort(session, client, cohort_id, principal)
    try:
        return compute_experiment(client, definition_of(experiment), time_range, cohort)
    except ValueError as exc:
        raise invalid(exc) from exc


__all__ = ["TRANSITIONS", "router"]
