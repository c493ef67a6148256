"""Child-side helpers for tests/mitogen/test_campaign_findings.py (standard library and
mitogen.core only: children fetch this module)."""

from __future__ import annotations

import threading

import mitogen.core

_got = []
_done = threading.Event()


@mitogen.core.takes_router
def open_handler(router=None):
    """A handler, run on this context's broker thread as add_handler() handlers are, that
    unpickles what it gets; a Sender for it that any context may use."""
    def handle(msg):
        try:
            _got.append(("ok", msg.unpickle()))
        except Exception as exc:  # what the test wants to see, not to hide
            _got.append(("failed", "%s: %s" % (type(exc).__name__, exc)))
        _done.set()

    return mitogen.core.Sender(router.myself(), router.add_handler(handle))


def what_arrived(timeout=10.0):
    _done.wait(timeout)
    return list(_got)


def send(sender, value):
    sender.send(value)
    return True
