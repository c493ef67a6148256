"""The bootstrap: everything a new context needs to start, talk and fetch the rest.

This module's source is sent, minified and compressed, to every new context, and runs there as
the interpreter's main script. It therefore uses the standard library only, has no side effects
at import time (every process-wide change happens inside :meth:`ExternalContext.main`), and
holds nothing that a plain child can do without: code needed only by contexts that start
children of their own lives in :mod:`mitogen.parent`, code needed only by the master in
:mod:`mitogen.master`, and both reach children through the importer defined here.

Sections, each using only what the sections above it define:

1. constants and errors
2. serialization: the restricted unpickler and the types allowed through it
3. the frame codec: bytes in, messages out, no IO
4. thread primitives: Latch, Receiver, Sender, Channel
5. contexts and function calls
6. routing
7. streams and the IO multiplexer (Broker)
8. the importer
9. logging and stdio forwarding
10. the child's entry point (ExternalContext)
"""

# The C modules behind pickle, signal, socket and struct, imported directly: their Python
# wrappers pull in enum, re and functools, about 5 ms of every child's start, for nothing
# the core uses (plain socketpairs, integer signal numbers, the C pickler).
import _pickle
import _signal
import _socket
import _struct
import builtins
import collections
import errno
import fcntl
import heapq
import importlib
import importlib.machinery
import io
import itertools
import marshal
import mmap
import os
import select
import sys
import threading
import time
import types
import zlib

if __name__ == 'mitogen.core':
    import mitogen
else:
    # Running as a child's main script: ExternalContext.main() builds a synthetic package.
    mitogen = None

__all__ = [
    'ADD_ROUTE',
    'ALLOCATE_ID',
    'CALL_FUNCTION',
    'CALL_SERVICE',
    'DEL_ROUTE',
    'DETACHING',
    'FORWARD_LOG',
    'FORWARD_MODULE',
    'GET_MODULE',
    'IS_DEAD',
    'LOAD_MODULE',
    'SHUTDOWN',
    'Blob',
    'Broker',
    'CallError',
    'Channel',
    'ChannelError',
    'Context',
    'CorruptFrameError',
    'Decoder',
    'Error',
    'ExternalContext',
    'Importer',
    'Kwargs',
    'Latch',
    'LatchError',
    'Message',
    'Receiver',
    'Router',
    'Secret',
    'Sender',
    'StreamError',
    'TimeoutError',
    'fire',
    'has_parent_authority',
    'listen',
    'now',
    'takes_econtext',
    'takes_router',
    'unlisten',
]


class _Logger:
    """Stands for ``logging.getLogger(name)`` without importing logging in a child.

    Importing logging (with re, traceback, string and weakref behind it) is about a third of
    a child's start-up imports, and a child that runs without trouble never logs. Until
    something else imports it, a child's records go straight to the master through
    `direct`, which :class:`ExternalContext` sets: importing it here could run on the broker
    thread, which must never wait for an import lock that another thread may hold while it
    waits for the broker.
    """

    #: direct(name, level, text) while a child has not loaded logging; else None.
    direct = None

    def __init__(self, name):
        self._name = name

    def __getattr__(self, attr):
        direct = _Logger.direct
        if direct is None:
            import logging
            return getattr(logging.getLogger(self._name), attr)

        def log(msg, *args, **kwargs):  # the core logs only at DEBUG and ERROR
            if attr == 'exception':
                msg = '%s: %r' % (msg, sys.exc_info()[1])
            direct(self._name, 10 if attr == 'debug' else 40, msg % args if args else msg)
        return log


LOG = _Logger('mitogen')

# ---------------------------------------------------------------------------------------------
# 1. Constants and errors
# ---------------------------------------------------------------------------------------------

GET_MODULE = 100
CALL_FUNCTION = 101
FORWARD_LOG = 102
ADD_ROUTE = 103
DEL_ROUTE = 104
ALLOCATE_ID = 105
SHUTDOWN = 106
LOAD_MODULE = 107
FORWARD_MODULE = 108
DETACHING = 109
CALL_SERVICE = 110
STUB_CALL_SERVICE = 111

#: Answered by every context, to its parents: the keepalive of a silent link.
PING = 99

#: In a message's ``reply_to``: the sender is gone, or the message could not be delivered.
IS_DEAD = 999

_INFO = 20  # logging.INFO, without importing logging

#: Largest single read from a stream. Bigger reads cost more memory than they save syscalls.
CHUNK_SIZE = 131072

#: Longest text a CallError carries: a runaway traceback must not become a huge message.
MAX_CALL_ERROR = 65536

PICKLE_PROTOCOL = 4

#: Sent with GET_MODULE: a parent whose bytecode has the same magic number sends code
#: objects along with the source, so this context need not compile what it imports.
BYTECODE_MAGIC = importlib._bootstrap_external.MAGIC_NUMBER.hex()

now = time.monotonic


class Error(Exception):
    """Base for every error this package raises; the message is %-formatted from the args."""

    def __init__(self, fmt=None, *args):
        if args:
            fmt %= args
        if isinstance(fmt, bytes):
            fmt = fmt.decode('utf-8', 'replace')
        if fmt is None:
            Exception.__init__(self)
        else:
            Exception.__init__(self, str(fmt))


class LatchError(Error):
    """A Latch was closed while, or before, a thread waited on it."""


class StreamError(Error):
    """A stream to another context failed, or sent something that cannot be accepted."""


class CorruptFrameError(StreamError):
    """The peer sent bytes that are not a frame: the stream cannot be trusted any more."""


class ChannelError(Error):
    """The other end of a channel went away, or a message could not be delivered."""

    remote_msg = 'Channel closed by remote end.'
    local_msg = 'Channel closed by local end.'


class TimeoutError(Error, builtins.TimeoutError):
    """A wait ran out of time. Also the built-in TimeoutError, so either may be caught."""


class CallError(Error):
    """A function called in another context raised.

    Carries the remote exception's type name and its traceback as text, never the exception
    object itself: the remote type may not exist here, and unpickling arbitrary types would let
    a compromised context run code in its parent.
    """

    def __init__(self, fmt=None, *args):
        if not isinstance(fmt, BaseException):
            Error.__init__(self, fmt, *args)
            return
        exc = fmt
        cls = type(exc)
        text = '%s.%s: %s' % (cls.__module__, cls.__qualname__, exc)
        tb = exc.__traceback__
        if tb is not None:
            import traceback
            text += '\n' + ''.join(traceback.format_tb(tb))
        if len(text) > MAX_CALL_ERROR:
            text = text[:MAX_CALL_ERROR] + '\n[... truncated]'
        Error.__init__(self, text)

    @property
    def type_name(self):
        """Dotted name of the remote exception's type, e.g. ``builtins.ValueError``."""
        return str(self).split(':', 1)[0]

    def __reduce__(self):
        return (CallError, (str(self),))


# ---------------------------------------------------------------------------------------------
# 2. Serialization
# ---------------------------------------------------------------------------------------------


class Blob(bytes):
    """Bytes that log as their length only: for file contents and other bulk data."""

    def __repr__(self):
        return '[blob: %d bytes]' % len(self)

    def __reduce__(self):
        return (Blob, (bytes(self),))


class Secret(str):
    """A string that never shows in a repr or a log line: for passwords."""

    def __repr__(self):
        return '[secret]'

    def __reduce__(self):
        return (Secret, (str(self),))


class Kwargs(dict):
    """Keyword arguments of a call; a plain dict that is allowed through the unpickler."""

    def __repr__(self):
        return 'Kwargs(%s)' % dict.__repr__(self)

    def __reduce__(self):
        return (Kwargs, (dict(self),))


class _Reader:
    """A read-only file over a message body. Unlike io.BytesIO it never copies the body
    first, and a large bytes object inside the pickle is filled by one readinto()."""

    def __init__(self, data):
        self._view = memoryview(data)
        self._pos = 0

    def read(self, n=-1):
        start = self._pos
        end = len(self._view) if n < 0 else min(len(self._view), start + n)
        self._pos = end
        return self._view[start:end].tobytes()

    def readinto(self, buf):
        n = min(len(buf), len(self._view) - self._pos)
        buf[:n] = self._view[self._pos:self._pos + n]
        self._pos += n
        return n

    def readline(self):
        view = self._view
        end = bytes(view[self._pos:]).find(b'\n')
        return self.read(-1 if end < 0 else end + 1)


class _Unpickler(_pickle.Unpickler):
    """Rebuilds only plain built-in types and this module's own message types.

    Anything else names a global that would be imported and called: refusing it here, before
    it is looked up, is what keeps a compromised context from running code in its peers. The
    constructors it does allow take only the exact built-in type a real pickle of them holds
    (``Blob(10**9)`` would make a gigabyte from a few bytes), and an argument bigger than a
    few dozen bytes is taken once (a memoised megabyte named twice would be copied twice).
    Pickles from contexts without parent authority are checked opcode by opcode before this
    runs (see :mod:`mitogen.guard`).
    """

    def __init__(self, data, router):
        # BytesIO shares a bytes object's buffer; a big body is a bytearray or a mapping,
        # which it would copy.
        reader = io.BytesIO(data) if isinstance(data, bytes) else _Reader(data)
        _pickle.Unpickler.__init__(self, reader)
        self._router = router
        self._taken = set()

    def find_class(self, module, name):
        kind = _CONSTRUCTORS.get((module, name))
        if kind is not None:
            return lambda *args: self._build(kind, args)
        if module == 'mitogen.core':
            if name == '_unpickle_context':
                return self._context
            if name == '_unpickle_sender':
                return self._sender
        raise StreamError('refused to unpickle %s.%s: only plain built-in types and '
                          'mitogen.core message types may cross a stream', module, name)

    def _build(self, kind, args):
        cls, arg_types = kind
        if len(args) != len(arg_types) or \
                any(type(a) not in t for a, t in zip(args, arg_types)):
            raise StreamError('refused to unpickle %s%r: unexpected arguments',
                              cls.__name__, tuple(type(a).__name__ for a in args))
        for arg in args:
            if getattr(arg, '__len__', None) and len(arg) > 64:
                if id(arg) in self._taken:
                    raise StreamError('refused to unpickle %s: its argument is used twice',
                                      cls.__name__)
                self._taken.add(id(arg))
        return cls(*args)

    def _context(self, context_id, name):
        return _unpickle_context(context_id, name, self._router)

    def _sender(self, context_id, dst_handle):
        return _unpickle_sender(context_id, dst_handle, self._router)


_NUMBER = (int, float)
#: What the unpickler may construct, and the exact types of the arguments of each.
_CONSTRUCTORS = {
    ('mitogen.core', 'Blob'): (Blob, ((bytes,),)),
    ('mitogen.core', 'Secret'): (Secret, ((str,),)),
    ('mitogen.core', 'Kwargs'): (Kwargs, ((dict,),)),
    ('mitogen.core', 'CallError'): (CallError, ((str,),)),
    ('builtins', 'bytearray'): (bytearray, ((bytes,),)),
    ('builtins', 'complex'): (complex, (_NUMBER, _NUMBER)),
    ('builtins', 'range'): (range, ((int,), (int,), (int,))),
}


def _refuse_state(self, state):
    raise StreamError('refused to unpickle %s: its state cannot be set', type(self).__name__)


def _unpickle_context(context_id, name, router=None):
    if not (isinstance(context_id, int) and context_id >= 0 and
            (name is None or isinstance(name, str))):
        raise TypeError('cannot unpickle Context: bad id or name')
    if router is None:
        return Context(None, context_id, name)
    return router.context_by_id(context_id, name=name)


def _unpickle_sender(context_id, dst_handle, router=None):
    if not (isinstance(dst_handle, int) and dst_handle > 0):
        raise TypeError('cannot unpickle Sender: bad handle')
    return Sender(_unpickle_context(context_id, None, router), dst_handle)


