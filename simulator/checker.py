"""The invariants a fault campaign holds the tree to, checked over a recorded history.

Pure: :func:`check` reads the events of one run (:mod:`simulator.history`) and returns the
violations, each naming its invariant, when it happened and where. Nothing here looks at the
clock or the processes, so a history read back from its JSONL file is checked exactly as the
run checked it, and tests can hand-write histories that break each rule.

=============  ==============================================================================
invariant      holds when
=============  ==============================================================================
``bounded``    every op ends (returns or fails) within the stated bound after its path
               breaks (:meth:`Bounds.for_fault`; a host found down: ``immediate``), and
               within ``healthy`` when its path stays whole: no op hangs
``isolation``  an op whose path saw no break succeeds, and no context is lost without a
               fault on its path: a fault never reaches beyond the subtree it hits
``delivery``   every answer and every channel message reached the context it was meant for,
               from the context that sent it, once
``recovery``   after the final heal every fault is healed and every host and account
               answers every op type (a call, a hold, a bulk and a nested call, an
               import, a channel to another context)
``del_route``  the master learns of every lost context (a DEL_ROUTE, or the loss of a stream
               it holds) within the bound, and so does every ancestor that outlived it
``leftovers``  after shutdown no process of the tree is left
=============  ==============================================================================

A path "breaks" when a fault that breaks links (not latency or bandwidth) acts on one of its
hosts or edges, or when one of its hosts is down (between the master seeing it go and its
restart). With several breaks during one op, the op may end by the latest of their bounds.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple

from simulator.history import (
    Bounds,
    ContextRecord,
    campaign_meta,
    contexts_of,
    ops_of,
)

__all__ = ["INVARIANTS", "Violation", "check", "summarise_run"]

INVARIANTS = ("bounded", "isolation", "delivery", "recovery", "del_route", "leftovers")


@dataclasses.dataclass(frozen=True)
class Violation:
    """One broken invariant: what, when (monotonic time), and where (a host id, or None
    for the master or the whole tree)."""

    invariant: str
    message: str
    time: float
    host: Optional[str] = None

    def as_event(self) -> Dict[str, Any]:
        return {"kind": "violation", "invariant": self.invariant, "message": self.message,
                "time": self.time, "host": self.host}


@dataclasses.dataclass(frozen=True)
class _Window:
    """A period during which a host's subtree is broken off (a fault, or the host down)."""

    host: str
    start: float
    end: float
    bound: float
    what: str


def check(events: Sequence[Mapping[str, Any]]) -> List[Violation]:
    """Every violation in one run's history, earliest first."""
    return _Run(events).violations()


