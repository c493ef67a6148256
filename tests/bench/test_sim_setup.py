"""The simulator set-up benchmark generates trees of exactly the sizes it reports."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from simulator.topology import parse_topology

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import sim_setup


@pytest.mark.parametrize("hosts", [1, 2, 7, 10, 25, 50, 100])
def test_generated_tree_has_the_requested_number_of_hosts(hosts):
    topology = parse_topology(yaml.safe_load(sim_setup.tree_yaml(hosts)), "generated")
    assert len(topology.hosts) == hosts
    assert topology.roots()[0].name == "bastion"


def test_scale_bench_counts_node_boundaries_on_each_path():
    import sim_scale

    topology = parse_topology(yaml.safe_load(sim_setup.tree_yaml(7)), "generated")
    ids = [h.id for h in topology.hosts]  # bastion, dc1, rack1_1, 4 nodes
    nodes = dict.fromkeys(ids, "a")
    nodes[ids[2]] = "b"  # the rack on another node: its nodes' paths cross once more
    nodes[ids[4]] = "b"  # a node with its rack (ids[3] goes back to "a")
    assert sim_scale.crossings(topology, nodes, ids[0]) == 0
    assert sim_scale.crossings(topology, nodes, ids[2]) == 1
    assert sim_scale.crossings(topology, nodes, ids[3]) == 2
    assert sim_scale.crossings(topology, nodes, ids[4]) == 1
