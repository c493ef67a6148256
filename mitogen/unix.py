"""Attach another process to a running tree through a UNIX socket.

A process with a tree (the master, usually) listens with :meth:`Listener.build_stream`;
another process of the same user calls :func:`connect` and gets a router of its own and the
listener's context, through which it can call any context the listener can reach, as that
process would. The client's messages carry the listener's ``auth_id`` once the listener has
verified where they came from ("Source Verification": the field exists so that an isolated
process can be granted the privilege of the one it connects to); nothing else about the tree's
trust changes. Its context ID comes from the tree's allocator, and its going away is
announced with ``DEL_ROUTE`` like any other context's.

Only the listening user may attach: the socket is created mode 0600 (in a mode 0700
directory when the path is chosen here), and each client's uid is checked with
``SO_PEERCRED``; another user's client is refused and the refusal logged. The socket is
removed when the listener's broker shuts down; a stale socket left by a crashed listener is
replaced by the next listener on the same path.

The handshake: once accepted, the listener writes its answer, three big-endian 32-bit
numbers (the client's new context ID, the listener's context ID, the listener's pid); both
ends then speak the usual frames.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct
import tempfile
import threading
from typing import Any

import mitogen
import mitogen.core
import mitogen.parent
from mitogen.core import ADD_ROUTE, Message, MessageStream, Stream

__all__ = ["ConnectError", "Error", "Listener", "connect", "is_path_dead", "make_socket_path"]

LOG = logging.getLogger(__name__)

_HANDSHAKE = struct.Struct(">LLL")
_PEERCRED = struct.Struct("3i")  # pid, uid, gid

#: Seconds a client waits for the listener's answer.
CONNECT_TIMEOUT = 30.0


class Error(mitogen.core.Error):
    """Base of this module's errors."""


class ConnectError(Error):
    """:func:`connect` could not attach; ``errno`` says why when the OS did."""

    errno: int | None = None


