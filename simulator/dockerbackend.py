"""The ``docker`` backend: one real Debian container per host, reached over real ssh and sudo.

Each host is a container of its suite's image (``simulator.images``) running sshd under
docker-init (``init=True``, so orphans of ssh sessions are reaped). The runner reaches a root
host directly; every deeper host is reached by ``ssh`` *from its parent's context*, so the ssh
client runs inside the parent container, and accounts by ``sudo`` inside the host.

Networks. Every network is ``--internal`` and carved from the topology's own supernet: the
supernet is split into per-worker blocks (pytest-xdist workers and concurrent runs take
different blocks), each block into one small subnet per *segment*. The root segment holds the
roots and the runner (the bridge keeps its gateway address on the host: that is how the runner
reaches them); every host with children gets a segment of its own with its children, created
with ``inhibit_ipv4`` so the machine has no address on it. A container is on its parent's
segment and on its own, and has no default route, so the tree is the only data path.
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
container's network namespace (``nsenter -t PID -n``), aimed at the parent's address: this
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
sweeps resources of runs whose owner is gone.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import ipaddress
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import uuid
from typing import Any, Callable, Dict, FrozenSet, List, Optional, Sequence, Tuple

import docker
import docker.errors

import mitogen.core
import mitogen.master
from simulator import images
from simulator.backend import (
    Backend,
    BackendError,
    ConnectSpec,
    ExecResult,
    Placement,
    ProcessInfo,
)
from simulator.dockerd import DockerdError, engine_client, ensure_dockerd
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
from simulator.preflight import refusals
from simulator.relay import RelayControl, RelayControlError
from simulator.state import owner_alive as _owner_alive
from simulator.state import owner_tag
from simulator.timeline import Timeline
from simulator.topology import Host, Topology

__all__ = ["LABEL_OWNER", "LABEL_RUN", "DockerBackend", "ImagesMissing", "docker_unavailable",
           "missing_images", "remove_run", "sweep_stale"]

RELAY_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "relay.py")
LABEL_RUN = images.LABEL_PREFIX + "run"
LABEL_OWNER = images.LABEL_PREFIX + "owner"
LABEL_HOST = images.LABEL_PREFIX + "host"
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
READY_TIMEOUT = 60.0
#: Workers that each get their own block of the supernet (gw0..gw15, or the bare runner).
WORKER_BLOCKS = 16
_SUPPORTED = frozenset({"kill", "restart", "pause", "signal", "sshd_down", "partition",
                        "latency", "bandwidth", "loss", "stream"})
_SILENT = "silent"


# --------------------------------------------------------------------------------------------
# Ownership: which run made a resource, and is its runner still alive?
# --------------------------------------------------------------------------------------------


def _remove_labelled(client: docker.DockerClient, filters: Dict[str, Any]) -> List[str]:
    """Remove every container, then every network, matching ``filters``; never raises for
    resources that vanished meanwhile."""
    removed = []
    for container in client.containers.list(all=True, filters=filters):
        try:
            container.remove(force=True)
            removed.append(container.name)
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as exc:
            if "already in progress" not in str(exc):
                raise
    for network in client.networks.list(filters=filters):
        try:
            network.remove()
            removed.append(network.name)
        except docker.errors.NotFound:
            pass
    return removed


class ImagesMissing(BackendError):
    """An image the topology needs is not built, and this backend was told not to build it
    (tests: a build does not fit in a test's timeout). The message says what to run."""


def missing_images(client: docker.DockerClient, suites: Sequence[str]) -> List[str]:
    """The tags of ``suites`` that are not built yet."""
    return [images.image_tag(suite) for suite in sorted(set(suites))
            if not images.image_present(client, images.image_tag(suite))]


def _build_hint(suites: Sequence[str]) -> str:
    return (f"build them first, as root: python -m simulator images build "
            f"{' '.join(sorted(set(suites)))} (about 2.5 minutes each; .ci/run does it)")


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
        return f"images not built: {', '.join(missing)}; {_build_hint(suites)}"
    return None


def remove_run(run: str, keys_dir: Optional[str] = None) -> List[str]:
    """Remove what a run whose runner is gone left: its labelled containers and networks
    (when an engine answers) and its keys directory. Returns what was removed."""
    removed = []
    try:
        client = engine_client(client_timeout=120)
    except DockerdError:
        client = None
    if client is not None:
        try:
            removed += _remove_labelled(client, {"label": f"{LABEL_RUN}={run}"})
        finally:
            client.close()
    if keys_dir and os.path.isdir(keys_dir):
        shutil.rmtree(keys_dir, ignore_errors=True)
        removed.append(keys_dir)
    return removed


#: Where a run keeps its private keys: one directory per run, readable by its owner only.
KEYS_DIR_PREFIX = "mitogen-sim-keys-"


def _make_keys_dir(run: str, owner: str) -> str:
    """A run's keys directory (0700), with the owner tag inside, so that a sweep can tell
    whether the run that made it is gone even if its reaper was killed too."""
    path = os.path.join(tempfile.gettempdir(), KEYS_DIR_PREFIX + run)
    making = tempfile.mkdtemp(prefix=".making-" + KEYS_DIR_PREFIX)  # 0700; no sweep sees it
    with open(os.path.join(making, "owner"), "w") as f:
        f.write(owner)
    os.rename(making, path)
    return path


def sweep_stale_keys() -> List[str]:
    """Remove keys directories of runs whose runner process is gone."""
    removed = []
    base = tempfile.gettempdir()
    for name in sorted(os.listdir(base)):
        path = os.path.join(base, name)
        if not name.startswith(KEYS_DIR_PREFIX) or not os.path.isdir(path):
            continue
        try:
            with open(os.path.join(path, "owner")) as f:
                owner = f.read().strip()
        except OSError:
            owner = ""
        if not _owner_alive(owner):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def sweep_stale(client: docker.DockerClient) -> List[str]:
    """Remove containers, networks and keys directories of runs whose runner is gone."""
    stale = set()
    for resource in [*client.containers.list(all=True, filters={"label": LABEL_OWNER}),
                     *client.networks.list(filters={"label": LABEL_OWNER})]:
        labels = resource.attrs.get("Labels") or resource.attrs.get("Config", {}).get(
            "Labels") or {}
        if not _owner_alive(labels.get(LABEL_OWNER, "")):
            stale.add(labels.get(LABEL_RUN, ""))
    removed = sweep_stale_keys()
    for run in sorted(stale - {""}):
        removed += _remove_labelled(client, {"label": f"{LABEL_RUN}={run}"})
    return removed


# --------------------------------------------------------------------------------------------
# Addresses
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Segment:
    """One internal network: a parent (None: the runner) and its children."""

    owner: Optional[str]  # host id, or None for the root segment
    subnet: ipaddress.IPv4Network
    members: Tuple[str, ...]

    @property
    def gateway(self) -> str:
        return str(self.subnet.network_address + 1)

    def address(self, host_id: str) -> str:
        """Gateway first, then the parent, then the children, in order."""
        index = 0 if self.owner == host_id else 1 + self.members.index(host_id)
        return str(self.subnet.network_address + 2 + index)


def _worker_index() -> int:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    digits = "".join(ch for ch in worker if ch.isdigit())
    return int(digits) if digits else 0


def _plan_segments(topology: Topology, block: ipaddress.IPv4Network) -> List[_Segment]:
    owners: List[Optional[str]] = [None, *(h.id for h in topology.hosts if h.children)]
    groups: Dict[Optional[str], Tuple[str, ...]] = {None: tuple(h.id for h in topology.roots())}
    for host in topology.hosts:
        if host.children:
            groups[host.id] = host.children
    largest = max(len(members) for members in groups.values()) + 5  # net, gw, owner, bcast
    prefix = 32 - max(3, (largest - 1).bit_length())
    subnets = block.subnets(new_prefix=prefix) if prefix > block.prefixlen else iter(())
    segments = []
    for owner in owners:
        try:
            subnet = next(subnets)
        except StopIteration:
            raise BackendError(f"topology {topology.name!r} needs {len(owners)} segments of "
                               f"/{prefix}; a worker's block {block} holds fewer: give "
                               f"network.supernet a larger range") from None
        segments.append(_Segment(owner, subnet, groups[owner]))
    return segments


def _blocks(supernet: str) -> List[ipaddress.IPv4Network]:
    try:
        net = ipaddress.IPv4Network(supernet)
    except ValueError:
        raise BackendError(f"network.supernet {supernet} is not an IPv4 network; the docker "
                           f"backend's networks are IPv4") from None
    split = (WORKER_BLOCKS - 1).bit_length()
    if net.prefixlen + split > 28:
        raise BackendError(f"network.supernet {supernet} is too small to split per worker")
    return list(net.subnets(prefixlen_diff=split))


# --------------------------------------------------------------------------------------------
# Keys, files for the containers
# --------------------------------------------------------------------------------------------


def _keygen(path: str, comment: str) -> Tuple[str, str]:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", path],
                   check=True, capture_output=True, timeout=30)
    with open(path) as private, open(path + ".pub") as public:
        return private.read(), public.read().strip()


