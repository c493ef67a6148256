"""Addresses for a container tree: one small subnet per *segment* (a parent and its children;
the root segment holds the roots), carved from the topology's ``network.supernet``.

The supernet is split into per-worker blocks (pytest-xdist workers and concurrent runs take
different blocks), each block into one subnet per segment. Every container backend plans the
same way, so a host has the same address on the ``docker`` backend's bridges as on the
``swarm`` backend's overlays; only the network driver differs.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
from typing import Dict, Iterable, List, Optional, Tuple

from simulator.backend import BackendError
from simulator.topology import Topology

__all__ = ["WORKER_BLOCKS", "Segment", "blocks", "free_block", "plan_segments", "used_subnets",
           "worker_index"]

#: Workers that each get their own block of the supernet (gw0..gw15, or the bare runner).
WORKER_BLOCKS = 16


@dataclasses.dataclass(frozen=True)
class Segment:
    """One internal network: a parent (None: the runner) and its children."""

    owner: Optional[str]  # host id, or None for the root segment
    subnet: ipaddress.IPv4Network
    members: Tuple[str, ...]

    @property
    def engine_range(self) -> ipaddress.IPv4Network:
        """The upper half: addresses the engine may hand out by itself (see ``spare``)."""
        return list(self.subnet.subnets(prefixlen_diff=1))[1]

    @property
    def gateway(self) -> str:
        return str(self.subnet.network_address + 1)

    def address(self, host_id: str) -> str:
        """Gateway first, then the parent, then the children, in order."""
        index = 0 if self.owner == host_id else 1 + self.members.index(host_id)
        return str(self.subnet.network_address + 2 + index)


def worker_index() -> int:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    digits = "".join(ch for ch in worker if ch.isdigit())
    return int(digits) if digits else 0


def plan_segments(topology: Topology, block: ipaddress.IPv4Network, spare: int = 0
                  ) -> List[Segment]:
    """One subnet per segment. ``spare``: addresses the engine allocates by itself on every
    segment (a swarm gives each node attached to an overlay one); with it, each subnet's upper
    half is left to the engine (:attr:`Segment.engine_range`) and the hosts stay in the
    lower half."""
    owners: List[Optional[str]] = [None, *(h.id for h in topology.hosts if h.children)]
    groups: Dict[Optional[str], Tuple[str, ...]] = {None: tuple(h.id for h in topology.roots())}
    for host in topology.hosts:
        if host.children:
            groups[host.id] = host.children
    largest = max(len(members) for members in groups.values()) + 5  # net, gw, owner, bcast
    if spare:
        largest = 2 * max(largest, spare + 2)
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
        segments.append(Segment(owner, subnet, groups[owner]))
    return segments


def blocks(supernet: str) -> List[ipaddress.IPv4Network]:
    try:
        net = ipaddress.IPv4Network(supernet)
    except ValueError:
        raise BackendError(f"network.supernet {supernet} is not an IPv4 network; the docker "
                           f"backend's networks are IPv4") from None
    split = (WORKER_BLOCKS - 1).bit_length()
    if net.prefixlen + split > 28:
        raise BackendError(f"network.supernet {supernet} is too small to split per worker")
    return list(net.subnets(prefixlen_diff=split))


def free_block(supernet: str, used: Iterable[ipaddress.IPv4Network]) -> ipaddress.IPv4Network:
    """The first block of ``supernet`` (this worker's first) that overlaps no ``used`` subnet."""
    taken = list(used)
    every = blocks(supernet)
    start = worker_index() % len(every)
    for block in every[start:] + every[:start]:
        if not any(block.overlaps(u) for u in taken):
            return block
    raise BackendError(f"every block of {supernet} is in use by other networks; is another "
                       f"run still up? (docker network ls)")


def used_subnets(networks: Iterable[object]) -> List[ipaddress.IPv4Network]:
    """The IPv4 subnets of Docker networks (``client.networks.list()``)."""
    used = []
    for network in networks:
        for config in (getattr(network, "attrs", {}).get("IPAM") or {}).get("Config") or ():
            if config.get("Subnet") and ":" not in config["Subnet"]:
                used.append(ipaddress.IPv4Network(config["Subnet"], strict=False))
    return used
