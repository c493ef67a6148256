"""The swarm backend: placement rules and capability reports (no Docker needed), and a
three-node swarm of three engines in their own network namespaces (simulator/swarmlab.py)
with a tree spread over them, a node lacking a tool, faults applied on other nodes, and a
whole node killed mid-run.

The conformance suite (every fault kind on a small tree) runs in test_dockerbackend.py on the
one-node swarm the backend makes on this machine's engine and on a three-engine lab (gate and
leaf on different nodes), and a killed runner's reaper on the one-node swarm; test_main.py
tries ``up``/``status``/``down`` (each checks the made swarm is left).
"""

from __future__ import annotations

import json
import threading
import time
from typing import Dict

import pytest

import mitogen.core
from simulator import probes
from simulator.backend import BackendError
from simulator.faults import Bandwidth, Kill, Latency, Loss, Partition, Pause
from simulator.ownership import LABEL_RUN
from simulator.swarmbackend import NodeInfo, SwarmBackend, place
from simulator.topology import parse_topology
from tests.support import funcs
from tests.support.waiting import wait_for

TREE = {
    "version": 1,
    "name": "spread",
    "network": {"keepalive_interval": "1s", "keepalive_count": 2},
    "defaults": {"accounts": [{"name": "sim", "keys": ["runner"]}]},
    "tree": {"gate": {"role": "bastion", "children": {
        "east": {"role": "rack", "children": {"e1": {"role": "node"}, "e2": {"role": "node"}}},
        "west": {"role": "rack", "children": {"w1": {"role": "node"}}}}}},
}
NODES = [NodeInfo("n1", "one", {}, None), NodeInfo("n2", "two", {"zone": "b"}, "unix:///b"),
         NodeInfo("n3", "three", {"zone": "c"}, "unix:///c")]


def _tree(placement=None):
    data = dict(TREE)
    if placement is not None:
        data["placement"] = placement
    return parse_topology(data, "spread.yml")


# --------------------------------------------------------------------------------------------
# Placement and capabilities, without Docker
# --------------------------------------------------------------------------------------------


def test_spread_places_hosts_round_robin_in_walk_order():
    found = place(_tree(), NODES)
    assert [found[h] for h in ("gate", "gate/east", "gate/east/e1", "gate/east/e2",
                               "gate/west", "gate/west/w1")] == ["n1", "n2", "n3", "n1",
                                                                 "n2", "n3"]


def test_subtree_keeps_each_subtree_on_one_node():
    found = place(_tree({"rule": "subtree", "depth": 1}), NODES)
    assert found["gate"] == "n1"
    assert {found[h] for h in ("gate/east", "gate/east/e1", "gate/east/e2")} == {"n2"}
    assert {found[h] for h in ("gate/west", "gate/west/w1")} == {"n3"}
    assert set(place(_tree({"rule": "subtree", "depth": 0}), NODES).values()) == {"n1"}


def test_labels_pick_nodes_and_unmatched_hosts_follow_their_parent():
    found = place(_tree({"rule": "labels", "labels": [
        {"select": "east", "node": {"zone": "c"}},
        {"select": "role:node", "node": {"zone": "b"}}]}), NODES)
    assert found["gate"] == "n1"  # no entry matches a root: the first node
    assert found["gate/east"] == "n3"
    assert found["gate/west"] == "n1"  # unmatched: with its parent
    assert {found[h] for h in ("gate/east/e1", "gate/east/e2", "gate/west/w1")} == {"n2"}


def test_labels_no_node_carries_are_an_error_naming_them():
    topology = _tree({"rule": "labels", "labels": [{"select": "role:rack",
                                                     "node": {"zone": "mars"}}]})
    with pytest.raises(BackendError, match=r"no usable swarm node carries the labels "
                                           r"\{'zone': 'mars'\} that 'role:rack' asks for"):
        place(topology, NODES)


