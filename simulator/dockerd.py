"""Make sure a Docker engine answers, installing and starting Debian's dockerd when none does.

A new machine (and so CI) has only the docker client: no engine, no service manager that would
start one. :func:`ensure_dockerd` is idempotent: an engine that already answers is left alone;
otherwise ``docker.io`` is installed with apt if ``dockerd`` is missing (root only) and the
daemon is started detached, logging to a file, and waited for with a bounded timeout.

The engine runs with ``--iptables=false --ip-masq=false --bridge=none``: the simulator uses
only ``--internal`` networks it creates itself, so Docker must not touch the machine's firewall
or NAT, nor create a default bridge that would give containers a way out.

Command line: ``python -m simulator.dockerd [--timeout S]`` prints the engine version.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import docker
import docker.errors
import requests.exceptions
from filelock import FileLock, Timeout

__all__ = [
    "DAEMON_FLAGS",
    "DEFAULT_HOST",
    "DockerdError",
    "Engine",
    "apt_install",
    "default_engine",
    "engine_client",
    "ensure_dockerd",
    "main",
    "socket_accepts",
]

DEFAULT_HOST = "unix:///var/run/docker.sock"
DAEMON_FLAGS = ("--iptables=false", "--ip-masq=false", "--bridge=none")
_APT_TIMEOUT = 900.0
_PING_TIMEOUT = 5
_POLL_INTERVAL = 0.2

Progress = Callable[[str], None]


class DockerdError(RuntimeError):
    """No Docker engine answers and this process could not start one; says what to do."""


class Engine:
    """Where one Docker engine listens and keeps its state.

    The default engine is the machine's own (/var/run/docker.sock, /var/lib/docker). A
    ``state_dir`` engine keeps socket, pid file, data and log under one directory: a second,
    private daemon, which tests use to exercise the start path without touching the shared one.
    """

    def __init__(self, host: str = DEFAULT_HOST, state_dir: Optional[Path] = None) -> None:
        self.state_dir = state_dir
        if state_dir is not None:
            self.host = f"unix://{state_dir}/docker.sock"
            self.pidfile = state_dir / "docker.pid"
            self.log_path = state_dir / "dockerd.log"
            self.lock_path = state_dir / "dockerd.lock"
        else:
            self.host = host
            self.pidfile = Path("/var/run/docker.pid")
            self.log_path = Path("/var/log/mitogen-sim/dockerd.log")
            self.lock_path = Path("/var/lock/mitogen-sim-dockerd.lock")

    @property
    def startable(self) -> bool:
        """Only our own state dir or the default local socket are ours to start."""
        return self.state_dir is not None or self.host == DEFAULT_HOST

    def daemon_args(self) -> list[str]:
        args = list(DAEMON_FLAGS)
        if self.state_dir is not None:
            args += ["--host", self.host, "--pidfile", str(self.pidfile),
                     "--data-root", str(self.state_dir / "data"),
                     "--exec-root", str(self.state_dir / "exec")]
        return args

    def running_pid(self) -> Optional[int]:
        """The pid in the pid file if that process is a live dockerd, else None."""
        try:
            pid = int(self.pidfile.read_text().strip())
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except (OSError, ValueError):
            return None
        return pid if comm == "dockerd" else None

    def __repr__(self) -> str:
        return f"Engine(host={self.host!r}, state_dir={self.state_dir!r})"


def default_engine() -> Engine:
    """The engine the docker client would use: $DOCKER_HOST, else the local default socket."""
    return Engine(host=os.environ.get("DOCKER_HOST") or DEFAULT_HOST)


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _client(engine: Engine, timeout: float) -> docker.DockerClient:
    return docker.DockerClient(base_url=engine.host, timeout=timeout)


def socket_accepts(host: str) -> bool:
    """Whether anything accepts connections at the engine's address.

    Checked with our own socket first because the docker SDK leaks its socket when a connect
    fails, which would show up as a ResourceWarning (an error in the test suite).
    """
    try:
        if host.startswith("unix://"):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(_PING_TIMEOUT)
                sock.connect(host[len("unix://"):])
        elif host.startswith("tcp://"):
            address, _, port = host[len("tcp://"):].rstrip("/").rpartition(":")
            with socket.create_connection((address.strip("[]"), int(port)), _PING_TIMEOUT):
                pass
    except (OSError, ValueError):
        return False
    return True


def _answering_client(engine: Engine, client_timeout: float) -> Optional[docker.DockerClient]:
    """A client if the engine answers a ping now, else None (never raises for 'not up')."""
    if not socket_accepts(engine.host):
        return None
    errors = (docker.errors.DockerException, requests.exceptions.RequestException, OSError)
    try:
        probe = _client(engine, _PING_TIMEOUT)  # asks the engine its API version: a probe too
    except errors:
        return None
    try:
        probe.ping()
    except errors:
        return None
    finally:
        probe.close()
    return _client(engine, client_timeout)


def engine_client(client_timeout: float = 300.0) -> docker.DockerClient:
    """A client of the engine that answers now; never installs or starts anything.

    Tests use this: what they need is prepared before pytest starts (``.ci/run``), so a
    missing engine is a skip (or, where ``.ci/run`` set it up, a failure), never a wait.
    """
    engine = default_engine()
    client = _answering_client(engine, client_timeout)
    if client is not None:
        return client
    path = engine.host[len("unix://"):] if engine.host.startswith("unix://") else None
    if path and os.path.exists(path) and not os.access(path, os.R_OK | os.W_OK):
        raise DockerdError(f"this user may not use the Docker engine at {engine.host} "
                           f"(no access to {path}): run as root or as a member of its group")
    raise DockerdError(f"no Docker engine answers at {engine.host}; start one as root "
                       f"with `bash containers/ensure-docker.sh` in a clone (or `python -m "
                       f"simulator.dockerd`)")


def _is_root() -> bool:
    return os.geteuid() == 0


def apt_install(packages: Sequence[str], progress: Progress = _stderr) -> None:
    """Install Debian packages (root only), refreshing the package lists first."""
    if not _is_root():
        raise DockerdError(f"{' '.join(packages)} missing and not running as root; run as root: "
                           f"apt-get update && apt-get install -y {' '.join(packages)}")
    if shutil.which("apt-get") is None:
        raise DockerdError(f"{' '.join(packages)} missing and this machine has no apt-get; "
                           "install them with its package manager")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    # Parallel image builds may each find a package missing: one apt at a time in this
    # process, and apt itself waits for another process's lock instead of failing at once.
    wait = ["-o", f"DPkg::Lock::Timeout={_APT_TIMEOUT:.0f}"]
    with _apt_lock:
        for argv in (["apt-get", *wait, "update", "-q"],
                     ["apt-get", *wait, "install", "-y", "-q", *packages]):
            _run_apt(argv, env, progress)


_apt_lock = threading.Lock()


def _run_apt(argv: list, env: dict, progress: Progress) -> None:
    progress(f"dockerd: running {' '.join(argv)}")
    try:
        proc = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=_APT_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        raise DockerdError(f"{' '.join(argv)} took over {_APT_TIMEOUT:.0f}s") from None
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise DockerdError(f"{' '.join(argv)} failed ({proc.returncode}):\n{tail}")


def _remove_stale_pidfiles(engine: Engine, progress: Progress) -> None:
    """Drop pid files of a daemon that was killed (e.g. when the previous session ended).

    dockerd refuses to start while its pid file names a live process, and trusts a live
    process named in containerd's pid file; after a kill those pids may belong to anything.
    """
    exec_root = engine.state_dir / "exec" if engine.state_dir else Path("/var/run/docker")
    for pidfile, name in ((engine.pidfile, "dockerd"),
                          (exec_root / "containerd" / "containerd.pid", "containerd")):
        try:
            pid = int(pidfile.read_text().strip())
        except (OSError, ValueError):
            continue
        try:
            alive = Path(f"/proc/{pid}/comm").read_text().strip() == name
        except OSError:
            alive = False
        if not alive:
            progress(f"dockerd: removing stale {pidfile} (pid {pid} is not a {name})")
            pidfile.unlink(missing_ok=True)


def _log_tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _launch(engine: Engine, dockerd: str) -> None:
    """Start dockerd detached: its own session, not our child, stdio to the log file.

    ``setsid --fork`` returns at once and leaves dockerd parented to init, so the daemon
    outlives this process (and is not a child process that a test would have to reap).
    ``docker-init -s`` sits above it as a subreaper: containerd's shims are re-parented to it
    and reaped, where the machine's own init may leave them as zombies.
    """
    engine.log_path.parent.mkdir(parents=True, exist_ok=True)
    argv = [dockerd, *engine.daemon_args()]
    init = shutil.which("docker-init")
    if init is not None:
        argv = [init, "-s", "--", *argv]
    setsid = shutil.which("setsid")
    if setsid is None:
        raise DockerdError("cannot start dockerd detached: `setsid` (util-linux) is missing")
    with open(engine.log_path, "ab") as log:
        log.write(f"--- {time.strftime('%Y-%m-%dT%H:%M:%S')} starting: {' '.join(argv)}\n"
                  .encode())
        log.flush()
        subprocess.run([setsid, "--fork", *argv], stdin=subprocess.DEVNULL, stdout=log,
                       stderr=log, check=True, timeout=30)


def _deadline_polls(timeout: float) -> Iterator[float]:
    """Yield the time left, every poll interval, until the deadline passes."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return
        yield left
        time.sleep(min(_POLL_INTERVAL, left))


