"""Small functions the simulator runs *inside* contexts of the tree.

They are imported by children over the wire, so this module uses nothing but the standard
library and :mod:`mitogen.core` (which every context has): importing it costs a child one
small module, where importing :mod:`simulator.local` would drag in PyYAML and the whole model.

Times are ``time.monotonic()`` values. On Linux that clock (CLOCK_MONOTONIC) is shared by every
process of the machine, so on the local backend times taken in different contexts can be
subtracted from one another: that is how DEL_ROUTE propagation is measured hop by hop.
"""

from __future__ import annotations

import collections
import importlib
import os
import time
from typing import Deque, Dict, List, Optional, Tuple

import mitogen.core

__all__ = [
    "SINK_HANDLE",
    "call_into",
    "channel_send",
    "disconnect_times",
    "dropped_count",
    "hold",
    "identity",
    "import_named",
    "install_campaign_probes",
    "install_ping",
    "open_receiver",
    "pids",
    "receive_delays",
    "send_stamps",
    "start_route_trace",
    "take_route_log",
    "take_route_trace",
    "watch_disconnects",
    "whoami",
]

#: context id -> monotonic time at which this context learned that it is gone.
_seen_gone: Dict[int, float] = {}


def pids() -> Tuple[int, int]:
    """This context's pid and its parent's (on the local backend: the link relay's)."""
    return os.getpid(), os.getppid()


def identity(value: object) -> object:
    """A no-op call, for measuring call latency along a path."""
    return value


@mitogen.core.takes_router
def install_ping(router: Optional[mitogen.core.Router] = None) -> int:
    """Answer pings on the broker thread; return the handle to send them to.

    Keepalives must not queue behind user calls on the main thread (a test may keep it busy
    with a long call on purpose), so they are answered by a handler, not by ``call()``.
    """

    def answer(msg: mitogen.core.Message) -> None:
        if not msg.is_dead:
            msg.reply(time.monotonic())

    assert router is not None
    return router.add_handler(answer)


@mitogen.core.takes_router
def watch_disconnects(context_ids: List[int], router: Optional[mitogen.core.Router] = None) -> None:
    """Note the moment this context learns that each of ``context_ids`` is gone.

    An intermediate context fires a context's ``disconnect`` when it drops the route to it
    (its child stream died, or DEL_ROUTE came up from below); a leaf when DEL_ROUTE comes down.
    """
    assert router is not None
    for context_id in context_ids:
        _seen_gone.pop(context_id, None)
        context = router.context_by_id(context_id)
        mitogen.core.listen(context, "disconnect", _make_recorder(context_id))


def _make_recorder(context_id: int):
    def record() -> None:
        _seen_gone.setdefault(context_id, time.monotonic())
    return record


def disconnect_times(context_ids: List[int]) -> Dict[int, float]:
    """The times noted by :func:`watch_disconnects` so far, for ``context_ids``."""
    return {cid: _seen_gone[cid] for cid in context_ids if cid in _seen_gone}


@mitogen.core.takes_router
def start_route_trace(router: Optional[mitogen.core.Router] = None) -> None:
    """Start noting every message this context forwards (see ``Router.route_trace``)."""
    assert router is not None
    router.route_trace = []


@mitogen.core.takes_router
def take_route_trace(router: Optional[mitogen.core.Router] = None) -> List[Tuple[int, ...]]:
    """Stop noting forwarded messages; return what was noted."""
    assert router is not None
    trace = list(router.route_trace or ())
    router.route_trace = None
    return trace


@mitogen.core.takes_router
def dropped_count(router: Optional[mitogen.core.Router] = None) -> int:
    """How many messages this context's router refused (source verification and others)."""
    assert router is not None
    return router.dropped_count


_receivers: Dict[int, mitogen.core.Receiver] = {}


@mitogen.core.takes_router
def open_receiver(router: Optional[mitogen.core.Router] = None) -> mitogen.core.Sender:
    """A receiver here, and a Sender for it that any context may use (siblings may not
    call each other, but they may send to each other)."""
    assert router is not None
    recv = mitogen.core.Receiver(router)
    _receivers[recv.handle] = recv
    return recv.to_sender()


def send_stamps(sender: mitogen.core.Sender, count: int) -> int:
    """Send ``count`` messages, each carrying the moment it was sent."""
    for _ in range(count):
        sender.send(time.monotonic())
    return count


