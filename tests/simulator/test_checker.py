"""The campaign checker over hand-written histories: each invariant holds on a clean run and
is reported, with its place and time, when a history breaks it."""

from __future__ import annotations

import itertools
from typing import Any, Dict, List, Optional

import pytest

from simulator.checker import check, summarise_run
from simulator.history import Bounds, History, load_history
from simulator.timeline import Timeline

BOUNDS = Bounds(immediate=2.0, silent=9.0, healthy=10.0, shutdown=5.0)
#: A small tree: top > mid > leaf, and an account on mid.
HOSTS = ("top", "top/mid", "top/mid/leaf")
IDS = {("top", None): 1, ("top/mid", None): 2, ("top/mid", "app"): 3, ("top/mid/leaf", None): 4}


class Story:
    """Builds a history event by event, at explicit times."""

    def __init__(self) -> None:
        self.events: List[Dict[str, Any]] = []
        self.ops = itertools.count(1)
        self.add(0.001, "campaign", action="begin", bounds=BOUNDS.as_dict(),
                 contexts=[{"host": h, "account": a} for h, a in IDS])
        for (host, account), context_id in IDS.items():
            self.add(0.1, "build", host=host, account=account, context_id=context_id, pid=100)
            self.add(0.2, "probe", host=host, account=account, context_id=context_id)

    def add(self, time: float, kind: str, **fields: Any) -> Dict[str, Any]:
        event = {"time": time, "kind": kind, **fields}
        self.events.append(event)
        return event

    def op(self, start: float, end: Optional[float], host: str, account: Optional[str] = None,
           outcome: str = "ok", kind: str = "call", at: Optional[int] = None,
           phase: str = "load", error: Optional[str] = None) -> int:
        op = next(self.ops)
        path = [h for h in HOSTS if host == h or host.startswith(h + "/")]
        dst = {"host": host, "account": account, "context_id": IDS[(host, account)]}
        self.add(start, "op", action="start", op=op, type=kind, phase=phase, dst=dst,
                 path=path, host=host, account=account)
        if end is not None:
            answered = (dst["context_id"] if at is None else at) if outcome == "ok" else None
            self.add(end, "op", action="end", op=op, outcome=outcome, at=answered,
                     error=error, host=host, account=account)
        return op

    def fault(self, fid: int, begin: float, heal: Optional[float], fault_kind: str,
              host: str, **params: Any) -> None:
        fault = {"fault": fault_kind, "host": host, **params}
        self.add(begin, "fault", action="begin", fid=fid, host=host, fault=fault)
        self.add(begin + 0.01, "fault", action="apply", fid=fid, host=host, fault=fault)
        if heal is not None:
            self.add(heal, "fault", action="heal", fid=fid, host=host, fault=fault)

    def lose(self, context_id: int, time: float, host: str, seen_by: List[str],
             account: Optional[str] = None, restarted: Optional[int] = None) -> None:
        """``context_id`` dies; ``seen_by`` hosts (and the master) log its loss at ``time``;
        the host comes back as ``restarted`` a second later."""
        for seer in seen_by:
            self.add(time, "del_route", host=seer, account=None, lost=context_id)
        self.add(time, "del_route", host=None, lost=context_id)
        if restarted is not None:
            self.add(time + 1.0, "build", host=host, account=account, context_id=restarted,
                     pid=200)
            self.add(time + 1.1, "probe", host=host, account=account, context_id=restarted)

    def finish(self, at: float = 40.0, dead: tuple = (), replaced: Optional[Dict] = None,
               final: bool = True) -> List[Dict[str, Any]]:
        current = dict(IDS)
        current.update(replaced or {})
        if final:
            for host, account in IDS:
                self.op(at - 2.0, at - 1.9, host, account, phase="final")
        self.add(at, "campaign", action="collect", dead=list(dead),
                 current=[{"host": h, "account": a, "context_id": c}
                          for (h, a), c in current.items()])
        self.add(at + 1.0, "shutdown", step="tree_gone", leftovers=[])
        return self.events


def invariants(events: List[Dict[str, Any]]) -> List[str]:
    return [v.invariant for v in check(events)]


def test_a_clean_history_holds_every_invariant():
    story = Story()
    story.op(1.0, 1.01, "top/mid/leaf")
    story.op(1.0, 1.5, "top/mid", "app", kind="hold")
    story.op(2.0, 2.2, "top", kind="import")
    assert check(story.finish()) == []


def test_an_op_that_never_ends_on_a_whole_path_hangs():
    story = Story()
    story.op(1.0, None, "top/mid/leaf")
    found = check(story.finish())
    assert [v.invariant for v in found] == ["bounded"]
    assert "hung" in found[0].message and "path stayed whole" in found[0].message
    assert found[0].host == "top/mid/leaf"
    assert found[0].time == pytest.approx(11.0)  # when it should have ended


