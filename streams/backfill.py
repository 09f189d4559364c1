"""Batch recompute of metric snapshots from raw events, and reconciliation with the stream's values.

Why: the stream counts what arrives within its grace period and stitches identities it
has seen. Events later than the grace (an SDK that was offline), an outage of the
worker, or a person identified after the fact are fixed here: every snapshot of a range
is recomputed from ``events_resolved`` with the catalogue's SQL (:mod:`streams.sql`)
and published to the ``metrics`` topic with ``source = 'batch'``. The sink writes it
like any snapshot, and ``ReplacingMergeTree(computed_at)`` makes it replace the
stream's value: the sinks stay the only writers to ClickHouse.

:func:`reconcile` compares the stream's current values with the recomputed ones and
:func:`format_report` prints the table of differences.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from confluent_kafka import Producer

from schemas.streams import dimensions_key, metric_snapshot_codec
from streams.catalogue import Catalogue, MetricDefinition
from streams.periods import Period, PeriodCalendar
from streams.sql import MetricSql, compute_metrics
from streams.windows import MetricValue
from tidemark.settings import Settings
from tidemark.topics import METRICS

log = logging.getLogger(__name__)

Key = tuple[str, str, int, str]


class Queries(Protocol):
    """What the recompute needs from ClickHouse: a clickhouse-connect client, or :class:`ApiQueries`."""

    def query(self, sql: str, parameters: dict[str, Any] | None = None) -> Any:
        """Run a read query with server-side parameters; the result has ``result_rows``."""


@dataclass
class _Rows:
    result_rows: list[list[Any]]


class ApiQueries:
    """Read queries through the API's ``POST /v1/sql`` (for an embedded engine owned by the API process)."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 120.0) -> None:
        import httpx

        headers = {"X-API-Key": api_key} if api_key else {}
        self._http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout)

    def query(self, sql: str, parameters: dict[str, Any] | None = None) -> _Rows:
        """Run ``sql`` on the server; raise on an error answer."""
        response = self._http.post("/v1/sql", json={"query": sql, "parameters": parameters or {}})
        if response.status_code != 200:
            raise RuntimeError(f"/v1/sql answered {response.status_code}: {response.text[:500]}")
        body = response.json()
        if body.get("truncated"):
            raise RuntimeError("/v1/sql truncated the result; raise TIDEMARK_SQL_MAX_RESULT_ROWS")
        return _Rows(body["rows"])


def recompute(
    queries: Queries,
    catalogue: Catalogue,
    definitions: Iterable[MetricDefinition],
    calendar: PeriodCalendar,
    from_ms: int,
    to_ms: int,
    settings: Settings,
    periods: Sequence[Period] | None = None,
) -> list[MetricValue]:
    """Every snapshot of ``definitions`` for the periods intersecting ``[from_ms, to_ms)``, from raw events."""
    builder = MetricSql(
        catalogue,
        calendar,
        session_gap_ms=settings.session_inactivity_minutes * 60_000,
        session_max_length_ms=settings.session_max_length_minutes * 60_000,
    )
    wanted = [d for d in definitions]
    if periods is not None:
        # Restrict each definition to the requested periods it has.
        from dataclasses import replace

        wanted = [replace(d, periods=tuple(p for p in d.periods if p in periods)) for d in wanted]
    started = time.monotonic()
    values = compute_metrics(queries, builder, wanted, from_ms, to_ms)  # type: ignore[arg-type]
    log.info("Recomputed %d snapshots of %d metrics in %.1fs", len(values), len(wanted), time.monotonic() - started)
    return values


def current_values(
    queries: Queries, names: Sequence[str], from_ms: int, to_ms: int
) -> dict[Key, tuple[float, str]]:
    """The snapshots ClickHouse holds now (latest per key) for ``names`` whose period starts in the range."""
    rows = queries.query(
        """
        SELECT metric_type, period, toUnixTimestamp64Milli(period_start), dimensions_key, value, source
        FROM metric_snapshots FINAL
        WHERE metric_type IN {names:Array(String)}
          AND period_start >= fromUnixTimestamp64Milli({lo:Int64}, 'UTC')
          AND period_start < fromUnixTimestamp64Milli({hi:Int64}, 'UTC')
        """,
        parameters={"names": list(names), "lo": from_ms, "hi": to_ms},
    ).result_rows
    return {(m, p, int(s), k): (float(v), src) for m, p, s, k, v, src in rows}


