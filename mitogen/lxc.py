"""``router.lxc()``: a child inside an LXC container (``lxc-attach``)."""

from __future__ import annotations

from typing import Any

import mitogen.parent

__all__ = ["Connection", "Options"]


class Options(mitogen.parent.Options):
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
    name_prefix = "lxc"

    def make_stream_name(self, pid: int) -> str:
        return "lxc.%s" % (self.options.container,)

    def get_boot_command(self) -> list:
        # --clear-env: the master's environment is not the container's business.
        return [self.options.lxc_attach_path, "--clear-env", "--name", self.options.container,
                "--", *super().get_boot_command()]
