"""The Faust app of the stream worker: its three stages, run as services of the app.

Processing guarantee, and why
-----------------------------
Faust's ``exactly_once`` mode rides on Kafka transactions; in faust-streaming it has
known bugs (stalls and lost commits around rebalances) and by default wants three
brokers for the transaction log. We run at least once and make redelivery harmless
instead, where it is cheap to do so:

- every output is a full value under a key, never a delta: a session version
  (``sessions``: ReplacingMergeTree(version) keyed by session id), a partition's partial
  of a window (``metrics.partials``, partitioned by series: the merger keeps the latest
  per source partition) and a snapshot (``metrics``: ReplacingMergeTree(computed_at)
  keyed by metric, period, period start and dimensions). Re-publishing one replaces it
  with the same value;
- the state that adds up (counts, sums, distinct sets, sessions; the merged partials; the
  detectors) is checkpointed together with the offset it reflects, in one message, and
  offsets are committed only up to the checkpoint (:mod:`streams.agents.checkpoints`). A
  restarted partition skips what its checkpoint already holds, so nothing counts twice.

Three stages, three consumer groups, each reading its topic with librdkafka in a thread
of its own, run as a service of this Faust app (which owns the worker's lifecycle, its
signals and its web endpoint); metric merging runs in a child process of the worker, so
that it and the events stage each get a core (threads of one process share one
interpreter lock):

1. events (:mod:`streams.agents.events`, group ``<prefix><stream_app_id>``):
   ``events.raw`` → sessions and per-partition partials of metric windows;
2. metric merging (:mod:`streams.agents.metrics`, group ``<prefix><stream_app_id>-merge``):
   ``metrics.partials`` → snapshots on ``metrics``, final once every partition has
   passed a window;
3. anomaly detection (:mod:`streams.agents.anomalies`): ``metrics`` → ``anomalies``.

Why not Faust agents: a Faust agent pays about 150 µs per message (its conductor, channels
and event objects), which capped a worker reading ``events.raw`` near 6,000 events/s
before any work; the merging agent's Faust table wrote every partial's state to its
changelog through aiokafka, one message per partial, and cost more than the events stage
itself. librdkafka hands over batches for about a microsecond a message, and each stage
checkpoints its state as one message on its own schedule.

Scaling: the unit of parallelism is a partition of ``events.raw`` (keyed by device, so a
device's sessions stay on one worker) and a lane of ``metrics.partials``. Start more
workers with the same settings and the groups spread partitions and lanes (and with them
their checkpoints) over them: a worker restores a partition or lane from its checkpoint when
it is assigned, and a commit refused while the group rebalances is retried after it.
Anomaly detection keeps one detector bank per worker (:mod:`streams.agents.anomalies`).
"""

from __future__ import annotations

import logging

import faust
from confluent_kafka.admin import AdminClient

from streams.agents.anomalies import register_anomaly_agent
from streams.agents.checkpoints import ensure_checkpoint_topic
from streams.agents.events import EventsConsumer, checkpoint_topic
from streams.agents.metrics import PARTIALS_PARTITIONS, PARTIALS_TOPIC, MetricsConsumer, merge_checkpoint_topic
from streams.agents.threaded import ConsumerProcess, DurableProducer, run_as_service
from streams.aggregators import compile_catalogue
from streams.catalogue import get_catalogue
from tidemark.settings import Settings
from tidemark.topics import DAY_MS, EVENTS_RAW, METRICS, TopicSpec, ensure_topics

log = logging.getLogger(__name__)


def faust_brokers(bootstrap: str) -> list[str]:
    """Faust's broker URLs (``kafka://host:port``) for a Kafka bootstrap list."""
    return [f"kafka://{host.strip()}" for host in bootstrap.split(",") if host.strip()]


def agents_app_id(settings: Settings) -> str:
    """The Faust app id of the stream worker (the stages' consumer groups are named in their modules)."""
    return f"{settings.topic_prefix}{settings.stream_app_id}-agents"


def ensure_stream_topics(settings: Settings) -> None:
    """Create the worker's internal topics (idempotent): the partials and the stages' checkpoints."""
    ensure_topics(settings, (TopicSpec(PARTIALS_TOPIC, PARTIALS_PARTITIONS, retention_ms=DAY_MS),))
    ensure_checkpoint_topic(settings, checkpoint_topic(settings), EVENTS_RAW.partitions)
    ensure_checkpoint_topic(settings, merge_checkpoint_topic(settings), PARTIALS_PARTITIONS)


def partition_count(settings: Settings, spec: TopicSpec) -> int:
    """How many partitions a topic has on the broker (its spec's count if it does not exist yet).

    Deployments may have grown a topic past its spec; the metrics stage must know the real
    number of ``events.raw`` partitions to tell when every one of them has closed a window.
    """
    name = settings.topic(spec.name)
    topic = AdminClient({"bootstrap.servers": settings.kafka_bootstrap}).list_topics(name, timeout=30).topics.get(name)
    if topic is None or topic.error is not None or not topic.partitions:
        return spec.partitions
    return len(topic.partitions)


def merging_stage(settings: Settings, source_partitions: int, metrics_partitions: int) -> MetricsConsumer:
    """The metric-merging stage, made in the child process it runs in."""
    aggregators = compile_catalogue(get_catalogue(settings.metrics_file))
    return MetricsConsumer(settings, aggregators, source_partitions, metrics_partitions)


def create_app(settings: Settings) -> faust.App:
    """The Faust app of the stream worker, with the events, metric-merging and anomaly stages as its services."""
    app_id = agents_app_id(settings)
    datadir = settings.state_dir / "faust" / app_id
    datadir.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        app_id,
        broker=faust_brokers(settings.kafka_bootstrap),
        processing_guarantee="at_least_once",
        store="memory://",
        datadir=str(datadir),
        web_enabled=settings.stream_web_port > 0,
        web_port=settings.stream_web_port or 6066,
        web_bind="127.0.0.1",
    )
    catalogue = get_catalogue(settings.metrics_file)
    aggregators = compile_catalogue(catalogue)
    source_partitions = partition_count(settings, EVENTS_RAW)

    events = EventsConsumer(settings, aggregators, settings.topic(PARTIALS_TOPIC), partial_lanes=PARTIALS_PARTITIONS)
    run_as_service(app, events, "events consumer")

    # Metric merging in a child process: a core of its own (see ConsumerProcess).
    merging = ConsumerProcess(merging_stage, (settings, source_partitions, partition_count(settings, METRICS)),
                              "metric-merging")
    run_as_service(app, merging, "metric merging")

    # Anomalies go out through librdkafka; the anomaly stage makes them durable before it checkpoints.
    anomalies_out = DurableProducer(settings)

    # Anomaly detection: metric snapshots -> anomalies, in a consumer thread with its own checkpoint.
    anomaly_agent = register_anomaly_agent(
        app, settings, catalogue, anomalies_out.publisher, anomalies_out.durable, lanes=PARTIALS_PARTITIONS
    )

    app.tidemark_events_consumer = events  # type: ignore[attr-defined]
    app.tidemark_anomaly_agent = anomaly_agent  # type: ignore[attr-defined]
    return app
