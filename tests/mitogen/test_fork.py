"""router.fork(): children forked by a single-threaded zygote, from a threaded master."""

from __future__ import annotations

import os
import sys
import threading
import time
import types
import warnings

import pytest

import mitogen.fork
import mitogen.master
from tests.support import funcs, remote
from tests.support.procs import wait_gone


def test_fork_from_a_threaded_master(router):
    stop = threading.Event()
    busy = [threading.Thread(target=stop.wait, name="busy-%d" % i) for i in range(4)]
    for t in busy:
        t.start()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # Python 3.12+ warns when a threaded process forks
            started = time.monotonic()
            context = router.fork()
            pid = context.call(os.getpid)
            print("fork + first call: %.1f ms" % (1e3 * (time.monotonic() - started)))
            started = time.monotonic()
            second = router.fork()
            assert second.call(os.getpid) not in (pid, os.getpid())
            print("second fork + first call: %.1f ms" % (1e3 * (time.monotonic() - started)))
        assert context.name == "fork.%d" % pid
        assert context.call(remote.thread_count) == 2  # its main thread and its broker
        assert context.call(os.getppid) == router._fork_zygote.proc.pid
        context.shutdown(wait=True)
        second.shutdown(wait=True)
        assert wait_gone(pid)
    finally:
        stop.set()
        for t in busy:
            t.join()


def test_on_fork_and_on_start_run_in_the_child(router):
    context = router.fork(on_fork=remote.note_fork, on_start=remote.note_start)
    pid = context.call(os.getpid)
    assert context.call(remote.hooks_run) == [("fork", pid), ("start", "ExternalContext")]


def test_hooks_must_be_importable(router):
    with pytest.raises(TypeError, match="on_fork must be a module-level function"):
        router.fork(on_fork=lambda: None)


def test_forked_child_can_start_children(router):
    context = router.fork()
    grandchild = router.fork(via=context)
    assert grandchild.call(os.getppid) != os.getpid()
    assert grandchild.name == "%s.fork.%d" % (context.name, grandchild.call(os.getpid))


def test_zygote_ends_with_its_router():
    with mitogen.master.Router() as router:
        router.fork().call(os.getpid)
        zygote = router._fork_zygote.proc
    assert zygote.returncode == 0


def test_fork_error_class():
    assert issubclass(mitogen.fork.Error, mitogen.core.StreamError)


def test_forked_child_imports_c_extensions_of_the_masters_site_packages(router):
    """PyYAML's C extension, in the master's site-packages, is imported by the child
    itself: the master could not have sent it (it has no Python source)."""
    import yaml

    assert yaml.__with_libyaml__
    context = router.fork()
    with_libyaml, loader, path = context.call(funcs.c_extension_import)
    assert with_libyaml is True and loader == "ExtensionFileLoader"
    assert path == yaml._yaml.__file__


def test_forked_child_has_the_masters_current_path_environment_and_cwd(
        router, tmp_path, monkeypatch):
    (tmp_path / "only_on_a_runtime_path.py").write_text("VALUE = 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("MITOGEN_FORK_TEST", "from the master")
    monkeypatch.chdir(tmp_path)
    context = router.fork()  # the zygote may already exist: what counts is now
    loader, path = context.call(funcs.module_loader_and_file, "only_on_a_runtime_path")
    assert (loader, path) == ("SourceFileLoader", str(tmp_path / "only_on_a_runtime_path.py"))
    assert context.call(funcs.cwd_and_env, "MITOGEN_FORK_TEST") == (
        str(tmp_path), "from the master")


def test_zygote_runs_with_the_masters_interpreter_flags(monkeypatch):
    flags = {"isolated": 0, "ignore_environment": 1, "no_user_site": 1, "no_site": 1}
    monkeypatch.setattr(sys, "flags", types.SimpleNamespace(**flags))
    assert mitogen.fork._interpreter_flags() == ["-E", "-s", "-S"]
    flags.update(isolated=1, no_site=0)
    monkeypatch.setattr(sys, "flags", types.SimpleNamespace(**flags))
    assert mitogen.fork._interpreter_flags() == ["-I"]