# ---------------------------------------------------------------------------------------------
# 3. Frame codec
# ---------------------------------------------------------------------------------------------

#: magic/encoding, dst_id, src_id, auth_id, handle, reply_to, length; all big-endian.
HEADER = _struct.Struct('>HIIIIII')
HEADER_LEN = HEADER.size
ENC_LEGACY = 0x4d49
ENC_PKL = 0x4d4a
ENC_BIN = 0x4d4b
_ENCODINGS = frozenset([ENC_LEGACY, ENC_PKL, ENC_BIN])
_NOT_UNPICKLED = object()


class Message:
    """One frame: routing header plus a pickled or raw body."""

    __slots__ = ('dst_id', 'src_id', 'auth_id', 'handle', 'reply_to', 'data', 'enc', 'router',
                 'receiver', 'oversize', '_unpickled')

    def __init__(self, **kwargs):
        self.dst_id = None
        self.src_id = self.auth_id = mitogen.context_id
        self.handle = None
        self.reply_to = None
        self.data = b''
        self.enc = ENC_PKL
        self.router = None
        self.receiver = None
        self.oversize = 0
        self._unpickled = _NOT_UNPICKLED
        for name, value in kwargs.items():
            setattr(self, name, value)

    def __repr__(self):
        return 'Message(%r, %r, %r, %r, %r, %d bytes)' % (
            self.dst_id, self.src_id, self.auth_id, self.handle, self.reply_to, len(self.data))

    @property
    def is_dead(self):
        """True for a message saying the sender is gone or this message's request failed."""
        return self.reply_to == IS_DEAD

    @classmethod
    def dead(cls, reason=None, **kwargs):
        """A message that tells its receiver why nothing more will arrive."""
        return cls(reply_to=IS_DEAD, enc=ENC_BIN, data=(reason or '').encode('utf-8'), **kwargs)

    @classmethod
    def pickled(cls, obj, **kwargs):
        """A message carrying `obj`; if it cannot be pickled (a type we refuse, a reduce
        that raises, nesting too deep), a CallError naming the type and why, instead."""
        msg = cls(**kwargs)
        try:
            msg.data = _pickle.dumps(obj, PICKLE_PROTOCOL)
        except Exception as e:
            msg.data = _pickle.dumps(CallError('cannot pickle %s.%s: %s: %s' % (
                type(obj).__module__, type(obj).__qualname__, type(e).__name__, e)),
                PICKLE_PROTOCOL)
        return msg

    @classmethod
    def encoded(cls, obj, enc=ENC_PKL, **kwargs):
        if enc == ENC_BIN:
            return cls(data=obj, enc=ENC_BIN, **kwargs)
        return cls.pickled(obj, **kwargs)

    def pack(self):
        """The whole frame as one bytes object (streams write header and body separately)."""
        return self.pack_header() + bytes(self.data)

    def pack_header(self):
        return HEADER.pack(self.enc, self.dst_id, self.src_id, self.auth_id, self.handle or 0,
                           self.reply_to or 0, len(self.data))

    def reply(self, msg, router=None, **kwargs):
        """Send `msg` (a Message, or any object to pickle) to whoever sent this message."""
        if not isinstance(msg, Message):
            msg = Message.pickled(msg)
        msg.dst_id = self.src_id
        msg.handle = self.reply_to
        for name, value in kwargs.items():
            setattr(msg, name, value)
        if msg.handle:
            (router or self.router).route(msg)
        else:
            LOG.debug('dropping reply to %r: it has no reply_to', self)

    def _dead_reason(self):
        reason = bytes(self.data).decode('utf-8', 'replace')
        if reason:
            return reason
        if self.src_id == mitogen.context_id:
            return ChannelError.local_msg
        return ChannelError.remote_msg

    def _trusted(self):
        """Whether this context or one of its parents wrote it (see has_parent_authority)."""
        return self.auth_id == mitogen.context_id or self.auth_id in mitogen.parent_ids

    def decode(self, throw=True, throw_dead=True):
        """The body: raw bytes for ENC_BIN, otherwise the unpickled object."""
        return self.unpickle(throw=throw, throw_dead=throw_dead)

    def unpickle(self, throw=True, throw_dead=True):
        """Deserialize the body; raise CallError/ChannelError when it says so."""
        if throw_dead and self.is_dead:
            raise ChannelError(self._dead_reason())
        obj = self._unpickled
        if obj is _NOT_UNPICKLED:
            if self.enc == ENC_BIN:
                obj = bytes(self.data)
            else:
                data = self.data
                try:
                    if not self._trusted():
                        _check_pickle(data)
                    if type(data) is bytes and len(data) < 65536 and data.find(b'\x93') < 0:
                        # No STACK_GLOBAL (the guard refuses every other way to name one):
                        # nothing for find_class to refuse, so the plain C loader does it,
                        # ten times cheaper than an Unpickler for a call or a reply.
                        obj = _pickle.loads(data)
                    else:
                        obj = _Unpickler(data, self.router).load()
                except StreamError:
                    raise
                except Exception as e:
                    raise StreamError('cannot unpickle %r: %s: %s', self, type(e).__name__, e)
            self._unpickled = obj
        if throw and isinstance(obj, CallError):
            raise obj
        return obj


def _check_pickle(data):
    """mitogen.guard.check_pickle, imported on first use (parents and the master load it at
    start), then called directly."""
    global _check_pickle
    _check_pickle = importlib.import_module('mitogen.guard').check_pickle
    _check_pickle(data)


def _anonymous(size):
    """`size` bytes of private anonymous memory: pages cost nothing until written. Huge
    pages where the kernel offers them: a fresh page per 4 KiB written would cost a fault
    each, and a 64 MiB body four times the copying it is filled by."""
    mem = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        mem.madvise(mmap.MADV_HUGEPAGE)
    except (AttributeError, OSError):
        pass
    return mem


class Decoder:
    """Turns the bytes of a stream into Messages. Does no IO, so it can be tested and fuzzed
    alone: ``feed(data)`` then ``next_message()`` until it returns None.

    Large bodies are received into a buffer of their own, which the stream can read into
    directly (``read_target``/``advance``) so that a 64 MiB argument is not copied chunk by
    chunk. Up to HEAP_BODY that buffer is taken whole from the heap; beyond, it is anonymous
    memory that doubles as the bytes arrive (``mremap``, no copy): a header that claims
    128 MiB and then stalls costs HEAP_BODY, not what it claimed. A frame longer than
    ``max_message_size`` is skipped without being buffered and returned as a Message with
    ``oversize`` set and no body, so that the stream can refuse it and stay up. Bytes that
    are not a frame raise CorruptFrameError.
    """

    #: Bodies at least this long are received into a dedicated buffer.
    BIG_BODY = 262144

    #: Bodies up to this long are allocated whole as their header arrives: a stalled
    #: header costs at most this much. Longer ones grow as their bytes come.
    HEAP_BODY = 2097152

    def __init__(self, max_message_size):
        self.max_message_size = max_message_size
        self._buf = bytearray()
        self._header = None
        self._body = None
        self._filled = 0
        self._skip = 0

    @property
    def pending(self):
        """True while part of a frame has been received: EOF now means a truncated frame."""
        return bool(self._buf or self._header or self._skip)

    def feed(self, data):
        if self._skip:
            take = min(self._skip, len(data))
            self._skip -= take
            data = data[take:]
        while data and self._body is not None and self._filled < self._header[6]:
            room = self.read_target()
            n = min(len(room), len(data))
            room[:n] = data[:n]
            room.release()
            self._filled += n
            data = data[n:]
        if data:
            self._buf += data

    def read_target(self):
        """A writable view of the unfilled part of a big body, or None."""
        body = self._body
        if body is None or self._buf:
            return None
        if self._filled == len(body) < self._header[6]:
            body = self._grow(body)
        return memoryview(body)[self._filled:]

    def _grow(self, body):
        size = min(self._header[6], 2 * len(body))
        try:
            body.resize(size)
        except (BufferError, ValueError, SystemError, OSError):
            new = _anonymous(size)  # no mremap here: one copy instead
            new[:self._filled] = body[:self._filled]
            body.close()
            body = self._body = new
        return body

    def advance(self, n):
        """Record that `n` bytes were written into the view read_target returned."""
        self._filled += n

    def next_message(self):
        if self._skip:
            return None
        if self._header is None:
            if len(self._buf) < HEADER_LEN:
                return None
            header = HEADER.unpack_from(self._buf)
            if header[0] not in _ENCODINGS:
                raise CorruptFrameError('bad frame magic 0x%04x: the stream is corrupt' % header[0])
            del self._buf[:HEADER_LEN]
            length = header[6]
            if length > self.max_message_size:
                self._skip = length
                rest = bytes(self._buf)
                del self._buf[:]
                self.feed(rest)
                return self._make(header, b'', oversize=length)
            self._header = header
            if length >= self.BIG_BODY and len(self._buf) < length:
                self._filled = len(self._buf)
                if length <= self.HEAP_BODY:
                    # The heap, whose pages earlier bodies have touched: fresh pages of a
                    # mapping would cost a fault each, more than the copying.
                    self._body = bytearray(length)
                else:
                    self._body = _anonymous(min(length, max(self.HEAP_BODY, 2 * self._filled)))
                self._body[:self._filled] = self._buf
                del self._buf[:]
        header = self._header
        length = header[6]
        if self._body is not None:
            if self._filled < length:
                return None
            data = self._body  # copying 64 MiB again would buy nothing
            self._body = None
        else:
            if len(self._buf) < length:
                return None
            data = bytes(self._buf[:length])
            del self._buf[:length]
        self._header = None
        return self._make(header, data)

    @staticmethod
    def _make(header, data, oversize=0):
        msg = Message.__new__(Message)
        msg.enc, msg.dst_id, msg.src_id, msg.auth_id, msg.handle, msg.reply_to = header[:6]
        msg.data = data
        msg.oversize = oversize
        msg.router = msg.receiver = None
        msg._unpickled = _NOT_UNPICKLED
        return msg


# ---------------------------------------------------------------------------------------------
# 4. Thread primitives
# ---------------------------------------------------------------------------------------------


def set_cloexec(fd):
    fcntl.fcntl(fd, fcntl.F_SETFD, fcntl.fcntl(fd, fcntl.F_GETFD) | fcntl.FD_CLOEXEC)


def set_nonblock(fd):
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)


def read_chunk(fd):
    """Up to CHUNK_SIZE bytes from non-blocking `fd`: None when nothing is ready yet, b''
    at end of file or on an error (both mean the peer is gone)."""
    try:
        return os.read(fd, CHUNK_SIZE)
    except BlockingIOError:
        return None
    except OSError:
        return b''