def test_an_op_across_a_crash_must_fail_within_the_immediate_bound():
    story = Story()
    story.fault(0, 5.0, 7.0, "kill", "top/mid")
    story.op(4.0, 6.5, "top/mid/leaf", outcome="error")  # 1.5 s after the kill: fine
    story.op(4.0, 7.5, "top/mid/leaf", outcome="error")  # 2.2 s after the master saw it
    story.lose(2, 5.2, "top/mid", ["top"], restarted=12)
    story.lose(3, 5.2, "top/mid", ["top"], account="app", restarted=13)
    story.lose(4, 5.3, "top/mid/leaf", ["top", "top/mid"], restarted=14)
    found = check(story.finish(dead=(2, 3, 4), replaced={
        ("top/mid", None): 12, ("top/mid", "app"): 13, ("top/mid/leaf", None): 14}))
    assert [v.invariant for v in found] == ["bounded"]
    # The latest break on its path: the leaf seen down at 5.3 s, which must fail it at once.
    assert "ended (error) 3.5 s after it started; it had to end by 3.3 s" in found[0].message
    assert "top/mid/leaf down at +1.3 s, bound 2 s" in found[0].message


def test_a_call_made_inside_the_tree_is_bounded_from_when_its_caller_began_it():
    """A nested op (mid calls leaf) sent while leaf is down: mid's main thread was busy (it
    was starting a child) for 1.5 s; the call failed 0.9 s after mid began it. A second one
    took 2.5 s after mid began it: too late."""
    story = Story()
    story.fault(0, 5.0, 9.0, "kill", "top/mid/leaf")
    story.lose(4, 5.1, "top/mid/leaf", ["top", "top/mid"], restarted=14)
    fine = story.op(6.0, None, "top/mid/leaf", kind="nested")
    late = story.op(6.0, None, "top/mid/leaf", kind="nested")
    for op, ran, end in ((fine, 7.5, 8.4), (late, 6.5, 9.0)):
        story.add(end, "op", action="end", op=op, outcome="error", at=None, ran=ran,
                  error="ChannelError: no route to context 4", host="top/mid/leaf",
                  account=None)
    found = check(story.finish(dead=(4,), replaced={("top/mid/leaf", None): 14}))
    assert [v.invariant for v in found] == ["bounded"]
    assert f"op {late} (nested" in found[0].message
    assert "began it at +0.5 s" in found[0].message
    assert found[0].time == pytest.approx(8.5)


def test_a_silent_partition_gives_ops_the_keepalive_bound():
    story = Story()
    story.fault(0, 2.0, 20.0, "partition", "top/mid", mode="drop", direction="both")
    story.op(1.0, 10.5, "top/mid", outcome="error")  # 8.5 s after the cut: within 9 s
    story.op(3.0, 11.5, "top/mid/leaf", outcome="error")  # began while cut: 8.5 s
    story.op(1.0, 12.0, "top/mid", outcome="error")  # 10 s after the cut: too late
    found = check(story.finish(final=False))
    assert [v.invariant for v in found] == ["bounded"] + ["recovery"] * 4  # no final sweep


def test_an_op_that_succeeds_once_the_break_is_healed_has_the_healthy_bound_from_then():
    story = Story()
    story.fault(0, 2.0, 6.0, "pause", "top/mid")  # healed before the keepalives found it
    story.op(1.0, 6.5, "top/mid", kind="hold")  # waited out the pause, then answered: fine
    story.op(3.0, 15.0, "top/mid")  # answered 9 s after the path was whole: fine
    story.op(3.0, 16.5, "top/mid")  # 10.5 s after: too late
    found = check(story.finish())
    assert [v.invariant for v in found] == ["bounded"]
    assert "its path whole again at +3.0 s, then 10 s" in found[0].message


def test_overlapping_breaks_allow_the_latest_bound():
    story = Story()
    story.fault(0, 2.0, 20.0, "partition", "top/mid", mode="drop")
    story.fault(1, 3.0, 20.0, "kill", "top/mid/leaf")
    # The kill's news cannot climb the cut edge; the cut is found 9 s after it began.
    story.op(1.0, 10.8, "top/mid/leaf", outcome="error")
    assert "bounded" not in invariants(story.finish())


def test_a_graceful_stop_adds_its_grace():
    story = Story()
    story.fault(0, 2.0, 8.0, "stop", "top/mid/leaf", grace=1.5)
    story.op(1.0, 5.4, "top/mid/leaf", outcome="error")  # 3.4 s <= 1.5 + 2
    story.op(1.0, 5.6, "top/mid/leaf", outcome="error")  # 3.6 s > 3.5
    assert invariants(story.finish()) == ["bounded"]


