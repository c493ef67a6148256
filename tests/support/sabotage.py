"""Deliberately broken behaviour, installed in a child context by a test, to prove that the
fault-campaign checker reports it (tests/simulator/test_campaign.py).

Each function breaks one promise of the runtime in the context that runs it, the way a real
bug would, and nothing else: the campaign must find out from the history alone. Standard
library and mitogen.core only (children fetch this module).
"""

from __future__ import annotations

import os
import signal
import subprocess

import mitogen.core


@mitogen.core.takes_router
def keep_messages_for_children(router=None):
    """Misroute: a message that comes down from the parent for a context below this one is
    handled here whenever this context has a handler of that number (a router that looks
    at the handle before the destination)."""
    route = router._async_route

    def misrouting(msg, in_stream=None):
        if in_stream is not None and in_stream is router.parent_stream and \
                msg.dst_id != mitogen.context_id and (msg.handle or 0) >= 1000 and \
                msg.handle in router._handle_map:
            msg.dst_id = mitogen.context_id
        route(msg, in_stream)

    router._async_route = misrouting


def leave_a_process_when_stopped():
    """On SIGTERM (a graceful stop), start a process in a session of its own, then exit:
    the stop leaves it behind, still carrying the tree's environment."""
    def on_term(signum, frame):
        subprocess.Popen(["sleep", "120"], start_new_session=True, close_fds=True,
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
        os._exit(0)

    signal.signal(signal.SIGTERM, on_term)


def swallow_del_route():
    """Lose every DEL_ROUTE this context should pass up to its parent (patched on the class:
    a context's router becomes a parent router only when its first child starts)."""
    import mitogen.parent

    propagate = mitogen.parent.Router._propagate_up

    def swallowing(self, handle, body):
        if handle != mitogen.core.DEL_ROUTE:
            propagate(self, handle, body)

    mitogen.parent.Router._propagate_up = swallowing
