"""Hand-written Avro writers for the stream's most frequent outputs (byte for byte fastavro's).

A session is published about once for every three events, and fastavro spends more on
setting up a call (the record's dict, the schema walk) than on the few fields of a
session; :func:`session_message` writes the fields of ``session.avsc`` straight from a
:class:`~streams.sessions.SessionWindow`. ``tests/unit/test_avro_writers.py`` holds the
layout to the schema file and the bytes to fastavro's.

Avro binary encoding (https://avro.apache.org/docs/current/specification/#binary-encoding):
``int`` and ``long`` as zig-zag varints, ``string`` as its UTF-8 length (a long) then
the bytes, ``boolean`` as one byte, a union as its branch index (a long) then the value.
"""

from __future__ import annotations

from schemas.streams import session_codec
from streams.sessions import SessionWindow

# The fields of session.avsc in order, with their Avro types (logical types left out).
SESSION_LAYOUT = [
    ("sessionId", "string"),
    ("userId", ["null", "string"]),
    ("deviceId", "string"),
    ("startedAt", "long"),
    ("lastSeenAt", "long"),
    ("durationMs", "long"),
    ("pageViews", "int"),
    ("events", "int"),
    ("device", "string"),
    ("browser", "string"),
    ("os", "string"),
    ("country", "string"),
    ("referrer", "string"),
    ("utmSource", "string"),
    ("utmMedium", "string"),
    ("utmCampaign", "string"),
    ("closed", "boolean"),
    ("version", "long"),
]

_SMALL = [bytes((z,)) for z in range(0x80)]  # a zig-zag value under 128 is its one byte


def write_long(n: int) -> bytes:
    """An Avro ``long`` (or ``int``): zig-zag, then 7 bits a byte, low bits first.

    >>> write_long(0), write_long(-1), write_long(64), write_long(-65)
    (b'\\x00', b'\\x01', b'\\x80\\x01', b'\\x81\\x01')
    """
    z = (n << 1) ^ (n >> 63)
    if z < 0x80:
        return _SMALL[z]
    out = bytearray()
    while z >= 0x80:
        out.append(z & 0x7F | 0x80)
        z >>= 7
    out.append(z)
    return bytes(out)


def write_string(text: str) -> bytes:
    """An Avro ``string``: its UTF-8 length, then the bytes.

    >>> write_string("né")
    b'\\x06n\\xc3\\xa9'
    """
    data = text.encode()
    return write_long(len(data)) + data


def session_message(session: SessionWindow, header: bytes = session_codec().header) -> bytes:
    """The ``sessions`` message of a session: single-object header, then the ``session.avsc`` body.

    What fastavro makes of the session's record dict with ``session_codec()``, in half the time.
    """
    text, long_ = write_string, write_long
    user, started, last_seen, events, closed = (session.user_id, session.started_at, session.last_seen_at,
                                                session.events, session.closed)
    return b"".join((
        header,
        text(session.session_id),
        b"\x02" + text(user) if user else b"\x00",  # union branch 1 (string) or 0 (null: no user yet)
        text(session.device_id),
        long_(started),
        long_(last_seen),
        long_(last_seen - started),  # durationMs (SessionWindow.duration_ms)
        long_(session.page_views),
        long_(events),
        text(session.device),
        text(session.browser),
        text(session.os),
        text(session.country),
        text(session.referrer),
        text(session.utm_source),
        text(session.utm_medium),
        text(session.utm_campaign),
        b"\x01" if closed else b"\x00",
        long_(events * 2 + closed),  # version (SessionWindow.version)
    ))
