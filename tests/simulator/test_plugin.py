"""The pytest plugin: options, header, usage errors, skips, reports, and cleaning up after a
normal end, a failure, Ctrl-C and a killed pytest."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import pytest

from simulator.local import LocalBackend

pytest_plugins = ["pytester"]

TINY = """\
version: 1
name: tiny
seed: 7
network: {keepalive_interval: 1s, keepalive_count: 2}
tree:
  top:
    link: {latency: 1ms}
    children:
      leaf:
        accounts+:
          - {name: app, sudo: nopasswd}
"""

#: A test that reports the tree's pids on stdout, then does what the outer test asks.
REPORTING_TEST = """\
import json, os, sys, threading
from simulator.faults import Pause

def test_tree(sim, sim_faults):
    pids = sorted(sim.backend.all_pids())
    print("PIDS " + json.dumps(pids), flush=True)
    sys.stdout.flush()
    action = os.environ["SIM_ACTION"]
    if action == "pause-and-block":
        sim_faults.apply(Pause(sim.topology.host("leaf").id))
        print("PAUSED", flush=True)
        threading.Event().wait(60)
    elif action == "block":
        print("BLOCKING", flush=True)
        threading.Event().wait(60)
    else:
        assert sim.context("leaf", "app").call(os.getpid) > 0
        assert action == "pass", "failing on purpose"
