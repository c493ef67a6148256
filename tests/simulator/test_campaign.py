"""Fault campaigns on real trees (local backend): a run holds the invariants and records its
history, and a runtime broken on purpose (tests/support/sabotage.py) is reported, shrunk, and
written down with what it takes to replay it.

The runs use a four-host tree with fast keepalives and a three-second load, so that each takes
seconds, not minutes; the long campaigns are `python -m simulator campaign` (README).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import List, Optional

import pytest

import mitogen.core
import simulator.campaign
from simulator import campaign as campaign_module
from simulator.campaign import (
    ENV_TOKEN,
    CampaignError,
    CampaignSettings,
    RunResult,
    execute,
    load_replay,
    picture_events,
    plan_run,
    run_and_report,
    settings_from,
    shrink,
)
from simulator.checker import Violation, check
from simulator.history import History, load_history
from simulator.strategies import PlannedFault
from simulator.timeline import Timeline
from simulator.topology import load_topology
from tests.support import sabotage

TINY = """\
version: 1
name: tiny
seed: 3
network: {keepalive_interval: 0.5s, keepalive_count: 2}
defaults:
  accounts: [{name: sim, keys: [runner], password: sim-pw}]
tree:
  top:
    children:
      mid:
        accounts+: [{name: app, sudo: nopasswd}]
        children:
          left: {}
      right: {}
"""


@pytest.fixture
def tiny(tmp_path):
    path = tmp_path / "tiny.yml"
    path.write_text(TINY)
    return load_topology(str(path))


def _settings(tmp_path, **overrides) -> CampaignSettings:
    fields = dict(seed=5, horizon=3.0, duration=(0.5, 1.5), healthy=5.0, workers=3,
                  hold=(0.05, 0.3), shrink_runs=0, out_dir=str(tmp_path / "campaign"))
    fields.update(overrides)
    return CampaignSettings(**fields)


def _in(host: str, function):
    """A hook that runs ``function`` in ``host``'s own context each time it starts."""
    def hook(context: mitogen.core.Context, host_id: str, account: Optional[str]) -> None:
        if host_id == host and account is None:
            context.call(function)
    return hook


def _kinds(events, kind: str, **match) -> List[dict]:
    return [e for e in events if e.get("kind") == kind
            and all(e.get(k) == v for k, v in match.items())]


# --------------------------------------------------------------------------------------------
# A run as it should be
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_run_under_faults_holds_every_invariant_and_records_its_history(tiny, tmp_path):
    settings = _settings(tmp_path)
    plan = plan_run(settings, 1, tiny).with_steps([
        PlannedFault(0.3, 1.0, "kill", "top/mid/left"),
        PlannedFault(0.6, 1.5, "latency", "top/mid", {"delay": 0.05}),
        PlannedFault(1.0, 1.0, "partition", "top/right", {"mode": "drop"})])
    result = execute(plan, settings, str(tmp_path / "run"))
    assert result.violations == [], "\n".join(v.message for v in result.violations)
    events = result.events
    ended = {e["op"]: e for e in _kinds(events, "op", action="end")}
    started = _kinds(events, "op", action="start")
    assert [e["op"] for e in started if e["op"] not in ended] == []  # every op ended
    types = {e["type"] for e in started if ended[e["op"]]["outcome"] == "ok"}
    assert types == {"call", "hold", "bulk", "nested", "import", "channel"}  # all went through
    assert _kinds(events, "deliver")
    assert [e["fid"] for e in _kinds(events, "fault", action="apply")] == [0, 1, 2]
    assert sorted(e["fid"] for e in _kinds(events, "fault", action="heal")) == [0, 1, 2]
    left = _kinds(events, "build", host="top/mid/left")[0]["context_id"]
    collect = _kinds(events, "campaign", action="collect")[0]
    assert left in collect["dead"]
    # The loss of the first left context, as each hop above it and the master logged it.
    seers = {e["host"] for e in _kinds(events, "del_route", lost=left)}
    assert {"top/mid", "top", None} <= seers
    # After the final heal: every host and account answered.
    finals = [ended[e["op"]]["outcome"] for e in _kinds(events, "op", action="start",
                                                         phase="final")]
    assert finals and set(finals) == {"ok"}
    assert _kinds(events, "shutdown", step="tree_gone")[0]["leftovers"] == []
    assert check(load_history(result.history_path)) == []  # the file says the same


# --------------------------------------------------------------------------------------------
# A runtime broken on purpose
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_misrouted_messages_are_reported_and_shrink_to_no_fault_at_all(tiny, tmp_path):
    """mid keeps messages meant for the contexts below it: the checker sees channel
    messages from top and right to mid's account reach mid itself, and shrinking shows that
    no fault is needed. (Keepalive pings to left are kept too: it is lost with no fault.)"""
    settings = _settings(tmp_path, shrink_runs=1, horizon=6.0)
    plan = plan_run(settings, 1, tiny).with_steps([
        PlannedFault(0.5, 1.0, "latency", "top/mid/left", {"delay": 0.02})])
    first, finding = run_and_report(plan, settings,
                                    hooks=[_in("top/mid", sabotage.keep_messages_for_children)])
    assert finding is not None
    assert "delivery" in {v.invariant for v in first.violations}
    assert any("reached context" in v.message for v in first.violations
               if v.invariant == "delivery")
    assert finding.shrunk.plan.steps == ()
    assert "delivery" in {v.invariant for v in finding.shrunk.violations}
    assert "to 0 fault(s), none at all" in finding.text()


