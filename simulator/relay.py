#!/usr/bin/env python3
"""A user-space link relay that delays, throttles and breaks one byte stream.

This kernel has no netem qdisc, so the topology simulator cannot ask the kernel for latency,
jitter or stream faults on the link between a parent context and a child context. Instead the
link's byte stream is routed through this relay, in one of three shapes:

* ssh ``ProxyCommand``: ``python3 relay.py --connect HOST:PORT`` joins its stdin/stdout to a
  TCP connection (to sshd, usually);
* in front of a local child: ``python3 relay.py --exec -- CMD ARGS...`` runs CMD on pipes of
  its own and sits between our stdin/stdout and the child's (the child's stderr is inherited);
* TCP to TCP: ``python3 relay.py --listen HOST:PORT --connect HOST:PORT`` relays every
  accepted connection to a connection of its own toward the target.

The relay is copied into containers that only have Debian's python3, so it is a single
stdlib-only file that runs on Python 3.9 without the package installed, and it imports
nothing from the rest of the project.

"upstream" is the direction from the side that opened the link (our stdin, or the accepted TCP
client) toward the far side (the child, or the TCP server); "downstream" is the reverse. Each
direction has its own latency, jitter and bandwidth cap, and its own faults.

Design: one thread and one ``selectors`` loop. Every chunk read is queued with a release time
(now + latency +/- jitter, never earlier than the chunk before it, so jitter cannot reorder
bytes) and written once that time has passed and the token bucket allows it. A direction that
waits never blocks the other one, and a queue over ``--max-queue`` bytes stops reading its
source, so a stalled link pushes back instead of growing without bound.

Runtime control: ``--control PATH`` opens a UNIX socket that takes one JSON object per line and
answers each with one JSON line, ``{"ok": true, ...}`` or ``{"ok": false, "error": "..."}``::

    {"set": {"latency": 0.05, "jitter": 0.01, "bandwidth": 1e6, "direction": "both"}}
    {"fault": "stall", "direction": "upstream"}    stop forwarding, keep buffering
    {"fault": "resume"}                            undo stall
    {"fault": "reset"}                             abort now: RST on TCP, close on pipes
    {"fault": "cut_after", "nbytes": 100}          forward exactly 100 more bytes, then reset
    {"fault": "blackhole"}                         drop everything, keep the connection open
    {"heal": true}                                 clear every fault, restore the initial settings
    {"stats": true}                                byte counts per direction, settings, faults

:class:`RelayControl` is a small client for it.
"""

from __future__ import annotations

import argparse
import collections
import errno
import fcntl
import json
import math
import os
import random
import selectors
import signal
import socket
import stat
import struct
import subprocess
import sys
import termios
import time

# Names for annotations only: importing typing (and dataclasses, which imports inspect and
# ast) would take a third of the relay's start, paid once per link of a tree.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

__all__ = [
    "DIRECTIONS",
    "FAULTS",
    "LinkSettings",
    "Options",
    "Relay",
    "RelayControl",
    "RelayControlError",
    "RelayError",
    "RelayUsageError",
    "main",
    "parse_options",
]

# ------------------------------------------------------------------------------- constants

UPSTREAM = "upstream"
DOWNSTREAM = "downstream"
BOTH = "both"
DIRECTIONS = (UPSTREAM, DOWNSTREAM, BOTH)
FAULTS = ("stall", "resume", "reset", "cut_after", "blackhole")
SETTING_NAMES = ("latency", "jitter", "bandwidth")

READ_CHUNK = 256 * 1024
DEFAULT_MAX_QUEUE = 64 * 1024 * 1024
DEFAULT_LINGER = 30.0
DEFAULT_CONNECT_TIMEOUT = 10.0
MAX_SECONDS = 3600.0  # a latency or jitter beyond an hour is a typo, not a test
BURST_SECONDS = 0.05  # a token bucket holds this many seconds' worth of bytes...
MAX_BURST = 1024 * 1024  # ...but never more than this
CUT_FLUSH_TIMEOUT = 1.0  # how long a cut waits for its last bytes to leave the socket
CUT_FLUSH_POLL = 0.005
KILL_GRACE = 2.0  # between SIGTERM and SIGKILL for an --exec child
CHILD_POLL = 0.05  # how often to look for the child's exit where there is no pidfd
MAX_CONTROL_LINE = 64 * 1024
PIPE_SIZE = 1024 * 1024
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

# ---------------------------------------------------------------------------------- errors


class RelayError(Exception):
    """Base class of every error this module raises."""


class RelayUsageError(RelayError):
    """The relay was asked for something that makes no sense: a bad option or request."""


