"""Avro schemas of every message on Tidemark's topics, their pydantic models and the wire codec.

Python code sees pydantic models (:mod:`schemas.models`); the wire sees Avro
(:mod:`schemas.codec`). Schema evolution rules are in :mod:`schemas.codec`.
"""

from schemas.codec import SchemaCodec, dead_letter_codec, event_codec
from schemas.models import AnalyticsEvent, DeadLetter, EventType

__all__ = ["AnalyticsEvent", "DeadLetter", "EventType", "SchemaCodec", "dead_letter_codec", "event_codec"]
