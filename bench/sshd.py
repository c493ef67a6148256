"""One private OpenSSH server on 127.0.0.1 for the ``ssh`` workload, started and stopped by
the harness around the whole run.

Everything it needs lives in one temp directory: the server's configuration, a fresh host key,
a fresh client key and the ``authorized_keys`` file holding it. Nothing of the machine's own
ssh setup is read or changed (``/etc/ssh``, the system's sshd, ``/root/.ssh``), and the
directory is removed when the run ends, however it ends.

The login is ``root`` with the generated key only (``PermitRootLogin prohibit-password``,
``AllowUsers root``, no passwords). That was chosen over a dedicated bench account because a
new account means editing ``/etc/passwd``, ``/etc/shadow`` and ``/etc/group`` and making a home
directory, which a killed harness would leave behind; this server leaves nothing. The workloads
already run as root, so the remote children get no rights the local ones lack, and the server
listens on loopback only and accepts one key that exists for the length of the run.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Set, Tuple

__all__ = ["SSHD", "SshTarget", "SshdUnavailable", "serve", "why_unavailable"]

SSHD = "/usr/sbin/sshd"
#: The interpreter the remote children run (the issue's setup: the system's Python 3).
REMOTE_PYTHON = "/usr/bin/python3"
#: OpenSSH refuses to start without its privilege-separation directory.
PRIVSEP_DIR = Path("/run/sshd")
LISTEN_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0


class SshdUnavailable(RuntimeError):
    """The server cannot run here; the message says why (recorded as the skip reason)."""


@dataclass(frozen=True)
class SshTarget:
    """Where the workloads log in: passed to them as workload parameters."""

    hostname: str
    port: int
    username: str
    identity_file: str
    python_path: str

    def params(self) -> Dict[str, Any]:
        return {"hostname": self.hostname, "port": self.port, "username": self.username,
                "identity_file": self.identity_file, "python_path": self.python_path}


def why_unavailable() -> Optional[str]:
    """Why this machine cannot host the server, or None when it can."""
    if os.geteuid() != 0:
        return "not root: the bench's sshd logs in as root on loopback"
    for program in (SSHD, REMOTE_PYTHON):
        if not os.access(program, os.X_OK):
            return f"{program} is missing"
    for program in ("ssh", "ssh-keygen"):
        if shutil.which(program) is None:
            return f"{program} is not on PATH"
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _config(tmp: Path, port: int) -> str:
    # StrictModes off: sshd would refuse an authorized_keys file below the world-writable
    # /tmp. Harmless here: the file is ours, and the directory holding it is 0700.
    return "\n".join([
        f"Port {port}",
        "ListenAddress 127.0.0.1",
        f"HostKey {tmp / 'host_ed25519'}",
        f"PidFile {tmp / 'sshd.pid'}",
        f"AuthorizedKeysFile {tmp / 'authorized_keys'}",
        "StrictModes no",
        "UsePAM no",
        "PermitRootLogin prohibit-password",
        "AllowUsers root",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "UseDNS no",
        "PrintMotd no",
        "PrintLastLog no",
        "X11Forwarding no",
        "AllowTcpForwarding no",
        "MaxStartups 50:30:100",
        "LogLevel VERBOSE",
        "",
    ])


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "mitogen-bench",
                    "-f", str(path)], check=True, capture_output=True, timeout=60)


def _wait_listening(port: int, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + LISTEN_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SshdUnavailable(f"sshd exited with {proc.returncode}: {_tail(log)}")
        with socket.socket() as sock:
            sock.settimeout(1.0)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)  # polling a port that is not open yet: there is no event to wait on
    raise SshdUnavailable(f"sshd did not listen on port {port} in {LISTEN_TIMEOUT:.0f} s: "
                          f"{_tail(log)}")


def _tail(log: Path) -> str:
    try:
        lines = log.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "no log"
    return " / ".join(lines[-3:])[-500:] or "empty log"


def _start_time(pid: int) -> Optional[str]:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _descendants(root: int) -> Set[Tuple[int, str]]:
    """(pid, start time) of every process below ``root``: the per-connection sshd processes
    leave sshd's process group (setsid), so a group kill would miss them."""
    children: Dict[int, List[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(name))
    found: Set[Tuple[int, str]] = set()
    todo = list(children.get(root, ()))
    while todo:
        pid = todo.pop()
        started = _start_time(pid)
        if started is not None:
            found.add((pid, started))
        todo.extend(children.get(pid, ()))
    return found


def _stop(proc: subprocess.Popen) -> None:
    """Stop the server and any session it still serves, within bounded time."""
    leftovers = _descendants(proc.pid)
    proc.terminate()
    try:
        proc.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=STOP_TIMEOUT)
    for pid, started in leftovers:
        if _start_time(pid) == started:  # still the same process, not a reused pid
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """Let SIGTERM (a CI job cancelled, ``timeout``) run the clean-up instead of skipping it."""
    def unwind(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    try:
        previous = signal.signal(signal.SIGTERM, unwind)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _privsep_dir() -> Iterator[None]:
    made = not PRIVSEP_DIR.exists()
    PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
    try:
        yield
    finally:
        if made:
            with contextlib.suppress(OSError):  # another sshd may use it by now
                PRIVSEP_DIR.rmdir()


@contextlib.contextmanager
def serve() -> Iterator[SshTarget]:
    """Run the server for the duration of the ``with`` block; yield how to log in to it.

    Raises :class:`SshdUnavailable` (before yielding) when it cannot run or start.
    """
    reason = why_unavailable()
    if reason is not None:
        raise SshdUnavailable(reason)
    with contextlib.ExitStack() as stack:
        stack.enter_context(_sigterm_unwinds())
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-sshd-")))
        try:
            _keygen(tmp / "host_ed25519")
            _keygen(tmp / "client_ed25519")
        except (subprocess.SubprocessError, OSError) as exc:
            raise SshdUnavailable(f"ssh-keygen failed: {exc}") from exc
        (tmp / "authorized_keys").write_text((tmp / "client_ed25519.pub").read_text())
        port = _free_port()
        config, log = tmp / "sshd_config", tmp / "sshd.log"
        config.write_text(_config(tmp, port))
        stack.enter_context(_privsep_dir())
        checked = subprocess.run([SSHD, "-t", "-f", str(config)], capture_output=True,
                                 text=True, timeout=60, check=False)
        if checked.returncode != 0:
            raise SshdUnavailable(f"sshd rejected its config: {checked.stderr.strip()[-300:]}")
        proc = subprocess.Popen([SSHD, "-D", "-f", str(config), "-E", str(log)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        stack.callback(_stop, proc)
        _wait_listening(port, proc, log)
        yield SshTarget("127.0.0.1", port, "root", str(tmp / "client_ed25519"), REMOTE_PYTHON)
