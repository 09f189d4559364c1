"""How many events per second one stream worker sustains, beside a bare consume loop in the same run.

    python bench/streams.py --events 600000 [--bootstrap 127.0.0.1:9092]

Without ``--bootstrap`` a local broker is started (and stopped) in a temporary directory.
Prints four figures on the same events (demo traffic, Avro on ``events.raw``):

1. producing them (librdkafka);
2. a bare consume loop (librdkafka consumer, no decoding): the ceiling of reading;
3. the processing alone, in this process without Kafka: decode + sessions + every
   streamed catalogue metric, flushes included (what one partition owner does per event);
   3b. the same at the worker's cadence: the events stage (:class:`EventsAgent`) flushing
   every partition each ``stream_flush_seconds`` and checkpointing as the worker does, its
   outputs encoded but handed to no broker (the work of the worker's events thread);
4. one ``tidemark worker`` (its three stages: events, metric merging -- in a child process -- and anomalies):
   from its first committed offset on ``events.raw`` until metric merging has committed
   every partial batch too, i.e. consuming, processing, publishing sessions, partials and
   snapshots, checkpointing and committing -- the sustained end-to-end rate of one worker;
   with events per CPU-second of the worker and its stage process (what one core would
   sustain with every stage on it), and the end-to-end rate as a share of figure 3:
   the machine's speed moves every figure (up to 1.5x between runs on a shared machine),
   the share mostly with the worker's own overheads. Compare several runs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import uuid
import zlib
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from confluent_kafka import Consumer, Producer  # noqa: E402

from schemas.codec import event_codec  # noqa: E402
from streams.aggregators import compile_catalogue  # noqa: E402
from streams.catalogue import CATALOGUE  # noqa: E402
from streams.events import StreamEvent  # noqa: E402
from streams.periods import PeriodCalendar  # noqa: E402
from streams.processor import PartitionProcessor  # noqa: E402
from tests.integration.stream_worker import (  # noqa: E402
    WorkerProcess,
    child_pids,
    committed_offsets,
    high_watermarks,
)
from tidemark.settings import Settings  # noqa: E402
from tidemark.topics import EVENTS_RAW, ensure_topics  # noqa: E402


def demo_messages(count: int) -> list[tuple[bytes, bytes]]:
    """``count`` demo events as (key, Avro value), in time order."""
    from tidemark.demo.traffic import TrafficConfig, generate_events

    # Dense in event time, as a busy platform is: ~count events within half an hour (a replay of
    # days of light traffic would instead touch a new minute window with nearly every event).
    start = datetime(2026, 3, 2, 12, tzinfo=UTC)
    config = TrafficConfig(start=start, end=start + timedelta(minutes=30), sessions_per_day=count / 4 * 48, seed=5)
    codec = event_codec()
    out = []
    for event in generate_events(config):
        out.append((event.distinct_id.encode(), codec.encode(event.to_avro())))
        if len(out) == count:
            break
    return out


def produce(settings: Settings, messages: list[tuple[bytes, bytes]]) -> float:
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap, "linger.ms": 20, "enable.idempotence": True})
    topic = settings.topic(EVENTS_RAW.name)
    started = time.perf_counter()
    for key, value in messages:
        while True:
            try:
                producer.produce(topic, key=key, value=value)
                break
            except BufferError:
                producer.poll(0.05)
    producer.flush(120)
    return len(messages) / (time.perf_counter() - started)


def bare_consume(settings: Settings, total: int) -> float:
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": f"bench-{uuid.uuid4().hex[:8]}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    consumer.subscribe([settings.topic(EVENTS_RAW.name)])
    seen = 0
    started = None
    while seen < total:
        for message in consumer.consume(5000, timeout=1.0):
            if message.error():
                continue
            if started is None:
                started = time.perf_counter()
            seen += 1
    elapsed = time.perf_counter() - (started or time.perf_counter())
    consumer.close()
    return seen / elapsed


def process_only(messages: list[tuple[bytes, bytes]], partitions: int = EVENTS_RAW.partitions) -> float:
    aggregators = compile_catalogue(CATALOGUE)
    calendar = PeriodCalendar("UTC")
    processors = [PartitionProcessor(p, aggregators, calendar) for p in range(partitions)]
    counts = [0] * partitions
    started = time.perf_counter()
    for offset, (key, value) in enumerate(messages):
        p = zlib.crc32(key) % partitions
        processors[p].process(StreamEvent.decode(value), offset)
        counts[p] += 1
        if counts[p] % 20_000 == 0:
            processors[p].flush()
            processors[p].checkpoint()
    for processor in processors:
        processor.flush()
        processor.checkpoint()
    return len(messages) / (time.perf_counter() - started)


def worker_cadence(messages: list[tuple[bytes, bytes]], partitions: int = EVENTS_RAW.partitions) -> float:
    """Figure 3b: the events stage as the worker's events thread runs it, minus the broker."""
    from streams.agents.events import EventsAgent

    settings = Settings()
    agent = EventsAgent(settings, compile_catalogue(CATALOGUE), publish_session=lambda key, value: None,
                        publish_partials=lambda key, value, lane: None, save_checkpoint=lambda partition, blob: None,
                        load_checkpoint=lambda partition: None, commit=lambda partition, offset: None)
    started = flushed = time.perf_counter()
    for offset, (key, value) in enumerate(messages):
        agent.on_message(zlib.crc32(key) % partitions, offset, value)
        if offset % 500 == 0 and time.perf_counter() - flushed >= settings.stream_flush_seconds:
            agent.flush_all()
            flushed = time.perf_counter()
    for partition in list(agent.processors):
        agent.flush(partition, force_checkpoint=True)
    return len(messages) / (time.perf_counter() - started)


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process and its live children (a worker's stage processes) have used (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    own = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return own + sum(_cpu_seconds(child) for child in child_pids(pid))


def worker_rate(settings: Settings, total: int, workdir: Path) -> tuple[float, float, float]:
    """Figure 4: (end-to-end events/s, events/s including start-up, events per worker CPU-second)."""
    from streams.agents.metrics import PARTIALS_PARTITIONS, PARTIALS_TOPIC, merge_group

    worker = WorkerProcess(settings, workdir, {"TIDEMARK_STREAM_FLUSH_SECONDS": "1.0",
                                              "TIDEMARK_STREAM_FLUSH_EVENTS": "20000", "TIDEMARK_LOG_LEVEL": "WARNING"})
    group = f"{settings.topic_prefix}{settings.stream_app_id}"
    topic, partials = settings.topic(EVENTS_RAW.name), settings.topic(PARTIALS_TOPIC)
    launched = time.perf_counter()
    worker.start()
    assert worker.proc is not None
    try:
        first_at, first, cpu_first = None, 0, 0.0
        merged_through: int | None = None
        while True:
            worker.check_alive()
            now = time.perf_counter()
            if merged_through is None:
                done = committed_offsets(settings, group, topic, EVENTS_RAW.partitions)
                if first_at is None and done > 0:
                    first_at, first, cpu_first = now, done, _cpu_seconds(worker.proc.pid)
                if done >= total:  # every event is in a checkpoint: what remains is merging its partials
                    merged_through = sum(high_watermarks(settings, partials, PARTIALS_PARTITIONS))
            elif committed_offsets(settings, merge_group(settings), partials, PARTIALS_PARTITIONS) >= merged_through:
                break
            time.sleep(0.2)  # sampling interval of the progress poll
        assert first_at is not None and total > first
        cpu = _cpu_seconds(worker.proc.pid) - cpu_first
        return (total - first) / max(now - first_at, 1e-9), total / (now - launched), (total - first) / cpu
    finally:
        worker.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # Long enough that the ~4 s from the last event to the last commits (each stage checkpoints
    # 2 s after its input pauses) is latency at the end of the run, not a share of its rate.
    parser.add_argument("--events", type=int, default=600_000)
    parser.add_argument("--bootstrap", default=os.environ.get("TIDEMARK_TEST_KAFKA_BOOTSTRAP"))
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-streams-"))
    broker = None
    bootstrap = args.bootstrap
    if not bootstrap:
        from tidemark.localkafka import LocalKafka

        broker = LocalKafka(tmp / "kafka")
        bootstrap = broker.start()
    try:
        prefix = f"bench{uuid.uuid4().hex[:6]}."
        settings = Settings(kafka_bootstrap=bootstrap, topic_prefix=prefix, consumer_group_prefix=prefix + "tidemark",
                            state_dir=tmp / "state")
        ensure_topics(settings)
        print(f"generating {args.events} demo events ...", flush=True)
        messages = demo_messages(args.events)
        total = len(messages)
        print(f"{'produce (librdkafka)':<44} {produce(settings, messages):>10,.0f} events/s", flush=True)
        print(f"{'bare consume loop (librdkafka, no decode)':<44} {bare_consume(settings, total):>10,.0f} events/s",
              flush=True)
        processing = process_only(messages)
        print(f"{'processing only (decode+sessions+metrics)':<44} {processing:>10,.0f} events/s", flush=True)
        print(f"{'  same, 1 s flushes + checkpoints, no broker':<44} {worker_cadence(messages):>10,.0f} events/s",
              flush=True)
        sustained, overall, per_cpu = worker_rate(settings, total, tmp / "worker")
        print(f"{'tidemark worker, end to end (1 worker)':<44} {sustained:>10,.0f} events/s", flush=True)
        print(f"{'  same, per worker CPU-second':<44} {per_cpu:>10,.0f} events/s", flush=True)
        print(f"{'  same, incl. start-up':<44} {overall:>10,.0f} events/s", flush=True)
        # The machine's speed moves every figure; this ratio moves with the worker's own overheads only.
        print(f"{'  end to end / processing only':<44} {sustained / processing:>10.2f}", flush=True)
        print(f"({total} events, {len(CATALOGUE.streaming())} streamed metrics, {EVENTS_RAW.partitions} partitions, "
              f"{os.cpu_count()} CPUs shared)")
    finally:
        if broker is not None:
            broker.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
