"""Host images: recipes, content hashes, node.json, and real containers built from them.

The first half needs nothing but Python. The docker-marked half builds (or finds, by content
hash) the bookworm image, starts containers with init=True on an --internal network, and checks
sshd, python, and the accounts and sudo rules node.json asks for, over real ssh between two
containers. Every container and network it makes carries the label ``mitogen-sim.test=1`` and a
per-test id, and the ``sim`` fixture removes them and checks that none is left.
"""

from __future__ import annotations

import functools
import http.server
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Optional

import docker.errors
import pytest

from simulator import images
from simulator.dockerd import DockerdError, engine_client

NODE_SETUP = images._node_setup_module()


# --- recipes and hashes ----------------------------------------------------------------------


@pytest.fixture
def recipe_copy(tmp_path: Path) -> Path:
    """A private copy of containers/ whose files a test may edit."""
    copy = tmp_path / "containers"
    shutil.copytree(images.RECIPE_DIR, copy)
    return copy


def test_every_suite_has_a_distinct_tag_under_the_project_repo():
    recipes = images.load_recipes()
    assert {"bullseye", "bookworm", "trixie", "sid"} <= set(recipes)
    tags = {r.tag for r in recipes.values()}
    assert len(tags) == len(recipes)
    for suite, r in recipes.items():
        repo, _, digest = r.tag.partition(":")
        assert repo == f"mitogen-sim/{suite}"
        assert digest == r.content_hash()[:16]
        assert "openssh-server" in r.packages and "sudo" in r.packages


def test_hash_follows_recipe_files(recipe_copy: Path):
    before = images.load_recipes(recipe_copy)["bookworm"].content_hash()
    assert images.load_recipes(recipe_copy)["bookworm"].content_hash() == before  # stable
    entry = recipe_copy / "entrypoint.sh"
    entry.write_text(entry.read_text() + "# changed\n")
    assert images.load_recipes(recipe_copy)["bookworm"].content_hash() != before


def test_editing_one_suite_rebuilds_only_that_suite(recipe_copy: Path):
    before = {s: r.content_hash() for s, r in images.load_recipes(recipe_copy).items()}
    spec_path = recipe_copy / "suites.json"
    spec = json.loads(spec_path.read_text())
    spec["suites"]["sid"]["extra_packages"].append("less")
    spec_path.write_text(json.dumps(spec))
    after = {s: r.content_hash() for s, r in images.load_recipes(recipe_copy).items()}
    assert after["sid"] != before["sid"]
    assert {s: h for s, h in after.items() if s != "sid"} == \
        {s: h for s, h in before.items() if s != "sid"}


def test_unknown_suite_names_the_known_ones():
    with pytest.raises(images.UnknownSuiteError) as info:
        images.recipe("hamm")
    assert "'hamm'" in str(info.value) and "bookworm" in str(info.value)


# --- mirror discovery ------------------------------------------------------------------------


def _apt_dir(tmp_path: Path, files: Dict[str, str]) -> Path:
    apt = tmp_path / "apt"
    (apt / "sources.list.d").mkdir(parents=True)
    for name, text in files.items():
        (apt / name).write_text(text)
    return apt


def test_mirror_from_deb822_skips_security_and_disabled(tmp_path, monkeypatch):
    monkeypatch.delenv("MITOGEN_SIM_MIRROR", raising=False)
    apt = _apt_dir(tmp_path, {"sources.list.d/debian.sources": (
        "Types: deb\nURIs: http://security.example/debian-security\nSuites: bookworm-security\n\n"
        "Types: deb\nURIs: http://off.example/debian\nSuites: bookworm\nEnabled: no\n\n"
        "Types: deb-src deb\nURIs: http://mirror.example/debian/\nSuites: bookworm\n")})
    assert images.debian_mirror(apt) == "http://mirror.example/debian"


def test_mirror_from_one_line_sources_with_options(tmp_path, monkeypatch):
    monkeypatch.delenv("MITOGEN_SIM_MIRROR", raising=False)
    apt = _apt_dir(tmp_path, {
        "sources.list": "# deb http://commented.example/debian bookworm main\n"
                        "deb-src http://src.example/debian bookworm main\n",
        "sources.list.d/a.list": "deb [arch=amd64 signed-by=/k.gpg] http://one.example/debian "
                                 "bookworm main\n",
        "sources.list.d/b.list.disabled": "deb http://never.example/debian bookworm main\n",
    })
    assert images.debian_mirror(apt) == "http://one.example/debian"


