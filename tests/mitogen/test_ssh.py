"""router.ssh() with the system's OpenSSH client against a real sshd on 127.0.0.1."""

from __future__ import annotations

import logging
import os
import shlex
import time

import pytest

import mitogen.core
import mitogen.parent
import mitogen.ssh
import mitogen.sudo
from tests.support import remote
from tests.support.logins import SYSTEM_PYTHON, accounts, sshd  # noqa: F401 (fixtures)

pytestmark = pytest.mark.system  # needs root, sshd, sudo: .ci/run provides them


def _ssh(router, sshd, role, accounts, **kwargs):  # noqa: F811
    kwargs.setdefault("ssh_args", sshd.ssh_args())
    kwargs.setdefault("python_path", SYSTEM_PYTHON)
    kwargs.setdefault("connect_timeout", 20)
    return router.ssh(hostname="127.0.0.1", port=sshd.port, username=accounts[role],
                      **kwargs)


def _cmdlines_with(secret: str) -> list:
    hits = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open("/proc/%s/cmdline" % pid, "rb") as f:
                if secret.encode() in f.read():
                    hits.append(pid)
        except OSError:
            pass
    return hits


def test_ssh_with_key(router, sshd, accounts):  # noqa: F811
    started = time.monotonic()
    context = _ssh(router, sshd, "caller", accounts, identity_file=str(accounts.key))
    assert context.call(remote.whoami) == accounts["caller"]
    first_call = time.monotonic() - started
    started = time.monotonic()
    for _ in range(20):
        context.call(remote.whoami)
    round_trip = (time.monotonic() - started) / 20
    print("ssh connect + first call %.3fs, round trip %.2fms" % (first_call, 1e3 * round_trip))
    assert context.name == "ssh.127.0.0.1:%d" % sshd.port
    conn = router.stream_by_id(context.context_id).conn
    assert conn.pty_master is None  # batch mode: no PTY
    context.shutdown(wait=True)  # the autouse leak check fails if ssh is left running


def test_ssh_with_password(router, sshd, accounts, caplog):  # noqa: F811
    caplog.set_level(logging.DEBUG)
    context = _ssh(router, sshd, "caller", accounts, password=accounts.password)
    assert context.call(remote.whoami) == accounts["caller"]
    assert _cmdlines_with(accounts.password) == []
    assert accounts.password not in caplog.text


def test_ssh_wrong_password(router, sshd, accounts):  # noqa: F811
    with pytest.raises(mitogen.ssh.PasswordError) as info:
        _ssh(router, sshd, "caller", accounts, password="bad-" + accounts.password)
    assert "refused the password" in str(info.value)
    assert accounts.password not in str(info.value)


def test_ssh_key_only_account_refuses_passwords(router, sshd, accounts):  # noqa: F811
    with pytest.raises(mitogen.ssh.PasswordError):
        _ssh(router, sshd, "keyonly", accounts, password=accounts.password)
    context = _ssh(router, sshd, "keyonly", accounts, identity_file=str(accounts.key))
    assert context.call(remote.whoami) == accounts["keyonly"]


def test_ssh_without_credentials_says_what_to_do(router, sshd, accounts):  # noqa: F811
    with pytest.raises(mitogen.ssh.PasswordError, match=r"pass password=\.\.\., or identity_file"):
        _ssh(router, sshd, "keyonly", accounts, identity_file="/nonexistent-key")


def test_host_key_enforce_unknown(router, sshd, accounts, tmp_path):  # noqa: F811
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    with pytest.raises(mitogen.ssh.HostKeyError, match="not in known_hosts"):
        _ssh(router, sshd, "caller", accounts, identity_file=str(accounts.key),
             ssh_args=sshd.ssh_args(empty))


def test_host_key_enforce_changed(router, sshd, accounts, tmp_path):  # noqa: F811
    wrong = tmp_path / "known_hosts"
    other = "AAAAC3NzaC1lZDI1NTE5AAAAIBHjoh2D0n2e6BqhJkVmWQZ+7UFvIm/eLMKlTbXgXMcU"
    wrong.write_text("[127.0.0.1]:%d ssh-ed25519 %s\n" % (sshd.port, other))
    for mode in ("enforce", "accept"):
        with pytest.raises(mitogen.ssh.HostKeyError, match="CHANGED"):
            _ssh(router, sshd, "caller", accounts, identity_file=str(accounts.key),
                 ssh_args=sshd.ssh_args(wrong), check_host_keys=mode)