class _ThreadWaker:
    """A thread's own socketpair for sleeping in Latch.get(), created on first use.

    Descriptors are bounded by the number of threads that ever sleep, not by the number of
    latches. They are plain descriptors closed by __del__, which runs when the thread's locals
    are dropped at thread exit: there is no other hook that runs on every thread's exit.
    """

    def __init__(self):
        rsock, wsock = _socket.socketpair()
        self.rfd = rsock.detach()
        self.wfd = wsock.detach()
        set_nonblock(self.rfd)
        self.poller = select.poll()
        self.poller.register(self.rfd, select.POLLIN)
        self.owner = threading.get_ident()
        # Set instead of writing the wake byte when the sleeping thread wakes itself: a
        # lease holder that has just delivered its own reply (see wait()).
        self.woke_itself = False

    def wake(self):
        if threading.get_ident() == self.owner:
            self.woke_itself = True
            return
        try:
            os.write(self.wfd, b'\x7f')
        except OSError as e:
            if e.errno not in (errno.EBADF, errno.EPIPE):
                raise

    def wait(self, timeout, lease=None):
        """Sleep until woken or `timeout` seconds pass. The caller decides what it means.

        With a :class:`_Lease`, also read its stream whenever it is readable, until the
        lease ends: a reply read that way is put on the latch by this very thread, which
        then finds its own wake byte.
        """
        if lease is None:
            self.poller.poll(_poll_ms(timeout))
            return
        deadline = None if timeout is None else now() + timeout
        poller = self.poller
        poller.register(lease.fd, select.POLLIN)
        try:
            while lease.active:
                remaining = None if deadline is None else deadline - now()
                events = poller.poll(_poll_ms(remaining))
                if not events or any(fd == self.rfd for fd, _ in events):
                    return
                lease.serve()
                if self.woke_itself:
                    return
        finally:
            poller.unregister(lease.fd)
            lease.end()
        remaining = None if deadline is None else deadline - now()
        self.poller.poll(_poll_ms(remaining))

    def consume(self):
        """Read away the one wake byte that a waker has written or is about to write."""
        if self.woke_itself:
            self.woke_itself = False
            return
        while True:
            try:
                if os.read(self.rfd, 1):
                    return
            except BlockingIOError:
                pass
            self.poller.poll(-1)

    def close(self):
        for fd in (self.rfd, self.wfd):
            if fd is not None:
                os.close(fd)
        self.rfd = self.wfd = None

    __del__ = close


def _poll_ms(timeout):
    """poll()'s timeout argument: milliseconds, rounded up, -1 for none."""
    return -1 if timeout is None else max(0, int(timeout * 1000 + 0.999))


_thread_state = threading.local()


def _get_thread_waker():
    try:
        return _thread_state.waker
    except AttributeError:
        waker = _thread_state.waker = _ThreadWaker()
        return waker


def _read_buffer():
    """This thread's scratch space for stream reads: one per thread that reads, not per
    stream (a master may have hundreds), reused so that a read does not allocate a fresh
    buffer each time. Anonymous memory, not a zero-filled bytearray: a page costs nothing
    until a read reaches it, so a thread that reads small messages holds 4 KiB, not 128."""
    try:
        return _thread_state.read_buffer
    except AttributeError:
        buf = _thread_state.read_buffer = mmap.mmap(-1, CHUNK_SIZE)
        return buf


def _warm_thread_resources():
    """Create the calling thread's lifetime resources now (used by leak checks in tests)."""
    _get_thread_waker()


class Latch:
    """A thread-safe FIFO queue whose get() can sleep with a timeout, woken by put().

    Implements the design of "Latch Internals": each sleeping thread waits on its own
    socketpair, ``_sleeping`` lists them in arrival order and ``_waking`` counts how many have
    been sent their wake byte. A woken thread receives exactly the item that matches its place
    in that order, so items are handed out strictly first-come first-served and no thread is
    woken for an item another thread then steals.
    """

    notify = None

    def __init__(self):
        self._lock = threading.Lock()
        self._queue = []
        self._sleeping = []
        self._waking = 0
        self.closed = False

    def __repr__(self):
        return 'Latch(%#x, size=%d)' % (id(self), len(self._queue))

    def empty(self):
        return not self.size()

    def size(self):
        """Items queued now; LatchError once the latch is closed."""
        if self.closed:
            raise LatchError('the latch is closed')
        return len(self._queue)

    def close(self):
        """Wake every sleeper with LatchError; later get() and put() raise it too."""
        with self._lock:
            self.closed = True
            to_wake = self._sleeping[self._waking:]
            self._waking = len(self._sleeping)
        for waker in to_wake:
            self._wake(waker)

    def put(self, obj=None):
        waker = None
        with self._lock:
            if self.closed:
                raise LatchError('put() on a closed latch')
            self._queue.append(obj)
            if self._waking < len(self._sleeping):
                waker = self._sleeping[self._waking]
                self._waking += 1
        if waker is not None:
            self._wake(waker)
        if self.notify is not None:
            self.notify(self)

    @staticmethod
    def _wake(waker):
        waker.wake()

    def get(self, timeout=None, block=True, lease=None):
        """Return the next item; raise TimeoutError after `timeout` seconds or when
        `block` is False and nothing is queued, LatchError if the latch is closed.

        A `lease` lets the sleeping thread read a stream itself while it waits (see
        :meth:`MessageStream.lease`); it ends before this returns.
        """
        with self._lock:
            if self.closed:
                if lease is not None:
                    lease.end()
                raise LatchError('get() on a closed latch')
            position = len(self._sleeping)
            if len(self._queue) > position or not block:
                if lease is not None:
                    lease.end()
                if len(self._queue) > position:
                    return self._queue.pop(position)
                raise TimeoutError('latch is empty')
            waker = _get_thread_waker()
            self._sleeping.append(waker)
        interrupted = None
        try:
            waker.wait(timeout, lease)
        except BaseException as e:
            interrupted = e
        return self._after_sleep(waker, interrupted)

    def _after_sleep(self, waker, interrupted):
        with self._lock:
            position = self._sleeping.index(waker)
            del self._sleeping[position]
            if position >= self._waking:
                if interrupted is not None:
                    raise interrupted
                raise TimeoutError('timed out waiting on latch')
            self._waking -= 1
            waker.consume()
            if self.closed:
                raise LatchError('latch closed while waiting')
            item = self._queue.pop(position)
            if interrupted is None:
                return item
            # Hand the item on to the next thread in line rather than losing it.
            self._queue.insert(self._waking, item)
            next_waker = None
            if self._waking < len(self._sleeping):
                next_waker = self._sleeping[self._waking]
                self._waking += 1
        if next_waker is not None:
            self._wake(next_waker)
        raise interrupted


class Receiver:
    """Receives messages sent to one handle in this context.

    Messages queue in a Latch until get() takes them; a dead message (the sender closed the
    channel, or the respondent context disconnected) raises ChannelError in get().
    """

    notify = None

    def __init__(self, router, handle=None, persist=True, respondent=None, policy=None,
                 overwrite=False):
        self.router = router
        self._latch = Latch()
        self.handle = router.add_handler(fn=self._on_receive, handle=handle, policy=policy,
                                         persist=persist, respondent=respondent,
                                         overwrite=overwrite)

    def __repr__(self):
        return 'Receiver(%r, %r)' % (self.router, self.handle)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def to_sender(self):
        """A Sender, to hand to another context, that delivers to this receiver."""
        return Sender(self.router.myself(), self.handle)

    def _on_receive(self, msg):
        try:
            self._latch.put(msg)
        except LatchError:
            return
        if self.notify is not None:
            self.notify(self)

    _on_receive.any_thread = True  # it only queues: a lease holder may call it

    def close(self):
        """Stop receiving; threads waiting in get() raise ChannelError."""
        if self.handle is not None:
            self.router.del_handler(self.handle)
            self.handle = None
        self._latch.close()

    def size(self):
        return self._latch.size()

    def empty(self):
        return self._latch.empty()

    #: The stream this receiver's messages are expected on (the first hop towards the
    #: respondent). A thread waiting in get() reads it itself when no other thread is doing
    #: so, rather than sleeping until the broker thread has read the message and woken it:
    #: each such hand-off between threads costs about as much as the round trip itself.
    via_stream = None

    def get(self, timeout=None, block=True, throw_dead=True, lease=None):
        """The next message; `lease`, if given, is one the caller already holds on the
        stream it will arrive on (it ends before this returns)."""
        stream = self.via_stream
        if lease is None and stream is not None and block:
            lease = stream.lease()
        try:
            msg = self._latch.get(timeout=timeout, block=block, lease=lease)
        except LatchError:
            raise ChannelError(ChannelError.local_msg)
        if throw_dead and msg.is_dead:
            raise ChannelError(msg._dead_reason())
        return msg

    def __iter__(self):
        """Yield messages until the channel is closed."""
        while True:
            try:
                msg = self.get(throw_dead=False)
            except ChannelError:
                return
            if msg.is_dead:
                return
            yield msg


class Sender:
    """Sends pickled objects to one handle of one context; may itself be sent to others."""

    def __init__(self, context, dst_handle):
        self.context = context
        self.dst_handle = dst_handle

    def __repr__(self):
        return 'Sender(%r, %r)' % (self.context, self.dst_handle)

    def __reduce__(self):
        return (_unpickle_sender, (self.context.context_id, self.dst_handle))

    def send(self, data, enc=ENC_PKL):
        self.context.send(Message.encoded(data, enc, handle=self.dst_handle))

    def close(self):
        """Tell the receiver nothing more will come."""
        self.context.send(Message.dead(handle=self.dst_handle))


class Channel(Sender, Receiver):
    """A Sender and a Receiver to one peer, for two-way conversations."""

    def __init__(self, router, context, dst_handle, handle=None):
        Sender.__init__(self, context, dst_handle)
        Receiver.__init__(self, router, handle)

    def __repr__(self):
        return 'Channel(%r, %r)' % (Sender.__repr__(self), Receiver.__repr__(self))

    def close(self):
        Receiver.close(self)
        Sender.close(self)


# ---------------------------------------------------------------------------------------------
# 5. Contexts and function calls
# ---------------------------------------------------------------------------------------------


def listen(obj, name, func):
    """Call `func` whenever `obj` fires the signal `name`."""
    vars(obj).setdefault('_signals', {}).setdefault(name, []).append(func)


def unlisten(obj, name, func):
    try:
        vars(obj)['_signals'][name].remove(func)
    except (KeyError, ValueError):
        raise ValueError('%r is not listening to %r of %r' % (func, name, obj))


def fire(obj, name, *args, **kwargs):
    for func in list(vars(obj).get('_signals', {}).get(name, ())):
        func(*args, **kwargs)


def takes_econtext(func):
    """Mark `func` to receive the child's ExternalContext as ``econtext=`` when called."""
    func.mitogen_takes_econtext = True
    return func


def takes_router(func):
    """Mark `func` to receive the child's Router as ``router=`` when called."""
    func.mitogen_takes_router = True
    return func


def has_parent_authority(msg, stream=None):
    """Policy: accept only messages sent on behalf of this context or one of its parents."""
    return msg.auth_id == mitogen.context_id or msg.auth_id in mitogen.parent_ids