"""


@pytest.fixture
def tiny(pytester: pytest.Pytester):
    pytester.makefile(".yml", tiny=TINY)
    return pytester


def test_options_are_listed_in_help(pytester: pytest.Pytester):
    result = pytester.runpytest("--help")
    result.stdout.fnmatch_lines(["*--topology=FILE*", "*--topology-backend=*",
                                 "*--topology-keep*", "*--topology-seed=*",
                                 "*--topology-report=DIR*"])


def test_a_bad_topology_is_a_usage_error_naming_file_and_line(pytester: pytest.Pytester):
    pytester.makefile(".yml", bad="version: 1\ntree:\n  top:\n    link: {latency: 20 parsecs}\n")
    result = pytester.runpytest("--topology=bad.yml")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--topology: bad.yml:4: tree.top.link.latency: *duration*"])


def test_a_missing_topology_file_is_a_usage_error(pytester: pytest.Pytester):
    result = pytester.runpytest("--topology=nowhere.yml")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--topology:*nowhere.yml*"])


def test_header_names_topology_backend_seed_and_images(tiny: pytest.Pytester):
    tiny.makepyfile("def test_nothing():\n    pass\n")
    result = tiny.runpytest("--topology=tiny.yml", "--topology-seed=99")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines([
        "topology: tiny (tiny.yml): 2 hosts, 1 extra accounts, schedules: none",
        "topology backend: local, seed: 99",
        "topology images: none (local backend*",
    ])


def test_without_topology_the_fixtures_skip_with_the_reason(pytester: pytest.Pytester):
    pytester.makepyfile("def test_needs_tree(sim):\n    pass\n")
    result = pytester.runpytest("-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*SKIPPED*no --topology given*"])
    assert "topology:" not in result.stdout.str()


def _run(pytester: pytest.Pytester, action: str, *args: str) -> subprocess.Popen:
    pytester.makepyfile(test_tree=REPORTING_TEST)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    env["SIM_ACTION"] = action  # the inner run is no xdist worker, whatever the outer is
    env["MITOGEN_SIM_STATE"] = str(pytester.path / "state")  # a killed run's record stays
    return subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-s", "-q",
         "--topology=tiny.yml", f"--topology-report={pytester.path / 'report'}", *args],
        cwd=pytester.path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)


def _read_until(proc: subprocess.Popen, prefix: str) -> str:
    assert proc.stdout is not None
    for line in proc.stdout:  # ends at EOF if the inner run dies first
        if line.startswith(prefix):
            return line[len(prefix):].strip()
    raise AssertionError(f"the inner pytest ended before printing {prefix!r}")


def test_a_failing_test_gets_its_timeline_and_the_run_a_report(tiny: pytest.Pytester):
    with _run(tiny, "fail") as proc:
        pids = json.loads(_read_until(proc, "PIDS "))
        rest = proc.stdout.read()
        assert proc.wait(timeout=60) == 1
    assert "simulator timeline (call)" in rest
    assert "failing on purpose" in rest
    report = tiny.path / "report" / "tiny" / "local" / "latest"
    assert report.is_symlink()
    assert f"report:   {report.resolve()}" in rest
    for name in ("timeline.jsonl", "timeline.png", "summary.json", "summary.md"):
        assert (report / name).stat().st_size > 0, name
    title = json.loads((report / "summary.json").read_text())["run"]["title"]
    assert re.fullmatch(r"tiny: local backend, seed 7, \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC",
                        title), title
    lines = (report / "timeline.jsonl").read_text().splitlines()
    kinds = {json.loads(line)["kind"] for line in lines}
    assert {"build", "route", "shutdown", "test"} <= kinds
    assert len(pids) == 5  # two hosts, two relays, one account
    assert LocalBackend.wait_gone(pids, 5.0) == []


@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "killed"])
def test_nothing_is_left_after_an_interrupted_or_killed_run(tiny: pytest.Pytester, how):
    """Even a paused (SIGSTOPped) host goes: on Ctrl-C the fixtures resume and stop it; when
    pytest is killed, the relay in front of it kills it after its linger time."""
    env = dict(os.environ, MITOGEN_SIM_STATE=str(tiny.path / "state"))

    def simulator(command: str) -> str:
        return subprocess.run([sys.executable, "-m", "simulator", command], env=env,
                              capture_output=True, text=True, timeout=60, check=True).stdout

    with _run(tiny, "pause-and-block") as proc:
        pids = json.loads(_read_until(proc, "PIDS "))
        _read_until(proc, "PAUSED")
        status = simulator("status")  # a pytest session's tree is listed as `up`'s are
        assert f"tiny: local backend, `pytest` pid {proc.pid}" in status
        assert "faults applied: Pause(host='top/leaf')" in status
        proc.send_signal(how)
        proc.stdout.read()
        proc.wait(timeout=60)
    # a killed run: the relay lingers 2 s, gives its child 2 s more, then TERM and KILL
    assert LocalBackend.wait_gone(pids, 20.0) == []
    if how == signal.SIGKILL:  # its record stays, saying so, until `down`
        assert f"its runner (pid {proc.pid}) is gone" in simulator("status")
        assert f"tiny (local backend, pid {proc.pid}): down" in simulator("down")
    assert "no topology is running" in simulator("status")


def test_the_command_line_checks_a_file_and_prints_its_plan(tiny: pytest.Pytester):
    result = tiny.run(sys.executable, "-m", "simulator", "check", "tiny.yml")
    assert result.ret == 0
    result.stdout.fnmatch_lines(["tiny: 2 hosts, seed 7", "  top/leaf as app: *sudo:top/leaf:app"])
    bad = tiny.run(sys.executable, "-m", "simulator", "check", "nowhere.yml")
    assert bad.ret != 0
    assert "nowhere.yml" in bad.stderr.str()



def test_runs_and_backends_never_share_a_report_directory(tiny: pytest.Pytester):
    tiny.makepyfile("def test_tree(sim):\n    assert sim.context('leaf')\n")
    runs = []
    for _ in range(2):
        result = tiny.runpytest_subprocess("--topology=tiny.yml", "-p", "no:cacheprovider")
        result.assert_outcomes(passed=1)
        line = next(x for x in result.outlines if x.startswith("report:   "))
        runs.append(line.split(None, 1)[1])
    base = tiny.path / ".sim" / "report" / "tiny" / "local"
    assert runs[0] != runs[1]
    assert {os.path.dirname(run) for run in runs} == {str(base)}
    assert (base / "latest").resolve() == tiny.path.joinpath(runs[1]).resolve()


def test_the_plugin_registers_its_markers_for_strict_projects(pytester: pytest.Pytester):
    """A project outside this repository, strict about markers and warnings, that declares
    nothing: the markers the plugin puts on tests are known."""
    pytester.makeini("[pytest]\naddopts = --strict-markers\nfilterwarnings = error\n")
    pytester.makepyfile("import pytest\n\n@pytest.mark.docker\n@pytest.mark.topology\n"
                        "def test_marked():\n    pass\n")
    # In a process of its own, as that project would run: in this one mitogen is imported
    # already, which filterwarnings=error turns into an error of its own.
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    listed = pytester.runpytest_subprocess("--markers").stdout.str()
    assert "@pytest.mark.docker:" in listed and "@pytest.mark.topology:" in listed
