"""The recorded history of one fault-campaign run, as plain events (JSONL), and its reading.

A campaign run (:mod:`simulator.campaign`) writes every event into a
:class:`~simulator.timeline.Timeline`, so one file holds what the backend recorded (contexts
started, disconnects the master saw, keepalive give-ups, the shutdown) and what the campaign
recorded on top. The checker (:mod:`simulator.checker`) reads nothing else: a history written
by a run, or loaded back from its file, is checked the same way.

Events the campaign adds, each with ``time`` (``time.monotonic()``, the clock every process
of this machine shares) and ``kind``:

=============  ===============================================================================
``campaign``   ``action=begin``: seed, run, topology, ``bounds`` (:class:`Bounds`), ``steps``
               (the fault schedule), ``contexts`` expected; ``action=collect``: ``current``,
               the context id of every host and account once everything is healed, and
               ``dead``: the ids of the contexts whose process has ended (the lost ones)
``op``         ``action=start``: ``op`` (id), ``type`` (:data:`OP_TYPES`),
               ``phase`` (``load`` during faults, ``final`` after the last heal), ``dst``:
               the context the call goes to, ``{host, account, context_id}`` (for a
               channel, the sender; ``to`` is the receiver; for a nested call, the context
               called from inside the tree), ``path``: the hosts the call crosses, root
               first. ``action=end``: ``outcome`` (``ok``; ``error``: failed
               with an exception; ``timeout``: abandoned by the workload), ``error``,
               ``at`` (the context id that answered); an ``ok`` op with an ``error`` got
               the answer of another op
``channel``    the messages of a channel op: ``op``, ``count``, ``path`` (every host between
               sender, receiver and master)
``deliver``    one channel message reached a sink: ``op``, ``tag``, ``to`` (the id it was
               meant for), ``at`` (the context it reached), ``src`` (the id it came from),
               ``came_from`` (the source the master's router verified for the ack)
``fault``      ``action``: begin, apply, apply_failed, heal, heal_failed, heal_all,
               heal_all_failed; ``fid``, ``fault`` (``{fault: kind, host: target, ...params}``)
``del_route``  a context forgot a lost one: ``host``/``account`` of the context that learned
               it (``host: null`` is the master), ``lost`` (context id)
``probe``      the campaign's probes are installed in a context (``host``, ``account``,
               ``context_id``; ``error`` if they could not be); before that, the context's
               route log is not complete
``leftover``   after shutdown: a process of the tree still running (``pid``, ``command``)
``violation``  written by the checker when a run is reported: ``invariant``, ``message``
=============  ===============================================================================
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from simulator.timeline import Timeline, load_timeline

__all__ = [
    "OP_OUTCOMES",
    "OP_TYPES",
    "Bounds",
    "ContextRecord",
    "History",
    "campaign_meta",
    "contexts_of",
    "load_history",
    "ops_of",
]

OP_TYPES = ("call", "hold", "bulk", "nested", "import", "channel")
OP_OUTCOMES = ("ok", "error", "timeout")


@dataclasses.dataclass(frozen=True)
class Bounds:
    """The bounds a run is checked against, in seconds; stated once, in the history.

    ``immediate``: a break the tree sees at once (a crash, a reset stream) fails every op in
    flight across it within this. ``silent``: a break nothing reports (a paused host, a link
    that drops everything) is found by the keepalives within
    ``keepalive_interval * (keepalive_count + 1)``, plus a second. A graceful stop adds its
    ``grace``. ``healthy``: an op whose path stays whole ends within this. ``shutdown``:
    every process of the tree has ended this long after the master shut down.
    """

    immediate: float = 2.0
    silent: float = 9.0
    healthy: float = 10.0
    shutdown: float = 5.0

    @classmethod
    def for_keepalive(cls, interval: float, count: int, **overrides: float) -> Bounds:
        return cls(silent=interval * (count + 1) + 1.0, **overrides)

    def for_fault(self, kind: str, params: Mapping[str, Any]) -> Optional[float]:
        """How long after ``kind`` begins every op across it must have ended; None for a
        fault that slows a link without breaking it (latency, bandwidth)."""
        if kind in ("latency", "bandwidth", "sshd_down"):
            return None
        if kind in ("stop", "restart"):
            return float(params.get("grace", 10.0)) + self.immediate
        if kind == "kill":
            return self.immediate
        if kind == "partition":
            return self.silent if params.get("mode", "drop") == "drop" else self.immediate
        if kind == "stream":
            plain_reset = params.get("kind", "reset") == "reset" and not params.get("nbytes")
            return self.immediate if plain_reset else self.silent
        return self.silent  # pause, loss, signal, power_off: nothing tells the tree at once

    def as_dict(self) -> Dict[str, float]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class ContextRecord:
    """One context the backend started: which host (and account) it served, and when."""

    context_id: int
    host: str
    account: Optional[str]
    started: float


class History:
    """Writes a run's events into a timeline; thread-safe (the timeline is)."""

    def __init__(self, timeline: Timeline) -> None:
        self.timeline = timeline

    def record(self, kind: str, **fields: Any) -> Dict[str, Any]:
        return self.timeline.record(kind, **fields)

    def events(self) -> List[Dict[str, Any]]:
        return self.timeline.events()

    def op_start(self, op: int, op_type: str, phase: str, dst: Mapping[str, Any],
                 path: Sequence[str], to: Optional[Mapping[str, Any]] = None) -> None:
        fields: Dict[str, Any] = {"action": "start", "op": op, "type": op_type,
                                  "phase": phase, "dst": dict(dst), "path": list(path),
                                  "host": dst["host"], "account": dst.get("account")}
        if to is not None:
            fields["to"] = dict(to)
        self.record("op", **fields)

    def op_end(self, op: int, outcome: str, at: Optional[int] = None,
               error: Optional[str] = None, host: Optional[str] = None,
               account: Optional[str] = None, time: Optional[float] = None,
               ran: Optional[float] = None) -> None:
        """``time``: when the answer arrived, if that was before this is recorded; ``ran``:
        for a call made by a context of the tree, when that context began it."""
        extra = {} if ran is None else {"ran": ran}
        self.record("op", action="end", op=op, outcome=outcome, at=at, error=error,
                    host=host, account=account, time=time, **extra)


