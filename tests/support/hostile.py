"""A compromised context: functions that tests run in a child to make it write raw, forged
frames on its own streams, upstream to its parent or downstream to its children, bypassing
every check its own router would make. Standard library and mitogen.core only."""

from __future__ import annotations

import os
import pickle
import sys
import threading

import mitogen.core
from mitogen.core import HEADER, Message


def _stream(router, towards):
    """The parent stream for 'up', else the stream to the child context `towards`."""
    if towards == "up":
        return router.parent_stream
    return router._stream_by_id[towards]


@mitogen.core.takes_router
def forge(frames, router=None):
    """Write each frame of `frames`, a list of dicts with the header fields (``dst_id``,
    ``src_id``, ``auth_id``, ``handle``, ``reply_to``, ``enc``), ``data`` (bytes) or
    ``obj`` (pickled) or ``size`` (that many zero bytes, made here), and ``towards`` ('up'
    or a child's ID), exactly as given."""
    for given in frames:
        frame = dict(given)
        stream = _stream(router, frame.pop("towards", "up"))
        obj = frame.pop("obj", None)
        if obj is not None:
            frame["data"] = pickle.dumps(obj, 4)
        if "size" in frame:
            frame["data"] = bytes(frame.pop("size"))
        fields = {"src_id": mitogen.context_id, "auth_id": mitogen.context_id,
                  "reply_to": 0, "enc": mitogen.core.ENC_PKL}
        fields.update(frame)
        stream.send(Message(**fields))
    return len(frames)


@mitogen.core.takes_router
def stall_header(length, router=None, towards="up"):
    """Write a header claiming a `length`-byte body, and nothing after it."""
    stream = _stream(router, towards)
    header = HEADER.pack(mitogen.core.ENC_PKL, 0, mitogen.context_id, mitogen.context_id,
                         1000, 0, length)
    with stream._out_lock:
        os.write(stream.wfd, header)
    return True


def load_module_body(fullname, source):
    """The body of a LOAD_MODULE carrying `source` as plain module `fullname`."""
    import zlib

    return (fullname, None, "/evil/%s.py" % fullname, zlib.compress(source.encode()), [], None)


# --- what the victim reports -----------------------------------------------------------------


@mitogen.core.takes_router
def dropped(router=None):
    return router.dropped_count


@mitogen.core.takes_router
def routes(router=None):
    return sorted(router._stream_by_id)


def imported_from(name):
    """Import `name` and report where its code came from."""
    import importlib

    module = importlib.import_module(name)
    return getattr(module, "__file__", None), getattr(module, "MARK", None)


_flags: dict = {}


@mitogen.core.takes_router
def watch_disconnect(context_id, router=None):
    """Note it if this context is ever told that `context_id` disconnected."""
    event = _flags[context_id] = threading.Event()
    mitogen.core.listen(router.context_by_id(context_id), "disconnect", event.set)
    return True


def was_told_disconnected(context_id):
    return _flags[context_id].is_set()


_gates: dict = {}


@mitogen.core.takes_router
def open_gate(router=None):
    """A receiver to hold a call open until the test sends to it: returns its Sender."""
    recv = mitogen.core.Receiver(router)
    _gates[recv.handle] = recv
    return recv.to_sender()


def wait_at_gate(handle, value):
    """Block until the gate `handle` is sent something, then return `value`."""
    _gates.pop(handle).get(timeout=30).unpickle()
    return value


# --- results that cannot travel --------------------------------------------------------------


class Unreducible:
    def __reduce__(self):
        raise RuntimeError("this object refuses to be pickled")


def unreducible():
    return Unreducible()


def deeply_nested(depth=5000):
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


def pid_and_modules():
    return os.getpid(), sorted(sys.modules)
