"""``POST /v1/sql``: analysts' read-only SQL on ClickHouse, answered as JSON or CSV.

This is how analysts reach the embedded engine (chDB lets only the API process open it).
"""

from __future__ import annotations

import csv
import io
import json
from typing import Any, Literal

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from api.auth import ErrorBody
from api.deps import Analyst, ClickHouseDep, SettingsDep
from api.readonly import QueryFailed, QueryRefused, ReadOnlyGuard, jsonable, run_readonly

router = APIRouter(prefix="/v1", tags=["sql"])


class SqlQuery(BaseModel):
    """An analyst's query."""

    query: str = Field(min_length=1, description="One SELECT, SHOW, DESCRIBE, EXISTS or EXPLAIN statement.")
    format: Literal["json", "csv"] = Field("json", description="json (columns, types, rows) or csv (with header).")
    max_rows: int | None = Field(
        None, ge=1, description="At most this many rows (capped by the server's TIDEMARK_SQL_MAX_RESULT_ROWS)."
    )
    parameters: dict[str, Any] | None = Field(
        None, description="Values of server-side query parameters written {name:Type} in the query."
    )


class SqlResult(BaseModel):
    """A query's result in JSON form."""

    columns: list[str]
    types: list[str]
    rows: list[list[Any]]
    row_count: int
    truncated: bool = Field(description="Whether the row limit cut the result.")
    elapsed_ms: float


def _guard(request: Request) -> ReadOnlyGuard:
    guard: ReadOnlyGuard | None = getattr(request.app.state, "sql_guard", None)
    if guard is None:
        guard = request.app.state.sql_guard = ReadOnlyGuard()
    return guard


@router.post(
    "/sql",
    response_model=SqlResult,
    summary="Run a read-only SQL query",
    responses={
        200: {"content": {"text/csv": {}}, "description": "JSON result, or CSV with a header row"},
        400: {"model": ErrorBody, "description": "Not a read-only query, or ClickHouse refused it (its message)"},
        401: {"model": ErrorBody, "description": "Missing or wrong bearer token (when TIDEMARK_API_TOKEN is set)"},
        503: {"model": ErrorBody, "description": "ClickHouse is not connected yet"},
    },
)
def run_sql(
    _analyst: Analyst, body: SqlQuery, request: Request, settings: SettingsDep, clickhouse: ClickHouseDep
) -> Response:
    """Run one read-only query with the server's time and row limits; answer JSON or CSV."""
    max_rows = min(body.max_rows or settings.sql_max_result_rows, settings.sql_max_result_rows)
    try:
        result = run_readonly(
            clickhouse,
            body.query,
            max_rows=max_rows,
            max_seconds=settings.sql_max_execution_seconds,
            guard=_guard(request),
            parameters=body.parameters,
        )
    except QueryRefused as exc:
        raise HTTPException(400, detail={"code": "query_not_allowed", "message": str(exc)}) from exc
    except QueryFailed as exc:
        raise HTTPException(400, detail={"code": "query_failed", "message": str(exc)}) from exc
    headers = {
        "X-Row-Count": str(result.row_count),
        "X-Truncated": str(result.truncated).lower(),
        "X-Elapsed-Ms": str(result.elapsed_ms),
    }
    if body.format == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(result.columns)
        writer.writerows([[_csv_cell(v) for v in row] for row in result.rows])
        return Response(out.getvalue(), media_type="text/csv; charset=utf-8", headers=headers)
    return JSONResponse(
        {
            "columns": result.columns,
            "types": result.types,
            "rows": [[jsonable(v) for v in row] for row in result.rows],
            "row_count": result.row_count,
            "truncated": result.truncated,
            "elapsed_ms": result.elapsed_ms,
        },
        headers=headers,
    )


def _csv_cell(value: Any) -> Any:
    converted = jsonable(value)
    if isinstance(converted, dict | list):
        return json.dumps(converted, ensure_ascii=False, separators=(",", ":"))
    return "" if converted is None else converted
