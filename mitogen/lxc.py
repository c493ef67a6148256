"""``router.lxc()``: a child inside an LXC container (``lxc-attach``)."""

from __future__ import annotations

from typing import Any

import mitogen.parent

__all__ = ["Connection", "Options"]

#: Why an LXC-family child may fail with nothing useful on its output.
LXC_EOF_HINT = ("LXC tools often report a failure to run the program only in the host's "
                "logs: look in /var/log for the reason.")


class Options(mitogen.parent.Options):
    container: str | None = None
    lxc_attach_path = "lxc-attach"

    def __init__(
        self,
        container: str,
        lxc_attach_path: str | None = None,
        python_path: str | list | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(python_path=python_path or "python", **kwargs)
        self.container = container
        self.lxc_attach_path = lxc_attach_path or "lxc-attach"


class Connection(mitogen.parent.Connection):
    options_class = Options
    options: Options  # this method's own
    name_prefix = "lxc"
    child_is_immediate_subprocess = False
    eager_payload = False
    eof_error_hint = LXC_EOF_HINT

    def make_stream_name(self, pid: int) -> str:
        return "lxc.%s" % (self.options.container,)

    def get_boot_command(self) -> list:
        """``lxc-attach --clear-env --name CONTAINER -- python ...``, as Mitogen."""
        return [self.options.lxc_attach_path, "--clear-env", "--name", self.options.container,
                "--", *super().get_boot_command()]
