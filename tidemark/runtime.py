"""Process-wide tuning for Tidemark's long-running processes (API + sinks, sink, stream worker).

Why the garbage collector is tuned: these processes allocate in bursts (a Kafka consume
returns thousands of message objects at once, each decoded into a record), and nearly all of
it dies young. CPython's default collects the youngest generation every 700 net allocations,
so one 5,000-message chunk triggered several collections, each also walking whatever the
process keeps (the batch being filled, the modules, the metric catalogue). Measured on the raw
sink, collections were about a sixth of its consumer thread's CPU. A larger first threshold
(the same generation scheme, collected less often) and freezing what exists after start-up
(it lives as long as the process) remove most of that work; reference counting still frees
almost everything immediately, so memory use does not grow.
"""

from __future__ import annotations

import gc

#: Net allocations between collections of the youngest generation (CPython's default: 700).
YOUNG_GENERATION_THRESHOLD = 50_000


def tune_garbage_collector() -> None:
    """Collect the youngest generation less often and exempt start-up objects from later collections."""
    _young, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_GENERATION_THRESHOLD, middle, old)
    gc.collect()
    gc.freeze()


def die_with_parent() -> None:
    """Ask the kernel to kill this process when its parent dies (Linux; elsewhere a no-op).

    For a stage that a process runs in a child: a crashed (SIGKILLed) parent cannot stop it.
    """
    import ctypes
    import ctypes.util
    import signal
    import sys

    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