def test_a_node_without_a_tool_is_reported_and_its_faults_refused():
    backend = SwarmBackend()
    backend._topology = _tree({"rule": "subtree"})
    backend._host_nodes = place(backend._topology, NODES)
    backend._node_tools = {"n1": {"iptables": True, "tc": True},
                           "n2": {"iptables": True, "tc": False},
                           "n3": {"iptables": False, "tc": True}}
    assert backend.capability_gaps() == {
        "n2": ["bandwidth"], "n3": ["loss", "partition", "sshd_down", "kill(power_off)"]}
    assert "partition" not in backend.capabilities()
    assert "bandwidth" not in backend.capabilities()
    assert {"kill", "pause", "latency", "stream"} <= backend.capabilities()
    with pytest.raises(BackendError, match=r"swarm node n3 cannot apply partition to "
                                           r"'gate/west/w1': it lacks iptables"):
        backend.apply(Partition("gate/west/w1"))
    with pytest.raises(BackendError, match=r"cannot apply kill\(power_off\) to 'gate/west'"):
        backend.apply(Kill("gate/west", mode="power_off"))
    # A bandwidth cap shapes the parent's side too: east's parent is on n1, e1 on n2 (no tc).
    with pytest.raises(BackendError, match="swarm node n2 cannot apply bandwidth"):
        backend.apply(Bandwidth("gate/east/e1"))


# --------------------------------------------------------------------------------------------
# Three engines, three nodes
# --------------------------------------------------------------------------------------------


def _require_lab() -> None:
    from simulator.swarmlab import lab_unavailable
    from tests.simulator.test_dockerbackend import _require_docker

    _require_docker()
    reason = lab_unavailable()
    if reason:
        pytest.skip(reason)


def _remove_from_image(client, tag: str, path: str) -> None:
    """Replace ``tag`` on one engine by the same image without ``path`` (a node whose image
    lacks a tool), keeping its entrypoint and command."""
    config = client.images.get(tag).attrs["Config"]
    container = client.containers.run(tag, entrypoint=["rm", path], network_mode="none",
                                       detach=True)
    try:
        assert container.wait(timeout=60)["StatusCode"] == 0
        repository, version = tag.rsplit(":", 1)
        container.commit(repository, version, changes=[
            f"ENTRYPOINT {json.dumps(config['Entrypoint'])}", f"CMD {json.dumps(config['Cmd'])}"])
    finally:
        container.remove(force=True)


def _round_trip(context) -> float:
    """The quickest of three calls."""
    best = float("inf")
    for _ in range(3):
        began = time.monotonic()
        context.call(probes.identity, 0)
        best = min(best, time.monotonic() - began)
    return best


