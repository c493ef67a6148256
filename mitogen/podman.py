"""``router.podman()``: a child inside a running Podman container (``podman exec``)."""

from __future__ import annotations

from typing import Any

import mitogen.parent

__all__ = ["Connection", "Options"]


class Options(mitogen.parent.Options):
    def __init__(
        self,
        container: str | None = None,
        podman_path: str | None = None,
        username: str | None = None,
        python_path: str | list | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(python_path=python_path or "python", **kwargs)
        if not container:
            raise ValueError("podman: container= is required")
        self.container = container
        self.podman_path = podman_path or "podman"
        self.username = username


class Connection(mitogen.parent.Connection):
    options_class = Options
    name_prefix = "podman"

    def make_stream_name(self, pid: int) -> str:
        return "podman.%s" % (self.options.container,)

    def get_boot_command(self) -> list:
        opts = self.options
        argv = [opts.podman_path, "exec", "--interactive"]
        if opts.username:
            argv += ["--user", opts.username]
        return [*argv, opts.container, *super().get_boot_command()]
