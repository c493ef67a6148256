"""The link relay, end to end: real subprocesses, real pipes, loopback TCP, no Docker.

Every relay runs as ``python -I -S relay.py``: no site-packages and no project on the path, which
is how it runs inside a container and proves the file is self-contained.

Timing checks are lower bounds only (a busy 2-core machine can only make things slower); every
wait has a deadline; "nothing arrives" is checked with a bounded poll.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import random
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Tuple

import pytest

from simulator.relay import READ_CHUNK, RelayControl, RelayControlError

RELAY = Path(__file__).resolve().parents[2] / "simulator" / "relay.py"
WAIT = 30.0  # the longest any single wait may take; never a timing assertion
QUIET = 0.5  # how long a bounded poll watches for data that must not arrive


def relay_argv(*args: str, python: str = sys.executable) -> List[str]:
    return [python, "-I", "-S", str(RELAY), *args]


@contextlib.contextmanager
def run_relay(*args: str, python: str = sys.executable) -> Iterator[subprocess.Popen]:
    """Start a relay on pipes; whatever happens, it is killed, reaped and its pipes closed."""
    proc = subprocess.Popen(relay_argv(*args, python=python), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=WAIT)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def wait_exit(proc: subprocess.Popen) -> Tuple[int, str]:
    """Wait (bounded) for the relay to exit by itself; return its status and stderr."""
    status = proc.wait(timeout=WAIT)
    assert proc.stderr is not None
    return status, proc.stderr.read().decode(errors="replace")


@pytest.fixture
def control_path() -> Iterator[str]:
    # tmp_path can exceed the 107-byte limit of a UNIX socket path; this stays short.
    directory = tempfile.mkdtemp(prefix="relay-")
    try:
        yield os.path.join(directory, "ctl.sock")
    finally:
        shutil.rmtree(directory)


@pytest.fixture
def server() -> Iterator[socket.socket]:
    """A loopback TCP listener standing in for sshd."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(WAIT)
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    try:
        yield sock
    finally:
        sock.close()


def address_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()
    return f"{host}:{port}"


def poll_until(condition: Callable[[], bool], timeout: float = WAIT) -> bool:
    """Re-check a condition that has no event of its own (relay stats) until a deadline."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)
    return True


class Driver:
    """Feeds a process's stdin and drains its stdout at the same time, in this thread."""

    def __init__(self, proc: subprocess.Popen) -> None:
        assert proc.stdin is not None and proc.stdout is not None
        self.stdin = proc.stdin
        self.stdout = proc.stdout
        os.set_blocking(self.stdin.fileno(), False)
        os.set_blocking(self.stdout.fileno(), False)
        self.pending = bytearray()
        self.received = bytearray()
        self.eof = False
        self.input_broken = False

    def send(self, data: bytes) -> None:
        self.pending += data

    def run_until(self, done: Callable[[], bool], timeout: float = WAIT) -> bool:
        deadline = time.monotonic() + timeout
        while not done():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            readers = [] if self.eof else [self.stdout]
            writers = [self.stdin] if self.pending and not self.stdin.closed else []
            readable, writable, _ = select.select(readers, writers, [], min(remaining, 0.02))
            if readable:
                data = os.read(self.stdout.fileno(), 1 << 20)
                self.received += data
                self.eof = not data
            if writable:
                self._write()
        return True

    def _write(self) -> None:
        try:
            sent = os.write(self.stdin.fileno(), self.pending[: 1 << 20])
        except BlockingIOError:
            return
        except BrokenPipeError:
            self.input_broken = True
            self.pending.clear()
            return
        del self.pending[:sent]

    def wait_for(self, nbytes: int) -> bytes:
        assert self.run_until(lambda: len(self.received) >= nbytes or self.eof), (
            f"only {len(self.received)} of {nbytes} bytes arrived within {WAIT} s")
        return bytes(self.received)

    def wait_eof(self) -> bytes:
        assert self.run_until(lambda: self.eof), f"no EOF within {WAIT} s"
        return bytes(self.received)

    def stays_silent(self, duration: float = QUIET) -> bool:
        """True if neither data nor EOF arrives for ``duration`` (a bounded poll)."""
        before = len(self.received)
        return not self.run_until(lambda: len(self.received) > before or self.eof, duration)

    def close_input(self) -> None:
        assert self.run_until(lambda: not self.pending), "relay stopped reading its stdin"
        self.stdin.close()

    def round_trip(self, data: bytes) -> float:
        """Send ``data`` through an echoing child; return how long the echo took."""
        start = time.monotonic()
        already = len(self.received)
        self.send(data)
        assert self.run_until(lambda: len(self.received) >= already + len(data)), "no echo"
        elapsed = time.monotonic() - start
        assert bytes(self.received[already:]) == data
        return elapsed


