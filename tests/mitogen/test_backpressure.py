"""Output queues are bounded: a peer that reads slowly, or not at all, cannot grow the master.

A stopped child (SIGSTOP) is a peer that reads nothing. The bound is made small here
(MessageStream.max_queued) so that the tests fill it quickly.
"""

from __future__ import annotations

import os
import signal
import threading

import pytest

import mitogen.core
from tests.support import funcs

QUEUE = 1 << 20
CHUNK = b"x" * (256 << 10)


@pytest.fixture(autouse=True)
def small_queues(monkeypatch):
    monkeypatch.setattr(mitogen.core.MessageStream, "max_queued", QUEUE)


@pytest.fixture
def stopped(router):
    """A child that takes nothing from its stream until the test continues it."""
    child = router.local(name="stopped")
    pid = child.call(os.getpid)
    os.kill(pid, signal.SIGSTOP)
    yield child, pid
    os.kill(pid, signal.SIGCONT)


def test_a_sending_thread_waits_for_room_and_then_everything_arrives(router, stopped):
    child, pid = stopped
    stream = router.get_streams()[child.context_id]
    sent = threading.Event()
    full = threading.Event()

    def flood():
        for _ in range(64):  # 16 MiB: far more than the queue and the socket buffers hold
            if stream.pending_bytes >= QUEUE:
                full.set()
            child.call_no_reply(funcs.length, CHUNK)
        sent.set()

    sender = threading.Thread(target=flood, name="flood")
    sender.start()
    assert full.wait(30)
    assert not sent.is_set()  # it waits: nothing is read
    assert stream.pending_bytes < QUEUE + len(CHUNK) + 4096
    os.kill(pid, signal.SIGCONT)
    assert sent.wait(30)
    sender.join(10)
    assert child.call(funcs.add, 1, 2) == 3  # and the stream still works


def test_the_broker_stops_reading_a_sibling_that_floods_a_full_stream(router):
    victim = router.local(name="victim")
    flooder = router.local(name="flooder")
    inbox = victim.call(funcs.open_receiver)
    pid = victim.call(os.getpid)
    victim_stream = router.get_streams()[victim.context_id]
    flooder_stream = router.get_streams()[flooder.context_id]
    os.kill(pid, signal.SIGSTOP)
    try:
        sender = flooder.call_async(funcs.send_numbered, inbox, 64, len(CHUNK))
        assert _eventually(lambda: flooder_stream.paused is victim_stream)
        assert victim_stream.pending_bytes < QUEUE + len(CHUNK) + 4096
    finally:
        os.kill(pid, signal.SIGCONT)
    assert sender.get(timeout=60).unpickle() == 64
    assert victim.call(funcs.receive_numbered, inbox.dst_handle, 64) == list(range(64))
    assert flooder_stream.paused is None


def test_a_peer_that_drains_nothing_is_disconnected(router, stopped, monkeypatch, caplog):
    monkeypatch.setattr(mitogen.core.MessageStream, "drain_timeout", 0.3)
    child, _ = stopped
    gone = threading.Event()
    mitogen.core.listen(child, "disconnect", gone.set)
    done = threading.Event()

    def flood():
        for _ in range(64):
            child.call_no_reply(funcs.length, CHUNK)
        done.set()

    sender = threading.Thread(target=flood, name="flood")
    sender.start()
    assert gone.wait(30)
    assert done.wait(10)  # the waiting thread is let go, its messages refused
    sender.join(10)
    assert "took none of" in caplog.text


def _eventually(predicate, timeout=30.0):
    done = threading.Event()
    deadline = mitogen.core.now() + timeout
    while not predicate():
        if mitogen.core.now() > deadline:
            return False
        done.wait(0.01)
    return True
