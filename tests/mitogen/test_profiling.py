"""profiling=True: a cProfile profile per thread, written where MITOGEN_PROFILE_FMT says."""

from __future__ import annotations

import os
import pstats
import subprocess
import sys
from pathlib import Path

import pytest

import mitogen.master
import mitogen.profiling
from tests.support import funcs
from tests.support.procs import wait_gone

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def profile_fmt(tmp_path, monkeypatch):
    monkeypatch.setenv("MITOGEN_PROFILE_FMT",
                       str(tmp_path / "stats.%(pid)s.%(identity)s.%(now)s.%(ext)s"))
    return tmp_path


def _profiles(directory, pid) -> dict:
    """{identity: {'pstats': path, 'log': path}} of the profiles process `pid` wrote."""
    found: dict = {}
    prefix = "stats.%d." % pid
    for path in directory.glob(prefix + "*"):
        identity, _now, ext = path.name[len(prefix):].rsplit(".", 2)
        found.setdefault(identity, {})[ext] = path
    return found


def _functions(path) -> set:
    return {name for (_, _, name) in pstats.Stats(str(path)).stats}


def test_child_writes_a_profile_per_thread(router, profile_fmt):
    child = router.local(profiling=True)
    pid = child.call(os.getpid)
    assert child.call(funcs.add, 2, 3) == 5
    child.shutdown(wait=True)
    assert wait_gone(pid, 30)  # profiles are written as the child exits
    found = _profiles(profile_fmt, pid)
    if mitogen.profiling.PROCESS_WIDE:  # Python 3.12+: one profiler per process
        assert set(found) == {"all"}
        assert "add" in _functions(found["all"]["pstats"])
        return
    assert set(found) == {"MainThread", "mitogen.broker"}
    for files in found.values():
        assert set(files) == {"pstats", "log"}
    assert "add" in _functions(found["MainThread"]["pstats"])
    assert "_loop_once" in _functions(found["mitogen.broker"]["pstats"])
    assert "cumulative" in found["MainThread"]["log"].read_text()


MASTER = """\
import os, sys
import mitogen.master
mitogen.master.Router.profiling = True
with mitogen.master.Router() as router:
    child = router.local()
    print(os.getpid(), child.call(os.getpid))
"""


def test_router_profiling_profiles_the_masters_broker_and_its_children(profile_fmt):
    """A master whose Router.profiling is set (mitogen.main(profiling=True) sets it)
    profiles its broker thread, and its children by default. In a process of its own: on
    Python 3.12+ the profiler covers the whole process."""
    done = subprocess.run([sys.executable, "-c", MASTER], capture_output=True, text=True,
                          timeout=60, check=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    master_pid, child_pid = map(int, done.stdout.split())
    assert wait_gone(child_pid, 30)
    master = _profiles(profile_fmt, master_pid)
    assert _profiles(profile_fmt, child_pid), "the child was not profiled"
    identity = "all" if mitogen.profiling.PROCESS_WIDE else "mitogen.broker"
    assert set(master) == {identity}
    assert "_loop_once" in _functions(master[identity]["pstats"])
