"""Latch: strict FIFO hand-off between threads, timeouts, close."""

from __future__ import annotations

import threading
import time

import pytest

import mitogen.core
from mitogen.core import Latch


def wait_for_sleepers(latch: Latch, count: int, timeout: float = 10.0) -> None:
    """Poll (no event exists for it) until `count` threads sleep on `latch`, bounded."""
    deadline = time.monotonic() + timeout
    while len(latch._sleeping) < count:
        assert time.monotonic() < deadline, "threads never went to sleep on the latch"
        threading.Event().wait(0.001)


def test_put_then_get_without_sleeping():
    latch = Latch()
    latch.put(1)
    latch.put(2)
    assert latch.size() == 2
    assert latch.get() == 1
    assert latch.get(block=False) == 2
    assert latch.empty()


def test_timeout_raises_timeout_error():
    with pytest.raises(mitogen.core.TimeoutError):
        Latch().get(timeout=0.01)
    with pytest.raises(TimeoutError):  # also the builtin
        Latch().get(block=False)


def test_close_wakes_sleepers_with_latch_error():
    latch = Latch()
    errors = []
    started = threading.Barrier(4)

    def waiter():
        started.wait()
        try:
            latch.get()
        except mitogen.core.LatchError as e:
            errors.append(e)

    threads = [threading.Thread(target=waiter) for _ in range(3)]
    for t in threads:
        t.start()
    started.wait()
    wait_for_sleepers(latch, 3)
    latch.close()
    for t in threads:
        t.join(5)
    assert len(errors) == 3
    with pytest.raises(mitogen.core.LatchError):
        latch.put(1)


def test_sleepers_receive_items_in_the_order_they_slept():
    latch = Latch()
    got: dict[int, object] = {}
    threads = []
    for n in range(5):
        t = threading.Thread(target=lambda n=n: got.__setitem__(n, latch.get(timeout=10)))
        t.start()
        threads.append(t)
        wait_for_sleepers(latch, n + 1)
    for item in "abcde":
        latch.put(item)
    for t in threads:
        t.join(10)
    assert got == {0: "a", 1: "b", 2: "c", 3: "d", 4: "e"}


def test_many_producers_and_consumers_lose_nothing():
    latch = Latch()
    results = []
    lock = threading.Lock()

    def consume():
        for _ in range(500):
            value = latch.get(timeout=10)
            with lock:
                results.append(value)

    def produce(base):
        for i in range(500):
            latch.put(base + i)

    consumers = [threading.Thread(target=consume) for _ in range(4)]
    producers = [threading.Thread(target=produce, args=(k * 1000,)) for k in range(4)]
    for t in consumers + producers:
        t.start()
    for t in consumers + producers:
        t.join(30)
    assert sorted(results) == sorted(k * 1000 + i for k in range(4) for i in range(500))
    assert latch.empty() and not latch._sleeping and latch._waking == 0


def test_no_stray_wake_bytes_are_left_for_the_next_latch():
    latch = Latch()
    t = threading.Thread(target=lambda: latch.put("x"))
    t.start()
    assert latch.get(timeout=10) == "x"
    t.join()
    with pytest.raises(mitogen.core.TimeoutError):
        Latch().get(timeout=0.05)


def test_a_closed_latch_refuses_empty_and_size():
    latch = Latch()
    latch.put(1)
    assert not latch.empty() and latch.size() == 1
    latch.close()
    with pytest.raises(mitogen.core.LatchError):
        latch.empty()
    with pytest.raises(mitogen.core.LatchError):
        latch.size()
