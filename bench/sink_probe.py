"""How fast the raw sink lands events.raw in ClickHouse (printed figures, not a test).

    python bench/sink_probe.py --events 300000 [--bootstrap 127.0.0.1:9092]

Produces ``--events`` demo-shaped events to a fresh topic prefix, then times, each in a
fresh database of one embedded engine:

- ``decode``: the per-message cost alone (wire decode + row building, no Kafka, no insert);
- ``sink``: :class:`sinks.raw.RawEventSink` from start until every offset is committed
  (``sink-columnar``: the same with clickhouse-connect's column encoder instead of Arrow);
- ``bare``: a plain confluent-kafka consume loop with the same decode and one
  column-oriented insert per 50k rows, no commit bookkeeping — the baseline.

Wall-clock rates depend on what else runs on the machine; events per CPU-second
(all threads of this process, the embedded engine's included) much less so.
Without ``--bootstrap`` a local broker is started (and stopped) in a temporary directory.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import tempfile
import time
import uuid
from pathlib import Path

from confluent_kafka import Consumer, Message, Producer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from schemas.codec import event_codec  # noqa: E402
from sinks.clickhouse import connect  # noqa: E402
from sinks.migrations import apply_migrations  # noqa: E402
from sinks.raw import EVENTS_SINK, RawEventSink, event_row  # noqa: E402
from tidemark.localkafka import LocalKafka  # noqa: E402
from tidemark.settings import Settings  # noqa: E402
from tidemark.topics import EVENTS_RAW, ensure_topics  # noqa: E402


def payloads(count: int, seed: int = 1) -> list[bytes]:
    """``count`` encoded events shaped like the demo traffic (~400 bytes each)."""
    rng = random.Random(seed)
    codec = event_codec()
    names = ["page_view", "fund_project", "watch_ad", "login", "create_loan", "signup"]
    out = []
    base = 1_764_000_000_000
    for i in range(count):
        out.append(
            codec.encode(
                {
                    "id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
                    "eventType": "action",
                    "eventName": names[i % len(names)],
                    "userId": f"user-{rng.randrange(5000)}" if i % 3 else None,
                    "anonymousId": f"anon-{rng.randrange(9000)}",
                    "sessionId": f"session-{rng.randrange(20000)}",
                    "properties": json.dumps({"project_id": f"p{rng.randrange(300)}", "amount": rng.randrange(5, 500),
                                              "currency": "USD", "community": "Riverside", "category": "water"}),
                    "context": json.dumps({"device": {"type": "mobile"}, "location": {"country": "KE"},
                                           "campaign": {"source": "newsletter"}, "userAgent": "Mozilla/5.0"}),
                    "timestamp": base + i * 10,
                    "receivedAt": base + i * 10 + 40,
                    "source": "sdk",
                }
            )
        )
    return out


def produce_all(settings: Settings, data: list[bytes]) -> None:
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap, "linger.ms": 20, "batch.size": 1_000_000,
                         "compression.type": "lz4"})
    topic = settings.topic(EVENTS_RAW.name)
    for i, value in enumerate(data):
        while True:
            try:
                producer.produce(topic, value, key=str(i % 997))
                break
            except BufferError:
                producer.poll(0.05)
    producer.flush(120)


def time_decode(data: list[bytes]) -> float:
    messages = [Message(topic="t", partition=0, offset=i, value=v, timestamp=(1, 0)) for i, v in enumerate(data)]
    started = time.perf_counter()
    for m in messages:
        event_row(m)
    return len(data) / (time.perf_counter() - started)


def time_sink(settings: Settings, client, count: int, arrow: bool = True) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    sink = RawEventSink(settings.model_copy(update={"consumer_group_prefix": f"g{uuid.uuid4().hex[:8]}"}), client)
    if not arrow:
        sink.spec = dataclasses.replace(EVENTS_SINK, arrow_types=None)
    started, cpu = time.perf_counter(), time.process_time()
    sink.start()
    while sink.committed_messages < count:
        if not sink.running:
            raise RuntimeError(f"sink died: {sink.error}")
        time.sleep(0.02)  # polling a counter, granularity well below the run time
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    sink.stop(30)
    return count / elapsed, count / cpu


def time_bare(settings: Settings, client, count: int) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": f"bare-{uuid.uuid4().hex}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    consumer.subscribe([settings.topic(EVENTS_RAW.name)])
    columns = list(EVENTS_SINK.columns)
    started, cpu = time.perf_counter(), time.process_time()
    seen = 0
    rows: list[tuple] = []  # type: ignore[type-arg]
    while seen < count:
        for m in consumer.consume(5000, 0.5):
            if m.error() is None:
                rows.append(event_row(m))
                seen += 1
        if len(rows) >= 50_000 or (rows and seen >= count):
            client.insert("events", list(zip(*rows, strict=True)), column_names=columns, column_oriented=True)
            rows = []
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    consumer.close()
    return count / elapsed, count / cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=300_000)
    parser.add_argument("--bootstrap", default=None)
    parser.add_argument("--rounds", type=int, default=2, help="runs of each variant (the best is reported)")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="sink-probe-"))
    broker = None
    bootstrap = args.bootstrap
    if bootstrap is None:
        broker = LocalKafka(tmp / "kafka")
        bootstrap = broker.start()
    try:
        settings = Settings(kafka_bootstrap=bootstrap, topic_prefix=f"probe{uuid.uuid4().hex[:6]}.",
                            consumer_group_prefix=f"probe{uuid.uuid4().hex[:6]}")
        ensure_topics(settings)
        data = payloads(args.events)
        print(f"events: {len(data):,} ({sum(map(len, data)) / len(data):.0f} bytes each)")
        produce_all(settings, data)
        print(f"decode + row:   {time_decode(data):>10,.0f} events/s")
        engine = connect(f"chdb://{tmp / 'chdb'}")
        results = {}
        runs = (
            ("sink", time_sink),
            ("sink-columnar", lambda s, c, n: time_sink(s, c, n, arrow=False)),
            ("bare", time_bare),
        )
        for round_ in range(args.rounds):
            for name, run in runs:
                database = f"probe_{name.replace('-', '_')}_{round_}"
                engine.command(f"CREATE DATABASE IF NOT EXISTS {database}")
                engine.database = database
                apply_migrations(engine)
                wall, per_cpu = run(settings, engine, len(data))
                best = results.get(name, (0.0, 0.0))
                results[name] = (max(best[0], wall), max(best[1], per_cpu))
                stored = engine.query("SELECT count() FROM events FINAL").result_rows[0][0]
                assert stored == len(data), f"{name}: {stored} rows"
                print(f"{name + ':':<15} {wall:>10,.0f} events/s wall  {per_cpu:>10,.0f} events per CPU-second")
        print("best of rounds:")
        for name, (wall, per_cpu) in results.items():
            print(f"  {name + ':':<15} {wall:>10,.0f} events/s wall  {per_cpu:>10,.0f} events per CPU-second")
        print(f"  sink / bare:    {results['sink'][0] / results['bare'][0]:>10.2f} (wall)")
    finally:
        if broker is not None:
            broker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
