"""Child-side helpers for tests/mitogen/test_handlers.py (standard library and mitogen.core
only: children fetch this module)."""

from __future__ import annotations

import threading

import mitogen.core

_got: list = []
_arrived = threading.Condition()


@mitogen.core.takes_router
def open_handler(router=None):
    """A handler, run on this context's broker thread as add_handler() handlers are, that
    unpickles what it gets; a Sender for it that any context may use."""
    def handle(msg):
        try:
            got = ("ok", msg.unpickle())
        except Exception as exc:  # what the test wants to see, not to hide
            got = ("failed", "%s: %s" % (type(exc).__name__, exc))
        with _arrived:
            _got.append(got)
            _arrived.notify_all()

    return mitogen.core.Sender(router.myself(), router.add_handler(handle))


def what_arrived(count, timeout=10.0):
    """The first `count` results, once they are in (or what came within `timeout`)."""
    with _arrived:
        _arrived.wait_for(lambda: len(_got) >= count, timeout)
        return list(_got)


def guard_loaded():
    import sys
    return "mitogen.guard" in sys.modules


def send(sender, values):
    for value in values:
        sender.send(value)
    return True
