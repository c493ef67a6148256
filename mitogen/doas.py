"""``router.doas()``: a child running as another user through OpenBSD's doas(1).

Like sudo, doas reads the password from its terminal: a hybrid PTY (see
:mod:`mitogen.spawn`).
"""

from __future__ import annotations

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
        doas_path: str | None = None,
        password_prompt: str | None = None,
        incorrect_prompts: tuple | list | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.username = username or "root"
        self.password = mitogen.spawn.to_secret(password)
        self.doas_path = doas_path or "doas"
        self.password_prompt = password_prompt
        self.incorrect_prompts = tuple(incorrect_prompts or ())


class Connection(mitogen.spawn.PtyConnection):
    options_class = Options
    name_prefix = "doas"
    program = "doas"

    def make_stream_name(self, pid: int) -> str:
        return "doas.%s" % (self.options.username,)

    def get_boot_command(self) -> list:
        return [self.options.doas_path, "-u", self.options.username, "--",
                *super().get_boot_command()]