class RelayStartError(RelayError):
    """The relay could not start its link; ``status`` is the exit status to report."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class RelayControlError(RelayError):
    """The control socket could not be reached, or the relay refused a request."""


# -------------------------------------------------------------------------------- settings


class LinkSettings(collections.namedtuple("LinkSettings", "latency jitter bandwidth",
                                           defaults=(0.0, 0.0, None))):
    """How one direction of a link behaves when no fault is active: latency and jitter in
    seconds, bandwidth in bytes per second (None: no cap)."""

    __slots__ = ()
    latency: float
    jitter: float
    bandwidth: Optional[float]

    def as_dict(self) -> Dict[str, Any]:
        return {"latency": self.latency, "jitter": self.jitter, "bandwidth": self.bandwidth}


#: A link direction with no latency, jitter or cap.
NO_SHAPING = LinkSettings()


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _seconds(name: str, value: Any) -> float:
    if not _is_number(value):
        raise RelayUsageError(f"{name} must be a number of seconds, not {value!r}")
    if not math.isfinite(value) or not 0 <= value <= MAX_SECONDS:
        raise RelayUsageError(
            f"{name} must be between 0 and {MAX_SECONDS:g} seconds, not {value!r}")
    return float(value)


def _bandwidth(value: Any) -> Optional[float]:
    """Bytes per second; null or 0 lifts the cap, because "no limit" needs a spelling."""
    if value is None:
        return None
    if not _is_number(value) or not math.isfinite(value) or value < 0:
        raise RelayUsageError(
            f"bandwidth must be a positive number of bytes per second, or 0/null for no cap, "
            f"not {value!r}")
    return float(value) or None


def updated_settings(base: LinkSettings, changes: Dict[str, Any]) -> LinkSettings:
    """Return ``base`` with ``changes`` applied, refusing unknown names and bad values."""
    unknown = sorted(set(changes) - set(SETTING_NAMES))
    if unknown:
        raise RelayUsageError(
            f"unknown setting {unknown[0]!r} (expected some of: {', '.join(SETTING_NAMES)}, "
            f"direction)")
    values: Dict[str, Any] = {}
    if "latency" in changes:
        values["latency"] = _seconds("latency", changes["latency"])
    if "jitter" in changes:
        values["jitter"] = _seconds("jitter", changes["jitter"])
    if "bandwidth" in changes:
        values["bandwidth"] = _bandwidth(changes["bandwidth"])
    return base._replace(**values)


def directions_of(value: Any) -> Tuple[str, ...]:
    """Map a direction name to the directions it covers ("both" covers two)."""
    if not isinstance(value, str) or value not in DIRECTIONS:
        raise RelayUsageError(
            f"direction must be one of {', '.join(DIRECTIONS)}, not {value!r}")
    return (UPSTREAM, DOWNSTREAM) if value == BOTH else (value,)


def parse_address(text: str, option: str) -> Tuple[str, int]:
    """Split HOST:PORT (or [V6ADDR]:PORT) and check the port."""
    host, sep, port_text = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise RelayUsageError(f"bad {option} address {text!r}: expected HOST:PORT")
    return host, int(port_text)


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# --------------------------------------------------------------------------- OS primitives

if TYPE_CHECKING:
    Callback = Callable[[], None]


class Interests:
    """What the loop should wait for on this turn: fd -> [on_readable, on_writable]."""

    def __init__(self) -> None:
        self.handlers: Dict[int, List[Optional[Callback]]] = {}

    def read(self, fd: Optional[int], callback: Callback) -> None:
        if fd is not None:
            self.handlers.setdefault(fd, [None, None])[0] = callback

    def write(self, fd: Optional[int], callback: Callback) -> None:
        if fd is not None:
            self.handlers.setdefault(fd, [None, None])[1] = callback


class Poller:
    """Owns the selector; interests are recomputed every turn and only changes reach the OS.

    Recomputing from state each turn (rather than registering and unregistering as things
    happen) means no code path can forget to stop watching a descriptor. Descriptors that
    epoll refuses (a regular file or /dev/null as stdin) are always ready, so they are kept
    aside and their callbacks run on every turn.
    """

    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._handlers: Dict[int, Tuple[Optional[Callback], Optional[Callback]]] = {}
        self._always_ready: Dict[int, Tuple[Optional[Callback], Optional[Callback]]] = {}

    def update(self, interests: Interests) -> None:
        wanted = interests.handlers
        for fd in [fd for fd in (*self._handlers, *self._always_ready) if fd not in wanted]:
            self.forget(fd)
        for fd, (on_read, on_write) in wanted.items():
            events = (selectors.EVENT_READ if on_read else 0) | (
                selectors.EVENT_WRITE if on_write else 0)
            handlers = (on_read, on_write)
            if fd in self._always_ready:
                self._always_ready[fd] = handlers
                continue
            if fd not in self._handlers:
                try:
                    self._selector.register(fd, events, handlers)
                except PermissionError:
                    self._always_ready[fd] = handlers
                    continue
            elif self._handlers[fd] != handlers:
                self._selector.modify(fd, events, handlers)
            self._handlers[fd] = handlers

    def forget(self, fd: int) -> None:
        """Stop watching ``fd``; must precede closing it, or a reused number gets confused."""
        self._always_ready.pop(fd, None)
        if self._handlers.pop(fd, None) is not None:
            self._selector.unregister(fd)

    def dispatch(self, timeout: Optional[float]) -> None:
        ready = [(fd, selectors.EVENT_READ | selectors.EVENT_WRITE) for fd in self._always_ready]
        events = self._selector.select(0 if ready else timeout)
        ready += [(key.fd, mask) for key, mask in events]
        for fd, mask in ready:
            for bit, index in ((selectors.EVENT_READ, 0), (selectors.EVENT_WRITE, 1)):
                # An earlier callback of this batch may have closed or re-purposed the fd.
                handlers = self._handlers.get(fd) or self._always_ready.get(fd)
                handler = None if handlers is None else handlers[index]
                if mask & bit and handler is not None:
                    handler()

    def close(self) -> None:
        self._selector.close()
        self._handlers.clear()
        self._always_ready.clear()


def _set_nonblocking(fd: int) -> int:
    """Make ``fd`` non-blocking and return its old flags, so they can be put back."""
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
    return flags


class Side:
    """One end of a link: where the relay reads one direction and writes the other."""

    label = "side"
    connecting = False

    def read_fd(self) -> Optional[int]:
        raise NotImplementedError

    def write_fd(self) -> Optional[int]:
        raise NotImplementedError

    def read(self, size: int) -> bytes:
        raise NotImplementedError

    def write(self, data: memoryview) -> int:
        raise NotImplementedError

    def end_read(self) -> None:
        """Nothing more will be read: release what reading needed."""

    def end_write(self) -> None:
        """Deliver EOF to the peer."""
        raise NotImplementedError

    def abort(self) -> None:
        """Break the connection at once, as abruptly as this kind of side allows."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def unsent(self) -> int:
        """Bytes written but not yet taken by the peer (only sockets can tell)."""
        return 0


class SocketSide(Side):
    """A TCP (or UNIX) stream socket: one descriptor both ways, half-close by shutdown()."""

    def __init__(self, poller: Poller, sock: socket.socket, label: str,
                 connecting: bool = False) -> None:
        self._poller = poller
        self._sock: Optional[socket.socket] = sock
        self.label = label
        self.connecting = connecting
        self._reading = True
        self._writing = True
        sock.setblocking(False)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            # Nagle would add its own delay on top of the one we were asked for.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def read_fd(self) -> Optional[int]:
        if self._sock is None or not self._reading or self.connecting:
            return None
        return self._sock.fileno()

    def write_fd(self) -> Optional[int]:
        if self._sock is None or not self._writing:
            return None
        return self._sock.fileno()

    def read(self, size: int) -> bytes:
        assert self._sock is not None
        return self._sock.recv(size)

    def write(self, data: memoryview) -> int:
        assert self._sock is not None
        return self._sock.send(data)

    def end_read(self) -> None:
        self._reading = False

    def end_write(self) -> None:
        self._writing = False
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # the peer is gone already; our read side will say so

    def finish_connect(self) -> Optional[str]:
        """Called when the socket turns writable after a non-blocking connect."""
        assert self._sock is not None
        self.connecting = False
        err = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        return os.strerror(err) if err else None

    def abort(self) -> None:
        if self._sock is None:
            return
        try:
            # Linger on, timeout 0: close() sends RST and drops unsent data.
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        self.close()

    def close(self) -> None:
        if self._sock is None:
            return
        self._poller.forget(self._sock.fileno())
        self._sock.close()
        self._sock = None

    def unsent(self) -> int:
        if self._sock is None:
            return 0
        try:
            raw = fcntl.ioctl(self._sock.fileno(), termios.TIOCOUTQ, struct.pack("i", 0))
        except (OSError, AttributeError):
            return 0
        return int(struct.unpack("i", raw)[0])


