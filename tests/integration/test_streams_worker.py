"""The stream worker against the real broker: sessions and metrics equal the reference, also across a crash."""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path

import pytest

from schemas.streams import MetricSnapshot, UserSession, metric_snapshot_codec, session_codec
from streams.catalogue import CATALOGUE
from streams.sessions import session_id_for
from tests.integration.stream_worker import (
    TopicReader,
    WorkerProcess,
    committed_offsets,
    high_watermarks,
    process_running,
    produce_events,
    wait_for,
)
from tests.metric_reference import demo_dataset, reference_sessions, reference_snapshots
from tidemark.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]

TZ = "Europe/Berlin"
STREAMED = [d.name for d in CATALOGUE.streaming()]


def _snapshot_reader(settings: Settings) -> TopicReader:
    codec = metric_snapshot_codec()
    return TopicReader(settings, "metrics", lambda b: MetricSnapshot.from_avro(codec.decode(b)), lambda s: s.key,
                       keep=lambda old, new: new.computed_at >= old.computed_at)


def _session_reader(settings: Settings) -> TopicReader:
    codec = session_codec()
    return TopicReader(settings, "sessions", lambda b: UserSession.from_avro(codec.decode(b)), lambda s: s.id,
                       keep=lambda old, new: new.version >= old.version)


def _matches(expected: dict, snapshots: dict) -> list:
    actual = {k: s.value for k, s in snapshots.items()}
    return [
        k for k in set(expected) | set(actual)
        if k not in expected or k not in actual or not math.isclose(expected[k], actual[k], rel_tol=1e-9, abs_tol=1e-9)
    ]


def _expected_sessions(events) -> dict[str, tuple[int, int, int]]:
    return {
        session_id_for(r.device_id, r.started_at): (r.events, r.page_views, r.last_seen_at - r.started_at)
        for r in reference_sessions(events, 30 * 60_000, 24 * 3_600_000)
    }