class Context:
    """A handle on some context of the tree, addressed by its ID."""

    via = None
    remote_name = None
    disconnected = False

    def __init__(self, router, context_id, name=None):
        self.router = router
        self.context_id = context_id
        self.name = name
        self._call_chain = None

    def __repr__(self):
        return 'Context(%s, %r)' % (self.context_id, self.name)

    def __reduce__(self):
        return (_unpickle_context, (self.context_id, self.name))

    def __eq__(self, other):
        return isinstance(other, Context) and other.context_id == self.context_id and \
            other.router is self.router

    def __hash__(self):
        return hash(self.context_id)

    @property
    def default_call_chain(self):
        if self._call_chain is None:
            import mitogen.call  # not needed to start a child: fetched on first use
            self._call_chain = mitogen.call.CallChain(self)
        return self._call_chain

    def on_disconnect(self):
        self.disconnected = True
        fire(self, 'disconnect')

    def send(self, msg):
        msg.dst_id = self.context_id
        self.router.route(msg)

    def send_async(self, msg, persist=False):
        """Send `msg`; returns the Receiver that its replies go to."""
        recv = Receiver(self.router, persist=persist, respondent=self)
        recv.via_stream = self.router.stream_by_id(self.context_id)
        msg.dst_id = self.context_id
        msg.reply_to = recv.handle
        self.router.route(msg)
        return recv

    def send_await(self, msg, deadline=None):
        """Send `msg` and return its unpickled reply, waiting until `deadline` at most."""
        recv, lease = self._send_and_lease(msg)
        try:
            timeout = None if deadline is None else max(0.0, deadline - now())
            return recv.get(timeout=timeout, lease=lease).unpickle()
        finally:
            recv.close()

    def _send_and_lease(self, msg):
        """send_async() for a caller that waits for the reply at once: the lease on the
        reply's stream is taken before the request leaves, so that the broker cannot read
        the reply first and have to wake the caller."""
        stream = self.router.stream_by_id(self.context_id)
        lease = stream.lease() if stream is not None else None
        try:
            return self.send_async(msg), lease
        except BaseException:
            if lease is not None:
                lease.end()
            raise

    def call_async(self, fn, *args, **kwargs):
        return self.default_call_chain.call_async(fn, *args, **kwargs)

    def call(self, fn, *args, **kwargs):
        return self.default_call_chain.call(fn, *args, **kwargs)

    def call_no_reply(self, fn, *args, **kwargs):
        self.default_call_chain.call_no_reply(fn, *args, **kwargs)

    def call_service_async(self, service_name, method_name, **kwargs):
        """Call a method of a service (a Service class or its dotted name) in this context;
        returns the Receiver of the reply. mitogen.service is fetched on first use."""
        import mitogen.service
        return mitogen.service.send_call(self, service_name, method_name, kwargs)

    def call_service(self, service_name, method_name, **kwargs):
        import mitogen.service
        return mitogen.service.send_call(self, service_name, method_name, kwargs, True)

    def shutdown(self, wait=False):
        """Ask the context to exit. Returns a Latch that receives None once it has
        disconnected; with ``wait=True``, waits for that first."""
        latch = Latch()
        listen(self, 'disconnect', lambda: latch.put(None))
        if self.disconnected:  # already gone: its disconnect will not fire again
            latch.put(None)
        self.send(Message(handle=SHUTDOWN))
        if wait:
            latch.get()
        return latch


for _cls in (Blob, Secret, Kwargs, CallError, Sender, Context):
    _cls.__setstate__ = _refuse_state  # a pickle's BUILD must not rewrite these


class Dispatcher:
    """Runs CALL_FUNCTION requests on the child's main thread, one at a time."""

    def __init__(self, econtext):
        self.econtext = econtext
        self._error_by_chain_id = {}
        self.recv = Receiver(econtext.router, handle=CALL_FUNCTION,
                             policy=has_parent_authority)
        self.recv.via_stream = econtext.router.parent_stream
        listen(econtext.broker, 'shutdown', self.recv.close)
        self._services = None  # CALL_SERVICE messages queued for a pool being started
        econtext.router.add_handler(self._on_call_service, CALL_SERVICE,
                                    policy=has_parent_authority)

    def _on_call_service(self, msg):
        """CALL_SERVICE (from a parent: the policy refuses others) while no service pool runs
        here: start one, on a thread of its own as the main thread may be busy, and queue
        the call for it. The pool then takes the handle over."""
        if not msg.is_dead:
            if self._services is None:
                self._services = Latch()
                threading.Thread(target=lambda: importlib.import_module(
                    'mitogen.service').get_or_create_pool(router=msg.router,
                                                          recv=self._services),
                    daemon=True).start()
            self._services.put(msg)

    @staticmethod
    @takes_econtext
    def forget_chain(chain_id, econtext):
        econtext.dispatcher._error_by_chain_id.pop(chain_id, None)

    def _resolve(self, msg):
        chain_id, module, klass, name, args, kwargs = msg.unpickle(throw=False)
        if not (isinstance(module, str) and isinstance(name, str) and
                isinstance(args, tuple) and isinstance(kwargs, dict)):
            raise TypeError('malformed CALL_FUNCTION request')
        obj = sys.modules.get(module)
        if obj is None:
            _thread_state.import_hint = module
            try:
                obj = importlib.import_module(module)
            finally:
                _thread_state.import_hint = None
        for part in (klass.split('.') if klass else ()):
            obj = getattr(obj, part)
        fn = getattr(obj, name)
        if getattr(fn, 'mitogen_takes_econtext', False):
            kwargs['econtext'] = self.econtext
        if getattr(fn, 'mitogen_takes_router', False):
            kwargs['router'] = self.econtext.router
        return chain_id, fn, args, kwargs

    def dispatch(self, msg):
        chain_id = None
        try:
            chain_id, fn, args, kwargs = self._resolve(msg)
            failed = self._error_by_chain_id.get(chain_id) if chain_id else None
            result = failed if failed is not None else fn(*args, **kwargs)
        except Exception as e:
            result = CallError(e)
            if chain_id is not None:
                self._error_by_chain_id[chain_id] = result
            elif not msg.reply_to:
                LOG.error('call_no_reply failed: %s', result)
        if msg.reply_to:
            msg.reply(result)

    def run(self):
        for msg in self.recv:
            self.dispatch(msg)


# ---------------------------------------------------------------------------------------------
# 6. Routing
# ---------------------------------------------------------------------------------------------


class Router:
    """Delivers messages to local handlers or forwards them along the tree.

    Each context knows the streams to its direct children and the IDs reachable through each
    (``ADD_ROUTE``); anything else goes to the parent. Before a received message is forwarded
    or dispatched, its ``auth_id`` and ``src_id`` must be reachable through the stream it came
    in on ("Source Verification"), so a context can never speak for its parents or siblings.
    """

    context_class = Context
    max_message_size = 128 * 1048576
    unidirectional = False

    def __init__(self, broker):
        self.broker = broker
        self.parent_stream = None
        self._stream_by_id = {}
        self._context_by_id = {}
        self._handle_map = {}
        self._unguarded = None
        self._guard_lock = threading.Lock()
        self._handle_counter = itertools.count(1000)
        self.dropped_count = 0
        self._drop_second = self._drop_logged = self._drop_quiet = 0
        #: When a list, every forwarded message appends (src_id, dst_id, from_id, to_id).
        self.route_trace = None
        listen(broker, 'exit', self._on_broker_exit)
        self.add_handler(self._on_del_route, DEL_ROUTE, policy=has_parent_authority)
        self.add_handler(self._on_ping, PING, policy=has_parent_authority)

    def __repr__(self):
        return 'Router(%r)' % (self.broker,)

    # --- contexts and routes

    def myself(self):
        return self.context_by_id(mitogen.context_id, name='self')

    def context_by_id(self, context_id, via_id=None, create=True, name=None):
        context = self._context_by_id.get(context_id)
        if context is None and create:
            context = self.context_class(self, context_id, name=name)
            if via_id is not None:
                context.via = self.context_by_id(via_id)
            self._context_by_id[context_id] = context
        elif context is not None and name and not context.name:
            context.name = name
        return context

    def stream_by_id(self, dst_id):
        """The stream a message for `dst_id` would leave on: a route, else the parent."""
        return self._stream_by_id.get(dst_id) or self.parent_stream

    def add_route(self, target_id, stream):
        LOG.debug('%r: route to %d via %r', self, target_id, stream)
        self._stream_by_id[target_id] = stream
        stream.routes.add(target_id)

    def del_route(self, target_id):
        stream = self._stream_by_id.pop(target_id, None)
        if stream is not None:
            stream.routes.discard(target_id)
        self._forget_context(target_id)

    def _forget_context(self, context_id):
        """A context is gone: tell whoever waits on it, and keep nothing of it."""
        self._on_respondent_disconnect(context_id)
        context = self._context_by_id.pop(context_id, None)
        if context is not None:
            context.on_disconnect()

    def get_routes(self):
        """{context_id: stream name} for every route this router holds."""
        return {cid: stream.name for cid, stream in self._stream_by_id.items()}

    def register(self, context, stream):
        """Route `context` through `stream`, a stream connected directly to it."""
        self._context_by_id[context.context_id] = context
        self.add_route(context.context_id, stream)

    def _on_stream_disconnect(self, stream):
        for target_id in sorted(stream.routes):
            if self._stream_by_id.get(target_id) is stream:
                self.del_route(target_id)

    @staticmethod
    def _on_ping(msg):
        if not msg.is_dead:
            msg.reply(Message())  # any answer proves the link alive (see parent.Keepalive)

    def _on_del_route(self, msg):
        """DEL_ROUTE from our parent: a context elsewhere in the tree is gone."""
        if msg.is_dead:
            return
        target_id = int(msg.unpickle())
        if self._stream_by_id.get(target_id) is None:
            self._forget_context(target_id)

    # --- handlers

    def add_handler(self, fn, handle=None, persist=True, policy=None, respondent=None,
                    overwrite=False):
        """Call ``fn(msg)`` on the broker thread for each message sent to `handle`
        (a Receiver's, which only queues the message, may also run on a thread that holds a
        lease on the stream it arrived on: see :meth:`MessageStream.lease`).

        `policy(msg, stream)` may refuse a message; `respondent` is the context expected to
        reply: if it disconnects, `fn` receives a dead message at once instead of waiting.
        """
        handle = handle or next(self._handle_counter)
        if not overwrite and handle in self._handle_map:
            raise Error('%r: handle %r is already in use', self, handle)
        self._handle_map[handle] = (persist, fn, policy, respondent)
        return handle

    def del_handler(self, handle):
        self._handle_map.pop(handle, None)

    def _on_respondent_disconnect(self, context_id):
        """Context `context_id` is gone: every handle waiting for it gets a dead message
        now. The handles are found by a scan, not kept per context: a few per disconnect
        beats a set and a listener per context for as long as it lives."""
        for handle, entry in list(self._handle_map.items()):
            respondent = entry[3]
            if respondent is not None and respondent.context_id == context_id:
                msg = Message.dead('the respondent %r disconnected' % (respondent,),
                                   handle=handle, src_id=context_id,
                                   dst_id=mitogen.context_id)
                self.broker.defer(self._invoke, msg, None)

    def _on_broker_exit(self):
        """Nothing will ever arrive now: fail every waiting receiver instead of hanging it."""
        for handle in list(self._handle_map):
            fn = self._handle_map[handle][1]
            try:
                fn(Message.dead('the broker has shut down', handle=handle))
            except Exception:
                LOG.exception('%r: handler for %d failed at exit', self, handle)

    def _invoke(self, msg, stream):
        try:
            persist, fn, policy, respondent = self._handle_map[msg.handle]
        except KeyError:
            reason = 'no handler for handle %r in context %r' % (msg.handle, mitogen.context_id)
            self._drop(msg, stream, reason)
            self._refuse(msg, reason)
            return
        if respondent is not None and not msg.is_dead and \
                msg.src_id != respondent.context_id:
            self._drop(msg, stream, 'reply from %r, expected %r' % (msg.src_id, respondent))
            return
        if policy is not None and not policy(msg, stream):
            self._drop(msg, stream, 'refused by the policy of handle %r' % (msg.handle,))
            self._refuse(msg, 'refused by policy')
            return
        if not persist:
            self.del_handler(msg.handle)
        msg.router = self
        if (self._unguarded is not None or 'mitogen.guard' not in sys.modules) and not (
                msg._trusted() or isinstance(getattr(fn, '__self__', None), Receiver)):
            # A pickle from below is checked by mitogen.guard, which this thread cannot
            # fetch: a thread does, then these messages run, in the order they came.
            with self._guard_lock:
                if self._unguarded is not None or 'mitogen.guard' not in sys.modules:
                    if self._unguarded is None:
                        self._unguarded = []
                        threading.Thread(target=self._fetch_guard, daemon=True).start()
                    self._unguarded.append((fn, msg))
                    return
        self._call(fn, msg)

    def _fetch_guard(self):
        try:
            importlib.import_module('mitogen.guard')
        except ImportError:
            pass  # the parent is gone: each handler meets the error as it unpickles
        self.broker.defer(self._run_unguarded)

    def _run_unguarded(self):
        while True:
            with self._guard_lock:
                waiting = self._unguarded
                self._unguarded = [] if waiting else None
            if not waiting:
                return
            for fn, msg in waiting:
                self._call(fn, msg)

    def _call(self, fn, msg):
        try:
            fn(msg)
        except Exception:
            LOG.exception('%r: handler %r failed on %r', self, fn, msg)

    # --- sending and forwarding

    def _drop(self, msg, stream, reason):
        """Count a message that will not be delivered, and log it: at most ten lines a
        second, so that a flood from a hostile context cannot flood the logs too."""
        self.dropped_count += 1
        second = int(now())
        if second != self._drop_second:
            if self._drop_quiet:
                LOG.error('%r: %d more messages dropped', self, self._drop_quiet)
            self._drop_second, self._drop_logged, self._drop_quiet = second, 0, 0
        if self._drop_logged < 10:
            self._drop_logged += 1
            LOG.error('%r: dropped %r from %r: %s', self, msg, stream, reason)
        else:
            self._drop_quiet += 1

    def _refuse(self, msg, reason):
        """Tell the sender its message will never be answered, unless it is itself dead or
        its reply_to names a standard handle (no reply ever goes to CALL_FUNCTION & co)."""
        if (msg.reply_to or 0) >= 1000 and not msg.is_dead:
            dead = Message.dead(reason, dst_id=msg.src_id, handle=msg.reply_to)
            self.route(dead)

    def route(self, msg):
        """Send `msg` towards its ``dst_id``; callable from any thread.

        The common case, a message for another context with a known stream, is written from
        the calling thread at once: handing it to the broker thread first would cost a thread
        wake-up on every call.
        """
        if msg.dst_id != mitogen.context_id and len(msg.data) <= self.max_message_size:
            stream = self._stream_by_id.get(msg.dst_id) or self.parent_stream
            if stream is not None:
                stream.send(msg)
                return
        self.broker.defer(self._async_route, msg)

    def _async_route(self, msg, in_stream=None):
        if in_stream is not None:
            if not self._verify_source(msg, in_stream):
                return
            if msg.oversize:
                # Only now: a refusal goes to the verified source, never to whatever
                # (context, handle) an unverified header names.
                reason = 'message too large (%d bytes; max_message_size is %d)' % (
                    msg.oversize, in_stream.decoder.max_message_size)
                self._drop(msg, in_stream, reason)
                self._refuse(msg, reason)
                return
        elif len(msg.data) > self.max_message_size:
            reason = 'message too large (%d bytes; max_message_size is %d)' % (
                len(msg.data), self.max_message_size)
            LOG.error('%r: refused to send %r: %s', self, msg, reason)
            if msg.reply_to:
                self._refuse(msg, reason)
            elif msg.handle and not msg.is_dead:
                # A reply has nobody to refuse to: tell whoever waits for it instead.
                self.route(Message.dead(reason, dst_id=msg.dst_id, handle=msg.handle))
            return
        if msg.dst_id == mitogen.context_id:
            self._invoke(msg, in_stream)
            return
        out_stream = self._stream_by_id.get(msg.dst_id) or self.parent_stream
        if out_stream is None:
            self._refuse(msg, 'no route to context %r' % (msg.dst_id,))
            return
        if in_stream is not None:
            if out_stream is in_stream:
                self._drop(msg, in_stream, 'it would be sent back the way it came')
                return
            if self.unidirectional and self.parent_stream not in (in_stream, out_stream):
                self._drop(msg, in_stream, 'unidirectional mode forbids routing between '
                                           'children')
                self._refuse(msg, 'unidirectional mode forbids routing between children')
                return
            if self.route_trace is not None:
                self.route_trace.append((msg.src_id, msg.dst_id, in_stream.remote_id,
                                         out_stream.remote_id))
        out_stream.send(msg)

    def _delivers_here(self, msg, stream):
        """Whether a thread holding a lease on `stream` may route `msg` itself: a message
        for a handler marked ``any_thread`` (a Receiver's, the importer's), or one to forward
        along a known route, from a stream that has carried messages for that destination
        before (so that routing it changes no state the broker thread owns)."""
        if msg.dst_id not in stream.egress_ids or msg.handle is None:
            return False
        if msg.dst_id != mitogen.context_id:
            return not self.unidirectional and (
                msg.dst_id in self._stream_by_id or self.parent_stream is not None)
        entry = self._handle_map.get(msg.handle)
        return entry is not None and getattr(entry[1], 'any_thread', False)

    def _verify_source(self, msg, stream):
        for claimed in (msg.auth_id, msg.src_id):
            expected = self._stream_by_id.get(claimed) or self.parent_stream
            if claimed == mitogen.context_id or expected is not stream:
                self._drop(msg, stream, 'id %r cannot arrive on this stream' % (claimed,))
                return False
        stream.egress_ids.add(msg.dst_id)
        if stream.auth_id is not None and msg.auth_id == stream.remote_id:
            msg.auth_id = stream.auth_id
        return True