class PipeSide(Side):
    """A read descriptor and a write descriptor used as one side: stdin/stdout, or a child's.

    EOF is delivered by closing the write descriptor; if it turns out to be a socket (a
    socketpair given as stdout) it is shut down first, since our stdin may share it.
    """

    def __init__(self, poller: Poller, read_fd: Optional[int], write_fd: Optional[int],
                 label: str) -> None:
        self._poller = poller
        self.label = label
        self._fds: Dict[str, Optional[int]] = {"read": read_fd, "write": write_fd}
        self._saved_flags: Dict[int, int] = {}
        for fd in (read_fd, write_fd):
            if fd is not None:
                self._saved_flags[fd] = _set_nonblocking(fd)

    def read_fd(self) -> Optional[int]:
        return self._fds["read"]

    def write_fd(self) -> Optional[int]:
        return self._fds["write"]

    def read(self, size: int) -> bytes:
        fd = self._fds["read"]
        assert fd is not None
        return os.read(fd, size)

    def write(self, data: memoryview) -> int:
        fd = self._fds["write"]
        assert fd is not None
        return os.write(fd, data)

    def end_read(self) -> None:
        self._close("read")

    def end_write(self) -> None:
        fd = self._fds["write"]
        if fd is not None and stat.S_ISSOCK(os.fstat(fd).st_mode):
            sock = socket.socket(fileno=fd)
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            finally:
                sock.detach()
        self._close("write")

    def abort(self) -> None:
        self.close()

    def close(self) -> None:
        self._close("read")
        self._close("write")

    def _close(self, which: str) -> None:
        fd = self._fds[which]
        if fd is None:
            return
        self._fds[which] = None
        self._poller.forget(fd)
        try:
            # The open file description may be shared with whoever started us.
            fcntl.fcntl(fd, fcntl.F_SETFL, self._saved_flags.pop(fd))
        except OSError:
            pass
        os.close(fd)


class TokenBucket:
    """Bandwidth cap: bytes may leave only as fast as tokens accumulate at ``rate`` per second.

    The bucket holds BURST_SECONDS' worth of tokens, so short messages are not chopped into
    single bytes, while a long transfer still averages out to the rate.
    """

    def __init__(self) -> None:
        self._tokens: Optional[float] = None
        self._stamp = 0.0

    def reset(self) -> None:
        self._tokens = None

    def grant(self, now: float, rate: float, want: int) -> Tuple[int, Optional[float]]:
        """How many of ``want`` bytes may go now; if none, when to ask again."""
        burst = min(max(rate * BURST_SECONDS, 1.0), float(MAX_BURST))
        if self._tokens is None:
            self._tokens = burst
        else:
            self._tokens = min(burst, self._tokens + (now - self._stamp) * rate)
        self._stamp = now
        need = min(float(want), burst)
        if self._tokens < need:
            return 0, now + (need - self._tokens) / rate
        return int(min(float(want), self._tokens)), None

    def consume(self, nbytes: int) -> None:
        if self._tokens is not None:
            self._tokens -= nbytes


# ---------------------------------------------------------------------- flows and links


class Direction:
    """Relay-wide state of one direction, shared by every link so a fault hits them all."""

    def __init__(self, name: str, settings: LinkSettings) -> None:
        self.name = name
        self.initial = settings
        self.settings = settings
        self.stalled = False
        self.blackhole = False
        self.received = 0
        self.forwarded = 0
        self.dropped = 0


