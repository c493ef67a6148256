"""router.su() and router.doas() against Debian's su (util-linux) and opendoas.

As with sudo, root is never asked for a password, so the prompting cases start from the
test account "caller".
"""

from __future__ import annotations

import logging

import pytest

import mitogen.doas
import mitogen.spawn
import mitogen.su
from tests.support import remote
from tests.support.logins import (  # noqa: F401 (fixtures)
    SYSTEM_PYTHON,
    accounts,
    doas_rules,
)


@pytest.fixture
def caller(router, accounts):  # noqa: F811
    return router.sudo(username=accounts["caller"], python_path=SYSTEM_PYTHON)


def test_su_as_root(router, accounts):  # noqa: F811
    context = router.su(username=accounts["target"], python_path=SYSTEM_PYTHON)
    assert context.name == "su.%s" % accounts["target"]
    assert context.call(remote.whoami) == accounts["target"]
    # The PTY is in raw mode: large binary messages pass unchanged.
    blob = bytes(range(256)) * 4096
    assert context.call(len, blob) == len(blob)
    context.shutdown(wait=True)


def test_su_with_password(caller, router, accounts, caplog):  # noqa: F811
    caplog.set_level(logging.DEBUG)
    context = router.su(username=accounts["target"], password=accounts.password, via=caller)
    assert context.call(remote.whoami) == accounts["target"]
    assert accounts.password not in caplog.text


def test_su_wrong_password(caller, router, accounts):  # noqa: F811
    with pytest.raises(mitogen.su.PasswordError) as info:
        router.su(username=accounts["target"], password="wrong", via=caller)
    assert accounts.password not in str(info.value)


def test_su_custom_prompts(caller, router, accounts):  # noqa: F811
    with pytest.raises(mitogen.su.PasswordError):
        router.su(username=accounts["target"], password="wrong", via=caller,
                  password_prompt="PASSWORD", incorrect_prompts=["authentication failure"])


def test_su_missing_password(caller, router, accounts):  # noqa: F811
    with pytest.raises(mitogen.su.PasswordError, match="none was given"):
        router.su(username=accounts["target"], via=caller)


def test_doas_nopass_and_password(caller, router, doas_rules):  # noqa: F811
    acc = doas_rules
    context = router.doas(username=acc["nopw"], via=caller)
    assert context.call(remote.whoami) == acc["nopw"]
    assert context.name == "sudo.%s.doas.%s" % (acc["caller"], acc["nopw"])
    context = router.doas(username=acc["target"], password=acc.password, via=caller)
    assert context.call(remote.whoami) == acc["target"]


def test_doas_wrong_password(caller, router, doas_rules):  # noqa: F811
    with pytest.raises(mitogen.doas.PasswordError) as info:
        router.doas(username=doas_rules["target"], password="wrong", via=caller)
    assert doas_rules.password not in str(info.value)


def test_command_lines():
    class FakeRouter:
        broker = None

    options = mitogen.su.Options(max_message_size=1, username="ops", su_path="/bin/su")
    argv = mitogen.su.Connection(options, FakeRouter()).get_boot_command()
    assert argv[:3] == ["/bin/su", "ops", "-c"] and len(argv) == 4
    options = mitogen.doas.Options(max_message_size=1, password="x")
    argv = mitogen.doas.Connection(options, FakeRouter()).get_boot_command()
    assert argv[:4] == ["doas", "-u", "root", "--"]
    assert mitogen.doas.PasswordError is mitogen.su.PasswordError is mitogen.spawn.PasswordError
