"""``router.docker()``: a child inside a running container (``docker exec``), or in a
temporary one made from an image (``docker run --rm``)."""

from __future__ import annotations

from typing import Any

import mitogen.parent

__all__ = ["Connection", "Options"]


class Options(mitogen.parent.Options):
    #: A running container to execute in...
    container: str | None = None
    #: ...or an image to start a temporary container from.
    image: str | None = None
    docker_path = "docker"
    #: The account to run as inside the container (``--user``).
    username: str | None = None

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
    options: Options  # this method's own
    name_prefix = "docker"
    child_is_immediate_subprocess = False
    eager_payload = False

    def make_stream_name(self, pid: int) -> str:
        return "docker.%s" % (self.options.container or self.options.image,)

    def get_boot_command(self) -> list:
        """``docker exec --interactive [--user=U] CONTAINER python ...`` or ``docker run
        --interactive [--user=U] --rm IMAGE python ...``, as Mitogen runs them."""
        opts = self.options
        flags = ["--interactive"]
        if opts.username:
            flags.append("--user=" + opts.username)
        if opts.container:
            argv = [opts.docker_path, "exec", *flags, opts.container]
        else:
            argv = [opts.docker_path, "run", *flags, "--rm", str(opts.image)]
        return argv + super().get_boot_command()


def __getattr__(name: str) -> Any:
    """Names kept only for compatibility with Mitogen: see mitogen/parity.py."""
    if name.startswith("__"):
        raise AttributeError(name)
    import mitogen.parity

    return mitogen.parity.lookup(__name__, name)