class Flow:
    """One direction of one link: chunks wait in a queue until their release time."""

    def __init__(self, link: Link, direction: Direction, src: Side, dst: Side) -> None:
        self.link = link
        self.direction = direction
        self.src = src
        self.dst = dst
        # (release time, data); data None is the EOF, which is delayed like any byte.
        self.queue: Deque[Tuple[float, Optional[memoryview]]] = collections.deque()
        self.queued = 0
        self.last_release = 0.0
        self.src_eof = False
        self.held_eof = False  # an EOF swallowed by a blackhole: TCP would retransmit the FIN
        self.done = False  # EOF delivered to dst
        self.write_blocked = False
        self.cut_budget: Optional[int] = None
        self.bucket = TokenBucket()

    @property
    def finished(self) -> bool:
        return self.done or self.link.closed

    def wants_read(self) -> bool:
        return (self.link.is_open and not self.src_eof and self.src.read_fd() is not None
                and self.queued < self.link.relay.options.max_queue)

    def on_readable(self) -> None:
        if not self.link.is_open or self.src_eof:
            return
        try:
            data = self.src.read(READ_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:  # e.g. ECONNRESET: pass the break on to the other side
            self.link.abort(f"{self.direction.name} read from {self.src.label} failed: {exc}")
            return
        now = time.monotonic()
        if data:
            self.direction.received += len(data)
            if self.direction.blackhole:
                self.direction.dropped += len(data)
            else:
                self._enqueue(now, memoryview(data))
        else:
            self.src_eof = True
            self.src.end_read()
            self.link.on_source_eof(self, now)
            if self.direction.blackhole:
                self.held_eof = True
            else:
                self._enqueue(now, None)
        self.pump(now)

    def on_writable(self) -> None:
        self.write_blocked = False
        self.pump(time.monotonic())

    def _enqueue(self, now: float, data: Optional[memoryview]) -> None:
        settings = self.direction.settings
        delay = settings.latency
        if settings.jitter:
            delay += self.link.relay.rng.uniform(-settings.jitter, settings.jitter)
        # Never before the previous chunk: jitter varies the delay but cannot reorder bytes.
        release = max(now + max(delay, 0.0), self.last_release)
        self.last_release = release
        self.queue.append((release, data))
        if data is not None:
            self.queued += len(data)

    def pump(self, now: float) -> Optional[float]:
        """Write whatever is due; return when something will next be due, if anything is."""
        if (self.done or not self.link.is_open or self.direction.stalled
                or self.write_blocked or self.dst.connecting):
            return None
        while self.queue:
            release, data = self.queue[0]
            if release > now:
                return release
            if data is None:
                self.queue.popleft()
                self.done = True
                self.dst.end_write()
                return None
            size = len(data) if self.cut_budget is None else min(len(data), self.cut_budget)
            rate = self.direction.settings.bandwidth
            if rate:
                size, wake = self.bucket.grant(now, rate, size)
                if wake is not None:
                    return wake
            else:
                self.bucket.reset()
            try:
                sent = self.dst.write(data[:size])
            except (BlockingIOError, InterruptedError):
                self.write_blocked = True
                return None
            except OSError as exc:  # EPIPE, ECONNRESET: the reader is gone
                self.link.abort(f"{self.direction.name} write to {self.dst.label} failed: {exc}")
                return None
            self._account(sent)
            if sent < len(data):
                self.queue[0] = (release, data[sent:])
            else:
                self.queue.popleft()
            if self.cut_budget == 0:
                self.link.start_cut(now)
                return None
            if sent < size:
                self.write_blocked = True
                return None
        return None

    def _account(self, sent: int) -> None:
        self.queued -= sent
        self.direction.forwarded += sent
        self.bucket.consume(sent)
        if self.cut_budget is not None:
            self.cut_budget -= sent

    def drop_queue(self) -> None:
        """A blackhole starts: what is in flight is lost, as on a real partition."""
        for _, data in self.queue:
            if data is None:
                self.held_eof = True
            else:
                self.direction.dropped += len(data)
        self.queue.clear()
        self.queued = 0

    def heal(self, now: float) -> None:
        self.cut_budget = None
        if self.held_eof:
            self.held_eof = False
            self._enqueue(now, None)


class Link:
    """One relayed connection: two flows between a local side and a remote side."""

    def __init__(self, relay: Relay, local: Side, remote: Side, now: float) -> None:
        self.relay = relay
        self.local = local
        self.remote = remote
        self.up = Flow(self, relay.directions[UPSTREAM], local, remote)
        self.down = Flow(self, relay.directions[DOWNSTREAM], remote, local)
        self.state = "open"  # open -> (cutting) -> closed
        self.aborted = False
        self.reason = ""
        self.local_eof_at: Optional[float] = None
        self.cut_deadline = 0.0
        self.connect_deadline = now + relay.options.connect_timeout
        self.connect_error: Optional[str] = None

    @property
    def flows(self) -> Tuple[Flow, Flow]:
        return (self.up, self.down)

    @property
    def is_open(self) -> bool:
        return self.state == "open"

    @property
    def closed(self) -> bool:
        return self.state == "closed"

    def interests(self, interests: Interests) -> None:
        if not self.is_open:
            return
        if self.remote.connecting:
            interests.write(self.remote.write_fd(), self._on_connected)
        for flow in self.flows:
            if flow.wants_read():
                interests.read(flow.src.read_fd(), flow.on_readable)
            if flow.write_blocked:
                interests.write(flow.dst.write_fd(), flow.on_writable)

    def tick(self, now: float) -> Optional[float]:
        """Run the timers: releases, cuts, connect and linger deadlines."""
        if self.state == "cutting":
            return self._tick_cut(now)
        if self.closed:
            return None
        if self.remote.connecting and now >= self.connect_deadline:
            self._fail_connect("timed out")
            return None
        if self.local_eof_at is not None and now >= self.local_eof_at + self._linger():
            self.abort(f"local side closed {self._linger():g} s ago and the link is still busy")
            return None
        deadlines = [flow.pump(now) for flow in self.flows]
        if not self.is_open:
            return self._tick_cut(now) if self.state == "cutting" else None
        if self.up.done and self.down.done:
            self.close()
            return None
        if self.remote.connecting:
            deadlines.append(self.connect_deadline)
        if self.local_eof_at is not None:
            deadlines.append(self.local_eof_at + self._linger())
        return _earliest(deadlines)

    def _linger(self) -> float:
        return self.relay.options.linger

    def on_source_eof(self, flow: Flow, now: float) -> None:
        if flow is self.up and self.local_eof_at is None:
            self.local_eof_at = now

    def _on_connected(self) -> None:
        if not isinstance(self.remote, SocketSide) or not self.remote.connecting:
            return
        error = self.remote.finish_connect()
        if error:
            self._fail_connect(error)

    def _fail_connect(self, error: str) -> None:
        self.connect_error = error
        self.abort(f"cannot connect to {self.relay.target_text()}: {error}")
        self.relay.report(self.reason)

    def start_cut(self, now: float) -> None:
        """cut_after ran out: stop everything, let the last bytes reach the peer, then reset."""
        if self.is_open:
            self.state = "cutting"
            self.cut_deadline = now + CUT_FLUSH_TIMEOUT
            self._tick_cut(now)

    def _tick_cut(self, now: float) -> Optional[float]:
        # An RST discards data the peer has not acknowledged, which would deliver fewer than
        # the promised bytes: wait (briefly) until the kernel has handed them over.
        flushed = self.local.unsent() == 0 and self.remote.unsent() == 0
        if flushed or now >= self.cut_deadline:
            self.abort("cut_after budget used up")
            return None
        return now + CUT_FLUSH_POLL

    def abort(self, reason: str) -> None:
        if self.closed:
            return
        self.state = "closed"
        self.aborted = True
        self.reason = reason
        self.local.abort()
        self.remote.abort()

    def close(self) -> None:
        if self.closed:
            return
        self.state = "closed"
        self.reason = self.reason or "closed"
        self.local.close()
        self.remote.close()


def _earliest(deadlines: List[Optional[float]]) -> Optional[float]:
    present = [d for d in deadlines if d is not None]
    return min(present) if present else None


# ---------------------------------------------------------------------------- the child


def _grow_pipe(fd: int) -> None:
    """Ask for a 1 MiB pipe buffer: fewer, larger reads and writes (Linux only, best effort)."""
    try:
        fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), PIPE_SIZE)
    except OSError:
        pass  # not a pipe, over /proc/sys/fs/pipe-max-size for this user, or not Linux


class Child:
    """The --exec command: spawned on pipes of our own, stopped and reaped by us."""

    def __init__(self, argv: List[str]) -> None:
        stdin_r, stdin_w = os.pipe()
        stdout_r, stdout_w = os.pipe()
        try:
            self.proc = subprocess.Popen(argv, stdin=stdin_r, stdout=stdout_w, close_fds=True)
        except OSError as exc:
            for fd in (stdin_r, stdin_w, stdout_r, stdout_w):
                os.close(fd)
            status = 127 if isinstance(exc, FileNotFoundError) else 126
            raise RelayStartError(f"cannot run {argv[0]!r}: {exc.strerror or exc}",
                                  status) from exc
        os.close(stdin_r)
        os.close(stdout_w)
        for fd in (stdin_w, stdout_r):
            _grow_pipe(fd)
        self.stdin_fd = stdin_w
        self.stdout_fd = stdout_r
        self._stage = "running"
        self._deadline = 0.0
        self.pidfd: Optional[int] = None
        pidfd_open = getattr(os, "pidfd_open", None)
        if pidfd_open is not None:
            try:
                self.pidfd = pidfd_open(self.proc.pid)
            except OSError:  # kernels before 5.3
                self.pidfd = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def exited(self) -> bool:
        return self.proc.poll() is not None

    def interests(self, interests: Interests) -> None:
        if self.pidfd is not None and self.proc.returncode is None:
            interests.read(self.pidfd, self._on_exit)

    def _on_exit(self) -> None:
        self.proc.poll()

    def poll_deadline(self, now: float) -> Optional[float]:
        """Without a pidfd nothing wakes us when the child exits, so look now and then."""
        if self.pidfd is None and self.proc.returncode is None:
            return now + CHILD_POLL
        return None

    def stop(self, now: float, grace: float) -> Optional[float]:
        """Give the child ``grace`` seconds to exit by itself, then TERM, then KILL."""
        if self.exited:
            return None
        if self._stage == "running":
            self._stage, self._deadline = "waiting", now + grace
        if self._stage == "waiting" and now >= self._deadline:
            self.proc.terminate()
            self._stage, self._deadline = "terminated", now + KILL_GRACE
        if self._stage == "terminated" and now >= self._deadline:
            self.proc.kill()
            self._stage, self._deadline = "killed", now + CHILD_POLL
        if self._stage == "killed":
            self._deadline = max(self._deadline, now + CHILD_POLL)
        return _earliest([self._deadline, self.poll_deadline(now)])

    def exit_status(self) -> int:
        code = self.proc.returncode
        if code is None:
            return 1
        return 128 - code if code < 0 else code

    def close(self) -> None:
        """Last resort on the way out: nothing we started may outlive us."""
        if self.proc.poll() is None:
            self.proc.kill()
            try:
                self.proc.wait(timeout=KILL_GRACE)
            except subprocess.TimeoutExpired:
                pass
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None


