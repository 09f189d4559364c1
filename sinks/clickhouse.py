"""One way to reach ClickHouse, chosen by one setting (``TIDEMARK_CLICKHOUSE_URL``).

- ``chdb://<path>`` — the embedded ClickHouse engine (chDB) through clickhouse-connect's
  ``interface='chdb'``; data lives at ``<path>``. chDB allows one engine per process,
  so the process that runs the sinks and the API owns it and everybody else (analysts,
  the CLI, tests in other processes) reaches it through the API's ``/v1/sql``.
- ``http(s)://user:password@host:8123`` — a ClickHouse server.
"""

from __future__ import annotations

import threading
from pathlib import Path
from urllib.parse import unquote, urlparse

import clickhouse_connect
from clickhouse_connect.driver.client import Client

_engine_lock = threading.Lock()
_engine_path: Path | None = None
_engine_client: Client | None = None


class EngineAlreadyOpen(RuntimeError):
    """chDB was asked for a second data path in one process."""


def is_embedded(url: str) -> bool:
    """Whether ``url`` names the embedded engine."""
    return url.startswith("chdb:")


def chdb_path(url: str) -> Path:
    """The data path of a ``chdb://<path>`` URL (relative paths are taken from the working directory)."""
    rest = url[len("chdb:") :]
    if rest.startswith("//"):
        rest = rest[2:]
    return Path(unquote(rest) or ".tidemark/chdb").resolve()


def connect(url: str, database: str | None = None) -> Client:
    """A clickhouse-connect client for ``url``, with ``database`` created if it does not exist.

    For ``chdb://`` the process-wide engine is opened once and shared (its handle is
    thread-safe: clickhouse-connect serialises calls on it).
    """
    if is_embedded(url):
        client = _embedded(chdb_path(url))
    else:
        parsed = urlparse(url)
        client = clickhouse_connect.get_client(
            host=parsed.hostname or "localhost",
            port=parsed.port or (8443 if parsed.scheme == "https" else 8123),
            username=unquote(parsed.username or "default"),
            password=unquote(parsed.password or ""),
            secure=parsed.scheme == "https",
        )
    if database:
        client.command(f"CREATE DATABASE IF NOT EXISTS {quote_identifier(database)}")
        client.database = database
    return client


def _embedded(path: Path) -> Client:
    global _engine_path, _engine_client
    with _engine_lock:
        if _engine_client is not None:
            if path != _engine_path:
                raise EngineAlreadyOpen(f"this process already owns the chDB engine at {_engine_path}")
            return _engine_client
        path.mkdir(parents=True, exist_ok=True)
        _engine_client = clickhouse_connect.get_client(interface="chdb", path=str(path))
        _engine_path = path
        return _engine_client


def quote_identifier(name: str) -> str:
    """Backquote a ClickHouse identifier (database, table or column name)."""
    return "`" + name.replace("\\", "\\\\").replace("`", "\\`") + "`"
