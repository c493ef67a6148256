"""``router.lxd()``: a child inside an LXD container (``lxc exec``)."""

from __future__ import annotations

from typing import Any

import mitogen.parent
from mitogen.lxc import LXC_EOF_HINT

__all__ = ["Connection", "Options"]


class Options(mitogen.parent.Options):
    container: str | None = None
    lxc_path = "lxc"
    python_path = "python"

    def __init__(
        self,
        container: str,
        lxc_path: str | None = None,
        python_path: str | list | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(python_path=python_path or "python", **kwargs)
        self.container = container
        self.lxc_path = lxc_path or "lxc"


class Connection(mitogen.parent.Connection):
    options_class = Options
    options: Options  # this method's own
    name_prefix = "lxd"
    child_is_immediate_subprocess = False
    eager_payload = False
    eof_error_hint = LXC_EOF_HINT

    def make_stream_name(self, pid: int) -> str:
        return "lxd.%s" % (self.options.container,)

    def get_boot_command(self) -> list:
        """``lxc exec --mode=noninteractive CONTAINER -- python ...``, as Mitogen (no
        terminal in the container, which would mangle the stream)."""
        return [self.options.lxc_path, "exec", "--mode=noninteractive",
                self.options.container, "--", *super().get_boot_command()]
