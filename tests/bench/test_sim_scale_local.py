"""The local scale benchmark builds the tree it reports: five levels, at least the contexts
asked for, and no more than one node (or leaf) per rack beyond them."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from simulator.topology import parse_topology

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import sim_scale_local as sim_scale


def _contexts(topology) -> int:
    return len(topology.hosts) + sum(len(host.accounts) - 1 for host in topology.hosts)


@pytest.mark.parametrize("contexts, accounts", [(1000, 4), (1000, 0), (200, 2), (100, 4)])
def test_the_tree_has_five_levels_of_contexts_and_enough_of_them(contexts, accounts):
    topology = parse_topology(sim_scale.tree_document(contexts, accounts), "generated")
    found = _contexts(topology)
    assert contexts <= found < contexts + sim_scale.DCS * sim_scale.RACKS * (
        1 + accounts if accounts else 6)
    host_levels = max(host.depth for host in topology.hosts) + 1
    assert host_levels + (1 if accounts else 0) == 5  # accounts are a level below their node
    assert topology.roots()[0].name == "bastion"