def listen_address(proc: subprocess.Popen) -> str:
    """Read the 'listening HOST:PORT' line a --listen relay prints."""
    assert proc.stdout is not None
    line = b""
    deadline = time.monotonic() + WAIT
    while not line.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"relay printed no address, only {line!r}"
        readable, _, _ = select.select([proc.stdout], [], [], remaining)
        if readable:
            chunk = os.read(proc.stdout.fileno(), 1)
            assert chunk, f"relay exited before listening: {wait_exit(proc)}"
            line += chunk
    word, address = line.decode().split()
    assert word == "listening"
    return address


def connect(address: str) -> socket.socket:
    host, port = address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=WAIT)
    return sock


def recv_until_closed(sock: socket.socket) -> Tuple[bytes, Optional[str]]:
    """Read until EOF or reset; return the data and how the stream ended."""
    data = bytearray()
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return bytes(data), "reset"
        if not chunk:
            return bytes(data), "eof"
        data += chunk


def recv_exactly(sock: socket.socket, nbytes: int) -> bytes:
    data = bytearray()
    while len(data) < nbytes:
        chunk = sock.recv(nbytes - len(data))
        assert chunk, f"EOF after {len(data)} of {nbytes} bytes"
        data += chunk
    return bytes(data)


def socket_stays_silent(sock: socket.socket, duration: float = QUIET) -> bool:
    """True if the socket shows neither data nor EOF nor an error for ``duration``."""
    readable, _, _ = select.select([sock], [], [], duration)
    return not readable


def pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def random_bytes(size: int, seed: int = 1) -> bytes:
    return random.Random(seed).getrandbits(size * 8).to_bytes(size, "little")


# ------------------------------------------------------------------------- data integrity


def test_jitter_never_reorders_bytes_through_exec_cat() -> None:
    data = random_bytes(5 * 1024 * 1024)
    with run_relay("--latency", "0.005", "--jitter", "0.005", "--seed", "7",
                   "--exec", "--", "cat") as proc:
        out, err = proc.communicate(data, timeout=WAIT * 2)
        assert proc.returncode == 0, err
    assert len(out) == len(data)
    assert hashlib.sha256(out).hexdigest() == hashlib.sha256(data).hexdigest()


def test_tcp_to_tcp_relays_each_connection_and_stops_on_sigterm(server: socket.socket) -> None:
    with run_relay("--listen", "127.0.0.1:0", "--connect", address_of(server)) as proc:
        address = listen_address(proc)
        clients, peers = [], []
        try:
            for index in range(2):
                clients.append(connect(address))
                peers.append(server.accept()[0])
                peers[index].settimeout(WAIT)
            for index, (client, peer) in enumerate(zip(clients, peers)):
                message = f"hello {index}".encode()
                client.sendall(message)
                assert recv_exactly(peer, len(message)) == message
                peer.sendall(message.upper())
                assert recv_exactly(client, len(message)) == message.upper()
        finally:
            for sock in clients + peers:
                sock.close()
        proc.send_signal(signal.SIGTERM)
        status, err = wait_exit(proc)
    assert status == 0, err


def test_proxy_mode_half_closes_and_exits_when_both_sides_are_done(
        server: socket.socket) -> None:
    with run_relay("--connect", address_of(server)) as proc:
        driver = Driver(proc)
        driver.send(b"request")
        peer, _ = server.accept()
        with peer:
            peer.settimeout(WAIT)
            driver.close_input()
            # Our stdin closing reaches the server as a FIN, after the data...
            assert recv_until_closed(peer) == (b"request", "eof")
            # ...and the other direction stays open until the server is done too.
            peer.sendall(b"late answer")
        assert driver.wait_eof() == b"late answer"
        status, err = wait_exit(proc)
    assert status == 0, err


