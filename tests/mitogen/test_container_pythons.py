"""Children inside real Debian containers: every Python the simulator's images carry, with
nothing of ours installed there and nothing written to their disks."""

from __future__ import annotations

import subprocess
import uuid

import pytest

from tests.support import funcs, packages

pytestmark = pytest.mark.docker

SUITES = {"bullseye": (3, 9), "bookworm": (3, 11), "trixie": (3, 13), "sid": (3, 14)}


def _docker(*args: str) -> str:
    done = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=120,
                          check=False)
    if done.returncode != 0:
        raise RuntimeError("docker %s failed: %s" % (" ".join(args), done.stderr.strip()))
    return done.stdout.strip()


@pytest.fixture
def container(request):
    """A started container of the suite's image with no network, removed afterwards."""
    from simulator.dockerbackend import docker_unavailable
    from simulator.images import image_tag

    reason = docker_unavailable([request.param])  # built before pytest (.ci/run), not here
    if reason:
        pytest.skip(reason)
    tag = image_tag(request.param)
    name = "mitogen-test-%s" % uuid.uuid4().hex[:12]
    _docker("run", "-d", "--rm", "--init", "--network", "none", "--name", name,
            "--label", "mitogen-sim.test=1", "--entrypoint", "sleep", tag, "infinity")
    try:
        yield request.param, name
    finally:
        _docker("rm", "-f", name)


@pytest.mark.parametrize("container", sorted(SUITES), indirect=True)
def test_child_in_container_runs_calls_and_imports_without_writing(container, router, package,
                                                                   data_package):
    suite, name = container
    baseline = set(_docker("diff", name).splitlines())  # what Docker itself adds (--init)
    child = router.local(python_path=["docker", "exec", "-i", name, "python3"],
                         name="in-" + suite)
    assert child.call(funcs.python_version)[:2] == SUITES[suite]
    assert child.call(package[0].run) == packages.expected_sum()
    # A package's data files come from the master too: its directory exists only there.
    data, use, _ = data_package
    assert child.call(use.greeting) == packages.DATA_TEXT
    found = child.call(funcs.resources_of, data, "greeting.txt", "data")
    assert (found["type"], found["nested"], found["get_data"], found["legacy"]) == (
        "RemoteTraversable", packages.DATA_BYTES, packages.DATA_TEXT.encode(),
        packages.DATA_TEXT.encode())
    child.shutdown(wait=True)
    changes = set(_docker("diff", name).splitlines()) - baseline
    assert not changes, sorted(changes)
