"""``python -m simulator``: check prints the plans pytest runs; up, status and down behave the
same on both backends, each command its own process, as a person uses them."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import pytest

from simulator.local import LocalBackend
from tests.support import swarm

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[2]
SCHEDULED = """\
version: 1
name: sched
seed: 7
network: {keepalive_interval: 1s, keepalive_count: 2}
defaults:
  accounts: [{name: sim, keys: [runner], password: sim-pw}]
tree:
  top:
    children:
      leaf:
        accounts+: [{name: app, sudo: nopasswd}]
faults:
  own: {seed: 42, interval: 2s, duration: 1s, count: 4, pick: [pause, latency, kill]}
  inherits: {interval: 2s, duration: 1s, count: 4, pick: [pause, latency, kill]}
  held: {interval: 60s, duration: 60s, count: 1, pick: [latency],
         targets: {latency: ["edge:top/leaf"]}}
"""
PRINT_PLANS = """\
from simulator.faults import format_plan

def test_plans(sim):
    for schedule in sim.topology.schedules:
        for line in format_plan(sim.plan(schedule.name)):
            print(f"PLAN {schedule.name}: {line}", flush=True)
"""


def _check_plans(stdout: str) -> Dict[str, List[str]]:
    plans: Dict[str, List[str]] = {}
    current = None
    for line in stdout.splitlines():
        if line.startswith("schedule "):
            current = line.split()[1]
            plans[current] = []
        elif current is not None and line.startswith("  "):
            plans[current].append(line[2:])
    return plans


def _pytest_plans(stdout: str) -> Dict[str, List[str]]:
    plans: Dict[str, List[str]] = {}
    for line in stdout.splitlines():
        if "PLAN " in line:  # the first may follow pytest's progress on the same line
            name, _, step = line[line.index("PLAN ") + len("PLAN "):].partition(": ")
            plans.setdefault(name, []).append(step)
    return plans


@pytest.mark.parametrize("seed", [None, 5], ids=["own-seeds", "seed-given"])
def test_check_prints_the_plans_pytest_runs(pytester: pytest.Pytester, seed):
    """One seed rule: a schedule's own seed wins over the topology's, a seed given on the
    command line over both, in check and in pytest alike."""
    pytester.makefile(".yml", sched=SCHEDULED)
    pytester.makepyfile(test_plans=PRINT_PLANS)
    given = [] if seed is None else ["--seed", str(seed)]
    check = pytester.run(sys.executable, "-m", "simulator", "check", "sched.yml", *given)
    assert check.ret == 0, check.stderr.str()
    expected = ["own (seed 42):", "inherits (seed 7):"] if seed is None else \
        ["own (seed 5):", "inherits (seed 5):"]
    assert [f"{line.split()[1]} {' '.join(line.split()[2:])}" for line in check.outlines
            if line.startswith("schedule ")][:2] == expected
    in_pytest = pytester.runpytest_subprocess(
        "--topology=sched.yml", "-s", "-p", "no:cacheprovider",
        *([] if seed is None else [f"--topology-seed={seed}"]))
    in_pytest.assert_outcomes(passed=1)
    planned = _check_plans(check.stdout.str())
    assert set(planned) == {"own", "inherits", "held"}
    assert _pytest_plans(in_pytest.stdout.str()) == planned
    seeds = "own=42, inherits=7, held=7" if seed is None else "own=5, inherits=5, held=5"
    in_pytest.stdout.fnmatch_lines([f"topology backend: local, seed: {seeds}"])


# --------------------------------------------------------------------------------------------
# up, status and down, each in a process of its own
# --------------------------------------------------------------------------------------------


def _env(tmp_path: Path) -> Dict[str, str]:
    """This test's own state directory, so it sees only its own trees."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    env["MITOGEN_SIM_STATE"] = str(tmp_path / "state")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def _simulator(env: Dict[str, str], *args: str, timeout: float = 180.0
               ) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "simulator", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, check=False)


def _records(tmp_path: Path) -> List[dict]:
    state = tmp_path / "state"
    if not state.is_dir():
        return []
    return [json.loads(path.read_text()) for path in sorted(state.glob("*.json"))]


@pytest.fixture
def up(tmp_path: Path, request) -> Iterator[Tuple[subprocess.Popen, Dict[str, str], str]]:
    """``python -m simulator up sched.yml --schedule held`` running in its own process, up
    and with the held latency fault applied; killed if a test leaves it running."""
    backend = request.param
    if backend == "docker":
        from simulator.dockerbackend import docker_unavailable

        reason = docker_unavailable(["bookworm"])
        if reason:
            pytest.skip(reason)
    elif backend == "swarm":
        from simulator.swarmbackend import swarm_unavailable

        reason = swarm_unavailable(["bookworm"])
        if reason:
            pytest.skip(reason)
    topology = tmp_path / "sched.yml"
    topology.write_text(SCHEDULED)
    env = _env(tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "-m", "simulator", "up", str(topology), "--backend", backend,
         "--schedule", "held"], env=env, cwd=ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        seen = []
        for line in proc.stdout:  # ends at EOF if `up` dies first
            seen.append(line)
            if "applied Latency(" in line:
                break
        else:
            pytest.fail(f"`up` ended before applying its fault: {''.join(seen)}")
        yield proc, env, backend
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        _simulator(env, "down")