# -------------------------------------------------------------------- latency, bandwidth


def test_latency_adds_at_least_the_configured_delay(control_path: str) -> None:
    latency = 0.1
    with run_relay("--latency", str(latency), "--control", control_path,
                   "--exec", "--", "cat") as proc, RelayControl(control_path, WAIT) as ctl:
        driver = Driver(proc)
        assert driver.round_trip(b"ping") >= 2 * latency
        # Changed at runtime, one direction only: the round trip is the sum of both.
        settings = ctl.set(latency=0.3, direction="upstream")
        assert settings["upstream"]["latency"] == 0.3
        assert settings["downstream"]["latency"] == latency
        assert driver.round_trip(b"pong") >= 0.3 + latency
        ctl.heal()  # back to the command line's settings
        assert ctl.stats()["upstream"]["settings"]["latency"] == latency
        driver.close_input()
        assert driver.wait_eof() == b"pingpong"
        status, err = wait_exit(proc)
    assert status == 0, err


def test_bandwidth_cap_gives_a_lower_bound_on_transfer_time() -> None:
    rate = 1_000_000
    data = random_bytes(1_500_000, seed=2)
    with run_relay("--bandwidth", str(rate), "--exec", "--", "cat") as proc:
        start = time.monotonic()
        out, err = proc.communicate(data, timeout=WAIT * 2)
        elapsed = time.monotonic() - start
        assert proc.returncode == 0, err
    assert out == data
    # The bucket may start full (50 ms of tokens); everything else waits for the rate.
    assert elapsed >= 1.2, f"1.5 MB at 1 MB/s took only {elapsed:.2f} s"


# ------------------------------------------------------------------------- stream faults


def test_cut_after_delivers_exactly_n_more_bytes_then_eof(control_path: str) -> None:
    with run_relay("--control", control_path, "--exec", "--", "cat") as proc, \
            RelayControl(control_path, WAIT) as ctl:
        driver = Driver(proc)
        driver.round_trip(b"0123456789")
        assert ctl.fault("cut_after", direction="downstream", nbytes=100) == 1
        data = random_bytes(1000, seed=3)
        driver.send(data)
        assert driver.wait_eof() == b"0123456789" + data[:100]
        wait_exit(proc)


def test_cut_after_on_tcp_resets_mid_stream(server: socket.socket, control_path: str) -> None:
    with run_relay("--listen", "127.0.0.1:0", "--connect", address_of(server),
                   "--control", control_path) as proc, RelayControl(control_path, WAIT) as ctl:
        with connect(listen_address(proc)) as client:
            peer, _ = server.accept()
            with peer:
                peer.settimeout(WAIT)
                client.sendall(b"frame header")
                assert recv_exactly(peer, 12) == b"frame header"
                assert ctl.fault("cut_after", direction="upstream", nbytes=100) == 1
                data = random_bytes(1000, seed=4)
                client.sendall(data)
                received, ending = recv_until_closed(peer)
                assert received == data[:100]
                assert ending == "reset"
            assert recv_until_closed(client) == (b"", "reset")
        assert ctl.stats()["links"] == {"active": 0, "total": 1}


def test_stall_buffers_and_resume_delivers_everything(control_path: str) -> None:
    data = random_bytes(200_000, seed=5)
    with run_relay("--control", control_path, "--exec", "--", "cat") as proc, \
            RelayControl(control_path, WAIT) as ctl:
        driver = Driver(proc)
        ctl.fault("stall")
        driver.send(data)
        assert driver.run_until(lambda: ctl.stats()["upstream"]["received"] == len(data))
        assert driver.stays_silent()
        stats = ctl.stats()
        assert stats["upstream"]["stalled"] and stats["upstream"]["queued"] == len(data)
        assert stats["upstream"]["forwarded"] == 0
        ctl.fault("resume")
        assert driver.wait_for(len(data)) == data
        driver.close_input()
        driver.wait_eof()
        status, err = wait_exit(proc)
    assert status == 0, err


