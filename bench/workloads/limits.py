"""The physical limits of this machine, measured the same way the implementations are.

Nothing an implementation does can beat these: starting a bare interpreter, and moving bytes
between two Python processes over a pipe pair or a socketpair with plain ``os.read`` /
``os.write``. They put the other tables in proportion (how much of a cold start is the
interpreter itself, how far a round trip is from the kernel's).

Runs with any Python 3.9+ and the standard library only.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Tuple

import common
from common import Recorder, timed

#: The peer process: echo fixed-size messages, or sink N bytes and answer with a count.
PEER = r"""
import os, sys
rfd, wfd, mode, size = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
def read_exact(n):
    buf = bytearray()
    while len(buf) < n:
        chunk = os.read(rfd, n - len(buf))
        if not chunk:
            sys.exit(0)
        buf += chunk
    return bytes(buf)
if mode == "echo":
    while True:
        os.write(wfd, read_exact(size))
else:
    while True:
        left = size
        while left:
            chunk = os.read(rfd, min(left, 1 << 20))
            if not chunk:
                sys.exit(0)
            left -= len(chunk)
        os.write(wfd, size.to_bytes(8, "big"))
"""

MSG_BYTES = 64  # about the size of a small call message


class Peer:
    """A child Python process at the far end of a pipe pair or a socketpair."""

    def __init__(self, transport: str, mode: str, size: int) -> None:
        if transport == "pipe":
            child_r, self.wfd = os.pipe()
            self.rfd, child_w = os.pipe()
        elif transport == "socketpair":
            mine, theirs = socket.socketpair()
            self._sockets = (mine, theirs)
            self.rfd = self.wfd = mine.fileno()
            child_r = child_w = theirs.fileno()
        else:
            raise ValueError(f"transport must be 'pipe' or 'socketpair', not {transport!r}")
        self.transport = transport
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", PEER, str(child_r), str(child_w), mode,
             str(size)],
            pass_fds=(child_r, child_w),
        )
        if transport == "pipe":
            os.close(child_r)
            os.close(child_w)
        else:
            self._sockets[1].close()

    def read_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = os.read(self.rfd, n - len(buf))
            if not chunk:
                raise EOFError(f"{self.transport} peer closed after {len(buf)} of {n} bytes")
            buf += chunk
        return bytes(buf)

    def write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.wfd, view):]

    def close(self) -> None:
        if self.transport == "pipe":
            os.close(self.wfd)
            os.close(self.rfd)
        else:
            self._sockets[0].close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> Peer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def interpreter_start(params: Dict[str, Any], rec: Recorder) -> None:
    """``python -I -S -c pass``: the floor of any cold start on this machine, in wall time and
    in CPU seconds (user + system of the waited-for interpreter and of this process starting
    and waiting for it, as a fan-out's CPU per child counts the master's share too)."""
    runs = int(params.get("starts", 15))
    argv = [sys.executable, "-I", "-S", "-c", "pass"]
    walls, cpus = [], []
    for _ in range(runs):
        cpu = common.cpu_seconds()
        walls.append(timed(lambda: subprocess.run(argv, check=True)))
        cpus.append(common.cpu_seconds() - cpu)
    rec.samples("limits.interpreter_start", "s", walls)
    rec.samples("limits.interpreter_start_cpu", "s", cpus)


def _roundtrips(transport: str, warmup: int, count: int) -> List[float]:
    msg = b"x" * MSG_BYTES
    with Peer(transport, "echo", MSG_BYTES) as peer:

        def one() -> None:
            peer.write_all(msg)
            peer.read_exact(MSG_BYTES)

        for _ in range(warmup):
            one()
        return [timed(one) for _ in range(count)]


def _transfers(transport: str, total: int, repeat: int) -> Tuple[List[float], int]:
    chunk = os.urandom(1 << 20)
    data = chunk * max(1, total // len(chunk))
    with Peer(transport, "sink", len(data)) as peer:

        def one() -> None:
            peer.write_all(data)
            if int.from_bytes(peer.read_exact(8), "big") != len(data):
                raise RuntimeError(f"{transport} peer counted a different size")

        one()  # warm-up: page in the buffers on both sides
        return [timed(one) for _ in range(repeat)], len(data)


def ipc(params: Dict[str, Any], rec: Recorder) -> None:
    """Round trip of a 64-byte message, and 64 MiB one way, per transport."""
    warmup, count = int(params.get("warmup", 500)), int(params.get("calls", 5000))
    total, repeat = int(params.get("transfer_bytes", 64 << 20)), int(params.get("repeat", 3))
    for transport in ("pipe", "socketpair"):
        rec.samples(f"limits.{transport}_rt", "s", _roundtrips(transport, warmup, count))
        samples, size = _transfers(transport, total, repeat)
        rec.samples(f"limits.{transport}_tp", "s", samples, bytes=size)


def socketpair_transfer(params: Dict[str, Any], rec: Recorder) -> None:
    """Bytes one way over a socketpair to another Python process, in the size a file
    workload moves: what FileService's throughput is compared with."""
    size, repeat = int(params.get("bytes", 512 << 20)), int(params.get("repeat", 2))
    samples, size = _transfers("socketpair", size, repeat)
    name = f"{size >> 30}GiB" if size >= 1 << 30 and not size % (1 << 30) else \
        f"{size >> 20}MiB"
    rec.samples(f"files.socketpair.{name}", "s", samples, bytes=size)