def test_mirror_override_and_fallback(tmp_path, monkeypatch):
    apt = _apt_dir(tmp_path, {})
    monkeypatch.delenv("MITOGEN_SIM_MIRROR", raising=False)
    assert images.debian_mirror(apt) == images.DEFAULT_MIRROR
    monkeypatch.setenv("MITOGEN_SIM_MIRROR", "http://local.example/debian/")
    assert images.debian_mirror(apt) == "http://local.example/debian"


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass


def test_mirror_check_tells_missing_suite_from_unreachable_mirror(tmp_path: Path):
    (tmp_path / "debian" / "dists" / "bookworm").mkdir(parents=True)
    (tmp_path / "debian" / "dists" / "bookworm" / "Release").write_text("Codename: bookworm\n")
    handler = functools.partial(_QuietHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, name="mirror")
    thread.start()
    mirror = f"http://127.0.0.1:{server.server_address[1]}/debian"
    try:
        images._check_mirror_serves(mirror, "bookworm")
        with pytest.raises(images.ImageBuildError, match=r"does not serve suite 'hamm' \(HTTP 404"):
            images._check_mirror_serves(mirror, "hamm")
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    with pytest.raises(images.ImageBuildError, match=r"unreachable.*MITOGEN_SIM_MIRROR"):
        images._check_mirror_serves(mirror, "bookworm")


# --- node.json -------------------------------------------------------------------------------


@pytest.mark.parametrize(("node", "where"), [
    ({"acounts": []}, "node: unknown key"),
    ({"version": 2}, "node.version"),
    ({"accounts": [{"sudo": "nopasswd"}]}, "node.accounts[0]: missing 'name'"),
    ({"accounts": [{"name": "Bad Name"}]}, "node.accounts[0].name"),
    ({"accounts": [{"name": "a", "sudo": "sometimes"}]}, "node.accounts[0].sudo"),
    ({"accounts": [{"name": "a", "sudo": ["password", "nopasswd"]}]}, "node.accounts[0].sudo"),
    ({"accounts": [{"name": "a", "sudo": ["none", "requiretty"]}]}, "node.accounts[0].sudo"),
    ({"accounts": [{"name": "a"}, {"name": "b", "uid": 5}]}, "node.accounts[1].uid"),
    ({"accounts": [{"name": "a", "keys": "ssh-ed25519 AAAA"}]}, "node.accounts[0].keys"),
    ({"accounts": [{"name": "a", "password": "x\ny"}]}, "node.accounts[0].password"),
    ({"accounts": [{"name": "a", "login_delay": -1}]}, "node.accounts[0].login_delay"),
    ({"accounts": [{"name": "a"}, {"name": "a"}]}, "duplicate account name"),
    ({"accounts": [{"name": "root", "sudo": "nopasswd"}]}, "node.accounts[0]: the root"),
    ({"sudo_rules": [{"user": "ghost", "runas": "ALL", "sudo": "nopasswd"}]},
     "node.sudo_rules[0].user"),
    ({"accounts": [{"name": "a"}], "sudo_rules": [{"user": "a", "runas": ["b"],
                                                   "sudo": "password"}]},
     "node.sudo_rules[0].runas[0]"),
    ({"accounts": [{"name": "a"}], "sudo_rules": [{"user": "a", "runas": "ALL"}]},
     "node.sudo_rules[0]: missing ['sudo']"),
    ({"sshd": {"HostKey": "/tmp/k"}}, "node.sshd.HostKey"),
    ({"host_keys": {"dsa": "x"}}, "node.host_keys"),
])
def test_bad_node_names_the_offending_path(node: Dict[str, Any], where: str):
    with pytest.raises(ValueError) as info:
        images.validate_node(node)
    assert where in str(info.value)


