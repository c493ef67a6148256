"""Generated trees and fault schedules: within their limits, valid for the backend, and the
same for the same seed."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from simulator.faults import FaultError
from simulator.strategies import (
    CAMPAIGN_KINDS,
    FaultMix,
    PlannedFault,
    RandomDraw,
    TreeShape,
    fault_schedule,
    random_topology,
    schedules,
    topologies,
    tree_document,
)
from simulator.topology import Topology

PYTHONS = ("python3.9", "python3.11", "python3.13")
SHAPE = TreeShape(pythons=PYTHONS, max_hosts=40)
MIX = FaultMix(kinds=CAMPAIGN_KINDS, count=(1, 6), horizon=10.0, duration=(0.5, 5.0))
QUICK = settings(max_examples=60, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _levels(topology: Topology) -> int:
    return max(host.depth for host in topology.hosts) + 1


@QUICK
@given(topologies(SHAPE))
def test_generated_trees_keep_to_their_shape(topology):
    assert 1 <= len(topology.hosts) <= SHAPE.max_hosts
    assert 1 <= _levels(topology) <= 5
    for host in topology.hosts:
        assert len(host.children) <= 8
        assert host.python in PYTHONS  # only interpreters the backend offers
        assert 0 <= len(host.accounts) - 1 <= 2
    assert len(topology.roots()) <= 2
    # The deepest level is reached along a spine: some host of each level has children.
    for level in range(_levels(topology) - 1):
        assert any(host.children for host in topology.hosts if host.depth == level)


def test_trees_reach_every_depth_and_fan_out_across_seeds():
    """Over seeds, the generator covers the whole range it promises, not just its middle."""
    depths, fanouts, pythons, accounts, mixed = set(), set(), set(), set(), 0
    for seed in range(150):
        topology = random_topology(RandomDraw(seed), SHAPE)
        depths.add(_levels(topology))
        fanouts.update(len(host.children) for host in topology.hosts if host.children)
        pythons.update(host.python for host in topology.hosts)
        accounts.update(len(host.accounts) - 1 for host in topology.hosts)
        mixed += len({host.python for host in topology.hosts}) > 1
    assert depths == {1, 2, 3, 4, 5}
    assert fanouts == set(range(1, 9))
    assert pythons == set(PYTHONS)
    assert accounts == {0, 1, 2}
    assert mixed >= 120  # most trees mix interpreters (140 of these 150 do)


def test_the_same_seed_draws_the_same_tree_and_schedule():
    first = tree_document(RandomDraw("campaign:7:3:tree"), SHAPE)
    assert tree_document(RandomDraw("campaign:7:3:tree"), SHAPE) == first
    assert tree_document(RandomDraw("campaign:7:4:tree"), SHAPE) != first
    topology = random_topology(RandomDraw(1), SHAPE)
    plan = fault_schedule(RandomDraw("s"), topology, MIX)
    assert fault_schedule(RandomDraw("s"), topology, MIX) == plan


@QUICK
@given(st.data())
def test_generated_schedules_are_valid_for_the_tree(data):
    topology = data.draw(topologies(TreeShape(pythons=PYTHONS, max_hosts=12)))
    plan = data.draw(schedules(topology, MIX))
    ids = {host.id for host in topology.hosts}
    assert 1 <= len(plan) <= 6
    assert [p.start for p in plan] == sorted(p.start for p in plan)
    for planned in plan:
        assert planned.kind in MIX.kinds and planned.target in ids
        assert planned.start >= 0 and 0.5 <= planned.duration <= 5.0
        assert planned.fault().target == planned.target  # a real fault value
    for a in plan:  # one fault per target at a time: overlaps only across targets
        for b in plan:
            if a is not b and a.target == b.target:
                assert a.end <= b.start or b.end <= a.start


def test_schedules_draw_only_the_kinds_asked_for():
    topology = random_topology(RandomDraw(2), SHAPE)
    mix = FaultMix(kinds=("latency", "stop"), count=(5, 5))
    for seed in range(20):
        assert {p.kind for p in fault_schedule(RandomDraw(seed), topology, mix)} <= {
            "latency", "stop"}


def test_a_planned_fault_round_trips_and_refuses_nonsense():
    planned = PlannedFault(1.5, 2.0, "partition", "a/b", {"mode": "drop", "direction": "egress"})
    assert PlannedFault.from_dict(planned.as_dict()) == planned
    assert "partition a/b  direction=egress mode=drop" in planned.describe()
    with pytest.raises(FaultError, match="unknown fault kind 'meteor'"):
        PlannedFault.from_dict({"start": 0, "duration": 1, "kind": "meteor", "target": "a"})
    with pytest.raises(FaultError, match="unknown parameter 'speed'"):
        PlannedFault.from_dict({"start": 0, "duration": 1, "kind": "kill", "target": "a",
                                "params": {"speed": 3}})


@pytest.mark.parametrize("kwargs, message", [
    ({"pythons": ()}, "name at least one interpreter"),
    ({"pythons": PYTHONS, "depth": (0, 3)}, "TreeShape.depth"),
    ({"pythons": PYTHONS, "fanout": (3, 2)}, "TreeShape.fanout"),
    ({"pythons": PYTHONS, "max_hosts": 3}, "below the deepest tree"),
])
def test_a_bad_shape_is_refused_with_its_reason(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TreeShape(**kwargs)


def test_a_bad_mix_is_refused_with_its_reason():
    with pytest.raises(ValueError, match="'loss' is not a campaign fault kind"):
        FaultMix(kinds=("loss",))
    with pytest.raises(ValueError, match="name at least one fault kind"):
        FaultMix(kinds=())
