"""The ``swarm`` backend: the same container tree, spread over the nodes of a Docker Swarm.

It is :class:`~simulator.containerbackend.ContainerBackend` (the tree, the contexts, the
faults) with the parts that differ when hosts run on other machines:

* **Nodes and placement.** The runner talks to a swarm *manager* (its own engine, or
  ``engine=``). Each node that may run hosts must be reachable through its engine API: the
  manager's own node always is; another node says where its engine is with the node label
  ``mitogen-sim.engine`` (``docker node update --label-add mitogen-sim.engine=tcp://…``). The
  topology's ``placement`` rule (spread, a subtree per node, node labels) picks a node per
  host (:func:`place`). If the engine is in no swarm, a one-node swarm is made on it
  (``docker swarm init --advertise-addr 127.0.0.1``, its node labelled
  ``mitogen-sim.swarm=made``) and left again by the last run that uses it.
* **Networks.** Every segment is an overlay network, ``--internal --attachable``, with the
  same subnets and addresses as the docker backend's bridges, so a link that crosses nodes
  goes over VXLAN and the tree's isolation is the same. The swarm's own ``ingress`` network
  (not internal) is removed from a swarm the simulator made.
* **Containers.** Hosts are plain containers created through their node's engine and attached
  to the overlays (not swarm services: a service cannot have a fixed address, takes its
  configuration only from the orchestrator, and would be rescheduled after a ``kill`` fault,
  which must leave the host down until it is healed).
* **Images without a registry.** The manager's image of each suite is streamed into every node
  that lacks it (``docker save`` | ``docker load`` through the engine APIs).
* **Reaching the roots.** A small *gateway* container on the manager's node holds the runner's
  address on the root segment; the relay of a root edge runs on the runner inside that
  container's network namespace (``nsenter -t PID -n``), so the runner must run on that node
  as root.
* **Faults where the container runs.** ``iptables`` and ``tc`` run in a helper container on the
  target's own node, in the target's network namespace (:class:`~simulator.netns.HelperNetns`);
  relays inside a parent container are controlled by ``docker exec`` there. Each node is
  probed at start: a node without working ``iptables`` or ``tc`` is reported (timeline event
  ``capability``, :meth:`SwarmBackend.capability_gaps`) and a fault that needs the missing tool
  on it fails naming the node, never silently does nothing.

Cleanup: every container (on every node) and network carries the run's labels; ``destroy``,
the reaper (given every node's engine) and the next run's sweep remove them.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import os
import re
import sys
import tempfile
import time
from typing import Any, Dict, FrozenSet, Iterator, List, Mapping, Optional, Sequence, Set, Tuple

import docker
import docker.errors

from simulator import images, netns
from simulator.backend import BackendError, Placement
from simulator.containerbackend import (
    CONTAINER_FAULTS,
    CONTROL_TIMEOUT,
    ContainerBackend,
    ImagesMissing,
    _HostState,
    build_hint,
    missing_images,
)
from simulator.dockerd import DockerdError, engine_client, ensure_dockerd, socket_accepts
from simulator.faults import Bandwidth, Fault, Kill, Loss, Partition, SshdDown
from simulator.ownership import (
    LABEL_OWNER,
    LABEL_RUN,
    reap,
    reap_parser,
    remove_labelled,
    remove_networks,
)
from simulator.relay import RelayControl, RelayControlError
from simulator.segments import Segment
from simulator.state import owner_alive
from simulator.topology import Host, Topology

__all__ = [
    "LABEL_ENGINE",
    "LABEL_SWARM",
    "NodeInfo",
    "SwarmBackend",
    "SwarmUse",
    "leave_made_swarm",
    "make_internal_gwbridge",
    "place",
    "remove_ingress",
    "swarm_unavailable",
]

LABEL_ENGINE = images.LABEL_PREFIX + "engine"
LABEL_SWARM = images.LABEL_PREFIX + "swarm"
GATEWAY_NAME = "gateway"
NETWORK_REMOVE_WAIT = 20.0
#: How long a node's probe of a fault tool (one throwaway container) may take.
PROBE_TIMEOUT = 60.0
GWBRIDGE = "docker_gwbridge"
#: The internal docker_gwbridge of a swarm the simulator makes (no container uses it: every
#: overlay is internal); outside the default supernet.
GWBRIDGE_SUBNET = "10.254.254.0/24"
#: Which tool each fault kind needs in the target's (or its parent's) network namespace.
_NEEDS = {"partition": "iptables", "loss": "iptables", "sshd_down": "iptables",
          "bandwidth": "tc"}


# --------------------------------------------------------------------------------------------
# Placement: pure, so that rules are tested without a swarm
# --------------------------------------------------------------------------------------------


class NodeInfo:
    """One usable swarm node: its id, hostname, labels and engine URL."""

    def __init__(self, node_id: str, hostname: str, labels: Mapping[str, str],
                 engine: Optional[str]) -> None:
        self.id = node_id
        self.hostname = hostname
        self.labels = dict(labels)
        self.engine = engine

    def __repr__(self) -> str:
        return f"NodeInfo({self.id[:12]!r}, {self.hostname!r}, {self.labels!r})"


def place(topology: Topology, nodes: Sequence[NodeInfo]) -> Dict[str, str]:
    """Host id -> node id by the topology's placement rule (simulator/FORMAT.md). ``nodes[0]``
    is the first node (the manager the runner uses)."""
    if not nodes:
        raise BackendError("the swarm has no usable node")
    rule = topology.placement
    found: Dict[str, str] = {}
    if rule.rule == "spread":
        for host, node in zip(topology.hosts, itertools.cycle(nodes)):
            found[host.id] = node.id
        return found
    if rule.rule == "subtree":
        # Above ``depth`` the first node; the subtrees from the next one on, if there is one.
        order = [*nodes[1:], nodes[0]] if rule.depth > 0 and len(nodes) > 1 else list(nodes)
        turn = itertools.cycle(order)
        for host in topology.hosts:
            if host.depth < rule.depth:
                found[host.id] = nodes[0].id
            elif host.depth == rule.depth:
                found[host.id] = next(turn).id
            else:
                found[host.id] = found[host.parent or ""]
        return found
    matched: Dict[str, Tuple[str, Mapping[str, str]]] = {}
    for selector, labels in reversed(rule.labels):  # the first entry wins
        for host in topology.select(selector):
            matched[host.id] = (selector, labels)
    turns: Dict[str, Iterator[NodeInfo]] = {}
    for host in topology.hosts:
        if host.id not in matched:
            found[host.id] = nodes[0].id if host.parent is None else found[host.parent]
            continue
        selector, labels = matched[host.id]
        if selector not in turns:
            fitting = [n for n in nodes if all(n.labels.get(k) == v for k, v in labels.items())]
            if not fitting:
                raise BackendError(f"placement: no usable swarm node carries the labels "
                                   f"{dict(labels)} that {selector!r} asks for; nodes: "
                                   f"{', '.join(f'{n.hostname} {n.labels}' for n in nodes)}")
            turns[selector] = itertools.cycle(fitting)
        found[host.id] = next(turns[selector]).id
    return found


# --------------------------------------------------------------------------------------------
# Relays inside a parent container on another machine
# --------------------------------------------------------------------------------------------

#: Sends one JSON line to a UNIX socket and prints the answer line (run by the parent's python).
_CONTROL_SNIPPET = (
    "import socket,sys\n"
    "s=socket.socket(socket.AF_UNIX)\n"
    "s.settimeout(float(sys.argv[3]))\n"
    "s.connect(sys.argv[1])\n"
    "s.sendall(sys.argv[2].encode()+b'\\n')\n"
    "b=b''\n"
    "while not b.endswith(b'\\n'):\n"
    "    d=s.recv(65536)\n"
    "    if not d: break\n"
    "    b+=d\n"
    "sys.stdout.write(b.decode())\n")


class ExecRelayControl(RelayControl):
    """A relay's control socket inside a container, reached by ``docker exec`` on its node."""

    def __init__(self, container: Any, python: str, path: str,
                 timeout: float = CONTROL_TIMEOUT) -> None:
        # No super().__init__(): there is no socket to connect here; each request execs.
        self.path = path
        self.timeout = timeout
        self._buffer = b""
        self._sock = None
        self._container = container
        self._python = python

    def request(self, message: Dict[str, Any]) -> Dict[str, Any]:
        argv = ["timeout", "-s", "KILL", f"{self.timeout + 5:g}", self._python, "-c",
                _CONTROL_SNIPPET, self.path, json.dumps(message), str(self.timeout)]
        try:
            code, (out, err) = self._container.exec_run(argv, demux=True)
        except docker.errors.APIError as exc:
            raise RelayControlError(f"control request via {self._container.name}: {exc}")
        if code != 0:
            raise RelayControlError(f"no relay answered on {self.path!r} in "
                                    f"{self._container.name}: {(err or b'').decode()[-300:]}")
        try:
            answer = json.loads(out or b"")
        except ValueError:
            raise RelayControlError(f"relay sent a malformed answer: {out!r}") from None
        if not isinstance(answer, dict) or not answer.get("ok"):
            raise RelayControlError(str(answer.get("error", answer)
                                        if isinstance(answer, dict) else answer))
        return answer

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------------------------
# The swarm itself
# --------------------------------------------------------------------------------------------


