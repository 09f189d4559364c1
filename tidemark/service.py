"""The small protocol every long-running background part of a process follows.

The API process starts its services (sinks, the event publisher, ...) in its
lifespan and stops them on shutdown, in reverse order.
"""

from __future__ import annotations

from typing import Protocol


class Service(Protocol):
    """Something with a life: started once, stopped once."""

    name: str

    def start(self) -> None:
        """Start working in the background; return promptly."""

    def stop(self, timeout: float = 10.0) -> None:
        """Finish in-flight work durably and stop, within ``timeout`` seconds."""
