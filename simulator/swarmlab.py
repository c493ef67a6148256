"""A Docker Swarm of N engines on this one machine, for tests and benchmarks of the swarm
backend: each node is its own ``dockerd`` (own data root, exec root, socket and containerd)
in its own network namespace, the namespaces joined by a bridge in a hub namespace, so the
nodes talk to each other only over that link (swarm control, gossip and VXLAN), as machines
on a LAN would. Nothing is added to the machine's own network namespace.

Node 1 is the manager (``docker swarm init``); the others join it as workers. Each node carries
the labels ``mitogen-sim.engine`` (its socket, so the swarm backend reaches it) and
``mitogen-sim.lab`` (this lab), plus any the caller gives (for placement rules). The swarm's
``ingress`` network (not internal) is removed. Images are streamed into every node from the
machine's engine (:meth:`SwarmLab.load_images`).

:meth:`SwarmLab.kill_node` is a whole machine failing: its link goes down first (its peers
see silence, not resets), then every process of the node is SIGKILLed: its dockerd and
containerd, their shims (found by the node's exec root on their command line) and every
container process (found in the node's cgroup parent).

``close`` leaves the swarm, stops the engines, and removes the namespaces, mounts, cgroups and
directories: nothing stays. A lab whose runner was killed first is closed by the next lab's
start (:func:`sweep_stale_labs`). Needs root, ``ip``, ``nsenter`` and ``dockerd``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

import docker
import docker.errors

from simulator import images
from simulator.state import owner_alive, owner_tag
from simulator.swarmbackend import LABEL_ENGINE, make_internal_gwbridge, remove_ingress

__all__ = ["LABEL_LAB", "SwarmLab", "lab_unavailable", "sweep_stale_labs"]

LABEL_LAB = images.LABEL_PREFIX + "lab"
LAB_ROOT = Path("/var/lib/mitogen-sim-lab")
RUN_ROOT = Path("/run/mitogen-sim-lab")
CGROUP_CONTROLLERS = ("pids", "cpu", "cpuacct", "memory", "devices", "freezer", "blkio",
                      "cpuset", "systemd")
START_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0


def lab_unavailable() -> Optional[str]:
    """Why a lab cannot be made here (None: it can)."""
    if os.geteuid() != 0:
        return "a swarm lab needs root (network namespaces, dockerd)"
    for tool in ("ip", "nsenter", "dockerd"):
        if shutil.which(tool) is None:
            return f"a swarm lab needs {tool!r}, which is not installed"
    return None


def sweep_stale_labs() -> List[str]:
    """Close the labs whose runner is gone (killed before its ``close``); returns their ids."""
    closed = []
    for path in sorted(LAB_ROOT.glob("*/owner")) if LAB_ROOT.is_dir() else ():
        try:
            owner, size = path.read_text().split()
        except (OSError, ValueError):
            continue
        if not owner_alive(owner):
            SwarmLab(int(size), lab_id=path.parent.name).close()
            closed.append(path.parent.name)
    return closed


def _run(argv: Sequence[str], check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=60, check=False)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {done.stderr.strip()}")
    return done


class SwarmLab:
    """``nodes`` engines in namespaces, joined into one swarm. Use as a context manager."""

    def __init__(self, nodes: int, labels: Optional[Mapping[int, Mapping[str, str]]] = None,
                 subnet_octet: Optional[int] = None, lab_id: Optional[str] = None) -> None:
        """``lab_id``: an existing lab's id, to close what a dead runner left."""
        if not 1 <= nodes <= 8:
            raise ValueError(f"a lab has 1 to 8 nodes, not {nodes}")
        self.id = lab_id or uuid.uuid4().hex[:6]
        self.size = nodes
        self.labels = {i: dict((labels or {}).get(i, {})) for i in range(1, nodes + 1)}
        # 10.250.X.0/24 on the lab's own link, X from the lab id: concurrent labs differ.
        self.octet = subnet_octet if subnet_octet is not None else int(self.id, 16) % 250 + 1
        self.dir = LAB_ROOT / self.id
        self.run_dir = RUN_ROOT / self.id
        self.hub = f"msl{self.id}h"
        self.killed: set = set()
        self._daemons: Dict[int, subprocess.Popen] = {}
        self._logs: Dict[int, object] = {}
        self.clients: Dict[int, docker.DockerClient] = {}
        self.node_ids: Dict[int, str] = {}

    # -- names ---------------------------------------------------------------------------------

    def netns(self, i: int) -> str:
        return f"msl{self.id}n{i}"

    def address(self, i: int) -> str:
        return f"10.250.{self.octet}.{i}"

    def socket(self, i: int) -> str:
        return str(self.run_dir / f"n{i}" / "docker.sock")

    def engine(self, i: int) -> str:
        return f"unix://{self.socket(i)}"

    def exec_root(self, i: int) -> Path:
        return self.run_dir / f"n{i}" / "exec"

    def cgroup_parent(self, i: int) -> str:
        return f"msl{self.id}n{i}"

    @property
    def manager(self) -> str:
        return self.engine(1)

    # -- making it -----------------------------------------------------------------------------

    def __enter__(self) -> SwarmLab:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def start(self) -> None:
        sweep_stale_labs()
        self.dir.mkdir(parents=True)
        (self.dir / "owner").write_text(f"{owner_tag()} {self.size}\n")
        _run(["ip", "netns", "add", self.hub])
        _run(["ip", "-n", self.hub, "link", "add", "br0", "type", "bridge"])
        _run(["ip", "-n", self.hub, "link", "set", "br0", "up"])
        for i in range(1, self.size + 1):
            self._make_link(i)
            self._start_daemon(i)
        for i in range(1, self.size + 1):
            self.clients[i] = self._wait_engine(i)
        self._form_swarm()

    def _make_link(self, i: int) -> None:
        ns, outer = self.netns(i), f"msl{self.id}v{i}"
        _run(["ip", "netns", "add", ns])
        _run(["ip", "link", "add", outer, "type", "veth", "peer", "name", "eth0", "netns", ns])
        _run(["ip", "link", "set", outer, "netns", self.hub])
        _run(["ip", "-n", self.hub, "link", "set", outer, "master", "br0", "up"])
        _run(["ip", "-n", ns, "addr", "add", f"{self.address(i)}/24", "dev", "eth0"])
        _run(["ip", "-n", ns, "link", "set", "eth0", "up"])
        _run(["ip", "-n", ns, "link", "set", "lo", "up"])

    def _start_daemon(self, i: int) -> None:
        data, run = self.dir / f"n{i}", self.run_dir / f"n{i}"
        data.mkdir(parents=True, exist_ok=True)
        run.mkdir(parents=True, exist_ok=True)
        log = open(self.dir / f"dockerd-n{i}.log", "ab")  # closed in close()
        self._logs[i] = log
        # nsenter --net, not `ip netns exec`: that one also remounts /sys, hiding the cgroups.
        self._daemons[i] = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{self.netns(i)}", "dockerd",
             "--iptables=false", "--ip-masq=false", "--bridge=none",
             "--data-root", str(data), "--exec-root", str(self.exec_root(i)),
             "--pidfile", str(run / "dockerd.pid"), "-H", self.engine(i),
             "--cgroup-parent", f"/{self.cgroup_parent(i)}",
             "--containerd-namespace", f"msl{self.id}n{i}",
             "--containerd-plugins-namespace", f"msl{self.id}n{i}p"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)

    def _wait_engine(self, i: int) -> docker.DockerClient:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self._daemons[i].poll() is not None:
                raise RuntimeError(f"lab node {i}'s dockerd exited: see "
                                   f"{self.dir / f'dockerd-n{i}.log'}")
            if os.path.exists(self.socket(i)):
                client = docker.DockerClient(base_url=self.engine(i), timeout=120)
                try:
                    client.ping()
                    return client
                except (docker.errors.DockerException, OSError):
                    client.close()
            if time.monotonic() > deadline:
                raise RuntimeError(f"lab node {i}'s dockerd did not answer in "
                                   f"{START_TIMEOUT:g} s")
            time.sleep(0.2)  # another process: no event to wait on

    def _form_swarm(self) -> None:
        manager = self.clients[1]
        for client in self.clients.values():
            make_internal_gwbridge(client)
        manager.swarm.init(advertise_addr=self.address(1),
                           listen_addr=f"{self.address(1)}:2377")
        token = manager.swarm.attrs["JoinTokens"]["Worker"]
        for i in range(2, self.size + 1):
            self.clients[i].swarm.join(remote_addrs=[f"{self.address(1)}:2377"],
                                       join_token=token, advertise_addr=self.address(i),
                                       listen_addr=f"{self.address(i)}:2377")
        for i in range(1, self.size + 1):
            self.node_ids[i] = self.clients[i].info()["Swarm"]["NodeID"]
        remove_ingress(manager)
        for i, node_id in self.node_ids.items():
            node = manager.nodes.get(node_id)
            spec = dict(node.attrs["Spec"])
            labels = {**(spec.get("Labels") or {}), LABEL_LAB: self.id, **self.labels[i]}
            if i != 1:
                labels[LABEL_ENGINE] = self.engine(i)
            spec["Labels"] = labels
            node.update(spec)
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            states = [n.attrs["Status"]["State"] for n in self.clients[1].nodes.list()]
            if len(states) == self.size and all(s == "ready" for s in states):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"lab swarm nodes not ready: {states}")
            time.sleep(0.2)  # the swarm's own state: polled

    def load_images(self, tags: Sequence[str], source: Optional[docker.DockerClient] = None,
                    nodes: Optional[Sequence[int]] = None) -> None:
        """Stream ``tags`` from ``source`` (the machine's engine) into each node lacking them."""
        from simulator.dockerd import engine_client

        src = source or engine_client()
        try:
            for i in nodes or range(1, self.size + 1):
                for tag in tags:
                    images.copy_image(src, self.clients[i], tag)
        finally:
            if source is None:
                src.close()

    # -- failing -------------------------------------------------------------------------------

    def kill_node(self, i: int) -> None:
        """A whole machine fails: its link goes down, then every process of it dies."""
        _run(["ip", "-n", self.hub, "link", "set", f"msl{self.id}v{i}", "down"])
        self.killed.add(i)
        self._kill_processes(i)

    def _node_pids(self, i: int) -> List[int]:
        pids = set()
        marker = str(self.exec_root(i))
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if marker.encode() in f.read():
                        pids.add(int(entry))
            except OSError:
                continue
        daemon = self._daemons.get(i)
        if daemon is not None and daemon.poll() is None:
            pids.add(daemon.pid)
        for group in Path("/sys/fs/cgroup/pids", self.cgroup_parent(i)).glob("**/cgroup.procs"):
            try:
                pids.update(int(p) for p in group.read_text().split())
            except OSError:
                continue
        return sorted(pids)

    def _kill_processes(self, i: int) -> None:
        deadline = time.monotonic() + STOP_TIMEOUT
        while True:
            pids = self._node_pids(i)
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"lab node {i}: processes {pids} survive SIGKILL")
            time.sleep(0.05)  # reaping by the kernel: polled
        daemon = self._daemons.get(i)
        if daemon is not None:
            daemon.wait(timeout=STOP_TIMEOUT)

    # -- cleaning up ---------------------------------------------------------------------------

    def close(self) -> None:
        """Leave the swarm, stop every engine, remove everything the lab made. Idempotent."""
        for i, client in sorted(self.clients.items(), reverse=True):  # workers first
            if i not in self.killed:
                self._leave(client)
            client.close()
        self.clients.clear()
        for i in sorted(self._daemons):
            self._stop_daemon(i)
        self._daemons.clear()
        for i in range(1, self.size + 1):
            self._kill_processes(i)  # a lab whose runner died: found by exec root and cgroup
        for log in self._logs.values():
            log.close()  # type: ignore[attr-defined]
        self._logs.clear()
        for i in range(1, self.size + 1):
            self._remove_cgroups(i)
            _run(["ip", "netns", "del", self.netns(i)], check=False)
        _run(["ip", "netns", "del", self.hub], check=False)
        for path in (self.run_dir, self.dir):
            if path.exists():
                images.remove_tree(path)

    def _leave(self, client: docker.DockerClient) -> None:
        try:
            for container in client.containers.list(all=True, ignore_removed=True):
                container.remove(force=True)
            client.swarm.leave(force=True)
        except (docker.errors.DockerException, OSError):
            pass  # its engine is gone: killing its processes is all that is left

    def _stop_daemon(self, i: int) -> None:
        daemon = self._daemons[i]
        if daemon.poll() is None:
            daemon.terminate()
            try:
                daemon.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                pass
        self._kill_processes(i)

    def _remove_cgroups(self, i: int) -> None:
        for controller in CGROUP_CONTROLLERS:
            base = Path("/sys/fs/cgroup", controller, self.cgroup_parent(i))
            if not base.exists():
                continue
            for group in sorted(base.glob("**/"), key=lambda p: -len(p.parts)):
                try:
                    group.rmdir()
                except OSError:
                    pass
