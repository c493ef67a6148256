"""Removing a run's networks (simulator/ownership.py) when the engine answers with the
errors a swarm gives: a fake engine, no Docker needed."""

from __future__ import annotations

from typing import List

import docker.errors
import pytest

from simulator.ownership import remove_networks


class _Network:
    def __init__(self, name: str, errors: List[str]) -> None:
        self.name = name
        self.errors = list(errors)  # one per remove() call; then it goes
        self.calls = 0
        self.gone = False

    def remove(self) -> None:
        self.calls += 1
        if self.errors:
            error = self.errors.pop(0)
            self.gone = "not found" in error  # another sweeper removed it
            raise docker.errors.APIError(error)
        self.gone = True


class _Client:
    def __init__(self, networks: List[_Network]) -> None:
        self.networks = self
        self._networks = networks

    def list(self, filters=None) -> List[_Network]:
        return [n for n in self._networks if not n.gone]


def test_a_network_removed_meanwhile_counts_as_gone():
    gone = _Network("msim-x-s0", ['500 Server Error: ("network vli9 not found")'])
    assert remove_networks(_Client([gone]), {}, wait=0) == ([], [])


def test_in_use_is_retried_until_free_and_a_dead_nodes_hold_is_not_waited_for():
    busy = _Network("msim-x-s1", ["network s1 is in use by task a1"] * 2)
    dead = _Network("msim-x-s2", ["network s2 is in use by task d1"] * 1000)
    removed, held = remove_networks(_Client([busy, dead]), {}, wait=30,
                                    for_good=lambda why: "task d1" in why)
    assert removed == ["msim-x-s1"] and busy.calls == 3
    assert [name for name, _ in held] == ["msim-x-s2"] and dead.calls == 1


def test_active_endpoints_are_waited_for_as_another_sweeper_removes_them():
    busy = _Network("msim-x-s4", ['403 Forbidden ("network msim-x-s4 id 1 has active '
                                  'endpoints")'])
    assert remove_networks(_Client([busy]), {}, wait=30) == (["msim-x-s4"], [])
    assert busy.calls == 2


def test_any_other_refusal_is_raised():
    odd = _Network("msim-x-s3", ["403 Forbidden: not yours"])
    with pytest.raises(docker.errors.APIError, match="not yours"):
        remove_networks(_Client([odd]), {}, wait=0)
