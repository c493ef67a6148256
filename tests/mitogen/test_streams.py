"""What travels besides calls: stdio of child processes, broken peers, the entry points."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
import threading

import mitogen.core
import mitogen.master
from tests.support import funcs


def test_output_of_a_childs_subprocess_reaches_the_master_log(router, caplog):
    caplog.set_level(logging.INFO)
    child = router.local(name="shell")
    assert child.call(funcs.run_shell, "echo from-a-grandchild-process; echo oops >&2") == 0
    child.shutdown(wait=True)
    messages = [r.getMessage() for r in caplog.records if r.name == "mitogen.ctx.shell"]
    assert "stdout: from-a-grandchild-process" in messages
    assert "stderr: oops" in messages


def test_a_corrupt_stream_is_disconnected_with_a_logged_reason(router, caplog):
    bad = router.local(name="bad")
    good = router.local(name="good")
    gone = threading.Event()
    mitogen.core.listen(bad, "disconnect", gone.set)
    bad.call_no_reply(funcs.corrupt_parent_stream)
    assert gone.wait(10)
    assert any("corrupt" in r.getMessage() for r in caplog.records)
    assert good.call(funcs.add, 2, 3) == 5


def test_broker_and_router_are_context_managers():
    with mitogen.master.Broker() as broker:
        router = mitogen.master.Router(broker)
        assert router.local().call(funcs.add, 1, 2) == 3
    assert not broker._thread.is_alive()


def test_mitogen_main_decorator_runs_the_script(tmp_path):
    script = tmp_path / "main_script.py"
    script.write_text(textwrap.dedent("""
        import os
        import mitogen

        def pid():
            return os.getpid()

        @mitogen.main(log_level="WARNING")
        def main(router):
            print("child differs:", router.local().call(pid) != os.getpid())
    """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=60, check=False)
    assert "child differs: True" in out.stdout, out.stderr


def test_broker_timers_fire_in_order_and_a_cancelled_one_lets_go_of_its_function():
    import functools
    import gc
    import weakref

    class Target:
        def method(self):
            raise AssertionError("a cancelled timer fired")

    fired = []
    done = threading.Event()
    broker = mitogen.master.Broker()
    try:
        target = Target()
        ref = weakref.ref(target)
        cancelled = broker.defer_sync(functools.partial(broker.timer, 0.02, target.method))
        broker.defer_sync(lambda: broker.timer(0.01, lambda: fired.append(1)))
        broker.defer_sync(lambda: broker.timer(0.03, lambda: (fired.append(2), done.set())))
        cancelled.cancel()
        del target
        gc.collect()
        # Still in the broker's heap until it is due, but no longer holding its target.
        assert ref() is None
        assert done.wait(10)
        assert fired == [1, 2]
    finally:
        broker.shutdown()
        broker.join()