def receive_delays(handle: int, count: int, timeout: float = 10.0) -> List[float]:
    """Receive ``count`` stamps from :func:`send_stamps`; how long each took to arrive.

    Only meaningful where both contexts share the monotonic clock (one machine).
    """
    recv = _receivers.pop(handle)
    try:
        return [time.monotonic() - recv.get(timeout=timeout).unpickle() for _ in range(count)]
    finally:
        recv.close()


# ------------------------------------------------------------------ fault campaigns
# The workload of simulator.campaign: every payload names the context it is meant for, and
# every answer names the context that produced it, so the checker can prove that nothing
# reached a context other than its destination.

#: Every context's channel sink listens on this handle (far above the handles routers hand
#: out), so that a message handled by the wrong context is caught by that context's sink.
SINK_HANDLE = 0x7FFF0000
#: (monotonic time, context id) of every context this context's router forgot: a route
#: deleted because a child stream died or a DEL_ROUTE arrived. Bounded; oldest dropped.
_route_log: Deque[Tuple[float, int]] = collections.deque(maxlen=100_000)


def whoami(token: object, payload: Optional[bytes] = None) -> Tuple[int, object]:
    """This context's id, and the caller's token back (which call this answer is for).
    ``payload`` only makes the call bigger (a frame that spans several reads)."""
    return mitogen.context_id, token


@mitogen.core.takes_router
def call_into(context_id: int, token: object,
              router: Optional[mitogen.core.Router] = None) -> Tuple[Optional[int], object]:
    """Call :func:`whoami` in ``context_id``, a context below this one: a call that starts
    inside the tree, which must fail here as soon as this context loses the path to it.

    A failure comes back as ``(None, {"failed": why, "ran": when})``: ``when`` is the moment
    this context began the call (its main thread may have been busy before, starting a
    child), from which the failure's bound counts."""
    assert router is not None
    ran = time.monotonic()
    try:
        return router.context_by_id(context_id).call(whoami, token)
    except mitogen.core.Error as exc:
        return None, {"failed": f"{type(exc).__name__}: {str(exc).splitlines()[0]}",
                      "ran": ran}


def hold(seconds: float, token: object) -> Tuple[int, object]:
    """A call that stays in flight a while, so that faults find calls to break."""
    time.sleep(min(float(seconds), 10.0))
    return mitogen.context_id, token


def import_named(name: str) -> Tuple[int, object]:
    """Import ``name`` (a module only the master has, so it comes over the tree) and return
    what the module says it is."""
    return mitogen.context_id, importlib.import_module(name).WHO


@mitogen.core.takes_router
def install_campaign_probes(ack: mitogen.core.Sender,
                            router: Optional[mitogen.core.Router] = None
                            ) -> mitogen.core.Sender:
    """Log every route this context forgets, and open a sink for the channel workload:
    each message it gets is acknowledged to ``ack`` (a master's receiver) with the id of
    the context it was meant for, the id it reached and the id it came from. Returns a
    Sender for the sink, which any context may use."""
    assert router is not None
    forget = router._forget_context

    def logged_forget(context_id: int) -> None:
        _route_log.append((time.monotonic(), context_id))
        forget(context_id)

    router._forget_context = logged_forget  # type: ignore[method-assign]

    def sink(msg: mitogen.core.Message) -> None:
        if msg.is_dead:
            return
        body = msg.unpickle()
        ack.send({"op": body.get("op"), "tag": body.get("tag"), "to": body.get("to"),
                  "at": mitogen.context_id, "src": msg.src_id})

    router.add_handler(sink, SINK_HANDLE, overwrite=True)
    return mitogen.core.Sender(router.myself(), SINK_HANDLE)


def take_route_log() -> List[Tuple[float, int]]:
    """Everything :func:`install_campaign_probes` logged so far (and forget it)."""
    entries = list(_route_log)
    _route_log.clear()
    return entries


def channel_send(sink: mitogen.core.Sender, op: int, to: int,
                 count: int) -> Tuple[int, int]:
    """Send ``count`` tagged messages to another context's sink (see
    :func:`install_campaign_probes`); ``to`` is the id they are meant for. Returns this
    context's id and the count."""
    for tag in range(count):
        sink.send({"op": op, "tag": tag, "to": to})
    return mitogen.context_id, count
