"""``router.buildah()``: a child inside a Buildah working container (``buildah run``)."""

from __future__ import annotations

from typing import Any

import mitogen.parent

__all__ = ["Connection", "Options"]


class Options(mitogen.parent.Options):
    container: str | None = None
    buildah_path = "buildah"
    #: The account to run as inside the container (``--user``).
    username: str | None = None

    def __init__(
        self,
        container: str | None = None,
        buildah_path: str | None = None,
        username: str | None = None,
        python_path: str | list | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(python_path=python_path or "python", **kwargs)
        if not container:
            raise ValueError("buildah: container= is required")
        self.container = container
        self.buildah_path = buildah_path or "buildah"
        self.username = username


class Connection(mitogen.parent.Connection):
    options_class = Options
    options: Options  # this method's own
    name_prefix = "buildah"
    child_is_immediate_subprocess = False
    eager_payload = False

    def make_stream_name(self, pid: int) -> str:
        return "buildah.%s" % (self.options.container,)

    def get_boot_command(self) -> list:
        """``buildah run [--user=U] -- CONTAINER python ...``, as Mitogen runs it."""
        opts = self.options
        argv = [opts.buildah_path, "run"]
        if opts.username:
            argv.append("--user=" + opts.username)
        return [*argv, "--", opts.container, *super().get_boot_command()]


def __getattr__(name: str) -> Any:
    """Names kept only for compatibility with Mitogen: see mitogen/parity.py."""
    if name.startswith("__"):
        raise AttributeError(name)
    import mitogen.parity

    return mitogen.parity.lookup(__name__, name)
