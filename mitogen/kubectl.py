"""``router.kubectl()``: a child inside a Kubernetes pod (``kubectl exec -i``)."""

from __future__ import annotations

from typing import Any

import mitogen.parent

__all__ = ["Connection", "Options"]


class Options(mitogen.parent.Options):
    def __init__(
        self,
        pod: str,
        kubectl_path: str | None = None,
        kubectl_args: list | None = None,
        python_path: str | list | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(python_path=python_path or "python", **kwargs)
        if isinstance(kubectl_args, str):
            raise TypeError("kubectl_args must be a list of arguments, not a string")
        self.pod = pod
        self.kubectl_path = kubectl_path or "kubectl"
        self.kubectl_args = list(kubectl_args or ())


class Connection(mitogen.parent.Connection):
    options_class = Options
    name_prefix = "kubectl"

    def make_stream_name(self, pid: int) -> str:
        return "kubectl.%s" % (self.options.pod,)

    def get_boot_command(self) -> list:
        opts = self.options
        # No -t: a terminal in the pod would mangle the binary stream.
        return [opts.kubectl_path, *opts.kubectl_args, "exec", "-i", opts.pod, "--",
                *super().get_boot_command()]
