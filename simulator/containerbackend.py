"""What the container backends share (``docker``: one engine; ``swarm``: many machines): one
real Debian container per host, reached over real ssh and sudo. The subclasses say where the
engines are, which networks carry the segments, how to get into a host's network namespace
and how the runner reaches the roots (:class:`ContainerBackend`'s abstract hooks).

Each host is a container of its suite's image (``simulator.images``) running sshd under
docker-init (``init=True``, so orphans of ssh sessions are reaped). The runner reaches a root
host directly; every deeper host is reached by ``ssh`` *from its parent's context*, so the ssh
client runs inside the parent container, and accounts by ``sudo`` inside the host.

Networks. Every network is ``--internal`` and carved from the topology's own supernet
(:mod:`simulator.segments`): one small subnet per *segment*, a parent and its children; the
root segment holds the roots and the runner's side. A container is on its parent's segment
and on its own, and has no default route, so the tree is the only data path.
Management (start, stop, exec, ps, diff) goes through the Docker API, never through the tree.

Credentials. The session generates the topology's keys (``runner``...) and one ed25519 host
key per host. Accounts accept the public keys (node.json), hosts get their host keys in
node.json, and a ``known_hosts`` naming every host is written on the runner and into every
container, so ssh runs with ``check_host_keys='enforce'`` everywhere: a wrong host would be
refused, and nothing is ever written to a ``~/.ssh``. The runner's private key is placed in each
parent container, owned by the parent's login user (``/etc/sim/id_<key>``), and passed as
``identity_file``: agent forwarding would also work but puts an agent and its socket in every
hop's environment, and a plain key keeps each hop independent of the ones above it.

Links. Every ssh edge goes through the link relay (``simulator/relay.py``, copied into every
container) as ``ProxyCommand``, run by the parent's interpreter (on the runner for roots):
steady latency, jitter and bandwidth come from the topology, and latency/bandwidth/stream
faults are set through its control socket, reached from the runner through
``/proc/<pid>/root``. Packet loss and partitions are iptables rules inside the child
container's network namespace (:mod:`simulator.netns`), aimed at the parent's address: this
kernel has no netem.

=========================  ================================================================
fault                      docker effect
=========================  ================================================================
``kill`` crash             ``docker kill`` (SIGKILL to every process; peers see the close)
``kill`` power_off         DROP everything in the host's namespace, then ``docker kill``
``kill`` stop              ``docker stop`` with ``grace``
``restart``                ``docker restart``, then its subtree's contexts again
``pause``                  ``docker pause`` (cgroup freezer); heal unpauses
``signal``                 ``pkill -SIG -f MATCH`` inside the host; SIGSTOP heals by SIGCONT
``sshd_down``              new connections to port 22 are refused (RST); live sessions stay
``partition`` drop         iptables DROP from/to the parent (``direction``: one way only)
``partition`` reset        iptables REJECT with tcp-reset, and the relay resets live streams
``partition`` unplug       the interface toward the parent goes down (ENETUNREACH)
``latency``, ``bandwidth`` relay settings, restored to the link's own on heal
``loss``                   iptables ``statistic --mode random`` DROP, both ways
``stream``                 relay reset / stall / cut_after
=========================  ================================================================

Liveness: ssh's own ``ServerAliveInterval``/``ServerAliveCountMax`` from the topology's
network settings (and sshd's ``ClientAlive*`` on the far side, so that the orphaned half of a
silently cut session ends too). A silent cut is therefore detected within
``interval * (count + 1)`` seconds; when a host whose edge is silently cut disconnects, the
backend records a ``keepalive`` event for it in the timeline.

Cleanup. Every container and network carries the labels ``mitogen-sim.run`` (this run's id),
``mitogen-sim.owner`` (the runner's pid and start time). ``destroy`` removes them; a detached
reaper process removes them if the runner dies without doing so (SIGKILL); and ``create``
sweeps resources of runs whose owner is gone (:mod:`simulator.ownership`).
"""

from __future__ import annotations

import abc
import concurrent.futures
import dataclasses
import os
import shutil
import sys
import threading
import time
import uuid
from typing import (
    Any,
    Callable,
    ContextManager,
    Dict,
    FrozenSet,
    List,
    Optional,
    Sequence,
    Tuple,
)

import docker
import docker.errors

import mitogen.core
import mitogen.master
from simulator import hostcontainer, images, netns
from simulator.backend import (
    Backend,
    BackendError,
    ConnectSpec,
    ExecResult,
    Placement,
    ProcessInfo,
)
from simulator.faults import (
    Bandwidth,
    Fault,
    Kill,
    Latency,
    Loss,
    Partition,
    Pause,
    Restart,
    Signal,
    SshdDown,
    StreamFault,
)
from simulator.ownership import (
    LABEL_HOST,
    LABEL_OWNER,
    LABEL_RUN,
    Reaper,
    make_keys_dir,
    remove_labelled,
    sweep_stale,
)
from simulator.preflight import refusals
from simulator.relay import RelayControl, RelayControlError
from simulator.segments import Segment, free_block, plan_segments, used_subnets
from simulator.state import owner_tag
from simulator.timeline import Timeline
from simulator.topology import Host, Topology

__all__ = ["CONTAINER_FAULTS", "ContainerBackend", "ImagesMissing", "build_hint",
           "missing_images"]