def test_a_picture_that_cannot_be_drawn_does_not_hide_the_finding(tiny, tmp_path,
                                                                  monkeypatch):
    settings = _settings(tmp_path)
    directory = tmp_path / "run"
    directory.mkdir()
    violation = Violation("leftovers", "pid 4242 still runs", 1.0)
    result = RunResult(plan_run(settings, 1, tiny), [], [violation], str(directory), 1.0)

    def cannot_draw(result, path):
        raise CampaignError(f"could not draw {path}: no matplotlib")

    monkeypatch.setattr(simulator.campaign, "picture", cannot_draw)
    finding = simulator.campaign.write_finding(result, result, 0, settings)
    assert finding.paths["picture"].startswith("not drawn: could not draw")
    text = finding.text()
    assert "pid 4242 still runs" in text and "campaign --replay" in text
    assert json.loads((directory / "violations.json").read_text())["original"]


@pytest.mark.slow
def test_a_process_left_by_a_stop_is_reported_with_the_stop_alone(tiny, tmp_path):
    """left starts a process of its own when it is stopped: only the stop in the schedule
    leaves it; the finding says so, with everything needed to replay it."""
    settings = _settings(tmp_path, shrink_runs=3)
    stop = PlannedFault(0.4, 1.0, "stop", "top/mid/left", {"grace": 0.3})
    plan = plan_run(settings, 2, tiny).with_steps([
        stop, PlannedFault(0.2, 1.5, "latency", "top/mid", {"delay": 0.05})])
    first, finding = run_and_report(
        plan, settings, hooks=[_in("top/mid/left", sabotage.leave_a_process_when_stopped)])
    assert finding is not None, first.summary()
    assert [v.invariant for v in first.violations] == ["leftovers"]
    assert "sleep 120" in first.violations[0].message
    assert finding.shrunk.plan.steps == (stop,)
    assert finding.tried == 2  # no fault: passes; the stop alone: fails
    text = finding.text()
    for needed in ("campaign seed 5 run 2", "leftovers: pid", "shrunk in 2 more run(s) to 1",
                   "stop      top/mid/left  grace=0.3", "replay:   python -m simulator "
                   "campaign --replay", finding.paths["history"], finding.paths["picture"]):
        assert needed in text
    # The files: history (JSONL), the picture with the violation marked, the replay.
    assert check(load_history(finding.paths["history"]))[0].invariant == "leftovers"
    with open(finding.paths["picture"], "rb") as stream:
        assert stream.read(8) == b"\x89PNG\r\n\x1a\n"
    assert [e["invariant"] for e in picture_events(finding.shrunk)
            if e["kind"] == "violation"] == ["leftovers"]
    replayed, options = load_replay(finding.paths["schedule"])
    assert replayed.steps == (stop,) and replayed.seed == 5 and replayed.run == 2
    assert [h.id for h in replayed.topology.hosts] == [h.id for h in tiny.hosts]
    assert options["horizon"] == 3.0
    with open(finding.paths["violations"]) as stream:
        assert json.load(stream)["shrunk"][0]["invariant"] == "leftovers"
    # The replay file reproduces it: the same schedule, settings and tree, run again.
    replay = execute(replayed, settings_from(options, seed=replayed.seed),
                     str(tmp_path / "replay"),
                     hooks=[_in("top/mid/left", sabotage.leave_a_process_when_stopped)])
    assert [v.invariant for v in replay.violations] == ["leftovers"]


@pytest.mark.slow
def test_a_lost_del_route_is_reported_as_a_hang_and_a_loss_the_master_never_heard_of(
        tiny, tmp_path):
    settings = _settings(tmp_path)
    plan = plan_run(settings, 3, tiny).with_steps([PlannedFault(0.5, 1.0, "kill",
                                                                "top/mid/left")])
    result = execute(plan, settings, str(tmp_path / "run"),
                     hooks=[_in("top/mid", sabotage.swallow_del_route)])
    found = {v.invariant for v in result.violations}
    assert {"bounded", "del_route"} <= found
    messages = [v.message for v in result.violations if v.invariant == "del_route"]
    assert any("the master never learned that context" in m and "top/mid/left" in m
               for m in messages)
    assert any("hung" in v.message for v in result.violations if v.invariant == "bounded")


# --------------------------------------------------------------------------------------------
# The parts, without a tree
# --------------------------------------------------------------------------------------------