def test_validate_fills_defaults():
    node = images.validate_node({"accounts": [{"name": "ops"}]})
    (ops,) = node["accounts"]
    assert ops["sudo"] == ["none"] and ops["shell"] == "/bin/bash" and ops["keys"] == []
    assert node["sudo_rules"] == [] and node["host_keys"] == {}


def _sudoers(node: Dict[str, Any], user: str) -> List[str]:
    rules = NODE_SETUP.sudo_rules(images.validate_node(node))
    return [ln for ln in NODE_SETUP.sudoers_text(user, rules[user]).splitlines()
            if not ln.startswith("#")]


@pytest.mark.parametrize(("mode", "expected"), [
    ("nopasswd", ["u ALL=(ALL) NOPASSWD: ALL"]),
    ("password", ["u ALL=(ALL) ALL"]),
    ("requiretty", ["Defaults:u requiretty", "u ALL=(ALL) NOPASSWD: ALL"]),
    (["requiretty", "password"], ["Defaults:u requiretty", "u ALL=(ALL) ALL"]),
    ("targetpw", ["Defaults:u targetpw", "u ALL=(ALL) ALL"]),
])
def test_sudoers_for_an_accounts_own_rule(mode: Any, expected: List[str]):
    assert _sudoers({"accounts": [{"name": "u", "sudo": mode}]}, "u") == expected


def test_sudoers_rules_to_named_accounts_bind_to_the_target():
    node = {"accounts": [{"name": "ops"}, {"name": "app"}, {"name": "tty"}],
            "sudo_rules": [{"user": "ops", "runas": "app", "sudo": "targetpw"},
                           {"user": "ops", "runas": ["tty", "root"], "sudo": "requiretty"}]}
    assert _sudoers(node, "ops") == [
        "Defaults>app targetpw", "ops ALL=(app) ALL",
        "Defaults>tty,root requiretty", "ops ALL=(tty,root) NOPASSWD: ALL",
    ]
    assert NODE_SETUP.sudo_rules(images.validate_node({"accounts": [{"name": "x"}]})) == {}


def test_node_config_tar_holds_only_a_private_node_json():
    node = {"accounts": [{"name": "app", "password": "secret"}]}
    with tarfile.open(fileobj=io.BytesIO(images.node_config_tar(node))) as tar:
        (member,) = tar.getmembers()
        assert (member.name, member.mode, member.uid) == ("node.json", 0o600, 0)
        extracted = tar.extractfile(member)
        assert extracted is not None
        assert json.load(extracted) == node
    with pytest.raises(ValueError, match=r"node.accounts\[0\].sudo"):
        images.node_config_tar({"accounts": [{"name": "app", "sudo": "maybe"}]})


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_remove_tree_unmounts_before_deleting(tmp_path: Path):
    tree = tmp_path / "work"
    (tree / "rootfs" / "proc").mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "none", str(tree / "rootfs" / "proc")], check=True)
    (tree / "rootfs" / "proc" / "kept").write_text("x")
    assert images._mounts_under(tree) == [str((tree / "rootfs" / "proc").resolve())]
    images.remove_tree(tree)
    assert not tree.exists()
    assert images._mounts_under(tmp_path) == []


# --- real containers -------------------------------------------------------------------------

TEST_LABEL = "mitogen-sim.test"
TEST_ID_LABEL = "mitogen-sim.test.id"


def _engine_or_skip() -> Any:
    try:
        return engine_client()
    except DockerdError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def bookworm_tag() -> str:
    """The bookworm image, built before pytest starts (.ci/run), never inside a test."""
    client = _engine_or_skip()
    try:
        tag = images.image_tag("bookworm")
        if not images.image_present(client, tag):
            pytest.skip(f"{tag} is not built: python -m simulator images build bookworm "
                        f"(as root)")
        return tag
    finally:
        client.close()