RELAY_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "relay.py")
#: Where our files go inside every container (node.json's directory is root-only).
FILES_PARENT = "/opt"
SIM_DIR = f"{FILES_PARENT}/mitogen-sim"
KNOWN_HOSTS = f"{SIM_DIR}/known_hosts"
CONTAINER_RELAY = f"{SIM_DIR}/relay.py"
#: Control sockets of relays running inside a container: Docker's own sticky, world-writable
#: tmpfs, which ``docker diff`` never reports and every restart finds empty.
RELAY_SOCKET_DIR = "/dev/shm"
RELAY_LINGER = 1.0
CONTROL_TIMEOUT = 5.0
DISCONNECT_WAIT = 15.0
#: Every fault kind a container backend can apply when the node has iptables and tc.
CONTAINER_FAULTS = frozenset({"kill", "restart", "pause", "signal", "sshd_down", "partition",
                              "latency", "bandwidth", "loss", "stream"})


class ImagesMissing(BackendError):
    """An image the topology needs is not built, and this backend was told not to build it
    (tests: a build does not fit in a test's timeout). The message says what to run."""


def missing_images(client: docker.DockerClient, suites: Sequence[str]) -> List[str]:
    """The tags of ``suites`` that are not built yet."""
    return [images.image_tag(suite) for suite in sorted(set(suites))
            if not images.image_present(client, images.image_tag(suite))]


def build_hint(suites: Sequence[str]) -> str:
    return (f"build them first, as root: python -m simulator images build "
            f"{' '.join(sorted(set(suites)))} (about 2.5 minutes each; .ci/run does it)")


# --------------------------------------------------------------------------------------------
# State
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _HostState:
    """A host's container and, while it is connected, its contexts."""

    host: Host
    container: Any
    index: int
    uplink: str  # this host's address on its parent's segment
    parent_address: str  # the parent's (or the runner's gateway) address on that segment
    context: Optional[mitogen.core.Context] = None
    accounts: Dict[str, mitogen.core.Context] = dataclasses.field(default_factory=dict)
    alive: bool = False
    generation: int = 0
    down: threading.Event = dataclasses.field(default_factory=threading.Event)


@dataclasses.dataclass(frozen=True)
class _Handle:
    """What ``apply`` returns: the fault, its host, and how to undo it."""

    fault: Fault
    target: str
    undo: Tuple[str, ...]  # any of: unpause, rules, relay, cont, link_up, revive, qdiscs
    rules: Tuple[Tuple[str, ...], ...] = ()