# ---------------------------------------------------------------------------------------------
# 7. Streams and the IO multiplexer
# ---------------------------------------------------------------------------------------------


class EpollPoller:
    """Waits for descriptors with epoll: cost independent of how many are watched."""

    READ = select.EPOLLIN
    WRITE = select.EPOLLOUT
    #: Whether another thread may change masks while poll() waits (epoll: yes).
    thread_safe = True

    def __init__(self):
        self._epoll = select.epoll()

    def close(self):
        self._epoll.close()

    def set_mask(self, fd, mask):
        """Watch `fd` for `mask`, or not at all when it is 0. The kernel knows what is
        registered: a table of masks here would cost every stream a dict entry."""
        if not mask:
            try:
                self._epoll.unregister(fd)
            except FileNotFoundError:
                pass
            return
        try:  # register first: a lease unwatches its stream and re-watches it on every call
            self._epoll.register(fd, mask)
        except FileExistsError:
            self._epoll.modify(fd, mask)

    def poll(self, timeout):
        return self._epoll.poll(-1 if timeout is None else timeout)


class Timer:
    """A function scheduled on the broker thread; cancel() it to stop it firing."""

    def __init__(self, when, func):
        self.when = when
        self.func = func
        self.active = True

    def __lt__(self, other):
        return self.when < other.when

    def cancel(self):
        self.active = False
        self.func = None  # it waits in the heap until due: let what it would call go now


class Stream:
    """Something the broker watches: a read descriptor, optionally a write descriptor.

    Subclasses override the ``on_*`` callbacks, which run on the broker thread only.
    ``keep_alive`` streams hold up a graceful broker shutdown until they disconnect.
    """

    keep_alive = False
    rfd = None  # type: int | None
    wfd = None  # type: int | None
    #: The stream whose full output queue this one waits for before it is read again.
    paused = None  # type: Stream | None

    def __init__(self, name='stream'):
        self.name = name
        self.closed = False

    def __repr__(self):
        return '%s(%r)' % (type(self).__name__, self.name)

    def on_readable(self, broker):
        pass

    def on_writable(self, broker):
        pass

    def on_shutdown(self, broker):
        """The broker is shutting down gracefully."""

    def on_disconnect(self, broker):
        """Close descriptors and stop being watched; fires 'disconnect' once."""
        if self.closed:
            return
        self.closed = True
        self._gone(broker)

    def _gone(self, broker):
        broker.stop_receive(self)
        broker._stop_transmit(self)
        self._close_fds(broker)
        fire(self, 'disconnect')

    def _close_fds(self, broker):
        for fd in {self.rfd, self.wfd} - {None}:
            try:
                os.close(fd)
            except OSError:
                pass


class Waker(Stream):
    """The broker's self-pipe: other threads write a byte to wake it for deferred work."""

    def __init__(self, broker):
        Stream.__init__(self, 'waker')
        self.broker = broker
        self.rfd, self.wfd = os.pipe()
        for fd in (self.rfd, self.wfd):
            set_cloexec(fd)
            set_nonblock(fd)
        self.pending = False

    def wake(self):
        if self.pending:
            return
        self.pending = True
        try:
            os.write(self.wfd, b'\x00')
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EBADF):
                raise

    def on_readable(self, broker):
        try:
            os.read(self.rfd, 256)
        except BlockingIOError:
            pass
        self.pending = False


class _Lease:
    """A waiting thread's permission to read a MessageStream in the broker's place; see
    :meth:`MessageStream.lease`."""

    def __init__(self, stream):
        self.stream = stream
        self.fd = stream.rfd
        self.active = True

    def serve(self):
        """The stream is readable: read it, and end the lease if the broker must take over."""
        try:
            keep = self.stream._serve_lease()
        except Exception:
            LOG.exception('%r: reading %r for a waiting thread failed', self, self.stream)
            keep = False
        if not keep:
            self.end()

    def end(self):
        if self.active:
            self.active = False
            self.stream._end_lease()