_FATAL_MARKS = ("failed to start daemon", "level=fatal")


def _log_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _fatal_since(path: Path, offset: int) -> bool:
    """Whether dockerd logged a fatal start-up error after ``offset``."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
    except OSError:
        return False
    return any(mark in text for mark in _FATAL_MARKS)


def _wait_answering(engine: Engine, timeout: float, client_timeout: float,
                    launched_at: float, log_offset: Optional[int] = None) -> docker.DockerClient:
    """Poll until the engine answers; fail early if the daemon we launched gave up."""
    seen_pid = False
    for _left in _deadline_polls(timeout):
        client = _answering_client(engine, client_timeout)
        if client is not None:
            return client
        pid = engine.running_pid()
        seen_pid = seen_pid or pid is not None
        died = seen_pid and pid is None
        if died or (log_offset is not None and _fatal_since(engine.log_path, log_offset)):
            raise DockerdError(f"dockerd exited while starting; log {engine.log_path}:\n"
                               f"{_log_tail(engine.log_path)}")
    raise DockerdError(f"dockerd did not answer at {engine.host} within {timeout:.0f}s "
                       f"(started {time.monotonic() - launched_at:.0f}s ago); "
                       f"log {engine.log_path}:\n{_log_tail(engine.log_path)}")


def ensure_dockerd(timeout: float = 60.0, *, engine: Optional[Engine] = None,
                   client_timeout: float = 300.0,
                   progress: Progress = _stderr) -> docker.DockerClient:
    """Return a client of an engine that answers, starting the engine if it does not.

    Safe to call from many processes at once (pytest-xdist workers): a file lock makes one of
    them start the daemon while the others wait for it to answer. ``timeout`` bounds the wait
    for the daemon (not an apt install, which has its own bound). The caller closes the client.
    """
    engine = engine or default_engine()
    client = _answering_client(engine, client_timeout)
    if client is not None:
        return client
    if not engine.startable:
        raise DockerdError(f"no Docker engine answers at {engine.host} (from $DOCKER_HOST); "
                           "start it, or unset DOCKER_HOST to use the local default engine")
    if not _is_root():
        raise DockerdError(f"no Docker engine answers at {engine.host} and starting one needs "
                           "root: run `sudo bash containers/ensure-docker.sh` in a clone, or "
                           "`sudo python -m simulator.dockerd`")
    engine.lock_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with FileLock(str(engine.lock_path), timeout=timeout + _APT_TIMEOUT):
            return _start_locked(engine, timeout, client_timeout, progress)
    except Timeout:
        raise DockerdError(f"another process holds {engine.lock_path} while starting dockerd; "
                           "gave up waiting") from None


def _start_locked(engine: Engine, timeout: float, client_timeout: float,
                  progress: Progress) -> docker.DockerClient:
    client = _answering_client(engine, client_timeout)
    if client is not None:  # another process started it while we waited for the lock
        return client
    started = time.monotonic()
    pid = engine.running_pid()
    if pid is not None:
        progress(f"dockerd: pid {pid} is starting; waiting for it to answer at {engine.host}")
        return _wait_answering(engine, timeout, client_timeout, started)
    dockerd = shutil.which("dockerd") or "/usr/sbin/dockerd"
    if not os.access(dockerd, os.X_OK):
        progress("dockerd: not installed; installing Debian's docker.io")
        apt_install(["docker.io"], progress)
        client = _answering_client(engine, client_timeout)  # the package may start it itself
        if client is not None:
            return client
        dockerd = shutil.which("dockerd") or "/usr/sbin/dockerd"
    _remove_stale_pidfiles(engine, progress)
    progress(f"dockerd: starting {dockerd} {' '.join(engine.daemon_args())} "
             f"(log {engine.log_path})")
    log_offset = _log_size(engine.log_path)
    _launch(engine, dockerd)
    client = _wait_answering(engine, timeout, client_timeout, started, log_offset)
    progress(f"dockerd: answering after {time.monotonic() - started:.1f}s")
    return client


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m simulator.dockerd",
        description="Make sure a Docker engine answers (install and start dockerd if needed).")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="seconds to wait for a started daemon to answer (default 60)")
    args = parser.parse_args(argv)
    try:
        client = ensure_dockerd(args.timeout)
    except DockerdError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        version = client.version()
    finally:
        client.close()
    host = default_engine().host
    print(f"Docker engine {version.get('Version')} (API {version.get('ApiVersion')}) "
          f"answering at {host}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
