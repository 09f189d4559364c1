"""The hand-written Avro writers write what fastavro writes, field for field of the schema file."""

from __future__ import annotations

import io
import random
from typing import Any

from fastavro import schemaless_writer

from schemas.codec import load_schema
from schemas.streams import UserSession, session_codec
from streams.avro_writers import SESSION_LAYOUT, session_message, write_long
from streams.sessions import SessionWindow


def _plain(avro_type):
    # A field's type without its logical type (timestamp-millis is a long on the wire).
    return avro_type["type"] if isinstance(avro_type, dict) else avro_type


def session_record(session: SessionWindow) -> dict[str, Any]:
    """The ``session.avsc`` record of a session, for fastavro: the reference the writer is held to."""
    return {
        "sessionId": session.session_id,
        "userId": session.user_id or None,
        "deviceId": session.device_id,
        "startedAt": session.started_at,
        "lastSeenAt": session.last_seen_at,
        "durationMs": session.duration_ms,
        "pageViews": session.page_views,
        "events": session.events,
        "device": session.device,
        "browser": session.browser,
        "os": session.os,
        "country": session.country,
        "referrer": session.referrer,
        "utmSource": session.utm_source,
        "utmMedium": session.utm_medium,
        "utmCampaign": session.utm_campaign,
        "closed": session.closed,
        "version": session.version,
    }


def test_the_session_layout_is_the_schema_files() -> None:
    fields = load_schema("session.avsc")["fields"]
    assert [(f["name"], _plain(f["type"])) for f in fields] == SESSION_LAYOUT


def _text(rng: random.Random, longest: int) -> str:
    alphabet = "abcXYZ019-_ /:?=&éß€日本🙂\"\\"
    return "".join(rng.choice(alphabet) for _ in range(rng.randrange(longest)))


def _session(rng: random.Random) -> SessionWindow:
    started = rng.choice([0, 1, -1, 1_772_452_800_006, -(2**40), rng.getrandbits(41)])
    return SessionWindow(
        session_id=f"{rng.getrandbits(128):032x}", device_id=_text(rng, 90), user_id=rng.choice(["", _text(rng, 70)]),
        started_at=started, last_seen_at=started + rng.choice([0, 1, 63, 64, 8191, 8192, rng.getrandbits(40)]),
        page_views=rng.choice([0, 1, 63, 64, 2**31 - 1]), events=rng.choice([1, 2, 64, 100_000, 2**31 - 1]),
        device=rng.choice(["", "desktop", "mobile"]), browser=_text(rng, 20), os=_text(rng, 20),
        country=rng.choice(["", "DE", _text(rng, 4)]), referrer=_text(rng, 300), utm_source=_text(rng, 70),
        utm_medium=_text(rng, 10), utm_campaign=_text(rng, 140), closed=rng.random() < 0.5,
    )


def test_session_messages_equal_fastavros_bytes_on_random_sessions() -> None:
    rng = random.Random(11)
    codec = session_codec()
    for _ in range(3000):
        session = _session(rng)
        data = session_message(session)
        assert data == codec.encode(session_record(session))
        decoded = UserSession.from_avro(codec.decode(data))
        assert (decoded.id, decoded.user_id, decoded.events, decoded.closed) == (
            session.session_id, session.user_id or None, session.events, session.closed)


def test_longs_at_the_edges_of_their_byte_counts_equal_fastavros() -> None:
    for n in (0, -1, 63, -64, 64, -65, 8191, -8192, 8192, 2**62, -(2**63), 2**63 - 1):
        buf = io.BytesIO()
        schemaless_writer(buf, "long", n)
        assert write_long(n) == buf.getvalue(), n
