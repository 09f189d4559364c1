"""Which sinks a process runs: every Kafka → ClickHouse writer, built from the settings.

Adding a sink is a few lines: write a :class:`~sinks.batch.BatchSink` subclass (a
:class:`~sinks.batch.SinkSpec` and a ``to_row``) and append its class to ``SINKS``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

from clickhouse_connect.driver.client import Client

from sinks.anomalies import ANOMALIES_SINK, AnomalySink
from sinks.batch import BatchSink
from sinks.raw import EVENTS_SINK, RawEventSink
from sinks.rejected import REJECTED_SINK, RejectedSink
from sinks.sessions import SESSIONS_SINK, SessionSink
from sinks.snapshots import SNAPSHOTS_SINK, SnapshotSink
from tidemark.service import Service
from tidemark.settings import Settings

SinkFactory = Callable[[Settings, Client], BatchSink]

# name (as in ``SinkSpec.name``, the consumer group and the metrics' ``sink`` label) -> how to build it
SINKS: dict[str, SinkFactory] = {
    EVENTS_SINK.name: RawEventSink,
    REJECTED_SINK.name: RejectedSink,
    SESSIONS_SINK.name: SessionSink,
    SNAPSHOTS_SINK.name: SnapshotSink,
    ANOMALIES_SINK.name: AnomalySink,
}


def build_sink_services(settings: Settings, client: Client, only: Collection[str] | None = None) -> list[Service]:
    """The sink services for this process, not yet started (all of them unless ``only`` names some).

    ``client`` must already point at the migrated Tidemark database; each sink writes
    to the database the client had selected when the sink was built.
    """
    unknown = set(only or ()) - set(SINKS)
    if unknown:
        raise ValueError(f"unknown sinks {sorted(unknown)}; known: {sorted(SINKS)}")
    return [factory(settings, client) for name, factory in SINKS.items() if only is None or name in only]
