"""The local backend's keepalive monitor and ``heal_all``: after a heal every host runs, even
when the monitor was giving a link up at that moment (found by a fault campaign: seed 11,
run 4 on dc.yml, where a host paused until the final heal was lost just after it)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
import time

import pytest

from simulator import local
from simulator.local import LocalBackend
from simulator.timeline import Timeline
from simulator.topology import load_topology

TREE = """\
version: 1
name: pair
network: {keepalive_interval: 0.5s, keepalive_count: 4}
defaults:
  accounts: [{name: sim, keys: [runner], password: sim-pw}]
tree:
  top:
    children:
      mid:
        children:
          leaf: {}
"""


@pytest.fixture
def backend(tmp_path):
    path = tmp_path / "pair.yml"
    path.write_text(TREE)
    with Timeline() as timeline:
        backend = LocalBackend(timeline)
        backend.create(load_topology(str(path)))
        try:
            yield backend
        finally:
            backend.destroy()


def _answers(backend: LocalBackend, host: str) -> int:
    return backend.context(host).call(os.getpid)


@pytest.mark.slow
def test_a_link_given_up_as_heal_all_runs_is_started_again(backend):
    """The master's broker is busy (a loaded machine) for up to 2 s, so that it learns of
    the lost link only after heal_all has looked at the hosts."""
    before = {host: backend.context(host).context_id for host in ("top/mid", "top/mid/leaf")}
    busy, held = threading.Event(), threading.Event()

    def hold_the_broker() -> None:
        busy.set()
        held.wait(2.0)

    backend.router.broker.defer(hold_the_broker)
    assert busy.wait(10.0)
    try:
        backend.give_up_link("top/mid", 9.9)  # the monitor's verdict, as the heal begins
        backend.heal_all()
    finally:
        held.set()
    for host, old in before.items():
        assert backend.context(host).context_id != old, f"{host} was not started again"
        assert backend.is_up(host)
        assert _answers(backend, host) > 0


@pytest.mark.slow
def test_a_silence_judged_before_heal_all_gives_up_no_link_after_it(backend):
    judged = time.monotonic()
    backend.heal_all()
    before = backend.context("top/mid").context_id
    backend.give_up_link("top/mid", 9.9, decided_at=judged)
    assert backend.context("top/mid").context_id == before
    assert _answers(backend, "top/mid/leaf") > 0
    assert backend.timeline.events(kinds=["keepalive"]) == []


def test_the_sweep_spares_a_dead_run_s_directory_while_its_state_record_is_there(tmp_path):
    """Another run's start must not take from ``down`` what a killed ``up`` left (its
    record's control directory): ``down`` removes it and says so."""
    gone = subprocess.Popen(["true"])
    gone.wait()
    os.makedirs(local._base_dir(), mode=0o700, exist_ok=True)
    control = tempfile.mkdtemp(prefix=f"{gone.pid}-", dir=local._base_dir())
    try:
        with open(os.path.join(control, local._RECORDED), "w") as stream:
            stream.write(str(tmp_path))
        record = tmp_path / f"sched-local-{gone.pid}.json"
        record.write_text("{}")
        assert os.path.basename(control) not in local.sweep_stale_dirs()
        assert os.path.isdir(control)
        record.unlink()
        assert os.path.basename(control) in local.sweep_stale_dirs()
        assert not os.path.exists(control)
    finally:
        shutil.rmtree(control, ignore_errors=True)