# ----------------------------------------------------------------------- control protocol


class Controller:
    """Turns one control request (a JSON line) into changes to the relay and an answer."""

    _ALLOWED_KEYS = {
        "set": {"set"},
        "fault": {"fault", "direction", "nbytes"},
        "heal": {"heal"},
        "stats": {"stats"},
    }

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self._verbs: Dict[str, Callable[[Dict[str, Any]], Dict[str, Any]]] = {
            "set": self._set,
            "fault": self._fault,
            "heal": self._heal,
            "stats": self._stats,
        }

    def handle(self, line: bytes) -> Dict[str, Any]:
        try:
            request = json.loads(line)
        except (ValueError, UnicodeDecodeError) as exc:
            return _error(f"request is not valid JSON ({exc}): {_excerpt(line)}")
        if not isinstance(request, dict):
            return _error(f'request must be a JSON object such as {{"stats": true}}, '
                          f"not {_excerpt(line)}")
        verbs = [verb for verb in self._verbs if verb in request]
        if len(verbs) != 1:
            return _error(
                f"request must have exactly one of the keys 'set', 'fault', 'heal', 'stats'; "
                f"got {sorted(request)}")
        extra = sorted(set(request) - self._ALLOWED_KEYS[verbs[0]])
        if extra:
            return _error(f"unexpected key {extra[0]!r} in a {verbs[0]!r} request")
        try:
            answer = self._verbs[verbs[0]](request)
        except RelayUsageError as exc:
            return _error(str(exc))
        return {"ok": True, **answer}

    def _set(self, request: Dict[str, Any]) -> Dict[str, Any]:
        changes = request["set"]
        if not isinstance(changes, dict):
            raise RelayUsageError(
                f'"set" takes an object such as {{"latency": 0.05}}, not {changes!r}')
        changes = dict(changes)
        names = directions_of(changes.pop("direction", BOTH))
        if not changes:
            raise RelayUsageError(f'"set" needs at least one of: {", ".join(SETTING_NAMES)}')
        directions = [self.relay.directions[name] for name in names]
        # Validate everything before changing anything: a request applies whole or not at all.
        new = [updated_settings(direction.settings, changes) for direction in directions]
        for direction, settings in zip(directions, new):
            direction.settings = settings
        return {"settings": self.relay.settings_dict()}

    def _fault(self, request: Dict[str, Any]) -> Dict[str, Any]:
        name = request["fault"]
        if not isinstance(name, str) or name not in FAULTS:
            raise RelayUsageError(f"unknown fault {name!r} (expected one of: {', '.join(FAULTS)})")
        if "nbytes" in request and name != "cut_after":
            raise RelayUsageError(f"fault {name!r} takes no nbytes (only cut_after does)")
        if name == "reset":
            if "direction" in request:
                raise RelayUsageError(
                    "fault 'reset' takes no direction: a reset aborts the whole connection")
            return {"links": self.relay.reset_links()}
        names = directions_of(request.get("direction", BOTH))
        if name == "cut_after":
            if "nbytes" not in request:
                raise RelayUsageError("fault 'cut_after' needs nbytes, the bytes still to forward")
            nbytes = request["nbytes"]
            if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes < 0:
                raise RelayUsageError(
                    f"nbytes must be a whole number of bytes >= 0, not {nbytes!r}")
            return {"links": self.relay.cut_links(names, nbytes)}
        for direction in (self.relay.directions[n] for n in names):
            if name == "stall":
                direction.stalled = True
            elif name == "resume":
                direction.stalled = False
            else:
                direction.blackhole = True
        if name == "blackhole":
            for flow in self.relay.flows(names):
                flow.drop_queue()
        return {"links": len(self.relay.links)}

    def _heal(self, request: Dict[str, Any]) -> Dict[str, Any]:
        if request["heal"] is not True:
            raise RelayUsageError(f'"heal" takes true, not {request["heal"]!r}')
        self.relay.heal()
        return {"settings": self.relay.settings_dict()}

    def _stats(self, request: Dict[str, Any]) -> Dict[str, Any]:
        if request["stats"] is not True:
            raise RelayUsageError(f'"stats" takes true, not {request["stats"]!r}')
        return {"stats": self.relay.stats()}


def _error(message: str) -> Dict[str, Any]:
    return {"ok": False, "error": message}


def _excerpt(line: bytes, limit: int = 80) -> str:
    text = line.decode("utf-8", "replace").strip()
    return repr(text if len(text) <= limit else text[:limit] + "...")


class _ControlConnection:
    """One client of the control socket: lines in, answers out, never blocking the loop."""

    def __init__(self, server: ControlServer, sock: socket.socket) -> None:
        self.server = server
        self.sock: Optional[socket.socket] = sock
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.closing = False
        sock.setblocking(False)

    def interests(self, interests: Interests) -> None:
        if self.sock is None:
            return
        if not self.closing:
            interests.read(self.sock.fileno(), self._on_readable)
        if self.outbuf:
            interests.write(self.sock.fileno(), self._flush)

    def _on_readable(self) -> None:
        if self.sock is None:
            return
        try:
            data = self.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close()
            return
        if not data:
            self.closing = True
        self.inbuf += data
        while b"\n" in self.inbuf:
            line, _, rest = bytes(self.inbuf).partition(b"\n")
            self.inbuf[:] = rest
            if line.strip():
                self._answer(self.server.controller.handle(line))
        if len(self.inbuf) > MAX_CONTROL_LINE:
            self._answer(_error(f"request line longer than {MAX_CONTROL_LINE} bytes"))
            self.inbuf.clear()
            self.closing = True
        self._flush()

    def _answer(self, answer: Dict[str, Any]) -> None:
        self.outbuf += json.dumps(answer, sort_keys=True).encode() + b"\n"

    def _flush(self) -> None:
        if self.sock is None:
            return
        try:
            while self.outbuf:
                sent = self.sock.send(self.outbuf)
                del self.outbuf[:sent]
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close()
            return
        if self.closing:
            self.close()

    def close(self) -> None:
        if self.sock is not None:
            self.server.relay.poller.forget(self.sock.fileno())
            self.sock.close()
            self.sock = None


