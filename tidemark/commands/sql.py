"""``tidemark sql "SELECT …"``: run a read-only query through the API's ``POST /v1/sql`` and print it.

The API process owns the ClickHouse engine (chDB allows one per process), so analysts and
scripts reach the data through this command or the endpoint, never by opening the engine.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, TextIO

import httpx

from tidemark.settings import get_settings

MAX_CELL_WIDTH = 60


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``sql`` command."""
    parser = subparsers.add_parser("sql", help="run a read-only SQL query through the API and print the result")
    parser.add_argument("query", help="one SELECT, SHOW, DESCRIBE, EXISTS or EXPLAIN statement ('-' reads stdin)")
    parser.add_argument("--url", default=None, help="the API's base URL (default: http://TIDEMARK_API_HOST:PORT)")
    parser.add_argument("--format", choices=("table", "csv", "json"), default="table", help="output format")
    parser.add_argument("--max-rows", type=int, default=None, help="at most this many rows")
    parser.add_argument(
        "--api-key", default=None, help="analyst or admin API key (default: TIDEMARK_API_KEY, else TIDEMARK_API_TOKEN)"
    )
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the answer")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Send the query; print the result (0) or the API's error (1) or a connection problem (2)."""
    settings = get_settings()
    url = (args.url or f"http://{settings.api_host}:{settings.api_port}").rstrip("/")
    query = sys.stdin.read() if args.query == "-" else args.query
    token = args.api_key or settings.api_key or settings.api_token
    body: dict[str, Any] = {"query": query, "format": "csv" if args.format == "csv" else "json"}
    if args.max_rows:
        body["max_rows"] = args.max_rows
    headers = {"authorization": f"Bearer {token}"} if token else {}
    try:
        response = httpx.post(f"{url}/v1/sql", json=body, headers=headers, timeout=args.timeout)
    except httpx.HTTPError as exc:
        print(f"tidemark sql: cannot reach the API at {url}: {exc}", file=sys.stderr)
        return 2
    if response.status_code != 200:
        print(f"tidemark sql: {_error_message(response)}", file=sys.stderr)
        return 1
    if args.format == "csv":
        sys.stdout.write(response.text)
    elif args.format == "json":
        sys.stdout.write(json.dumps(response.json(), ensure_ascii=False, indent=2) + "\n")
    else:
        print_table(response.json(), sys.stdout)
    return 0


def _error_message(response: httpx.Response) -> str:
    try:
        error = response.json()["error"]
        return f"{error['code']}: {error['message']}"
    except (ValueError, KeyError, TypeError):
        return f"HTTP {response.status_code}: {response.text[:500]}"


def print_table(result: dict[str, Any], out: TextIO) -> None:
    """Print a ``/v1/sql`` JSON result as an aligned text table, with the row count and time."""
    columns: list[str] = result["columns"]
    cells = [[_cell(value) for value in row] for row in result["rows"]]
    widths = [len(c) for c in columns]
    for row in cells:
        widths = [max(w, len(v)) for w, v in zip(widths, row, strict=True)]
    if columns:
        out.write(" | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip() + "\n")
        out.write("-+-".join("-" * w for w in widths) + "\n")
    for row in cells:
        out.write(" | ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() + "\n")
    more = " (truncated by the row limit)" if result.get("truncated") else ""
    out.write(f"({result['row_count']} rows{more}, {result['elapsed_ms']:.1f} ms)\n")


def _cell(value: Any) -> str:
    if value is None:
        text = "NULL"
    elif isinstance(value, dict | list):
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    else:
        text = str(value)
    text = text.replace("\n", "\\n")
    return text if len(text) <= MAX_CELL_WIDTH else text[: MAX_CELL_WIDTH - 1] + "…"
