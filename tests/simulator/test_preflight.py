"""What the docker backend cannot run is refused before anything starts, with one message,
by ``check``, ``up``, pytest and the backend itself."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from simulator.backend import BackendError
from simulator.preflight import refusals
from simulator.topology import load_topology, parse_topology

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[2]


def _topology(**host):
    return parse_topology({"version": 1, "name": "t", "images": {
        "old": {"suite": "stretch", "python": ["python3.5"]},
        "newer": {"suite": "bookworm", "python": ["python3.12"]},
        "legacy": {"suite": "bullseye", "python": ["python2.7", "python3.9"]},
    }, "tree": {"h": host}}, "t.yml")


@pytest.mark.parametrize(("host", "expected"), [
    ({"image": "old"}, "image 'old' (suite 'stretch') used by host 'h': suite 'stretch' has no "
                       "image recipe; there are recipes for: bookworm, bullseye, sid, trixie"),
    ({"image": "newer"}, "image 'newer' (suite 'bookworm') used by host 'h': the bookworm image "
                         "has python3, python3.11, not python3.12"),
    ({"resources": {"cpus": 4096}}, "host 'h': resources.cpus 4096 is outside what Docker "
                                    "accepts here"),
    ({"resources": {"memory": "1m"}}, "host 'h': resources.memory 1048576 bytes is below "
                                      "Docker's minimum of 6m"),
])
def test_what_docker_would_refuse_is_named(host, expected):
    found = refusals(_topology(**host), "docker")
    assert len(found) == 1
    assert found[0].startswith("t.yml: the docker backend cannot run topology 't': ")
    assert expected in found[0]
    assert refusals(_topology(**host), "local") == []


def test_the_shipped_topologies_and_other_interpreters_pass():
    assert refusals(_topology(image="legacy", python="python2.7"), "docker") == []
    for name in ("dc.yml", "large.yml", "mixed-python.yml"):
        assert refusals(load_topology(ROOT / "topologies" / name), "docker") == [], name


def test_a_supernet_too_small_for_the_tree_is_refused():
    topology = parse_topology({"version": 1, "network": {"supernet": "10.213.0.0/26"},
                               "tree": {"h": None}}, "s.yml")
    (found,) = refusals(topology, "docker")
    assert "too small to split per worker" in found


def test_the_backend_refuses_with_the_same_message():
    from simulator.dockerbackend import DockerBackend

    topology = _topology(image="old")
    backend = DockerBackend()
    with pytest.raises(BackendError) as info:
        backend.create(topology)
    assert str(info.value) == refusals(topology, "docker")[0]


def test_check_up_and_pytest_refuse_with_the_same_message(pytester: pytest.Pytester):
    pytester.makefile(".yml", old="version: 1\nimages: {old: {suite: stretch, python: "
                                  "[python3.5]}}\ntree:\n  h: {image: old}\n")
    pytester.makepyfile("def test_tree(sim):\n    pass\n")
    (message,) = refusals(load_topology(pytester.path / "old.yml"), "docker")
    message = message.replace(str(pytester.path / "old.yml"), "old.yml")
    env = dict(os.environ, PYTHONPATH=str(ROOT))

    def simulator(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "simulator", *args], cwd=pytester.path,
                              env=env, capture_output=True, text=True, timeout=60, check=False)

    check = simulator("check", "old.yml")
    assert check.returncode == 1 and f"simulator: {message}" in check.stderr.splitlines()
    assert simulator("check", "old.yml", "--backend", "local").returncode == 0
    up = simulator("up", "old.yml", "--backend", "docker")
    assert up.returncode == 1 and f"simulator: {message}" in up.stderr.splitlines()
    run = pytester.runpytest("--topology=old.yml", "--topology-backend=docker")
    assert run.ret == pytest.ExitCode.USAGE_ERROR
    run.stderr.fnmatch_lines([f"*--topology: {message}"])