def is_path_dead(path: str) -> bool:
    """True when nothing listens on `path`: a stale socket, or no socket at all."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError as e:
        return e.errno in (errno.ECONNREFUSED, errno.ENOENT)
    finally:
        sock.close()
    return False


def make_socket_path() -> str:
    """A fresh socket path inside a new directory only this user may enter (mode 0700)."""
    return os.path.join(tempfile.mkdtemp(prefix="mitogen_unix_"), "sock")


class Listener(Stream):
    """The listening socket, watched by the broker; each accepted client becomes a stream
    registered with the router. Build it with :meth:`build_stream`."""

    def __init__(self, router: Any, path: str, sock: socket.socket, own_dir: str | None):
        Stream.__init__(self, "unix_listener:%s" % (path,))
        self.router = router
        self.path = path
        self._sock = sock
        self._own_dir = own_dir
        self._inode = os.stat(path).st_ino
        self.rfd = sock.fileno()

    def __repr__(self) -> str:
        return "mitogen.unix.Listener(%r)" % (self.path,)

    @property
    def protocol(self) -> Listener:
        """The listener itself: Mitogen's Listener.build_stream() returns a stream whose
        ``protocol`` has the ``path``."""
        return self

    @classmethod
    def build_stream(cls, router: Any, path: str | None = None, backlog: int = 100) -> Listener:
        """Listen on `path` (default: a new private directory) and start accepting."""
        own_dir = None
        if not path:
            path = make_socket_path()
            own_dir = os.path.dirname(path)
        elif os.path.exists(path) and is_path_dead(path):
            LOG.debug("%s: removing the stale socket %s", cls.__name__, path)
            os.unlink(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            _bind_private(sock, path)
            sock.listen(backlog)
            sock.setblocking(False)
            mitogen.core.set_cloexec(sock.fileno())
            listener = cls(router, path, sock, own_dir)
        except BaseException:
            sock.close()
            if own_dir is not None:
                _remove_dir(own_dir)
            raise
        router.broker.defer(router.broker.start_receive, listener)
        mitogen.core.listen(router.broker, "shutdown", listener._on_broker_shutdown)
        return listener

    # --- accepting clients (broker thread)

    def on_readable(self, broker: Any) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                LOG.error("%r: accept failed: %s", self, e)
                return
            try:
                self._on_client(conn)
            except Exception:
                LOG.exception("%r: setting up a client failed", self)
                conn.close()

    def _on_client(self, conn: socket.socket) -> None:
        pid, uid, _gid = _PEERCRED.unpack(
            conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
        if uid != os.geteuid():
            LOG.error("%r: refused the client pid %d: its uid %d is not this process's "
                      "uid %d", self, pid, uid, os.geteuid())
            conn.close()
            return
        if self.router.parent_stream is None:
            self._admit(conn, pid, self.router.allocate_id())
        else:
            # In a child, an ID takes a round trip to the master: not on the broker thread.
            threading.Thread(target=self._admit_later, args=(conn, pid), daemon=True,
                             name="mitogen.unix.admit").start()

    def _admit_later(self, conn: socket.socket, pid: int) -> None:
        try:
            context_id = self.router.allocate_id()
            self.router.broker.defer(self._admit, conn, pid, context_id)
        except Exception:
            LOG.exception("%r: no context ID for the client pid %d", self, pid)
            conn.close()

    def _admit(self, conn: socket.socket, pid: int, context_id: int) -> None:
        """Give the client its ID and route it as a context of this router. Runs on the
        broker thread, so the route exists before anything the client sends is read."""
        try:
            conn.sendall(_HANDSHAKE.pack(context_id, mitogen.context_id, os.getpid()))
        except OSError as e:  # is_path_dead() probes this way, for one
            LOG.debug("%r: the client pid %d went away: %s", self, pid, e)
            conn.close()
            return
        fd = os.dup(conn.fileno())
        conn.close()
        name = "unix_client.%d" % (pid,)
        stream: Any = ClientStream(self.router, fd, os.dup(fd), name, remote_id=context_id)
        stream.auth_id = mitogen.context_id
        context = self.router.context_by_id(context_id, name=name)
        self.router.register(context, stream)
        self.router.broker.start_receive(stream)
        if self.router.parent_stream is not None:
            parent = self.router.context_by_id(mitogen.parent_id)
            parent.send(Message.pickled((context_id, name), handle=ADD_ROUTE))
        LOG.debug("%r: accepted pid %d as context %d", self, pid, context_id)

    # --- shutting down

    def _on_broker_shutdown(self) -> None:
        self.on_disconnect(self.router.broker)

    def on_disconnect(self, broker: Any) -> None:
        if self.closed:
            return
        try:
            mitogen.core.unlisten(broker, "shutdown", self._on_broker_shutdown)
        except ValueError:
            pass
        self._unlink()
        self._sock.detach()  # Stream.on_disconnect closes the descriptor
        Stream.on_disconnect(self, broker)

    def _unlink(self) -> None:
        """Remove the socket, unless another listener has replaced it meanwhile."""
        try:
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        if self._own_dir is not None:
            _remove_dir(self._own_dir)


class ClientStream(MessageStream):
    """The listener's end of a client's connection. The client is another program: at
    shutdown it is disconnected at once rather than waited for."""

    def on_shutdown(self, broker: Any) -> None:
        self.on_disconnect(broker)


def _bind_private(sock: socket.socket, path: str) -> None:
    """Bind `sock` to `path` as mode 0600 with no moment at a laxer mode: bound first in a
    private (0700) directory beside `path`, then linked into place (a link, unlike a
    rename, never replaces a socket someone else listens on)."""
    parent = os.path.dirname(os.path.abspath(path))
    staging = tempfile.mkdtemp(prefix=".mitogen_unix_", dir=parent)
    try:
        temp = os.path.join(staging, "sock")
        sock.bind(temp)
        os.chmod(temp, 0o600)
        try:
            os.link(temp, path)
        except FileExistsError:
            raise OSError(errno.EADDRINUSE, "another listener is using %s" % (path,)) from None
    finally:
        _remove_dir(staging)


def _remove_dir(path: str) -> None:
    try:
        for name in os.listdir(path):
            os.unlink(os.path.join(path, name))
        os.rmdir(path)
    except FileNotFoundError:
        pass


# ---------------------------------------------------------------------------------------------
# The client
# ---------------------------------------------------------------------------------------------


def _handshake(sock: socket.socket, path: str) -> tuple[int, int, int]:
    try:
        sock.settimeout(CONNECT_TIMEOUT)
        sock.connect(path)
        answer = b""
        while len(answer) < _HANDSHAKE.size:
            chunk = sock.recv(_HANDSHAKE.size - len(answer))
            if not chunk:
                raise ConnectError("%s closed the connection before answering: the listener "
                                   "refused this client (see its log)", path)
            answer += chunk
    except OSError as e:
        error = ConnectError("could not connect to %s: %s", path, e.strerror or e)
        error.errno = e.errno
        raise error
    return _HANDSHAKE.unpack(answer)


def connect(path: str, broker: Any = None) -> tuple[Any, mitogen.core.Context]:
    """Attach this process to the tree of the listener at `path`: returns ``(router,
    context)``, a new router (on `broker`, or a new one) and the listener's context.

    This process becomes a context of that tree: ``mitogen.context_id`` is the ID the
    listener allocated, and the listener is its parent.
    """
    import mitogen.master

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        context_id, remote_id, pid = _handshake(sock, path)
        fd = os.dup(sock.fileno())
    finally:
        sock.close()
    mitogen.context_id = context_id
    mitogen.parent_id = remote_id  # type: ignore[assignment]  # None only in a master
    mitogen.parent_ids = [remote_id]
    router = mitogen.master.Router(broker=broker)
    # IDs for this process's own children come from the tree's allocator too.
    router.id_allocator = mitogen.parent.ChildIdAllocator(router)
    stream = MessageStream(router, fd, os.dup(fd), "unix_listener.%d" % (pid,),
                           remote_id=remote_id)
    router.parent_stream = stream
    context = router.context_by_id(remote_id, name="unix_listener.%d" % (pid,))
    router.register(context, stream)
    mitogen.core.listen(stream, "disconnect", _cleanup)
    mitogen.core.listen(router.broker, "shutdown",
                        lambda: stream.on_disconnect(router.broker))
    router.broker.defer(router.broker.start_receive, stream)
    LOG.debug("connected to %s as context %d (listener: context %d)", path, context_id,
              remote_id)
    return router, context


def _cleanup() -> None:
    """The listener is gone: this process is a tree of its own again."""
    mitogen.context_id = 0
    mitogen.parent_id = None
    mitogen.parent_ids = []