def test_a_full_queue_stops_reading_instead_of_growing(control_path: str) -> None:
    max_queue = 65536
    data = random_bytes(4 * 1024 * 1024, seed=6)
    with run_relay("--max-queue", str(max_queue), "--control", control_path,
                   "--exec", "--", "cat") as proc, RelayControl(control_path, WAIT) as ctl:
        driver = Driver(proc)
        ctl.fault("stall", direction="upstream")
        driver.send(data)
        # Given time to read it all, the relay still must not: writes back up behind it.
        assert driver.stays_silent(1.0)
        received = ctl.stats()["upstream"]["received"]
        assert received <= max_queue + READ_CHUNK
        assert driver.pending, "everything was accepted: no backpressure"
        ctl.fault("resume", direction="upstream")
        assert driver.wait_for(len(data)) == data
        driver.close_input()
        driver.wait_eof()
        status, err = wait_exit(proc)
    assert status == 0, err


def test_reset_gives_both_tcp_peers_econnreset(server: socket.socket,
                                                control_path: str) -> None:
    with run_relay("--listen", "127.0.0.1:0", "--connect", address_of(server),
                   "--control", control_path) as proc, RelayControl(control_path, WAIT) as ctl:
        with connect(listen_address(proc)) as client:
            peer, _ = server.accept()
            with peer:
                peer.settimeout(WAIT)
                client.sendall(b"hi")
                assert recv_exactly(peer, 2) == b"hi"
                assert ctl.fault("reset") == 1
                assert recv_until_closed(peer) == (b"", "reset")
            assert recv_until_closed(client) == (b"", "reset")


def test_reset_in_proxy_mode_resets_the_server_and_closes_stdio(
        server: socket.socket, control_path: str) -> None:
    with run_relay("--connect", address_of(server), "--control", control_path) as proc, \
            RelayControl(control_path, WAIT) as ctl:
        driver = Driver(proc)
        peer, _ = server.accept()
        with peer:
            peer.settimeout(WAIT)
            peer.sendall(b"banner")
            assert driver.wait_for(6) == b"banner"
            assert ctl.fault("reset") == 1
            assert recv_until_closed(peer) == (b"", "reset")
        assert driver.wait_eof() == b"banner"
        status, err = wait_exit(proc)
    assert status == 0, err


def test_blackhole_keeps_the_pipe_open_but_delivers_nothing(control_path: str) -> None:
    with run_relay("--control", control_path, "--exec", "--", "cat") as proc, \
            RelayControl(control_path, WAIT) as ctl:
        driver = Driver(proc)
        driver.round_trip(b"before")
        ctl.fault("blackhole")
        driver.send(b"x" * 1000)
        assert driver.run_until(lambda: ctl.stats()["upstream"]["dropped"] == 1000)
        assert driver.stays_silent()
        assert proc.poll() is None
        ctl.heal()
        # Healed: the link works again, and what fell into the hole stays lost.
        driver.round_trip(b"after")
        driver.close_input()
        assert driver.wait_eof() == b"beforeafter"
        status, err = wait_exit(proc)
    assert status == 0, err


def test_blackhole_on_tcp_is_a_silent_partition(server: socket.socket,
                                                control_path: str) -> None:
    with run_relay("--listen", "127.0.0.1:0", "--connect", address_of(server),
                   "--control", control_path) as proc, RelayControl(control_path, WAIT) as ctl:
        with connect(listen_address(proc)) as client:
            peer, _ = server.accept()
            with peer:
                peer.settimeout(WAIT)
                ctl.fault("blackhole")
                client.sendall(b"lost")
                client.shutdown(socket.SHUT_WR)
                # Neither the data nor the FIN gets through, and nothing breaks either.
                assert socket_stays_silent(peer)
                peer.sendall(b"lost too")
                assert socket_stays_silent(client)
                ctl.heal()
                # A real FIN is retransmitted until the partition heals; so is ours.
                assert recv_until_closed(peer) == (b"", "eof")
                peer.sendall(b"answer")
                assert recv_exactly(client, 6) == b"answer"


