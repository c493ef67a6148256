"""One private OpenSSH server on 127.0.0.1 for the ``ssh`` workload, started and stopped by
the harness around the whole run.

Everything it needs lives in one temp directory: the server's configuration, a fresh host key,
a fresh client key and the ``authorized_keys`` file holding it. Nothing of the machine's own
ssh setup is read or changed (``/etc/ssh``, the system's sshd, ``/root/.ssh``), and the
directory is removed when the run ends, however it ends.

The login is ``root`` with the generated key only (``PermitRootLogin prohibit-password``,
no passwords): the workloads already run as root, so the remote children get no rights the
local ones lack, and the server listens on loopback only and accepts one key that exists for
the length of the run.

The concurrent-connection workload logs in to different accounts at once; ``serve(accounts=N)``
creates N of them for the run (``useradd``: no password that any login accepts, the same
generated key, a home directory inside the temp directory, no group of their own) and deletes
them (``userdel``) when the run ends, after ending any process still running as one of them.
Each account's comment names the harness process that made it (pid and start time), so that
accounts a killed harness could not delete are deleted by the next run that finds their
maker gone. Nothing else of the machine's account files is touched.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Set, Tuple

__all__ = ["ACCOUNT_TAG", "SSHD", "SshTarget", "SshdUnavailable", "remove_stale_accounts",
           "serve", "why_unavailable"]

SSHD = "/usr/sbin/sshd"
#: The interpreter the remote children run (the issue's setup: the system's Python 3).
REMOTE_PYTHON = "/usr/bin/python3"
#: OpenSSH refuses to start without its privilege-separation directory.
PRIVSEP_DIR = Path("/run/sshd")
LISTEN_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
#: The comment (GECOS field) of every account this module creates, then "pid=N start=T".
ACCOUNT_TAG = "mitogen-bench"
#: Accounts' names: this prefix, 6 hex digits for the run, 2 digits for the account.
ACCOUNT_PREFIX = "mb"


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
    usernames: Tuple[str, ...] = ()  # the run's own accounts, same key

    def params(self) -> Dict[str, Any]:
        return {"hostname": self.hostname, "port": self.port, "username": self.username,
                "identity_file": self.identity_file, "python_path": self.python_path,
                "usernames": list(self.usernames)}


def why_unavailable() -> Optional[str]:
    """Why this machine cannot host the server, or None when it can."""
    if os.geteuid() != 0:
        return "not root: the bench's sshd logs in as root on loopback"
    for program in (SSHD, REMOTE_PYTHON):
        if not os.access(program, os.X_OK):
            return f"{program} is missing"
    for program in ("ssh", "ssh-keygen", "useradd", "userdel"):
        if shutil.which(program) is None:
            return f"{program} is not on PATH"
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _config(tmp: Path, port: int, users: Sequence[str]) -> str:
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
        f"AllowUsers {' '.join(['root', *users])}",
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


def _owner_tag() -> str:
    return f"{ACCOUNT_TAG} pid={os.getpid()} start={_start_time(os.getpid())}"


def _owner_alive(gecos: str) -> bool:
    """Whether the harness process named in an account's comment still runs."""
    fields = dict(part.split("=", 1) for part in gecos.split()[1:] if "=" in part)
    try:
        pid = int(fields["pid"])
    except (KeyError, ValueError):
        return False
    return _start_time(pid) == fields.get("start")


def _kill_user_processes(uid: int) -> None:
    """SIGKILL every process running as ``uid`` (an account of ours: nothing else runs as it)."""
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status") as f:
                real_uid = next(int(line.split()[1]) for line in f if line.startswith("Uid:"))
        except (OSError, StopIteration, ValueError, IndexError):
            continue
        if real_uid == uid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(name), signal.SIGKILL)


def _account_tool(*argv: str) -> None:
    """Run useradd/userdel, retrying while another process holds the account files' lock,
    or (userdel) while a process of the account, just killed, has not gone yet."""
    for attempt in range(20):
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=60,
                                  check=False)
        except subprocess.TimeoutExpired as exc:
            raise SshdUnavailable(f"{argv[0]} {argv[-1]} did not finish in 60 s") from exc
        if done.returncode == 0:
            return
        stderr = done.stderr.lower()
        if "lock" not in stderr and "currently used" not in stderr:
            break
        time.sleep(0.1 * (attempt + 1))  # another's lock, a dying process: nothing to wait on
    raise SshdUnavailable(f"{' '.join(argv[:1])} {argv[-1]} failed (exit {done.returncode}): "
                          f"{done.stderr.strip()[-300:]}")


def _remove_account(name: str) -> None:
    try:
        uid = pwd.getpwnam(name).pw_uid
    except KeyError:
        return
    _kill_user_processes(uid)
    _account_tool("userdel", name)


def remove_stale_accounts() -> List[str]:
    """Delete the accounts of earlier runs whose harness is gone; return their names."""
    stale = [entry.pw_name for entry in pwd.getpwall()
             if entry.pw_gecos.startswith(ACCOUNT_TAG + " ") and
             entry.pw_name.startswith(ACCOUNT_PREFIX) and not _owner_alive(entry.pw_gecos)]
    for name in stale:
        _remove_account(name)
    return stale


@contextlib.contextmanager
def _accounts(count: int, homes: Path) -> Iterator[Tuple[str, ...]]:
    """``count`` login accounts for this run (see the module's docstring), deleted on exit."""
    if not count:
        yield ()
        return
    remove_stale_accounts()
    run = secrets.token_hex(3)
    created: List[str] = []
    homes.mkdir(mode=0o711)
    try:
        for number in range(count):
            name = f"{ACCOUNT_PREFIX}{run}{number:02d}"
            # "*" is a password no login accepts, but unlike useradd's default "!" it does
            # not lock the account, which sshd (without PAM) would refuse even with a key.
            _account_tool("useradd", "--no-create-home", "--home-dir", str(homes / name),
                          "--no-user-group", "--shell", "/bin/sh", "--password", "*",
                          "--comment", _owner_tag(), name)
            created.append(name)
            entry = pwd.getpwnam(name)
            (homes / name).mkdir(mode=0o700)
            os.chown(homes / name, entry.pw_uid, entry.pw_gid)
        yield tuple(created)
    finally:
        failures = []
        for name in created:  # every one, even after one fails
            try:
                _remove_account(name)
            except SshdUnavailable as exc:
                failures.append(exc)
        if failures:
            raise failures[0]


@contextlib.contextmanager
def serve(accounts: int = 0) -> Iterator[SshTarget]:
    """Run the server for the duration of the ``with`` block; yield how to log in to it,
    with ``accounts`` accounts of its own besides root.

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
        # The accounts' logins read authorized_keys as themselves: they may pass through the
        # directory and read that one file (the private keys stay 0600).
        os.chmod(tmp, 0o711)
        (tmp / "authorized_keys").write_text((tmp / "client_ed25519.pub").read_text())
        os.chmod(tmp / "authorized_keys", 0o644)
        users = stack.enter_context(_accounts(accounts, tmp / "home"))
        port = _free_port()
        config, log = tmp / "sshd_config", tmp / "sshd.log"
        config.write_text(_config(tmp, port, users))
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
        yield SshTarget("127.0.0.1", port, "root", str(tmp / "client_ed25519"), REMOTE_PYTHON,
                        users)
