"""Shutdown: nothing of a tree survives its master's Router."""

from __future__ import annotations

import os

import mitogen.core
import mitogen.master
from tests.support import funcs


def _alive(pid: int) -> bool:
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_router_exit_ends_children_and_their_threads_and_fds():
    with mitogen.master.Router() as router:
        pids = [router.local().call(os.getpid) for _ in range(3)]
        assert all(_alive(pid) for pid in pids)
    assert not any(_alive(pid) for pid in pids)


def test_a_child_stuck_in_user_code_still_dies():
    with mitogen.master.Router() as router:
        child = router.local()
        pid = child.call(os.getpid)
        child.call_no_reply(funcs.sleep_forever)
        assert child.call_async(os.getpid) is not None  # queued behind the sleeper
    assert not _alive(pid)


def test_context_shutdown_waits_for_disconnect(router):
    child = router.local()
    pid = child.call(os.getpid)
    child.shutdown(wait=True)
    try:
        child.call(os.getpid)
    except mitogen.core.ChannelError:
        pass
    else:
        raise AssertionError("a call to a shut down context succeeded")
    router.broker.defer_sync(lambda: None)
    assert pid


def test_pending_call_fails_when_its_context_dies(router):
    child = router.local()
    recv = child.call_async(funcs.sleep_forever)
    os.kill(child.call(os.getpid) if False else _pid_of(router, child), 9)
    try:
        recv.get(timeout=10)
    except mitogen.core.ChannelError as e:
        assert "disconnected" in str(e)
    else:
        raise AssertionError("no ChannelError")


def _pid_of(router, context):
    return router.stream_by_id(context.context_id).conn.proc.pid


def test_using_a_router_after_shutdown_raises():
    router = mitogen.master.Router()
    router.broker.shutdown()
    router.broker.join()
    try:
        router.local()
    except mitogen.core.Error as e:
        assert "shut down" in str(e)
    else:
        raise AssertionError("local() after shutdown did not raise")