class Sim:
    """Makes labelled containers and networks for one test and removes them afterwards."""

    def __init__(self, client: Any, tag: str) -> None:
        self.client = client
        self.tag = tag
        self.test_id = uuid.uuid4().hex[:12]
        self.labels = {TEST_LABEL: "1", TEST_ID_LABEL: self.test_id}
        self.containers: List[Any] = []
        self.networks: List[Any] = []

    def network(self) -> Any:
        net = self.client.networks.create(f"msim-test-{self.test_id}", driver="bridge",
                                          internal=True, labels=self.labels)
        self.networks.append(net)
        return net

    def host(self, name: str, node: Optional[Dict[str, Any]] = None, network: Any = None,
             start: bool = True) -> Any:
        container = self.client.containers.create(
            self.tag, name=f"msim-{self.test_id}-{name}", hostname=name, init=True,
            labels=self.labels, network=network.name if network else None,
            network_mode=None if network else "none")
        self.containers.append(container)
        if node is not None:
            images.write_node_config(container, node)
        if start:
            container.start()
            images.wait_node_ready(container, timeout=30)
        return container

    def cleanup(self) -> None:
        for container in self.containers:
            container.remove(force=True)
        for net in self.networks:
            net.remove()
        selector = {"label": f"{TEST_ID_LABEL}={self.test_id}"}
        left = [c.name for c in self.client.containers.list(all=True, filters=selector)]
        left += [n.name for n in self.client.networks.list(filters=selector)]
        assert not left, f"left behind: {left}"


@pytest.fixture
def sim(bookworm_tag: str):
    client = _engine_or_skip()
    helper = Sim(client, bookworm_tag)
    try:
        yield helper
    finally:
        try:
            helper.cleanup()
        finally:
            client.close()


# Runs a command on a new pseudo-terminal that is its controlling tty, and exits
# with its status. util-linux `script` did this before, but with no stdin (as
# under `docker exec`) it sometimes never noticed its child had exited.
ON_A_TTY = (
    "python3 -c 'import os, pty, sys\n"
    "pid, fd = pty.fork()\n"
    "if not pid: os.execvp(\"sh\", [\"sh\", \"-c\", sys.argv[1]])\n"
    "while True:\n"
    "    try:\n"
    "        if not os.read(fd, 4096): break\n"
    "    except OSError: break\n"
    "sys.exit(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))' '{command}'"
)


def sh(container: Any, script: str, user: str = "root") -> Any:
    """Run a shell snippet in the container (out of band, like the backend's checks)."""
    return container.exec_run(["su", "-s", "/bin/sh", "-c", script, user] if user != "root"
                              else ["sh", "-c", script])


@pytest.mark.docker
@pytest.mark.slow
def test_image_is_labelled_and_holds_no_host_key(sim: Sim):
    image = sim.client.images.get(sim.tag)
    labels = image.labels
    assert labels["mitogen-sim.suite"] == "bookworm"
    assert labels["mitogen-sim.hash"] == images.recipe("bookworm").content_hash()
    assert labels["mitogen-sim.python3"].startswith("3.11.")
    host = sim.host("plain", start=False)
    stream, _stat = host.get_archive("/etc/ssh")
    with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as tar:
        names = tar.getnames()
    assert "ssh/sshd_config" in names
    assert not [n for n in names if "ssh_host_" in n]


@pytest.mark.docker
@pytest.mark.slow
def test_sshd_python_and_init(sim: Sim):
    host = sim.host("n1", node={})
    listening = sh(host, "ss -Hltn 'sport = :22'")
    assert listening.exit_code == 0 and b":22" in listening.output
    version = sh(host, "python3 --version")
    assert version.output.decode().startswith("Python 3.11.")
    pid1 = sh(host, "cat /proc/1/cmdline | tr '\\0' ' '").output.decode()
    assert "docker-init" in pid1 and "sshd -D -e" in pid1
    key = sh(host, "cat /etc/ssh/ssh_host_ed25519_key.pub").output.decode()
    assert key.startswith("ssh-ed25519 ")
    other = sim.host("n2", node={})
    assert sh(other, "cat /etc/ssh/ssh_host_ed25519_key.pub").output.decode() != key


