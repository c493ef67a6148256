"""The ``docker`` backend: every host a container on this machine's Docker engine.

It is :class:`~simulator.containerbackend.ContainerBackend` (the tree, the contexts, the
faults) on one engine: each segment is an ``--internal`` bridge network; the root segment's
bridge keeps its gateway address on the machine, which is how the runner reaches the roots
(the relay of a root edge runs on the runner and connects to the root directly); every other
segment is created with ``inhibit_ipv4``, so the machine has no address on it. Network faults
are applied from the runner with ``nsenter -t PID -n`` and the machine's own ``iptables`` and
``tc``, and the relay of an edge is controlled through ``/proc/<parent pid>/root``.
"""

from __future__ import annotations

import contextlib
from typing import Any, Dict, FrozenSet, Iterator, List, Optional, Sequence

import docker

from simulator import images, netns
from simulator.backend import BackendError
from simulator.containerbackend import (
    CONTAINER_FAULTS,
    CONTROL_TIMEOUT,
    ContainerBackend,
    ImagesMissing,
    _HostState,
    build_hint,
    missing_images,
)
from simulator.dockerd import DockerdError, engine_client, ensure_dockerd
from simulator.relay import RelayControl
from simulator.segments import Segment
from simulator.topology import Host

__all__ = ["DockerBackend", "docker_unavailable"]


class DockerBackend(ContainerBackend):
    """Hosts as containers on this machine's engine; see the module docstring."""

    name = "docker"

    def _open_engines(self, suites: Sequence[str]) -> docker.DockerClient:
        try:
            client = ensure_dockerd(progress=self._progress) if self._prepare \
                else engine_client()
        except DockerdError as exc:
            raise BackendError(str(exc)) from None
        if not self._prepare:
            missing = missing_images(client, suites)
            if missing:
                client.close()
                raise ImagesMissing(f"images not built: {', '.join(missing)}; "
                                    f"{build_hint(suites)}")
        return client

    def _engines(self) -> List[docker.DockerClient]:
        return [] if self._client is None else [self._client]

    def _images(self, suites: Sequence[str]) -> Dict[str, str]:
        return {suite: images.ensure_image(suite, progress=self._progress, client=self.client)
                for suite in suites}

    def _engine_for(self, host: Host) -> docker.DockerClient:
        return self.client

    def _make_network(self, segment: Segment, index: int) -> Any:
        options = {"com.docker.network.bridge.name": f"msim{self._run[:6]}s{index}"}
        if segment.owner is not None:
            # No address on the machine: only the parent and its children are on this link.
            options["com.docker.network.bridge.inhibit_ipv4"] = "true"
        ipam = docker.types.IPAMConfig(pool_configs=[docker.types.IPAMPool(
            subnet=str(segment.subnet), gateway=segment.gateway)])
        return self.client.networks.create(
            f"msim-{self._run}-s{index}", driver="bridge", internal=True, ipam=ipam,
            options=options, labels=self._labels(segment=segment.owner or "<runner>"))

    def _root_parent_address(self, segment: Segment) -> str:
        return segment.gateway

    def _netns(self, host: str) -> netns.Netns:
        return netns.NsenterNetns(self.container_pid(host), self.topology.host(host).id)

    @contextlib.contextmanager
    def _relay_control(self, state: _HostState, path: str) -> Iterator[Any]:
        if state.host.parent is not None:
            path = f"/proc/{self.container_pid(state.host.parent)}/root{path}"
        with RelayControl(path, timeout=CONTROL_TIMEOUT) as control:
            yield control

    def capabilities(self) -> FrozenSet[str]:
        return CONTAINER_FAULTS


def docker_unavailable(suites: Sequence[str] = ()) -> Optional[str]:
    """Why the docker backend cannot run here now (None: it can): no engine answers, or an
    image of ``suites`` is not built. Starts and builds nothing."""
    try:
        client = engine_client()
    except DockerdError as exc:
        return str(exc)
    try:
        missing = missing_images(client, suites)
    finally:
        client.close()
    if missing:
        return f"images not built: {', '.join(missing)}; {build_hint(suites)}"
    return None