@pytest.mark.slow
@pytest.mark.parametrize("up", ["local", pytest.param("docker", marks=pytest.mark.docker),
                                pytest.param("swarm", marks=pytest.mark.docker)],
                         indirect=True)
def test_up_status_down_from_separate_processes(up, tmp_path: Path):
    proc, env, backend = up
    (record,) = _records(tmp_path)
    assert record["backend"] == backend and record["command"] == "up"
    assert record["faults"] and record["faults"][0]["params"]["fault"] == "latency"

    status = _simulator(env, "status")
    assert status.returncode == 0, status.stderr
    text = status.stdout
    assert f"sched: {backend} backend, `up` pid {proc.pid}" in text
    assert "seed own=42, inherits=7, held=7" in text
    for host in record["hosts"]:
        assert f"  {host['id']}: context {host['context_id']}, {host['where']}" in text
    leaf = next(h for h in record["hosts"] if h["id"] == "top/leaf")
    assert f"    as app: context {leaf['accounts']['app']}" in text
    assert "faults applied: Latency(edge='top/leaf'" in text
    made = backend == "swarm" and _in_made_swarm()

    down = _simulator(env, "down")
    assert down.returncode == 0, down.stderr
    assert f"sched ({backend} backend, pid {proc.pid}): down" in down.stdout
    assert proc.wait(timeout=60) == 0
    assert _records(tmp_path) == []
    assert "no topology is running" in _simulator(env, "status").stdout
    _assert_nothing_left(backend, record, made)


def _in_made_swarm() -> bool:
    from simulator.dockerd import engine_client

    client = engine_client()
    try:
        return swarm.made_swarm(client)
    finally:
        client.close()


def _assert_nothing_left(backend: str, record: dict, made_swarm: bool = False) -> None:
    resources = record["resources"]
    if backend == "local":
        assert not os.path.exists(resources["control_dir"])
        pids = [int(h["where"].split()[2]) for h in record["hosts"]]
        assert LocalBackend.wait_gone(pids, 5.0) == []
        return
    from simulator.dockerd import engine_client
    from simulator.ownership import LABEL_RUN

    assert not os.path.exists(resources["keys_dir"])
    client = engine_client()
    try:
        label = {"label": f"{LABEL_RUN}={resources['run']}"}
        assert client.containers.list(all=True, filters=label) == []
        assert client.networks.list(filters=label) == []
        if made_swarm:  # the last run out leaves a swarm the simulator made
            swarm.assert_left_unless_shared(client, resources["run"])
    finally:
        client.close()


@pytest.mark.parametrize("up", ["local"], indirect=True)
def test_down_removes_what_a_killed_up_left(up, tmp_path: Path):
    proc, env, _backend = up
    (record,) = _records(tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    status = _simulator(env, "status")
    assert f"its runner (pid {proc.pid}) is gone" in status.stdout
    down = _simulator(env, "down", "sched")
    assert down.returncode == 0, down.stderr
    assert f"removed {record['resources']['control_dir']}" in down.stdout
    assert _records(tmp_path) == []
    pids = [int(h["where"].split()[2]) for h in record["hosts"]]
    assert LocalBackend.wait_gone(pids, 20.0) == []  # relays end their hosts after linger


def test_down_and_status_with_nothing_running(tmp_path: Path):
    env = _env(tmp_path)
    assert "no topology is running" in _simulator(env, "status").stdout
    down = _simulator(env, "down", "nothing.yml")
    assert down.returncode == 0 and "no topology was running for nothing.yml" in down.stdout


@pytest.mark.slow
@pytest.mark.parametrize("up", [pytest.param("docker", marks=pytest.mark.docker)],
                         indirect=True)
def test_a_killed_docker_runner_leaves_no_private_keys(up, tmp_path: Path):
    """The keys directory of a SIGKILLed runner goes with its reaper (and, if the reaper was
    killed too, with the next run's sweep): private keys never outlive their run."""
    from simulator.ownership import sweep_stale_keys

    proc, env, _backend = up
    (record,) = _records(tmp_path)
    keys = record["resources"]["keys_dir"]
    assert os.path.isdir(keys) and oct(os.stat(keys).st_mode & 0o777) == "0o700"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    deadline = time.monotonic() + 60
    while os.path.exists(keys) and time.monotonic() < deadline:
        time.sleep(0.2)  # the reaper polls its owner every 0.5 s
    assert not os.path.exists(keys)
    assert keys not in sweep_stale_keys()
    assert _simulator(env, "down", "sched").returncode == 0


def test_keys_of_a_dead_run_are_swept_and_a_live_runs_kept():
    from simulator import ownership
    from simulator.state import owner_tag

    dead = ownership.make_keys_dir("sweep-test-dead-%d" % os.getpid(), "1:0")
    live = ownership.make_keys_dir("sweep-test-live-%d" % os.getpid(), owner_tag())
    try:
        removed = ownership.sweep_stale_keys()
        assert dead in removed and not os.path.exists(dead)
        assert live not in removed and os.path.isdir(live)
    finally:
        for path in (dead, live):
            if os.path.isdir(path):
                shutil.rmtree(path)