def _tar(entries: Sequence[Tuple[str, bytes, int, int]], dirs: Sequence[Tuple[str, int]] = ()
         ) -> bytes:
    """A tar of (name, data, mode, uid) files and (name, mode) directories."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, mode in dirs:
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, mode, int(time.time())
            tar.addfile(info)
        for name, data, mode, uid in entries:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.uid, info.gid = len(data), mode, uid, uid
            info.mtime = int(time.time())
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


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


class DockerBackend(Backend):
    """Hosts as containers on internal networks; see the module docstring."""

    name = "docker"

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
        self._segments: Dict[Optional[str], _Segment] = {}
        self._networks: Dict[Optional[str], Any] = {}
        self._keys: Dict[str, Tuple[str, str]] = {}  # name -> (private, public)
        self._known_hosts = b""
        self._lock = threading.RLock()
        self._reaper: Optional[subprocess.Popen] = None
        self._applied: List[_Handle] = []
        self._silent: Dict[str, str] = {}  # host id -> why its edge is silently cut
        self._paused: set = set()
        self.build_seconds: Optional[float] = None
        self.baseline: Dict[str, FrozenSet[Tuple[str, int]]] = {}

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def router(self) -> mitogen.master.Router:
        if self._router is None:
            raise BackendError("the docker backend is not created yet")
        return self._router

    @property
    def topology(self) -> Topology:
        if self._topology is None:
            raise BackendError("the docker backend is not created yet")
        return self._topology

    @property
    def client(self) -> docker.DockerClient:
        if self._client is None:
            raise BackendError("the docker backend is not created yet")
        return self._client

    def create(self, topology: Topology) -> None:
        if self._topology is not None:
            raise BackendError("this DockerBackend already serves a topology; make another")
        self._topology = topology
        began = time.monotonic()
        try:
            refused = refusals(topology, "docker")
            if refused:
                raise BackendError("\n".join(refused))
            try:
                self._client = ensure_dockerd(progress=self._progress) if self._prepare \
                    else engine_client()
            except DockerdError as exc:
                raise BackendError(str(exc)) from None
            suites = sorted({h.suite for h in topology.hosts})
            if not self._prepare:
                missing = missing_images(self._client, suites)
                if missing:
                    raise ImagesMissing(f"images not built: {', '.join(missing)}; "
                                        f"{_build_hint(suites)}")
            swept = sweep_stale(self._client)
            if swept:
                self.timeline.record("build", action="swept", resources=swept)
            self._dir = _make_keys_dir(self._run, self._owner)
            self._start_reaper()
            tags = {suite: images.ensure_image(suite, progress=self._progress,
                                               client=self._client)
                    for suite in suites}
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
            removed = _remove_labelled(self._client, {"label": f"{LABEL_RUN}={self._run}"})
            self.timeline.record("shutdown", step="removed", resources=len(removed))
            self._client.close()
            self._client = None
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
            self._client.close()
            self._client = None
        return "containers left running: %s (docker exec -it NAME bash; remove them with " \
               "`python -m simulator down`)" % (", ".join(names),)

    def capabilities(self) -> FrozenSet[str]:
        return _SUPPORTED

    def _progress(self, line: str) -> None:
        self.timeline.record("build", action="image", message=line)
        if self._progress_out is not None:
            self._progress_out(line)

    def resources(self) -> Dict[str, Any]:
        """What a state record names for ``down`` to remove if this runner dies: the run
        (its containers and networks carry its label) and the keys directory."""
        return {"run": self._run, "keys_dir": self._dir,
                "containers": sorted(s.container.name for s in self._states.values()),
                "networks": sorted(n.name for n in self._networks.values())}

    # -- reaper ------------------------------------------------------------------------------

    def _start_reaper(self) -> None:
        """A detached watcher that removes this run's resources if the runner dies first."""
        argv = [sys.executable, "-m", "simulator.dockerbackend", "reap",
                "--owner", self._owner, "--run", self._run]
        if self._dir is not None:
            argv += ["--keys-dir", self._dir]
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            p for p in (root, os.environ.get("PYTHONPATH")) if p))
        self._reaper = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        start_new_session=True, env=env, cwd=root)

    def _stop_reaper(self) -> None:
        if self._reaper is not None:
            self._reaper.terminate()
            try:
                self._reaper.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._reaper.kill()
                self._reaper.wait()
            self._reaper = None

    # -- building ----------------------------------------------------------------------------

    def _labels(self, **extra: str) -> Dict[str, str]:
        return {LABEL_RUN: self._run, LABEL_OWNER: self._owner,
                images.LABEL_PREFIX + "topology": self.topology.name, **extra}

    def _make_keys(self) -> None:
        assert self._dir is not None
        for spec in self.topology.keys:
            self._keys[spec.name] = _keygen(os.path.join(self._dir, f"id_{spec.name}"),
                                            f"{spec.name}@mitogen-sim")
        lines = []
        self._host_keys: Dict[str, str] = {}
        for index, host in enumerate(self.topology.hosts):
            private, public = _keygen(os.path.join(self._dir, f"host{index}"), host.name)
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
        blocks = _blocks(self.topology.network.supernet)
        used = []
        for network in self.client.networks.list():
            for config in (network.attrs.get("IPAM") or {}).get("Config") or ():
                if config.get("Subnet"):
                    used.append(ipaddress.ip_network(config["Subnet"], strict=False))
        start = _worker_index() % len(blocks)
        order = blocks[start:] + blocks[:start]
        free = [b for b in order if not any(b.overlaps(u) for u in used)]
        if not free:
            raise BackendError(f"every block of {self.topology.network.supernet} is in use by "
                               f"other networks; is another run still up? (docker network ls)")
        for segment in _plan_segments(self.topology, free[0]):
            self._segments[segment.owner] = segment
            self._networks[segment.owner] = self._make_network(segment)

    def _make_network(self, segment: _Segment) -> Any:
        index = 0 if segment.owner is None else 1 + [
            h.id for h in self.topology.hosts].index(segment.owner)
        options = {"com.docker.network.bridge.name": f"msim{self._run[:6]}s{index}"}
        if segment.owner is not None:
            # No address on the machine: only the parent and its children are on this link.
            options["com.docker.network.bridge.inhibit_ipv4"] = "true"
        ipam = docker.types.IPAMConfig(pool_configs=[docker.types.IPAMPool(
            subnet=str(segment.subnet), gateway=segment.gateway)])
        return self.client.networks.create(
            f"msim-{self._run}-s{index}", driver="bridge", internal=True, ipam=ipam,
            options=options, labels=self._labels(segment=segment.owner or "<runner>"))

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
        return _tar(entries, dirs=[(top, 0o755)])

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
        parent_address = up.gateway if host.parent is None else up.address(host.parent)
        endpoint = self.client.api.create_endpoint_config(ipv4_address=uplink)
        networking = self.client.api.create_networking_config(
            {self._networks[host.parent].name: endpoint})
        kwargs: Dict[str, Any] = {}
        if host.resources.cpus:
            kwargs["nano_cpus"] = int(host.resources.cpus * 1e9)
        if host.resources.memory:
            kwargs["mem_limit"] = host.resources.memory
        created = self.client.api.create_container(
            tag, name=f"msim-{self._run}-{index}-{host.name}", hostname=host.name,
            labels=self._labels(**{LABEL_HOST: host.id}), networking_config=networking,
            host_config=self.client.api.create_host_config(
                init=True, **kwargs))
        container = self.client.containers.get(created["Id"])
        if host.children:
            own = self._segments[host.id]
            self._networks[host.id].connect(container, ipv4_address=own.address(host.id))
        images.write_node_config(container, self._node_config(host))
        if not container.put_archive(FILES_PARENT, self._files(host)):
            raise BackendError(f"could not copy the simulator's files into {container.name}")
        return _HostState(host, container, index, uplink, parent_address)

    def _start_containers(self, host_ids: Sequence[str]) -> None:
        def start(host_id: str) -> None:
            state = self._states[host_id]
            since = time.time()
            state.container.start()
            try:
                images.wait_node_ready(state.container, timeout=READY_TIMEOUT, since=since)
            except images.ImageBuildError as exc:
                raise BackendError(f"host {host_id!r}: {exc}") from None

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
            argv = [sys.executable, RELAY_PATH]
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
        bounded = ["timeout", "-s", "KILL", f"{timeout:g}", *argv]
        try:
            code, (out, err) = state.container.exec_run(bounded, user=user or "root",
                                                        demux=True)
        except docker.errors.APIError as exc:
            raise BackendError(f"exec on {state.host.id!r}: {exc}") from None
        finally:
            self._release()
        return ExecResult(code, out or b"", err or b"")

    def processes(self, host: str) -> Tuple[ProcessInfo, ...]:
        """Every process of the container but ``ps`` itself and its ``timeout`` wrapper."""
        done = self.exec(host, ["ps", "-eo", "pid=,user:32=,args="])
        if done.returncode != 0:
            raise BackendError(f"ps on {host!r} failed: {done.stderr.decode(errors='replace')}")
        found = []
        for line in done.stdout.decode(errors="replace").splitlines():
            pid, user, command = ([*line.split(None, 2), "", ""])[:3]
            if command.startswith(("ps -eo", "timeout -s KILL")):
                continue
            found.append(ProcessInfo(int(pid), user, command))
        return tuple(found)

    def _nsenter(self, host: str, argv: Sequence[str]) -> None:
        pid = self.container_pid(host)
        done = subprocess.run(["nsenter", "-t", str(pid), "-n", *argv], capture_output=True,
                              timeout=30, check=False)
        if done.returncode != 0:
            raise BackendError(f"{' '.join(argv)} in {host!r}'s network namespace failed: "
                               f"{done.stderr.decode(errors='replace').strip()}")

    # -- links -------------------------------------------------------------------------------

    def relay(self, host: str, action: Callable[[RelayControl], Any]) -> Any:
        """Run ``action`` with a control connection to the relay of ``host``'s edge."""
        state = self.state(host)
        path = self._control_path(state.host, None, state.generation)
        if state.host.parent is not None:
            path = f"/proc/{self.container_pid(state.host.parent)}/root{path}"
        try:
            with RelayControl(path, timeout=CONTROL_TIMEOUT) as control:
                return action(control)
        except (RelayControlError, OSError) as exc:
            raise BackendError(f"link relay of {state.host.id!r}: {exc}") from exc

    def _rules(self, state: _HostState, target: str, direction: str = "both",
               match: Sequence[str] = ()) -> List[Tuple[str, ...]]:
        """iptables rules for traffic between a host and its parent, in the host's netns."""
        rules = []
        if direction in ("both", "ingress"):
            rules.append(("INPUT", "-s", state.parent_address, *match, "-j", *target.split()))
        if direction in ("both", "egress"):
            rules.append(("OUTPUT", "-d", state.parent_address, *match, "-j", *target.split()))
        return rules

    def _insert_rules(self, host_id: str, rules: Sequence[Tuple[str, ...]]) -> None:
        for rule in rules:
            self._nsenter(host_id, ["iptables", "-w", "-I", *rule])

    def _delete_rules(self, host_id: str, rules: Sequence[Tuple[str, ...]]) -> None:
        for rule in rules:
            try:
                self._nsenter(host_id, ["iptables", "-w", "-D", *rule])
            except BackendError:
                pass  # the container restarted meanwhile: its namespace is new and clean

    def _apply_steady_loss(self, state: _HostState) -> None:
        if state.host.link.loss:
            self._insert_rules(state.host.id, self._loss_rules(state, state.host.link.loss))

    def _loss_rules(self, state: _HostState, fraction: float) -> List[Tuple[str, ...]]:
        match = ("-m", "statistic", "--mode", "random", "--probability", f"{fraction:.6f}")
        return self._rules(state, "DROP", "both", match)

    def _interface_toward_parent(self, host_id: str) -> str:
        state = self._states[host_id]
        pid = self.container_pid(host_id)
        done = subprocess.run(["nsenter", "-t", str(pid), "-n", "ip", "-o", "-4", "addr"],
                              capture_output=True, timeout=30, check=True, text=True)
        for line in done.stdout.splitlines():
            parts = line.split()
            if f"{state.uplink}/" in line:
                return parts[1].split("@")[0]
        raise BackendError(f"{host_id!r} has no interface with {state.uplink}")

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
        """Close the Docker client's pooled connections: tests check that each leaves no
        open file descriptor, and the pool would keep one per thread that used it."""
        if self._client is not None:
            self._client.api.close()

    def _apply(self, fault: Fault, state: _HostState) -> _Handle:
        target = state.host.id
        if isinstance(fault, Kill):
            return self._apply_kill(fault, state)
        if isinstance(fault, Restart):
            since = time.time()
            state.container.restart(timeout=int(fault.grace))
            self._wait_down(target)
            images.wait_node_ready(state.container, timeout=READY_TIMEOUT, since=since)
            self._apply_steady_loss(state)
            self.revive(target)
            return _Handle(fault, target, ())
        if isinstance(fault, Pause):
            self.pause(target)
            return _Handle(fault, target, ("unpause",))
        if isinstance(fault, Signal):
            return self._apply_signal(fault, state)
        if isinstance(fault, SshdDown):
            rules: List[Tuple[str, ...]] = [
                ("INPUT", "-p", "tcp", "--dport", "22", "--syn", "-j", "REJECT",
                 "--reject-with", "tcp-reset")]
            self._insert_rules(target, rules)
            return _Handle(fault, target, ("rules",), tuple(rules))
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
        raise BackendError(f"the docker backend cannot apply {fault.KIND!r} faults; it can do "
                           f"{', '.join(sorted(_SUPPORTED))}")

    def _apply_bandwidth(self, fault: Bandwidth, state: _HostState) -> _Handle:
        """Shape the edge with the kernel: tbf on the host's uplink (what it sends up), and
        an htb class for the host's address on its parent's interface (what comes down).
        A root host's parent side is the runner's own machine, whose qdiscs are not ours to
        touch: there the downward direction is shaped by the edge's relay instead."""
        target = state.host.id
        rate = max(8000, int(fault.rate))
        burst = max(16000, rate // 8 // 100)  # 10 ms worth of bytes, as tbf needs >= rate/HZ
        uplink = self._interface_toward_parent(target)
        self._nsenter(target, ["tc", "qdisc", "replace", "dev", uplink, "root", "tbf", "rate",
                               f"{rate}bit", "burst", str(burst), "latency", "400ms"])
        qdiscs: List[Tuple[str, ...]] = [(target, uplink)]
        parent = state.host.parent
        if parent is None:
            self.relay(target, lambda c: c.set(bandwidth=rate / 8.0, direction="downstream"))
            return _Handle(fault, target, ("qdiscs", "relay"), tuple(qdiscs))
        down = self._interface_with(parent, self._segments[parent].address(parent))
        classid = f"1:{state.index + 2:x}"
        self._nsenter(parent, ["tc", "qdisc", "replace", "dev", down, "root", "handle", "1:",
                               "htb", "default", "1"])
        self._nsenter(parent, ["tc", "class", "replace", "dev", down, "parent", "1:",
                               "classid", classid, "htb", "rate", f"{rate}bit",
                               "burst", str(burst)])
        self._nsenter(parent, ["tc", "filter", "replace", "dev", down, "parent", "1:",
                               "protocol", "ip", "prio", "1", "u32", "match", "ip", "dst",
                               f"{state.uplink}/32", "flowid", classid])
        qdiscs.append((parent, down))
        return _Handle(fault, target, ("qdiscs",), tuple(qdiscs))

    def _interface_with(self, host_id: str, address: str) -> str:
        """The name of the interface of `host_id` that holds `address`."""
        pid = self.container_pid(host_id)
        done = subprocess.run(["nsenter", "-t", str(pid), "-n", "ip", "-o", "-4", "addr"],
                              capture_output=True, timeout=30, check=True, text=True)
        for line in done.stdout.splitlines():
            if f" {address}/" in line:
                return line.split()[1].split("@")[0]
        raise BackendError(f"{host_id!r} has no interface with {address}")

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
            for chain in ("INPUT", "OUTPUT"):
                self._nsenter(target, ["iptables", "-w", "-I", chain, "-j", "DROP"])
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
            self._nsenter(target, ["ip", "link", "set", "dev", device, "down"])
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
            raise BackendError(f"heal: not a handle of the docker backend: {handle!r}")
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
                    self._nsenter(host_id, ["tc", "qdisc", "del", "dev", device, "root"])
        if "link_up" in handle.undo:
            self._nsenter(handle.target, ["ip", "link", "set", "dev", handle.rules[0][0], "up"])
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


# --------------------------------------------------------------------------------------------
# The reaper: python -m simulator.dockerbackend reap --owner PID:START --run RUN
# --------------------------------------------------------------------------------------------

REAPER_POLL = 0.5
REAPER_MAX_LIFETIME = 7 * 24 * 3600.0


def _reap(owner: str, run: str, keys_dir: Optional[str] = None) -> int:
    """Wait (bounded) for the owner to end, then remove the run's resources, if any are left,
    its keys first.

    SIGTERM from the owner means it cleaned up itself: exit at once.
    """
    import signal

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    deadline = time.monotonic() + REAPER_MAX_LIFETIME
    while _owner_alive(owner) and time.monotonic() < deadline:
        if stop.wait(REAPER_POLL):
            return 0
    if keys_dir and os.path.basename(keys_dir).startswith(KEYS_DIR_PREFIX):
        shutil.rmtree(keys_dir, ignore_errors=True)
    client = docker.from_env(timeout=120)
    try:
        _remove_labelled(client, {"label": f"{LABEL_RUN}={run}"})
    finally:
        client.close()
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m simulator.dockerbackend")
    sub = parser.add_subparsers(dest="command", required=True)
    reap = sub.add_parser("reap", help="remove a run's resources once its runner is gone")
    reap.add_argument("--owner", required=True)
    reap.add_argument("--run", required=True)
    reap.add_argument("--keys-dir")
    sub.add_parser("sweep", help="remove resources of runs whose runner is gone")
    args = parser.parse_args(argv)
    if args.command == "reap":
        return _reap(args.owner, args.run, args.keys_dir)
    client = engine_client()
    try:
        for name in sweep_stale(client):
            print(f"removed {name}")
    finally:
        client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
