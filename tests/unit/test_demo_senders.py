"""Demo events posted to the collector come back as the same events (the ``--via http`` path)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from api.collector.enrich import RequestFacts
from api.collector.segment import TimeLimits, to_event, validate_message
from tidemark.demo import TrafficConfig, generate_events
from tidemark.demo.senders import to_segment_message

START = datetime(2026, 11, 2, tzinfo=UTC)


def test_collector_maps_demo_messages_back_to_the_demo_events() -> None:
    events = list(generate_events(TrafficConfig(start=START, end=START + timedelta(days=1), sessions_per_day=400)))
    limits = TimeLimits(max_future=timedelta(days=1), max_past=timedelta(days=365))
    received = START + timedelta(days=2)
    kinds = set()
    for event in events:
        message = to_segment_message(event.to_avro())
        kinds.add(message["type"])
        parsed = validate_message(message, None)
        back = to_event(parsed, message["type"], received_at=received, facts=RequestFacts(), limits=limits)
        assert back.id == event.id
        assert (back.event_name, back.event_type) == (event.event_name, event.event_type)
        assert (back.user_id, back.anonymous_id) == (event.user_id, event.anonymous_id)
        assert back.timestamp == event.timestamp
        assert back.properties == event.properties
        sent, got = event.context, back.context
        if "userAgent" in sent:  # browser events: the collector parses the agent; it must agree with the demo
            assert got["device"]["type"] == sent["device"]["type"], sent["userAgent"]
            assert got["browser"]["name"] == sent["browser"]["name"]
            assert got["os"]["name"] == sent["os"]["name"]
            assert got["location"] == sent["location"] and got["locale"] == sent["locale"]
            assert got["page"]["path"] == sent["page"]["path"]
            if "campaign" in sent:
                for key, value in sent["campaign"].items():
                    assert got["campaign"][key] == value
            if "referrer" in sent:
                assert got["referrer"]["url"] == sent["referrer"]["url"]
    assert kinds == {"page", "identify", "track"}