def limits(params: Dict[str, Any], rec: Recorder) -> None:
    """Everything above in one run."""
    interpreter_start(params, rec)
    ipc(params, rec)


def _first_line(argv: List[str]) -> float:
    """Seconds from starting ``argv`` to the first line of its output; the exit (ssh's session
    teardown) is waited for untimed, as a library's connect does not include it either."""
    start = time.perf_counter()
    with subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE) as proc:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        elapsed = time.perf_counter() - start
        proc.stdout.read()
        if proc.wait(timeout=60) != 0 or line.strip() != b"ready":
            raise RuntimeError(f"{argv[-1]!r} over ssh: exit {proc.returncode}, said {line!r}")
    return elapsed


def ssh(params: Dict[str, Any], rec: Recorder) -> None:
    """Time to the first output of an ssh login to the harness's sshd, running a shell
    ``echo``, and running the remote interpreter: the floor of any connect over ssh.

    Same options as the libraries get (``common.ssh_client_args``), with compression on as
    their default; the two commands take turns so that noise falls on both.
    """
    runs = int(params.get("connects", 10))
    base = ["ssh", "-o", "Compression=yes", *common.ssh_client_args(params)]
    commands = {"ssh.login": "echo ready",
                "ssh.login_python": f"{params['python_path']} -c 'print(\"ready\")'"}
    samples: Dict[str, List[float]] = {name: [] for name in commands}
    for _ in range(runs):
        for name, command in commands.items():
            samples[name].append(_first_line([*base, command]))
    for name, values in samples.items():
        rec.samples(name, "s", values)


def ssh_fanout(params: Dict[str, Any], rec: Recorder) -> None:
    """Wall time of bare ssh logins to the harness's sshd, one per account, all started at once,
    until the last has printed from the remote interpreter: the floor under the libraries'
    concurrent ssh connects (``ssh_fanout`` in the other scripts).

    Every session stays open until all have printed (the remote interpreter then waits for
    its stdin to close), as the libraries' connections do: no session's teardown competes
    with the others' logins.
    """
    users = list(params["usernames"])
    all_ready = threading.Barrier(len(users))
    command = (f"{params['python_path']} -c "
               "'import sys; print(\"ready\", flush=True); sys.stdin.read()'")

    def login(user: str) -> float:
        argv = ["ssh", "-o", "Compression=yes",
                *common.ssh_client_args({**params, "username": user}), command]
        with subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE) as proc:
            assert proc.stdin is not None and proc.stdout is not None
            try:
                line = proc.stdout.readline()
                arrived = time.perf_counter()
                all_ready.wait(timeout=300)
            finally:
                proc.stdin.close()
            proc.stdout.read()
            if proc.wait(timeout=60) != 0 or line.strip() != b"ready":
                all_ready.abort()
                raise RuntimeError(f"ssh as {user}: exit {proc.returncode}, said {line!r}")
        return arrived

    with ThreadPoolExecutor(max_workers=len(users)) as pool:
        start = time.perf_counter()
        last = max(pool.map(login, users))
    rec.samples("ssh.login_python_concurrent", "s", [last - start], connections=len(users))


WORKLOADS = {"limits": limits, "interpreter_start": interpreter_start, "ipc": ipc, "ssh": ssh,
             "ssh_fanout": ssh_fanout, "socketpair_transfer": socketpair_transfer}

if __name__ == "__main__":
    sys.exit(common.run_main(WORKLOADS))
