"""A stage's consumer thread against the real broker: a rebalance while it commits does not stop it."""

from __future__ import annotations

import time
import uuid

import pytest
from confluent_kafka import Consumer

from streams.agents.threaded import ConsumerThread
from tidemark.settings import Settings
from tidemark.topics import EVENTS_RAW

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


class _Committer(ConsumerThread):
    """Commits every assigned partition as fast as it can (a busy stage, compressed)."""

    thread_name = "committer"

    def _loop(self, consumer: Consumer) -> None:
        consumer.subscribe([self.topic], on_assign=self._on_assign)
        while not self._stopping.is_set():
            consumer.consume(10, timeout=0.01)
            for tp in consumer.assignment():
                self._to_commit[tp.partition] = 0
            self._commit(consumer)


def test_a_commit_refused_while_another_worker_joins_is_retried_not_fatal(kafka_settings: Settings) -> None:
    group = f"{kafka_settings.topic_prefix}committer-{uuid.uuid4().hex[:6]}"
    stage = _Committer(kafka_settings, EVENTS_RAW.name, group, batch_size=10)
    stage.start()
    try:
        # Workers join and leave until a commit lands in a rebalance (the group then refuses it
        # with ILLEGAL_GENERATION or REBALANCE_IN_PROGRESS); the stage must keep running.
        deadline = time.monotonic() + 120
        while stage.commits_refused == 0:
            assert stage.failure is None and stage.running, f"the stage stopped: {stage.failure!r}"
            assert time.monotonic() < deadline, "no commit was refused: the rebalance was not exercised"
            joiner = Consumer({"bootstrap.servers": kafka_settings.kafka_bootstrap, "group.id": group,
                               "enable.auto.commit": False, "partition.assignment.strategy": "cooperative-sticky"})
            joiner.subscribe([stage.topic])
            until = time.monotonic() + 3
            while time.monotonic() < until:
                joiner.consume(10, timeout=0.05)
            joiner.close()
        assert stage.failure is None and stage.running
    finally:
        stage.stop()
    assert stage.failure is None