class MessageStream(Stream):
    """A connection to a neighbouring context carrying frames in both directions.

    Any thread may call send(): when nothing is queued the frame is written at once from the
    caller's thread (one writev, header and body without joining them), and only what the
    kernel would not take is queued for the broker to finish. Reads happen on the broker
    thread, or on a thread waiting for a reply while it holds a lease (see lease()), and
    feed the Decoder; each complete message is handed to the router.
    """

    keep_alive = True
    #: Set where the peer acts with this context's authority (a unix client, see
    #: mitogen.unix): the peer's own messages then carry this auth_id once verified.
    auth_id = None

    def __init__(self, router, rfd, wfd, name, remote_id=None):
        Stream.__init__(self, name)
        self.router = router
        self.broker = router.broker
        self.rfd = rfd
        self.wfd = wfd
        self.remote_id = remote_id
        self.decoder = Decoder(router.max_message_size)
        self.routes = set()
        self.egress_ids = set()
        self.conn = None
        self._out = []  # a list: a deque costs 600 bytes per stream, empty or not
        self._out_lock = threading.Lock()
        self._read_lock = threading.Lock()  # held by whichever thread reads rfd
        self.lent = False  # a waiting thread reads rfd instead of the broker (see lease())
        self._close_rfd_on_return = False
        self._deferred_in = self._deferred_out = 0  # messages a lease handed to the broker
        self._queued = 0      # bytes in _out
        self._drained = None  # a Condition on _out_lock, for threads waiting for room
        self._paused = []     # streams not read until this one's queue has room
        self._watching = False
        self.rx_bytes = self.tx_bytes = 0
        for fd in (rfd, wfd):
            set_nonblock(fd)
            set_cloexec(fd)

    #: Bytes queued for a peer that reads slowly or not at all, beyond which a sending
    #: thread waits, and the broker stops reading whatever stream fed the queue.
    max_queued = 16 * 1048576
    #: A peer that takes nothing of a full queue for this long is disconnected.
    drain_timeout = 60.0

    def send(self, msg):
        header = msg.pack_header()
        data = msg.data
        with self._out_lock:
            if self._out and self._queued >= self.max_queued:
                self._full(True)
            if self.closed:
                failed = 'the stream to %s is closed' % (self.name,)
            elif self._out:
                self._out.append(memoryview(header))
                if data:
                    self._out.append(memoryview(data))
                self._queued += len(header) + len(data)
                if self._queued >= self.max_queued:
                    self._full(False)
                return
            else:
                failed = self._write_now(header, data)
                if failed is None:
                    return
        if failed == '':
            self.broker.defer(self._start_transmit)
        else:
            self.broker.defer(self._on_send_failed, msg, failed)

    def _full(self, wait):
        """The queue is full (called holding _out_lock). The broker never waits: it notes
        the stream, so that the stream it is reading is paused (Broker.pause_congested);
        another thread waits for room before it adds more (`wait`). A peer that drains
        nothing for drain_timeout seconds is disconnected."""
        if not self._watching:
            self._watching = True
            self.broker.defer(self._watch_drain, -1)
        if threading.current_thread() is self.broker._thread:
            self.broker.congested = self
            return
        if not wait:
            return
        if self._drained is None:
            self._drained = threading.Condition(self._out_lock)
        while self._queued >= self.max_queued and not self.closed:
            self._drained.wait()

    def _watch_drain(self, last_tx):
        if self.closed or self._queued < self.max_queued:
            self._watching = False
        elif self.tx_bytes == last_tx:
            LOG.error('%r: the peer took none of %d queued bytes in %.0fs: disconnecting',
                      self, self._queued, self.drain_timeout)
            self.on_disconnect(self.broker)
        else:
            tx = self.tx_bytes
            self.broker.timer(self.drain_timeout, lambda: self._watch_drain(tx))

    def pause(self, source):
        """Stop reading `source` until this stream's queue has room (broker thread)."""
        if source.paused is None:
            source.paused = self
            self._paused.append(source)
            self.broker._update(source.rfd)

    def _resume(self, source):
        source.paused = None
        if not source.closed:
            self.broker._update(source.rfd)
            lock = getattr(source, '_read_lock', None)
            if lock is not None and lock.acquire(False):
                try:
                    source.process_buffered(self.broker)
                finally:
                    lock.release()

    def _room(self):
        """Room again (called holding _out_lock): wake waiting threads; return the
        streams to read again, to be resumed once the lock is released."""
        if self._drained is not None:
            self._drained.notify_all()
        paused, self._paused = self._paused, []
        return paused

    def _write_now(self, header, data):
        """Write directly; return None when done, '' when the rest was queued, else why
        it failed."""
        try:
            written = os.writev(self.wfd, [header, data] if data else [header])
        except BlockingIOError:
            written = 0
        except OSError as e:
            return 'write failed: %s' % (e,)
        self.tx_bytes += written
        total = len(header) + len(data)
        if written == total:
            return None
        if written < len(header):
            self._out.append(memoryview(header)[written:])
            if data:
                self._out.append(memoryview(data))
        else:
            self._out.append(memoryview(data)[written - len(header):])
        self._queued = total - written
        return ''

    def _on_send_failed(self, msg, reason):
        self.router._refuse(msg, reason)
        self.on_disconnect(self.broker)

    def _start_transmit(self):
        if not self.closed and self._out:
            self.broker._start_transmit(self)

    @property
    def pending_bytes(self):
        return self._queued

    def on_writable(self, broker):
        resume = ()
        with self._out_lock:
            failed = None
            full = self._queued >= self.max_queued
            while self._out:
                try:
                    written = os.writev(self.wfd, self._out[:64])
                except BlockingIOError:
                    break
                except OSError as e:
                    failed = e
                    break
                self.tx_bytes += written
                self._queued -= written
                done = 0
                while written and written >= len(self._out[done]):
                    written -= len(self._out[done])
                    done += 1
                del self._out[:done]
                if written:
                    self._out[0] = self._out[0][written:]
            if not self._out:
                broker._stop_transmit(self)
            if full and self._queued < self.max_queued:
                resume = self._room()
        for stream in resume:
            self._resume(stream)
        if failed is not None:
            LOG.debug('%r: write failed: %s', self, failed)
            self.on_disconnect(broker)

    def on_readable(self, broker):
        if not self._read_lock.acquire(False):
            return  # a lease holder is reading it
        try:
            n = self._read_into_decoder()
            if n is None:
                return
            if not n:
                if self.decoder.pending:
                    LOG.error('%r: the stream ended inside a frame (truncated frame)', self)
                self.on_disconnect(broker)
                return
            self.process_buffered(broker)
        finally:
            self._read_lock.release()

    def _read_into_decoder(self):
        """One read into the decoder: the byte count, 0 at end of stream or on an error,
        None when nothing was ready."""
        decoder = self.decoder
        target = decoder.read_target()
        try:
            if target is not None:
                n = os.readv(self.rfd, [target])
                target.release()
                decoder.advance(n)
            else:
                buf = _read_buffer()
                n = os.readv(self.rfd, [buf])
                decoder.feed(memoryview(buf)[:n])
        except BlockingIOError:
            return None
        except OSError as e:
            LOG.debug('%r: read failed: %s', self, e)
            return 0
        self.rx_bytes += n
        return n

    def lease(self):
        """Let the calling thread read this stream while it waits for a reply, instead of
        the broker thread (which would then have to wake it): a :class:`_Lease`, or None
        when another thread is reading, the stream is closed, or the broker cannot lend.

        The holder routes messages for ``any_thread`` handlers (receivers, the importer)
        and messages to forward along known routes itself. Anything else goes to the broker
        thread in arrival order and ends the lease; until the broker has run what it was
        handed, every later message goes the same way and the broker does not read the
        stream, so nothing overtakes a message before it (a reply never arrives before its
        ADD_ROUTE).
        """
        if threading.current_thread() is self.broker._thread:
            return None
        if not self._read_lock.acquire(False):
            return None
        if not self.broker._lend(self):
            self._read_lock.release()
            return None
        return _Lease(self)

    def _end_lease(self):
        try:
            self.broker._reclaim(self)
        finally:
            self._read_lock.release()

    def _serve_lease(self):
        """Read on the lease holder's thread; False when the lease should end: at end of
        stream, on an error or a corrupt frame (so that the broker sees and handles it),
        and once a message had to go to the broker (the stream is busy with the broker's
        traffic, which the broker had better read itself than be handed one by one)."""
        n = self._read_into_decoder()
        if n is None:
            return True
        if not n:
            return False
        router = self.router
        handed = False
        while True:
            try:
                msg = self.decoder.next_message()
            except CorruptFrameError as e:
                self._hand_to_broker(self._on_corrupt, e)
                return False
            if msg is None:
                return not handed
            msg.router = router
            if self._deferred_in == self._deferred_out and not msg.oversize and \
                    router._delivers_here(msg, self):
                router._async_route(msg, self)
            else:
                self._hand_to_broker(self._route_received, msg)
                handed = True

    def _hand_to_broker(self, func, *args):
        self._deferred_in += 1
        self.broker.defer(self._run_handed, func, args)

    def _run_handed(self, func, args):
        try:
            func(*args)
        finally:
            self._deferred_out += 1

    def _route_received(self, msg):
        if not self.closed:
            self.router._async_route(msg, self)
            self.broker.pause_congested(self)

    def _on_corrupt(self, error):
        LOG.error('%r: %s; disconnecting', self, error)
        self.on_disconnect(self.broker)

    def process_buffered(self, broker):
        """Route every complete message the decoder holds, until one fills a queue."""
        decoder = self.decoder
        router = self.router
        while self.paused is None and not self.closed:
            try:
                msg = decoder.next_message()
            except CorruptFrameError as e:
                self._on_corrupt(e)
                return
            if msg is None:
                return
            msg.router = router
            router._async_route(msg, self)
            broker.pause_congested(self)

    def on_shutdown(self, broker):
        if self is self.router.parent_stream:
            self.keep_alive = False

    def on_disconnect(self, broker):
        with self._out_lock:  # closed under the lock: no thread may write after this
            if self.closed:
                return
            self.closed = True
            self._out.clear()
            self._queued = 0
            resume = self._room()
        for stream in resume:
            self._resume(stream)
        self._gone(broker)
        self.router._on_stream_disconnect(self)  # called, not listened for: no per-stream
        # listener to keep

    def _close_fds(self, broker):
        keep = None
        with broker._lend_lock:
            if self.lent:
                # A waiting thread is polling rfd: closing it now could let the number be
                # reused under it. It closes rfd when it gives the stream back.
                self._close_rfd_on_return = True
                keep = self.rfd
        for fd in {self.rfd, self.wfd} - {None, keep}:
            try:
                os.close(fd)
            except OSError:
                pass


