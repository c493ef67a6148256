"""``router.docker()``: a child inside a running container (``docker exec``), or in a
temporary one made from an image (``docker run --rm``)."""

from __future__ import annotations

from typing import Any

import mitogen.parent

__all__ = ["Connection", "Options"]


class Options(mitogen.parent.Options):
    def __init__(
        self,
        container: str | None = None,
        image: str | None = None,
        docker_path: str | None = None,
        username: str | None = None,
        python_path: str | list | None = None,
        **kwargs: Any,
    ) -> None:
        # The container has its own filesystem: the master's interpreter path means nothing
        # there, so the default is the "python" on its PATH, as for any remote target.
        super().__init__(python_path=python_path or "python", **kwargs)
        if not container and not image:
            raise ValueError("docker: give container= (a running one) or image=")
        self.container = container
        self.image = image
        self.docker_path = docker_path or "docker"
        self.username = username


class Connection(mitogen.parent.Connection):
    options_class = Options
    name_prefix = "docker"

    def make_stream_name(self, pid: int) -> str:
        return "docker.%s" % (self.options.container or self.options.image,)

    def get_boot_command(self) -> list:
        opts = self.options
        if opts.container:
            argv = [opts.docker_path, "exec", "--interactive"]
        else:
            argv = [opts.docker_path, "run", "--interactive", "--rm"]
        if opts.username:
            argv += ["--user", opts.username]
        argv.append(opts.container or opts.image)
        return argv + super().get_boot_command()
