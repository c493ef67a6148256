"""The container backends: address planning (no Docker needed), then the conformance suite,
every fault kind on a small real tree, run on the ``docker`` backend and on the ``swarm``
backend (a one-node swarm on this machine's engine); then, for docker, the reaper after a
killed runner and the sweep of stale resources. The swarm backend's own tests (placement,
three nodes, a node killed) are in test_swarmbackend.py.

The end-to-end suite (tests/simulator/test_e2e.py) runs on this backend with
``--topology=topologies/dc.yml --topology-backend=docker``; these tests cover what it does not.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
import sys
import textwrap
import time
from typing import Iterator

import pytest

import mitogen.core
from simulator import probes
from simulator.backend import BackendError
from simulator.faults import (
    Bandwidth,
    Kill,
    Latency,
    Loss,
    Partition,
    Pause,
    Restart,
    Signal,
    SshdDown,
    StreamFault,
)
from simulator.topology import parse_topology
from tests.support import funcs, swarm

SMALL = {
    "version": 1,
    "name": "small",
    "network": {"keepalive_interval": "1s", "keepalive_count": 2},
    "defaults": {"accounts": [{"name": "sim", "keys": ["runner"], "password": "pw"}]},
    "tree": {"gate": {"role": "bastion", "children": {
        "leaf": {"role": "node", "link": {"latency": "5ms"},
                 "accounts+": [{"name": "app", "sudo": "nopasswd"}]}}}},
}
FAIL_BOUND = 2.0


def _small():
    return parse_topology(SMALL, "small.yml")


# --------------------------------------------------------------------------------------------
# Address planning
# --------------------------------------------------------------------------------------------


def test_segments_are_carved_per_worker_from_the_supernet():
    from simulator.segments import blocks, plan_segments

    topology = parse_topology({**SMALL, "network": {"supernet": "10.213.0.0/16"}}, "s.yml")
    carved = blocks("10.213.0.0/16")
    assert len(carved) == 16 and carved[1] == ipaddress.ip_network("10.213.16.0/20")
    segments = plan_segments(topology, carved[3])
    assert [s.owner for s in segments] == [None, "gate"]
    assert all(s.subnet.subnet_of(carved[3]) for s in segments)
    assert not segments[0].subnet.overlaps(segments[1].subnet)
    root, gate = segments
    assert root.address("gate") == str(root.subnet.network_address + 3)  # .1 gw, .2 runner
    assert gate.address("gate") == str(gate.subnet.network_address + 2)
    assert gate.address("gate/leaf") == str(gate.subnet.network_address + 3)


def test_a_supernet_too_small_is_a_clear_error():
    from simulator.segments import blocks, plan_segments

    with pytest.raises(BackendError, match="too small to split per worker"):
        blocks("10.213.0.0/26")
    wide = {f"n{i}": {"role": "node"} for i in range(40)}
    topology = parse_topology({**SMALL, "tree": {"gate": {"children": wide}}}, "w.yml")
    with pytest.raises(BackendError, match=r"network\.supernet a larger range"):
        plan_segments(topology, ipaddress.ip_network("10.213.0.0/28"))


# --------------------------------------------------------------------------------------------
# Faults on a real tree
# --------------------------------------------------------------------------------------------


def _require_docker() -> None:
    """An engine answers and the image is built (by .ci/run, before pytest), or skip."""
    from simulator.dockerbackend import docker_unavailable

    reason = docker_unavailable(["bookworm"])
    if reason:
        pytest.skip(reason)


def _require_swarm() -> None:
    from simulator.swarmbackend import swarm_unavailable

    reason = swarm_unavailable(["bookworm"])
    if reason:
        pytest.skip(reason)


#: The conformance suite also runs on three engines joined in a swarm (simulator/swarmlab.py),
#: gate and leaf on different nodes: every fault is then applied on a node other than the
#: manager the runner talks to. One lab for the module, on one xdist worker.
SWARM3 = pytest.param("swarm3", marks=[pytest.mark.slow, pytest.mark.xdist_group("swarm3"),
                                       pytest.mark.timeout(600)])


@pytest.fixture(scope="module", params=["docker", "swarm", SWARM3])
def tree(request) -> Iterator:
    if request.param == "swarm3":
        yield from _tree_on_a_lab()
        return
    if request.param == "docker":
        _require_docker()
        from simulator.dockerbackend import DockerBackend

        backend = DockerBackend()
    else:
        _require_swarm()
        from simulator.swarmbackend import SwarmBackend

        backend = SwarmBackend()
    try:
        backend.create(_small())
        yield backend
    finally:
        backend.destroy()


def _tree_on_a_lab() -> Iterator:
    from simulator import images
    from simulator.swarmbackend import SwarmBackend
    from simulator.swarmlab import SwarmLab, lab_unavailable

    _require_docker()
    reason = lab_unavailable()
    if reason:
        pytest.skip(reason)
    topology = parse_topology({**SMALL, "placement": {"rule": "spread"}}, "small.yml")
    with SwarmLab(3) as lab:
        lab.load_images([images.image_tag("bookworm")])
        backend = SwarmBackend(engine=lab.manager)
        try:
            backend.create(topology)
            assert backend.node_of("gate") != backend.node_of("leaf")
            yield backend
        finally:
            backend.destroy()


@pytest.fixture
def healed(tree):
    yield tree
    tree.heal_all()
    for name in ("gate", "leaf"):
        assert tree.context(name).call(probes.identity, name) == name


def _fails_fast(tree, host, apply, bound=FAIL_BOUND):
    """Start a call that never ends on ``host``, apply the fault, return when it failed.

    ``bound`` counts from when ``apply`` returns, the fault in place: what it takes to apply
    one is the backend's own cost (nsenter on docker; on swarm a helper container on the
    node, whose start is not what the bound is about)."""
    recv = tree.context(host).call_async(funcs.sleep_forever)
    began = time.monotonic()
    handle = apply()
    applied = time.monotonic()
    with pytest.raises(mitogen.core.ChannelError):
        recv.get(timeout=bound + 10)
    ended = time.monotonic()
    assert ended - applied <= bound, (ended - applied, applied - began)
    return handle, ended - applied


def _blocked(tree, host, timeout=1.5) -> bool:
    """True when a call to ``host`` gets no answer within ``timeout`` seconds."""
    recv = tree.context(host).call_async(probes.identity, 1)
    try:
        recv.get(timeout=timeout)
        return False
    except mitogen.core.TimeoutError:
        return True
    finally:
        recv.close()


@pytest.mark.docker
def test_accounts_are_real_users_behind_real_sudo(healed):
    from tests.support import remote

    assert healed.context("leaf").call(remote.whoami) == "sim"
    assert healed.context("leaf", "app").call(remote.whoami) == "app"
    assert healed.processes("leaf")  # seen out of band
    assert healed.exec("leaf", ["id", "-un"], user="app").stdout.strip() == b"app"


@pytest.mark.docker
@pytest.mark.parametrize("mode", ["crash", "stop", "power_off"])
def test_kill_modes(healed, mode):
    bound = FAIL_BOUND if mode != "power_off" else 1.0 * (2 + 1) + 1.0  # keepalive bound
    handle, _ = _fails_fast(healed, "leaf",
                            lambda: healed.apply(Kill("leaf", mode=mode, grace=1)), bound)
    healed.heal(handle)


@pytest.mark.docker
def test_restart_gives_new_contexts(healed):
    old = healed.context("leaf")
    healed.heal(healed.apply(Restart("leaf", grace=1)))
    assert healed.context("leaf") is not old
    assert healed.context("leaf", "app").call(probes.identity, 3) == 3


@pytest.mark.docker
def test_pause_freezes_and_heal_resumes(healed):
    handle = healed.apply(Pause("leaf"))
    assert _blocked(healed, "leaf")
    healed.heal(handle)
    assert healed.context("leaf").call(probes.identity, 2) == 2


@pytest.mark.docker
def test_signal_one_remote_process(healed):
    # The interpreter renames itself "python3.X(mitogen:NAME)" once it has booted.
    handle = healed.apply(Signal("leaf", process_match=r"\(mitogen:sudo:leaf:app\)",
                                 signal="SIGSTOP"))
    assert _blocked(healed, "leaf") is False  # the host's own context still answers
    recv = healed.context("leaf", "app").call_async(probes.identity, 4)
    with pytest.raises(mitogen.core.TimeoutError):
        recv.get(timeout=1.0)
    healed.heal(handle)
    assert recv.get(timeout=10).unpickle() == 4


@pytest.mark.docker
def test_sshd_down_refuses_new_logins_and_keeps_sessions(healed):
    handle = healed.apply(SshdDown("leaf"))
    try:
        assert healed.context("leaf").call(probes.identity, 5) == 5  # live session survives
        done = healed.exec("gate", ["timeout", "5", "python3", "-c",
                                    "import socket; socket.create_connection(("
                                    f"'{healed.state('leaf').uplink}', 22), 3)"])
        assert done.returncode != 0 and b"Connection refused" in done.stderr
    finally:
        healed.heal(handle)


@pytest.mark.docker
def test_partition_reset_fails_at_once(healed):
    handle, _ = _fails_fast(healed, "leaf",
                            lambda: healed.apply(Partition("leaf", mode="reset")))
    healed.heal(handle)


@pytest.mark.docker
def test_partition_unplug_is_detected_by_keepalive(healed):
    bound = 1.0 * (2 + 1) + 1.0
    handle, _ = _fails_fast(healed, "leaf",
                            lambda: healed.apply(Partition("leaf", mode="unplug")), bound)
    assert healed.timeline.events(kinds=["keepalive"])[-1]["host"] == "gate/leaf"
    healed.heal(handle)


@pytest.mark.docker
@pytest.mark.parametrize("direction", ["ingress", "egress"])
def test_one_way_partition(healed, direction):
    bound = 1.0 * (2 + 1) + 1.0
    handle, _ = _fails_fast(healed, "leaf", lambda: healed.apply(
        Partition("leaf", mode="drop", direction=direction)), bound)
    healed.heal(handle)


@pytest.mark.docker
def test_latency_comes_from_the_relay_and_bandwidth_from_tbf(healed):
    ctx = healed.context("leaf")

    def round_trip() -> float:
        began = time.monotonic()
        ctx.call(probes.identity, 0)
        return time.monotonic() - began

    steady = min(round_trip() for _ in range(3))
    handle = healed.apply(Latency("leaf", delay=0.2))
    slow = min(round_trip() for _ in range(3))
    healed.heal(handle)
    assert slow >= steady + 0.35, (steady, slow)  # 200 ms each way
    assert min(round_trip() for _ in range(3)) < steady + 0.1
    handle = healed.apply(Bandwidth("leaf", rate="2mbit"))
    qdiscs = _qdiscs(healed, "leaf") + _qdiscs(healed, "gate")
    began = time.monotonic()
    # 2 Mbit each way: about a second each at 2 Mbit/s, well inside the keepalive's 2 s (a
    # keepalive queued behind 2 s of data would end the link); random, as ssh compresses.
    ctx.call(probes.identity, os.urandom(250_000))
    healed.heal(handle)
    assert time.monotonic() - began >= 1.5
    assert "qdisc tbf" in qdiscs and "qdisc htb" in qdiscs, qdiscs
    assert "tbf" not in _qdiscs(healed, "leaf") and "htb" not in _qdiscs(healed, "gate")


def _qdiscs(backend, host: str) -> str:
    return backend.network_namespace(host).run([["tc", "qdisc", "show"]])


@pytest.mark.docker
def test_loss_is_an_iptables_statistic_rule(healed):
    # 10 %: enough to see TCP retransmit, little enough that ssh's 1 s x 2 keepalive of
    # this small tree never gives up on the link (at 50 % it sometimes did).
    handle = healed.apply(Loss("leaf", fraction=0.1))
    try:
        rules = healed.network_namespace("leaf").run([["iptables", "-S"]])
        assert "--probability 0.10000" in rules
        assert healed.context("leaf").call(probes.identity, 6) == 6  # TCP carries on
    finally:
        healed.heal(handle)
    assert "statistic" not in healed.network_namespace("leaf").run([["iptables", "-S"]])


@pytest.mark.docker
@pytest.mark.parametrize("kind,nbytes", [("reset", None), ("cut_after", 10)])
def test_stream_faults_end_the_link(healed, kind, nbytes):
    def cut():
        handle = healed.apply(StreamFault("leaf", kind=kind, nbytes=nbytes))
        healed.context("gate").call(probes.identity, 0)  # traffic elsewhere is unaffected
        return handle

    recv = healed.context("leaf").call_async(funcs.sleep_forever)
    handle = cut()
    if kind == "cut_after":  # bytes must cross the link to reach the cut
        healed.context("leaf").call_async(probes.identity, b"y" * 100)
    with pytest.raises(mitogen.core.ChannelError):
        recv.get(timeout=FAIL_BOUND + 5)
    healed.heal(handle)


@pytest.mark.docker
def test_stream_stall_is_silent(healed):
    handle = healed.apply(StreamFault("leaf", kind="stall"))
    assert _blocked(healed, "leaf")
    healed.heal(handle)


# --------------------------------------------------------------------------------------------
# Nothing left behind
# --------------------------------------------------------------------------------------------

_RUNNER = textwrap.dedent("""
    import sys, time
    from simulator.dockerbackend import DockerBackend
    from simulator.swarmbackend import SwarmBackend
    from simulator.topology import parse_topology
    from tests.simulator.test_dockerbackend import SMALL
    backend = {"docker": DockerBackend, "swarm": SwarmBackend}[sys.argv[1]]()
    backend.create(parse_topology(SMALL, "small.yml"))
    print(backend._run, flush=True)
    time.sleep(600)
