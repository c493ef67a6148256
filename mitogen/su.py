"""``router.su()``: a child running as another user through su(1).

su talks only to its terminal, so the child's whole stdio is a PTY in raw mode (see
:mod:`mitogen.spawn`); the payload waits until the password has been answered.
"""

from __future__ import annotations

import shlex
from typing import Any

import mitogen.spawn
from mitogen.spawn import PasswordError

__all__ = ["Connection", "Options", "PasswordError"]

password_required_msg = "su asked for a password but none was given: pass password=..."
password_incorrect_msg = ("su refused the password: check the password= given (and the "
                          "account, which may be locked or lack the right to log in)")


class Options(mitogen.spawn.BecomeOptions):
    su_path = "su"

    def __init__(self, username: str | None = None, password: str | None = None,
                 su_path: str | None = None, password_prompt: str | None = None,
                 incorrect_prompts: tuple | list | None = None, **kwargs: Any) -> None:
        super().__init__(username=username, password=password,
                         password_prompt=password_prompt,
                         incorrect_prompts=incorrect_prompts, **kwargs)
        self.su_path = su_path or "su"


class Connection(mitogen.spawn.PtyConnection):
    options_class = Options
    options: Options  # this method's own
    name_prefix = "su"
    program = "su"
    tty_mode = "full"
    child_is_immediate_subprocess = False
    #: Anything written before the prompt would be read as the password.
    eager_payload = False

    def make_stream_name(self, pid: int) -> str:
        return "su.%s" % (self.options.username,)

    def missing_password_message(self) -> str:
        return password_required_msg

    def refused_message(self) -> str:
        return password_incorrect_msg

    def get_boot_command(self) -> list:
        # su hands one command string to the target's shell.
        command = " ".join(shlex.quote(arg) for arg in super().get_boot_command())
        return [self.options.su_path, self.options.username, "-c", command]


def __getattr__(name: str) -> Any:
    """Names kept only for compatibility with Mitogen: see mitogen/parity.py."""
    if name.startswith("__"):
        raise AttributeError(name)
    import mitogen.parity

    return mitogen.parity.lookup(__name__, name)
