"""``router.podman()``: a child inside a running Podman container (``podman exec``)."""

from __future__ import annotations

from typing import Any

import mitogen.parent

__all__ = ["Connection", "Options"]


class Options(mitogen.parent.Options):
    container: str | None = None
    podman_path = "podman"
    #: The account to run as inside the container (``--user``).
    username: str | None = None

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
    options: Options  # this method's own
    name_prefix = "podman"
    child_is_immediate_subprocess = False
    eager_payload = False

    def make_stream_name(self, pid: int) -> str:
        return "podman.%s" % (self.options.container,)

    def get_boot_command(self) -> list:
        """``podman exec [--user=U] --interactive -- CONTAINER python ...``, as Mitogen."""
        opts = self.options
        argv = [opts.podman_path, "exec"]
        if opts.username:
            argv.append("--user=" + opts.username)
        return [*argv, "--interactive", "--", opts.container, *super().get_boot_command()]


def __getattr__(name: str) -> Any:
    """Names kept only for compatibility with Mitogen: see mitogen/parity.py."""
    if name.startswith("__"):
        raise AttributeError(name)
    import mitogen.parity

    return mitogen.parity.lookup(__name__, name)