# ----------------------------------------------------------------------- control channel


def _raw_request(sock: socket.socket, line: bytes) -> dict:
    sock.sendall(line + b"\n")
    answer = b""
    while not answer.endswith(b"\n"):
        chunk = sock.recv(65536)
        assert chunk, "relay closed the control connection"
        answer += chunk
    return json.loads(answer)


@pytest.mark.parametrize(("line", "expected"), [
    (b"not json", "not valid JSON"),
    (b"[1, 2]", "must be a JSON object"),
    (b'{"frobnicate": 1}', "exactly one of the keys"),
    (b'{"stats": true, "heal": true}', "exactly one of the keys"),
    (b'{"set": {"latency": -1}}', "latency must be between 0"),
    (b'{"set": {"latency": "fast"}}', "latency must be a number"),
    (b'{"set": {"colour": 1}}', "unknown setting 'colour'"),
    (b'{"set": {"latency": 0.1, "direction": "sideways"}}', "direction must be one of"),
    (b'{"set": {"direction": "both"}}', "needs at least one of"),
    (b'{"set": 5}', '"set" takes an object'),
    (b'{"set": {"bandwidth": -5}}', "bandwidth must be a positive number"),
    (b'{"fault": "explode"}', "unknown fault 'explode'"),
    (b'{"fault": "cut_after"}', "needs nbytes"),
    (b'{"fault": "cut_after", "nbytes": -1}', "nbytes must be a whole number"),
    (b'{"fault": "stall", "nbytes": 3}', "takes no nbytes"),
    (b'{"fault": "reset", "direction": "upstream"}', "takes no direction"),
    (b'{"fault": "stall", "when": "now"}', "unexpected key 'when'"),
    (b'{"heal": false}', '"heal" takes true'),
])
def test_control_errors_name_what_was_wrong(control_path: str, line: bytes,
                                            expected: str) -> None:
    with run_relay("--control", control_path, "--exec", "--", "cat") as proc:
        RelayControl(control_path, WAIT).close()  # wait until the relay listens
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(WAIT)
            sock.connect(control_path)
            answer = _raw_request(sock, line)
            assert answer["ok"] is False
            assert expected in answer["error"]
            # A refused request changes nothing and leaves the connection usable.
            stats = _raw_request(sock, b'{"stats": true}')
            assert stats["ok"] is True
            assert stats["stats"]["upstream"]["settings"]["latency"] == 0.0
            assert not stats["stats"]["upstream"]["stalled"]
        proc.stdin.close()
        wait_exit(proc)


def test_control_client_reports_errors_and_absent_relays(control_path: str) -> None:
    with pytest.raises(RelayControlError, match=r"ctl\.sock"):
        RelayControl(control_path, timeout=0.2)
    with run_relay("--control", control_path, "--exec", "--", "cat") as proc:
        with RelayControl(control_path, WAIT) as ctl:
            with pytest.raises(RelayControlError, match="jitter must be a number"):
                ctl.set(jitter="lots")
            stats = ctl.stats()
            assert stats["mode"] == "exec" and pid_exists(stats["child_pid"])
        proc.stdin.close()
        status, err = wait_exit(proc)
    assert status == 0, err
    assert not os.path.exists(control_path), "control socket left behind"


def test_a_live_control_socket_is_not_taken_over(control_path: str) -> None:
    with run_relay("--control", control_path, "--exec", "--", "cat") as first:
        RelayControl(control_path, WAIT).close()
        with run_relay("--control", control_path, "--exec", "--", "cat") as second:
            status, err = wait_exit(second)
        assert status == 2
        assert "is in use" in err
        with RelayControl(control_path, WAIT) as ctl:
            assert ctl.stats()["child_pid"] > 0  # the first relay still owns it
        first.kill()
        wait_exit(first)
    # Killed, the first relay left its socket behind; a new relay replaces the stale one.
    with run_relay("--control", control_path, "--exec", "--", "cat") as third:
        with RelayControl(control_path, WAIT) as ctl:
            assert ctl.stats()["child_pid"] > 0
        third.stdin.close()
        status, err = wait_exit(third)
    assert status == 0, err


