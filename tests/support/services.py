"""Services and helper functions that the service tests use, in the master and in children.

Children import this module over the wire; it needs only the standard library and mitogen.
"""

from __future__ import annotations

import hashlib
import os
import threading

import mitogen.core
import mitogen.service
from mitogen.service import AllowAny, AllowParents, arg_spec, expose, no_reply


class Greeter(mitogen.service.Service):
    """A service with one method of every kind the decorators declare."""

    def __init__(self, router):
        super().__init__(router)
        self.notes = []

    @expose(policy=AllowParents())
    @arg_spec({"name": str})
    def greet(self, name, punctuation="!"):
        return "hello " + name + punctuation

    @expose(policy=AllowAny())
    def ping(self):
        return "pong"

    @expose(policy=AllowAny())
    def caller(self, msg):
        return msg.src_id, msg.auth_id

    def unexposed(self):
        return "must never run"

    @expose(policy=AllowAny())
    @no_reply()
    def note(self, text):
        self.notes.append(text)
        return "a reply that must not be sent"

    @expose(policy=AllowAny())
    def notes_seen(self):
        return list(self.notes)

    @expose(policy=AllowAny())
    def fail(self, text):
        raise ValueError(text)


class Listening(mitogen.service.Service):
    """Receives plain messages through its select: on_message() runs on a pool thread."""

    def __init__(self, router):
        super().__init__(router)
        self.recv = mitogen.core.Receiver(router)
        self.select.add(self.recv)
        self.seen = mitogen.core.Latch()

    def on_message(self, event):
        self.seen.put((event.data.unpickle(), threading.current_thread().name))

    def on_shutdown(self):
        self.recv.close()
        self.seen.put("shut down")


class ParentsOnly(mitogen.service.Service):
    """A second service, never started by the tests before a sibling asks for it."""

    @expose(policy=AllowAny())
    def ping(self):
        return "pong"


class _Gated(mitogen.service.Service):
    """A service whose calls wait until the test opens the gate, saying when each started.
    Each test calls reset() first: the state is the class's, shared by its instances."""

    started = mitogen.core.Latch()
    opened = threading.Event()

    @classmethod
    def reset(cls):
        cls.started = mitogen.core.Latch()
        cls.opened = threading.Event()

    @classmethod
    def _enter(cls, token):
        cls.started.put(token)
        if not cls.opened.wait(60):
            raise RuntimeError("the test never opened the gate")


class Gate(_Gated):
    """Holds calls until the gate opens."""

    @expose(policy=AllowAny())
    def hold(self, token):
        self._enter(token)
        return token


class Serial(_Gated):
    """Calls run one at a time: the second sees the first finished."""

    invoker_class = mitogen.service.SerializedInvoker
    finished = False

    @expose(policy=AllowAny())
    def hold(self):
        self._enter(True)
        Serial.finished = True
        return "held"

    @expose(policy=AllowAny())
    def was_hold_finished(self):
        return Serial.finished


class _CountingDeduplicatingInvoker(mitogen.service.DeduplicatingInvoker):
    """Says when a call has become a waiter on another call's execution."""

    def invoke(self, method_name, kwargs, msg):
        result = super().invoke(method_name, kwargs, msg)
        Expensive.queued.put(msg)
        return result


class Expensive(_Gated):
    """Identical calls must share one execution: counts executions, waits for the gate."""

    invoker_class = _CountingDeduplicatingInvoker
    executions = 0
    queued = mitogen.core.Latch()

    @classmethod
    def reset(cls):
        super().reset()
        cls.executions = 0
        cls.queued = mitogen.core.Latch()

    @expose(policy=AllowAny())
    @arg_spec({"key": str})
    def compute(self, key):
        Expensive.executions += 1
        self._enter(key)
        return key.upper()


# --- helpers run in children -----------------------------------------------------------------


def call_service(context, service, method, kwargs):
    """From this context, call a service method in `context`; the result, or the CallError
    text as ('error', text)."""
    try:
        return context.call_service(service, method, **kwargs)
    except mitogen.core.CallError as e:
        return "error", str(e)


