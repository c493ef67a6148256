"""``router.doas()``: a child running as another user through OpenBSD's doas(1).

Like sudo, doas reads the password from its terminal: a hybrid PTY (see
:mod:`mitogen.spawn`).
"""

from __future__ import annotations

from typing import Any

import mitogen.spawn
from mitogen.spawn import PasswordError

__all__ = ["Connection", "Options", "PasswordError"]

password_required_msg = "doas asked for a password but none was given: pass password=..."
password_incorrect_msg = ("doas refused the password: check the password= given (and the "
                          "account, which may be locked or lack the right to log in)")


class Options(mitogen.spawn.BecomeOptions):
    doas_path = "doas"

    def __init__(self, username: str | None = None, password: str | None = None,
                 doas_path: str | None = None, password_prompt: str | None = None,
                 incorrect_prompts: tuple | list | None = None, **kwargs: Any) -> None:
        super().__init__(username=username, password=password,
                         password_prompt=password_prompt,
                         incorrect_prompts=incorrect_prompts, **kwargs)
        self.doas_path = doas_path or "doas"


class Connection(mitogen.spawn.PtyConnection):
    options_class = Options
    options: Options  # this method's own
    name_prefix = "doas"
    program = "doas"
    child_is_immediate_subprocess = False
    eager_payload = False

    def make_stream_name(self, pid: int) -> str:
        return "doas.%s" % (self.options.username,)

    def missing_password_message(self) -> str:
        return password_required_msg

    def refused_message(self) -> str:
        return password_incorrect_msg

    def get_boot_command(self) -> list:
        return [self.options.doas_path, "-u", self.options.username, "--",
                *super().get_boot_command()]


def __getattr__(name: str) -> Any:
    """Names kept only for compatibility with Mitogen: see mitogen/parity.py."""
    if name.startswith("__"):
        raise AttributeError(name)
    import mitogen.parity

    return mitogen.parity.lookup(__name__, name)