class _Run:
    """One history, indexed once for the invariants below."""

    def __init__(self, events: Sequence[Mapping[str, Any]]) -> None:
        self.events = sorted(events, key=lambda e: e["time"])
        self.end = self.events[-1]["time"] if self.events else 0.0
        begin = campaign_meta(self.events, "begin") or {}
        self.bounds = Bounds(**begin.get("bounds", {}))
        self.expected: List[Mapping[str, Any]] = list(begin.get("contexts", ()))
        self.contexts = contexts_of(self.events)
        self.master_saw = self._master_del_routes()
        self.unhealed: List[Tuple[Any, Mapping[str, Any], float]] = []
        self.faults = self._fault_windows()
        self.windows = [w for w in self.faults if w.bound >= 0] + self._down_windows()
        self.out: List[Violation] = []

    # -- indexing ----------------------------------------------------------------------------

    def _master_del_routes(self) -> Dict[int, float]:
        """When the master forgot each context, while the tree ran (the shutdown that
        follows the collection makes it forget everything)."""
        collect = campaign_meta(self.events, "collect")
        until = collect["time"] if collect is not None else self.end
        seen: Dict[int, float] = {}
        for event in self.events:
            if event.get("kind") == "del_route" and event.get("host") is None \
                    and event["time"] <= until:
                seen.setdefault(int(event["lost"]), event["time"])
        return seen

    def _fault_windows(self) -> List[_Window]:
        """Every fault from its begin to its heal; a breaking one has a bound >= 0, one that
        only slows a link has -1. A fault never healed lasts to the end of the history."""
        begun: Dict[Any, Tuple[float, Mapping[str, Any]]] = {}
        ended: Dict[Any, float] = {}
        for event in self.events:
            if event.get("kind") != "fault" or event.get("fid") is None:
                continue
            action, fid = event.get("action"), event["fid"]
            if action == "begin":
                begun[fid] = (event["time"], event["fault"])
            elif action in ("heal", "apply_failed") and fid not in ended:
                ended[fid] = event["time"]
        windows = []
        for fid, (start, fault) in begun.items():
            params = {k: v for k, v in fault.items() if k not in ("fault", "host")}
            bound = self.bounds.for_fault(fault["fault"], params)
            end = ended.get(fid)
            if end is None:
                self.unhealed.append((fid, fault, start))
                end = self.end
            windows.append(_Window(fault["host"], start, end, -1.0 if bound is None else bound,
                                   f"{fault['fault']} of {fault['host']}"))
        return windows

    def _down_windows(self) -> List[_Window]:
        """Each host from the master seeing its context go until the host runs again."""
        windows = []
        by_host: Dict[str, List[ContextRecord]] = {}
        for record in self.contexts.values():
            if record.account is None:
                by_host.setdefault(record.host, []).append(record)
        for host, records in by_host.items():
            records.sort(key=lambda r: r.started)
            for index, record in enumerate(records):
                gone = self.master_saw.get(record.context_id)
                if gone is None:
                    continue
                later = [r.started for r in records[index + 1:] if r.started >= gone]
                end = later[0] if later else self.end
                windows.append(_Window(host, gone, end, self.bounds.immediate,
                                       f"{host} down"))
        return windows

    def _breaks(self, path: Iterable[str], start: float, end: float) -> List[_Window]:
        hosts = set(path)
        return [w for w in self.windows if w.host in hosts and w.start < end and w.end > start]

    # -- invariants --------------------------------------------------------------------------

    def violations(self) -> List[Violation]:
        self._check_ops()
        self._check_deliveries()
        self._check_recovery()
        self._check_del_routes()
        self._check_leftovers()
        return sorted(self.out, key=lambda v: v.time)

    def _flag(self, invariant: str, message: str, time: float,
              host: Optional[str] = None) -> None:
        self.out.append(Violation(invariant, message, time, host))

    def _check_ops(self) -> None:
        for _op, (start, end) in sorted(ops_of(self.events).items()):
            began = start["time"]
            finished = end["time"] if end is not None else self.end
            outcome = end["outcome"] if end is not None else "timeout"
            breaks = self._breaks(start["path"], began, finished)
            name = _op_name(start)
            host = start["dst"]["host"]
            # A call made by a context of the tree counts from when that context began it.
            ran = end.get("ran") if end is not None else None
            deadline, why = self._deadline(began if ran is None else max(began, ran), breaks,
                                           outcome)
            if ran is not None and ran > began:
                why += f"; the context that made the call began it at +{ran - began:.1f} s"
            if outcome == "timeout" or end is None:
                if deadline < finished:
                    self._flag("bounded", f"{name} hung: still pending "
                               f"{finished - began:.1f} s after it started; it had to end by "
                               f"{deadline - began:.1f} s ({why})", deadline, host)
            elif finished > deadline:
                self._flag("bounded", f"{name} ended ({outcome}) {finished - began:.1f} s "
                           f"after it started; it had to end by {deadline - began:.1f} s "
                           f"({why})", deadline, host)
            if outcome == "error" and not breaks and start.get("phase") != "final":
                self._flag("isolation", f"{name} failed ({outcome}: {end and end.get('error')})"
                           f" although no fault touched its path "
                           f"{' > '.join(start['path'])}", finished, host)
            at = end.get("at") if end is not None else None
            if at is not None and at != start["dst"]["context_id"]:
                self._flag("delivery", f"{name} was answered by context {at}, not by its "
                           f"destination {start['dst']['context_id']}", finished, host)
            if outcome == "ok" and end is not None and end.get("error"):
                self._flag("delivery", f"{name} got the answer of another op: "
                           f"{end['error']}", finished, host)

    def _deadline(self, began: float, breaks: Sequence[_Window],
                  outcome: str) -> Tuple[float, str]:
        """By when an op that began at ``began`` must have ended, and why: a failure within
        the bound of a break on its path; a success (the break healed before it was found)
        within ``healthy`` of the path being whole again."""
        healthy = began + self.bounds.healthy
        if not breaks:
            return healthy, f"its path stayed whole: {self.bounds.healthy:g} s"
        first = min(max(began, w.start) for w in breaks)
        if first > healthy:
            return healthy, f"its path stayed whole for {self.bounds.healthy:g} s"
        latest = max(breaks, key=lambda w: max(began, w.start) + w.bound)
        deadline = max(began, latest.start) + latest.bound
        why = (f"{latest.what} at +{max(began, latest.start) - began:.1f} s, bound "
               f"{latest.bound:g} s")
        whole = max(w.end for w in breaks) + self.bounds.healthy
        if outcome != "error" and whole > deadline:
            deadline = whole
            why = (f"its path whole again at +{whole - self.bounds.healthy - began:.1f} s, "
                   f"then {self.bounds.healthy:g} s")
        return deadline, why

    def _check_deliveries(self) -> None:
        ops = ops_of(self.events)
        self._check_channels(ops)
        seen: Set[Tuple[Any, Any]] = set()
        wrong: Dict[Tuple[Any, Any], List[Any]] = {}  # (op, where it arrived) -> tags
        for event in self.events:
            if event.get("kind") != "deliver":
                continue
            op, tag = event.get("op"), event.get("tag")
            start = ops[op][0] if op in ops else None
            if start is None or "to" not in start:
                self._flag("delivery", f"a channel message for op {op!r}, which sent none, "
                           f"arrived at context {event.get('at')}", event["time"])
                continue
            host = start["to"]["host"]
            if (op, tag) in seen:
                self._flag("delivery", f"{_op_name(start)}: message {tag} arrived twice",
                           event["time"], host)
            seen.add((op, tag))
            wanted, source = start["to"]["context_id"], start["dst"]["context_id"]
            if event.get("to") != wanted or event.get("at") != wanted:
                if (op, event.get("at")) not in wrong:
                    self._flag("delivery", f"{_op_name(start)}: messages meant for context "
                               f"{wanted} reached context {event.get('at')}", event["time"],
                               host)
                wrong.setdefault((op, event.get("at")), []).append(tag)
            elif event.get("came_from") not in (None, wanted):
                self._flag("delivery", f"{_op_name(start)}: message {tag} was acknowledged "
                           f"as from context {wanted} by context {event.get('came_from')}",
                           event["time"], host)
            if event.get("src") != source:
                self._flag("delivery", f"{_op_name(start)}: message {tag} claims to come "
                           f"from context {event.get('src')}, not {source}", event["time"],
                           host)

    def _check_channels(self, ops: Mapping[int, Tuple[Mapping[str, Any],
                                                      Optional[Mapping[str, Any]]]]) -> None:
        """Messages of a channel op that was sent may be lost only across a break."""
        delivered: Dict[Any, Set[Any]] = {}
        for event in self.events:
            if event.get("kind") == "deliver":
                delivered.setdefault(event.get("op"), set()).add(event.get("tag"))
        for event in self.events:
            if event.get("kind") != "channel":
                continue
            start, end = ops.get(event["op"], (None, None))
            if start is None or end is None or end.get("outcome") != "ok":
                continue
            missing = sorted(set(range(event["count"])) - delivered.get(event["op"], set()))
            if not missing:
                continue
            window_end = min(end["time"] + self.bounds.healthy, self.end)
            if not self._breaks(event["path"], start["time"], window_end):
                self._flag("isolation", f"{_op_name(start)}: messages {missing} were sent "
                           f"but never arrived, and no fault touched "
                           f"{' > '.join(event['path'])}", end["time"], start["dst"]["host"])

    def _check_recovery(self) -> None:
        for fid, fault, started in self.unhealed:
            self._flag("recovery", f"fault {fid} ({fault['fault']} of {fault['host']}) was "
                       f"never healed", started, fault["host"])
        answered: Set[Tuple[str, Optional[str]]] = set()
        for start, end in ops_of(self.events).values():
            if start.get("phase") != "final":
                continue
            where = (start["dst"]["host"], start["dst"].get("account"))
            outcome = end["outcome"] if end is not None else "timeout"
            if outcome == "ok":
                answered.add(where)
            else:
                self._flag("recovery", f"after the final heal, {_op_name(start)} failed "
                           f"({outcome}: {end and end.get('error')})",
                           end["time"] if end is not None else self.end, where[0])
        for context in self.expected:
            where = (context["host"], context.get("account"))
            if where not in answered:
                self._flag("recovery", f"after the final heal, {_where(*where)} never "
                           f"answered", self.end, where[0])

    def _check_del_routes(self) -> None:
        collect = campaign_meta(self.events, "collect")
        if collect is None:
            return
        current = {int(c["context_id"]) for c in collect.get("current", ())}
        lost_ids = set(collect["dead"]) if "dead" in collect else set(self.contexts) - current
        probed = {int(e["context_id"]): e["time"] for e in self.events
                  if e.get("kind") == "probe" and not e.get("error")}
        learned: Set[Tuple[str, int]] = {
            (e["host"], int(e["lost"])) for e in self.events
            if e.get("kind") == "del_route" and e.get("host") is not None
            and e.get("account") is None}
        host_context = {(c["host"]): int(c["context_id"]) for c in collect.get("current", ())
                        if c.get("account") is None}
        for lost in sorted(lost_ids & set(self.contexts)):
            record = self.contexts[lost]
            path = _path_of(record.host)
            name = _where(record.host, record.account)
            causes = [w for w in self.faults if w.bound >= 0 and w.host in path
                      and w.start < self.master_saw.get(lost, self.end)
                      and w.end > record.started]
            seen = self.master_saw.get(lost)
            if not causes:
                self._flag("isolation", f"context {lost} ({name}) was lost with no fault "
                           f"on its path", seen if seen is not None else self.end, record.host)
                continue
            first = min(w.start for w in causes)
            if seen is None:
                self._flag("del_route", f"the master never learned that context {lost} "
                           f"({name}) was lost (first fault on its path: "
                           f"{causes[0].what})", first, record.host)
                continue
            deadline = max(w.start + w.bound for w in causes)
            if seen > deadline:
                self._flag("del_route", f"the master learned that context {lost} ({name}) "
                           f"was lost {seen - first:.1f} s after the first fault on its path; "
                           f"bound {deadline - first:.1f} s", seen, record.host)
            ancestors = path[:-1] if record.account is None else path
            for host in ancestors:
                keeper = host_context.get(host)
                if keeper is None or keeper in lost_ids or probed.get(keeper, self.end) >= first:
                    continue  # restarted since, or not watched yet when the fault began
                if (host, lost) not in learned:
                    self._flag("del_route", f"DEL_ROUTE for context {lost} ({name}) never "
                               f"reached {host}, which outlived it", first, host)

    def _check_leftovers(self) -> None:
        for event in self.events:
            if event.get("kind") == "leftover":
                self._flag("leftovers", f"pid {event['pid']} still runs after shutdown: "
                           f"{event.get('command', '')[:120]}", event["time"])
            elif event.get("kind") == "shutdown" and event.get("leftovers"):
                self._flag("leftovers", f"processes of the tree still ran "
                           f"{self.bounds.shutdown:g} s after shutdown: {event['leftovers']}",
                           event["time"])


