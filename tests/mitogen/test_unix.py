"""mitogen.unix: a second process attaches to a running tree through a UNIX socket."""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import mitogen.core
import mitogen.master
import mitogen.unix
from tests.support import funcs, logins

REPO = Path(__file__).resolve().parents[2]
GREETER = "tests.support.services.Greeter"


def _client(path, target_id, *extra, user=None):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-m", "tests.support.unix_client", str(path),
                             str(target_id), *map(str, extra)], cwd=REPO, env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            user=user)


def _report(proc):
    line = proc.stdout.readline()
    assert line, "the client printed nothing"
    return json.loads(line)


def _finish(proc):
    proc.stdin.write("\n")
    proc.stdin.close()
    assert proc.wait(timeout=30) == 0
    proc.stdout.close()


def test_a_second_process_attaches_and_calls_a_context_two_hops_down(router, tmp_path):
    a = router.local(name="a")
    b = router.local(name="b", via=a)
    assert b.call_service(GREETER, "ping") == "pong"  # Greeter runs in b from now on
    listener = mitogen.unix.Listener.build_stream(router)
    forged = tmp_path / "forged"
    dropped = router.get_stats()["dropped_message_count"]
    proc = _client(listener.path, b.context_id, forged)
    try:
        report = _report(proc)
        client_id = report["context_id"]
        # Its ID came from the master's allocator, after the IDs of a's block.
        assert client_id not in (0, a.context_id, b.context_id)
        assert router.allocate_id() == client_id + 1
        assert report["parent_ids"] == [0] and report["listener"] == 0
        assert report["target_pid"] == b.call(os.getpid) == report["after_forgery_pid"]
        # b saw the client as the sender, with the master's authority.
        assert report["caller_seen"] == [client_id, 0]
        # A message claiming the master's authority outright was dropped and counted.
        assert router.get_stats()["dropped_message_count"] == dropped + 1
        assert not forged.exists()
        assert client_id in router.get_routes()
        b.call(funcs.watch_disconnect, client_id)
    finally:
        _finish(proc)
    # Its going away is DEL_ROUTE like any context's: known to b, two hops down.
    assert b.call(funcs.wait_disconnect, client_id, 10.0) is True
    assert client_id not in router.get_routes()


def test_the_socket_is_0600_in_a_0700_directory_and_removed_at_shutdown(tmp_path):
    given = tmp_path / "given.sock"
    with mitogen.master.Router() as router:
        default = mitogen.unix.Listener.build_stream(router)
        chosen = mitogen.unix.Listener.build_stream(router, path=str(given), backlog=5)
        assert chosen.protocol.path == str(given)
        for path in (default.path, str(given)):
            mode = os.stat(path).st_mode
            assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
            assert not mitogen.unix.is_path_dead(path)
        assert stat.S_IMODE(os.stat(os.path.dirname(default.path)).st_mode) == 0o700
        assert sorted(os.listdir(tmp_path)) == ["given.sock"]  # no staging left behind
    assert not os.path.exists(default.path)
    assert not os.path.exists(os.path.dirname(default.path))
    assert not given.exists()
    assert mitogen.unix.is_path_dead(str(given))


def test_a_stale_socket_is_replaced_and_a_live_one_is_not_stolen(router, tmp_path):
    path = tmp_path / "tree.sock"
    code = ("import sys, time, mitogen.master, mitogen.unix\n"
            "router = mitogen.master.Router()\n"
            "mitogen.unix.Listener.build_stream(router, path=sys.argv[1])\n"
            "print('listening', flush=True)\n"
            "time.sleep(3600)\n")
    crashed = subprocess.Popen([sys.executable, "-c", code, str(path)], cwd=REPO,
                               stdout=subprocess.PIPE, text=True,
                               env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        assert crashed.stdout.readline().strip() == "listening"
        with pytest.raises(OSError) as failure:  # someone listens: not ours to take
            mitogen.unix.Listener.build_stream(router, path=str(path))
        assert failure.value.errno == errno.EADDRINUSE
        assert not mitogen.unix.is_path_dead(str(path))
    finally:
        crashed.send_signal(signal.SIGKILL)
        crashed.wait()
        crashed.stdout.close()
    assert path.exists() and mitogen.unix.is_path_dead(str(path))  # stale
    listener = mitogen.unix.Listener.build_stream(router, path=str(path))
    b = router.local(name="b")
    assert b.call_service(GREETER, "ping") == "pong"
    proc = _client(listener.path, b.context_id)
    try:
        assert _report(proc)["target_pid"] == b.call(os.getpid)
    finally:
        _finish(proc)


def test_connecting_to_nothing_is_a_connect_error():
    with pytest.raises(mitogen.unix.ConnectError, match="could not connect to /nonexistent") \
            as failure:
        mitogen.unix.connect("/nonexistent/mitogen.sock")
    assert failure.value.errno == errno.ENOENT
    assert mitogen.context_id == 0 and mitogen.parent_ids == []


#: A bare client for another user: Debian's python3 (any user may run it), no repository
#: needed. Prints 'EACCES'/'ENOENT'/... when connect() fails, else how many bytes the
#: listener answered before closing.
RAW_CLIENT = """
import errno, socket, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    sock.connect(sys.argv[1])
except OSError as e:
    print(errno.errorcode[e.errno])
    sys.exit()
sock.settimeout(30)
data = b''
while True:
    chunk = sock.recv(12)
    if not chunk:
        break
    data += chunk
print('answered %d bytes' % len(data))
"""


def _as_nobody(path):
    done = subprocess.run([logins.SYSTEM_PYTHON, "-I", "-c", RAW_CLIENT, str(path)],
                          user=65534, capture_output=True, text=True, timeout=60, check=True)
    return done.stdout.strip()


@pytest.mark.system
def test_a_client_of_another_user_is_refused_and_the_refusal_logged(router, caplog):
    if os.geteuid() != 0 or not os.path.exists(logins.SYSTEM_PYTHON):
        pytest.skip("needs root and %s, to run a client as another user (nobody)"
                    % (logins.SYSTEM_PYTHON,))
    listener = mitogen.unix.Listener.build_stream(router)
    # First line of defence: the directory keeps other users out altogether.
    assert _as_nobody(listener.path) == "EACCES"
    # Second: with the permissions loosened by mistake, the peer's uid is checked.
    os.chmod(os.path.dirname(listener.path), 0o711)
    os.chmod(listener.path, 0o666)
    next_id = router.allocate_id() + 1
    with caplog.at_level(logging.ERROR, logger="mitogen.unix"):
        assert _as_nobody(listener.path) == "answered 0 bytes"
        router.broker.defer_sync(lambda: None)  # the listener has logged by now
    assert "uid 65534 is not this process's uid 0" in caplog.text
    assert router.allocate_id() == next_id  # no ID was spent on it
    assert set(router.get_routes()) == set()
