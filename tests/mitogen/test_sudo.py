"""router.sudo() against Debian's sudo, with accounts and rules made by tests.support.logins.

Password prompts only appear for a caller that is not root, so these tests first become the
test account "caller" (root needs no password), then run sudo from inside that context.
"""

from __future__ import annotations

import logging
import os

import pytest

import mitogen.core
import mitogen.spawn
import mitogen.sudo
from tests.support import remote
from tests.support.logins import SYSTEM_PYTHON, accounts  # noqa: F401 (fixture)

pytestmark = pytest.mark.system  # needs root, sshd, sudo: .ci/run provides them


@pytest.fixture
def caller(router, accounts):  # noqa: F811
    return router.sudo(username=accounts["caller"], python_path=SYSTEM_PYTHON)


def _secret_visible(secret: str) -> list:
    """Processes whose command line (what ps shows) holds `secret`."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open("/proc/%s/cmdline" % pid, "rb") as f:
                if secret.encode() in f.read():
                    found.append(pid)
        except OSError:
            pass
    return found


def test_sudo_without_password_as_root(router, accounts):  # noqa: F811
    context = router.sudo(username=accounts["target"], python_path=SYSTEM_PYTHON)
    assert context.name == "sudo.%s" % accounts["target"]
    assert context.call(remote.whoami) == accounts["target"]
    context.shutdown(wait=True)


def test_sudo_with_password_composes_names(caller, router, accounts):  # noqa: F811
    context = router.sudo(username=accounts["target"], password=accounts.password,
                          via=caller)
    assert context.call(remote.whoami) == accounts["target"]
    assert context.name == "sudo.%s.sudo.%s" % (accounts["caller"], accounts["target"])
    context.shutdown(wait=True)


def test_sudo_nopasswd_with_log_output(caller, router, accounts):  # noqa: F811
    """Defaults log_output makes sudo relay stdin non-blocking: the bootstrap copes."""
    context = router.sudo(username=accounts["nopw"], via=caller)
    assert context.call(remote.whoami) == accounts["nopw"]


def test_sudo_wrong_password(caller, router, accounts):  # noqa: F811
    with pytest.raises(mitogen.sudo.PasswordError) as info:
        router.sudo(username=accounts["target"], password="not-" + accounts.password,
                    via=caller)
    assert "refused the password" in str(info.value)
    assert accounts.password not in str(info.value)


def test_sudo_password_missing(caller, router, accounts):  # noqa: F811
    with pytest.raises(mitogen.sudo.PasswordError) as info:
        router.sudo(username=accounts["target"], via=caller)
    assert "none was given" in str(info.value)


def test_password_error_is_one_class():
    import mitogen.ssh

    assert mitogen.sudo.PasswordError is mitogen.ssh.PasswordError
    assert mitogen.sudo.PasswordError is mitogen.spawn.PasswordError
    assert issubclass(mitogen.spawn.PasswordError, mitogen.core.StreamError)


def test_sudo_targetpw(caller, router, accounts):  # noqa: F811
    """targetpw asks for the target's password, not the caller's."""
    with pytest.raises(mitogen.sudo.PasswordError):
        router.sudo(username=accounts["tpw"], password=accounts.password, via=caller)
    context = router.sudo(username=accounts["tpw"], password=accounts.passwords["tpw"],
                          via=caller)
    assert context.call(remote.whoami) == accounts["tpw"]


def test_sudo_requiretty(caller, router, accounts):  # noqa: F811
    context = router.sudo(username=accounts["rtty"], password=accounts.password, via=caller)
    assert context.call(remote.whoami) == accounts["rtty"]


def test_sudo_french_prompt(caller, router, accounts):  # noqa: F811
    """In French, sudo and PAM speak French; the right password works and a wrong one is
    still recognised as refused."""
    caller.call(remote.set_env, "LANG", "C.UTF-8")
    caller.call(remote.set_env, "LANGUAGE", "fr")
    with pytest.raises(mitogen.sudo.PasswordError) as info:
        router.sudo(username=accounts["target"], password="faux", via=caller)
    assert "refused the password" in str(info.value)
    context = router.sudo(username=accounts["target"], password=accounts.password,
                          via=caller)
    assert context.call(remote.whoami) == accounts["target"]


def test_sudo_login_shell_with_noise(caller, router, accounts):  # noqa: F811
    """-i runs the login shell, whose .profile prints: the bootstrap ignores it."""
    context = router.sudo(username=accounts["noisy"], login=True, via=caller)
    assert context.call(remote.whoami) == accounts["noisy"]


def test_secrets_absent_from_logs_and_ps(caller, router, accounts, caplog):  # noqa: F811
    caplog.set_level(logging.DEBUG)
    context = router.sudo(username=accounts["target"], password=accounts.password,
                          via=caller, debug=True)
    assert context.call(remote.whoami) == accounts["target"]
    assert _secret_visible(accounts.password) == []
    with pytest.raises(mitogen.sudo.PasswordError) as info:
        router.sudo(username=accounts["target"], password="wrong-" + accounts.password,
                    via=caller)
    assert accounts.password not in str(info.value)
    assert "wrong-" not in str(info.value)
    assert caplog.records
    assert accounts.password not in caplog.text
    options = mitogen.sudo.Options(max_message_size=1, password=accounts.password)
    assert accounts.password not in repr(vars(options))


# --- the command line


def _argv(**kwargs) -> list:
    options = mitogen.sudo.Options(max_message_size=1 << 20, **kwargs)
    conn = mitogen.sudo.Connection(options, router=_FakeRouter())
    return conn.get_boot_command()


class _FakeRouter:
    broker = None


def test_sudo_args_map_onto_options():
    argv = _argv(sudo_args=["-u", "webapp", "-HE", "--login", "--role=r", "-tT"])
    head = argv[:argv.index("--")]
    assert head[:5] == ["sudo", "-p", mitogen.sudo.PROMPT, "-u", "webapp"]
    assert set(head) >= {"-E", "-H", "-i", "-r", "r", "-t", "T"}
    assert _argv(sudo_args="-u ops -H")[4] == "ops"


def test_sudo_args_unknown_flag_is_a_clear_error():
    with pytest.raises(mitogen.core.StreamError, match="no such option: -k"):
        _argv(sudo_args=["-k"])
    with pytest.raises(mitogen.core.StreamError, match="-u option requires 1 argument"):
        _argv(sudo_args=["-u"])


@pytest.mark.parametrize("text", [
    "mitogen-sudo password: ",
    "[sudo] password for ops: ",
    "[sudo: authenticate] Password: ",
    "[sudo] Mot de passe de ops : ",
    "Mot de passe : ",
    "[sudo] ops 的密码\uff1a",  # a full-width colon (zh_CN)
    "Passwort: ",
    "**** Password:",
    "doas (ops@node12b) password: ",
    "Enter PIN for 'PIV card': ",
])
def test_prompts_are_recognised(text):
    assert mitogen.spawn.is_password_prompt(text)


@pytest.mark.parametrize("text", ["Welcome!", "Last login: Mon", "password changed ok"])
def test_non_prompts_are_ignored(text):
    assert not mitogen.spawn.is_password_prompt(text)
