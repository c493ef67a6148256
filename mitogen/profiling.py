"""``profiling=True``: a cProfile profile of each thread of a context, written as it exits.

A connection method's ``profiling=True`` option (by default ``Router.profiling``, which
``mitogen.main(profiling=True)`` and the ``MITOGEN_PROFILING`` environment variable set)
makes the new context call :func:`start` before anything else: its main thread, which runs
every call it receives, and its broker thread are profiled from then on. A master whose
``Router.profiling`` is set profiles its broker thread.

Each profile is written where ``MITOGEN_PROFILE_FMT`` says, as Mitogen does (default
``/tmp/mitogen.stats.%(pid)s.%(identity)s.%(now)s.%(ext)s``; `identity` is the thread's
name, `now` microseconds of the monotonic clock): ``.pstats`` for ``python -m pstats``, and
``.log``, the same sorted by cumulative time. The broker thread's profile is written when
the broker exits, the main thread's when the interpreter does.

Python 3.12 and newer allow only one profiler per process, and it sees every thread: there,
one profile of identity ``all`` covers the whole process.
"""

from __future__ import annotations

import atexit
import cProfile
import os
import pstats
import sys
import threading
from typing import Any

import mitogen.core

__all__ = ["DEFAULT_FMT", "start"]

#: Where profiles go unless MITOGEN_PROFILE_FMT says otherwise (Mitogen's default).
DEFAULT_FMT = "/tmp/mitogen.stats.%(pid)s.%(identity)s.%(now)s.%(ext)s"

#: One profiler per process (Python 3.12+) rather than one per thread.
PROCESS_WIDE = sys.version_info >= (3, 12)

_lock = threading.Lock()
_started: set = set()


def _path(identity: str, ext: str) -> str:
    fmt = os.environ.get("MITOGEN_PROFILE_FMT", DEFAULT_FMT)
    return fmt % {"pid": os.getpid(), "identity": identity.replace("/", "_"),
                  "now": int(1e6 * mitogen.core.now()), "ext": ext}


def _write(profiler: cProfile.Profile, identity: str) -> None:
    """Stop `profiler` (on the thread it profiles) and write its two files."""
    profiler.disable()
    profiler.dump_stats(_path(identity, "pstats"))
    with open(_path(identity, "log"), "w") as f:
        pstats.Stats(profiler, stream=f).sort_stats("cumulative").print_stats()


def _profile_this_thread(identity: str) -> cProfile.Profile | None:
    """Start profiling the calling thread, once per (process, identity)."""
    with _lock:
        key = (os.getpid(), identity)
        if key in _started:
            return None
        _started.add(key)
    profiler = cProfile.Profile()
    profiler.enable()
    return profiler


def start(broker: mitogen.core.Broker | None = None, this_thread: bool = True) -> None:
    """Profile the calling thread (unless not `this_thread`) until the interpreter exits
    and, if given, `broker`'s thread until it exits (on Python 3.12+: the whole process
    until it exits)."""
    if PROCESS_WIDE:
        profiler = _profile_this_thread("all")
        if profiler is not None:
            atexit.register(_write, profiler, "all")
        return
    if this_thread:
        profiler = _profile_this_thread(threading.current_thread().name)
        if profiler is not None:
            atexit.register(_write, profiler, threading.current_thread().name)
    if broker is not None:
        broker.defer(_profile_broker, broker)


def _profile_broker(broker: mitogen.core.Broker) -> None:
    """On the broker thread: profile it, and write the profile as it exits."""
    identity = threading.current_thread().name
    profiler = _profile_this_thread(identity)
    if profiler is not None:
        mitogen.core.listen(broker, "exit", lambda: _write(profiler, identity))


@mitogen.core.takes_econtext
def start_in_child(econtext: Any = None) -> None:
    """Called by the parent as a profiled child's first call (see parent.Connection)."""
    start(econtext.broker)
