"""The local backend's keepalive monitor and ``heal_all``: after a heal every host runs, even
when the monitor was giving a link up at that moment (found by a fault campaign: seed 11,
run 4 on dc.yml, where a host paused until the final heal was lost just after it)."""

from __future__ import annotations

import os
import threading
import time

import pytest

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
