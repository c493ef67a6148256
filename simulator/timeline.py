"""The run's timeline: every fault, route change, disconnect and shutdown step, as JSONL.

One event per line, each with a ``time`` from ``time.monotonic()`` (comparable across the
processes of one machine on Linux) and a ``kind``. Events are written as they happen, so a
timeline survives a crashed or killed run up to its last line, and kept in memory so the
report and failing tests can show them without reading the file back.

Kinds used by the simulator:

``build``       a host or account context is up (``host``, ``context_id``, ``pid``, ``seconds``)
``fault``       a fault was applied or healed (``action``, ``fault`` parameters, ``error``)
``route``       the master gained or lost a route (``action`` add|del, ``host``, ``context_id``)
``disconnect``  the master saw a context's ``disconnect`` (``host``, ``context_id``)
``del_route``   a context learned of a lost context (``host`` seeing, ``lost``, ``hop``)
``keepalive``   the keepalive emulation gave up on an edge (``host``, ``silent_for``)
``call``        a measured call (``path``, ``seconds``)
``shutdown``    a shutdown step (``step``, ``host``...)
``test``        a test began or ended (``nodeid``, ``action``, ``outcome``)
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import IO, Any, Callable, Dict, Iterable, List, Optional

__all__ = ["Timeline", "load_timeline"]


class Timeline:
    """A thread-safe, append-only list of events mirrored to a JSONL file.

    Callbacks on a broker thread record into it, so :meth:`record` never blocks on anything
    but a short lock and one buffered write.
    """

    def __init__(self, path: Optional[str] = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self._clock = clock
        self._lock = threading.Lock()
        self._events: List[Dict[str, Any]] = []
        self._file: Optional[IO[str]] = None
        if path is not None:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self._file = open(path, "w", encoding="utf-8")
        self.started = clock()

    def record(self, kind: str, **fields: Any) -> Dict[str, Any]:
        """Append one event stamped now; ``time`` in ``fields`` overrides the stamp."""
        event = {"time": fields.pop("time", None) or self._clock(), "kind": kind, **fields}
        line = json.dumps(event, default=str, sort_keys=True)
        with self._lock:
            self._events.append(event)
            if self._file is not None:
                self._file.write(line + "\n")
                self._file.flush()
        return event

    def events(self, since: Optional[float] = None,
               kinds: Optional[Iterable[str]] = None) -> List[Dict[str, Any]]:
        """A copy of the events, optionally only those at or after ``since`` and of ``kinds``."""
        wanted = None if kinds is None else set(kinds)
        with self._lock:
            return [dict(e) for e in self._events
                    if (since is None or e["time"] >= since)
                    and (wanted is None or e["kind"] in wanted)]

    def format(self, since: Optional[float] = None) -> str:
        """Events as text lines, times relative to the start of the timeline."""
        lines = []
        for event in self.events(since):
            rest = {k: v for k, v in event.items() if k not in ("time", "kind")}
            text = " ".join(f"{k}={v}" for k, v in sorted(rest.items()))
            lines.append(f"{event['time'] - self.started:9.3f}s {event['kind']:<10} {text}")
        return "\n".join(lines)

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    def __enter__(self) -> Timeline:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def load_timeline(path: str) -> List[Dict[str, Any]]:
    """Read a JSONL timeline back; a torn last line (killed run) is ignored."""
    events = []
    with open(path, encoding="utf-8") as stream:
        for line in stream:
            try:
                events.append(json.loads(line))
            except ValueError:
                break
    return events