class Broker:
    """The IO multiplexer: one thread that does every read, timer and deferred call.

    Other threads hand it work with defer(); they may also write to streams directly (see
    MessageStream.send). shutdown() lets streams finish gracefully for up to
    ``shutdown_timeout`` seconds, then disconnects whatever is left.
    """

    shutdown_timeout = 3.0
    poller_class = EpollPoller  # Linux; mitogen.master.PollPoller is the portable one

    def __init__(self, poller_class=None):
        self.poller = (poller_class or self.poller_class)()
        self._readers = {}
        self._writers = {}
        self._deferred = collections.deque()
        self._timers = []
        self._lend_lock = threading.Lock()  # poller masks and MessageStream.lent
        #: A stream whose queue was filled by what the broker is doing now (see
        #: MessageStream._full): the stream being read is paused for it.
        self.congested = None
        self._alive = True
        self._exited = False
        self._waker = Waker(self)
        self.start_receive(self._waker)
        self._thread = threading.Thread(target=self._run, name='mitogen.broker', daemon=True)
        self._thread.start()

    def __repr__(self):
        return 'Broker(%#x)' % (id(self),)

    # --- API for other threads

    def defer(self, func, *args, **kwargs):
        """Run ``func(*args, **kwargs)`` on the broker thread soon."""
        if self._exited:
            raise Error('the broker has shut down: it cannot run %r', func)
        self._deferred.append((func, args, kwargs))
        if threading.current_thread() is not self._thread:
            self._waker.wake()

    def defer_sync(self, func):
        """Run `func` on the broker thread and return its result here."""
        if threading.current_thread() is self._thread:
            return func()
        latch = Latch()

        def run():
            try:
                latch.put((True, func()))
            except Exception as e:
                latch.put((False, e))

        self.defer(run)
        ok, value = latch.get()
        if not ok:
            raise value
        return value

    def shutdown(self):
        """Begin a graceful shutdown; join() waits for it to finish."""
        if not self._exited:
            self.defer(self._begin_shutdown)

    def join(self):
        self._thread.join()

    def keep_alive(self):
        """True while some stream still holds up shutdown."""
        return any(s.keep_alive for s in self._readers.values()) or \
            any(getattr(s, '_out', None) for s in self._writers.values())

    @property
    def running(self):
        return self._alive

    # --- registration (broker thread)

    def start_receive(self, stream):
        self._readers[stream.rfd] = stream
        self._update(stream.rfd)

    def stop_receive(self, stream):
        if self._readers.get(stream.rfd) is stream:
            del self._readers[stream.rfd]
            self._update(stream.rfd)

    def _start_transmit(self, stream):
        self._writers[stream.wfd] = stream
        self._update(stream.wfd)

    def _stop_transmit(self, stream):
        if self._writers.get(stream.wfd) is stream:
            del self._writers[stream.wfd]
            self._update(stream.wfd)

    def _update(self, fd):
        with self._lend_lock:
            self._update_locked(fd)

    def _update_locked(self, fd):
        mask = 0
        reader = self._readers.get(fd)
        if reader is not None and not getattr(reader, 'lent', False) and reader.paused is None:
            mask |= self.poller.READ
        if fd in self._writers:
            mask |= self.poller.WRITE
        try:
            self.poller.set_mask(fd, mask)
        except (OSError, ValueError) as e:
            if mask:
                raise
            LOG.debug('%r: unwatching fd %r: %s', self, fd, e)

    def _lend(self, stream):
        """Stop reading `stream` until _reclaim(): another thread reads it meanwhile. Only
        with a poller that other threads may change while the broker waits in it."""
        with self._lend_lock:
            if not (self._alive and self.poller.thread_safe and not stream.closed
                    and self._readers.get(stream.rfd) is stream):
                return False
            stream.lent = True
            self._update_locked(stream.rfd)
            return True

    def _reclaim(self, stream):
        with self._lend_lock:
            stream.lent = False
            if stream._close_rfd_on_return:
                stream._close_rfd_on_return = False
                try:
                    os.close(stream.rfd)
                except OSError:
                    pass
                return
            if stream._deferred_in == stream._deferred_out:
                self._rearm_locked(stream)
                return
        # Messages the lease holder handed over are still queued: read on only after
        # them (the queue runs in order), or newer messages would overtake them.
        try:
            self.defer(self._rearm, stream)
        except Error:
            pass  # the broker has exited: nobody reads any more

    def _rearm(self, stream):
        with self._lend_lock:
            self._rearm_locked(stream)

    def _rearm_locked(self, stream):
        if not self._exited and not stream.lent and self._readers.get(stream.rfd) is stream:
            self._update_locked(stream.rfd)

    def timer(self, delay, func):
        """Call `func` on the broker thread after `delay` seconds; returns a Timer."""
        timer = Timer(now() + delay, func)
        heapq.heappush(self._timers, timer)
        return timer

    # --- the loop

    def _begin_shutdown(self):
        self._alive = False

    def _run_deferred(self):
        while self._deferred:
            func, args, kwargs = self._deferred.popleft()
            try:
                func(*args, **kwargs)
            except Exception:
                LOG.exception('%r: deferred %r failed', self, func)

    def _next_timeout(self, limit=None):
        if self._deferred:
            return 0
        while self._timers and not self._timers[0].active:
            heapq.heappop(self._timers)
        timeout = limit
        if self._timers:
            due = max(0.0, self._timers[0].when - now())
            timeout = due if timeout is None else min(timeout, due)
        return timeout

    def _fire_timers(self):
        t = now()
        while self._timers and self._timers[0].when <= t:
            timer = heapq.heappop(self._timers)
            if timer.active:
                timer.active = False
                try:
                    timer.func()
                except Exception:
                    LOG.exception('%r: timer %r failed', self, timer.func)

    def pause_congested(self, source):
        """If what was just read from `source` filled some stream's queue, stop reading
        `source` until that queue has room: backpressure, without the broker waiting."""
        congested = self.congested
        if congested is not None:
            self.congested = None
            congested.pause(source)

    def _loop_once(self, timeout=None):
        """Wait for and handle one round of events; returns the events handled."""
        events = self.poller.poll(self._next_timeout(timeout))
        for fd, mask in events:
            if mask & ~self.poller.WRITE:
                stream = self._readers.get(fd)
                if stream is not None:
                    self._call(stream, stream.on_readable)
                    self.pause_congested(stream)
            if mask & self.poller.WRITE:
                stream = self._writers.get(fd)
                if stream is not None:
                    self._call(stream, stream.on_writable)
        self._run_deferred()
        self._fire_timers()
        self.congested = None  # filled by deferred work or a timer: nothing to pause
        return events

    def _call(self, stream, func):
        try:
            func(self)
        except Exception:
            LOG.exception('%r: %r failed; disconnecting it', self, func)
            try:
                stream.on_disconnect(self)
            except Exception:
                LOG.exception('%r: disconnecting %r failed', self, stream)

    def _run(self):
        try:
            while self._alive:
                self._loop_once()
            self._graceful_shutdown()
        except Exception:
            LOG.exception('%r: the broker crashed', self)
        finally:
            self._final_cleanup()

    def _graceful_shutdown(self):
        fire(self, 'shutdown')
        for stream in self._all_streams():
            self._call(stream, stream.on_shutdown)
        deadline = now() + self.shutdown_timeout
        while self.keep_alive() and now() < deadline:
            self._loop_once(max(0.0, deadline - now()))
        if self.keep_alive():
            LOG.error('%r: %r did not finish within %.1fs; forcing them', self,
                      [s for s in self._all_streams() if s.keep_alive], self.shutdown_timeout)

    def _all_streams(self):
        streams = list(self._readers.values()) + list(self._writers.values())
        return [s for i, s in enumerate(streams) if s not in streams[:i]]

    def _final_cleanup(self):
        for stream in self._all_streams():
            if stream is not self._waker:
                self._call(stream, stream.on_disconnect)
        self._run_deferred()
        self._exited = True
        fire(self, 'exit')
        self._waker.on_disconnect(self)
        self.poller.close()


# ---------------------------------------------------------------------------------------------
# 8. The importer
# ---------------------------------------------------------------------------------------------


def _load_site():
    """Load site, once: a child's interpreter starts with -S (site and its .pth files cost a
    new interpreter more than the rest of its start), and a module that is neither the
    standard library's nor the master's may be installed in the child's site-packages."""
    global _load_site
    _load_site = lambda: None  # once, whatever happens
    if sys.flags.no_site:
        import site
        site.main()


class Importer:
    """Imports modules that this context's own Python lacks by asking the parent for them.

    Installed first on ``sys.meta_path``. For a top-level name the local interpreter is asked
    first; only when it cannot import the module is GET_MODULE sent upward. Submodules of a
    package that came from the parent always come from the parent too (mixing versions would be
    worse), and a name missing from that package's submodule list fails at once, without a
    message ("Avoiding Negative Imports"). One request per module is ever in flight, shared by
    every thread and every child; the lock is never held while waiting.
    """

    def __init__(self, router, context, core_src, whitelist=(), blacklist=()):
        self._router = router
        self._context = context
        self._lock = threading.Lock()
        self._cache = {}      # fullname -> (pkg_present, path, source bytes, related) or None
        self._pending = {}    # fullname -> [callbacks]
        self._local = threading.local()
        self.whitelist = list(whitelist)
        self.blacklist = list(blacklist)
        self.get_module_count = 0
        self._lost = False
        if core_src is not None:
            self._cache['mitogen.core'] = (None, 'mitogen/core.py', core_src, [])
        router.add_handler(self._on_load_module, LOAD_MODULE, policy=self._from_parent)
        listen(router.broker, 'exit', self._abort_pending)

    def __repr__(self):
        return 'Importer'

    @staticmethod
    def _from_parent(msg, stream):
        """Module code only from the parent stream, and only from a parent: a sibling's
        LOAD_MODULE arrives on the parent stream too."""
        return stream is not None and stream is stream.router.parent_stream and \
            has_parent_authority(msg)

    # --- cache

    def _on_load_module(self, msg):
        if msg.is_dead:
            return
        self._store(*msg.unpickle())

    # _store() is thread-safe: an importing thread holding a lease on the parent stream
    # may store its module itself (see MessageStream.lease).
    _on_load_module.any_thread = True

    def _store(self, fullname, pkg_present, path, compressed, related, code=None):
        """Cache a module; `compressed` None means it cannot be served, and `path` then
        says why (or is None for a plain "no such module"). `code`, when the parent runs the
        same Python version, is the compressed marshalled code: no compiling here."""
        if compressed is None:
            entry = path
        else:
            entry = (pkg_present, path, zlib.decompress(compressed), list(related or ()),
                     compressed, code)
        with self._lock:
            self._cache[fullname] = entry
            callbacks = self._pending.pop(fullname, [])
        for callback in callbacks:
            callback()

    def _abort_pending(self):
        """The parent is gone: nothing will answer, so fail every waiting import now, and
        every later one at once."""
        self._lost = True
        for fullname in list(self._pending):
            self._store(fullname, None, 'the parent connection was lost while importing %s'
                        % (fullname,), None, None)

    def get_cached(self, fullname):
        return self._cache.get(fullname)

    def request(self, fullname, callback, hint=None):
        """Call `callback` once `fullname` is cached, asking the parent at most once.

        `hint` names the module the caller is really after (``pkg.mod`` while ``pkg`` is
        being imported), so the parent can send it along with the package in one round trip.
        """
        with self._lock:
            if self._lost and fullname not in self._cache:
                self._cache[fullname] = 'the parent connection was lost before importing ' \
                    + fullname
            if fullname in self._cache:
                ready = True
            else:
                ready = False
                waiters = self._pending.get(fullname)
                first = waiters is None
                if first:
                    waiters = self._pending[fullname] = []
                waiters.append(callback)
        if ready:
            callback()
        elif first:
            self.get_module_count += 1
            body = '%s\n%s\n%s' % (fullname, hint or '', BYTECODE_MAGIC)
            self._context.send(Message(data=body.encode('utf-8'), handle=GET_MODULE,
                                       enc=ENC_BIN))

    def _fetch(self, fullname):
        if fullname not in self._cache:
            if threading.current_thread() is self._router.broker._thread:
                # Only the broker reads the answer: waiting for it here would wait forever.
                raise ImportError('%s cannot be fetched on the broker thread' % (fullname,),
                                  name=fullname)
            latch = Latch()
            stream = self._router.parent_stream
            lease = stream.lease() if stream is not None else None
            try:
                self.request(fullname, latch.put, self._import_target(fullname))
            except BaseException:
                if lease is not None:
                    lease.end()
                raise
            latch.get(lease=lease)
        return self._cache[fullname]

    @staticmethod
    def _import_target(fullname):
        """The submodule that importing `fullname` is a step towards, if any: ``import
        a.b.c`` imports ``a`` first, and asking for ``a.b.c`` along with it saves two round
        trips. Found in the import system's own frames, else the dispatcher's hint."""
        target = getattr(_thread_state, 'import_hint', None)
        frame = sys._getframe(2)
        while frame is not None:
            if frame.f_code.co_name == '_find_and_load_unlocked':
                name = frame.f_locals.get('name')
                if isinstance(name, str) and name.startswith(fullname + '.'):
                    target = name
            frame = frame.f_back
        if target and target.startswith(fullname + '.'):
            return target
        return None

    # --- finder

    def _refused_by_policy(self, fullname):
        def matches(prefixes):
            return any(fullname == p or fullname.startswith(p + '.') for p in prefixes)
        if self.whitelist and not matches(self.whitelist):
            return 'the import policy (whitelist %r) refuses to send it' % (self.whitelist,)
        if matches(self.blacklist):
            return 'the import policy (blacklist) refuses to send it'
        return None

    def _is_ours(self, fullname):
        """Decide whether this importer should serve `fullname`; may ask local Python, never
        the parent. A top-level module this interpreter has is always its own ("local
        first"), even when the parent sent a copy of it."""
        refusal = self._refused_by_policy(fullname)
        if refusal:
            if not self._found_locally(fullname):
                raise ImportError('%s is not installed here, and %s of this tree'
                                  % (fullname, refusal), name=fullname)
            return False
        parent, _, _ = fullname.rpartition('.')
        if parent:
            if parent == 'mitogen':
                return True
            entry = self._cache.get(parent)
            # Ours only below a package we loaded: a local one may have a copy cached too.
            return isinstance(entry, tuple) and fullname in (entry[0] or ()) and \
                getattr(sys.modules.get(parent), '__loader__', None) is self
        if fullname == '__main__':
            return True
        if fullname in getattr(sys, 'stdlib_module_names', ()):
            return False  # a platform module missing here (msvcrt): the master has no copy
        return not self._found_locally(fullname)

    def _found_locally(self, fullname):
        """Whether this interpreter can import top-level `fullname` without us."""
        if getattr(self._local, 'busy', False):
            return True
        self._local.busy = True
        try:
            _load_site()
            for finder in sys.meta_path:
                find_spec = getattr(finder, 'find_spec', None)
                if finder is not self and find_spec and find_spec(fullname, None) is not None:
                    return True
            return False
        except (ImportError, ValueError):
            return False
        finally:
            self._local.busy = False

    def find_spec(self, fullname, path=None, target=None):
        """A spec when this importer will load `fullname`. Nothing is fetched here: Python
        calls finders holding its global import lock, which would stop every other thread's
        imports (the broker's included) for a round trip, or for ever if the parent died."""
        if getattr(self._local, 'busy', False) or not self._is_ours(fullname):
            return None
        spec = importlib.machinery.ModuleSpec(fullname, self)
        entry = self._cache.get(fullname)
        if isinstance(entry, tuple):
            self._describe(spec, entry)
        return spec

    @staticmethod
    def _describe(spec, entry):
        spec.origin = entry[1]
        spec.has_location = True
        if entry[0] is not None:
            spec.submodule_search_locations = [os.path.dirname(entry[1])]

    # --- loader

    def create_module(self, spec):
        """Fetch the module (holding only its own import lock) and complete its spec."""
        entry = self._fetch(spec.name)
        if entry is None:
            raise ModuleNotFoundError('No module named %r' % (spec.name,), name=spec.name)
        if isinstance(entry, str):
            raise ImportError(entry, name=spec.name)
        self._describe(spec, entry)

    def exec_module(self, module):
        fullname = module.__name__
        entry = self._cache[fullname]
        origin, source = entry[1:3]
        module.__file__ = origin
        module.__loader__ = self
        if len(entry) > 5 and entry[5]:
            code = marshal.loads(zlib.decompress(entry[5]))
        else:
            code = compile(source, origin, 'exec', dont_inherit=True)
        exec(code, module.__dict__)

    def get_source(self, fullname):
        entry = self._cache.get(fullname)
        if entry is not None:
            return entry[2].decode('utf-8', 'replace')
        raise ImportError('%s was not imported by mitogen' % (fullname,), name=fullname)

    def is_package(self, fullname):
        entry = self._cache.get(fullname)
        return entry is not None and entry[0] is not None

    # importlib.resources and pkgutil.get_data() read the files of a package served by the
    # master from the master too, with mitogen.resources, fetched on first use.

    def get_resource_reader(self, fullname):
        return importlib.import_module('mitogen.resources').reader(self, fullname)

    def get_data(self, path):
        return importlib.import_module('mitogen.resources').get_data(self, path)