@pytest.mark.parametrize("fault, host", [
    (None, None),
    ("kill", "top/mid/leaf"),  # a sibling subtree of the op's target
    ("latency", "top/mid"),  # on the path, but latency never breaks a call
])
def test_an_op_that_fails_without_a_break_on_its_path_breaks_isolation(fault, host):
    story = Story()
    if fault is not None:
        story.fault(0, 1.0, 5.0, fault, host, **({"delay": 0.1} if fault == "latency" else {}))
    story.op(2.0, 2.1, "top/mid", "app", outcome="error", error="ChannelError: boom")
    found = check(story.finish())
    assert [v.invariant for v in found] == ["isolation"]
    assert "boom" in found[0].message and "top > top/mid" in found[0].message


def test_a_host_found_down_is_a_break_until_it_runs_again():
    story = Story()
    story.fault(0, 1.0, 2.0, "pause", "top/mid/leaf")
    story.lose(4, 1.8, "top/mid/leaf", ["top", "top/mid"])  # keepalive gave up on it
    story.op(5.0, 5.1, "top/mid/leaf", outcome="error")  # after the heal, still down: fine
    story.add(30.0, "build", host="top/mid/leaf", account=None, context_id=14, pid=3)
    story.add(30.1, "probe", host="top/mid/leaf", account=None, context_id=14)
    story.op(31.0, 31.1, "top/mid/leaf", outcome="error")  # running again: not excused
    found = check(story.finish(dead=(4,), replaced={("top/mid/leaf", None): 14}))
    assert [v.invariant for v in found] == ["isolation"]
    assert found[0].time == pytest.approx(31.1)


def test_an_answer_from_another_context_or_for_another_op_is_a_delivery_violation():
    story = Story()
    story.op(1.0, 1.1, "top/mid/leaf", at=2)
    story.op(2.0, 2.1, "top", error="answered 7, not 8")
    found = check(story.finish())
    assert [v.invariant for v in found] == ["delivery", "delivery"]
    assert "answered by context 2, not by its destination 4" in found[0].message
    assert "another op" in found[1].message


def _channel(story: Story, sent_ok: bool = True) -> int:
    op = next(story.ops)
    story.add(1.0, "op", action="start", op=op, type="channel", phase="load",
              dst={"host": "top", "account": None, "context_id": 1},
              to={"host": "top/mid/leaf", "account": None, "context_id": 4},
              path=["top"], host="top", account=None)
    story.add(1.0, "channel", op=op, count=3, path=["top", "top/mid", "top/mid/leaf"])
    story.add(1.1, "op", action="end", op=op, outcome="ok" if sent_ok else "error", at=1,
              error=None, host="top", account=None)
    return op


def test_channel_messages_must_reach_their_receiver_once_from_their_sender():
    story = Story()
    op = _channel(story)
    story.add(1.2, "deliver", op=op, tag=0, to=4, at=4, src=1, came_from=4)
    story.add(1.2, "deliver", op=op, tag=1, to=4, at=2, src=1, came_from=2)  # kept by mid
    story.add(1.3, "deliver", op=op, tag=2, to=4, at=4, src=3, came_from=4)  # wrong sender
    story.add(1.4, "deliver", op=op, tag=2, to=4, at=4, src=1, came_from=4)  # twice
    found = check(story.finish())
    assert [v.invariant for v in found] == ["delivery"] * 3
    assert "meant for context 4 reached context 2" in found[0].message
    assert "claims to come from context 3" in found[1].message
    assert "arrived twice" in found[2].message


def test_channel_messages_may_be_lost_only_across_a_break():
    intact = Story()
    op = _channel(intact)
    intact.add(1.2, "deliver", op=op, tag=0, to=4, at=4, src=1, came_from=4)
    found = check(intact.finish())
    assert [v.invariant for v in found] == ["isolation"]
    assert "messages [1, 2] were sent but never arrived" in found[0].message
    broken = Story()
    _channel(broken)
    broken.fault(0, 1.05, 3.0, "stream", "top/mid/leaf", kind="reset")
    broken.lose(4, 1.1, "top/mid/leaf", ["top", "top/mid"], restarted=14)
    assert check(broken.finish(dead=(4,), replaced={("top/mid/leaf", None): 14})) == []


def test_after_the_final_heal_every_host_and_account_answers_and_every_fault_is_healed():
    story = Story()
    story.fault(0, 1.0, None, "latency", "top", delay=0.1)
    story.op(37.0, 37.5, "top/mid", "app", phase="final", outcome="error", error="gone")
    events = story.finish(final=False)
    for host, account in IDS:
        if (host, account) != ("top/mid", "app"):
            story.op(38.0, 38.1, host, account, phase="final")
    found = check(events)
    assert [v.invariant for v in found] == ["recovery"] * 3
    assert "fault 0 (latency of top) was never healed" in found[0].message
    assert "op 1 (call to top/mid as app) failed (error: gone)" in found[1].message
    assert "top/mid as app never answered" in found[2].message


