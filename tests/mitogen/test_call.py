"""Function calls into a local child: results, errors, concurrency, big arguments."""

from __future__ import annotations

import logging
import os
import threading

import pytest

import mitogen.core
import mitogen.master
import mitogen.parent
from tests.support import funcs, quiet


def test_call_returns_the_childs_pid(local):
    pid = local.call(os.getpid)
    assert isinstance(pid, int)
    assert pid != os.getpid()
    assert os.path.exists("/proc/%d" % pid)


def test_exception_comes_back_as_call_error_with_remote_traceback(local):
    with pytest.raises(mitogen.core.CallError) as info:
        local.call(funcs.fail, "boom")
    text = str(info.value)
    assert text.startswith("builtins.ValueError: boom")
    assert info.value.type_name == "builtins.ValueError"
    assert "funcs.py" in text and "in fail" in text
    assert 'raise ValueError(message)' in text  # the source line, fetched over the wire


def test_eight_threads_each_get_their_own_results(local):
    results: dict[int, list] = {}

    def worker(n: int) -> None:
        receivers = [local.call_async(funcs.add, n, i) for i in range(100)]
        results[n] = [r.get().unpickle() for r in receivers]

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {n: [n + i for i in range(100)] for n in range(8)}


def test_64_mib_argument_round_trips_intact(local):
    data = os.urandom(64 * 1024 * 1024)
    assert local.call(funcs.identity, data) == data


def test_oversize_message_gets_a_clear_error_and_the_context_keeps_working():
    with mitogen.master.Router(max_message_size=65536) as router:
        child = router.local()
        with pytest.raises(mitogen.core.ChannelError, match="message too large"):
            child.call(funcs.length, b"x" * 131072)
        assert child.call(funcs.length, b"x" * 100) == 100


def test_child_refuses_oversize_reply_and_stays_up():
    with mitogen.master.Router(max_message_size=65536) as router:
        child = router.local()
        with pytest.raises(mitogen.core.ChannelError, match="too large"):
            child.call(os.urandom, 131072)
        assert child.call(funcs.add, 1, 2) == 3


def test_calls_of_classmethods_staticmethods_and_builtins(local):
    assert local.call(funcs.Holder.klass, 1) == ("classmethod", "Holder", 1)
    assert local.call(funcs.Holder.static, 2) == ("staticmethod", 2)
    assert local.call(os.getcwd) == os.getcwd()


def test_lambda_closure_and_bound_method_are_refused_before_sending(local):
    def closure():
        return local

    def nested():
        return 1

    with pytest.raises(TypeError, match="lambda"):
        local.call(lambda: 1)
    with pytest.raises(TypeError, match="closure"):
        local.call(closure)
    with pytest.raises(TypeError, match="instance method"):
        local.call(funcs.Holder().method)
    with pytest.raises(TypeError, match="inside"):
        local.call(nested)


def test_takes_econtext_and_takes_router(local):
    assert local.call(funcs.uses_econtext) == "ExternalContext"
    assert local.call(funcs.uses_router) == "Router"


def test_calls_run_on_the_childs_main_thread(local):
    assert local.call(funcs.thread_name) == "MainThread"


def test_call_no_reply_runs_without_waiting(local, tmp_path):
    path = tmp_path / "out"
    local.call_no_reply(funcs.append_to_file, str(path), "a")
    local.call(funcs.append_to_file, str(path), "b")  # calls run in order
    assert path.read_text() == "ab"


def test_pipelined_call_chain_stops_after_a_failure(local, tmp_path):
    path = tmp_path / "out"
    chain = mitogen.parent.CallChain(local, pipelined=True)
    chain.call_no_reply(funcs.append_to_file, str(path), "1")
    chain.call_no_reply(funcs.fail, "first failure")
    chain.call_no_reply(funcs.append_to_file, str(path), "2")
    with pytest.raises(mitogen.core.CallError, match="first failure"):
        chain.call(funcs.append_to_file, str(path), "3")
    assert path.read_text() == "1"
    chain.reset()
    chain.call(funcs.append_to_file, str(path), "4")
    assert path.read_text() == "14"


def test_print_and_logging_reach_the_master_under_the_context_name(router, caplog):
    caplog.set_level(logging.INFO)  # children copy the master's level when they start
    child = router.local(name="chatty")
    pid = child.call(funcs.print_and_log, "hello there")
    # Log records travel on the same ordered stream as the reply; stdout is read by the
    # child's broker, so wait for the child to finish (shutdown flushes it).
    child.shutdown(wait=True)
    records = [r for r in caplog.records if r.name == "mitogen.ctx.chatty"]
    messages = [r.getMessage() for r in records]
    assert any("child.logger: warned: hello there" in m for m in messages), messages
    assert any(m == "stdout: hello there" for m in messages), messages
    assert pid != os.getpid()


def test_a_child_imports_logging_only_when_something_logs(router, caplog):
    """Logging is a third of a child's start-up imports, so it is left out until used;
    records are still forwarded from the first one on."""
    caplog.set_level(logging.INFO)
    child = router.local(name="late-logger")
    assert child.call(quiet.loaded, "logging") is False
    child.call(funcs.print_and_log, "now")  # its module imports logging, then logs
    assert child.call(quiet.loaded, "logging") is True
    child.shutdown(wait=True)
    messages = [r.getMessage() for r in caplog.records if r.name == "mitogen.ctx.late-logger"]
    assert any("child.logger: warned: now" in m for m in messages), messages


def test_debug_child_logs_the_core_at_debug_level(router):
    child = router.local(debug=True)
    assert child.call(quiet.effective_level, "mitogen") == logging.DEBUG
    quiet_child = router.local()
    assert quiet_child.call(quiet.effective_level, "mitogen") == logging.getLogger().level


def test_argv0_names_the_child(router):
    child = router.local(name="named-worker")
    assert child.call(funcs.argv0).endswith("(mitogen:named-worker)")


def test_child_globals_describe_its_place(router):
    child = router.local()
    ids, my_id = child.call(funcs.parent_ids)
    assert ids == [0]
    assert my_id == child.context_id == 1


def test_channel_carries_messages_both_ways(router, local):
    chan = mitogen.core.Channel(router, local, dst_handle=None)
    result = local.call_async(funcs.channel_doubler, chan.handle)
    chan.dst_handle = chan.get(timeout=30).unpickle()  # the child's end, its first message
    for number in (1, 7, 21):
        chan.send(number)
        assert chan.get(timeout=30).unpickle() == 2 * number
    chan.close()  # the child's `for msg in chan` ends
    assert result.get(timeout=30).unpickle() == 3
