"""``python -m tidemark worker`` as a child process, and Kafka helpers to feed it and read what it publishes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

from schemas.codec import event_codec
from schemas.models import AnalyticsEvent
from tidemark.settings import Settings

# Errors a broker answers with while a group's coordinator is being elected or loaded.
COORDINATOR_MOVING = (
    KafkaError.NOT_COORDINATOR,
    KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
    KafkaError.COORDINATOR_NOT_AVAILABLE,
)


class WorkerProcess:
    """One stream worker child, started and stopped by its pid."""

    def __init__(self, settings: Settings, data_dir: Path, extra_env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.log_path = data_dir / "worker.log"
        self.env = {
            **os.environ,
            "TIDEMARK_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
            "TIDEMARK_TOPIC_PREFIX": settings.topic_prefix,
            "TIDEMARK_CONSUMER_GROUP_PREFIX": settings.consumer_group_prefix,
            "TIDEMARK_STATE_DIR": str(data_dir),
            "TIDEMARK_STREAM_WEB_PORT": "0",
            "TIDEMARK_STREAM_FLUSH_SECONDS": "0.2",
            "TIDEMARK_STREAM_FLUSH_EVENTS": "100",
            **(extra_env or {}),
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start the child (returns at once)."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen([sys.executable, "-m", "tidemark", "worker"], env=self.env, stdout=log,
                                     stderr=subprocess.STDOUT)

    def check_alive(self) -> None:
        """Fail with the log's tail if the child exited."""
        if self.proc is None or self.proc.poll() is not None:
            raise AssertionError(f"worker exited ({self.proc and self.proc.returncode}):\n{self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL: a crash, nothing flushed."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it does not exit in time."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()

    def stage_processes(self) -> list[int]:
        """The pids of the worker's stage processes (its children that run a stage, alive or not yet reaped)."""
        if self.proc is None:
            return []
        children = child_pids(self.proc.pid)
        return [pid for pid in children if b"multiprocessing.spawn" in _read(Path(f"/proc/{pid}/cmdline"))]

    def log_tail(self, lines: int = 60) -> str:
        """The last lines of the child's log."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"


def produce_events(settings: Settings, events: Iterable[AnalyticsEvent]) -> int:
    """Produce events to ``events.raw`` keyed by distinct id, as the collector does; returns how many."""
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap, "linger.ms": 5, "enable.idempotence": True})
    codec = event_codec()
    count = 0
    for event in events:
        producer.produce(settings.topic("events.raw"), key=event.distinct_id.encode(),
                         value=codec.encode(event.to_avro()))
        count += 1
        if count % 1000 == 0:
            producer.poll(0)
    assert producer.flush(30) == 0
    return count


class TopicReader:
    """Reads a topic from the beginning, keeping the latest decoded value per ``key_of(value)``."""

    def __init__(self, settings: Settings, topic: str, decode: Callable[[bytes], Any],
                 key_of: Callable[[Any], Any], keep: Callable[[Any, Any], bool] | None = None) -> None:
        self.consumer = Consumer({
            "bootstrap.servers": settings.kafka_bootstrap,
            "group.id": f"reader-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        })
        self.consumer.subscribe([settings.topic(topic)])
        self.decode = decode
        self.key_of = key_of
        self.keep = keep or (lambda old, new: True)
        self.latest: dict[Any, Any] = {}
        self.messages = 0

    def poll(self, seconds: float = 0.5) -> None:
        """Read what arrived within ``seconds``."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for message in self.consumer.consume(1000, timeout=0.1):
                if message.error():
                    continue
                value = self.decode(message.value())
                key = self.key_of(value)
                old = self.latest.get(key)
                if old is None or self.keep(old, value):
                    self.latest[key] = value
                self.messages += 1

    def close(self) -> None:
        """Leave the group."""
        self.consumer.close()


def committed_offsets(settings: Settings, group: str, topic: str, partitions: int) -> int:
    """Sum of the group's committed offsets over the topic's partitions.

    While the group's coordinator moves or loads (a new group on a fresh broker) the
    broker answers with a retriable error: asked again until it answers, for 30 s at most.
    """
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": group})
    deadline = time.monotonic() + 30
    try:
        while True:
            try:
                tps = consumer.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)
                return sum(max(tp.offset, 0) for tp in tps)
            except KafkaException as exc:
                error = exc.args[0]
                if time.monotonic() > deadline or not (error.retriable() or error.code() in COORDINATOR_MOVING):
                    raise
    finally:
        consumer.close()


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:  # gone meanwhile
        return b""


def child_pids(pid: int) -> list[int]:
    """The pids of process ``pid``'s children (Linux /proc)."""
    return [int(child) for task in Path(f"/proc/{pid}/task").iterdir()
            for child in _read(task / "children").split()]


def process_running(pid: int) -> bool:
    """Whether process ``pid`` exists and has not ended (an ended one may wait as a zombie to be reaped)."""
    stat = _read(Path(f"/proc/{pid}/stat"))
    return bool(stat) and stat.rsplit(b")", 1)[1].split()[0] != b"Z"


def wait_for(condition: Callable[[], bool], timeout: float, what: str, on_tick: Callable[[], None] | None = None):
    """Poll ``condition`` until it holds or ``timeout`` passes (then fail with ``what``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if on_tick is not None:
            on_tick()
        if condition():
            return
    raise AssertionError(f"timed out waiting for {what}")


def high_watermarks(settings: Settings, topic: str, partitions: int) -> list[int]:
    """The end offset of each partition of ``topic`` (full name)."""
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": f"hw-{uuid.uuid4().hex[:8]}"})
    try:
        return [consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in range(partitions)]
    finally:
        consumer.close()