@dataclass(frozen=True)
class Difference:
    """One snapshot whose stream value and recomputed value differ (or exist on one side only)."""

    metric: str
    period: str
    period_start: int
    dimensions_key: str
    stream: float | None
    batch: float | None

    @property
    def delta(self) -> float | None:
        """batch - stream, when both exist."""
        if self.stream is None or self.batch is None:
            return None
        return self.batch - self.stream


@dataclass
class Reconciliation:
    """How the stream's values compare with the recomputed ones."""

    compared: int
    equal: int
    differences: list[Difference]


def reconcile(
    stream: dict[Key, float], batch: Iterable[MetricValue], rel_tol: float = 1e-9, abs_tol: float = 1e-9
) -> Reconciliation:
    """Compare stream values with recomputed ones, key by key (both sides' keys)."""
    recomputed = {v.key: v.value for v in batch}
    differences = []
    equal = 0
    for key in sorted(set(stream) | set(recomputed)):
        s, b = stream.get(key), recomputed.get(key)
        if s is not None and b is not None and math.isclose(s, b, rel_tol=rel_tol, abs_tol=abs_tol):
            equal += 1
            continue
        differences.append(Difference(key[0], key[1], key[2], key[3], s, b))
    return Reconciliation(compared=len(set(stream) | set(recomputed)), equal=equal, differences=differences)


def format_report(result: Reconciliation, tz: str = "UTC", limit: int = 50) -> str:
    """The reconciliation as a text table (largest absolute differences first)."""
    from zoneinfo import ZoneInfo

    zone = ZoneInfo(tz)
    lines = [
        f"compared {result.compared} snapshots: {result.equal} equal, {len(result.differences)} different",
    ]
    if not result.differences:
        return lines[0]
    header = f"{'metric':<26} {'period':<7} {'period start':<17} {'dimensions':<24} {'stream':>14} {'batch':>14}"
    lines += [header, "-" * len(header)]

    def weight(d: Difference) -> float:
        return abs(d.delta) if d.delta is not None else math.inf

    for d in sorted(result.differences, key=weight, reverse=True)[:limit]:
        start = datetime.fromtimestamp(d.period_start / 1000, tz=UTC).astimezone(zone).strftime("%Y-%m-%d %H:%M")
        stream = "missing" if d.stream is None else f"{d.stream:.6g}"
        batch = "missing" if d.batch is None else f"{d.batch:.6g}"
        lines.append(f"{d.metric:<26} {d.period:<7} {start:<17} {d.dimensions_key or '(total)':<24} "
                     f"{stream:>14} {batch:>14}")
    if len(result.differences) > limit:
        lines.append(f"... and {len(result.differences) - limit} more")
    return "\n".join(lines)


def retractions(
    current: dict[Key, float], recomputed: Iterable[MetricValue], catalogue: Catalogue, calendar: PeriodCalendar
) -> list[MetricValue]:
    """Snapshots ClickHouse holds that the recompute no longer produces, set to "nothing".

    A late event can move a session's start, so the window the stream counted it in has
    no session at all in truth; a replace-only table needs an explicit value for it: 0
    for counts, sums and distinct counts, NaN (undefined) for averages and ratios.
    """
    from streams.catalogue import Aggregation

    produced = {v.key for v in recomputed}
    out = []
    for metric, period, start, dkey in current:
        if (metric, period, start, dkey) in produced or metric not in catalogue:
            continue
        aggregation = catalogue[metric].aggregation
        undefined = aggregation in (Aggregation.average, Aggregation.ratio, Aggregation.churn)
        dims = dict([dkey.split("=", 1)]) if dkey else {}
        from urllib.parse import unquote

        dims = {k: unquote(v) for k, v in dims.items()}
        end = calendar.bounds(Period(period), start)[1]
        out.append(MetricValue(metric, Period(period), start, end, dims, math.nan if undefined else 0.0))
    return out


def publish(settings: Settings, values: Iterable[MetricValue], computed_at: int | None = None) -> int:
    """Publish recomputed snapshots (``source = 'batch'``) to the ``metrics`` topic; wait until delivered."""
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap, "enable.idempotence": True,
                         "linger.ms": 20})
    codec = metric_snapshot_codec()
    stamp = computed_at if computed_at is not None else int(time.time() * 1000)
    topic = settings.topic(METRICS.name)
    count = 0
    for value in values:
        record = value.to_avro(stamp, source="batch")
        key = f"{value.metric}|{value.period.value}|{value.period_start}|{dimensions_key(value.dimensions)}"
        while True:
            try:
                producer.produce(topic, key=key.encode(), value=codec.encode(record))
                break
            except BufferError:
                producer.poll(0.05)
        count += 1
    if producer.flush(120) != 0:
        raise RuntimeError("not every recomputed snapshot was delivered")
    return count