class ControlServer:
    """The --control UNIX socket; removed again when the relay exits."""

    def __init__(self, relay: Relay, path: str) -> None:
        self.relay = relay
        self.path = path
        self.controller = Controller(relay)
        self.connections: List[_ControlConnection] = []
        self._claim_path()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            sock.listen(16)
        except OSError as exc:
            sock.close()
            raise RelayUsageError(f"cannot create control socket {path!r}: {exc}") from exc
        sock.setblocking(False)
        self.sock: Optional[socket.socket] = sock
        self._inode = os.stat(path).st_ino

    def _claim_path(self) -> None:
        """Replace a stale socket left by a killed relay, but never a live one or a file."""
        try:
            mode = os.lstat(self.path).st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(mode):
            raise RelayUsageError(f"control path {self.path!r} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(self.path)
        except ConnectionRefusedError:
            os.unlink(self.path)
            return
        except OSError as exc:
            raise RelayUsageError(f"cannot use control path {self.path!r}: {exc}") from exc
        finally:
            probe.close()
        raise RelayUsageError(f"control socket {self.path!r} is in use by another process")

    def interests(self, interests: Interests) -> None:
        if self.sock is not None:
            interests.read(self.sock.fileno(), self._on_accept)
        self.connections = [c for c in self.connections if c.sock is not None]
        for connection in self.connections:
            connection.interests(interests)

    def _on_accept(self) -> None:
        if self.sock is None:
            return
        try:
            sock, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:  # EMFILE and friends: say so, keep relaying
            self.relay.report(f"control socket accept failed: {exc}")
            return
        self.connections.append(_ControlConnection(self, sock))

    def close(self) -> None:
        for connection in self.connections:
            connection.close()
        self.connections = []
        if self.sock is None:
            return
        self.relay.poller.forget(self.sock.fileno())
        self.sock.close()
        self.sock = None
        try:
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)
        except OSError:
            pass


# ------------------------------------------------------------------------------ the relay


class Options:
    """Everything the command line decides; see ``parse_options``."""

    def __init__(self, mode: str, command: List[str],
                 connect: Optional[Tuple[str, int]] = None,
                 listen: Optional[Tuple[str, int]] = None,
                 upstream: LinkSettings = NO_SHAPING,
                 downstream: LinkSettings = NO_SHAPING,
                 seed: Optional[int] = None, control: Optional[str] = None,
                 max_queue: int = DEFAULT_MAX_QUEUE, linger: float = DEFAULT_LINGER,
                 connect_timeout: float = DEFAULT_CONNECT_TIMEOUT, once: bool = False) -> None:
        self.mode = mode  # "exec", "connect" (stdio <-> TCP) or "listen" (TCP <-> TCP)
        self.command = command
        self.connect = connect
        self.listen = listen
        self.upstream = upstream
        self.downstream = downstream
        self.seed = seed
        self.control = control
        self.max_queue = max_queue
        self.linger = linger
        self.connect_timeout = connect_timeout
        self.once = once

    def __repr__(self) -> str:
        return "Options(%s)" % ", ".join("%s=%r" % item for item in vars(self).items())