@pytest.mark.docker
@pytest.mark.slow
def test_every_sudo_mode_behaves_as_sudo_would(sim: Sim):
    node = {
        "root_password": "root_pw",
        "accounts": [
            {"name": "nopw", "sudo": "nopasswd"},
            {"name": "pw", "sudo": "password", "password": "pw_pw"},
            {"name": "tty", "sudo": "requiretty"},
            {"name": "target", "sudo": "targetpw", "password": "target_pw"},
            {"name": "plain", "sudo": "none", "password": "plain_pw"},
        ],
    }
    host = sim.host("modes", node=node)
    outcome = {user: sh(host, "sudo -n true", user) for user in
               ("nopw", "pw", "tty", "target", "plain")}
    assert outcome["nopw"].exit_code == 0
    assert b"password is required" in outcome["pw"].output
    assert b"must have a tty" in outcome["tty"].output
    assert b"password is required" in outcome["target"].output
    assert outcome["plain"].exit_code != 0
    # The right passwords, and a tty where one is required, do get through.
    assert sh(host, "echo pw_pw | sudo -S -p '' true", "pw").exit_code == 0
    assert sh(host, "echo target_pw | sudo -S -p '' true", "target").exit_code != 0
    assert sh(host, "echo root_pw | sudo -S -p '' true", "target").exit_code == 0
    assert sh(host, ON_A_TTY.format(command="sudo -n true"), "tty").exit_code == 0
    assert sh(host, "echo plain_pw | sudo -S -p '' true", "plain").exit_code != 0


@pytest.mark.docker
@pytest.mark.slow
def test_parent_reaches_child_accounts_over_real_ssh(sim: Sim):
    net = sim.network()
    parent = sim.host("parent", node={}, network=net)
    made = sh(parent, "mkdir -p -m 700 /root/.ssh && ssh-keygen -q -t ed25519 -N '' "
                      "-f /root/.ssh/id_ed25519 && cat /root/.ssh/id_ed25519.pub")
    assert made.exit_code == 0, made.output
    pub = made.output.decode().strip()
    child = sim.host("child", network=net, node={
        "accounts": [
            {"name": "ops", "sudo": "nopasswd", "keys": [pub]},
            {"name": "app", "sudo": "password", "password": "app_pw", "keys": [pub]},
        ],
    })
    ssh = "ssh -o BatchMode=yes -o StrictHostKeyChecking=accept-new -o ConnectTimeout=10"
    child_name = child.name
    ops = sh(parent, f"{ssh} ops@{child_name} 'sudo -n true && python3 --version'")
    assert ops.exit_code == 0, ops.output
    assert b"Python 3.11." in ops.output
    app = sh(parent, f"{ssh} app@{child_name} 'sudo -n true'")
    assert app.exit_code != 0 and b"password is required" in app.output
    app_pw = sh(parent, f"{ssh} app@{child_name} \"echo app_pw | sudo -S -p '' id -u\"")
    assert app_pw.exit_code == 0 and app_pw.output.strip().endswith(b"0"), app_pw.output
    nobody = sh(parent, f"{ssh} root@{child_name} true")
    assert nobody.exit_code != 0  # root has no key: the image grants nothing by default


@pytest.mark.docker
@pytest.mark.slow
def test_restart_reapplies_node_and_keeps_host_key(sim: Sim):
    host = sim.host("again", node={"accounts": [{"name": "ops", "sudo": "nopasswd"}]})
    key = sh(host, "cat /etc/ssh/ssh_host_ed25519_key.pub").output
    before_restart = time.time()
    host.restart(timeout=10)
    images.wait_node_ready(host, timeout=30, since=before_restart)
    assert sh(host, "cat /etc/ssh/ssh_host_ed25519_key.pub").output == key
    assert sh(host, "sudo -n true", "ops").exit_code == 0
    rules = sh(host, "grep -c NOPASSWD /etc/sudoers.d/mitogen-sim-ops").output.strip()
    assert rules == b"1"


