"""``router.kubectl()``: a child inside a Kubernetes pod (``kubectl exec``)."""

from __future__ import annotations

from typing import Any

import mitogen.parent

__all__ = ["Connection", "Options"]


class Options(mitogen.parent.Options):
    pod: str | None = None
    kubectl_path = "kubectl"
    #: Arguments for kubectl itself (``--context``, ``--namespace``, ...), before ``exec``.
    kubectl_args: list | None = None

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
    options: Options  # this method's own
    name_prefix = "kubectl"
    child_is_immediate_subprocess = True
    eager_payload = False
    sends_bytecode = False  # over the network, to a cluster

    def make_stream_name(self, pid: int) -> str:
        return "kubectl.%s" % (self.options.pod,)

    def get_boot_command(self) -> list:
        """``kubectl [kubectl_args] exec -it POD -- python ...``, as Mitogen runs it. The
        child's stdin is a socket, not a terminal, so kubectl allocates no TTY for -t."""
        opts = self.options
        return [opts.kubectl_path, *(opts.kubectl_args or ()), "exec", "-it", opts.pod, "--",
                *super().get_boot_command()]
