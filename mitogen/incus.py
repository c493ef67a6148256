"""``router.incus()``: a child inside an Incus container (``incus exec``): lxd's method with
the Incus client, which LXD's fork renamed."""

from __future__ import annotations

from typing import Any

import mitogen.parent

__all__ = ["Connection", "Options"]

EOF_HINT = ("Incus often reports a failure to run the program only in the host's logs: "
            "look in /var/log for the reason.")


class Options(mitogen.parent.Options):
    container: str | None = None
    incus_path = "incus"
    python_path = "python"

    def __init__(
        self,
        container: str,
        incus_path: str | None = None,
        python_path: str | list | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(python_path=python_path or "python", **kwargs)
        self.container = container
        self.incus_path = incus_path or "incus"


class Connection(mitogen.parent.Connection):
    options_class = Options
    options: Options  # this method's own
    name_prefix = "incus"
    child_is_immediate_subprocess = False
    eager_payload = False
    eof_error_hint = EOF_HINT

    def make_stream_name(self, pid: int) -> str:
        return "incus.%s" % (self.options.container,)

    def get_boot_command(self) -> list:
        """``incus exec --mode=non-interactive CONTAINER -- python ...``, as Mitogen."""
        return [self.options.incus_path, "exec", "--mode=non-interactive",
                self.options.container, "--", *super().get_boot_command()]
