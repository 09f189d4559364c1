"""The anomaly agent's pure logic: per-series grouping and ordering, and flush bookkeeping."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from schemas.anomaly import AnomalyStatus, anomaly_codec
from schemas.streams import MetricSnapshot, metric_snapshot_codec
from streams.agents.anomalies import AnomalyAgent, additive_metrics, episode_id, ordered_snapshots
from streams.anomaly.series import BankConfig, DetectorBank
from streams.catalogue import get_catalogue

START = datetime(2024, 1, 1, tzinfo=UTC)
CONFIG = BankConfig(detector="seasonal_robust_z", params={"warm_up": 24}, recovery=2,
                    severity_thresholds={"low": 5, "medium": 8, "high": 12, "critical": 20})


def snapshot(hour: int, value: float, computed_minute: int = 0, metric: str = "signups",
             dimensions: dict[str, str] | None = None) -> MetricSnapshot:
    start = START + timedelta(hours=hour)
    return MetricSnapshot(metric_type=metric, period="hour", period_start=start, period_end=start + timedelta(hours=1),
                          value=value, dimensions=dimensions or {},
                          computed_at=start + timedelta(minutes=computed_minute))


def test_latest_snapshot_per_period_in_period_order_per_series() -> None:
    de, fr = {"country": "DE"}, {"country": "FR"}
    given = [
        snapshot(3, 30, 5, dimensions=de), snapshot(1, 10, 5, dimensions=de), snapshot(1, 11, 9, dimensions=de),
        snapshot(2, 99, 1, dimensions=fr), snapshot(1, 12, 7, dimensions=de), snapshot(2, 98, 0, dimensions=fr),
    ]
    got = [(s.dimensions["country"], s.period_start.hour, s.value) for s in ordered_snapshots(given)]
    assert got == [("DE", 1, 11.0), ("DE", 3, 30.0), ("FR", 2, 99.0)]


def test_same_computed_at_keeps_the_later_consumed() -> None:
    got = ordered_snapshots([snapshot(1, 1, 5), snapshot(1, 2, 5)])
    assert [s.value for s in got] == [2.0]


def test_additive_metrics_come_from_the_catalogue_aggregations() -> None:
    catalogue = get_catalogue()
    is_additive = additive_metrics(catalogue)
    for name, definition in catalogue.items():
        assert is_additive(name) == (definition.aggregation.value in ("count", "sum"))
    assert not is_additive("no-such-metric")


def counts(metric: str) -> bool:
    return metric == "signups"


class Recorder:
    """Collects what the agent publishes, checkpoints and acknowledges, in order."""

    def __init__(self) -> None:
        self.log: list[tuple[str, Any]] = []
        self.state: bytes | None = None
        self.checkpoint_every = 0.0
        self.wall = 1_000_000.0

    def agent(self) -> AnomalyAgent:
        return AnomalyAgent(
            lambda blob: DetectorBank.from_bytes(blob, CONFIG, counts) if blob else DetectorBank(CONFIG, counts),
            publish=lambda key, value: self.log.append(("publish", anomaly_codec().decode(value)["status"])),
            save_state=self.save,
            load_state=lambda: self.state,
            outputs_durable=lambda: self.log.append(("durable", None)),
            ack=lambda message: self.log.append(("ack", message)),
            checkpoint_every=self.checkpoint_every,
            wall_clock=lambda: self.wall,
        )

    def save(self, blob: bytes) -> None:
        self.state = blob
        self.log.append(("checkpoint", None))


def test_flush_publishes_then_checkpoints_then_acks_and_restores_from_checkpoint() -> None:
    codec = metric_snapshot_codec()
    recorder = Recorder()
    agent = recorder.agent()
    for i in range(72):
        agent.on_message(codec.encode(snapshot(i, 100.0 + i % 5).to_avro()), i)
    agent.on_message(b"not avro", "bad")  # skipped, still acknowledged
    now = START + timedelta(hours=72)
    assert agent.flush(now) == []
    assert recorder.log[-1] == ("ack", "bad") and recorder.log.count(("checkpoint", None)) == 1
    recorder.log.clear()
    agent.on_message(codec.encode(snapshot(72, 10.0).to_avro()), "drop")
    found = agent.flush(START + timedelta(hours=73, minutes=1))
    assert [a.status for a in found] == [AnomalyStatus.open]
    assert [kind for kind, _ in recorder.log] == ["publish", "durable", "checkpoint", "ack"]
    # A restarted agent continues from the checkpoint: the replayed drop is not judged again,
    # and the recovery resolves the same episode.
    restarted = recorder.agent()
    restarted.on_message(codec.encode(snapshot(72, 10.0).to_avro()), "replay")
    assert restarted.flush(START + timedelta(hours=73, minutes=2)) == []
    for i in (73, 74):
        restarted.on_message(codec.encode(snapshot(i, 100.0 + i % 5).to_avro()), i)
    resolved = restarted.flush(START + timedelta(hours=75, minutes=1))
    assert [(a.status, a.id) for a in resolved] == [(AnomalyStatus.resolved, found[0].id)]
    assert found[0].id == episode_id(found[0])


def test_replay_after_a_crash_republishes_the_same_episode_id() -> None:
    codec = metric_snapshot_codec()
    recorder = Recorder()
    agent = recorder.agent()
    for i in range(72):
        agent.on_message(codec.encode(snapshot(i, 100.0 + i % 5).to_avro()), i)
    agent.flush(START + timedelta(hours=72))
    agent.on_message(codec.encode(snapshot(72, 10.0).to_avro()), "drop")
    agent.checkpoint_every = 3600.0  # the crash comes before the next checkpoint
    first = agent.flush(START + timedelta(hours=73, minutes=1))
    assert recorder.log[-1] == ("durable", None)  # published, not yet checkpointed nor acknowledged
    replayed = recorder.agent()  # restored from the previous checkpoint; the drop comes again
    replayed.on_message(codec.encode(snapshot(72, 10.0).to_avro()), "drop")
    again = replayed.flush(START + timedelta(hours=73, minutes=1))
    assert [a.id for a in again] == [a.id for a in first] and len(first) == 1


def test_stream_clock_follows_the_data_then_the_wall_clock() -> None:
    codec = metric_snapshot_codec()
    recorder = Recorder()
    agent = recorder.agent()
    for i in range(72):  # data of 2024, judged long after
        agent.on_message(codec.encode(snapshot(i, 100.0 + i % 5).to_avro()), i)
    assert agent.flush() == []  # no flood of empty periods up to today's date
    assert agent.now() == START + timedelta(hours=71)
    recorder.wall += 2 * 3600 + 60  # two hours without a snapshot: hours 71 and 72 close
    found = agent.flush()
    assert [(a.actual, a.window_start) for a in found] == [(0.0, START + timedelta(hours=72))]  # a count: 0


def test_nothing_consumed_nothing_due_writes_nothing() -> None:
    recorder = Recorder()
    agent = recorder.agent()
    assert agent.flush(START) == []
    assert recorder.log == [] and recorder.state is None
