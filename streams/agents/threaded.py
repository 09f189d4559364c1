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
import threading
from typing import Any

from tidemark.settings import Settings


class ConsumerThread:
    """A consuming loop (:meth:`_run`, written by subclasses) in a daemon thread of its own."""

    thread_name = "consumer"

    def __init__(self, settings: Settings, topic: str, group: str, batch_size: int) -> None:
        self.settings = settings
        self.topic = settings.topic(topic)  # the topic it reads (name before the prefix)
        self.group = group
        self.batch_size = batch_size  # messages per consume call
        self.failure: BaseException | None = None
        self._stopping = threading.Event()
        self._closing = False  # set once the loop is leaving: rebalance callbacks then only forget
        self._thread: threading.Thread | None = None

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
        raise NotImplementedError


def run_as_service(app: Any, consumer: ConsumerThread, what: str) -> None:
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
