"""Shutdown: nothing of a tree survives its master's Router."""

from __future__ import annotations

import os
import signal
import time

import pytest

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


def test_children_exit_by_themselves_when_the_master_is_killed(tmp_path):
    import select
    import signal
    import subprocess
    import sys

    script = tmp_path / "master.py"
    script.write_text(
        "import os, sys, mitogen.master\n"
        "router = mitogen.master.Router()\n"
        "pids = [router.local().call(os.getpid) for _ in range(3)]\n"
        "print(' '.join(map(str, pids)), flush=True)\n"
        "sys.stdin.read()\n")
    master = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in master.stdout.readline().split()]
        pidfds = [os.pidfd_open(pid) for pid in pids]
    finally:
        master.kill()
        master.wait()
        master.stdin.close()
        master.stdout.close()
    try:
        poller = select.poll()
        for fd in pidfds:
            poller.register(fd, select.POLLIN)
        exited = set()
        deadline = time.monotonic() + 10
        while len(exited) < len(pidfds) and time.monotonic() < deadline:
            for fd, _ in poller.poll(max(0, int((deadline - time.monotonic()) * 1000))):
                exited.add(fd)
                poller.unregister(fd)
        assert len(exited) == 3, "children outlived their master: %r" % (pids,)
    finally:
        for fd in pidfds:
            os.close(fd)
        for pid in pids:  # never expected to be needed
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.mark.slow
def test_a_child_that_does_not_disconnect_is_forced_after_5_seconds():
    """The master waits Broker.shutdown_timeout (5 s) for children to disconnect, then
    disconnects them itself and kills their processes (the leak check proves it)."""
    router = mitogen.master.Router()
    child = router.local()
    pid = child.call(os.getpid)
    os.kill(pid, signal.SIGSTOP)  # it can no longer answer SHUTDOWN
    started = time.monotonic()
    router.broker.shutdown()
    router.broker.join()
    elapsed = time.monotonic() - started
    assert router.broker.shutdown_timeout == 5.0
    assert 5.0 <= elapsed < 5.0 + 5.0, elapsed
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_shutdown_of_a_context_already_gone_returns(router):
    child = router.local()
    child.shutdown(wait=True)
    assert child.disconnected
    latch = child.shutdown()  # a second time: nothing will disconnect again
    assert latch.get(timeout=5) is None
    child.shutdown(wait=True)
