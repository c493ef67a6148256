"""``router.doas()``: a child running as another user through OpenBSD's doas(1).

Like sudo, doas reads the password from its terminal: a hybrid PTY (see
:mod:`mitogen.spawn`).
"""

from __future__ import annotations

from typing import Any

import mitogen.spawn
from mitogen.spawn import PasswordError

__all__ = ["Connection", "Options", "PasswordError"]


class Options(mitogen.spawn.BecomeOptions):
    def __init__(self, doas_path: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.doas_path = doas_path or "doas"


class Connection(mitogen.spawn.PtyConnection):
    options_class = Options
    name_prefix = "doas"
    program = "doas"

    def make_stream_name(self, pid: int) -> str:
        return "doas.%s" % (self.options.username,)

    def get_boot_command(self) -> list:
        return [self.options.doas_path, "-u", self.options.username, "--",
                *super().get_boot_command()]
