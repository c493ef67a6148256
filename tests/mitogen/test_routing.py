"""Trees of contexts: the seed's example route, disconnect propagation, source verification."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

import pytest

import mitogen.core
import mitogen.master
from tests.support import funcs

SEED_TREE = [
    ("bastion", None),
    ("dc1", "bastion"),
    ("dc2", "bastion"),
    ("rack12", "dc1"),
    ("rack22", "dc2"),
    ("node12b", "rack12"),
    ("node22a", "rack22"),
    ("sudo:node12b:webapp", "node12b"),
    ("sudo:node22a:webapp", "node22a"),
]


def build(router, spec):
    contexts = {}
    for name, via in spec:
        contexts[name] = router.local(name=name, via=contexts.get(via))
    return contexts


def test_seed_route_hop_by_hop(router):
    tree = build(router, SEED_TREE)
    src, dst = tree["sudo:node22a:webapp"], tree["sudo:node12b:webapp"]
    for context in tree.values():
        context.call(funcs.start_route_trace)
    sender = dst.call(funcs.open_receiver)
    assert src.call(funcs.send_to, sender, "hello sibling") is True
    assert dst.call(funcs.receive, sender.dst_handle) == "hello sibling"
    hops = {}
    for name, context in tree.items():
        for s, d, came_from, went_to in context.call(funcs.route_trace):
            if (s, d) == (src.context_id, dst.context_id):
                hops[name] = (came_from, went_to)
    ids = {context.context_id: name for name, context in tree.items()}
    ids[0] = "master"
    path = ["sudo:node22a:webapp"]
    here = "node22a"
    while here != "sudo:node12b:webapp":
        path.append(here)
        here = ids[hops[here][1]]
    path.append(here)
    assert path == ["sudo:node22a:webapp", "node22a", "rack22", "dc2", "bastion", "dc1",
                    "rack12", "node12b", "sudo:node12b:webapp"]
    assert set(hops) == set(path[1:-1])  # nobody else, not even the master, saw it


def test_every_context_is_reachable_and_ids_are_allocated_in_blocks(router):
    tree = build(router, SEED_TREE[:4])
    assert tree["bastion"].context_id == 1
    assert tree["dc1"].context_id == 2          # bastion's block starts right after it
    assert tree["rack12"].context_id == 1002    # dc1's block comes after bastion's
    for context in tree.values():
        assert context.call(funcs.parent_ids)[1] == context.context_id
    assert tree["rack12"].call(funcs.parent_ids)[0] == [2, 1, 0]
    routes = router.get_routes()
    assert set(routes) == {c.context_id for c in tree.values()}


def test_killing_an_intermediate_fails_pending_calls_in_its_subtree_fast(router):
    spec = [("a", None), ("b", "a"), ("c", "b"), ("d", "c"), ("other", "a")]
    tree = build(router, spec)
    lost = ["c", "d"]
    disconnected = {name: threading.Event() for name in lost}
    for name in lost:
        mitogen.core.listen(tree[name], "disconnect", disconnected[name].set)
    pid_c = tree["c"].call(os.getpid)
    pending = {name: tree[name].call_async(funcs.sleep_forever) for name in lost}
    killed_at = time.monotonic()
    os.kill(pid_c, signal.SIGKILL)
    for recv in pending.values():
        with pytest.raises(mitogen.core.ChannelError):
            recv.get(timeout=10)
    elapsed = time.monotonic() - killed_at
    assert all(event.wait(5) for event in disconnected.values())
    assert elapsed < 1.0, elapsed
    assert tree["other"].call(funcs.add, 1, 2) == 3
    assert tree["b"].call(funcs.add, 2, 2) == 4
    assert set(router.get_routes()) == {tree[n].context_id for n in ("a", "b", "other")}


def test_forged_authority_is_dropped_counted_and_nothing_runs(router, tmp_path):
    a = router.local(name="a")
    b = router.local(name="b")
    path = str(tmp_path / "forged")
    before = router.get_stats()["dropped_message_count"]
    # a claims to be the master, then claims to be b, then honestly asks b to run code
    a.call(funcs.forge_call, b.context_id, 0, a.context_id, path)
    a.call(funcs.forge_call, b.context_id, b.context_id, b.context_id, path)
    a.call(funcs.forge_call, b.context_id, a.context_id, a.context_id, path)
    # b's refusal of the honest-but-unauthorised call is counted in b
    assert b.call(funcs.dropped_count) == 1
    assert router.get_stats()["dropped_message_count"] == before + 2
    assert not os.path.exists(path)


def test_unidirectional_master_forbids_children_talking_to_each_other():
    with mitogen.master.Router() as router:
        router.unidirectional = True
        a = router.local(name="a")
        b = router.local(name="b")
        sender = b.call(funcs.open_receiver)
        with pytest.raises(mitogen.core.CallError, match="unidirectional"):
            a.call(funcs.call_in, b, "add", 1, 2)
        assert a.call(funcs.send_to, sender, 1) is True
        with pytest.raises(mitogen.core.CallError, match="TimeoutError"):
            b.call(funcs.receive, sender.dst_handle, 0.2)  # nothing ever arrived


def test_a_detached_context_survives_its_master():
    with mitogen.master.Router() as router:
        child = router.local(name="detacher")
        pid = child.call(os.getpid)
        gone = threading.Event()
        mitogen.core.listen(child, "disconnect", gone.set)
        child.call_no_reply(funcs.detach_and_sleep)
        assert gone.wait(10)
    try:
        assert os.waitpid(pid, os.WNOHANG) == (0, 0)  # still running, not a zombie
    finally:
        os.kill(pid, signal.SIGTERM)
        os.waitpid(pid, 0)


def test_keepalive_notices_a_silent_child_and_fails_its_calls(router):
    child = router.local(name="silent", keepalive_interval=0.2, keepalive_count=3)
    pid = child.call(os.getpid)
    assert child.call(funcs.add, 1, 1) == 2
    gone = threading.Event()
    mitogen.core.listen(child, "disconnect", gone.set)
    os.kill(pid, signal.SIGSTOP)  # alive, connected, and answering nothing
    try:
        stopped_at = time.monotonic()
        assert gone.wait(10)
        # The bound is interval * (count + 1); the rest is slack for a loaded machine.
        assert time.monotonic() - stopped_at < 0.2 * (3 + 1) + 1.5
    finally:
        os.kill(pid, signal.SIGCONT)


def test_del_route_reaches_every_context_that_talked_to_the_lost_one(router):
    """b dies: c (b's sibling, which sent b a message) and d (in another subtree, which did
    too) are told at once; e, which never talked to b, is not."""
    from tests.support import hostile

    a = router.local(name="a")
    b, c = router.local(name="b", via=a), router.local(name="c", via=a)
    d, e = router.local(name="d"), router.local(name="e")
    inbox = b.call(funcs.open_receiver)
    for context in (c, d, e):
        context.call(hostile.watch_disconnect, b.context_id)
    for context in (c, d):
        assert context.call(funcs.send_to, inbox, "hello") is True
    assert b.call(funcs.receive_numbered_or_value, inbox.dst_handle, 2) == ["hello", "hello"]
    os.kill(b.call(os.getpid), signal.SIGKILL)
    told = {}
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not (told.get("c") and told.get("d")):
        told = {n: ctx.call(hostile.was_told_disconnected, b.context_id)
                for n, ctx in (("c", c), ("d", d))}
    assert told == {"c": True, "d": True}
    assert e.call(hostile.was_told_disconnected, b.context_id) is False


def test_a_new_childs_first_messages_never_overtake_its_route(router, caplog, monkeypatch):
    """The intermediate sends a new child's ADD_ROUTE before it reads anything from that
    child, so nothing from the child reaches the master ahead of the route back to it.
    The master's own shortcut (proxy_connect installing the route it learns) is turned off
    here: ADD_ROUTE alone must have done it. The child logs from its first moment (debug):
    a record that overtook the route would be dropped by source verification."""
    caplog.set_level(logging.DEBUG)
    monkeypatch.setattr(router, "_learn_route", lambda via, context_id: None)
    a = router.local(name="a")
    before = router.get_stats()["dropped_message_count"]
    child = router.local(name="chatty-child", via=a, debug=True)
    assert child.call(funcs.add, 2, 2) == 4
    assert router.get_stats()["dropped_message_count"] == before
    assert a.call(funcs.dropped_count) == 0
    started = "context %d started" % (child.context_id,)
    assert any("chatty-child" in r.name and started in r.getMessage() for r in caplog.records)
