"""Ingest throughput, end to end, in one run on the same generated events (printed figures, not a test).

    .venv/bin/python bench/ingest.py [--events 200000] [--http-events 50000] [--bootstrap HOST:PORT]

Generates ``--events`` demo events (the seeded platform simulation), starts a local Kafka
broker (unless ``--bootstrap`` names one) and measures:

(a) **HTTP collector**: ``/v1/batch`` requests of ``--batch`` events from ``--clients``
    concurrent httpx clients against ``tidemark serve --no-sinks`` started as a subprocess,
    until every event is acknowledged (200 = durable in Kafka). The first ``--http-events``
    events are used, on a topic of their own.
(b) **SDK into Kafka**: ``Tracker.track`` for every event, until ``flush`` returns 0
    (every event acknowledged by the broker). This fills the topic that (c) and (d) read.
(c) **Raw sink into ClickHouse**: :class:`sinks.raw.RawEventSink` in this process on a
    temporary embedded engine, from start until it has committed all N offsets (so all N
    rows are inserted); then ``count() FINAL`` is checked.
(d) **Bare baseline**: a plain confluent-kafka consume loop, fastavro decode of the
    single-object encoded body, and one column-oriented clickhouse-connect insert per
    50,000 rows into a table of the same shape, on the same engine — what the sink costs
    compared with the least one could write. Also checked with ``count() FINAL``.

Goals (the spine issue): raw sink >= 50,000 events/s and >= 0.8 x the bare baseline.
The machine's other load shows in every wall-clock figure; the ratio is the steadier
number, and for (b), (c), (d) the CPU time this process spent is printed too
(events per CPU-second: what one uncontended core would do, Kafka broker excluded).
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from confluent_kafka import Consumer, TopicPartition
from fastavro import parse_schema, schemaless_reader

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from schemas.codec import HEADER_LENGTH, load_schema  # noqa: E402
from schemas.models import AnalyticsEvent  # noqa: E402
from sinks.clickhouse import connect, quote_identifier  # noqa: E402
from sinks.migrations import apply_migrations  # noqa: E402
from sinks.raw import EVENTS_SINK  # noqa: E402
from tidemark.demo import TrafficConfig, generate_records  # noqa: E402
from tidemark.demo.senders import to_segment_message  # noqa: E402
from tidemark.localkafka import LocalKafka  # noqa: E402
from tidemark.runtime import tune_garbage_collector  # noqa: E402
from tidemark.settings import Settings  # noqa: E402
from tidemark.topics import EVENTS_RAW, ensure_topics  # noqa: E402
from tidemark.tracker import Tracker  # noqa: E402

SINK_GOAL_EVENTS_PER_SECOND = 50_000
SINK_GOAL_RATIO = 0.8
BARE_INSERT_ROWS = 50_000
COLUMNS = EVENTS_SINK.columns  # the same row shape the raw sink writes


def demo_records(count: int, seed: int) -> list[dict[str, Any]]:
    """The first ``count`` events of a week of demo traffic sized to hold them."""
    days = 7
    sessions_per_day = count / (4.8 * days) * 1.2  # a little headroom: the generator is cut at ``count``
    start = datetime(2026, 11, 2, tzinfo=UTC)
    config = TrafficConfig(start=start, end=None, seed=seed, sessions_per_day=sessions_per_day)
    return list(itertools.islice(generate_records(config), count))


def track_arguments(record: dict[str, Any]) -> dict[str, Any]:
    """``Tracker.track`` keyword arguments that reproduce ``record`` (parsed before the clock starts)."""
    return {
        "event_name": record["eventName"],
        "user_id": record["userId"],
        "anonymous_id": record["anonymousId"],
        "properties": json.loads(record["properties"]),
        "context": json.loads(record["context"]),
        "timestamp": datetime.fromtimestamp(record["timestamp"] / 1000, UTC),
        "message_id": record["id"],
    }


# --------------------------------------------------------------------------- (a) HTTP collector
class CollectorProcess:
    """``tidemark serve --no-sinks`` on a free port, with its own engine and topics; stopped by pid."""

    def __init__(self, bootstrap: str, prefix: str, workdir: Path) -> None:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        workdir.mkdir(parents=True, exist_ok=True)
        self.env = {
            **os.environ,
            "TIDEMARK_KAFKA_BOOTSTRAP": bootstrap,
            "TIDEMARK_TOPIC_PREFIX": prefix,
            "TIDEMARK_CLICKHOUSE_URL": f"chdb://{workdir / 'chdb'}",
            "TIDEMARK_METADATA_URL": f"sqlite:///{workdir / 'metadata.db'}",
            "TIDEMARK_STATE_DIR": str(workdir),
            "TIDEMARK_API_HOST": "127.0.0.1",
            "TIDEMARK_API_PORT": str(self.port),
            "TIDEMARK_LOG_LEVEL": "WARNING",
        }
        self.log_path = workdir / "serve.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 180.0) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tidemark", "serve", "--no-sinks"], env=self.env, stdout=log, stderr=log
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tidemark serve exited with {self.proc.returncode}; see {self.log_path}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"tidemark serve not ready within {timeout:.0f}s; see {self.log_path}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def bench_http(url: str, messages: list[dict[str, Any]], batch: int, clients: int) -> tuple[float, int]:
    """Post ``messages`` in batches from ``clients`` threads; return (events/s, events accepted)."""
    bodies = [
        json.dumps({"batch": messages[i : i + batch]}).encode() for i in range(0, len(messages), batch)
    ]  # encoded up front: the figure is the collector's, not the load generator's JSON encoder
    queue = iter(bodies)
    lock = threading.Lock()
    accepted = [0]
    errors: list[str] = []

    def worker() -> None:
        with httpx.Client(base_url=url, auth=("demo-write-key", ""), timeout=60) as client:
            while True:
                with lock:
                    body = next(queue, None)
                if body is None:
                    return
                response = client.post("/v1/batch", content=body, headers={"content-type": "application/json"})
                if response.status_code != 200:
                    errors.append(f"{response.status_code} {response.text[:200]}")
                    return
                with lock:
                    accepted[0] += response.json()["accepted"]

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise RuntimeError(f"collector refused batches: {errors[:3]}")
    return accepted[0] / elapsed, accepted[0]


# --------------------------------------------------------------------------- (b) SDK
def bench_sdk(settings: Settings, calls: list[dict[str, Any]]) -> tuple[float, float, float]:
    """``track`` every event and flush; return events/s including flush, of the calls alone, per CPU-second."""
    with Tracker(settings=settings, max_block_ms=60_000) as tracker:
        cpu = time.process_time()
        started = time.perf_counter()
        for kwargs in calls:
            tracker.track(**kwargs)
        queued = time.perf_counter()
        left = tracker.flush(120)
        elapsed = time.perf_counter() - started
        cpu = time.process_time() - cpu
        stats = tracker.stats
    if left or stats.delivered != len(calls) or stats.failed or stats.dropped:
        raise RuntimeError(f"SDK did not deliver everything: {stats}, {left} left")
    return len(calls) / elapsed, len(calls) / (queued - started), len(calls) / cpu


# --------------------------------------------------------------------------- (c) raw sink
def bench_sink(settings: Settings, client: Any, count: int) -> tuple[float, float]:
    """Run the raw sink until it has committed ``count`` messages; return events/s and per CPU-second."""
    from sinks.raw import RawEventSink

    sink = RawEventSink(settings, client)
    cpu = time.process_time()
    started = time.perf_counter()
    sink.start()
    try:
        while sink.committed_messages < count:
            if not sink.running:
                raise RuntimeError(f"the sink stopped: {sink.error}")
            time.sleep(0.01)  # polling a counter; 10 ms is far below the run's length
        elapsed = time.perf_counter() - started
        cpu = time.process_time() - cpu
    finally:
        sink.stop(60)
    return count / elapsed, count / cpu


# --------------------------------------------------------------------------- (d) bare baseline
def _primitive(schema: Any) -> Any:
    """The schema without logical types: ids stay text and timestamps epoch ms, as ClickHouse takes them."""
    if isinstance(schema, dict):
        return {key: _primitive(value) for key, value in schema.items() if key != "logicalType"}
    if isinstance(schema, list):
        return [_primitive(item) for item in schema]
    return schema


def bench_bare(settings: Settings, client: Any, count: int) -> tuple[float, float]:
    """Consume, decode with fastavro, insert column-oriented every 50k rows; return events/s, per CPU-second."""
    schema = parse_schema(_primitive(load_schema("analytics_event.avsc")))
    topic = settings.topic(EVENTS_RAW.name)
    consumer = Consumer(
        {
            "bootstrap.servers": settings.kafka_bootstrap,
            "group.id": f"bench-bare-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([topic])
    columns: list[list[Any]] = [[] for _ in COLUMNS]
    seen = 0
    cpu = time.process_time()
    started = time.perf_counter()
    try:
        while seen < count:
            for message in consumer.consume(5000, 0.5):
                if message.error() is not None:
                    continue
                buf = io.BytesIO(message.value())
                buf.seek(HEADER_LENGTH)
                r = schemaless_reader(buf, schema, None)
                for column, value in zip(
                    columns,
                    (
                        r["id"], r["eventType"], r["eventName"], r["userId"] or "", r["anonymousId"] or "",
                        r["sessionId"] or "", r["timestamp"], r["receivedAt"] or r["timestamp"], r["source"],
                        r["properties"], r["context"],
                    ),
                    strict=True,
                ):  # fmt: skip
                    column.append(value)
                seen += 1
            if len(columns[0]) >= BARE_INSERT_ROWS or (columns[0] and seen >= count):
                client.insert("events", columns, column_names=list(COLUMNS), column_oriented=True)
                columns = [[] for _ in COLUMNS]
        elapsed = time.perf_counter() - started
        cpu = time.process_time() - cpu
    finally:
        consumer.close()
    return count / elapsed, count / cpu


def topic_size(settings: Settings) -> int:
    """Messages on the prefixed ``events.raw`` (sum of end offsets)."""
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": "bench-size"})
    name = settings.topic(EVENTS_RAW.name)
    try:
        partitions = consumer.list_topics(name, timeout=10).topics[name].partitions
        return sum(consumer.get_watermark_offsets(TopicPartition(name, p), timeout=10)[1] for p in partitions)
    finally:
        consumer.close()


def fresh_database(engine: Any, name: str) -> None:
    engine.command(f"CREATE DATABASE IF NOT EXISTS {quote_identifier(name)}")
    engine.database = name
    apply_migrations(engine)


def line(label: str, value: float, cpu_rate: float | None = None, note: str = "") -> None:
    per_cpu = f"{cpu_rate:>9,.0f} /CPU-s" if cpu_rate is not None else " " * 16
    print(f"  {label:<52} {value:>9,.0f} ev/s {per_cpu}  {note}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000, help="events for (b), (c), (d) (default 200k)")
    parser.add_argument("--http-events", type=int, default=50_000, help="events for (a) (default 50k)")
    parser.add_argument("--batch", type=int, default=100, help="events per /v1/batch request")
    parser.add_argument("--clients", type=int, default=4, help="concurrent HTTP clients")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--bootstrap", default=None, help="use this broker instead of starting one")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: http,sdk,sink,bare")
    args = parser.parse_args()
    tune_garbage_collector()  # as the sink and serve commands do (the bare loop runs under it too)
    skip = set(filter(None, args.skip.split(",")))
    workdir = Path(tempfile.mkdtemp(prefix="tidemark-ingest-bench-"))
    run_id = uuid.uuid4().hex[:6]

    print(f"Tidemark ingest benchmark — {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    started = time.perf_counter()
    records = demo_records(max(args.events, args.http_events), args.seed)
    size = sum(len(json.dumps(r)) for r in records[:2000]) / min(len(records), 2000)
    print(f"  generated {len(records):,} demo events in {time.perf_counter() - started:.1f}s (~{size:.0f} B as JSON)")
    assert all(AnalyticsEvent.from_avro(r) for r in records[:1000])  # spot check: the records are valid events

    broker = None
    bootstrap = args.bootstrap
    if bootstrap is None:
        broker = LocalKafka(workdir / "kafka")
        bootstrap = broker.start()
        print(f"  started Kafka at {bootstrap}")
    collector = None
    results: dict[str, float] = {}
    per_cpu: dict[str, float] = {}
    try:
        sdk_settings = Settings(
            kafka_bootstrap=bootstrap,
            topic_prefix=f"bench{run_id}.sdk.",
            consumer_group_prefix=f"bench{run_id}",
            sink_batch_max_rows=50_000,
            sink_batch_max_seconds=1.0,
        )
        ensure_topics(sdk_settings)
        print("Results")

        if "http" not in skip:
            http_prefix = f"bench{run_id}.http."
            ensure_topics(sdk_settings.model_copy(update={"topic_prefix": http_prefix}))
            collector = CollectorProcess(bootstrap, http_prefix, workdir / "serve")
            collector.start()
            messages = [to_segment_message(r) for r in records[: args.http_events]]
            rate, accepted = bench_http(collector.url, messages, args.batch, args.clients)
            collector.stop()
            collector = None
            results["http"] = rate
            line(
                f"(a) HTTP collector /v1/batch x{args.batch}, {args.clients} clients", rate, note=f"{accepted:,} events"
            )

        count = args.events
        if "sdk" not in skip:
            calls = [track_arguments(r) for r in records[:count]]
            rate, call_rate, cpu_rate = bench_sdk(sdk_settings, calls)
            results["sdk"] = rate
            line("(b) SDK Tracker.track -> Kafka (until flush = 0)", rate, cpu_rate, f"{count:,} events")
            line("    the track() calls alone", call_rate)
        on_topic = topic_size(sdk_settings)
        if on_topic < count:
            raise RuntimeError(f"the topic holds {on_topic} events, fewer than {count}: run without --skip sdk")

        engine = connect(f"chdb://{workdir / 'chdb'}")
        # Whichever loop runs first on a fresh engine pays its warm-up (first parts, caches, page
        # cache of the topic): measured alone, either loop loses about a third to it. So the two run
        # in ABBA order (sink, bare, bare, sink), each into a fresh database, and each keeps its best.
        order = [part for part in ("sink", "bare", "bare", "sink") if part not in skip]
        runs: dict[str, list[tuple[float, float, int]]] = {"sink": [], "bare": []}
        for i, part in enumerate(order):
            fresh_database(engine, f"bench_{part}_{i}")
            run_settings = sdk_settings.model_copy(update={"consumer_group_prefix": f"bench{run_id}.{i}"})
            rate, cpu_rate = (bench_sink if part == "sink" else bench_bare)(run_settings, engine, count)
            stored = engine.query("SELECT count() FROM events FINAL").result_rows[0][0]
            runs[part].append((rate, cpu_rate, stored))
        if runs["sink"]:
            rate, cpu_rate, stored = max(runs["sink"])
            results["sink"], per_cpu["sink"] = rate, cpu_rate
            goal = "meets" if rate >= SINK_GOAL_EVENTS_PER_SECOND else "BELOW"
            line(
                "(c) raw sink -> ClickHouse (all offsets committed)",
                rate,
                cpu_rate,
                f"{stored:,} rows; goal >= {SINK_GOAL_EVENTS_PER_SECOND:,} ev/s: {goal}",
            )
        if runs["bare"]:
            rate, cpu_rate, stored = max(runs["bare"])
            results["bare"], per_cpu["bare"] = rate, cpu_rate
            line("(d) bare consume + fastavro + column insert", rate, cpu_rate, f"{stored:,} rows")
        for part, part_runs in runs.items():
            if part_runs:
                print(f"      {part} runs (ev/s, in order): " + ", ".join(f"{r[0]:,.0f}" for r in part_runs))
        if "sink" in results and "bare" in results:
            ratio = results["sink"] / results["bare"]
            goal = "meets" if ratio >= SINK_GOAL_RATIO else "BELOW"
            print(f"  {'sink / bare (wall clock)':<52} {ratio:>9.3f}{'':<23}  goal >= {SINK_GOAL_RATIO}: {goal}")
            print(f"  {'sink / bare (events per CPU-second)':<52} {per_cpu['sink'] / per_cpu['bare']:>9.3f}")
    finally:
        if collector is not None:
            collector.stop()
        if broker is not None:
            broker.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"Total {time.perf_counter() - started:.0f}s, load average now {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
