"""Container methods: docker and setns against a real container when the engine has an image
with Python; kubectl, lxc, lxd, podman and buildah through stub executables on PATH, which
record the command line they were given and run the boot command locally."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest

import mitogen.docker
import mitogen.setns
from tests.support import remote

STUB = """\
#!%s
import json, os, sys
with open(os.environ["MITOGEN_STUB_LOG"], "a") as f:
    f.write(json.dumps(sys.argv) + "\\n")
start = sys.argv.index("-S") - 1
os.execv(sys.argv[start], sys.argv[start:])
"""

STUBS = ["kubectl", "lxc-attach", "lxc", "incus", "jexec", "podman", "buildah", "docker"]


@pytest.fixture
def stubs(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in STUBS:
        path = bin_dir / name
        path.write_text(STUB % sys.executable)
        path.chmod(0o755)
    log = tmp_path / "argv.log"
    monkeypatch.setenv("PATH", "%s:%s" % (bin_dir, os.environ.get("PATH", "")))
    monkeypatch.setenv("MITOGEN_STUB_LOG", str(log))

    def calls() -> list:
        return [json.loads(line) for line in log.read_text().splitlines()]

    return calls


def _boot_tail(argv: list) -> list:
    return argv[argv.index("-S") - 1:]


@pytest.mark.parametrize(("method", "kwargs", "name", "head"), [
    # Mitogen's argument order and flags, exactly: wrappers may depend on them.
    ("kubectl", {"pod": "web-0", "kubectl_args": ["--context", "prod"]}, "kubectl.web-0",
     ["kubectl", "--context", "prod", "exec", "-it", "web-0", "--"]),
    ("lxc", {"container": "c1"}, "lxc.c1",
     ["lxc-attach", "--clear-env", "--name", "c1", "--"]),
    ("lxd", {"container": "c2"}, "lxd.c2",
     ["lxc", "exec", "--mode=noninteractive", "c2", "--"]),
    ("incus", {"container": "c3"}, "incus.c3",
     ["incus", "exec", "--mode=non-interactive", "c3", "--"]),
    ("jail", {"container": "j1", "username": "www", "jexec_path": "jexec"}, "jail.j1",
     ["jexec", "-U", "www", "j1"]),
    ("podman", {"container": "p1", "username": "app"}, "podman.p1",
     ["podman", "exec", "--user=app", "--interactive", "--", "p1"]),
    ("podman", {"container": "p2"}, "podman.p2", ["podman", "exec", "--interactive", "--",
                                                  "p2"]),
    ("buildah", {"container": "b1", "username": "app"}, "buildah.b1",
     ["buildah", "run", "--user=app", "--", "b1"]),
    ("docker", {"container": "d1"}, "docker.d1", ["docker", "exec", "--interactive", "d1"]),
    ("docker", {"image": "debian:12", "username": "nobody"}, "docker.debian:12",
     ["docker", "run", "--interactive", "--user=nobody", "--rm", "debian:12"]),
])
def test_stubbed_method(router, stubs, method, kwargs, name, head):
    context = getattr(router, method)(python_path=sys.executable, **kwargs)
    assert context.call(remote.whoami)
    assert context.name == name
    (argv,) = stubs()
    assert [os.path.basename(argv[0]), *argv[1:len(head)]] == head
    assert _boot_tail(argv)[0] == sys.executable
    assert len(argv) == len(head) + len(_boot_tail(argv))
    context.shutdown(wait=True)


def test_remote_methods_default_to_python_on_path():
    options = mitogen.docker.Options(max_message_size=1, container="x")
    assert options.python_path == ["python"]
    with pytest.raises(ValueError, match=r"container= .* or image="):
        mitogen.docker.Options(max_message_size=1)
    with pytest.raises(ValueError, match="kind="):
        mitogen.setns.Options(max_message_size=1, container="x", kind="jail")


def test_setns_missing_container_is_a_clear_error(router, stubs):
    with pytest.raises(mitogen.setns.Error, match="cannot find the container"):
        router.setns(container="absent", kind="lxc", lxc_info_path="/bin/false")


# --- a real container


def _docker(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=60,
                          check=check)


def _image_with_python() -> str | None:
    try:
        if _docker("info", check=False).returncode:
            return None
    except (OSError, subprocess.TimeoutExpired):
        return None
    listed = _docker("images", "--format", "{{.Repository}}:{{.Tag}}",
                     "--filter", "reference=mitogen-sim/*:latest").stdout.split()
    return sorted(listed)[0] if listed else None


@pytest.fixture(scope="module")
def container():
    image = _image_with_python()
    if image is None:
        pytest.skip("no Docker engine answering, or no mitogen-sim image built yet "
                    "(python -m simulator images build bookworm)")
    name = "mitogen-conn-test-%s" % uuid.uuid4().hex[:8]
    _docker("run", "--detach", "--network", "none", "--name", name,
            "--entrypoint", "sleep", image, "infinity")
    try:
        yield name
    finally:
        _docker("rm", "--force", name, check=False)


@pytest.mark.docker
def test_docker_exec_into_running_container(router, container):
    context = router.docker(container=container, python_path="python3")
    assert context.name == "docker.%s" % container
    assert context.call(remote.whoami) == "root"
    assert context.call(remote.hostname) == _docker(
        "inspect", "--format", "{{.Config.Hostname}}", container).stdout.strip()
    nobody = router.docker(container=container, python_path="python3", username="nobody")
    assert nobody.call(remote.whoami) == "nobody"
    context.shutdown(wait=True)
    nobody.shutdown(wait=True)


@pytest.mark.docker
def test_setns_into_running_container(router, container):
    if os.geteuid() != 0:
        pytest.skip("setns needs root")
    context = router.setns(container=container, kind="docker", python_path="python3")
    hostname = _docker("inspect", "--format", "{{.Config.Hostname}}", container).stdout
    assert context.call(remote.hostname) == hostname.strip()
    # In the container's PID namespace, its first process is `sleep infinity`.
    assert context.call(remote.first_process) == "sleep infinity"
    nobody = router.setns(container=container, kind="docker", python_path="python3",
                          username="nobody")
    assert nobody.call(remote.whoami) == "nobody"
    context.shutdown(wait=True)
