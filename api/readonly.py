"""Analysts' read-only SQL on ClickHouse, with time and row limits.

Every query runs with ClickHouse's ``readonly = 2`` (reads only; settings may change), a
``max_execution_time`` and a result-row limit (``max_result_rows`` with
``result_overflow_mode = 'break'``; the rows are also cut here to the exact limit, because
``break`` stops at a block boundary).

``readonly`` alone is not enough on the embedded engine (chDB): it blocks INSERT, CREATE, DROP,
ALTER, TRUNCATE and SYSTEM, but still lets ``SELECT … INTO OUTFILE``, ``INSERT INTO FUNCTION file(…)``
and table functions such as ``file()``, ``url()`` or ``s3()`` read and write outside the database.
So each query is first parsed by ClickHouse itself (``EXPLAIN AST`` — no hand-written SQL parser
to disagree with the engine) and refused unless:

- it is a SELECT, SHOW, DESCRIBE, EXISTS or EXPLAIN statement (one statement);
- it writes no ``INTO OUTFILE``;
- it calls no table function outside a small list of pure ones (``numbers``, ``values``, ...);
  the list of table functions comes from the engine (``system.table_functions``);
- it does not raise its own limits in a ``SETTINGS`` clause.

The verdict depends on the query's text alone (parameters are typed values placed into the
parsed statement: no value changes its kind, its table functions or an ``INTO OUTFILE``), so a
guard remembers the texts it allowed and does not parse them again: a dashboard's SQL widget
sends the same text on every request.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import math
import re
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import ClickHouseError

READ_STATEMENTS = ("Select", "Show", "Describe", "Exists", "Explain")
PURE_TABLE_FUNCTIONS = frozenset(
    {
        "numbers",
        "numbers_mt",
        "zeros",
        "zeros_mt",
        "values",
        "null",
        "view",
        "viewIfPermitted",
        "merge",
        "generateRandom",
        "generateSeries",
        "generate_series",
        "format",
        "primes",
        "loop",
    }
)
GUARDED_SETTINGS = re.compile(
    r"\b(readonly|max_execution_time|max_result_rows|max_result_bytes|result_overflow_mode|max_memory_usage"
    r"|allow_ddl|max_rows_to_read|max_bytes_to_read|timeout_overflow_mode)\b\s*=",
    re.IGNORECASE,
)
STRING_LITERAL = re.compile(r"'(?:[^'\\]|\\.)*'")
FUNCTION_NODE = re.compile(r"^\s*Function (\S+)")
#: Query texts a guard remembers having allowed (the least recently used are forgotten first).
ALLOWED_TEXTS_KEPT = 256


class QueryRefused(ValueError):
    """A query that is not a single read-only statement within the limits (answered 400)."""


class QueryFailed(ValueError):
    """ClickHouse refused or failed the query (answered 400 with ClickHouse's message)."""


@dataclass(frozen=True)
class QueryResult:
    """Rows of a read-only query with their column names and ClickHouse types."""

    columns: list[str]
    types: list[str]
    rows: list[list[Any]]
    truncated: bool
    elapsed_ms: float

    @property
    def row_count(self) -> int:
        """How many rows the result holds (after the row limit)."""
        return len(self.rows)


class ReadOnlyGuard:
    """Decides whether a query may run, using the engine's own parser (see the module docstring)."""

    def __init__(self, remember: int = ALLOWED_TEXTS_KEPT) -> None:
        self._table_functions: frozenset[str] | None = None
        self._allowed: OrderedDict[str, None] = OrderedDict()
        self._remember = remember
        self._lock = threading.Lock()

    def _denied_functions(self, client: Client) -> frozenset[str]:
        with self._lock:
            if self._table_functions is None:
                names = client.query("SELECT name FROM system.table_functions")
                self._table_functions = frozenset(row[0] for row in names.result_rows)
            return self._table_functions - PURE_TABLE_FUNCTIONS

    def check(self, client: Client, query: str, parameters: dict[str, Any] | None = None) -> None:
        """Raise :class:`QueryRefused` (or :class:`QueryFailed` for a syntax error) unless ``query`` may run."""
        with self._lock:
            if query in self._allowed:
                self._allowed.move_to_end(query)
                return
        if not query.strip():
            raise QueryRefused("the query is empty")
        if GUARDED_SETTINGS.search(STRING_LITERAL.sub("''", query)):
            raise QueryRefused("a query may not change readonly or its time, row or memory limits")
        try:
            # EXPLAIN AST only parses: nothing runs, so it needs no limits.
            explained = client.query(f"EXPLAIN AST {query}", parameters=parameters)
            ast = [row[0] for row in explained.result_rows]
        except ClickHouseError as exc:
            raise QueryFailed(_clickhouse_message(exc)) from exc
        if not ast:
            raise QueryRefused("the query could not be parsed")
        root = ast[0].lstrip()
        if not root.startswith(READ_STATEMENTS):
            raise QueryRefused(f"only SELECT, SHOW, DESCRIBE, EXISTS and EXPLAIN are allowed (got {root.split()[0]})")
        if root.startswith("Select") and any(line.startswith(" Literal ") for line in ast[1:]):
            raise QueryRefused("INTO OUTFILE is not allowed")
        denied = self._denied_functions(client)
        for line in ast:
            if line.lstrip().startswith("InsertQuery"):
                raise QueryRefused("INSERT is not allowed")
            match = FUNCTION_NODE.match(line)
            if match and match.group(1) in denied:
                raise QueryRefused(f"the table function {match.group(1)}() reaches outside the database")
        with self._lock:
            self._allowed[query] = None
            while len(self._allowed) > self._remember:
                self._allowed.popitem(last=False)


def run_readonly(
    client: Client,
    query: str,
    *,
    max_rows: int,
    max_seconds: int,
    guard: ReadOnlyGuard | None,
    parameters: dict[str, Any] | None = None,
) -> QueryResult:
    """Run one analyst query read-only, with at most ``max_rows`` rows and ``max_seconds`` of execution.

    ``guard=None`` skips the guard (only for checking what ClickHouse's ``readonly`` alone does).
    The limits go into the statement's own ``SETTINGS`` clause, never through clickhouse-connect's
    ``settings=``: on chDB that runs ``SET readonly = 2`` on the process's one session for statements
    it takes for INSERTs, and ``readonly`` cannot be unset from inside readonly mode — every later
    write of the process (the sinks') would fail.
    """
    if guard is not None:
        guard.check(client, query, parameters)
    limits = (
        f"readonly = 2, max_execution_time = {int(max_seconds)}, "
        # one row more than asked, to know whether the result was cut
        f"max_result_rows = {int(max_rows) + 1}, result_overflow_mode = 'break'"
    )
    statement = query.strip().rstrip(";").rstrip()
    started = time.perf_counter()
    try:
        result = client.query(f"{statement}\nSETTINGS {limits}", parameters=parameters)
    except ClickHouseError as exc:
        raise QueryFailed(_clickhouse_message(exc)) from exc
    elapsed_ms = (time.perf_counter() - started) * 1000
    rows = result.result_rows
    truncated = len(rows) > max_rows
    return QueryResult(
        columns=list(result.column_names),
        types=[t.name for t in result.column_types],
        rows=[list(row) for row in rows[:max_rows]],
        truncated=truncated,
        elapsed_ms=round(elapsed_ms, 3),
    )


def _clickhouse_message(exc: Exception) -> str:
    # clickhouse-connect wraps the server's text; keep ClickHouse's own message, without the stack trace.
    text = str(exc).strip()
    text = text.split("Stack trace:", 1)[0].strip()
    return text[:2000]


def jsonable(value: Any) -> Any:
    """A ClickHouse value as JSON: dates in ISO 8601, UUIDs/IPs/decimals as text, NaN/±Inf as null."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, uuid.UUID | Decimal | ipaddress.IPv4Address | ipaddress.IPv6Address):
        return str(value)
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", errors="replace")
    if isinstance(value, dict):
        return {str(jsonable(k)): jsonable(v) for k, v in value.items()}
    if isinstance(value, Sequence | set | frozenset):
        return [jsonable(v) for v in value]
    return str(value)
