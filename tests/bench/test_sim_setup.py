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
