"""A compromised context gains nothing: one test per attack of issue 13.

An attacker is a real child that writes forged frames on its own streams (see
tests/support/hostile.py). Each test asserts that nothing ran, no route changed, the victim
keeps serving calls, and the drop was counted where it happened.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time

import pytest

import mitogen.core
import mitogen.master
from mitogen.core import ADD_ROUTE, CALL_FUNCTION, DEL_ROUTE, FORWARD_MODULE, LOAD_MODULE
from tests.support import hostile
from tests.support.waiting import wait_for


def rss_kib(pid="self"):
    with open("/proc/%s/statm" % (pid,)) as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGESIZE") // 1024


@pytest.fixture
def tree(router):
    """i under the master with x (the attacker) and y under it; a (another attacker) and b
    directly under the master."""
    i = router.local(name="i")
    return {"i": i, "x": router.local(name="x", via=i), "y": router.local(name="y", via=i),
            "a": router.local(name="a"), "b": router.local(name="b")}


def dropped(context):
    return context.call(hostile.dropped)


def master_dropped(router):
    return router.get_stats()["dropped_message_count"]


def test_module_code_from_a_sibling_never_runs(router, tree, tmp_path, monkeypatch):
    name = "victimmod_%d" % os.getpid()
    (tmp_path / (name + ".py")).write_text("MARK = 'genuine'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    x, y, b, i = tree["x"], tree["y"], tree["b"], tree["i"]
    evil = "MARK = 'evil'\nimport os\nos.system('touch %s/pwned')\n" % (tmp_path,)
    before = {n: dropped(tree[n]) for n in ("i", "y", "b")}
    frames = []
    for victim in (y, b):
        for fullname in (name, "json"):
            frames.append({"dst_id": victim.context_id, "handle": LOAD_MODULE,
                           "obj": hostile.load_module_body(fullname, evil)})
    frames.append({"dst_id": i.context_id, "handle": FORWARD_MODULE,
                   "obj": (y, name)})
    assert x.call(hostile.forge, frames) == 5
    for victim in (y, b):
        path, mark = victim.call(hostile.imported_from, name)
        assert (path, mark) == (str(tmp_path / (name + ".py")), "genuine")
        path, mark = victim.call(hostile.imported_from, "json")
        assert mark is None and "/evil/" not in path
    assert not (tmp_path / "pwned").exists()
    assert dropped(y) == before["y"] + 2
    assert dropped(b) == before["b"] + 2
    assert dropped(i) == before["i"] + 1  # FORWARD_MODULE without parent authority


def test_a_parents_copy_of_a_module_this_context_has_is_not_run(router, tree):
    """Local first, for cached copies too: even a LOAD_MODULE from a parent for a module
    this interpreter can import itself is not what runs."""
    y = tree["y"]
    body = hostile.load_module_body("colorsys", "MARK = 'copy from above'\n")
    tree["i"].call(hostile.forge, [{"dst_id": y.context_id, "handle": LOAD_MODULE,
                                    "towards": y.context_id, "obj": body}])
    path, mark = y.call(hostile.imported_from, "colorsys")
    assert mark is None and path.endswith("colorsys.py") and "/evil/" not in path


def test_routes_for_ids_never_granted_are_refused(router, tree):
    x, a, b, i = tree["x"], tree["a"], tree["b"], tree["i"]
    routes = router.get_routes()
    routes_i = i.call(hostile.routes)
    before, before_i = master_dropped(router), dropped(i)
    next_id = router.id_allocator._next
    claims = [next_id, next_id + 1, b.context_id, 0, i.context_id]
    x.call(hostile.forge, [{"dst_id": i.context_id, "handle": ADD_ROUTE, "obj": (c, "evil")}
                           for c in claims])
    x.call(hostile.forge, [{"dst_id": 0, "handle": ADD_ROUTE, "obj": (next_id, "evil")}])
    a.call(hostile.forge, [{"dst_id": 0, "handle": ADD_ROUTE, "obj": (c, "evil")}
                           for c in claims])
    assert i.call(hostile.routes) == routes_i
    assert dropped(i) == before_i + len(claims)
    assert router.get_routes() == routes
    assert master_dropped(router) == before + 1 + len(claims)
    new = router.local(name="new")  # the ID the attackers claimed
    assert new.context_id == next_id
    genuine = router.get_streams()[next_id].conn.proc.pid
    assert new.call(hostile.pid_and_modules)[0] == genuine
    deeper = router.local(name="deeper", via=i)  # and a genuine ADD_ROUTE still works
    assert deeper.call(hostile.pid_and_modules)[0] != genuine


def test_routes_cannot_be_deleted_by_anyone_but_the_child_they_go_through(router, tree):
    x, y, a, b, i = tree["x"], tree["y"], tree["a"], tree["b"], tree["i"]
    routes = router.get_routes()
    routes_i = i.call(hostile.routes)
    before, before_i = master_dropped(router), dropped(i)
    x.call(hostile.forge, [
        {"dst_id": 0, "handle": DEL_ROUTE, "obj": y.context_id},      # not adjacent
        {"dst_id": 0, "handle": DEL_ROUTE, "obj": i.context_id},
        {"dst_id": i.context_id, "handle": DEL_ROUTE, "obj": y.context_id},  # not via x
        {"dst_id": i.context_id, "handle": DEL_ROUTE, "obj": x.context_id},  # its own
    ])
    a.call(hostile.forge, [
        {"dst_id": 0, "handle": DEL_ROUTE, "obj": b.context_id},
        {"dst_id": 0, "handle": DEL_ROUTE, "obj": a.context_id},
    ])
    assert i.call(hostile.routes) == routes_i
    assert router.get_routes() == routes
    assert dropped(i) == before_i + 2
    assert master_dropped(router) == before + 4
    for context in (y, i, b, x, a):
        assert context.call(os.getpid) > 0


def test_fake_disconnect_news_from_a_sibling_is_ignored(router, tree):
    x, y, a, b, i = tree["x"], tree["y"], tree["a"], tree["b"], tree["i"]
    for victim, ids in ((b, (0, i.context_id, a.context_id)), (y, (0, i.context_id))):
        for context_id in ids:
            victim.call(hostile.watch_disconnect, context_id)
    before = {"b": dropped(b), "y": dropped(y)}
    a.call(hostile.forge, [{"dst_id": b.context_id, "handle": DEL_ROUTE, "obj": c}
                           for c in (0, i.context_id, a.context_id)])
    x.call(hostile.forge, [{"dst_id": y.context_id, "handle": DEL_ROUTE, "obj": c}
                           for c in (0, i.context_id)])
    assert dropped(b) == before["b"] + 3 and dropped(y) == before["y"] + 2
    for victim, ids in ((b, (0, i.context_id, a.context_id)), (y, (0, i.context_id))):
        for context_id in ids:
            assert not victim.call(hostile.was_told_disconnected, context_id)


def test_oversize_frames_cannot_aim_dead_messages():
    with mitogen.master.Router(max_message_size=1 << 20) as router:
        a, b = router.local(name="a"), router.local(name="b")
        i = router.local(name="i")
        x, y = router.local(name="x", via=i), router.local(name="y", via=i)
        gate_b, gate_y = b.call(hostile.open_gate), y.call(hostile.open_gate)
        pending_b = b.call_async(hostile.wait_at_gate, gate_b.dst_handle, "b answered")
        pending_y = y.call_async(hostile.wait_at_gate, gate_y.dst_handle, "y answered")
        big = 2 << 20
        before, before_i = master_dropped(router), dropped(i)
        a.call(hostile.forge, [
            # as b, at the reply handle of the master's pending call to b
            {"dst_id": 0, "src_id": b.context_id, "handle": 7777,
             "reply_to": pending_b.handle, "size": big},
            # as the master, at b's CALL_FUNCTION
            {"dst_id": b.context_id, "src_id": 0, "auth_id": 0, "handle": 7777,
             "reply_to": CALL_FUNCTION, "size": big},
            # honestly as itself, but asking for a refusal to its own CALL_FUNCTION
            {"dst_id": 0, "handle": 7777, "reply_to": CALL_FUNCTION, "size": big},
        ])
        x.call(hostile.forge, [
            {"dst_id": 0, "src_id": y.context_id, "handle": 7777,
             "reply_to": pending_y.handle, "size": big}])
        assert master_dropped(router) == before + 3
        assert dropped(i) == before_i + 1
        gate_b.send(None)
        gate_y.send(None)
        assert pending_b.get(timeout=10).unpickle() == "b answered"
        assert pending_y.get(timeout=10).unpickle() == "y answered"
        assert a.call(os.getpid) > 0 and x.call(os.getpid) > 0


def test_stalled_giant_headers_and_pickle_bombs_cost_the_master_nothing():
    with mitogen.master.Router() as router:
        attackers = [router.local(name="a%d" % n) for n in range(10)]
        recv = mitogen.core.Receiver(router)
        bombs = [b"\x80\x04]r\xff\xff\xff\x7f.", b"]p99999999999\n.",
                 b"\x80\x04\x8c\x0cmitogen.core\x8c\x04Blob\x93J\x00\x00\x00\x10\x85R.",
                 b"\x80\x04(" + b"\x8f" * 200_000 + b"l."]
        base = rss_kib()
        for attacker in attackers:
            attacker.call(hostile.forge, [{"dst_id": 0, "handle": recv.handle, "data": bomb}
                                          for bomb in bombs])
            attacker.call_no_reply(hostile.stall_header, 128 << 20)  # its stream is stuck
        for _ in range(len(attackers) * len(bombs)):
            with pytest.raises(mitogen.core.StreamError, match=r"cannot unpickle|refused"):
                recv.get(timeout=10).unpickle()
        streams = [router.get_streams()[a.context_id] for a in attackers]
        assert wait_for(lambda: all(s.decoder._header for s in streams))
        grown = rss_kib() - base
        assert grown < 8 * 1024, "the master grew by %d KiB" % (grown,)
        recv.close()


def test_a_result_that_cannot_be_pickled_is_a_call_error_and_the_child_lives(local):
    with pytest.raises(mitogen.core.CallError, match=re.escape(
            "cannot pickle tests.support.hostile.Unreducible: RuntimeError: this")):
        local.call(hostile.unreducible)
    with pytest.raises(mitogen.core.CallError,
                       match=re.escape("cannot pickle builtins.list: RecursionError")):
        local.call(hostile.deeply_nested)
    assert local.call(os.getpid) > 0


def test_messages_to_unknown_handles_are_counted_and_logged(router, tree, caplog):
    before = master_dropped(router)
    tree["a"].call(hostile.forge, [{"dst_id": 0, "handle": 5555, "obj": "lost"},
                                   {"dst_id": 0, "handle": 5556, "reply_to": 1234,
                                    "obj": "lost"}])
    assert wait_for(lambda: master_dropped(router) == before + 2)
    assert "no handler for handle 5555" in caplog.text


def test_a_child_blocked_in_a_remote_import_exits_when_its_parent_is_killed(router, tmp_path,
                                                                           monkeypatch):
    name = "slowmod_%d" % os.getpid()
    (tmp_path / (name + ".py")).write_text("MARK = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    asked = threading.Event()
    answer = router.responder._on_get_module

    def hold_one_module(msg):
        if bytes(msg.data).startswith(name.encode() + b"\n"):
            asked.set()  # never answered: the child waits in its import
            return
        answer(msg)

    router.add_handler(hold_one_module, mitogen.core.GET_MODULE, overwrite=True)
    parent = router.local(name="parent")
    child = router.local(name="child", via=parent)
    child_pid = child.call(hostile.pid_and_modules)[0]
    pending = child.call_async(hostile.imported_from, name)
    assert asked.wait(10)
    killed_at = time.monotonic()
    os.kill(parent.call(os.getpid), signal.SIGKILL)
    with pytest.raises(mitogen.core.ChannelError):
        pending.get(timeout=10).unpickle()

    def child_exited():
        try:
            with open("/proc/%d/stat" % child_pid) as f:
                return f.read().rsplit(")", 1)[1].split()[0] == "Z"
        except FileNotFoundError:
            return True

    assert wait_for(child_exited, timeout=10)
    # The shutdown bound: the broker's graceful shutdown, then SIGTERM to a stuck main thread.
    assert time.monotonic() - killed_at < mitogen.core.Broker.shutdown_timeout + 2


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_churn_leaves_nothing_behind(router):
    """1,000 create/call/shutdown cycles, four at a time: no growth of fds, threads or
    processes, and RSS grows by less than 5 MB (after a warm-up, which fills caches that
    are not per child)."""

    def cycles(count):
        for _ in range(count):
            context = router.local()
            assert context.call(os.getpid) > 0
            context.shutdown(wait=True)

    def run(total, threads=4):
        workers = [threading.Thread(target=cycles, args=(total // threads,), name="churn")
                   for _ in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()

    run(40)
    fds = len(os.listdir("/proc/self/fd"))
    threads = threading.active_count()
    base = rss_kib()
    run(1000)
    # A child's disconnect comes before its exit: the reaper closes the last pidfds a moment
    # later (and a warm-up child's may close later still).
    assert wait_for(lambda: len(os.listdir("/proc/self/fd")) <= fds), os.listdir("/proc/self/fd")
    assert threading.active_count() <= threads
    assert not router._connections and len(router._context_by_id) < 10
    grown = rss_kib() - base
    assert grown < 5000, "RSS grew by %d KiB over 1,000 children" % (grown,)
