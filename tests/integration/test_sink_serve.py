"""``tidemark serve`` runs the sinks next to the API: events on Kafka appear in its ClickHouse."""

from __future__ import annotations

import signal

import httpx
import pytest

from schemas.codec import dead_letter_codec
from schemas.models import DeadLetter
from tests.fixtures.server import TidemarkServer
from tidemark.settings import Settings
from tidemark.topics import EVENTS_DLQ, EVENTS_RAW

from .sink_support import encode_events, make_events, produce, wait_for

pytestmark = pytest.mark.integration


def test_serve_lands_events_exposes_sink_metrics_and_stops_cleanly(
    tidemark_server: TidemarkServer, kafka_settings: Settings
) -> None:
    server = tidemark_server  # on kafka_settings' topics, with an engine of its own
    settings = kafka_settings
    events = make_events(250, seed=77)
    produce(settings, EVENTS_RAW.name, encode_events(events))
    letter = DeadLetter(source="collector", reason="invalid_json", detail="Expecting value", payload=b"{nope")
    produce(settings, EVENTS_DLQ.name, [dead_letter_codec().encode(letter.to_avro())])

    wait_for(lambda: server.sql("SELECT count(), uniqExact(event_id) FROM events FINAL")[0] == [250, 250], 90,
             "the events in the server's ClickHouse")
    wait_for(lambda: server.sql("SELECT reason, payload FROM events_rejected FINAL") == [["invalid_json", "{nope"]],
             60, "the dead letter in events_rejected")

    metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
    assert 'tidemark_sink_rows_inserted_total{sink="raw"} 250.0' in metrics
    assert 'tidemark_sink_rows_inserted_total{sink="rejected"} 1.0' in metrics
    assert "tidemark_sink_insert_seconds_bucket" in metrics
    assert "tidemark_sink_consumer_lag" in metrics

    assert server.stop(signal.SIGTERM) == 0, server.log_tail()
    assert "Stopped sink.raw" in server.log_tail(200)