def test_shrinking_keeps_the_smallest_schedule_that_still_fails(tiny, tmp_path, monkeypatch):
    """A fake run fails whenever the schedule holds the kill of left; shrinking finds it."""
    settings = _settings(tmp_path, shrink_runs=10)
    culprit = PlannedFault(2.0, 1.0, "kill", "top/mid/left")
    steps = [PlannedFault(0.1, 1.0, "latency", "top", {"delay": 0.1}), culprit,
             PlannedFault(1.0, 1.0, "pause", "top/right")]
    tried: List[tuple] = []

    def fake_execute(plan, settings, directory, hooks=()):
        tried.append(plan.steps)
        broken = culprit in plan.steps
        return RunResult(plan, [], [Violation("bounded", "hang", 1.0)] if broken else [],
                         directory, 0.0)

    monkeypatch.setattr(campaign_module, "execute", fake_execute)
    first = fake_execute(plan_run(settings, 1, tiny).with_steps(steps), settings,
                         str(tmp_path / "run"))
    best, runs = shrink(first, settings)
    assert best.plan.steps == (culprit,)
    assert tried[1:] == [(), (steps[0],), (culprit,)]  # smallest first; no repeats
    assert runs == 3


def test_shrinking_stops_at_its_budget(tiny, tmp_path, monkeypatch):
    settings = _settings(tmp_path, shrink_runs=2)
    monkeypatch.setattr(campaign_module, "execute", lambda plan, *a, **k: RunResult(
        plan, [], [], "", 0.0))
    steps = [PlannedFault(float(i), 1.0, "kill", "top") for i in range(4)]
    first = RunResult(plan_run(settings, 1, tiny).with_steps(steps), [],
                      [Violation("leftovers", "x", 1.0)], str(tmp_path), 0.0)
    best, runs = shrink(first, settings)
    assert runs == 2 and best is first


def test_a_process_that_carries_the_token_after_shutdown_is_recorded_and_ended(tmp_path):
    token = "t" + os.urandom(8).hex()
    proc = subprocess.Popen(["sleep", "60"], env={**os.environ, ENV_TOKEN: token})
    try:
        with Timeline() as timeline:
            history = History(timeline)
            began = time.monotonic()
            campaign_module._find_leftovers(history, token, bound=0.3)
            assert time.monotonic() - began >= 0.3  # it gave the process its chance to end
            assert [(e["pid"], e["command"]) for e in timeline.events(kinds=["leftover"])] \
                == [(proc.pid, "sleep 60")]
        assert proc.wait(timeout=10) == -9
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_replay_file_that_is_not_one_is_refused_clearly(tmp_path):
    bad = tmp_path / "schedule.json"
    bad.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(campaign_module.CampaignError, match="not a campaign replay file"):
        load_replay(str(bad))
    with pytest.raises(campaign_module.CampaignError, match="cannot read the replay file"):
        load_replay(str(tmp_path / "missing.json"))


def test_the_command_line_refuses_a_fault_kind_the_backend_cannot_apply():
    done = subprocess.run([sys.executable, "-m", "simulator", "campaign", "--kinds",
                           "kill,sshd_down"], capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode != 0
    assert "sshd_down" in done.stderr


# --------------------------------------------------------------------------------------------
# pytest --topology-campaign
# --------------------------------------------------------------------------------------------

pytest_plugins = ["pytester"]


def test_the_campaign_options_are_listed(pytester: pytest.Pytester):
    result = pytester.runpytest("--help")
    result.stdout.fnmatch_lines(["*--topology-campaign=N*", "*--topology-campaign-shape=*",
                                 "*--topology-campaign-shrink=N*",
                                 "*--topology-campaign-replay=SCHEDULE*"])


def test_a_campaign_replaces_the_tests_by_one_item_per_run(pytester: pytest.Pytester):
    pytester.makefile(".yml", tiny=TINY)
    pytester.makepyfile("raise RuntimeError('this test file was imported')\n")
    result = pytester.runpytest("--topology=tiny.yml", "--topology-campaign=3",
                                "--topology-seed=9", "--collect-only", "-q")
    result.stdout.fnmatch_lines(["campaign[[]9-1[]]", "campaign[[]9-2[]]", "campaign[[]9-3[]]"])
    assert result.ret == pytest.ExitCode.OK  # the test file was not even imported
    header = pytester.runpytest("--topology=tiny.yml", "--topology-campaign=2",
                                "--collect-only")
    header.stdout.fnmatch_lines(["topology campaign: 2 run(s) of seed 3 on the tree of tiny*"])


@pytest.mark.parametrize("args, message", [
    (["--topology-campaign=1"], "*give --topology=FILE, or --topology-campaign-shape=random*"),
    (["--topology=tiny.yml", "--topology-campaign=1", "--topology-backend=docker"],
     "*campaigns run on the local backend only*"),
])
def test_a_campaign_it_cannot_run_is_a_usage_error(pytester: pytest.Pytester, args, message):
    pytester.makefile(".yml", tiny=TINY)
    result = pytester.runpytest(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])


def test_random_shapes_need_no_topology_file(pytester: pytest.Pytester):
    result = pytester.runpytest("--topology-campaign=2", "--topology-campaign-shape=random",
                                "--topology-seed=4", "--collect-only", "-q")
    result.stdout.fnmatch_lines(["campaign[[]4-1[]]", "campaign[[]4-2[]]"])
