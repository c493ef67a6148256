"""The shared spawning helper: PTY exhaustion, and no process left behind along a route."""

from __future__ import annotations

import errno
import os
import select

import pytest

import mitogen.master
import mitogen.spawn
from tests.support import remote
from tests.support.logins import SYSTEM_PYTHON, accounts  # noqa: F401 (fixture)


def test_out_of_ptys_says_so_and_how_to_fix(router, monkeypatch):
    def no_pty():
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "openpty", no_pty)
    with pytest.raises(mitogen.core.StreamError) as info:
        router.su(username="root", password="x")
    text = str(info.value)
    assert "run out of PTYs" in text
    assert "kernel.pty.max" in text and "sysctl -w" in text


def _pids_of(uid: int) -> list:
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.stat("/proc/%s" % pid).st_uid == uid:
                pids.append(int(pid))
        except OSError:
            pass
    return pids


def test_no_process_left_along_a_route(accounts):  # noqa: F811
    """After the master's router shuts down, nothing runs as the accounts it reached."""
    import pwd

    with mitogen.master.Router() as router:
        caller = router.sudo(username=accounts["caller"], python_path=SYSTEM_PYTHON)
        target = router.sudo(username=accounts["target"], password=accounts.password,
                             via=caller)
        assert target.call(remote.whoami) == accounts["target"]
        uids = [pwd.getpwnam(accounts[r]).pw_uid for r in ("caller", "target")]
        pids = [pid for uid in uids for pid in _pids_of(uid)]
        assert pids
    for pid in pids:
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        try:
            assert select.select([fd], [], [], 10.0)[0], "process %d outlived its router" % pid
        finally:
            os.close(fd)


def test_without_pidfd_children_are_still_reaped(router, monkeypatch):
    """A kernel (or seccomp filter, or valgrind) without pidfd_open: the reaper polls."""
    def no_pidfd(pid, flags=0):
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))

    monkeypatch.setattr(os, "pidfd_open", no_pidfd)
    child = router.local(name="polled")
    pid = child.call(os.getpid)
    child.shutdown(wait=True)
    stream = router.get_streams().get(child.context_id)
    assert stream is None
    # the leak check after the test fails if the child was not reaped
    assert pid > 0


def test_a_failure_to_watch_a_new_child_fails_the_connect_at_once(router, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no reaper today")

    monkeypatch.setattr(mitogen.parent, "Reaper", broken)
    with pytest.raises(mitogen.core.StreamError, match="cannot watch the new child: no reaper"):
        router.local(name="unwatched", connect_timeout=60)
