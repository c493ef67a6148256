"""``router.su()``: a child running as another user through su(1).

su talks only to its terminal, so the child's whole stdio is a PTY in raw mode (see
:mod:`mitogen.spawn`); the payload waits until the password has been answered.
"""

from __future__ import annotations

import shlex
from typing import Any

import mitogen.parent
import mitogen.spawn
from mitogen.spawn import PasswordError

__all__ = ["Connection", "Options", "PasswordError"]


class Options(mitogen.parent.Options):
    def __init__(
        self,
        username: str | None = None,
        password: str | None = None,
        su_path: str | None = None,
        password_prompt: str | None = None,
        incorrect_prompts: tuple | list | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.username = username or "root"
        self.password = mitogen.spawn.to_secret(password)
        self.su_path = su_path or "su"
        self.password_prompt = password_prompt
        self.incorrect_prompts = tuple(incorrect_prompts or ())


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