def _resources(lab, run):
    label = {"label": f"{LABEL_RUN}={run}"}
    return {i: [c.name for c in client.containers.list(all=True, filters=label,
                                                       ignore_removed=True)]
            + [n.name for n in client.networks.list(filters=label)]
            for i, client in lab.clients.items() if i not in lab.killed}


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_tree_over_three_nodes_survives_faults_there_and_a_node_killed():
    """The tree spans three engines (a subtree per node); faults apply on the node that runs
    their target; killing the node of one rack disconnects every context behind it within
    the keepalive bound and spares the rest; then nothing is left on any node, and the
    swarm (the lab's, not the simulator's) is not touched."""
    _require_lab()
    from simulator import images
    from simulator.swarmlab import SwarmLab

    topology = _tree({"rule": "subtree", "depth": 1})
    tag = images.image_tag("bookworm")
    with SwarmLab(3) as lab:
        lab.load_images([tag])
        _remove_from_image(lab.clients[3], tag, "/usr/sbin/tc")  # node 3 cannot shape
        backend = SwarmBackend(engine=lab.manager)
        try:
            backend.create(topology)
            run = backend._run
            nodes = {h.id: backend.node_of(h.id) for h in topology.hosts}
            assert nodes["gate"] == lab.node_ids[1]
            east, west = nodes["gate/east"], nodes["gate/west"]
            assert {east, west} == {lab.node_ids[2], lab.node_ids[3]}
            assert nodes["gate/east/e1"] == nodes["gate/east/e2"] == east
            # What a node lacks is found at start, reported, and refused by name.
            lacking = lab.node_ids[3]
            assert backend.capability_gaps() == {lacking: ["bandwidth"]}
            assert "bandwidth" not in backend.capabilities()
            (event,) = backend.timeline.events(kinds=["capability"])
            assert (event["node"], event["missing"]) == (lacking, ["tc"])
            there = next(h for h, n in nodes.items() if n == lacking and h.count("/") == 2)
            with pytest.raises(BackendError, match=f"swarm node {lacking[:12]} cannot apply "
                                                   f"bandwidth to {there!r}: it lacks tc"):
                backend.apply(Bandwidth(there))
            for host in topology.hosts:  # every hop crosses or stays on a node as placed
                assert backend.context(host.id).call(probes.identity, host.id) == host.id
            # Faults where the container runs, each way of applying one on another node:
            # an iptables rule in a helper container on w1's own node,
            handle = backend.apply(Loss("gate/west/w1", fraction=0.1))
            rules = backend.network_namespace("gate/west/w1").run([["iptables", "-S"]])
            assert "--probability 0.10000" in rules
            backend.heal(handle)
            # a pause through e2's node's engine,
            handle = backend.apply(Pause("gate/east/e2"))
            recv = backend.context("gate/east/e2").call_async(probes.identity, 1)
            with pytest.raises(mitogen.core.TimeoutError):
                recv.get(timeout=1.0)
            backend.heal(handle)
            assert recv.get(timeout=10).unpickle() == 1
            # latency from e1's edge relay inside east's container (docker exec there),
            e1 = backend.context("gate/east/e1")
            steady = _round_trip(e1)
            handle = backend.apply(Latency("gate/east/e1", delay=0.2))
            assert _round_trip(e1) >= steady + 0.35  # 200 ms each way
            backend.heal(handle)
            # and a crash whose heal starts the container again there and reconnects.
            handle = backend.apply(Kill("gate/east/e2", mode="crash"))
            assert not backend.is_up("gate/east/e2")
            backend.heal(handle)
            assert backend.context("gate/east/e2").call(probes.identity, 5) == 5
            assert backend.node_of("gate/east/e2") == east
            # A whole node dies: every context behind it is reported gone within the bound.
            victim = next(i for i, n in lab.node_ids.items() if n == west)
            behind = ["gate/west", "gate/west/w1"]
            gone: Dict[str, float] = {}
            seen = threading.Event()

            def stamp(host: str):
                def done() -> None:
                    gone[host] = time.monotonic()
                    if set(gone) >= set(behind):
                        seen.set()
                return done

            for host in behind:
                mitogen.core.listen(backend.context(host), "disconnect", stamp(host))
            pending = {h: backend.context(h).call_async(funcs.sleep_forever) for h in behind}
            net = topology.network
            bound = net.keepalive_interval * (net.keepalive_count + 1) + 1.0
            began = time.monotonic()
            lab.kill_node(victim)
            assert seen.wait(bound + 10), f"not reported gone: {set(behind) - set(gone)}"
            assert max(gone.values()) - began <= bound, gone
            for recv in pending.values():
                with pytest.raises(mitogen.core.ChannelError):
                    recv.get(timeout=5)
            assert not any(backend.is_up(h) for h in behind)
            for host in ("gate", "gate/east", "gate/east/e1", "gate/east/e2"):
                assert backend.context(host).call(probes.identity, 7) == 7
        finally:
            backend.destroy()
        # No container is left on a live node; an overlay the dead node still holds (the
        # swarm keeps its attachments until it returns or its owner removes it) is reported.
        # A worker's own list of swarm overlays lags the manager's removal a little: no event
        # says when it caught up, so poll, bounded.
        def unreported():
            return [n for names in _resources(lab, run).values() for n in names
                    if n not in backend.left]

        wait_for(lambda: not unreported(), timeout=30, interval=0.5)
        left = _resources(lab, run)
        assert left.keys() == {1, 2, 3} - {victim}
        assert not unreported(), left
        assert all(name.startswith(f"msim-{run}-s") for name in backend.left)
        events = backend.timeline.events(kinds=["shutdown"])
        assert {e["network"] for e in events if e.get("step") == "network_left"} == \
            set(backend.left)
        state = lab.clients[1].info()["Swarm"]
        assert state["LocalNodeState"] == "active" and state["ControlAvailable"]
        assert len(lab.clients[1].nodes.list()) == 3  # the lab's swarm: not ours to change