# ---------------------------------------------------------------------------------------------
# 9. Logging and stdio forwarding
# ---------------------------------------------------------------------------------------------


class _AfterImport:
    """Calls `callback(module)` as soon as this interpreter has imported `fullname` itself,
    then leaves ``sys.meta_path``.

    A child forwards log records from the moment logging exists, without importing logging
    at start: this finder is asked first when anything imports it, and wraps the real
    loader for that one import.
    """

    def __init__(self, fullname, callback):
        self.fullname = fullname
        self.callback = callback
        self._loader = None

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.fullname or self._loader is not None:
            return None
        try:
            sys.meta_path.remove(self)
        except ValueError:
            pass
        for finder in list(sys.meta_path):
            find_spec = getattr(finder, 'find_spec', None)
            spec = find_spec(fullname, path, target) if find_spec else None
            if spec is not None:
                if spec.loader is None or not hasattr(spec.loader, 'exec_module'):
                    return spec
                self._loader = spec.loader
                spec.loader = self
                return spec
        return None

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        module.__loader__ = module.__spec__.loader = self._loader
        self._loader.exec_module(module)
        self.callback(module)


class IoLogger(Stream):
    """Turns everything written to one of the child's standard descriptors into log lines
    for the master, sent straight to its FORWARD_LOG handle as records of the logger named
    after the descriptor (``stdout``, ``stderr``) at INFO level.

    A socketpair rather than a pipe, so that at shutdown ``shutdown(SHUT_WR)`` ends the stream
    even when a daemon started by user code still holds a copy of the descriptor.
    """

    keep_alive = True

    def __init__(self, broker, name, dest_fd, context, enabled=True):
        Stream.__init__(self, name)
        self._context = context
        self._enabled = enabled
        self._buf = b''
        rsock, self._wsock = _socket.socketpair()
        self.rfd = os.dup(rsock.fileno())
        rsock.close()
        set_cloexec(self.rfd)
        set_nonblock(self.rfd)
        os.dup2(self._wsock.fileno(), dest_fd)
        set_cloexec(self._wsock.fileno())

    def _log_lines(self, lines):
        if not self._enabled:
            return
        for line in lines:
            text = line.decode('utf-8', 'replace').rstrip('\r')
            self._context.send(Message.pickled((self.name, _INFO, text), handle=FORWARD_LOG))

    def on_readable(self, broker):
        data = read_chunk(self.rfd)
        if data is None:
            return
        if not data:
            if self._buf:
                self._log_lines([self._buf])
            self.on_disconnect(broker)
            return
        lines = (self._buf + data).split(b'\n')
        self._buf = lines.pop()
        self._log_lines(lines)

    def on_shutdown(self, broker):
        try:
            self._wsock.shutdown(_socket.SHUT_WR)
        except OSError:
            pass
        self._wsock.close()


# ---------------------------------------------------------------------------------------------
# 10. The child's entry point
# ---------------------------------------------------------------------------------------------


class ExternalContext:
    """The life of a child context, from the first line of bootstrap to exit.

    `config` is the dict the parent appended to this module's source: the context's place in
    the tree, log level, limits, and the descriptors the first stage left behind.
    """

    def __init__(self, config):
        self.config = config
        self.router = None
        self.broker = None
        self.parent = None
        self.dispatcher = None
        self.importer = None
        self._master = None
        self._exiting = False
        self.detached = False
        self._main_done = threading.Event()

    def _setup_package(self):
        """Make this module importable as ``mitogen.core`` in a synthetic ``mitogen`` package,
        so that pickles name its classes correctly and ``import mitogen.x`` reaches the
        importer; ``__main__`` is removed so that the master's own ``__main__`` is fetched on
        demand."""
        global mitogen
        package = types.ModuleType('mitogen')
        package.__path__ = []
        package.__package__ = 'mitogen'
        package.__file__ = 'mitogen/__init__.py'
        package.is_master = False
        package.context_id = self.config['context_id']
        package.parent_ids = list(self.config['parent_ids'])
        package.parent_id = package.parent_ids[0]
        package.__version__ = tuple(self.config.get('version', ()))
        mitogen = package
        core = sys.modules['__main__']
        core.__name__ = 'mitogen.core'
        core.__package__ = 'mitogen'
        core.__file__ = 'mitogen/core.py'
        package.core = core
        sys.modules['mitogen'] = package
        sys.modules['mitogen.core'] = core
        del sys.modules['__main__']
        for value in list(vars(core).values()):
            if getattr(value, '__module__', None) == '__main__':
                try:
                    value.__module__ = 'mitogen.core'
                except (AttributeError, TypeError):
                    pass

    def _setup_fds(self):
        """Take over the link to the parent left on fds 100 (read) and 1 (write), reap the
        first stage, and point stdin at /dev/null so nothing else can read the link."""
        config = self.config
        core_fd = config.get('core_fd')
        core_src = None
        if core_fd is not None:
            chunks = []
            while True:
                chunk = os.read(core_fd, 65536)
                if not chunk:
                    break
                chunks.append(chunk)
            os.close(core_fd)
            core_src = b''.join(chunks)
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            pass
        rfd = os.dup(config.get('in_fd', 100))
        wfd = os.dup(1)
        os.close(config.get('in_fd', 100))
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 0)
        os.close(null)
        return rfd, wfd, core_src

    def _setup_logging(self):
        """Forward log records to the master at its level: at once if logging is already
        loaded or debug logging is on, else the moment something imports it."""
        if 'logging' in sys.modules or self.config.get('debug'):
            import logging
            self._forward_logging(logging)
        else:
            _Logger.direct = self._log_direct
            sys.meta_path.insert(0, _AfterImport('logging', self._forward_logging))

    def _log_direct(self, name, level, text):
        if level >= self.config.get('log_level', _INFO):
            self._master.send(Message.pickled((name, level, text), handle=FORWARD_LOG))

    def _forward_logging(self, logging):
        """logging is here: install mitogen.logforward's handler (fetched now). Until it is
        in place the core's own records keep going straight to the master."""
        try:
            importlib.import_module('mitogen.logforward').install(
                self._master, self.config.get('log_level', _INFO), self.config.get('debug'))
        except ImportError as e:  # imported on the broker thread, or the parent is gone
            LOG.error('cannot forward log records: %s', e)
            return
        _Logger.direct = None

    def _setup_stdio(self):
        enabled = self.config.get('log_level', _INFO) <= _INFO
        self._stdout = IoLogger(self.broker, 'stdout', 1, self._master, enabled)
        self._stderr = IoLogger(self.broker, 'stderr', 2, self._master, enabled)
        self.broker.defer(self.broker.start_receive, self._stdout)
        self.broker.defer(self.broker.start_receive, self._stderr)
        sys.stdout = io.TextIOWrapper(io.FileIO(1, 'w', closefd=False), line_buffering=True,
                                      errors='backslashreplace')
        sys.stderr = io.TextIOWrapper(io.FileIO(2, 'w', closefd=False), line_buffering=True,
                                      errors='backslashreplace')

    def detach(self):
        """Outlive the parent: tell it not to end this process, then drop the link (see
        :func:`mitogen.parent.detach`, which does it: few children ever need it)."""
        importlib.import_module('mitogen.parent').detach(self)

    def _on_shutdown_msg(self, msg):
        if not msg.is_dead:
            self.broker.shutdown()

    def _on_parent_disconnect(self):
        if not self._exiting:
            LOG.debug('parent disconnected: shutting down')
        self.broker.shutdown()

    def _on_broker_exit(self):
        """Last step of the broker thread: a main thread still busy with user code is ended
        with SIGTERM, so that a hung function can never keep the process alive."""
        if not self._main_done.wait(1.0):
            os.kill(os.getpid(), _signal.SIGTERM)

    def _start_router(self, rfd, wfd, core_src):
        config = self.config
        Router.max_message_size = config.get('max_message_size', Router.max_message_size)
        self.broker = Broker()
        self.router = Router(self.broker)
        self.router.unidirectional = config.get('unidirectional', False)
        parent_id = mitogen.parent_id
        self.parent = self.router.context_by_id(parent_id, name='parent')
        self._master = self.router.context_by_id(0, name='master')
        stream = MessageStream(self.router, rfd, wfd, 'parent', remote_id=parent_id)
        self.router.parent_stream = stream
        listen(stream, 'disconnect', self._on_parent_disconnect)
        listen(self.broker, 'exit', self._on_broker_exit)
        self.router.add_handler(self._on_shutdown_msg, SHUTDOWN, policy=has_parent_authority)
        self.importer = Importer(self.router, self.parent, core_src,
                                 config.get('whitelist', ()), config.get('blacklist', ()))
        sys.meta_path.insert(0, self.importer)
        listen(stream, 'disconnect', self.importer._abort_pending)
        self.dispatcher = Dispatcher(self)
        self.broker.defer(self.broker.start_receive, stream)

    def main(self):
        self._setup_package()
        executable = sys.executable
        if '(mitogen:' in executable:
            sys.executable = executable[:executable.index('(mitogen:')]
        sys.path[:] = [p for p in sys.path if p]
        rfd, wfd, core_src = self._setup_fds()
        self._start_router(rfd, wfd, core_src)
        if sys.version_info < (3, 10):  # its resources.files() never asks the loader
            sys.meta_path.insert(0, _AfterImport('importlib._common', lambda m: importlib.
                                                 import_module('mitogen.resources').fix_files(m)))
        self._setup_logging()
        LOG.debug('context %d started under %r', mitogen.context_id, mitogen.parent_ids)
        if self.config.get('stdio', True):
            self._setup_stdio()
        try:
            self.dispatcher.run()
        finally:
            self._exiting = True
            self._main_done.set()
            self.broker.shutdown()
            self.broker.join()


def __getattr__(name):
    """Names that exist only for compatibility with Mitogen live in mitogen.parity, which
    is loaded (fetched, in a child) the first time one is used."""
    if name[0] == '_':
        raise AttributeError(name)
    return importlib.import_module('mitogen.parity').lookup(__name__, name)