@contextmanager
def _two_workers(settings: Settings, tmp_path: Path, dataset, first_env: dict[str, str] | None = None):
    """Two workers of the same app (``first_env`` for the first), a reader of snapshots, and the
    first worker started on the first half of ``dataset``; all stopped on the way out."""
    env = {"TIDEMARK_REPORT_TIMEZONE": TZ}
    first = WorkerProcess(settings, tmp_path / "w1", {**env, **(first_env or {})})
    second = WorkerProcess(settings, tmp_path / "w2", env)
    snapshots = _snapshot_reader(settings)
    first.start()
    try:
        produce_events(settings, dataset[: len(dataset) // 2])
        yield first, second, snapshots
    finally:
        first.stop()
        second.stop()
        snapshots.close()


def _events_group(settings: Settings) -> tuple[str, str]:
    """The consumer group of the events stage, and the topic it reads."""
    return f"{settings.topic_prefix}{settings.stream_app_id}", settings.topic("events.raw")


def _expected_snapshots(events) -> dict:
    """The reference's value of every streamed metric's window on ``events``."""
    return reference_snapshots(events, CATALOGUE, tz=TZ, names=STREAMED, stitch_grace_ms=300_000)


@pytest.fixture
def dataset():
    return demo_dataset(sessions_per_day=20, seed=17)


def test_worker_sessions_and_metrics_equal_the_reference(kafka_settings: Settings, tmp_path: Path, dataset) -> None:
    worker = WorkerProcess(kafka_settings, tmp_path / "worker", {"TIDEMARK_REPORT_TIMEZONE": TZ})
    snapshots, sessions = _snapshot_reader(kafka_settings), _session_reader(kafka_settings)
    expected = _expected_snapshots(dataset)
    expected_sessions = _expected_sessions(dataset)
    worker.start()
    try:
        produce_events(kafka_settings, dataset)

        def tick() -> None:
            worker.check_alive()
            snapshots.poll()
            sessions.poll()

        wait_for(lambda: not _matches(expected, snapshots.latest), 240, "metric snapshots", tick)
        wait_for(
            lambda: {k: (s.events, s.page_views, s.duration_ms) for k, s in sessions.latest.items()}
            == expected_sessions,
            60, "sessions", tick,
        )
    finally:
        worker.stop()
        snapshots.close()
        sessions.close()


def test_worker_killed_mid_stream_recovers_without_double_counting(
    kafka_settings: Settings, tmp_path: Path, dataset
) -> None:
    # The first worker checkpoints and publishes but never gets to commit an offset: after the
    # crash, Kafka redelivers everything it had consumed, all of it already in the checkpoints.
    expected, (group, raw) = _expected_snapshots(dataset), _events_group(kafka_settings)
    half = len(dataset) // 2
    with _two_workers(kafka_settings, tmp_path, dataset, {"TIDEMARK_STREAM_COMMIT_SECONDS": "3600"}) as (
        first, second, snapshots
    ):
        # The first half is processed and checkpointed (its sessions are out), never committed.
        sessions = _session_reader(kafka_settings)

        def first_tick() -> None:
            first.check_alive()
            sessions.poll()

        first_half_sessions = _expected_sessions(dataset[:half])
        wait_for(lambda: {k: (s.events, s.page_views, s.duration_ms) for k, s in sessions.latest.items()}
                 == first_half_sessions, 120, "the first half's sessions", first_tick)
        sessions.close()
        # ... and every partition that received events has a checkpoint.
        changelog = f"{group}-partition-checkpoints-changelog"
        with_events = [p for p, end in enumerate(high_watermarks(kafka_settings, raw, 6)) if end > 0]
        wait_for(lambda: all(high_watermarks(kafka_settings, changelog, 6)[p] > 0 for p in with_events), 60,
                 "checkpoints", first.check_alive)
        first.kill()
        assert committed_offsets(kafka_settings, group, raw, 6) == 0
        produce_events(kafka_settings, dataset[half:])
        second.start()

        def tick() -> None:
            second.check_alive()
            snapshots.poll()

        wait_for(lambda: not _matches(expected, snapshots.latest), 240, "metric snapshots after the restart", tick)
        log = second.log_tail(10_000)
        assert "restored from its checkpoint" in log
        assert "redelivered events already applied" in log


def test_two_workers_share_the_partitions_and_count_every_event_once(
    kafka_settings: Settings, tmp_path: Path, dataset
) -> None:
    # The second worker joins mid-stream: the groups rebalance while both consume, commit and checkpoint.
    expected, (group, raw) = _expected_snapshots(dataset), _events_group(kafka_settings)
    half = len(dataset) // 2
    with _two_workers(kafka_settings, tmp_path, dataset) as (first, second, snapshots):
        wait_for(lambda: committed_offsets(kafka_settings, group, raw, 6) > 0, 120, "the first commits",
                 first.check_alive)
        second.start()
        produce_events(kafka_settings, dataset[half:])

        def tick() -> None:
            first.check_alive()
            second.check_alive()
            snapshots.poll()

        wait_for(lambda: not _matches(expected, snapshots.latest), 240, "metric snapshots from both workers", tick)
        wait_for(lambda: committed_offsets(kafka_settings, group, raw, 6) == len(dataset), 60, "every event committed",
                 tick)
        # Both took part: the second worker was handed partitions the first had checkpointed.
        assert "restored from its checkpoint" in second.log_tail(10_000)


@pytest.mark.parametrize("ending", ["stop", "kill"])
def test_metric_merging_runs_in_a_process_that_ends_with_the_worker(
    kafka_settings: Settings, tmp_path: Path, ending: str
) -> None:
    # Stopped, the worker has its merging process checkpoint and leave; killed, the process dies
    # with it rather than keep the merging lanes from the worker that replaces it.
    worker = WorkerProcess(kafka_settings, tmp_path)
    worker.start()
    try:
        wait_for(lambda: "metrics-merging: partitions" in worker.log_tail(10_000), 120, "merging lanes assigned",
                 worker.check_alive)
        (stage,) = worker.stage_processes()
        assert process_running(stage)
        getattr(worker, ending)()
        wait_for(lambda: not process_running(stage), 30, "the merging process to end")
        assert ("Metric merging stopped: 6 lanes checkpointed" in worker.log_tail(10_000)) is (ending == "stop")
    finally:
        worker.stop()
