"""Bounded waits for tests."""

from __future__ import annotations

import time


def wait_for(predicate, timeout=10.0, interval=0.01):
    """Poll `predicate` until it is true or `timeout` passes (a bounded wait for an event
    this process cannot be told about, not a sleep standing in for one)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True