def _swarm_state(client: docker.DockerClient, settle: float = 30.0) -> Dict[str, Any]:
    """The engine's swarm state, once it has settled: ``pending`` is an engine between
    states (a swarm left a moment ago, by another run's reaper say, or being joined), which
    becomes ``inactive`` or ``active`` within moments. Polled, bounded by `settle` seconds
    (the engine offers no event for it)."""
    deadline = time.monotonic() + settle
    while True:
        state = client.info().get("Swarm") or {}
        if state.get("LocalNodeState") != "pending" or time.monotonic() >= deadline:
            return state
        time.sleep(0.2)


def _made_by_us(client: docker.DockerClient, state: Mapping[str, Any]) -> bool:
    try:
        node = client.nodes.get(state.get("NodeID", ""))
    except docker.errors.APIError:
        return False
    return (node.attrs.get("Spec", {}).get("Labels") or {}).get(LABEL_SWARM) == "made"


class SwarmUse:
    """Runs on this machine that use a swarm the simulator made hold a shared lock on one
    file; making and leaving that swarm take it exclusively. So concurrent runs (pytest-xdist
    workers) share one swarm, and the last one out leaves it, even after a crash (the kernel
    drops a dead process's lock)."""

    PATH = os.path.join(tempfile.gettempdir(), "mitogen-sim-swarm.lock")

    def __init__(self) -> None:
        self._fd: Optional[int] = os.open(self.PATH, os.O_RDWR | os.O_CREAT, 0o600)

    def exclusive(self, wait: bool = True) -> bool:
        assert self._fd is not None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            return False
        return True

    def shared(self) -> None:
        assert self._fd is not None
        fcntl.flock(self._fd, fcntl.LOCK_SH)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def leave_made_swarm(client: docker.DockerClient, finished_run: str = "") -> bool:
    """Leave this engine's swarm if the simulator made it and no run still uses it (on this
    machine: see :class:`SwarmUse`; ``finished_run``'s networks, whose removal the swarm may
    not have finished, do not count). A swarm someone else made is never touched."""
    use = SwarmUse()
    try:
        if not use.exclusive(wait=False):
            return False
        return _leave_locked(client, finished_run)
    finally:
        use.release()


