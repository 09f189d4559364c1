"""Windows are judged when complete: final snapshots from the merger, and the bank waiting for them.

The case that matters is a catch-up: one ``events.raw`` partition runs hours of event time
ahead of another. Snapshots of later hours then arrive while earlier hours still miss the
slow partition's events; an hour must be judged on its complete value, never on the first
snapshot of a later hour.
"""

from __future__ import annotations

import zlib
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from schemas.anomaly import Anomaly
from schemas.streams import MetricSnapshot, metric_snapshot_codec
from streams.agents.anomalies import AnomalyAgent, additive_metrics, decode_checkpoint, encode_checkpoint
from streams.aggregators import compile_catalogue
from streams.anomaly.series import BankConfig, DetectorBank
from streams.catalogue import Catalogue, Source, get_catalogue
from streams.events import StreamEvent
from streams.merging import SnapshotMerger
from streams.periods import Period, PeriodCalendar
from streams.processor import PartitionProcessor
from streams.windows import series_lane

START = datetime(2026, 3, 2, tzinfo=UTC)
HOUR_MS = 3_600_000
GRACE = timedelta(minutes=5)
CATALOGUE = Catalogue([get_catalogue()["signups"]])


class RecordingBank(DetectorBank):
    """A bank that also records every period it judges, with the value it judged."""

    def __init__(self, config: BankConfig) -> None:
        super().__init__(config, additive_metrics(CATALOGUE))
        self.judged: list[tuple[str, int, float]] = []

    def _judge(self, watch: Any, series: Any, start_ms: int, end_ms: int, value: float) -> list[Anomaly]:
        if series.period == "hour" and not series.dimensions:
            self.judged.append((series.metric_type, (start_ms - int(START.timestamp() * 1000)) // HOUR_MS, value))
        return super()._judge(watch, series, start_ms, end_ms, value)


def signups(partition: int, hour: int, count: int) -> list[StreamEvent]:
    """``count`` signups in one hour from one partition's devices, spread over the hour."""
    base = int((START + timedelta(hours=hour)).timestamp() * 1000)
    return [
        StreamEvent(event_id=f"p{partition}h{hour}e{i}", event_name="signup", event_type="track",
                    user_id=f"u{partition}-{hour}-{i}", anonymous_id=f"d{partition}-{hour}-{i}",
                    ts=base + (i + 1) * HOUR_MS // (count + 1), properties={}, context={})
        for i in range(count)
    ]


class Pipeline:
    """Two source partitions → one merger lane → the anomaly agent, in-process and on event time."""

    def __init__(self, wait_for_final: bool) -> None:
        catalogue = Catalogue([replace(d, periods=(Period.hour,), dimensions=()) for d in CATALOGUE.values()])
        aggregators = compile_catalogue(catalogue)
        calendar = PeriodCalendar("UTC", 1)
        self.processors = [PartitionProcessor(p, aggregators, calendar, grace=GRACE) for p in range(2)]
        self.merger = SnapshotMerger(aggregators, source_partitions=2, grace=GRACE)
        self.bank = RecordingBank(BankConfig(detector="seasonal_robust_z", params={"warm_up": 0},
                                             periods=("hour",), wait_for_final=wait_for_final))
        self.agent = AnomalyAgent(lambda _state: self.bank, publish=lambda _k, _v: None, save_state=lambda _b: None,
                                  load_state=lambda: None, outputs_durable=lambda: None, ack=lambda _m: None,
                                  grace_seconds=GRACE.total_seconds(), wall_clock=lambda: 0.0)
        self.codec = metric_snapshot_codec()
        self.finals: list[MetricSnapshot] = []

    def run(self, partition: int, events: list[StreamEvent]) -> None:
        """Apply one partition's events, publish its partials through the merger, let the agent flush."""
        for event in events:
            self.processors[partition].process(event)
        for partial in self.processors[partition].flush().partials:
            value = self.merger.add(partial)
            if value is not None:
                self.agent.on_message(self.codec.encode(value.to_avro(0)))
        # The flush's watermark, announced after its partials (as stage one does to every lane).
        self.merger.note_watermark(partition, self.processors[partition].metrics.watermark)
        for final in self.merger.finalize():
            self.finals.append(final.to_snapshot(0))
            self.agent.on_message(self.codec.encode(final.to_avro(0)))
        self.agent.flush()


# Per hour, signups on each partition: the true hourly totals are their sums.
COUNTS = {0: [3, 5, 4, 6, 2, 7], 1: [4, 2, 6, 1, 5, 3]}


def catch_up(pipeline: Pipeline) -> None:
    """Partition 0 runs through all six hours first; partition 1 follows one hour at a time."""
    for hour in range(6):
        pipeline.run(0, signups(0, hour, COUNTS[0][hour]))
    for hour in range(6):
        pipeline.run(1, signups(1, hour, COUNTS[1][hour]))


def test_catch_up_judges_every_hour_on_its_complete_value() -> None:
    pipeline = Pipeline(wait_for_final=True)
    catch_up(pipeline)
    totals = [COUNTS[0][h] + COUNTS[1][h] for h in range(6)]
    # Hour 5 is still open (no event past its end plus grace yet): hours 0-4 are judged, each once, complete.
    assert pipeline.bank.judged == [("signups", h, float(totals[h])) for h in range(5)]
    assert [(s.period_start, s.value) for s in pipeline.finals] == [
        (START + timedelta(hours=h), float(totals[h])) for h in range(5)
    ]


def test_judging_on_the_next_period_alone_would_judge_half_counted_hours() -> None:
    """Why finality is needed: the same catch-up, judged when a later hour shows up, gets the numbers wrong."""
    pipeline = Pipeline(wait_for_final=False)
    catch_up(pipeline)
    judged = [value for _metric, _hour, value in pipeline.bank.judged]
    assert judged[:5] == [float(c) for c in COUNTS[0][:5]]  # partition 0's share only


def test_a_window_is_final_once_and_only_when_every_source_passed_its_end_plus_grace() -> None:
    pipeline = Pipeline(wait_for_final=True)
    pipeline.run(0, signups(0, 0, 2) + signups(0, 1, 1))
    assert pipeline.finals == []  # partition 1 not heard from
    pipeline.run(1, signups(1, 0, 1))
    assert pipeline.finals == []  # partition 1 has not passed 01:05
    late_in_grace = [StreamEvent(event_id="edge", event_name="signup", event_type="track", user_id="u-edge",
                                 anonymous_id="d-edge", ts=int((START + timedelta(hours=1, minutes=4)).timestamp()
                                                               * 1000), properties={}, context={})]
    pipeline.run(1, late_in_grace)
    assert pipeline.finals == []  # watermark 01:04: hour 0 still accepts events for another minute
    pipeline.run(1, signups(1, 1, 3))  # watermark past 01:05
    assert [(s.period_start, s.value, s.final) for s in pipeline.finals] == [(START, 3.0, True)]
    pipeline.run(1, signups(1, 1, 0))
    assert len(pipeline.finals) == 1


def test_silent_hours_of_a_count_are_judged_zero_up_to_the_lane_clock() -> None:
    pipeline = Pipeline(wait_for_final=True)
    for hour in range(3):
        pipeline.run(0, signups(0, hour, 2))
        pipeline.run(1, signups(1, hour, 2))
    # Signups stop for two hours; other traffic keeps the lane's clock moving (a later hour's signup).
    pipeline.run(0, signups(0, 5, 1))
    pipeline.run(1, signups(1, 5, 1))
    pipeline.run(0, signups(0, 6, 1))
    pipeline.run(1, signups(1, 6, 1))
    assert pipeline.bank.judged == [("signups", 0, 4.0), ("signups", 1, 4.0), ("signups", 2, 4.0),
                                    ("signups", 3, 0.0), ("signups", 4, 0.0), ("signups", 5, 2.0)]


def test_lane_clock_limits_zero_filling_to_its_own_lane() -> None:
    bank = DetectorBank(BankConfig(detector="seasonal_robust_z", params={"warm_up": 0}, periods=("hour",),
                                   wait_for_final=True), is_additive=lambda _m: True)
    agent = AnomalyAgent(lambda _state: bank, publish=lambda _k, _v: None, save_state=lambda _b: None,
                         load_state=lambda: None, outputs_durable=lambda: None, ack=lambda _m: None,
                         wall_clock=lambda: 0.0, lanes=6)
    # Two series in different lanes.
    names = [f"m{i}" for i in range(40)]
    a = names[0]
    b = next(n for n in names if series_lane(f"{n}|hour|", 6) != series_lane(f"{a}|hour|", 6))
    codec = metric_snapshot_codec()

    def final(metric: str, hour: int) -> bytes:
        start = START + timedelta(hours=hour)
        return codec.encode(MetricSnapshot(metric_type=metric, period="hour", period_start=start,
                                           period_end=start + timedelta(hours=1), value=1.0, computed_at=start,
                                           final=True).to_avro())

    agent.on_message(final(a, 0))
    agent.on_message(final(b, 0))
    agent.flush()
    agent.on_message(final(a, 5))  # a's lane is complete through 06:00; b's lane only through 01:00
    agent.flush()
    assert bank._series[f"{a}|hour|"].last_period_ms == int((START + timedelta(hours=5)).timestamp() * 1000)
    assert bank._series[f"{b}|hour|"].last_period_ms == int(START.timestamp() * 1000)


def test_checkpoint_keeps_lane_clocks_and_reads_the_first_format() -> None:
    state, stream, lanes = decode_checkpoint(encode_checkpoint(b"{}", 5, {2: 7200000}))
    assert (state, stream, lanes) == (b"{}", 5, {2: 7200000})
    old = zlib.compress(b"tmk-anomaly-bank/1\n123\n{}")
    assert decode_checkpoint(old) == (b"{}", 123, {})


def test_a_bank_checkpoint_keeps_several_held_periods() -> None:
    bank = DetectorBank(BankConfig(detector="seasonal_robust_z", params={"warm_up": 0}, periods=("hour",),
                                   wait_for_final=True))
    for hour in (0, 1, 2):
        start = START + timedelta(hours=hour)
        bank.process(MetricSnapshot(metric_type="m", period="hour", period_start=start,
                                    period_end=start + timedelta(hours=1), value=float(hour), computed_at=start))
    restored = DetectorBank.from_bytes(bank.to_bytes(), bank.config)
    assert restored._series["m|hour|"].pending == bank._series["m|hour|"].pending
    assert len(restored._series["m|hour|"].pending) == 3


def test_a_flush_publishes_the_windows_it_closes_before_the_ones_still_open() -> None:
    """One flush of the slow partition both closes hour 0 and moves its watermark past it: the merger
    must see hour 0's last partial before a partial carrying that watermark, or hour 0 goes out final
    without the slow partition's events."""
    pipeline = Pipeline(wait_for_final=True)
    for hour in range(3):
        pipeline.run(0, signups(0, hour, 2))
    pipeline.run(1, signups(1, 0, 3) + signups(1, 1, 1))
    assert [(s.period_start, s.value) for s in pipeline.finals] == [(START, 5.0)]


def test_without_finals_judging_falls_back_to_stream_time_after_a_stall() -> None:
    """A source partition without traffic never passes any window: judgement is late, not lost."""
    bank = DetectorBank(BankConfig(detector="seasonal_robust_z", params={"warm_up": 0}, periods=("hour",),
                                   wait_for_final=True), is_additive=lambda _m: True)
    wall = [1000.0]
    agent = AnomalyAgent(lambda _state: bank, publish=lambda _k, _v: None, save_state=lambda _b: None,
                         load_state=lambda: None, outputs_durable=lambda: None, ack=lambda _m: None,
                         grace_seconds=300, wall_clock=lambda: wall[0], lanes=6)
    codec = metric_snapshot_codec()
    for hour in (0, 1, 2):
        start = START + timedelta(hours=hour)
        agent.on_message(codec.encode(MetricSnapshot(metric_type="m", period="hour", period_start=start,
                                                     period_end=start + timedelta(hours=1), value=3.0,
                                                     computed_at=start).to_avro()))
    agent.flush()
    watch = bank._series["m|hour|"]
    assert watch.last_period_ms is None  # no final snapshot, no lane clock: nothing judged yet
    wall[0] += 599
    agent.flush()
    assert watch.last_period_ms is None
    wall[0] += 2
    agent.flush()  # stalled: stream time is 02:00 + 601 s, minus the grace: hours 0 and 1 have ended
    assert watch.last_period_ms == int((START + timedelta(hours=1)).timestamp() * 1000)


def test_metrics_agent_sends_a_window_once_per_flush_and_its_final_at_once() -> None:
    from streams.agents.events import partial_entry
    from streams.agents.metrics import MetricsAgent
    from streams.aggregators import state_json

    pipeline = Pipeline(wait_for_final=True)  # its processors and catalogue; the agent replaces its merger
    aggregators = pipeline.merger.aggregators
    sent: list[tuple[MetricSnapshot, int]] = []
    codec = metric_snapshot_codec()

    def publish(_key: bytes, value: bytes, lane: int) -> None:
        sent.append((MetricSnapshot.from_avro(codec.decode(value)), lane))

    agent = MetricsAgent(aggregators, publish, source_partitions=2, grace=GRACE)

    def run(partition: int, events: list[StreamEvent]) -> None:
        processor = pipeline.processors[partition]
        for event in events:
            processor.process(event)
        before = processor.metrics.announced
        encoded: dict[int, bytes] = {}
        partials = [partial_entry(partial, state_json(partial.state, encoded))
                    for partial in processor.flush().partials]
        batch = {"partition": partition, "watermark": before, "announced": processor.metrics.watermark,
                 "partials": partials}
        agent.on_batch(3, batch)

    run(0, signups(0, 0, 2))
    run(1, signups(1, 0, 1))
    run(0, signups(0, 0, 1))
    assert sent == []  # provisional values wait for the flush
    assert agent.publish_changed() == 1
    assert [(s.value, s.final, lane) for s, lane in sent] == [(4.0, False, 3)]
    run(0, signups(0, 1, 1))
    run(1, signups(1, 1, 1))  # both partitions now past 01:05 (events at 01:30): hour 0 goes out final at once
    assert [(s.period_start, s.value, s.final) for s, _ in sent[1:]] == [(START, 4.0, True)]
    agent.publish_changed()
    assert [(s.period_start, s.final) for s, _ in sent[2:]] == [(START + timedelta(hours=1), False)]


def test_a_lane_a_partition_sends_nothing_to_still_learns_its_watermark() -> None:
    """Stage one tells every lane how far each partition got, so lanes without its series complete too."""
    from schemas.codec import event_codec
    from schemas.models import AnalyticsEvent
    from streams.agents.events import EventsAgent
    from streams.agents.metrics import MetricsAgent, decode_partial_batch
    from tidemark.settings import Settings

    aggregators = Pipeline(wait_for_final=True).merger.aggregators  # signups per hour only: one series, one lane
    lanes = 4
    lane = series_lane("signups|hour|", lanes)
    finals: list[MetricSnapshot] = []
    snapshot_codec = metric_snapshot_codec()

    def keep_final(_key: bytes, value: bytes, _lane: int) -> None:
        snapshot = MetricSnapshot.from_avro(snapshot_codec.decode(value))
        if snapshot.final:
            finals.append(snapshot)

    merging = MetricsAgent(aggregators, keep_final, source_partitions=2, grace=GRACE)
    sent_to: list[int] = []

    def publish_partials(_key: bytes, value: bytes, to_lane: int) -> None:
        sent_to.append(to_lane)
        merging.on_batch(to_lane, decode_partial_batch(value))

    stage = EventsAgent(Settings(stream_flush_events=10_000), aggregators, publish_session=lambda _k, _v: None,
                        publish_partials=publish_partials, save_checkpoint=lambda _p, _b: None,
                        load_checkpoint=lambda _p: None, commit=lambda _p, _o: None, partial_lanes=lanes)
    codec = event_codec()
    offsets = [0, 0]

    def send(partition: int, name: str, at: timedelta) -> None:
        event = AnalyticsEvent(event_name=name, anonymous_id=f"d{partition}", timestamp=START + at)
        offsets[partition] += 1
        stage.on_message(partition, offsets[partition], codec.encode(event.to_avro()))
        stage.flush(partition)

    send(0, "signup", timedelta(minutes=10))
    send(1, "signup", timedelta(minutes=20))
    send(0, "signup", timedelta(hours=1, minutes=30))
    assert finals == []  # partition 1 has not passed 01:05
    sent_to.clear()
    send(1, "page_view", timedelta(hours=1, minutes=40))  # no signups: nothing of lane's series to send
    assert lane in sent_to  # ... but its watermark reaches the signups' lane
    assert [(s.period_start, s.value) for s in finals] == [(START, 2.0)]


def test_catching_up_on_demo_traffic_every_final_is_the_complete_value() -> None:
    """Six partitions drifting apart over demo traffic, through the real stage one and merging:
    no window changes after its final snapshot, and final hourly page views match the events."""
    from collections import Counter

    from schemas.codec import event_codec
    from streams.agents.events import EventsAgent
    from streams.agents.metrics import MetricsAgent, decode_partial_batch
    from tidemark.demo import TrafficConfig, generate_events
    from tidemark.settings import Settings

    hours = 4
    events = list(generate_events(TrafficConfig(start=START, end=START + timedelta(hours=hours),
                                                 sessions_per_day=3000.0, seed=11, seasonality=0.0)))
    settings = Settings()
    aggregators = compile_catalogue(get_catalogue())
    snapshot_codec = metric_snapshot_codec()
    out: list[MetricSnapshot] = []

    def publish_snapshot(_key: bytes, value: bytes, _lane: int) -> None:
        out.append(MetricSnapshot.from_avro(snapshot_codec.decode(value)))

    def publish_partials(_key: bytes, value: bytes, lane: int) -> None:
        merging.on_batch(lane, decode_partial_batch(value))

    merging = MetricsAgent(aggregators, publish_snapshot, source_partitions=6,
                           grace=timedelta(seconds=settings.stream_grace_seconds))
    stage = EventsAgent(settings, aggregators, publish_session=lambda _k, _v: None, publish_partials=publish_partials,
                        save_checkpoint=lambda _p, _b: None, load_checkpoint=lambda _p: None,
                        commit=lambda _p, _o: None, partial_lanes=6)
    codec = event_codec()
    by_partition: dict[int, list[bytes]] = {p: [] for p in range(6)}
    for event in events:  # keyed like the collector keys them
        by_partition[zlib.crc32(event.distinct_id.encode()) % 6].append(codec.encode(event.to_avro()))
    done = dict.fromkeys(range(6), 0)
    while any(done[p] < len(by_partition[p]) for p in range(6)):
        for p in range(6):  # partition p takes chunks of 100 (p + 1) events: they drift apart
            for value in by_partition[p][done[p]:done[p] + 100 * (p + 1)]:
                done[p] += 1
                stage.on_message(p, done[p], value)
            stage.flush(p)
        merging.publish_changed()

    # Session metrics are the documented exception: a session still open at the watermark adds later.
    of_sessions = {name for name, d in get_catalogue().items() if d.source is Source.sessions}
    finals: dict[tuple[Any, ...], float] = {}
    changed_after_final = []
    for s in out:
        key = (s.metric_type, s.period, s.period_start, tuple(sorted(s.dimensions.items())))
        if s.final:
            finals[key] = s.value
        elif key in finals and s.value != finals[key] and s.metric_type not in of_sessions:
            changed_after_final.append((key, finals[key], s.value))
    assert finals and not changed_after_final[:5]
    page_views = Counter(e.timestamp.replace(minute=0, second=0, microsecond=0) for e in events
                         if e.event_name == "page_view")
    for hour in range(hours - 1):  # the last hour is still open: no event past its end plus the grace
        start = START + timedelta(hours=hour)
        assert finals[("page_views", "hour", start, ())] == page_views[start]