class Relay:
    """The event loop and everything it owns: links, child, listener, control socket."""

    def __init__(self, options: Options) -> None:
        self.options = options
        self.poller = Poller()
        self.rng = random.Random(options.seed)
        self.directions = {
            UPSTREAM: Direction(UPSTREAM, options.upstream),
            DOWNSTREAM: Direction(DOWNSTREAM, options.downstream),
        }
        self.links: List[Link] = []
        self.links_total = 0
        self.listener: Optional[socket.socket] = None
        self.listen_address: Optional[Tuple[str, int]] = None
        self.control: Optional[ControlServer] = None
        self.child: Optional[Child] = None
        self.failure: Optional[str] = None
        self.signalled: Optional[int] = None
        self._stopping = False
        self._wakeup: Optional[Tuple[socket.socket, socket.socket]] = None
        self._old_handlers: Dict[int, Any] = {}

    # -- public surface used by the controller

    def flows(self, names: Tuple[str, ...]) -> List[Flow]:
        return [flow for link in self.links for flow in link.flows
                if flow.direction.name in names]

    def reset_links(self) -> int:
        count = 0
        for link in self.links:
            if not link.closed:
                link.abort("reset requested")
                count += 1
        return count

    def cut_links(self, names: Tuple[str, ...], nbytes: int) -> int:
        now = time.monotonic()
        affected = [link for link in self.links if link.is_open]
        for link in affected:
            for flow in link.flows:
                if flow.direction.name in names:
                    flow.cut_budget = nbytes
            if nbytes == 0:
                link.start_cut(now)
        return len(affected)

    def heal(self) -> None:
        now = time.monotonic()
        for direction in self.directions.values():
            direction.stalled = False
            direction.blackhole = False
            direction.settings = direction.initial
        for link in self.links:
            for flow in link.flows:
                flow.heal(now)

    def settings_dict(self) -> Dict[str, Any]:
        return {name: d.settings.as_dict() for name, d in self.directions.items()}

    def stats(self) -> Dict[str, Any]:
        result: Dict[str, Any] = {
            "mode": self.options.mode,
            "links": {"active": sum(1 for link in self.links if not link.closed),
                      "total": self.links_total},
        }
        for name, direction in self.directions.items():
            flows = self.flows((name,))
            budgets = [f.cut_budget for f in flows if f.cut_budget is not None]
            result[name] = {
                "received": direction.received,
                "forwarded": direction.forwarded,
                "dropped": direction.dropped,
                "queued": sum(f.queued for f in flows),
                "settings": direction.settings.as_dict(),
                "stalled": direction.stalled,
                "blackhole": direction.blackhole,
                "cut_after": min(budgets) if budgets else None,
            }
        if self.child is not None:
            result["child_pid"] = self.child.pid
        if self.listen_address is not None:
            result["listen"] = format_address(*self.listen_address)
        return result

    def target_text(self) -> str:
        if self.options.connect is not None:
            return format_address(*self.options.connect)
        return " ".join(self.options.command)

    def report(self, message: str) -> None:
        """Errors only: on the ProxyCommand path our stderr is the user's terminal."""
        print(f"relay: {message}", file=sys.stderr, flush=True)

    # -- lifecycle

    def handle_signals(self) -> None:
        """Turn SIGTERM/SIGINT/SIGHUP into an orderly stop (ssh sends SIGHUP to its proxy)."""
        reader, writer = socket.socketpair()
        reader.setblocking(False)
        writer.setblocking(False)
        self._wakeup = (reader, writer)
        signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
        for signum in STOP_SIGNALS:
            self._old_handlers[signum] = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.signalled = signum

    def _drain_wakeup(self) -> None:
        if self._wakeup is not None:
            try:
                self._wakeup[0].recv(4096)
            except (BlockingIOError, InterruptedError):
                pass

    def run(self) -> int:
        try:
            self._start()
            while not self._finished():
                now = time.monotonic()
                deadline = self._tick(now)
                if self._finished():
                    break
                self.poller.update(self._interests())
                timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                self.poller.dispatch(timeout)
        except RelayStartError as exc:
            self.report(str(exc))
            return exc.status
        finally:
            self._close()
        return self._exit_status()

    def _start(self) -> None:
        # The control socket first: whoever started us may be waiting to connect to it.
        if self.options.control is not None:
            try:
                self.control = ControlServer(self, self.options.control)
            except RelayUsageError as exc:
                raise RelayStartError(str(exc), 2) from exc
        now = time.monotonic()
        if self.options.mode == "listen":
            self._start_listening()
        elif self.options.mode == "exec":
            self.child = Child(self.options.command)
            remote: Side = PipeSide(self.poller, self.child.stdout_fd, self.child.stdin_fd,
                                    "child")
            self._add_link(self._stdio_side(), remote, now)
        else:
            local = self._stdio_side()
            try:
                remote = self._connect_side()
            except OSError as exc:
                local.close()
                raise RelayStartError(
                    f"cannot connect to {self.target_text()}: {exc.strerror or exc}", 1) from exc
            self._add_link(local, remote, now)

    def _stdio_side(self) -> PipeSide:
        """Take over stdin/stdout; fds 0 and 1 become /dev/null so their numbers stay put."""
        read_fd, write_fd = os.dup(0), os.dup(1)
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 0)
        os.dup2(null, 1)
        os.close(null)
        return PipeSide(self.poller, read_fd, write_fd, "stdio")

    def _connect_side(self) -> SocketSide:
        assert self.options.connect is not None
        host, port = self.options.connect
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setblocking(False)
        err = sock.connect_ex(address)
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            raise OSError(err, os.strerror(err))
        return SocketSide(self.poller, sock, "remote", connecting=err != 0)

    def _start_listening(self) -> None:
        assert self.options.listen is not None
        host, port = self.options.listen
        try:
            info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                      flags=socket.AI_PASSIVE)[0]
            sock = socket.socket(info[0], info[1], info[2])
        except OSError as exc:
            raise RelayStartError(f"cannot listen on {format_address(host, port)}: {exc}",
                                  1) from exc
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(info[4])
            sock.listen(64)
        except OSError as exc:
            sock.close()
            raise RelayStartError(f"cannot listen on {format_address(host, port)}: {exc}",
                                  1) from exc
        sock.setblocking(False)
        self.listener = sock
        bound = sock.getsockname()
        self.listen_address = (bound[0], bound[1])
        # The one line we print: with port 0 this is how the caller learns the port.
        print(f"listening {format_address(*self.listen_address)}", flush=True)

    def _on_accept(self) -> None:
        if self.listener is None:
            return
        try:
            conn, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.report(f"accept failed: {exc}")
            return
        local = SocketSide(self.poller, conn, "client")
        try:
            remote = self._connect_side()
        except OSError as exc:
            self.report(f"cannot connect to {self.target_text()}: {exc.strerror or exc}")
            local.abort()
            return
        self._add_link(local, remote, time.monotonic())
        if self.options.once:
            self._close_listener()

    def _add_link(self, local: Side, remote: Side, now: float) -> None:
        self.links.append(Link(self, local, remote, now))
        self.links_total += 1

    def _close_listener(self) -> None:
        if self.listener is not None:
            self.poller.forget(self.listener.fileno())
            self.listener.close()
            self.listener = None

    def _tick(self, now: float) -> Optional[float]:
        if self.signalled is not None and not self._stopping:
            self._stopping = True
            self._close_listener()
            for link in self.links:
                link.abort(f"stopped by signal {self.signalled}")
        deadlines = [link.tick(now) for link in self.links]
        for link in self.links:
            if link.closed and link.connect_error and self.options.mode == "connect":
                self.failure = link.reason
        self.links = [link for link in self.links if not link.closed]
        if self.child is not None:
            deadlines.append(self._tick_child(now))
        return _earliest(deadlines)

    def _tick_child(self, now: float) -> Optional[float]:
        assert self.child is not None
        link = self.links[0] if self.links else None
        if link is not None and self.child.exited and link.down.finished:
            # The child is gone and all it wrote has been passed on: nobody is left to
            # read what our stdin may still bring.
            link.close()
            self.links = []
            link = None
        if link is None:
            grace = 0.0 if self._stopping else self.options.linger
            return self.child.stop(now, grace)
        return self.child.poll_deadline(now)

    def _interests(self) -> Interests:
        interests = Interests()
        if self._wakeup is not None:
            interests.read(self._wakeup[0].fileno(), self._drain_wakeup)
        if self.control is not None:
            self.control.interests(interests)
        if self.listener is not None:
            interests.read(self.listener.fileno(), self._on_accept)
        for link in self.links:
            link.interests(interests)
        if self.child is not None:
            self.child.interests(interests)
        return interests

    def _finished(self) -> bool:
        mode = self.options.mode
        if mode == "exec":
            return not self.links and (self.child is None or self.child.exited)
        if mode == "connect":
            return not self.links
        if self._stopping:
            return not self.links
        return self.options.once and self.links_total > 0 and not self.links

    def _exit_status(self) -> int:
        if self.child is not None:
            return self.child.exit_status()
        if self.failure is not None:
            return 1
        return 0

    def _close(self) -> None:
        for link in self.links:
            link.abort("relay exiting")
        self.links = []
        self._close_listener()
        if self.control is not None:
            self.control.close()
        if self.child is not None:
            self.child.close()
        if self._wakeup is not None:
            signal.set_wakeup_fd(-1)
            for signum, handler in self._old_handlers.items():
                signal.signal(signum, handler)
            for sock in self._wakeup:
                sock.close()
            self._wakeup = None
        self.poller.close()


# ---------------------------------------------------------------------- control client