""")


def _resources(client, run):
    label = {"label": f"mitogen-sim.run={run}"}
    # sparse: no inspect per container, which fails for one removed since the listing
    return (client.containers.list(all=True, filters=label, sparse=True)
            + client.networks.list(filters=label))


@pytest.mark.docker
@pytest.mark.parametrize("backend", ["docker", "swarm"])
def test_a_killed_runner_leaves_nothing_behind(backend):
    """The detached reaper removes the run; on swarm it also leaves a swarm the simulator
    made once no other run on this machine uses it."""
    _require_docker() if backend == "docker" else _require_swarm()
    from simulator.dockerd import engine_client

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.Popen([sys.executable, "-c", _RUNNER, backend], stdout=subprocess.PIPE,
                            cwd=root, env=dict(os.environ, PYTHONPATH=root), text=True)
    client = engine_client()
    try:
        run = proc.stdout.readline().strip()
        assert run, "the runner did not build its tree"
        # 2 containers, 2 networks; on swarm also the runner's gateway container.
        assert len(_resources(client, run)) == (4 if backend == "docker" else 5)
        made = backend == "swarm" and swarm.made_swarm(client)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        deadline = time.monotonic() + 60
        while _resources(client, run) and time.monotonic() < deadline:
            time.sleep(0.2)  # the reaper polls its owner; no event to wait on from here
        assert _resources(client, run) == []
        if made:
            swarm.assert_left_unless_shared(client, run)
        elif backend == "swarm":  # someone else's swarm: never left
            assert client.info()["Swarm"]["LocalNodeState"] == "active"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        client.close()


@pytest.mark.docker
def test_stale_resources_are_swept():
    _require_docker()
    from simulator.dockerd import engine_client
    from simulator.ownership import LABEL_OWNER, LABEL_RUN, sweep_stale

    client = engine_client()
    try:
        dead = subprocess.Popen(["true"])
        dead.wait()
        labels = {LABEL_RUN: "stale-test", LABEL_OWNER: f"{dead.pid}:0"}
        client.networks.create("msim-stale-test", internal=True, labels=labels)
        removed = sweep_stale(client)
        assert "msim-stale-test" in removed
        assert _resources(client, "stale-test") == []
    finally:
        for network in client.networks.list(names=["msim-stale-test"]):
            network.remove()
        client.close()


@pytest.mark.docker
def test_keep_leaves_the_containers_up_and_stops_the_reaper():
    _require_docker()
    import docker

    from simulator.dockerbackend import DockerBackend
    from simulator.ownership import LABEL_RUN, remove_labelled

    backend = DockerBackend()
    client = docker.from_env()
    try:
        backend.create(_small())
        reaper = backend._reaper.process
        run = backend._run
        message = backend.keep()
        assert reaper.poll() is not None  # the reaper will not remove a kept tree
        kept = client.containers.list(filters={"label": f"{LABEL_RUN}={run}"})
        assert len(kept) == 2 and all(c.status == "running" for c in kept)
        assert all(c.name in message for c in kept)
    finally:
        remove_labelled(client, {"label": f"{LABEL_RUN}={backend._run}"})
        client.close()
        backend.destroy()