def load_history(path: str) -> List[Dict[str, Any]]:
    """A run's events read back from its JSONL file."""
    return load_timeline(path)


# --------------------------------------------------------------------------------------------
# Reading a history (shared by the checker and the report)
# --------------------------------------------------------------------------------------------


def contexts_of(events: Iterable[Mapping[str, Any]]) -> Dict[int, ContextRecord]:
    """Every context the backend started, by id, from its ``build`` events."""
    found: Dict[int, ContextRecord] = {}
    for event in events:
        if event.get("kind") != "build" or event.get("context_id") is None:
            continue
        context_id = int(event["context_id"])
        found.setdefault(context_id, ContextRecord(context_id, event["host"],
                                                   event.get("account"), event["time"]))
    return found


def campaign_meta(events: Iterable[Mapping[str, Any]], action: str
                  ) -> Optional[Mapping[str, Any]]:
    """The first ``campaign`` event with this ``action`` (begin, collect, end), if any."""
    for event in events:
        if event.get("kind") == "campaign" and event.get("action") == action:
            return event
    return None


def ops_of(events: Iterable[Mapping[str, Any]]
           ) -> Dict[int, Tuple[Mapping[str, Any], Optional[Mapping[str, Any]]]]:
    """op id -> (its start event, its end event or None)."""
    ops: Dict[int, Tuple[Mapping[str, Any], Optional[Mapping[str, Any]]]] = {}
    for event in events:
        if event.get("kind") != "op":
            continue
        if event.get("action") == "start":
            ops[event["op"]] = (event, None)
        elif event.get("action") == "end" and event["op"] in ops:
            ops[event["op"]] = (ops[event["op"]][0], event)
    return ops
