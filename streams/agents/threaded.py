"""Consumers that run in a thread of their own inside the stream worker, as services of its Faust app.

The events stage and anomaly detection read their topics with librdkafka rather than as
Faust agents (the reasons are in :mod:`streams.agents.events` and
:mod:`streams.agents.anomalies`). Both share this lifecycle: :meth:`ConsumerThread.start`
returns at once, :meth:`ConsumerThread.stop` asks the loop to finish its last checkpoint
and waits, and a failure inside the loop is kept in :attr:`ConsumerThread.failure`, which
:func:`run_as_service` turns into a crash of the worker (the next owner replays from the
last checkpoint).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from streams.agents.checkpoints import MAX_CHECKPOINT_BYTES
from tidemark.runtime import die_with_parent, tune_garbage_collector
from tidemark.settings import Settings, get_settings

log = logging.getLogger(__name__)


# Commit errors that mean "rejoin first": the member's generation is behind the group's.
COMMIT_AFTER_REBALANCE = (KafkaError.ILLEGAL_GENERATION, KafkaError.REBALANCE_IN_PROGRESS)


class DurableProducer:
    """A librdkafka producer whose every delivery is confirmed before what it sent counts as durable.

    A stage publishes its outputs (and writes its checkpoint) through one of these, then
    calls :meth:`durable` before it commits the offsets those outputs reflect.
    """

    def __init__(self, settings: Settings) -> None:
        self._failures: list[str] = []
        self.producer = Producer({
            "bootstrap.servers": settings.kafka_bootstrap,
            "enable.idempotence": True,
            "linger.ms": 20,
            "queue.buffering.max.messages": 1_000_000,
            "message.max.bytes": MAX_CHECKPOINT_BYTES,  # checkpoints are one message
            "on_delivery": self._delivered,
        })
        self.poll = self.producer.poll

    def _delivered(self, error: KafkaError | None, message: Any) -> None:
        if error is not None:
            self._failures.append(f"{message.topic()}: {error}")

    def publisher(self, topic: str) -> Callable[..., None]:
        """``publish(key, value, partition=-1)`` to ``topic`` (-1: by key), waiting while the local queue is full."""
        produce, poll = self.producer.produce, self.producer.poll

        def publish(key: bytes, value: bytes, partition: int = -1) -> None:
            while True:
                try:
                    produce(topic, value, key, partition)
                    return
                except BufferError:  # local queue full: let deliveries drain
                    poll(0.05)

        return publish

    def durable(self) -> None:
        """Wait until everything produced so far is delivered; raise if anything was not."""
        if self.producer.flush(60) != 0:
            raise RuntimeError("outputs were not delivered within 60 s; not checkpointing")
        if self._failures:
            raise RuntimeError(f"outputs were not delivered ({self._failures[0]}); not checkpointing")


class ConsumerThread:
    """A consuming loop (:meth:`_loop`, written by subclasses) in a daemon thread of its own."""

    thread_name = "consumer"
    after_failure = "the next owner replays from the checkpoint"  # what a restart does, for the failure's log

    def __init__(self, settings: Settings, topic: str, group: str, batch_size: int) -> None:
        self.settings = settings
        self.topic = settings.topic(topic)  # the topic it reads (name before the prefix)
        self.group = group
        self.batch_size = batch_size  # messages per consume call
        self.failure: BaseException | None = None
        self._stopping = threading.Event()
        self._closing = False  # set once the loop is leaving: rebalance callbacks then only forget
        self._thread: threading.Thread | None = None
        self._to_commit: dict[int, int] = {}  # partition -> offset to commit (what a durable checkpoint reflects)
        self.commits_refused = 0  # commits the group refused while it rebalanced (retried after)

    def start(self) -> None:
        """Start consuming (returns at once)."""
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 25.0) -> None:
        """Ask the loop to checkpoint, commit and leave the group, and wait for the thread."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def running(self) -> bool:
        """Whether the consuming thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        """The thread's body: :meth:`_loop` on a fresh consumer; a failure is kept in :attr:`failure`."""
        consumer = self._consumer()
        try:
            self._loop(consumer)
        except BaseException as exc:
            self.failure = exc
            log.exception("%s failed; the worker stops (%s)", self.thread_name, self.after_failure)
        finally:
            self._closing = True
            consumer.close()

    def _loop(self, consumer: Consumer) -> None:
        """Subscribe, consume until :meth:`stop` is asked, then checkpoint and commit (written by subclasses)."""
        raise NotImplementedError

    def _consumer(self) -> Consumer:
        """A consumer of the group that commits only when told to, from the earliest offset the first time."""
        return Consumer({
            "bootstrap.servers": self.settings.kafka_bootstrap,
            "group.id": self.group,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "partition.assignment.strategy": "cooperative-sticky",
        })

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Log what this member was handed (cooperative rebalancing hands over increments)."""
        if partitions:
            log.info("%s: partitions %s of %s assigned", self.thread_name,
                     sorted(tp.partition for tp in partitions), self.topic)

    def _consume(self, consumer: Consumer, timeout: float) -> list[Message]:
        """The next batch of messages (errors logged and left out; a fatal one raised)."""
        messages = consumer.consume(self.batch_size, timeout=timeout)
        if any(message.error() is not None for message in messages):
            for message in messages:
                error = message.error()
                if error is not None:
                    if error.fatal():
                        raise KafkaException(error)
                    log.warning("Consumer error on %s: %s", self.topic, error)
            messages = [message for message in messages if message.error() is None]
        return messages

    def _commit(self, consumer: Consumer, partitions: set[int] | None = None) -> None:
        """Commit the offsets marked in ``_to_commit`` (of ``partitions``, or all), synchronously."""
        offsets = [
            TopicPartition(self.topic, partition, offset)
            for partition, offset in self._to_commit.items()
            if partitions is None or partition in partitions
        ]
        if not offsets:
            return
        try:
            consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:
            error = exc.args[0]
            if not (isinstance(error, KafkaError) and error.code() in COMMIT_AFTER_REBALANCE):
                raise
            # The group moved to a new generation this member has not joined yet (a worker came
            # or went). It is still a member, and cooperative rebalancing hands a partition to
            # another member only after this one gave it up in its revoke callback (which drops
            # the partition's pending offset): what stays pending is retried at the next commit.
            self.commits_refused += 1
            log.info("Commit of %s refused during a rebalance (%s); retried after it", self.topic, error.name())
            return
        for tp in offsets:
            if self._to_commit.get(tp.partition) == tp.offset:
                del self._to_commit[tp.partition]


def run_as_service(app: Any, consumer: ConsumerThread | ConsumerProcess, what: str) -> None:
    """Run ``consumer`` while the Faust ``app`` runs; its failure (or death) stops the worker."""
    from mode import Service

    class ConsumerStage(Service):
        """Runs the consumer's thread while the worker runs; a failure there stops the worker."""

        async def on_start(self) -> None:
            consumer.start()

        async def on_stop(self) -> None:
            await asyncio.get_running_loop().run_in_executor(None, consumer.stop)

        @Service.task
        async def _watch(self) -> None:
            while not self.should_stop:
                if consumer.failure is not None or not consumer.running:
                    await self.crash(consumer.failure or RuntimeError(f"the {what} stopped"))
                    return
                await self.sleep(1.0)

    app.service(ConsumerStage)