def _path_of(host: str) -> List[str]:
    """The hosts from the root down to ``host`` (ids are paths: ``a/b/c``)."""
    parts = host.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _where(host: str, account: Optional[str]) -> str:
    return host if account is None else f"{host} as {account}"


def _op_name(start: Mapping[str, Any]) -> str:
    dst = start["dst"]
    to = start.get("to")
    if to is not None:
        return (f"op {start['op']} (channel from {_where(dst['host'], dst.get('account'))} "
                f"to {_where(to['host'], to.get('account'))})")
    return f"op {start['op']} ({start['type']} to {_where(dst['host'], dst.get('account'))})"


def summarise_run(events: Sequence[Mapping[str, Any]]) -> Dict[str, Any]:
    """Counts for a run's one-line summary: ops by outcome, faults applied, contexts lost."""
    outcomes: Dict[str, int] = {}
    for _start, end in ops_of(events).values():
        outcome = end["outcome"] if end is not None else "timeout"
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    applied = sum(1 for e in events if e.get("kind") == "fault" and e.get("action") == "apply")
    collect = campaign_meta(events, "collect") or {}
    lost = len(collect.get("dead", ()))
    return {"ops": outcomes, "faults_applied": applied, "contexts_lost": lost,
            "deliveries": sum(1 for e in events if e.get("kind") == "deliver")}