def test_host_key_accept_records_the_key(router, sshd, accounts, tmp_path):  # noqa: F811
    known = tmp_path / "known_hosts"
    known.write_text("")
    context = _ssh(router, sshd, "caller", accounts, identity_file=str(accounts.key),
                   ssh_args=sshd.ssh_args(known), check_host_keys="accept")
    assert context.call(remote.whoami) == accounts["caller"]
    assert sshd.host_key_line.split()[2] in known.read_text()


def test_host_key_ignore(router, sshd, accounts, tmp_path):  # noqa: F811
    context = _ssh(router, sshd, "caller", accounts, identity_file=str(accounts.key),
                   ssh_args=["-F", "/dev/null"], check_host_keys="ignore")
    assert context.call(remote.whoami) == accounts["caller"]


def test_banner_and_chatty_login(router, sshd, accounts):  # noqa: F811
    context = _ssh(router, sshd, "noisy", accounts, identity_file=str(accounts.key))
    assert context.call(remote.whoami) == accounts["noisy"]


def test_slow_login(router, sshd, accounts):  # noqa: F811
    context = _ssh(router, sshd, "slow", accounts, identity_file=str(accounts.key))
    assert context.call(remote.whoami) == accounts["slow"]


def test_failing_login(router, sshd, accounts):  # noqa: F811
    with pytest.raises(mitogen.parent.EofError, match="child exited with status 1 during "
                                                      "bootstrap"):
        _ssh(router, sshd, "fails", accounts, identity_file=str(accounts.key))


def test_ssh_then_sudo_via(router, sshd, accounts):  # noqa: F811
    ssh = _ssh(router, sshd, "caller", accounts, identity_file=str(accounts.key))
    context = router.sudo(username=accounts["target"], password=accounts.password, via=ssh)
    assert context.call(remote.whoami) == accounts["target"]
    assert context.name == "ssh.127.0.0.1:%d.sudo.%s" % (sshd.port, accounts["target"])
    with pytest.raises(mitogen.sudo.PasswordError):
        router.sudo(username=accounts["target"], password="nope", via=ssh)


# --- options and the command line


def _argv(**kwargs):
    kwargs.setdefault("hostname", "node12b")
    options = mitogen.ssh.Options(max_message_size=1 << 20, **kwargs)
    return mitogen.ssh.Connection(options, router=_FakeRouter())


class _FakeRouter:
    broker = None


def test_defaults_and_options_build_the_command_line():
    conn = _argv(username="ops")
    argv = conn.get_boot_command()
    assert argv[0] == "ssh"
    assert "BatchMode=yes" in argv and "StrictHostKeyChecking=yes" in argv
    assert "Compression=yes" in argv and "ServerAliveInterval=15" in argv
    # As Mitogen builds it: ssh's options, the host, then one quoted word per argument of
    # the Python command line (ssh joins them with spaces for the remote shell).
    python = argv.index("python")
    assert argv[python - 1] == "node12b" and "--" not in argv
    assert argv[python:python + 3] == ["python", "-S", "-c"]
    assert argv[python + 3] == shlex.quote(mitogen.parent.STUB)
    assert shlex.split(" ".join(argv[python:])) == \
        mitogen.parent.Connection.get_boot_command(conn)
    assert conn.make_stream_name(1) == "ssh.node12b:22"
    assert not conn.wants_pty()
    conn = _argv(port=2222, password="s3cret", ssh_debug_level=2, compression=False,
                 keepalive_enabled=False, ssh_args=["-o", "Foo=bar"],
                 identity_file="/k", python_path=["/usr/bin/python3", "-X", "utf8"])
    argv = conn.get_boot_command()
    assert conn.wants_pty() and "BatchMode=yes" not in argv
    assert argv[1:3] == ["-o", "Foo=bar"]
    assert "-vv" in argv and "Compression=no" in argv and "IdentitiesOnly=yes" in argv
    assert not any("ServerAlive" in a for a in argv)
    assert "s3cret" not in " ".join(argv)
    assert conn.make_stream_name(1) == "ssh.node12b:2222"
    python = argv.index("/usr/bin/python3")
    assert argv[python - 1] == "node12b"
    assert argv[python:python + 5] == ["/usr/bin/python3", "-X", "utf8", "-S", "-c"]
    assert _argv(check_host_keys="accept").wants_pty()
    with pytest.raises(ValueError, match="hostname"):
        _argv(hostname="-oProxyCommand=touch /tmp/x")


def test_bad_options_are_clear_errors():
    with pytest.raises(ValueError, match="check_host_keys"):
        _argv(check_host_keys="sometimes")
    with pytest.raises(ValueError, match="ssh_debug_level"):
        _argv(ssh_debug_level=9)


def test_password_is_a_secret():
    conn = _argv(password="hunter2")
    assert isinstance(conn.options.password, mitogen.core.Secret)
    assert "hunter2" not in repr(conn.options.password)