def _leave_locked(client: docker.DockerClient, finished_run: str = "") -> bool:
    state = _swarm_state(client)
    if state.get("LocalNodeState") != "active" or not _made_by_us(client, state):
        return False
    for network in client.networks.list(filters={"label": LABEL_OWNER, "driver": "overlay"}):
        labels = network.attrs.get("Labels") or {}
        if labels.get(LABEL_RUN) != finished_run and owner_alive(labels.get(LABEL_OWNER, "")):
            return False  # a run on another machine of the swarm, or one without the lock
    client.swarm.leave(force=True)
    for network in client.networks.list(names=[GWBRIDGE], filters={"label": LABEL_SWARM}):
        network.remove()
    return True


def make_internal_gwbridge(client: docker.DockerClient) -> None:
    """Create the swarm's ``docker_gwbridge`` ourselves, ``--internal`` (the engine would make
    it routed to the machine); labelled, so that leaving the swarm removes it again."""
    if client.networks.list(names=[GWBRIDGE]):
        return
    client.networks.create(
        GWBRIDGE, driver="bridge", internal=True, labels={LABEL_SWARM: "made"},
        options={"com.docker.network.bridge.name": GWBRIDGE,
                 "com.docker.network.bridge.enable_icc": "false",
                 "com.docker.network.bridge.enable_ip_masquerade": "false"},
        ipam=docker.types.IPAMConfig(pool_configs=[docker.types.IPAMPool(
            subnet=GWBRIDGE_SUBNET)]))