class RelayControl:
    """Client for a relay's ``--control`` socket, for the simulator and for tests.

    Connecting retries until ``timeout`` because the relay is usually started a moment
    before; each request then waits at most ``timeout`` for its answer. A refused request
    raises RelayControlError with the relay's own message.
    """

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.path = path
        self.timeout = timeout
        self._buffer = b""
        self._sock: Optional[socket.socket] = self._connect()

    def _connect(self) -> socket.socket:
        deadline = time.monotonic() + self.timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout)
            try:
                sock.connect(self.path)
                return sock
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                sock.close()
                if time.monotonic() >= deadline:
                    raise RelayControlError(
                        f"no relay answered on control socket {self.path!r} within "
                        f"{self.timeout:g} s: {exc.strerror}") from exc
                time.sleep(0.01)
            except OSError as exc:
                sock.close()
                raise RelayControlError(
                    f"cannot connect to control socket {self.path!r}: {exc}") from exc

    def request(self, message: Dict[str, Any]) -> Dict[str, Any]:
        """Send one request, return the relay's answer; raise if it says ``ok: false``."""
        if self._sock is None:
            raise RelayControlError(f"control connection to {self.path!r} is closed")
        line = json.dumps(message).encode() + b"\n"
        try:
            self._sock.sendall(line)
            answer = self._read_line()
        except OSError as exc:
            raise RelayControlError(
                f"control request {message!r} to {self.path!r} failed: {exc}") from exc
        if not answer.get("ok"):
            raise RelayControlError(str(answer.get("error", answer)))
        return answer

    def _read_line(self) -> Dict[str, Any]:
        assert self._sock is not None
        while b"\n" not in self._buffer:
            data = self._sock.recv(65536)
            if not data:
                raise RelayControlError(
                    f"relay closed control socket {self.path!r} without answering "
                    f"(has it exited?)")
            self._buffer += data
        line, _, self._buffer = self._buffer.partition(b"\n")
        try:
            result = json.loads(line)
        except ValueError as exc:
            raise RelayControlError(f"relay sent a malformed answer: {line!r}") from exc
        if not isinstance(result, dict):
            raise RelayControlError(f"relay sent a malformed answer: {line!r}")
        return result

    def set(self, direction: str = BOTH, **settings: Any) -> Dict[str, Any]:
        """Change latency/jitter/bandwidth; returns the settings now in force."""
        return self.request({"set": {**settings, "direction": direction}})["settings"]

    def fault(self, name: str, direction: Optional[str] = None,
              nbytes: Optional[int] = None) -> int:
        """Inject a fault (see FAULTS); returns how many links it touched."""
        message: Dict[str, Any] = {"fault": name}
        if direction is not None:
            message["direction"] = direction
        if nbytes is not None:
            message["nbytes"] = nbytes
        return int(self.request(message)["links"])

    def heal(self) -> None:
        self.request({"heal": True})

    def stats(self) -> Dict[str, Any]:
        return self.request({"stats": True})["stats"]

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> RelayControl:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


# --------------------------------------------------------------------------- command line


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse would exit; we want one error path
        raise RelayUsageError(message)


def _build_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(
        prog="relay.py",
        usage="%(prog)s [options] (--connect HOST:PORT | --listen HOST:PORT --connect HOST:PORT"
              " | --exec -- CMD [ARGS...])",
        description="Relay one byte stream with latency, jitter, a bandwidth cap and faults.")
    parser.add_argument("--connect", metavar="HOST:PORT",
                        help="relay to a TCP connection to HOST:PORT (stdin/stdout, or --listen)")
    parser.add_argument("--listen", metavar="HOST:PORT",
                        help="accept TCP connections and relay each to --connect (port 0: "
                             "any; the address is printed as 'listening HOST:PORT')")
    parser.add_argument("--exec", dest="exec_", action="store_true",
                        help="run the command after '--' and relay stdin/stdout to it")
    parser.add_argument("--latency", type=float, default=0.0, metavar="SECONDS",
                        help="one-way delay per direction")
    parser.add_argument("--jitter", type=float, default=0.0, metavar="SECONDS",
                        help="uniform +/- variation of the delay (bytes are never reordered)")
    parser.add_argument("--bandwidth", type=float, default=None, metavar="BYTES_PER_SECOND",
                        help="cap per direction (default: none)")
    parser.add_argument("--direction", choices=DIRECTIONS, default=BOTH,
                        help="which direction(s) the settings above apply to")
    parser.add_argument("--seed", type=int, default=None, help="seed for the jitter RNG")
    parser.add_argument("--control", metavar="PATH", help="UNIX socket for runtime control")
    parser.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE, metavar="BYTES",
                        help="stop reading a side whose queue holds this much")
    parser.add_argument("--linger", type=float, default=DEFAULT_LINGER, metavar="SECONDS",
                        help="after the local side closes its input, abort a link still busy "
                             "this long later; also the --exec child's time to exit by itself")
    parser.add_argument("--connect-timeout", type=float, default=DEFAULT_CONNECT_TIMEOUT,
                        metavar="SECONDS")
    parser.add_argument("--once", action="store_true",
                        help="with --listen: serve one connection, then exit")
    return parser


def parse_options(argv: List[str]) -> Options:
    """Parse a command line (without the program name); RelayUsageError says what is wrong."""
    args, command = list(argv), []
    if "--" in args:
        split = args.index("--")
        args, command = args[:split], args[split + 1:]
    ns = _build_parser().parse_args(args)
    settings = LinkSettings(
        latency=_seconds("--latency", ns.latency),
        jitter=_seconds("--jitter", ns.jitter),
        bandwidth=_bandwidth(ns.bandwidth))
    names = directions_of(ns.direction)
    if ns.max_queue <= 0:
        raise RelayUsageError(f"--max-queue must be a positive number of bytes, not {ns.max_queue}")
    if not 0 <= ns.linger <= MAX_SECONDS:
        raise RelayUsageError(f"--linger must be between 0 and {MAX_SECONDS:g} seconds")
    if not 0 < ns.connect_timeout <= MAX_SECONDS:
        raise RelayUsageError(f"--connect-timeout must be between 0 and {MAX_SECONDS:g} seconds")
    if command and not ns.exec_:
        raise RelayUsageError("a command after '--' needs --exec")
    if ns.exec_ and not command:
        raise RelayUsageError("--exec needs a command after '--', e.g. --exec -- cat")
    if ns.exec_ and (ns.connect or ns.listen):
        raise RelayUsageError("--exec cannot be combined with --connect or --listen")
    if ns.listen and not ns.connect:
        raise RelayUsageError("--listen needs --connect HOST:PORT, the target to relay to")
    if ns.once and not ns.listen:
        raise RelayUsageError("--once only makes sense with --listen")
    if ns.exec_:
        mode = "exec"
    elif ns.listen:
        mode = "listen"
    elif ns.connect:
        mode = "connect"
    else:
        raise RelayUsageError(
            "nothing to relay: give --connect HOST:PORT, --listen HOST:PORT --connect "
            "HOST:PORT, or --exec -- CMD [ARGS...]")
    return Options(
        mode=mode,
        command=command,
        connect=parse_address(ns.connect, "--connect") if ns.connect else None,
        listen=parse_address(ns.listen, "--listen") if ns.listen else None,
        upstream=settings if UPSTREAM in names else LinkSettings(),
        downstream=settings if DOWNSTREAM in names else LinkSettings(),
        seed=ns.seed,
        control=ns.control,
        max_queue=ns.max_queue,
        linger=ns.linger,
        connect_timeout=ns.connect_timeout,
        once=ns.once,
    )


def main(argv: Optional[List[str]] = None) -> int:
    """Run the relay; the exit status is the child's with --exec, else 0 (1: no connection)."""
    try:
        options = parse_options(sys.argv[1:] if argv is None else argv)
    except RelayUsageError as exc:
        print(f"relay: {exc}\n{_build_parser().format_usage()}", end="", file=sys.stderr)
        return 2
    relay = Relay(options)
    relay.handle_signals()
    return relay.run()


if __name__ == "__main__":
    sys.exit(main())