@pytest.mark.parametrize(("args", "expected"), [
    ([], "nothing to relay"),
    (["--exec"], "--exec needs a command"),
    (["--", "cat"], "needs --exec"),
    (["--listen", "127.0.0.1:0"], "--listen needs --connect"),
    (["--connect", "nowhere"], "bad --connect address 'nowhere'"),
    (["--latency", "-1", "--exec", "--", "cat"], "--latency must be between 0"),
    (["--direction", "sideways", "--exec", "--", "cat"], "invalid choice: 'sideways'"),
    (["--once", "--exec", "--", "cat"], "--once only makes sense with --listen"),
])
def test_command_line_errors_name_what_was_wrong(args: List[str], expected: str) -> None:
    with run_relay(*args) as proc:
        status, err = wait_exit(proc)
    assert status == 2
    assert expected in err


def test_connect_failure_exits_1_with_a_message(server: socket.socket) -> None:
    address = address_of(server)
    server.close()  # nobody listens there any more
    with run_relay("--connect", address) as proc:
        status, err = wait_exit(proc)
    assert status == 1
    assert f"cannot connect to {address}" in err


# ------------------------------------------------------------------------ --exec lifetime


@pytest.mark.parametrize(("script", "close_stdin", "expected"), [
    ("exit 7", False, 7),  # the child's side closing ends the relay, our stdin still open
    ("kill -TERM $$", False, 128 + signal.SIGTERM),
    ("cat; exit 3", True, 3),  # our stdin closing reaches the child as EOF
])
def test_exec_returns_the_childs_exit_status(script: str, close_stdin: bool,
                                             expected: int) -> None:
    with run_relay("--exec", "--", "sh", "-c", script) as proc:
        if close_stdin:
            proc.stdin.close()
        status, err = wait_exit(proc)
    assert status == expected, err


def test_exec_of_a_missing_command_exits_127() -> None:
    with run_relay("--exec", "--", "/nonexistent/command") as proc:
        status, err = wait_exit(proc)
    assert status == 127
    assert "cannot run '/nonexistent/command'" in err


def test_relay_exits_and_kills_its_child_when_stdin_closes() -> None:
    # The child ignores EOF on its stdin; after --linger the relay must not wait any longer.
    with run_relay("--linger", "0.5", "--exec", "--", "sh", "-c",
                   "echo $$; exec sleep 60") as proc:
        driver = Driver(proc)
        assert driver.run_until(lambda: driver.received.endswith(b"\n"))
        child = int(bytes(driver.received).decode())
        assert pid_exists(child)
        driver.close_input()
        status, err = wait_exit(proc)
    assert status == 128 + signal.SIGTERM, err
    assert not pid_exists(child), "the child outlived the relay"


def test_relay_stops_its_child_on_sigterm() -> None:
    with run_relay("--exec", "--", "sh", "-c", "echo $$; exec sleep 60") as proc:
        driver = Driver(proc)
        assert driver.run_until(lambda: driver.received.endswith(b"\n"))
        child = int(bytes(driver.received).decode())
        proc.send_signal(signal.SIGTERM)
        status, err = wait_exit(proc)
    assert status == 128 + signal.SIGTERM, err
    assert not pid_exists(child)


# ---------------------------------------------------------------------------- portability


def _python39() -> Optional[str]:
    """Debian bullseye's python3 is 3.9: the oldest interpreter the relay must run on."""
    root = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    candidates = [shutil.which("python3.9"),
                  *sorted(glob.glob(os.path.join(root, "versions", "3.9*", "bin", "python3.9")))]
    for candidate in candidates:
        if candidate and subprocess.run([candidate, "-c", "pass"], capture_output=True,
                                        timeout=WAIT, check=False).returncode == 0:
            return candidate
    return None


def test_runs_on_python_3_9() -> None:
    python = _python39()
    if python is None:
        pytest.skip("no working python3.9 interpreter on this machine")
    data = random_bytes(300_000, seed=8)
    with run_relay("--latency", "0.01", "--jitter", "0.01", "--exec", "--", "cat",
                   python=python) as proc:
        out, err = proc.communicate(data, timeout=WAIT)
        assert proc.returncode == 0, err
    assert out == data
