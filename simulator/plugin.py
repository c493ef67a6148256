"""The pytest11 entry point: ``--topology=FILE`` and friends.

Imports only pytest and the standard library at module level, so that loading the plugin costs
nothing in test runs that do not ask for a topology.
"""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("topology", "topology simulator")
    group.addoption("--topology", metavar="FILE", default=None,
                    help="build the host tree described by FILE (YAML) for the tests")
    group.addoption("--topology-backend", choices=("local", "docker"), default="local",
                    help="where the hosts live (default: local)")
    group.addoption("--topology-keep", action="store_true", default=False,
                    help="leave the topology up after a failure, for debugging")
    group.addoption("--topology-seed", type=int, default=None,
                    help="seed for fault schedules (default: the file's own seed)")
