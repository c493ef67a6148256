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


class Options(mitogen.spawn.BecomeOptions):
    def __init__(self, su_path: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.su_path = su_path or "su"


class Connection(mitogen.spawn.PtyConnection):
    options_class = Options
    name_prefix = "su"
    program = "su"
    tty_mode = "full"
    #: Anything written before the prompt would be read as the password.
    eager_payload = False

    def make_stream_name(self, pid: int) -> str:
        return "su.%s" % (self.options.username,)

    def get_boot_command(self) -> list:
        # su hands one command string to the target's shell.
        command = " ".join(shlex.quote(arg) for arg in super().get_boot_command())
        return [self.options.su_path, self.options.username, "-c", command]
