"""Network faults applied inside a host's network namespace, wherever its container runs.

The container backends express every network fault as ``iptables`` and ``tc`` commands run in
the target container's network namespace (never in the container itself: the library under
test runs as root there, and a hostile context must not be able to lift its own partition).
How the commands get there is the only difference between backends:

* :class:`NsenterNetns`: ``nsenter -t PID -n`` from the runner, with the machine's own tools
  (the ``docker`` backend: every container runs on this machine).
* :class:`HelperNetns`: a short-lived helper container started *on the node that runs the
  target* through that node's engine, sharing the target's network namespace
  (``--network container:ID``) with ``NET_ADMIN``, using the host image's own tools (the
  ``swarm`` backend: the target may be on another machine).

The rules themselves (which chain, which address, which match) are built here once, so both
backends cut, drop and shape the same way.
"""

from __future__ import annotations

import shlex
import subprocess
from typing import Dict, List, Optional, Protocol, Sequence, Tuple

import docker
import docker.errors

from simulator.backend import BackendError

__all__ = ["SSHD_DOWN_RULES", "HelperNetns", "Netns", "NsenterNetns", "delete", "edge_rules",
           "insert", "interface_with", "loss_rules", "shape_downstream",
           "shape_upstream", "unshape"]

Rule = Tuple[str, ...]
#: New connections to port 22 are refused with a reset; live sessions stay.
SSHD_DOWN_RULES: Tuple[Rule, ...] = (
    ("INPUT", "-p", "tcp", "--dport", "22", "--syn", "-j", "REJECT",
     "--reject-with", "tcp-reset"),)
COMMAND_TIMEOUT = 30.0


class Netns(Protocol):
    """Runs commands in one host's network namespace."""

    label: str

    def run(self, commands: Sequence[Sequence[str]], check: bool = True) -> str:
        """Run ``commands`` in order; return the last one's output. With ``check``, the first
        failure raises :class:`BackendError` naming the command; without, failures are
        ignored (undoing what a restart already removed)."""


class NsenterNetns:
    """``nsenter -t PID -n`` from this machine, with its own ``iptables`` and ``tc``."""

    def __init__(self, pid: int, label: str) -> None:
        self.pid = pid
        self.label = label

    def run(self, commands: Sequence[Sequence[str]], check: bool = True) -> str:
        output = ""
        for argv in commands:
            done = subprocess.run(["nsenter", "-t", str(self.pid), "-n", *argv],
                                  capture_output=True, timeout=COMMAND_TIMEOUT, check=False)
            if done.returncode != 0 and check:
                raise BackendError(f"{' '.join(argv)} in {self.label!r}'s network namespace "
                                   f"failed: {done.stderr.decode(errors='replace').strip()}")
            output = done.stdout.decode(errors="replace")
        return output


class HelperNetns:
    """A helper container on the target's own engine, in the target's network namespace.

    One helper per call runs every command of the call (one ``sh -c`` script), so a fault costs
    one container start on the node. The helper carries ``labels`` (the run's), so a reaper
    removes it if the runner dies meanwhile.
    """

    def __init__(self, client: docker.DockerClient, container_id: str, image: str,
                 label: str, labels: Optional[Dict[str, str]] = None) -> None:
        self.client = client
        self.container_id = container_id
        self.image = image
        self.label = label
        self.labels = dict(labels or {})

    def run(self, commands: Sequence[Sequence[str]], check: bool = True) -> str:
        lines = [" ".join(shlex.quote(part) for part in argv) for argv in commands]
        script = (" && " if check else "; ").join(lines) if lines else "true"
        if not check:
            script += "; true"
        try:
            out = self.client.containers.run(
                self.image, entrypoint=["sh", "-c", script],
                network_mode=f"container:{self.container_id}", cap_add=["NET_ADMIN"],
                labels=self.labels, remove=True, stdout=True, stderr=True)
        except docker.errors.ContainerError as exc:
            if not check:
                return ""
            stderr = exc.stderr.decode(errors="replace").strip() if exc.stderr else ""
            raise BackendError(f"{script} in {self.label!r}'s network namespace failed: "
                               f"{stderr}") from None
        except docker.errors.APIError as exc:
            if not check:
                return ""
            raise BackendError(f"helper for {self.label!r}'s network namespace: {exc}") from None
        return out.decode(errors="replace") if isinstance(out, bytes) else str(out)


# --------------------------------------------------------------------------------------------
# Rules
# --------------------------------------------------------------------------------------------


def edge_rules(parent_address: str, target: str, direction: str = "both",
               match: Sequence[str] = ()) -> List[Rule]:
    """iptables rules, in the host's namespace, for traffic between it and its parent."""
    rules = []
    if direction in ("both", "ingress"):
        rules.append(("INPUT", "-s", parent_address, *match, "-j", *target.split()))
    if direction in ("both", "egress"):
        rules.append(("OUTPUT", "-d", parent_address, *match, "-j", *target.split()))
    return rules


def loss_rules(parent_address: str, fraction: float) -> List[Rule]:
    match = ("-m", "statistic", "--mode", "random", "--probability", f"{fraction:.6f}")
    return edge_rules(parent_address, "DROP", "both", match)


def insert(rules: Sequence[Rule]) -> List[List[str]]:
    return [["iptables", "-w", "-I", *rule] for rule in rules]


def delete(rules: Sequence[Rule]) -> List[List[str]]:
    return [["iptables", "-w", "-D", *rule] for rule in rules]


def interface_with(netns: Netns, address: str) -> str:
    """The name of the interface of the namespace that holds ``address``."""
    for line in netns.run([["ip", "-o", "-4", "addr"]]).splitlines():
        if f" {address}/" in line:
            return line.split()[1].split("@")[0]
    raise BackendError(f"{netns.label!r} has no interface with {address}")


def _rate_and_burst(rate: float) -> Tuple[int, int]:
    bits = max(8000, int(rate))
    return bits, max(16000, bits // 8 // 100)  # 10 ms worth of bytes: tbf needs >= rate/HZ


def shape_upstream(device: str, rate: float) -> List[List[str]]:
    """tbf on the host's uplink: what it sends toward its parent."""
    bits, burst = _rate_and_burst(rate)
    return [["tc", "qdisc", "replace", "dev", device, "root", "tbf", "rate", f"{bits}bit",
             "burst", str(burst), "latency", "400ms"]]


def shape_downstream(device: str, rate: float, classid: str, address: str) -> List[List[str]]:
    """An htb class for one child's ``address`` on its parent's interface: what comes down."""
    bits, burst = _rate_and_burst(rate)
    return [
        ["tc", "qdisc", "replace", "dev", device, "root", "handle", "1:", "htb", "default", "1"],
        ["tc", "class", "replace", "dev", device, "parent", "1:", "classid", classid, "htb",
         "rate", f"{bits}bit", "burst", str(burst)],
        ["tc", "filter", "replace", "dev", device, "parent", "1:", "protocol", "ip", "prio",
         "1", "u32", "match", "ip", "dst", f"{address}/32", "flowid", classid],
    ]


def unshape(device: str) -> List[List[str]]:
    return [["tc", "qdisc", "del", "dev", device, "root"]]