def _make_swarm(client: docker.DockerClient) -> None:
    """A one-node swarm on this engine, marked as the simulator's, with only internal
    networks: its ``docker_gwbridge`` made internal first, its ``ingress`` removed (the swarm
    makes both routed; the simulator publishes no port and needs no way out)."""
    make_internal_gwbridge(client)
    client.swarm.init(advertise_addr="127.0.0.1", listen_addr="127.0.0.1:2377")
    node = client.nodes.get(_swarm_state(client)["NodeID"])
    spec = dict(node.attrs["Spec"])
    spec["Labels"] = {**(spec.get("Labels") or {}), LABEL_SWARM: "made"}
    node.update(spec)
    remove_ingress(client)


def remove_ingress(client: docker.DockerClient, timeout: float = 30.0) -> None:
    """Remove the swarm's ``ingress`` network (it is not internal, and the simulator publishes
    no port). Just after ``swarm init`` the engine may not know it yet: retried, bounded."""
    deadline = time.monotonic() + timeout
    while True:
        found = [n for n in client.networks.list(names=["ingress"])
                 if n.attrs.get("Scope") == "swarm"]
        if not found:
            return
        try:
            for network in found:
                network.remove()
        except docker.errors.APIError as exc:
            if time.monotonic() > deadline:
                raise BackendError(f"cannot remove the swarm's ingress network: {exc}") from None
            time.sleep(0.2)  # the swarm's own state settles; nothing to wait on


def swarm_unavailable(suites: Sequence[str] = (), engine: Optional[str] = None
                      ) -> Optional[str]:
    """Why the swarm backend cannot run here now (None: it can): no engine answers, it is a
    swarm worker rather than a manager, or an image of ``suites`` is not built on it."""
    try:
        client = _client(engine)
    except DockerdError as exc:
        return str(exc)
    try:
        state = _swarm_state(client)
        if state.get("LocalNodeState") == "active" and not state.get("ControlAvailable"):
            return "this engine is a swarm worker; run on a manager (or pass its engine)"
        missing = missing_images(client, suites)
    finally:
        client.close()
    if missing:
        return f"images not built: {', '.join(missing)}; {build_hint(suites)}"
    return None


def _client(engine: Optional[str], timeout: float = 300.0) -> docker.DockerClient:
    if engine is None:
        return engine_client(client_timeout=timeout)
    if not socket_accepts(engine):  # first: the SDK leaks its socket when a connect fails
        raise DockerdError(f"no Docker engine answers at {engine}")
    client = docker.DockerClient(base_url=engine, timeout=timeout)
    try:
        client.ping()
    except Exception as exc:
        client.close()
        raise DockerdError(f"no Docker engine answers at {engine}: {exc}") from None
    return client


