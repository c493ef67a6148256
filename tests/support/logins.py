"""Real logins for the connection-method tests: test accounts, sudoers rules, doas rules and
an OpenSSH server on 127.0.0.1, all created here and removed again.

Nothing of the machine's own configuration is touched: accounts get a random prefix, the
sudoers drop-in and the sshd configuration have names of their own, sshd runs from a temp
directory on a free port, and /etc/doas.conf is only ever created (never edited) when it does
not exist. Each pytest-xdist worker gets its own accounts and sshd; the one shared file,
doas.conf, is edited under a lock, each worker owning a marked block.

Everything needs root and Debian's ``openssh-server``, ``openssh-client``, ``sudo`` and
``opendoas``; without them the fixtures skip, saying what is missing.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest

__all__ = ["Accounts", "Sshd", "accounts", "doas_rules", "sshd"]

#: The interpreter the test accounts run: the master's may live under /root, which they
#: cannot enter.
SYSTEM_PYTHON = "/usr/bin/python3"
SUDOERS_DIR = Path("/etc/sudoers.d")
DOAS_CONF = Path("/etc/doas.conf")
DOAS_LOCK = "/tmp/mitogen-tests-doas.lock"
DOAS_HEADER = "# created by the mitogen test suite; removed when its last block goes\n"

#: role -> (shell, what its login files print or do)
ROLES = {
    "caller": ("/bin/bash", ""),
    "target": ("/bin/bash", ""),
    "nopw": ("/bin/bash", ""),
    "tpw": ("/bin/bash", ""),
    "rtty": ("/bin/bash", ""),
    "noisy": ("/bin/bash", "echo 'Welcome! Last login: never'; echo 'motd: be nice' >&2\n"
                           "printf 'no newline at the end'\n"),
    "slow": ("/bin/bash", "sleep 1.5\n"),
    "fails": ("/bin/false", ""),
    "keyonly": ("/bin/bash", ""),
}


def _run(*argv: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=check, **kw)


def require(*programs: str) -> None:
    """Skip (saying why) unless we are root and every program is installed."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create test accounts (CI runs as root)")
    missing = [p for p in programs if not (shutil.which(p) or os.path.exists(p))]
    if missing:
        pytest.skip("not installed: %s (apt-get install openssh-server openssh-client sudo "
                    "opendoas)" % ", ".join(missing))


@dataclass
class Accounts:
    prefix: str
    password: str
    home: Path
    key: Path
    iolog_dir: Path
    names: dict = field(default_factory=dict)
    passwords: dict = field(default_factory=dict)

    def __getitem__(self, role: str) -> str:
        return self.names[role]


def _sudoers(acc: Accounts) -> str:
    c = acc["caller"]
    return "".join([
        "Defaults>%s targetpw\n" % acc["tpw"],
        "Defaults>%s requiretty\n" % acc["rtty"],
        "Defaults:%s !lecture, pwfeedback, iolog_dir=%s\n" % (c, acc.iolog_dir),
        "Defaults>%s log_output\n" % acc["nopw"],
        "%s ALL=(%s) ALL\n" % (c, acc["target"]),
        "%s ALL=(%s) NOPASSWD: ALL\n" % (c, acc["nopw"]),
        "%s ALL=(%s) ALL\n" % (c, acc["tpw"]),
        "%s ALL=(%s) ALL\n" % (c, acc["rtty"]),
        "%s ALL=(%s) NOPASSWD: ALL\n" % (c, acc["noisy"]),
    ])


def _write_login_files(home: Path, user: str, text: str) -> None:
    for name in (".bashrc", ".profile"):
        (home / name).write_text(text)
    _run("chown", "%s:%s" % (user, user), str(home / ".bashrc"), str(home / ".profile"))


def _add_key(home: Path, user: str, pubkey: str) -> None:
    ssh_dir = home / ".ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    (ssh_dir / "authorized_keys").write_text(pubkey)
    os.chmod(ssh_dir / "authorized_keys", 0o600)
    _run("chown", "-R", "%s:%s" % (user, user), str(ssh_dir))


def _remove(acc: Accounts, sudoers: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        sudoers.unlink()
    for user in acc.names.values():
        _run("userdel", "-r", "-f", user, check=False)


@pytest.fixture(scope="session")
def accounts(tmp_path_factory) -> Iterator[Accounts]:
    """The test accounts, each role a user named <prefix><role>, with the sudoers rules:
    caller may sudo to target (caller's password), nopw (none), tpw (tpw's own password:
    targetpw) and rtty (requiretty)."""
    require("useradd", "sudo", "ssh-keygen", SYSTEM_PYTHON)
    tmp = tmp_path_factory.mktemp("accounts")
    prefix = "mt%s" % secrets.token_hex(3)
    acc = Accounts(prefix=prefix, password="pw-" + secrets.token_urlsafe(12),
                   home=Path("/home"), key=tmp / "id_ed25519",
                   iolog_dir=tmp / "sudo-io")
    _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(acc.key))
    pubkey = (tmp / "id_ed25519.pub").read_text()
    sudoers = SUDOERS_DIR / ("mitogen-tests-%s" % prefix)
    try:
        for role, (shell, login_text) in ROLES.items():
            user = prefix + role
            _run("useradd", "--create-home", "--shell", shell, user)
            acc.names[role] = user
            password = acc.password if role != "tpw" else "tpw-" + secrets.token_urlsafe(9)
            acc.passwords[role] = password
            _run("chpasswd", input="%s:%s\n" % (user, password))
            home = Path(_run("getent", "passwd", user).stdout.split(":")[5])
            _write_login_files(home, user, login_text)
            _add_key(home, user, pubkey)
        text = _sudoers(acc)
        _run("visudo", "-c", "-q", "-f", "/dev/stdin", input=text)
        sudoers.write_text(text)
        os.chmod(sudoers, 0o440)
        yield acc
    finally:
        _remove(acc, sudoers)


