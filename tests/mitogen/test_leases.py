"""Leases: a thread waiting for a reply reads the stream itself instead of being woken."""

from __future__ import annotations

import logging
import os
import signal
import threading

import pytest

import mitogen.core
import mitogen.master
from tests.support import funcs, packages


def test_a_waiting_caller_delivers_its_own_reply(local, monkeypatch):
    local.call(os.getpid)  # the first reply on a stream always goes through the broker
    delivered_on = []
    real = mitogen.core.Receiver._on_receive

    def record(self, msg):
        delivered_on.append(threading.current_thread().name)
        real(self, msg)

    record.any_thread = True  # type: ignore[attr-defined]
    monkeypatch.setattr(mitogen.core.Receiver, "_on_receive", record)
    for _ in range(20):
        local.call(os.getpid)
    # The first call may find the broker still finishing the read that delivered the warm-up
    # reply (it holds the stream until the read ends), and then no lease is lent; from then
    # on only the waiting caller reads the stream.
    assert delivered_on[1:] == [threading.current_thread().name] * 19


def test_messages_before_a_reply_are_handled_before_it(router, caplog):
    """A log record sent before the reply is in the master's log when the call returns:
    the broker handles it, so the reply read by the caller must wait its turn."""
    caplog.set_level(logging.WARNING)
    child = router.local(name="ordered")
    for n in range(20):
        assert child.call(funcs.warn_and_return, "record %d" % n) == "record %d" % n
        messages = [r.getMessage() for r in caplog.records if r.name == "mitogen.ctx.ordered"]
        assert messages and messages[-1].endswith("record %d" % n), messages


def test_calls_work_without_leases_on_the_poll_poller():
    broker = mitogen.master.Broker(poller_class=mitogen.master.PollPoller)
    with mitogen.master.Router(broker) as router:
        child = router.local()
        assert router.stream_by_id(child.context_id).lease() is None
        pid = child.call(os.getpid)
        assert [child.call(os.getpid) for _ in range(5)] == [pid] * 5


def test_a_lease_holder_sees_its_child_die(router):
    child = router.local()
    pid = child.call(os.getpid)
    recv = child.call_async(funcs.sleep_forever)
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(mitogen.core.ChannelError):
        recv.get(timeout=10)


def test_broker_shutdown_while_a_thread_holds_a_lease(monkeypatch):
    """The stream is closed under a waiting thread: it gets ChannelError, and the descriptor
    it was polling is closed when it lets go (the leak check after the test proves it)."""
    router = mitogen.master.Router()
    child = router.local()
    child.call(funcs.add, 1, 1)  # no module request may keep the broker reading meanwhile
    stream = router.stream_by_id(child.context_id)
    recv = child.call_async(funcs.sleep_forever)
    outcome = []
    leased = threading.Event()
    real_wait = mitogen.core._ThreadWaker.wait

    def wait_and_tell(self, timeout, lease=None):
        if lease is not None:
            leased.set()
        return real_wait(self, timeout, lease)

    monkeypatch.setattr(mitogen.core._ThreadWaker, "wait", wait_and_tell)

    def wait():
        # The broker may be reading the stream this instant (an event it polled before the
        # last lease ended), and then lease() says no: ask until it says yes.
        lease = None
        while lease is None:
            lease = stream.lease()
        try:
            recv.get(timeout=30, lease=lease)
        except mitogen.core.ChannelError as e:
            outcome.append(e)

    waiter = threading.Thread(target=wait)
    waiter.start()
    try:
        assert leased.wait(30)
        assert stream.lent
    finally:
        router.broker.shutdown()
        router.broker.join()
        waiter.join(30)
    assert not waiter.is_alive()
    assert len(outcome) == 1


def test_threads_calling_through_a_hop_while_the_tree_imports(router, package):
    """Leases under contention: eight threads make blocking calls to a grandchild (through
    an intermediate whose main thread leases its parent stream and forwards), while another
    thread makes the grandchild import a 30-module package. Every call gets its own answer."""
    entry, _names, _ = package
    middle = router.local(name="middle")
    leaf = router.local(name="leaf", via=middle)
    leaf.call(funcs.add, 0, 0)
    results: dict[int, list] = {}
    imported = []

    def caller(n: int) -> None:
        results[n] = [leaf.call(funcs.add, n, i) for i in range(50)]

    def importer() -> None:
        imported.append(leaf.call(entry.run))

    threads = [threading.Thread(target=caller, args=(n,)) for n in range(8)]
    threads.append(threading.Thread(target=importer))
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not [t for t in threads if t.is_alive()]
    assert results == {n: [n + i for i in range(50)] for n in range(8)}
    assert imported == [packages.expected_sum()]
