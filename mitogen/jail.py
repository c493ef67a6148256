"""``router.jail()``: a child inside a FreeBSD jail (``jexec``)."""

from __future__ import annotations

from typing import Any

import mitogen.parent

__all__ = ["Connection", "Options"]


class Options(mitogen.parent.Options):
    #: The jail's name or ID.
    container: str | None = None
    jexec_path = "/usr/sbin/jexec"
    #: The account to run as inside the jail (``-U``).
    username: str | None = None

    def __init__(
        self,
        container: str,
        jexec_path: str | None = None,
        username: str | None = None,
        python_path: str | list | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(python_path=python_path or "python", **kwargs)
        self.container = container
        self.jexec_path = jexec_path or "/usr/sbin/jexec"
        self.username = username


class Connection(mitogen.parent.Connection):
    options_class = Options
    options: Options  # this method's own
    name_prefix = "jail"
    child_is_immediate_subprocess = False
    eager_payload = False

    def make_stream_name(self, pid: int) -> str:
        return "jail.%s" % (self.options.container,)

    def get_boot_command(self) -> list:
        """``jexec [-U USER] JAIL python ...``, as Mitogen runs it."""
        opts = self.options
        argv = [opts.jexec_path]
        if opts.username:
            argv += ["-U", opts.username]
        return [*argv, opts.container, *super().get_boot_command()]