@pytest.mark.docker
@pytest.mark.slow
def test_bad_node_json_stops_the_container_with_the_reason(sim: Sim):
    host = sim.host("broken", start=False)
    data = json.dumps({"accounts": [{"name": "x", "sudo": "sometimes"}]}).encode()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("node.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    host.put_archive(images.NODE_CONFIG_DIR, buf.getvalue())
    host.start()
    with pytest.raises(images.ImageBuildError) as info:
        images.wait_node_ready(host, timeout=30)
    assert "node.accounts[0].sudo" in str(info.value)
    assert "exited" in str(info.value)


@pytest.mark.docker
def test_concurrent_callers_build_once(recipe_copy: Path, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch):
    """Two builders of one missing image: one builds, the other waits on the lock, then finds
    the tag. The debootstrap step is replaced by a tiny tree; locking, import and tagging are
    real."""
    suite = f"selftest{uuid.uuid4().hex[:8]}"
    spec = json.loads((recipe_copy / "suites.json").read_text())
    spec["suites"] = {suite: {"python": None, "extra_packages": []}}
    (recipe_copy / "suites.json").write_text(json.dumps(spec))
    monkeypatch.setenv("MITOGEN_SIM_CACHE", str(tmp_path / "cache"))
    other_is_waiting = threading.Event()
    builds: List[str] = []

    def fake_make_tarball(r: Any, _mirror: str, tarball: Path, _stage: Any) -> Dict[str, str]:
        builds.append(r.suite)
        assert other_is_waiting.wait(timeout=30), "the second caller never waited for the lock"
        tarball.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(tarball, "w") as tar:
            info = tarfile.TarInfo("marker")
            tar.addfile(info, io.BytesIO(b""))
        facts = {"python3": "0.0.0", "pythons": ""}
        tarball.with_suffix(".json").write_text(json.dumps(facts))
        return facts

    monkeypatch.setattr(images, "_make_tarball", fake_make_tarball)
    client = _engine_or_skip()
    lines: List[str] = []

    def progress(line: str) -> None:
        lines.append(line)
        if "another process is building" in line:
            other_is_waiting.set()

    def build(_n: int) -> str:
        own = engine_client()
        try:
            return images.ensure_image(suite, progress, client=own, recipe_dir=recipe_copy,
                                       mirror="http://127.0.0.1:9/unused", lock_timeout=60)
        finally:
            own.close()

    try:
        with ThreadPoolExecutor(max_workers=2) as pool:
            tags = list(pool.map(build, range(2)))
        assert builds == [suite]
        assert tags[0] == tags[1] == images.recipe(suite, recipe_copy).tag
        assert client.images.get(tags[0]).labels["mitogen-sim.suite"] == suite
        assert any("built by another process meanwhile" in line for line in lines)
        # Once built, a call is a lookup: no lock, no build.
        assert build(3) == tags[0] and builds == [suite]
    finally:
        for tag in (images.recipe(suite, recipe_copy).tag, f"mitogen-sim/{suite}:latest"):
            try:
                client.images.remove(tag)
            except docker.errors.ImageNotFound:  # not created when the test failed early
                pass
        client.close()


# --- an interrupted build --------------------------------------------------------------------

#: Stands in for debootstrap: fills the tree slowly, with /proc mounted inside it and a helper
#: process sitting in it (as its wget and dpkg do), and says what it does line by line.
FAKE_DEBOOTSTRAP = """\
import os, subprocess, sys, time
target = sys.argv[-2]
os.makedirs(target + "/proc")
subprocess.run(["mount", "-t", "tmpfs", "none", target + "/proc"], check=True)
helper = subprocess.Popen(["sleep", "300"], cwd=target)
for i in range(12):
    os.makedirs(f"{target}/usr/share/doc/pkg{i}")
    with open(f"{target}/usr/share/doc/pkg{i}/copyright", "w") as f:
        f.write("x" * 100000)
    print(f"I: Fetching pkg{i}", flush=True)
    time.sleep(0.05)  # the work of a download
for d in ("usr/sbin", "etc/ssh/sshd_config.d", "etc/pam.d", "etc/dpkg/dpkg.cfg.d", "var/log"):
    os.makedirs(f"{target}/{d}", exist_ok=True)
with open(f"{target}/usr/sbin/sshd", "w") as f:
    f.write("#!/bin/sh\\n")
os.chmod(f"{target}/usr/sbin/sshd", 0o755)
with open(f"{target}/etc/pam.d/sshd", "w") as f:
    f.write("session required pam_loginuid.so\\n")
open(f"{target}/etc/marker-complete", "w").close()
subprocess.run(["umount", target + "/proc"], check=True)
helper.kill()
helper.wait()
print("I: Base system installed successfully.", flush=True)
"""
#: Builds the suite through the real code; only the mirror and the python probe (which need
#: a real Debian tree) are replaced.
BUILD_DRIVER = """\
import sys
from pathlib import Path
from simulator import images
from simulator.dockerd import engine_client
images._check_mirror_serves = lambda mirror, suite: None
images._probe_pythons = lambda rootfs: {"python3": "0.0.0", "pythons": ""}
client = engine_client()
try:
    tag = images.ensure_image(sys.argv[1], progress=lambda line: print(line, flush=True),
                              client=client, recipe_dir=Path(sys.argv[2]),
                              mirror="http://127.0.0.1:9/unused")
finally:
    client.close()
print("BUILT " + tag, flush=True)
"""


def _products_whole_or_absent(client: Any, cache: Path, suite: str, tag: str,
                              digest: str) -> None:
    tarball = cache / "rootfs" / f"{suite}-{digest}.tar"
    if tarball.exists():
        with tarfile.open(tarball) as tar:
            assert "./etc/marker-complete" in tar.getnames()
        assert json.loads(tarball.with_suffix(".json").read_text())["python3"] == "0.0.0"
    if images.image_present(client, tag):
        assert client.images.get(tag).labels["mitogen-sim.suite"] == suite


@pytest.mark.docker
@pytest.mark.slow
def test_a_build_killed_at_random_points_leaves_nothing_half_made(recipe_copy: Path,
                                                                   tmp_path: Path):
    """SIGKILL the builder after a random number of its progress lines (seeded: a failure
    replays), again and again: the cached tree and the image are whole or absent after each
    kill, and the next build starts clean, ending what the killed one left running and
    mounted. A last build runs to the end and leaves no work directory behind."""
    if os.geteuid() != 0:
        pytest.skip("building an image needs root (debootstrap, chroot, mount)")
    client = _engine_or_skip()
    suite = f"killtest{uuid.uuid4().hex[:8]}"
    spec = json.loads((recipe_copy / "suites.json").read_text())
    spec["suites"] = {suite: {"python": None, "extra_packages": []}}
    (recipe_copy / "suites.json").write_text(json.dumps(spec))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "debootstrap"
    fake.write_text(f"#!{sys.executable}\n{FAKE_DEBOOTSTRAP}")
    fake.chmod(0o755)
    cache = tmp_path / "cache"
    env = dict(os.environ, MITOGEN_SIM_CACHE=str(cache),
               PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
               PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    r = images.recipe(suite, recipe_copy)
    digest = r.content_hash()[:16]
    rng = random.Random(20261201)

    def build(kill_after: Optional[int] = None) -> List[str]:
        proc = subprocess.Popen([sys.executable, "-c", BUILD_DRIVER, suite, str(recipe_copy)],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        lines = []
        assert proc.stdout is not None
        with proc:
            for line in proc.stdout:
                lines.append(line.rstrip())
                if kill_after is not None and len(lines) >= kill_after:
                    proc.send_signal(signal.SIGKILL)
                    break
            proc.stdout.read()
        return lines

    def start_again_from_nothing() -> None:
        client.images.remove(r.tag)
        (cache / "rootfs" / f"{suite}-{digest}.tar").unlink()

    try:
        full = len(build())  # how many lines a whole build prints
        start_again_from_nothing()
        rounds = 8
        for index in range(rounds):  # one kill in each eighth of the build, at random in it
            lines = build(kill_after=rng.randint(1 + index * full // rounds,
                                                 (index + 1) * full // rounds))
            _products_whole_or_absent(client, cache, suite, r.tag, digest)
            if lines[-1].startswith("BUILT "):
                start_again_from_nothing()
        lines = build()
        assert lines[-1] == f"BUILT {r.tag}", lines
        _products_whole_or_absent(client, cache, suite, r.tag, digest)
        assert images.image_present(client, r.tag)
        assert list((cache / "work").iterdir()) == []
        assert images._mounts_under(cache) == []
        assert images._work_processes(cache) == []
    finally:
        images._kill_work_processes(cache)
        images.remove_tree(cache)
        for ref in (r.tag, f"mitogen-sim/{suite}:latest"):
            try:
                client.images.remove(ref)
            except docker.errors.ImageNotFound:
                pass
        client.close()
