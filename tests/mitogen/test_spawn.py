"""The shared spawning helper: PTY exhaustion, and no process left behind along a route."""

from __future__ import annotations

import errno
import os
import select
import sys

import pytest

import mitogen.doas
import mitogen.master
import mitogen.spawn
from tests.support import funcs, remote
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


# --- a launcher that execs Python itself (old sudo, doas)

#: A doas stand-in: takes what is left in its stdin (as a login shell or a profile script
#: might), then execs the command itself, as an old sudo or doas does: the Python child is
#: then the session leader whose controlling terminal is the PTY, and nothing else holds it.
EXEC_LAUNCHER = """\
#!%s
import os, sys
os.set_blocking(0, False)
try:
    os.read(0, 1 << 20)
except BlockingIOError:
    pass
os.set_blocking(0, True)
argv = sys.argv[sys.argv.index("--") + 1:]
os.execv(argv[0], argv)
"""


@pytest.fixture
def exec_launcher(tmp_path):
    path = tmp_path / "doas"
    path.write_text(EXEC_LAUNCHER % sys.executable)
    path.chmod(0o755)
    return str(path)


def test_child_survives_its_terminal_when_the_launcher_execd_python(router, exec_launcher):
    context = router.doas(doas_path=exec_launcher, username="nobody-needed")
    pid = context.call(os.getpid)
    conn = router.stream_by_id(context.context_id).conn
    assert os.getsid(pid) == pid  # the launcher's session: Python leads it now
    # Once the child has replaced its stdio, no process holds the terminal open any more.
    assert conn.pty_stream.let_go.wait(30)
    # Its master side stays open (closing it would SIGHUP the child), unread.
    os.fstat(conn.pty_master)
    assert context.call(os.getpid) == pid
    os.kill(pid, 0)


def test_payload_waits_for_the_first_stage_where_something_else_may_read_stdin(
        router, exec_launcher):
    """The launcher reads whatever is in its stdin before Python starts: the payload must
    not be there yet, so doas (and every method but local and setns) sends it only after
    MITO000."""
    assert not mitogen.doas.Connection.eager_payload
    context = router.doas(doas_path=exec_launcher, username="nobody-needed")
    assert context.call(remote.thread_count) == 2


def test_only_methods_that_start_python_themselves_send_the_payload_early():
    import importlib

    import mitogen.parent

    eager = set()
    for name in ("local", "fork", "ssh", "sudo", "su", "doas", "docker", "podman", "buildah",
                 "kubectl", "lxc", "lxd", "incus", "jail", "setns"):
        conn_class = mitogen.parent.get_connection_class(name)
        if conn_class.eager_payload:
            eager.add(name)
        importlib.import_module(conn_class.__module__)
    assert eager == {"local", "setns"}


def test_preexec_hook_runs_in_a_child_started_on_a_pty(router, exec_launcher, monkeypatch):
    def hook():
        os.environ["MITOGEN_PREEXEC_TEST"] = "pid %d" % os.getpid()

    monkeypatch.setattr(mitogen.core, "_preexec_hook", hook, raising=False)
    context = router.doas(doas_path=exec_launcher, username="nobody-needed")
    pid = context.call(os.getpid)  # exec'd by the launcher: the same process
    assert context.call(funcs.cwd_and_env, "MITOGEN_PREEXEC_TEST")[1] == "pid %d" % pid
    conn = router.stream_by_id(context.context_id).conn
    assert conn.pty_master is not None and os.getsid(pid) == pid


@pytest.mark.parametrize("escalates_privilege", [False, True])
def test_hybrid_tty_create_child_on_a_socketpair_or_pipes(escalates_privilege):
    import mitogen.parent

    proc = mitogen.parent.hybrid_tty_create_child(
        [sys.executable, "-c", "import os,sys; os.write(1, sys.stdin.readline().upper().encode()); "
         "os.write(2, os.ttyname(2).encode())"], escalates_privilege=escalates_privilege)
    try:
        assert (proc.stdin == proc.stdout) is False  # two descriptors either way
        os.write(proc.stdin, b"hello\n")
        assert os.read(proc.stdout, 100) == b"HELLO\n"
        assert os.read(proc.stderr, 100).startswith(b"/dev/pts/")  # the PTY is stderr
        assert os.waitpid(proc.pid, 0)[1] == 0
    finally:
        for fd in {proc.stdin, proc.stdout, proc.stderr}:
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