# ---------------------------------------------------------------------------------------------
# sshd
# ---------------------------------------------------------------------------------------------


@dataclass
class Sshd:
    port: int
    known_hosts: Path
    host_key_line: str
    log: Path

    def ssh_args(self, known_hosts: Path | None = None) -> list:
        """Isolate ssh from the invoking user's own ~/.ssh/config and known_hosts."""
        return ["-F", "/dev/null", "-o",
                "UserKnownHostsFile=%s" % (known_hosts or self.known_hosts)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_listening(port: int, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("sshd exited: %s" % log.read_text()[-2000:])
        with socket.socket() as s:
            s.settimeout(1)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)  # polling a port that is not open yet: nothing to wait on
    raise RuntimeError("sshd did not listen on %d within 20 s: %s" % (port, log.read_text()))


def _sshd_config(tmp: Path, port: int, acc: Accounts) -> str:
    return "\n".join([
        "Port %d" % port,
        "ListenAddress 127.0.0.1",
        "HostKey %s" % (tmp / "host_ed25519"),
        "PidFile %s" % (tmp / "sshd.pid"),
        "UsePAM no",
        "PasswordAuthentication yes",
        "KbdInteractiveAuthentication no",
        "PubkeyAuthentication yes",
        "AuthorizedKeysFile .ssh/authorized_keys",
        "AllowUsers %s*" % acc.prefix,
        "Banner %s" % (tmp / "banner"),
        "PrintMotd no",
        "MaxStartups 50:30:100",
        "LogLevel VERBOSE",
        "Match User %s" % acc["keyonly"],
        "    PasswordAuthentication no",
        "",
    ])


@pytest.fixture(scope="session")
def sshd(accounts: Accounts, tmp_path_factory) -> Iterator[Sshd]:
    """OpenSSH's server on 127.0.0.1 and a free port, with its own host key and config."""
    require("/usr/sbin/sshd", "ssh")
    tmp = tmp_path_factory.mktemp("sshd")
    _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp / "host_ed25519"))
    (tmp / "banner").write_text("*** Authorised users only. This banner must not matter. ***\n")
    privsep = Path("/run/sshd")
    made_privsep = not privsep.exists()
    privsep.mkdir(mode=0o755, exist_ok=True)
    port = _free_port()
    config = tmp / "sshd_config"
    config.write_text(_sshd_config(tmp, port, accounts))
    log = tmp / "sshd.log"
    _run("/usr/sbin/sshd", "-t", "-f", str(config))
    proc = subprocess.Popen(["/usr/sbin/sshd", "-D", "-f", str(config), "-E", str(log)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        _wait_listening(port, proc, log)
        host_key = (tmp / "host_ed25519.pub").read_text().split()
        line = "[127.0.0.1]:%d %s %s\n" % (port, host_key[0], host_key[1])
        known = tmp / "known_hosts"
        known.write_text(line)
        yield Sshd(port=port, known_hosts=known, host_key_line=line, log=log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if made_privsep:
            with contextlib.suppress(OSError):
                privsep.rmdir()


# ---------------------------------------------------------------------------------------------
# doas
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _doas_conf_locked() -> Iterator[str | None]:
    fd = os.open(DOAS_LOCK, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield DOAS_CONF.read_text() if DOAS_CONF.exists() else None
    finally:
        os.close(fd)


def _write_doas_conf(text: str) -> None:
    tmp = DOAS_CONF.with_name(".doas.conf.mitogen-tests")
    tmp.write_text(text)
    os.chmod(tmp, 0o400)
    os.replace(tmp, DOAS_CONF)


@pytest.fixture(scope="session")
def doas_rules(accounts: Accounts) -> Iterator[Accounts]:
    """doas rules: caller may become target (password) and nopw (nopass)."""
    require("doas")
    marker = "# mitogen-tests %s\n" % accounts.prefix
    block = "%spermit %s as %s\npermit nopass %s as %s\n%s" % (
        marker, accounts["caller"], accounts["target"], accounts["caller"],
        accounts["nopw"], marker)
    with _doas_conf_locked() as current:
        if current is not None and not current.startswith(DOAS_HEADER):
            pytest.skip("%s exists and is not ours: not touching it" % DOAS_CONF)
        _write_doas_conf((current or DOAS_HEADER) + block)
    try:
        yield accounts
    finally:
        with _doas_conf_locked() as current:
            rest = (current or "").replace(block, "")
            if rest.strip() == DOAS_HEADER.strip():
                DOAS_CONF.unlink()
            else:
                _write_doas_conf(rest)
