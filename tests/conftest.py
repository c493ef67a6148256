"""Checks shared by every test: nothing a test starts may outlive it."""

from __future__ import annotations

import gc
import os
import threading

import pytest


def _open_fds() -> dict[int, str]:
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:  # the descriptor listdir itself used, now closed
            pass
    return fds


def _child_pids() -> set[int]:
    me = str(os.getpid())
    pids = set()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[1] == me:
            pids.add(int(name))
    return pids


def _warm_up_thread_state() -> None:
    """Create the main thread's long-lived resources before the first snapshot.

    The latch wake-up socketpair of a thread lives as long as the thread does; for the main
    thread that is the whole session, so it is not a leak of any one test.
    """
    try:
        import mitogen.core
    except ImportError:
        return
    warm = getattr(mitogen.core, "_warm_thread_resources", None)
    if warm is not None:
        warm()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """Where .ci/run has set up Docker and the system components, a test marked as needing
    them may not skip: the skip would hide a broken set-up."""
    outcome = yield
    report = outcome.get_result()
    required = os.environ.get("MITOGEN_REQUIRE_EXTERNAL") == "1"
    if required and report.skipped and any(item.get_closest_marker(name)
                                           for name in ("docker", "system")):
        report.outcome = "failed"
        report.longrepr = "skipped where it must run (MITOGEN_REQUIRE_EXTERNAL=1): %s" % (
            report.longrepr,)


@pytest.fixture(autouse=True)
def no_leaks():
    """Fail a test that leaves a thread, a file descriptor or a child process behind."""
    _warm_up_thread_state()
    threads_before = set(threading.enumerate())
    fds_before = _open_fds()
    children_before = _child_pids()
    yield
    # Threads that are already ending get a moment to finish; anything else is a leak.
    extra_threads = [t for t in threading.enumerate() if t not in threads_before]
    for t in extra_threads:
        t.join(timeout=2.0)
    leaked_threads = [t.name for t in extra_threads if t.is_alive()]
    gc.collect()  # cyclic garbage (exception -> traceback -> frame) is not a leak
    leaked_fds = {fd: path for fd, path in _open_fds().items()
                  if fd not in fds_before or fds_before[fd] != path}
    leaked_children = _child_pids() - children_before
    problems = []
    if leaked_threads:
        problems.append(f"threads left running: {leaked_threads}")
    if leaked_fds:
        problems.append(f"file descriptors left open: {leaked_fds}")
    if leaked_children:
        problems.append(f"child processes left behind: {sorted(leaked_children)}")
    if problems:
        pytest.fail("; ".join(problems), pytrace=False)