class ConsumerProcess:
    """A :class:`ConsumerThread` run in a child process of its own, with the same lifecycle.

    Why: the worker's stages are CPU-bound Python, and the threads of one process take turns
    on one interpreter lock, so a worker with every stage in threads used one core however
    many it had. A stage in a child process gets a core of its own. It needs nothing of the
    worker's memory -- the stages talk only through Kafka topics and checkpoint on their own
    -- so moving it changes no guarantee.

    ``build(*args)`` (a module-level function: it is pickled to the child) returns the
    stage's :class:`ConsumerThread`, made in the child. :meth:`stop` asks the child to
    checkpoint, commit and leave; the child stops by itself if the worker dies (on Linux
    the kernel kills it with the worker; elsewhere it notices within a second), so a
    crashed worker leaves nothing behind that would keep its lanes.
    """

    def __init__(self, build: Callable[..., ConsumerThread], args: tuple[Any, ...], name: str) -> None:
        self._context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked locks or threads
        self._build, self._args, self.thread_name = build, args, name
        self._stopping = self._context.Event()
        self._process: Any = None
        self.failure: BaseException | None = None

    def start(self) -> None:
        """Start the child (returns at once)."""
        self._process = self._context.Process(
            target=_run_stage, args=(self._build, self._args, self._stopping, os.getpid()), name=self.thread_name
        )
        self._process.start()

    def stop(self, timeout: float = 25.0) -> None:
        """Ask the child to finish its last checkpoint and wait for it (then kill it if it is stuck)."""
        self._stopping.set()
        if self._process is not None:
            self._process.join(timeout)
            if self._process.is_alive():
                log.warning("%s did not stop within %.0f s; killed", self.thread_name, timeout)
                self._process.kill()
                self._process.join(5)

    @property
    def running(self) -> bool:
        """Whether the child is alive; once it has exited with an error, :attr:`failure` says so."""
        process = self._process
        if process is None:
            return False
        if process.is_alive():
            return True
        if process.exitcode and self.failure is None and not self._stopping.is_set():
            self.failure = RuntimeError(f"{self.thread_name} exited with status {process.exitcode}")
        return False


def _run_stage(build: Callable[..., ConsumerThread], args: tuple[Any, ...], stopping: Any, parent: int) -> None:
    """The body of a :class:`ConsumerProcess` child: run the stage until told to stop or the worker is gone."""
    die_with_parent()
    if os.getppid() != parent:  # the worker died before the line above took effect
        return
    # Ctrl-C reaches the whole process group: the worker stops its stages itself, in order. A
    # SIGTERM sent to the group (or to the child alone) stops it too. The handler only notes it:
    # it runs inside the wait below, which holds the lock that setting ``stopping`` would take.
    terminated: list[int] = []
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda signum, _frame: terminated.append(signum))
    logging.basicConfig(level=get_settings().log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    consumer = build(*args)
    tune_garbage_collector()
    consumer.start()
    while not stopping.wait(1.0):
        if terminated or not consumer.running or os.getppid() != parent:
            break
    consumer.stop()
    sys.exit(1 if consumer.failure is not None else 0)