class SwarmBackend(ContainerBackend):
    """Hosts as containers on a swarm's nodes, linked by overlays; see the module docstring."""

    name = "swarm"
    reaper_module = "simulator.swarmbackend"

    def __init__(self, *args: Any, engine: Optional[str] = None, **kwargs: Any) -> None:
        """``engine``: the manager's engine URL (default: the environment's engine)."""
        super().__init__(*args, **kwargs)
        self._engine_url = engine
        self._nodes: List[NodeInfo] = []
        self._node_clients: Dict[str, docker.DockerClient] = {}
        self._host_nodes: Dict[str, str] = {}
        self._node_tools: Dict[str, Dict[str, bool]] = {}
        self._tags: Dict[str, str] = {}
        self._gateway: Any = None
        self._swarm_use: Optional[SwarmUse] = None
        #: Overlays destroy could not remove: held by a swarm node that is down.
        self.left: List[str] = []

    # -- engines and nodes ---------------------------------------------------------------------

    def _open_engines(self, suites: Sequence[str]) -> docker.DockerClient:
        try:
            if self._prepare and self._engine_url is None:
                client = ensure_dockerd(progress=self._progress)
            else:
                client = _client(self._engine_url)
        except DockerdError as exc:
            raise BackendError(str(exc)) from None
        try:
            self._join_or_make_swarm(client)
            if not self._prepare:
                missing = missing_images(client, suites)
                if missing:
                    raise ImagesMissing(f"images not built: {', '.join(missing)}; "
                                        f"{build_hint(suites)}")
            self._nodes = self._usable_nodes(client)
        except BaseException:
            self._release_swarm(client)
            client.close()
            raise
        return client

    def _join_or_make_swarm(self, client: docker.DockerClient) -> None:
        state = _swarm_state(client)
        if state.get("LocalNodeState") == "inactive" or _made_by_us(client, state):
            # Shared while we use it: nobody leaves it under us. Making it needs the lock
            # alone (flock converts by dropping first, so two makers cannot deadlock).
            use = SwarmUse()
            try:
                use.shared()
                if _swarm_state(client).get("LocalNodeState") == "inactive":
                    use.exclusive()
                    if _swarm_state(client).get("LocalNodeState") == "inactive":
                        _make_swarm(client)
                        self.timeline.record("build", action="swarm_init",
                                             advertise="127.0.0.1")
                    use.shared()
            except BaseException:
                use.release()
                raise
            self._swarm_use = use
            state = _swarm_state(client)
        if state.get("LocalNodeState") != "active" or not state.get("ControlAvailable"):
            raise BackendError(f"the swarm backend needs a swarm manager; this engine's swarm "
                               f"state is {state.get('LocalNodeState')!r}"
                               f"{'' if state.get('ControlAvailable') else ' (a worker)'}")

    def _usable_nodes(self, client: docker.DockerClient) -> List[NodeInfo]:
        """Ready, active nodes whose engine we reach: the manager's own first."""
        own = _swarm_state(client)["NodeID"]
        nodes: List[NodeInfo] = []
        skipped: List[str] = []
        for node in client.nodes.list():
            attrs = node.attrs
            spec = attrs.get("Spec", {})
            labels = spec.get("Labels") or {}
            hostname = attrs.get("Description", {}).get("Hostname", node.id[:12])
            if attrs.get("Status", {}).get("State") != "ready" or \
                    spec.get("Availability") != "active":
                continue
            if node.id == own:
                nodes.insert(0, NodeInfo(node.id, hostname, labels, self._engine_url))
                self._node_clients[node.id] = client
            elif labels.get(LABEL_ENGINE):
                nodes.append(NodeInfo(node.id, hostname, labels, labels[LABEL_ENGINE]))
            else:
                skipped.append(hostname)
        if skipped:
            self.timeline.record("build", action="nodes_skipped", nodes=skipped,
                                 reason=f"no {LABEL_ENGINE} label: their engine is unknown")
        return nodes

    def _engine_url_of(self, node_id: str) -> Optional[str]:
        return next((n.engine for n in self._nodes if n.id == node_id), None)

    def _node_client(self, node_id: str) -> docker.DockerClient:
        if node_id not in self._node_clients:
            node = next(n for n in self._nodes if n.id == node_id)
            try:
                self._node_clients[node_id] = _client(node.engine)
            except DockerdError as exc:
                raise BackendError(f"swarm node {node.hostname}: {exc}") from None
        return self._node_clients[node_id]

    def _engines(self) -> List[docker.DockerClient]:
        return list(self._node_clients.values())

    def _engine_urls(self) -> List[str]:
        urls = [n.engine for n in self._nodes if n.engine]
        if self._nodes and self._nodes[0].engine is None:
            urls.insert(0, os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock"))
        return urls

    def _make_containers(self, tags: Dict[str, str]) -> None:
        super()._make_containers(tags)
        self._keep_overlays(tags)

    def _keep_overlays(self, tags: Dict[str, str]) -> None:
        """One idle container per node and overlay its hosts use, holding the overlay there.

        A worker forgets an attachable overlay once none of its running containers uses it;
        a stopped container on it then cannot start again ("network ... not found"), and a
        new one fails to attach (the manager's attachment times out), so a host that was
        alone on its segment on that node could not come back from a crash, a stop or a
        restart. The keeper does nothing but stay attached; it goes with the run's other
        containers. None on the node this runner manages the swarm through: a manager keeps
        every overlay.
        """
        wanted: Dict[Tuple[str, str], str] = {}
        for host in self.topology.hosts:
            node = self._host_nodes[host.id]
            if node == self._nodes[0].id:
                continue
            names = [self._networks[host.parent].name]
            if host.children:
                names.append(self._networks[host.id].name)
            for name in names:
                wanted.setdefault((node, name), tags[host.suite])
        for index, ((node, name), tag) in enumerate(sorted(wanted.items())):
            self._node_client(node).containers.run(
                tag, entrypoint=["sleep", "infinity"], network=name, detach=True,
                name=f"msim-{self._run}-keep-{index}", labels=self._labels())

    def _engine_for(self, host: Host) -> docker.DockerClient:
        return self._node_client(self._host_nodes[host.id])

    def _remove_run(self) -> List[str]:
        """Containers on every node that answers (a killed node holds nothing any more), then
        the overlays on the manager. The swarm frees an overlay only once every node has
        detached from it: retried, bounded. An overlay that a node which is *down* still holds
        (its attachment outlives it until the node returns or is removed from the swarm, which
        is the swarm owner's call, not ours) is recorded in :attr:`left` and the timeline."""
        label = {"label": f"{LABEL_RUN}={self._run}"}
        removed = []
        dead: Set[str] = set()
        for node_id, client in list(self._node_clients.items()):
            url = self._engine_url_of(node_id)
            try:
                if url is not None and not socket_accepts(url):
                    raise ConnectionError(f"nothing listens at {url}")
                client.ping()
            except Exception:  # a dead node: nothing to remove there
                self.timeline.record("shutdown", step="node_unreachable", node=node_id)
                dead.add(node_id)
                if client is not self._client:
                    client.close()
                    del self._node_clients[node_id]
                continue
            for container in client.containers.list(all=True, filters=label, ignore_removed=True):
                removed += remove_labelled(client, {"id": container.id})
        self._gateway = None
        gone, held = remove_networks(self.client, label, NETWORK_REMOVE_WAIT,
                                     for_good=lambda why: self._held_by(why, dead))
        removed += gone
        self.left = [name for name, _ in held]
        for name, why in held:
            self.timeline.record("shutdown", step="network_left", network=name, reason=why)
        return removed

    def _held_by(self, refusal: str, nodes: Set[str]) -> bool:
        """Whether the manager's refusal to remove an overlay ("network X is in use by task
        T") names an attachment of one of ``nodes`` (down: it will not detach)."""
        found = re.search(r"in use by task ([a-z0-9]+)", refusal)
        if not nodes or found is None:
            return False
        try:
            task = self.client.api.inspect_task(found.group(1))
        except docker.errors.APIError:
            return False
        return task.get("NodeID") in nodes

    def _release_swarm(self, client: Optional[docker.DockerClient]) -> None:
        """Drop our shared hold on a simulator-made swarm; the last run out leaves it."""
        if self._swarm_use is None:
            return
        self._swarm_use.release()
        self._swarm_use = None
        if client is not None:
            try:
                if leave_made_swarm(client, self._run):
                    self.timeline.record("shutdown", step="swarm_left")
            except docker.errors.APIError as exc:
                self.timeline.record("shutdown", step="swarm_leave_failed", error=str(exc))

    def _close_engines(self) -> None:
        self._release_swarm(self._client)
        super()._close_engines()

    def keep(self) -> str:
        """As the docker backend's; a swarm the simulator made stays too (``down`` leaves
        it once nothing of a live run is on it)."""
        if self._swarm_use is not None:
            self._swarm_use.release()
            self._swarm_use = None
        return super().keep()

    # -- images, placement ---------------------------------------------------------------------

    def _images(self, suites: Sequence[str]) -> Dict[str, str]:
        tags = {suite: images.ensure_image(suite, progress=self._progress, client=self.client)
                for suite in suites}
        self._host_nodes = place(self.topology, self._nodes)
        needed: Dict[str, Set[str]] = {}
        for host in self.topology.hosts:
            needed.setdefault(self._host_nodes[host.id], set()).add(tags[host.suite])
        for node_id, wanted in needed.items():
            self._load_images(node_id, sorted(wanted))
        self._tags = tags
        self._probe_nodes(sorted(needed), tags[self.topology.hosts[0].suite])
        return tags

    def _load_images(self, node_id: str, tags: Sequence[str]) -> None:
        """Stream each missing image from the manager into the node: no registry needed."""
        client = self._node_client(node_id)
        for tag in tags:
            if not images.image_present(client, tag):
                self._progress(f"loading {tag} into swarm node {node_id[:12]}")
                images.copy_image(self.client, client, tag)

    def _probe_nodes(self, node_ids: Sequence[str], tag: str) -> None:
        """Which network fault tools work on each node (in a throwaway namespace)."""
        for node_id in node_ids:
            client = self._node_client(node_id)
            found = {}
            for tool, argv in (("iptables", ["iptables", "-w", "-S", "OUTPUT"]),
                               ("tc", ["tc", "qdisc", "show"])):
                found[tool] = self._tool_works(client, tag, argv)
            self._node_tools[node_id] = found
            missing = sorted(t for t, ok in found.items() if not ok)
            if missing:
                self.timeline.record("capability", node=node_id, missing=missing,
                                     faults=sorted(k for k, t in _NEEDS.items() if t in missing))

    def _tool_works(self, client: docker.DockerClient, tag: str, argv: List[str]) -> bool:
        """Run ``argv`` in a throwaway container with NET_ADMIN: does it succeed? A tool the
        image lacks fails the container's start; one the kernel cannot serve, its exit."""
        container = client.containers.create(tag, entrypoint=argv, network_mode="none",
                                             cap_add=["NET_ADMIN"], labels=self._labels())
        try:
            try:
                container.start()
            except docker.errors.APIError as exc:
                if "executable file not found" not in str(exc):
                    raise
                return False
            return container.wait(timeout=PROBE_TIMEOUT)["StatusCode"] == 0
        finally:
            container.remove(force=True)

    def capability_gaps(self) -> Dict[str, List[str]]:
        """Node hostname/id -> the fault kinds it cannot do (its tools are missing)."""
        gaps = {}
        for node_id, tools in self._node_tools.items():
            kinds = sorted(k for k, t in _NEEDS.items() if not tools.get(t, False))
            if not tools.get("iptables", False):
                kinds.append("kill(power_off)")
            if kinds:
                gaps[node_id] = kinds
        return gaps

    def capabilities(self) -> FrozenSet[str]:
        """What every node this run uses can do; :meth:`capability_gaps` says who lacks what."""
        lacking = {kind for kinds in self.capability_gaps().values() for kind in kinds}
        return frozenset(CONTAINER_FAULTS - lacking)

    def placement(self, host: str) -> Placement:
        state = self.state(host)
        node = self._host_nodes[state.host.id]
        name = next((n.hostname for n in self._nodes if n.id == node), node)
        return Placement(state.host.id, state.container.name, address=state.uplink,
                         labels={"backend": "swarm", "node": node, "node_name": name,
                                 "container": state.container.id[:12]})

    def node_of(self, host: str) -> str:
        """The swarm node id that runs ``host``."""
        return self._host_nodes[self.topology.host(host).id]

    # -- networks and the runner's gateway ------------------------------------------------------

    def _make_network(self, segment: Segment, index: int) -> Any:
        # The swarm gives every node attached to an overlay an address of its own: from the
        # upper half, so that it never takes one of the hosts' fixed addresses.
        ipam = docker.types.IPAMConfig(pool_configs=[docker.types.IPAMPool(
            subnet=str(segment.subnet), gateway=segment.gateway,
            iprange=str(segment.engine_range))])
        network = self.client.networks.create(
            f"msim-{self._run}-s{index}", driver="overlay", internal=True, attachable=True,
            ipam=ipam, labels=self._labels(segment=segment.owner or "<runner>"))
        if segment.owner is None:
            self._gateway = self._make_gateway(network, segment)
        return network

    def _make_gateway(self, network: Any, segment: Segment) -> Any:
        """The runner's stand-in on the root segment, on the manager's node."""
        tag = self._tags[self.topology.hosts[0].suite]
        endpoint = self.client.api.create_endpoint_config(
            ipv4_address=self._root_parent_address(segment))
        created = self.client.api.create_container(
            tag, name=f"msim-{self._run}-{GATEWAY_NAME}", entrypoint=["sleep", "infinity"],
            labels=self._labels(), host_config=self.client.api.create_host_config(init=True),
            networking_config=self.client.api.create_networking_config(
                {network.name: endpoint}))
        gateway = self.client.containers.get(created["Id"])
        gateway.start()
        gateway.reload()
        return gateway

    def _engine_addresses(self) -> int:
        # Each node attached to an overlay takes one, and a worker's keeper one more.
        return 2 * len(self._nodes)

    def _root_parent_address(self, segment: Segment) -> str:
        # .1 is the overlay's own; .2, the owner's slot, is free on the root segment.
        return str(segment.subnet.network_address + 2)

    def _root_relay_prefix(self) -> List[str]:
        if self._gateway is None:
            raise BackendError("the swarm backend's gateway container is not running")
        self._gateway.reload()
        pid = self._gateway.attrs["State"]["Pid"]
        if not pid:
            raise BackendError("the swarm backend's gateway container is not running")
        return ["nsenter", "-t", str(pid), "-n"]

    # -- faults where the container runs -------------------------------------------------------

    def _netns(self, host: str) -> netns.Netns:
        state = self.state(host)
        return netns.HelperNetns(state.container.client, state.container.id,
                                 self._tags[state.host.suite], state.host.id, self._labels())

    @contextlib.contextmanager
    def _relay_control(self, state: _HostState, path: str) -> Iterator[Any]:
        if state.host.parent is None:
            with RelayControl(path, timeout=CONTROL_TIMEOUT) as control:
                yield control
            return
        parent = self._states[state.host.parent]
        yield ExecRelayControl(parent.container, parent.host.python, path)

    def apply(self, fault: Fault) -> object:
        self._check_capable(fault)
        return super().apply(fault)

    def _check_capable(self, fault: Fault) -> None:
        kind = "kill(power_off)" if isinstance(fault, Kill) and fault.mode == "power_off" \
            else fault.KIND
        if not isinstance(fault, (Partition, Loss, SshdDown, Bandwidth, Kill)):
            return
        host = self.topology.host(fault.target)
        nodes = [self._host_nodes[host.id]]
        if isinstance(fault, Bandwidth) and host.parent is not None:
            nodes.append(self._host_nodes[host.parent])
        for node_id in nodes:
            if kind in self.capability_gaps().get(node_id, ()):
                tools = self._node_tools[node_id]
                raise BackendError(
                    f"swarm node {node_id[:12]} cannot apply {kind} to {host.id!r}: it lacks "
                    f"{', '.join(t for t, ok in tools.items() if not ok)} in its containers' "
                    f"network namespaces")


# --------------------------------------------------------------------------------------------
# The reaper of a swarm run: python -m simulator.swarmbackend reap --owner ... --engine MANAGER
# --------------------------------------------------------------------------------------------


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The swarm backend's reaper: removes a dead run's resources from every engine given
    (:func:`simulator.ownership.reap`), then leaves the swarm if the simulator made it and no
    run still uses it, as the run itself would have on its way out. The first engine is the
    manager's."""
    args = reap_parser("simulator.swarmbackend")[0].parse_args(argv)
    if not reap(args.owner, args.run, args.keys_dir, args.engine):
        return 0  # the run cleaned up itself
    try:
        client = _client(args.engine[0] if args.engine else None, timeout=120)
    except DockerdError:
        return 0  # the manager is gone: there is no swarm state to leave here
    try:
        leave_made_swarm(client, args.run)
    finally:
        client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
