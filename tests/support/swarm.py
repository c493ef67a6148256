"""Checks on the one-node swarm the swarm backend makes on this machine's engine: whether it
made it, who shares it, and that the last run out left it."""

from __future__ import annotations

import os
import time
from typing import List

import pytest

from tests.support.procs import wait_gone


def made_swarm(client) -> bool:
    """Is this engine in a swarm the simulator made?"""
    from simulator.swarmbackend import LABEL_SWARM

    state = client.info()["Swarm"]
    if state["LocalNodeState"] != "active":
        return False
    node = client.nodes.get(state["NodeID"])
    return (node.attrs["Spec"].get("Labels") or {}).get(LABEL_SWARM) == "made"


def lock_holders() -> List[int]:
    """Pids holding a lock on the swarm's shared-use file (read from /proc/locks)."""
    from simulator.swarmbackend import SwarmUse

    try:
        inode = os.stat(SwarmUse.PATH).st_ino
    except FileNotFoundError:
        return []
    with open("/proc/locks") as f:
        rows = [line.split() for line in f]
    return [int(row[4]) for row in rows if len(row) > 5 and row[1] == "FLOCK"
            and row[5].rsplit(":", 1)[-1] == str(inode)]


def reapers_of(run: str) -> List[int]:
    """Pids of the detached reaper(s) watching ``run``."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if b"reap" in argv and run.encode() in argv:
            found.append(int(pid))
    return found


def assert_left_unless_shared(client, run: str, timeout: float = 60.0) -> None:
    """Once ``run`` and its reaper are gone, the made swarm is left, with its internal
    ``docker_gwbridge``, unless another run on this machine still shares it (the last of
    those leaves it then). Nothing here takes the lock, so checking cannot keep anyone from
    leaving."""
    deadline = time.monotonic() + timeout
    for pid in reapers_of(run):
        assert wait_gone(pid, max(0.0, deadline - time.monotonic())), f"reaper {pid} lives on"
    while time.monotonic() < deadline:
        if client.info()["Swarm"]["LocalNodeState"] == "inactive":
            assert client.networks.list(names=["docker_gwbridge", "ingress"]) == []
            return
        if lock_holders():
            return  # shared by another run: not this one's to leave
        time.sleep(0.2)  # the last holder may be between its release and its leave: polled
    pytest.fail("nobody shares the swarm the simulator made, and it was not left")