def test_the_master_and_every_surviving_ancestor_must_learn_of_a_lost_context():
    story = Story()
    story.fault(0, 5.0, 6.0, "kill", "top/mid/leaf")
    story.add(5.3, "del_route", host="top/mid", account=None, lost=4)  # top never learned
    story.add(8.0, "del_route", host=None, lost=4)  # 3 s after the kill: late
    story.add(8.5, "build", host="top/mid/leaf", account=None, context_id=14, pid=5)
    found = check(story.finish(dead=(4,), replaced={("top/mid/leaf", None): 14}))
    assert sorted(v.invariant for v in found) == ["del_route", "del_route"]
    messages = " | ".join(v.message for v in found)
    assert "never reached top, which outlived it" in messages
    assert "was lost 3.0 s after the first fault on its path; bound 2.0 s" in messages


def test_a_loss_the_master_never_hears_of_while_the_tree_runs_is_reported():
    story = Story()
    story.fault(0, 5.0, 6.0, "kill", "top/mid/leaf")
    story.add(5.2, "del_route", host="top/mid", account=None, lost=4)
    story.add(5.2, "del_route", host="top", account=None, lost=4)
    events = story.finish(dead=(4,))
    story.add(41.5, "del_route", host=None, lost=4)  # at shutdown: too late to count
    found = check(events)
    assert [v.invariant for v in found] == ["del_route"]
    assert "the master never learned that context 4 (top/mid/leaf) was lost" in found[0].message


def test_an_ancestor_watched_only_after_the_fault_is_not_required_to_know():
    story = Story()
    story.fault(0, 5.0, 6.0, "kill", "top/mid/leaf")
    story.lose(4, 5.2, "top/mid/leaf", ["top/mid"], restarted=14)  # not logged by top...
    story.add(5.5, "probe", host="top", account=None, context_id=21)  # ...a newer top
    found = check(story.finish(dead=(4,), replaced={("top/mid/leaf", None): 14,
                                                    ("top", None): 21}))
    assert found == []


def test_a_context_lost_without_a_fault_on_its_path_breaks_isolation():
    story = Story()
    story.fault(0, 5.0, 6.0, "kill", "top/mid/leaf")
    story.lose(3, 5.5, "top/mid", ["top/mid"], account="app", restarted=13)
    found = check(story.finish(dead=(3,), replaced={("top/mid", "app"): 13}))
    assert [v.invariant for v in found] == ["isolation"]
    assert "context 3 (top/mid as app) was lost with no fault on its path" in found[0].message


def test_processes_left_after_shutdown_are_reported():
    story = Story()
    events = story.finish()
    events.append({"time": 47.0, "kind": "leftover", "pid": 4242, "command": "sleep 120"})
    events.append({"time": 46.0, "kind": "shutdown", "step": "tree_gone", "leftovers": [99]})
    found = check(events)
    assert [v.invariant for v in found] == ["leftovers", "leftovers"]
    assert "[99]" in found[0].message and "pid 4242 still runs" in found[1].message


@pytest.mark.parametrize("kind, params, bound", [
    ("kill", {}, 2.0),
    ("stop", {"grace": 1.5}, 3.5),
    ("restart", {"grace": 0.5}, 2.5),
    ("pause", {}, 9.0),
    ("partition", {"mode": "drop"}, 9.0),
    ("partition", {"mode": "reset"}, 2.0),
    ("stream", {"kind": "reset"}, 2.0),
    ("stream", {"kind": "reset", "nbytes": 10}, 9.0),
    ("stream", {"kind": "stall"}, 9.0),
    ("stream", {"kind": "cut_after", "nbytes": 0}, 9.0),
    ("latency", {"delay": 0.1}, None),
    ("bandwidth", {"rate": 1000}, None),
])
def test_bounds_per_fault_kind(kind, params, bound):
    assert BOUNDS.for_fault(kind, params) == bound


def test_the_silent_bound_follows_the_keepalive_settings():
    assert Bounds.for_keepalive(2.0, 3).silent == 9.0
    assert Bounds.for_keepalive(0.5, 2, healthy=4.0).healthy == 4.0


def test_a_history_read_back_from_its_file_is_checked_the_same(tmp_path):
    story = Story()
    story.op(1.0, None, "top/mid/leaf")
    events = story.finish()
    path = tmp_path / "history.jsonl"
    with Timeline(str(path)) as timeline:
        history = History(timeline)
        for event in events:
            history.record(**{k: v for k, v in event.items() if k != "kind"},
                           kind=event["kind"])
    loaded = load_history(str(path))
    assert check(loaded) == check(events)
    assert summarise_run(loaded)["ops"] == {"ok": 4, "timeout": 1}