class ContainerBackend(Backend):
    """Hosts as containers on internal networks, one segment per parent; see the module
    docstring. Subclasses say where the engines are, which networks carry the segments, how
    to enter a host's network namespace and how the runner reaches the roots."""

    name = "abstract"
    #: What the detached reaper runs (``python -m MODULE reap``): see ownership.Reaper.
    reaper_module = "simulator.ownership"

    def __init__(self, timeline: Optional[Timeline] = None,
                 router: Optional[mitogen.master.Router] = None, *, prepare: bool = False,
                 progress: Optional[Callable[[str], None]] = None) -> None:
        """``prepare``: start the engine and build missing images (``up``, with ``progress``
        lines); without it a missing engine or image is an error saying what to run, as
        tests need (a build does not fit in their timeout)."""
        self.timeline = timeline or Timeline()
        self._prepare = prepare
        self._progress_out = progress
        self._router = router
        self._own_router = router is None
        self._topology: Optional[Topology] = None
        self._client: Optional[docker.DockerClient] = None
        self._run = uuid.uuid4().hex[:10]
        self._owner = owner_tag()
        self._dir: Optional[str] = None
        self._states: Dict[str, _HostState] = {}
        self._segments: Dict[Optional[str], Segment] = {}
        self._networks: Dict[Optional[str], Any] = {}
        self._keys: Dict[str, Tuple[str, str]] = {}  # name -> (private, public)
        self._known_hosts = b""
        self._lock = threading.RLock()
        self._reaper: Optional[Reaper] = None
        self._applied: List[_Handle] = []
        self._silent: Dict[str, str] = {}  # host id -> why its edge is silently cut
        self._paused: set = set()
        self.build_seconds: Optional[float] = None
        self.baseline: Dict[str, FrozenSet[Tuple[str, int]]] = {}

    # -- what each container backend provides -------------------------------------------------

    @abc.abstractmethod
    def _open_engines(self, suites: Sequence[str]) -> docker.DockerClient:
        """Reach every engine this run uses (starting or preparing them if told to) and
        return the one the runner talks to first (the swarm's manager, or the only one)."""

    @abc.abstractmethod
    def _engines(self) -> List[docker.DockerClient]:
        """Every engine this run has containers or networks on."""

    def _engine_urls(self) -> List[str]:
        """Where the engines are, for the reaper (empty: the environment's engine)."""
        return []

    @abc.abstractmethod
    def _images(self, suites: Sequence[str]) -> Dict[str, str]:
        """Suite -> image tag, present on every engine that will run a host of it."""

    @abc.abstractmethod
    def _engine_for(self, host: Host) -> docker.DockerClient:
        """The engine that runs ``host``'s container (placement)."""

    @abc.abstractmethod
    def _make_network(self, segment: Segment, index: int) -> Any:
        """Create the internal network of one segment; ``index`` names it uniquely."""

    @abc.abstractmethod
    def _root_parent_address(self, segment: Segment) -> str:
        """Where a root host's traffic to the runner comes from on the root segment."""

    def _engine_addresses(self) -> int:
        """How many addresses of each segment the engine allocates by itself."""
        return 0

    def _root_relay_prefix(self) -> List[str]:
        """A prefix for the runner's relay of a root edge (e.g. to enter a namespace)."""
        return []

    @abc.abstractmethod
    def _netns(self, host: str) -> netns.Netns:
        """Runs network fault commands in ``host``'s network namespace."""

    @abc.abstractmethod
    def _relay_control(self, state: _HostState, path: str) -> ContextManager[Any]:
        """A :class:`~simulator.relay.RelayControl` for the relay of ``state``'s edge, which
        listens at ``path`` on the runner (roots) or in the parent's container."""

    def _remove_run(self) -> List[str]:
        """Remove this run's containers from every engine, then its networks."""
        label = {"label": f"{LABEL_RUN}={self._run}"}
        engines = self._engines()
        removed = []
        for client in engines:
            for container in client.containers.list(all=True, filters=label, ignore_removed=True):
                removed += remove_labelled(client, {"id": container.id})
        for client in engines:
            removed += remove_labelled(client, label)
        return removed

    def _close_engines(self) -> None:
        for client in self._engines():
            client.close()
        self._client = None


    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def router(self) -> mitogen.master.Router:
        if self._router is None:
            raise BackendError(f"the {self.name} backend is not created yet")
        return self._router

    @property
    def topology(self) -> Topology:
        if self._topology is None:
            raise BackendError(f"the {self.name} backend is not created yet")
        return self._topology

    @property
    def client(self) -> docker.DockerClient:
        if self._client is None:
            raise BackendError(f"the {self.name} backend is not created yet")
        return self._client

    def create(self, topology: Topology) -> None:
        if self._topology is not None:
            raise BackendError(f"this {type(self).__name__} already serves a topology; "
                               f"make another")
        self._topology = topology
        began = time.monotonic()
        try:
            refused = refusals(topology, self.name)
            if refused:
                raise BackendError("\n".join(refused))
            suites = sorted({h.suite for h in topology.hosts})
            self._client = self._open_engines(suites)
            swept = [item for client in self._engines() for item in sweep_stale(client)]
            if swept:
                self.timeline.record("build", action="swept", resources=swept)
            self._dir = make_keys_dir(self._run, self._owner)
            self._reaper = Reaper(self._owner, self._run, self._dir, self._engine_urls(),
                                  module=self.reaper_module)
            tags = self._images(suites)
            self._make_keys()
            self._make_networks()
            self._make_containers(tags)
            self._start_containers([h.id for h in topology.hosts])
            for state in self._states.values():
                self._apply_steady_loss(state)
            mark = time.monotonic()
            self.timeline.record("build", action="containers_up", hosts=len(topology.hosts),
                                 seconds=mark - began)
            if self._router is None:
                self._router = mitogen.master.Router()
            self._connect_all([h.id for h in topology.hosts])
            self.baseline = {h.id: self.diff(h.id) for h in topology.hosts}
        except BaseException:
            self.destroy()
            raise
        self._release()
        self.build_seconds = time.monotonic() - began
        self.timeline.record("build", host=None, action="tree_up", seconds=self.build_seconds,
                             hosts=len(topology.hosts))

    def destroy(self) -> None:
        """Shut the tree down, remove every container and network of this run."""
        if self._router is not None and self._own_router:
            for host_id in list(self._paused):
                self._unpause_quietly(host_id)
            self.timeline.record("shutdown", step="router_shutdown")
            self._router.broker.shutdown()
            self._router.broker.join()
            self._router = None
        if self._client is not None:
            removed = self._remove_run()
            self.timeline.record("shutdown", step="removed", resources=len(removed))
            self._close_engines()
        self._stop_reaper()
        self._states.clear()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def keep(self) -> str:
        """Leave the containers and networks up for inspection (``--topology-keep``): the
        reaper is stopped and our contexts end with the router; the next run's sweep, or
        ``python -m simulator down``, removes the rest. Returns what was left, for the user."""
        self._stop_reaper()
        if self._router is not None and self._own_router:
            self._router.broker.shutdown()
            self._router.broker.join()
            self._router = None
        names = sorted(state.container.name for state in self._states.values())
        if self._client is not None:
            self._close_engines()
        return "containers left running: %s (docker exec -it NAME bash; remove them with " \
               "`python -m simulator down`)" % (", ".join(names),)

    def _progress(self, line: str) -> None:
        self.timeline.record("build", action="image", message=line)
        if self._progress_out is not None:
            self._progress_out(line)

    def resources(self) -> Dict[str, Any]:
        """What a state record names for ``down`` to remove if this runner dies: the run
        (its containers and networks carry its label) and the keys directory."""
        return {"run": self._run, "keys_dir": self._dir, "engines": self._engine_urls(),
                "containers": sorted(s.container.name for s in self._states.values()),
                "networks": sorted(n.name for n in self._networks.values())}

    def _stop_reaper(self) -> None:
        if self._reaper is not None:
            self._reaper.stop()
            self._reaper = None

    # -- building ----------------------------------------------------------------------------

    def _labels(self, **extra: str) -> Dict[str, str]:
        return {LABEL_RUN: self._run, LABEL_OWNER: self._owner,
                images.LABEL_PREFIX + "topology": self.topology.name, **extra}

    def _make_keys(self) -> None:
        assert self._dir is not None
        for spec in self.topology.keys:
            self._keys[spec.name] = hostcontainer.keygen(
                os.path.join(self._dir, f"id_{spec.name}"), f"{spec.name}@mitogen-sim")
        lines = []
        self._host_keys: Dict[str, str] = {}
        for index, host in enumerate(self.topology.hosts):
            private, public = hostcontainer.keygen(os.path.join(self._dir, f"host{index}"),
                                                   host.name)
            self._host_keys[host.id] = private
            kind, blob = public.split()[:2]
            lines.append(f"{self._alias(host)} {kind} {blob}\n")
        self._known_hosts = "".join(lines).encode()
        with open(self._known_hosts_path(), "wb") as f:
            f.write(self._known_hosts)

    def _alias(self, host: Host) -> str:
        """The name ssh checks a host's key under: unique even when names repeat."""
        return f"{host.name}.{self.topology.hosts.index(host)}.sim"

    def _known_hosts_path(self) -> str:
        assert self._dir is not None
        return os.path.join(self._dir, "known_hosts")

    def _make_networks(self) -> None:
        block = free_block(self.topology.network.supernet, used_subnets(
            n for client in self._engines() for n in client.networks.list()))
        for index, segment in enumerate(plan_segments(self.topology, block,
                                                      self._engine_addresses())):
            self._segments[segment.owner] = segment
            self._networks[segment.owner] = self._make_network(segment, index)

    def _node_config(self, host: Host) -> Dict[str, Any]:
        net = self.topology.network
        accounts, rules = [], []
        for number, account in enumerate(host.accounts):
            entry: Dict[str, Any] = {"name": account.name}
            if account.name != "root":
                entry["uid"] = 2000 + number
            if account.password is not None:
                entry["password"] = account.password
            if account.keys:
                entry["keys"] = [self._keys[name][1] for name in account.keys]
            if account.login_delay:
                entry["login_delay"] = account.login_delay
            if account.readonly_home:
                entry["readonly_home"] = True
            accounts.append(entry)
            if account.name != host.login and account.sudo != "none":
                rules.append({"user": host.login, "runas": [account.name],
                              "sudo": account.sudo})
        return {
            "version": 1,
            "host_keys": {"ed25519": self._host_keys[host.id]},
            "sshd": {"ClientAliveInterval": max(1, int(net.keepalive_interval)),
                     "ClientAliveCountMax": net.keepalive_count},
            "accounts": accounts,
            "sudo_rules": rules,
        }

    def _files(self, host: Host) -> bytes:
        """relay.py, known_hosts and (for parents) the runner's keys, owned by the login."""
        with open(RELAY_PATH, "rb") as f:
            relay = f.read()
        top = os.path.basename(SIM_DIR)
        entries = [(f"{top}/relay.py", relay, 0o755, 0),
                   (f"{top}/known_hosts", self._known_hosts, 0o644, 0)]
        if host.children:
            login_uid = 0 if host.login == "root" else 2000 + [
                a.name for a in host.accounts].index(host.login)
            for name, (private, _public) in self._keys.items():
                entries.append((f"{top}/id_{name}", private.encode(), 0o600, login_uid))
        return hostcontainer.tar(entries, dirs=[(top, 0o755)])

    def _make_containers(self, tags: Dict[str, str]) -> None:
        def make(index_host: Tuple[int, Host]) -> None:
            index, host = index_host
            state = self._make_container(index, host, tags[host.suite])
            with self._lock:
                self._states[host.id] = state

        with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(make, enumerate(self.topology.hosts)))

    def _make_container(self, index: int, host: Host, tag: str) -> _HostState:
        up = self._segments[host.parent]
        uplink = up.address(host.id)
        parent_address = (self._root_parent_address(up) if host.parent is None
                          else up.address(host.parent))
        client = self._engine_for(host)
        endpoint = client.api.create_endpoint_config(ipv4_address=uplink)
        networking = client.api.create_networking_config(
            {self._networks[host.parent].name: endpoint})
        kwargs: Dict[str, Any] = {}
        if host.resources.cpus:
            kwargs["nano_cpus"] = int(host.resources.cpus * 1e9)
        if host.resources.memory:
            kwargs["mem_limit"] = host.resources.memory
        created = client.api.create_container(
            tag, name=f"msim-{self._run}-{index}-{host.name}", hostname=host.name,
            labels=self._labels(**{LABEL_HOST: host.id}), networking_config=networking,
            host_config=client.api.create_host_config(
                init=True, **kwargs))
        container = client.containers.get(created["Id"])
        if host.children:
            own = self._segments[host.id]
            # Through the container's own engine: on a swarm it may be another machine's.
            client.api.connect_container_to_network(
                container.id, self._networks[host.id].name, ipv4_address=own.address(host.id))
        images.write_node_config(container, self._node_config(host))
        if not container.put_archive(FILES_PARENT, self._files(host)):
            raise BackendError(f"could not copy the simulator's files into {container.name}")
        return _HostState(host, container, index, uplink, parent_address)

    def _start_containers(self, host_ids: Sequence[str]) -> None:
        def start(host_id: str) -> None:
            hostcontainer.start_ready(self._states[host_id].container, host_id)

        with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(start, host_ids))

    # -- contexts ----------------------------------------------------------------------------

    def _connect_all(self, host_ids: Sequence[str]) -> None:
        """Connect hosts level by level; the hosts of one level in parallel."""
        wanted = set(host_ids)
        levels: Dict[int, List[Host]] = {}
        for host in self.topology.hosts:
            if host.id in wanted:
                levels.setdefault(host.depth, []).append(host)
        with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
            for depth in sorted(levels):
                list(pool.map(self._connect_host, levels[depth]))

    def _connect_host(self, host: Host) -> None:
        state = self._states[host.id]
        parent = None if host.parent is None else self._states[host.parent]
        if parent is not None and not parent.alive:
            raise BackendError(f"cannot connect {host.id!r}: its parent is down")
        began = time.monotonic()
        generation = state.generation + (1 if state.context is not None else 0)
        spec = self._spec(host, None, generation)
        via = None if parent is None else parent.context
        context = self.router.connect(spec.method, via=via, **spec.kwargs)
        accounts = {}
        for account in host.accounts:
            if account.name == host.login:
                continue
            aspec = self._spec(host, account.name, generation)
            avia = context if aspec.method == "sudo" else via
            actx = self.router.connect(aspec.method, via=avia, **aspec.kwargs)
            accounts[account.name] = actx
            self._watch(host.id, actx, account.name)
            self.timeline.record("build", host=host.id, account=account.name,
                                 context_id=actx.context_id)
        with self._lock:
            state.context, state.accounts = context, accounts
            state.generation = generation
            state.alive = True
            state.down = threading.Event()
        self._watch(host.id, context, None)
        self.timeline.record("build", host=host.id, context_id=context.context_id,
                             seconds=time.monotonic() - began,
                             accounts={k: v.context_id for k, v in accounts.items()})
        self.timeline.record("route", action="add", host=host.id,
                             context_id=context.context_id)

    def _watch(self, host_id: str, context: mitogen.core.Context,
               account: Optional[str]) -> None:
        def gone() -> None:
            self.timeline.record("disconnect", host=host_id, account=account,
                                 context_id=context.context_id, name=context.name)
            if account is not None:
                return
            with self._lock:
                state = self._states.get(host_id)
                if state is None or state.context is not context:
                    return
                state.alive = False
                state.down.set()
                silent = self._silent.get(host_id)
            if silent:  # nothing but ssh's keepalives can have noticed a silent cut
                self.timeline.record("keepalive", host=host_id, cause=silent)
            self.timeline.record("route", action="del", host=host_id,
                                 context_id=context.context_id)
        mitogen.core.listen(context, "disconnect", gone)

    def _control_path(self, host: Host, account: Optional[str], generation: int,
                      tree: str = "") -> str:
        """Where the relay of this edge listens, as seen by the process that runs it."""
        state = self._states[host.id]
        leaf = f"msim-relay-{state.index}-{account or ''}-{generation}{tree}.sock"
        if host.parent is None:
            assert self._dir is not None
            return os.path.join(self._dir, leaf)
        return f"{RELAY_SOCKET_DIR}/{leaf}"

    def _relay_argv(self, host: Host, account: Optional[str], generation: int,
                    tree: str) -> List[str]:
        state = self._states[host.id]
        if host.parent is None:
            argv = [*self._root_relay_prefix(), sys.executable, RELAY_PATH]
        else:
            argv = [self.topology.host(host.parent).python, CONTAINER_RELAY]
        argv += ["--connect", f"{state.uplink}:22", "--linger", str(RELAY_LINGER),
                 "--control", self._control_path(host, account, generation, tree)]
        link = host.link
        if link.latency or link.jitter:
            argv += ["--latency", repr(link.latency),
                     "--jitter", repr(min(link.jitter, link.latency))]
        if link.rate:
            argv += ["--bandwidth", repr(link.rate / 8.0)]
        return argv

    def _spec(self, host: Host, account: Optional[str], generation: int,
              tree: str = "") -> ConnectSpec:
        plan = self.topology.context_plan()
        hop = plan[(host.id, account)][-1]
        kwargs = dict(hop.kwargs)
        # The local backend's names, so that both backends' trees read alike.
        if account is None:
            kwargs["name"] = host.name
        elif hop.method == "sudo":
            kwargs["name"] = f"sudo:{host.name}:{account}"
        else:
            kwargs["name"] = hop.label
        if hop.method == "sudo":
            return ConnectSpec("sudo", kwargs)
        root = host.parent is None
        key = self._login_key(host, account)
        if key is not None:
            kwargs["identity_file"] = (os.path.join(self._dir or "", f"id_{key}") if root
                                       else f"{SIM_DIR}/id_{key}")
        proxy = " ".join(self._relay_argv(host, account, generation, tree))
        kwargs["check_host_keys"] = "enforce"
        kwargs["ssh_args"] = [
            "-o", f"UserKnownHostsFile={self._known_hosts_path() if root else KNOWN_HOSTS}",
            "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", f"HostKeyAlias={self._alias(host)}",
            "-o", f"ProxyCommand={proxy}",
        ]
        kwargs["keepalive_interval"] = max(1, int(kwargs.get("keepalive_interval", 2)))
        return ConnectSpec("ssh", kwargs)

    def _login_key(self, host: Host, account: Optional[str]) -> Optional[str]:
        found = host.account(account or host.login)
        for name in found.keys:
            if name in self._keys:
                return name
        return None

    def connect_spec(self, host: str, account: Optional[str] = None) -> ConnectSpec:
        found = self.topology.host(host)
        state = self._states.get(found.id)
        generation = 0 if state is None else state.generation
        return self._spec(found, None if account == found.login else account, generation)

    def connect_tree(self, router: mitogen.master.Router, tree: str = "x"
                     ) -> Dict[str, mitogen.core.Context]:
        """A second tree over the same containers, on another router (e.g. to watch a
        master's shutdown without losing the session's tree). Contexts by name: hosts by
        host name, accounts as ``sudo:HOST:ACCOUNT``. ``tree`` keeps its relays apart."""
        found: Dict[str, mitogen.core.Context] = {}
        by_id: Dict[str, mitogen.core.Context] = {}
        for host in self.topology.hosts:
            via = None if host.parent is None else by_id[host.parent]
            spec = self._spec(host, None, 0, tree)
            by_id[host.id] = found[host.name] = router.connect(spec.method, via=via,
                                                               **spec.kwargs)
            for account in host.accounts:
                if account.name != host.login:
                    aspec = self._spec(host, account.name, 0, tree)
                    avia = by_id[host.id] if aspec.method == "sudo" else via
                    found[f"sudo:{host.name}:{account.name}"] = router.connect(
                        aspec.method, via=avia, **aspec.kwargs)
        return found

    # -- lookups -----------------------------------------------------------------------------

    def state(self, host: str) -> _HostState:
        host_id = self.topology.host(host).id
        try:
            return self._states[host_id]
        except KeyError:
            raise BackendError(f"host {host_id!r} was never started") from None

    def context(self, host: str, account: Optional[str] = None) -> mitogen.core.Context:
        """The current context of ``host`` (an id or unique name), or of one of its accounts."""
        state = self.state(host)
        if state.context is None:
            raise BackendError(f"host {state.host.id!r} has no context")
        if account is None or account == state.host.login:
            return state.context
        if account not in state.accounts:
            state.host.account(account)  # raises HostNotFound naming the accounts
        return state.accounts[account]

    def is_up(self, host: str) -> bool:
        return self.state(host).alive

    def placement(self, host: str) -> Placement:
        state = self.state(host)
        return Placement(state.host.id, state.container.name, address=state.uplink,
                         labels={"backend": "docker", "container": state.container.id[:12]})

    def running(self, host: str) -> bool:
        """Whether the host's container runs (paused counts as running)."""
        state = self.state(host)
        try:
            state.container.reload()
        finally:
            self._release()
        return state.container.status in ("running", "paused")

    def container_pid(self, host: str) -> int:
        """The host's init process as the machine sees it (for nsenter and /proc/PID/root)."""
        state = self.state(host)
        state.container.reload()
        pid = state.container.attrs["State"]["Pid"]
        if not pid:
            raise BackendError(f"host {state.host.id!r} is not running")
        return int(pid)

    def diff(self, host: str) -> FrozenSet[Tuple[str, int]]:
        """The container's file changes against its image: (path, kind) pairs."""
        try:
            changes = self.state(host).container.diff() or ()
        finally:
            self._release()
        return frozenset((c["Path"], c["Kind"]) for c in changes)

    # -- out-of-band management --------------------------------------------------------------

    def start(self, host: str) -> None:
        state = self.state(host)
        state.container.reload()
        if state.container.status != "running":
            self._start_containers([state.host.id])
            self._apply_steady_loss(state)
        self.revive(state.host.id)

    def stop(self, host: str, grace: float = 10.0) -> None:
        state = self.state(host)
        state.container.stop(timeout=int(max(0, grace)))
        self._wait_down(state.host.id)

    def kill(self, host: str, signal: str = "SIGKILL") -> None:
        state = self.state(host)
        try:
            state.container.kill(signal=signal)
        except docker.errors.APIError as exc:
            raise BackendError(f"kill {state.host.id!r}: {exc}") from None

    def pause(self, host: str) -> None:
        state = self.state(host)
        state.container.pause()
        self._paused.add(state.host.id)

    def unpause(self, host: str) -> None:
        state = self.state(host)
        if state.host.id in self._paused:
            state.container.unpause()
            self._paused.discard(state.host.id)

    def _unpause_quietly(self, host_id: str) -> None:
        try:
            self.unpause(host_id)
        except (docker.errors.APIError, BackendError):
            self._paused.discard(host_id)

    def exec(self, host: str, argv: Sequence[str], user: Optional[str] = None,
             timeout: float = 30.0) -> ExecResult:
        """``docker exec``, bounded by coreutils' ``timeout`` inside the container."""
        state = self.state(host)
        try:
            return hostcontainer.exec_bounded(state.container, state.host.id, argv, user,
                                              timeout)
        finally:
            self._release()

    def processes(self, host: str) -> Tuple[ProcessInfo, ...]:
        """Every process of the container but ``ps`` itself and its ``timeout`` wrapper."""
        state = self.state(host)
        try:
            return hostcontainer.processes(state.container, state.host.id)
        finally:
            self._release()

    def network_namespace(self, host: str) -> netns.Netns:
        """Runs commands in ``host``'s network namespace, where its container runs (for
        tests that check what a fault did: rules, qdiscs)."""
        return self._netns(host)

    # -- links -------------------------------------------------------------------------------

    def relay(self, host: str, action: Callable[[RelayControl], Any]) -> Any:
        """Run ``action`` with a control connection to the relay of ``host``'s edge."""
        state = self.state(host)
        path = self._control_path(state.host, None, state.generation)
        try:
            with self._relay_control(state, path) as control:
                return action(control)
        except (RelayControlError, OSError) as exc:
            raise BackendError(f"link relay of {state.host.id!r}: {exc}") from exc

    def _rules(self, state: _HostState, target: str, direction: str = "both",
               match: Sequence[str] = ()) -> List[Tuple[str, ...]]:
        return netns.edge_rules(state.parent_address, target, direction, match)

    def _insert_rules(self, host_id: str, rules: Sequence[Tuple[str, ...]]) -> None:
        self._netns(host_id).run(netns.insert(rules))

    def _delete_rules(self, host_id: str, rules: Sequence[Tuple[str, ...]]) -> None:
        # check=False: the container restarted meanwhile, its namespace is new and clean
        self._netns(host_id).run(netns.delete(rules), check=False)

    def _apply_steady_loss(self, state: _HostState) -> None:
        if state.host.link.loss:
            self._insert_rules(state.host.id, self._loss_rules(state, state.host.link.loss))

    def _loss_rules(self, state: _HostState, fraction: float) -> List[Tuple[str, ...]]:
        return netns.loss_rules(state.parent_address, fraction)

    def _interface_toward_parent(self, host_id: str) -> str:
        return netns.interface_with(self._netns(host_id), self._states[host_id].uplink)

    # -- faults ------------------------------------------------------------------------------

    def apply(self, fault: Fault) -> object:
        target = self.topology.host(fault.target).id
        state = self.state(target)
        if not state.alive and not isinstance(fault, (Loss, Latency, Bandwidth)):
            raise BackendError(f"cannot apply {fault!r}: {target!r} is down")
        try:
            handle = self._apply(fault, state)
        finally:
            self._release()
        self._applied.append(handle)
        return handle

    def _release(self) -> None:
        """Close the Docker clients' pooled connections: tests check that each leaves no
        open file descriptor, and the pool would keep one per thread that used it."""
        if self._client is not None:
            for client in self._engines():
                client.api.close()

    def _apply(self, fault: Fault, state: _HostState) -> _Handle:
        target = state.host.id
        if isinstance(fault, Kill):
            return self._apply_kill(fault, state)
        if isinstance(fault, Restart):
            since = time.time()
            state.container.restart(timeout=int(fault.grace))
            self._wait_down(target)
            images.wait_node_ready(state.container, timeout=hostcontainer.READY_TIMEOUT,
                                   since=since)
            self._apply_steady_loss(state)
            self.revive(target)
            return _Handle(fault, target, ())
        if isinstance(fault, Pause):
            self.pause(target)
            return _Handle(fault, target, ("unpause",))
        if isinstance(fault, Signal):
            return self._apply_signal(fault, state)
        if isinstance(fault, SshdDown):
            self._insert_rules(target, netns.SSHD_DOWN_RULES)
            return _Handle(fault, target, ("rules",), netns.SSHD_DOWN_RULES)
        if isinstance(fault, Partition):
            return self._apply_partition(fault, state)
        if isinstance(fault, Latency):
            self.relay(target, lambda c: c.set(latency=fault.delay, jitter=fault.jitter))
            return _Handle(fault, target, ("relay",))
        if isinstance(fault, Bandwidth):
            return self._apply_bandwidth(fault, state)
        if isinstance(fault, Loss):
            rules = self._loss_rules(state, fault.fraction)
            self._insert_rules(target, rules)
            return _Handle(fault, target, ("rules",), tuple(rules))
        if isinstance(fault, StreamFault):
            return self._apply_stream(fault, state)
        raise BackendError(f"the {self.name} backend cannot apply {fault.KIND!r} faults; it "
                           f"can do {', '.join(sorted(self.capabilities()))}")

    def _apply_bandwidth(self, fault: Bandwidth, state: _HostState) -> _Handle:
        """Shape the edge with the kernel: tbf on the host's uplink (what it sends up), and
        an htb class for the host's address on its parent's interface (what comes down).
        A root host's parent side is the runner's own machine, whose qdiscs are not ours to
        touch: there the downward direction is shaped by the edge's relay instead."""
        target = state.host.id
        uplink = self._interface_toward_parent(target)
        self._netns(target).run(netns.shape_upstream(uplink, fault.rate))
        qdiscs: List[Tuple[str, ...]] = [(target, uplink)]
        parent = state.host.parent
        if parent is None:
            rate = max(8000, int(fault.rate))
            self.relay(target, lambda c: c.set(bandwidth=rate / 8.0, direction="downstream"))
            return _Handle(fault, target, ("qdiscs", "relay"), tuple(qdiscs))
        parent_ns = self._netns(parent)
        down = netns.interface_with(parent_ns, self._segments[parent].address(parent))
        parent_ns.run(netns.shape_downstream(down, fault.rate, f"1:{state.index + 2:x}",
                                             state.uplink))
        qdiscs.append((parent, down))
        return _Handle(fault, target, ("qdiscs",), tuple(qdiscs))

    def log_tails(self, lines: int = 20) -> Dict[str, str]:
        """The last `lines` lines of every container's log (sshd and the node set-up),
        for the report of a failing test."""
        tails = {}
        for host_id, state in list(self._states.items()):
            try:
                text = state.container.logs(tail=lines).decode(errors="replace")
            except Exception as e:  # the container may be gone: say so, do not fail
                text = f"(no log: {e})"
            tails[host_id] = text.rstrip()
        return tails

    def _apply_kill(self, fault: Kill, state: _HostState) -> _Handle:
        target = state.host.id
        if fault.mode == "crash":
            self.kill(target)
        elif fault.mode == "stop":
            self.stop(target, fault.grace)
        else:  # power_off: silence first, so nobody sees a FIN or RST
            self._silent[target] = "power_off"
            self._insert_rules(target, [("INPUT", "-j", "DROP"), ("OUTPUT", "-j", "DROP")])
            self.kill(target)
        return _Handle(fault, target, ("revive",))

    def _apply_signal(self, fault: Signal, state: _HostState) -> _Handle:
        name = str(fault.signal)
        done = self.exec(state.host.id, ["pkill", f"-{name.replace('SIG', '')}", "-f",
                                         fault.process_match])
        if done.returncode not in (0, 1):
            raise BackendError(f"pkill on {state.host.id!r} failed: {done.stderr!r}")
        if done.returncode == 1:
            raise BackendError(f"no process on {state.host.id!r} matches "
                               f"{fault.process_match!r}")
        undo = ("cont",) if name in ("SIGSTOP", "SIGTSTP") else ("revive",)
        return _Handle(fault, state.host.id, undo)

    def _apply_partition(self, fault: Partition, state: _HostState) -> _Handle:
        target = state.host.id
        if fault.mode == "unplug":
            self._silent[target] = "unplug"
            device = self._interface_toward_parent(target)
            self._netns(target).run([["ip", "link", "set", "dev", device, "down"]])
            return _Handle(fault, target, ("link_up", "revive"), ((device,),))
        if fault.mode == "drop":
            self._silent[target] = "drop"
            rules = self._rules(state, "DROP", fault.direction)
            self._insert_rules(target, rules)
            return _Handle(fault, target, ("rules", "revive"), tuple(rules))
        # Live streams first (the relay resets them now), then refuse everything after:
        # once the rules are in, the next keepalive is answered by a RST and ends the relay.
        try:
            self.relay(target, lambda c: c.fault("reset"))
        except BackendError:
            pass  # the link is already gone: the rules alone keep it down
        rules = self._rules(state, "REJECT --reject-with tcp-reset", fault.direction,
                            ("-p", "tcp"))
        self._insert_rules(target, rules)
        return _Handle(fault, target, ("rules", "revive"), tuple(rules))

    def _apply_stream(self, fault: StreamFault, state: _HostState) -> _Handle:
        target = state.host.id
        if fault.kind == "stall":
            self._silent[target] = "stall"
            if fault.nbytes:
                self.relay(target, lambda c: c.fault("cut_after", nbytes=fault.nbytes))
            self.relay(target, lambda c: c.fault("stall"))
            return _Handle(fault, target, ("relay", "revive"))
        nbytes = fault.nbytes or 0
        if fault.kind == "reset" and not nbytes:
            self.relay(target, lambda c: c.fault("reset"))
        else:
            self.relay(target, lambda c: c.fault("cut_after", nbytes=nbytes))
        return _Handle(fault, target, ("revive",))

    def heal(self, handle: object) -> None:
        if not isinstance(handle, _Handle):
            raise BackendError(f"heal: not a handle of the {self.name} backend: {handle!r}")
        if handle in self._applied:
            self._applied.remove(handle)
        try:
            self._heal(handle)
        finally:
            self._release()

    def _heal(self, handle: _Handle) -> None:
        state = self._states[handle.target]
        if "unpause" in handle.undo:
            self.unpause(handle.target)
        if "cont" in handle.undo:
            self.exec(handle.target, ["pkill", "-CONT", "-f",
                                      handle.fault.process_match])  # type: ignore[attr-defined]
        if "rules" in handle.undo:
            self._delete_rules(handle.target, handle.rules)
        if "qdiscs" in handle.undo:
            for host_id, device in handle.rules:
                if self._states[host_id].alive:
                    self._netns(host_id).run(netns.unshape(device))
        if "link_up" in handle.undo:
            self._netns(handle.target).run(
                [["ip", "link", "set", "dev", handle.rules[0][0], "up"]])
        if "relay" in handle.undo and state.alive:
            try:
                self.relay(handle.target, lambda c: c.heal())
            except BackendError:
                pass  # the link ended meanwhile: a new one starts with its steady settings
        self._silent.pop(handle.target, None)
        if "revive" in handle.undo:
            self.start(handle.target)

    def heal_all(self) -> None:
        """Undo every applied fault, then start every host that is down."""
        try:
            self._heal_all()
        finally:
            self._release()

    def _heal_all(self) -> None:
        for handle in reversed(list(self._applied)):
            self.heal(handle)
        for host_id in list(self._paused):
            self.unpause(host_id)
        self._silent.clear()
        for state in self._states.values():
            state.container.reload()
            if state.container.status != "running":
                self._start_containers([state.host.id])
                self._apply_steady_loss(state)
        for host in self.topology.roots():
            self.revive(host.id)

    def revive(self, host_id: str) -> List[str]:
        """Connect again every host of ``host_id``'s subtree that is down; return their ids.

        Waits first until the master has seen the old contexts go, so that routes to a dead
        context never linger next to its replacement.
        """
        down = []
        for host in self.topology.subtree(self.topology.host(host_id)):
            state = self._states[host.id]
            if state.alive:
                continue
            if state.context is not None:
                self._wait_down(host.id)
            down.append(host.id)
        if down:
            self._connect_all(down)
            self.timeline.record("build", host=host_id, action="revived", hosts=down)
        return down

    def _wait_down(self, host_id: str) -> None:
        state = self._states[host_id]
        if state.context is not None and not state.down.wait(DISCONNECT_WAIT):
            raise BackendError(f"{host_id!r}: its context did not disconnect within "
                               f"{DISCONNECT_WAIT:g} s after it was stopped")