def loaded(name):
    """Whether this context has imported `name` (importing this module imports
    mitogen.service)."""
    import sys

    return name in sys.modules


class HashSink:
    """A binary file object that only hashes and counts what is written to it."""

    def __init__(self, on_first_write=None):
        self.hash = hashlib.sha256()
        self.size = 0
        self._on_first_write = on_first_write

    def write(self, data):
        if self._on_first_write is not None:
            self._on_first_write()
            self._on_first_write = None
        self.hash.update(data)
        self.size += len(data)


def fetch(context, path):
    """FileService.get() `path` from `context`: (ok, bytes received, sha256, metadata)."""
    sink = HashSink()
    ok, metadata = mitogen.service.FileService.get(context, path, sink)
    return ok, sink.size, sink.hash.hexdigest(), metadata


def fetch_error(context, path):
    """The CallError text FileService.get() raises for `path`, or None."""
    try:
        fetch(context, path)
    except mitogen.core.CallError as e:
        return str(e)
    return None


def _status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no %s in /proc/self/status" % field)


def fetch_measuring_rss(context, path):
    """fetch(), with this process's RSS before and its peak RSS during the transfer."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    before = _status("VmRSS")
    result = fetch(context, path)
    return (*result, before, _status("VmHWM"))


def fetch_and_damage(context, path, damage):
    """fetch(), changing the file after the first chunk arrived: 'truncate' cuts it to
    1 MiB, 'grow' appends to it, 'delete' unlinks it; or 'die': this process is killed."""

    def hurt():
        if damage == "truncate":
            os.truncate(path, 1 << 20)
        elif damage == "grow":
            with open(path, "ab") as f:
                f.write(b"more")
        elif damage == "delete":
            os.unlink(path)
        elif damage == "die":
            os.kill(os.getpid(), 9)
        else:
            raise ValueError(damage)

    sink = HashSink(on_first_write=hurt)
    ok, metadata = mitogen.service.FileService.get(context, path, sink)
    return ok, sink.size, metadata["size"]


def fetch_pausing(context, path, fifo):
    """fetch(), stopping at the first chunk until a byte arrives on the FIFO `fifo` (the
    test opening it for writing knows the transfer is under way)."""

    def pause():
        with open(fifo, "rb") as f:
            f.read(1)

    sink = HashSink(on_first_write=pause)
    ok, metadata = mitogen.service.FileService.get(context, path, sink)
    return ok, sink.size, metadata["size"]


@mitogen.core.takes_router
def pushed_digest(path, router=None):
    """Wait for the file pushed here as `path`; its (size, sha256)."""
    pool = mitogen.service.get_or_create_pool(router=router)
    data = pool.get_service(mitogen.service.PushFileService.name()).get(path)
    return len(data), hashlib.sha256(data).hexdigest()


@mitogen.core.takes_router
def link_bytes(router=None):
    """Bytes sent on each stream to a child ({child id: tx}) and received from the parent."""
    children = {cid: stream.tx_bytes for cid, stream in router.get_streams().items()
                if stream is not router.parent_stream and stream.remote_id == cid} \
        if hasattr(router, "get_streams") else {}
    parent = router.parent_stream.rx_bytes if router.parent_stream is not None else None
    return children, parent


def flood_fetch(context, path, count):
    """Call FileService.fetch `count` times without reading anything (as a hostile context
    might); the number accepted and the first refusal's text."""
    receivers = [mitogen.core.Receiver(context.router) for _ in range(count)]
    accepted, refusal = 0, None
    try:
        for recv in receivers:
            try:
                context.call_service("mitogen.service.FileService", "fetch", path=path,
                                     sender=recv.to_sender())
                accepted += 1
            except mitogen.core.CallError as e:
                refusal = refusal or str(e)
    finally:
        for recv in receivers:
            recv.close()
    return accepted, refusal
