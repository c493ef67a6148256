"""Names that Mitogen 0.3.54 publishes and that this package's own design has no use for,
and the parts of Mitogen's behaviour that the bootstrap has no room for.

Programs written for Mitogen reach for them (``mitogen.core.b``, ``to_text``,
``Router.refused_msg``, ``mitogen.sudo.PASSWORD_PROMPT_RE``, ...), so they exist, but apart
from the code every context runs: a module's ``__getattr__`` finds its names here the first
time one is used (a child fetches this module only then, so the 16 KiB bootstrap does not
grow), and importing this module gives the classes of :mod:`mitogen.core` what Mitogen's
have besides: class attributes, ``Message()`` checking its arguments, ``Kwargs`` turning
bytes keys into text, ``Message.unpickle(find_class=...)``, and ``async for`` over a
``Receiver``. The master imports this module at once (:mod:`mitogen.master`); a child, the
first time it uses one of these names. The differences that remain, and why, are listed in
``mitogen/COMPAT.md``; ``tests/mitogen/test_parity.py`` checks both against Mitogen itself.
"""

from __future__ import annotations

import builtins
import errno
import functools
import importlib
import io
import logging
import os
import pickle
import shlex
import socket
import threading
import time
import traceback
from typing import Any, Callable, Iterator

import mitogen.core

__all__ = ["ImportPolicy", "PidfulStreamHandler", "lookup"]

#: Loggers whose level Mitogen copies into children; ``mitogen.io`` logs every read and write.
LOGGERS = ("", "mitogen", "mitogen.io")
IOLOG = logging.getLogger("mitogen.io")


# ---------------------------------------------------------------------------------------------
# Python 2/3 helpers: on Python 3 each is a builtin or a one-liner
# ---------------------------------------------------------------------------------------------


def to_text(o: Any) -> str:
    """`o` as a plain str: bytes are decoded as UTF-8, anything else goes through str()."""
    if isinstance(o, bytes):
        return o.decode("utf-8")
    return str(o)


def threading__thread_name(thread: threading.Thread) -> str:
    return thread.name


def module_lineage(fullname: str) -> Iterator[str]:
    """``a``, ``a.b``, ``a.b.c`` for ``a.b.c``: the module and the packages above it."""
    parts = fullname.split(".")
    return (".".join(parts[:i]) for i in range(1, len(parts) + 1))


def import_module(modname: str) -> Any:
    return importlib.import_module(modname)


def iter_split(buf: Any, delim: Any, func: Callable[[Any], Any]) -> tuple:
    """Call ``func(chunk)`` for each `delim`-terminated chunk of `buf`, stopping early when
    it returns False. Returns (what is left after the last delimiter used, whether every call
    asked to go on)."""
    start = 0
    go_on = True
    while go_on:
        end = buf.find(delim, start)
        if end < 0:
            break
        go_on = func(buf[start:end]) is not False
        start = end + len(delim)
    return buf[start:], go_on


def io_op(func: Callable[..., Any], *args: Any) -> tuple:
    """``(func(*args), None)``, or ``(None, error)`` when the call failed because the other
    end went away (EIO on a terminal, ECONNRESET on a socket, EPIPE on a pipe); EINTR is
    retried and any other error raised."""
    while True:
        try:
            return func(*args), None
        except OSError as e:
            if e.errno == errno.EINTR:
                continue
            if e.errno in (errno.EIO, errno.ECONNRESET, errno.EPIPE):
                return None, e
            raise


def _set_blocking_all(fds: list, blocking: bool | None) -> None:
    if blocking is not None:
        for fd in fds:
            os.set_blocking(fd, blocking)


def pipe(blocking: bool | None = None) -> tuple:
    """A pipe as two unbuffered file objects (read, write), closed when dropped."""
    rfd, wfd = os.pipe()
    _set_blocking_all([rfd, wfd], blocking)
    return os.fdopen(rfd, "rb", 0), os.fdopen(wfd, "wb", 0)


def socketpair(blocking: bool | None = None) -> tuple:
    a, b = socket.socketpair()
    _set_blocking_all([a.fileno(), b.fileno()], blocking)
    return a, b


# ---------------------------------------------------------------------------------------------
# Serialization helpers
# ---------------------------------------------------------------------------------------------


def find_deny(module: str, name: str) -> Any:
    """An unpickler policy that refuses every global."""
    raise pickle.UnpicklingError("refused to unpickle %s.%s: no global is allowed"
                                 % (module, name))


class Unpickler(pickle.Unpickler):
    """An unpickler whose globals are decided by `find_class` (default: none allowed)."""

    def __init__(self, file: Any, find_class: Callable[[str, str], Any] = find_deny) -> None:
        super().__init__(file, encoding="bytes")
        self._find = find_class

    def find_class(self, module: str, name: str) -> Any:
        return self._find(module, name)


class Pickler(pickle.Pickler):
    """pickle.Pickler with the protocol this package puts on the wire by default."""

    def __init__(self, file: Any, protocol: int = mitogen.core.PICKLE_PROTOCOL) -> None:
        super().__init__(file, protocol)


def _unpickle_iter(self: mitogen.core.Message, throw: bool = True, throw_dead: bool = True,
                   find_class: Callable[[str, str], Any] | None = None) -> Iterator[Any]:
    """Every object in the message's body: here a body always holds exactly one."""
    yield _unpickle(self, throw, throw_dead, find_class)


# ---------------------------------------------------------------------------------------------
# Import policy
# ---------------------------------------------------------------------------------------------


class ModuleDeniedByOverridesError(ModuleNotFoundError):
    fmt = "%s is not served: it is not under a prefix of the import policy's overrides"


class ModuleDeniedByBlocksError(ModuleNotFoundError):
    fmt = "%s is not served: it is under a prefix of the import policy's blocks"


class ModuleUnsuitableError(ModuleNotFoundError):
    fmt = "%s is not served: it cannot be sent (no Python source, or platform-only)"


class ImportPolicy:
    """Which modules the master serves: with `overrides`, only modules under one of those
    prefixes (what :meth:`ModuleResponder.whitelist_prefix` adds); never those under a
    prefix in `blocks` (:meth:`ModuleResponder.blacklist_prefix`). A prefix covers a module
    and everything below it."""

    def __init__(self, overrides: Any = (), blocks: Any = ()) -> None:
        self.overrides = set(overrides)
        self.blocks = set(blocks)

    def __repr__(self) -> str:
        return "ImportPolicy(overrides=%r, blocks=%r)" % (sorted(self.overrides),
                                                          sorted(self.blocks))

    def denied(self, fullname: str) -> Any:
        """The error class refusing `fullname`, or False when it may be served."""
        lineage = set(module_lineage(fullname))
        if self.overrides and not (self.overrides & lineage):
            return ModuleDeniedByOverridesError
        if self.blocks & lineage:
            return ModuleDeniedByBlocksError
        return False

    def denied_raise(self, fullname: str) -> None:
        denial = self.denied(fullname)
        if denial:
            raise denial(denial.fmt % (fullname,))

    def overriden(self, fullname: str) -> bool:
        return bool(self.overrides & set(module_lineage(fullname)))


# ---------------------------------------------------------------------------------------------
# Logging
# ---------------------------------------------------------------------------------------------


class PidfulStreamHandler(logging.StreamHandler):
    """Writes records to ``template % (pid, time)``, reopening it in a forked child so that
    each process keeps its own file. Installed by :func:`enable_debug_logging`."""

    open_pid: int | None = None
    template = "/tmp/mitogen.%s.%s.log"

    def _reopen(self) -> None:
        with self.lock:  # type: ignore[union-attr]  # made by Handler.__init__
            if self.open_pid == os.getpid():
                return
            path = self.template % (os.getpid(), time.strftime("%Y%m%d_%H%M%S"))
            self.stream = open(path, "w", 1)
            mitogen.core.set_cloexec(self.stream.fileno())
            self.stream.write("Parent PID: %s\nCreated by:\n\n%s\n" % (
                os.getppid(), "".join(traceback.format_stack())))
            self.open_pid = os.getpid()

    def emit(self, record: logging.LogRecord) -> None:
        if self.open_pid != os.getpid():
            self._reopen()
        super().emit(record)


def enable_debug_logging() -> None:
    """Log everything at DEBUG into a file per process (see PidfulStreamHandler)."""
    for name in LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG)
    handler = PidfulStreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname).1s %(name)s: "
                                           "%(message)s", "%H:%M:%S"))
    logging.getLogger().handlers.insert(0, handler)


def enable_profiling(econtext: Any = None) -> None:
    """Profile this process's threads from now on (see :mod:`mitogen.profiling`)."""
    import mitogen.profiling

    broker = getattr(econtext, "broker", None)
    mitogen.profiling.start(broker)


def _log_handler_class() -> type:
    import mitogen.logforward

    return mitogen.logforward.LogHandler


# ---------------------------------------------------------------------------------------------
# Terminal flags (mitogen.parent)
# ---------------------------------------------------------------------------------------------


def flags(names: str) -> int:
    """The termios flags named in the space-separated `names`, or-ed together (names this
    platform lacks count as 0)."""
    import termios

    value = 0
    for name in names.split():
        value |= getattr(termios, name, 0)
    return value


def cfmakeraw(tflags: list) -> list:
    """termios attributes (as termios.tcgetattr() returns them) changed to raw mode: no
    echo, no line editing, no signals from keys, no translation, 8-bit characters."""
    iflag, oflag, cflag, lflag, ispeed, ospeed, cc = tflags
    iflag &= ~flags("IGNBRK BRKINT PARMRK ISTRIP INLCR IGNCR ICRNL IXON IXOFF IMAXBEL")
    oflag &= ~flags("OPOST")
    lflag &= ~flags("ECHO ECHOE ECHOK ECHONL ICANON ISIG IEXTEN NOFLSH TOSTOP PENDIN")
    cflag = (cflag & ~flags("CSIZE PARENB")) | flags("CS8 CREAD")
    return [iflag, oflag, cflag, lflag, ispeed, ospeed, cc]


def _selinux_enabled() -> bool:
    try:
        with open("/sys/fs/selinux/enforce", "rb") as f:
            return f.read(1) == b"1"
    except OSError:
        return False


def _parent_pollers() -> dict:
    import mitogen.master

    core = mitogen.core
    return {
        "EpollPoller": core.EpollPoller,
        "PollPoller": mitogen.master.PollPoller,
        "POLLERS": (core.EpollPoller, mitogen.master.PollPoller),
        "PREFERRED_POLLER": core.Broker.poller_class,
        "Timer": core.Timer,
    }


def _libc() -> Any:
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


def setns(kind: str, fd: int) -> None:
    """Move the calling thread into the namespace open on `fd` (a /proc/PID/ns/`kind`).
    mitogen.setns never calls this in the master: its helper process does it."""
    import ctypes

    if _libc().setns(int(fd), 0) == -1:
        errno_ = ctypes.get_errno()
        raise OSError(errno_, "setns(%s, %s): %s" % (fd, kind, os.strerror(errno_)))


# ---------------------------------------------------------------------------------------------
# Class attributes of mitogen.core's classes
# ---------------------------------------------------------------------------------------------


#: The fields a Message has (its other slots are private).
_MESSAGE_FIELDS = frozenset(["dst_id", "src_id", "auth_id", "handle", "reply_to", "data",
                             "enc", "router", "receiver"])
_core_message_init = mitogen.core.Message.__init__
_core_unpickle = mitogen.core.Message.unpickle


def _message_init(self: mitogen.core.Message, **kwargs: Any) -> None:
    """Message(**fields), refusing fields that do not exist, a body that is not bytes and an
    encoding that is not one of ENC_*: a mistake then fails here, not on some stream."""
    unknown = sorted(set(kwargs) - _MESSAGE_FIELDS)
    if unknown:
        raise TypeError("Message() has no field %s (fields: %s)"
                        % (", ".join(unknown), ", ".join(sorted(_MESSAGE_FIELDS))))
    _core_message_init(self, **kwargs)
    if type(self.data) not in (bytes, bytearray):
        raise TypeError("Message data must be bytes or bytearray, not %s"
                        % (type(self.data).__name__,))
    if self.enc not in (mitogen.core.ENC_LEGACY, mitogen.core.ENC_PKL, mitogen.core.ENC_BIN):
        raise ValueError("Message enc must be ENC_PKL, ENC_BIN or ENC_MGC, not %r"
                         % (self.enc,))


def _unpickle(self: mitogen.core.Message, throw: bool = True, throw_dead: bool = True,
              find_class: Callable[[str, str], Any] | None = None) -> Any:
    """Message.unpickle(); `find_class(module, name)`, if given, decides which globals the
    body may name, instead of the default that allows plain types and mitogen.core's own.
    (Checked as any pickle from a context without parent authority first.)"""
    if find_class is None:
        return _core_unpickle(self, throw, throw_dead)
    if throw_dead and self.is_dead:
        raise mitogen.core.ChannelError(self._dead_reason())
    if self.enc == mitogen.core.ENC_BIN:
        return bytes(self.data)
    if not mitogen.core.has_parent_authority(self):
        importlib.import_module("mitogen.guard").check_pickle(self.data)
    obj = Unpickler(io.BytesIO(bytes(self.data)), find_class).load()
    if throw and isinstance(obj, mitogen.core.CallError):
        raise obj
    return obj


def _kwargs_init(self: mitogen.core.Kwargs, dct: Any = (), **kwargs: Any) -> None:
    """Kwargs(dict): bytes keys (from a Python 2 peer, in Mitogen) become text."""
    dict.__init__(self, {k.decode() if type(k) is bytes else k: v
                         for k, v in dict(dct, **kwargs).items()})


def _receiver_aiter(self: mitogen.core.Receiver) -> Any:
    """``async for msg in receiver``: see mitogen.aio."""
    return importlib.import_module("mitogen.aio").iterate(self)


def _importer_get_filename(self: mitogen.core.Importer, fullname: str) -> str | None:
    """Where the parent found `fullname` (the module's ``__file__``)."""
    entry = self.get_cached(fullname)
    return entry[1] if isinstance(entry, tuple) else None


_CLASS_ATTRIBUTES: dict[type, dict[str, Any]] = {
    mitogen.core.Message: {
        "ENCS": frozenset([mitogen.core.ENC_LEGACY, mitogen.core.ENC_PKL,
                           mitogen.core.ENC_BIN]),
        "ENC_MGC": mitogen.core.ENC_LEGACY,
        "ENC_PKL": mitogen.core.ENC_PKL,
        "ENC_BIN": mitogen.core.ENC_BIN,
        "HEADER_FMT": mitogen.core.HEADER.format,
        "HEADER_LEN": mitogen.core.HEADER_LEN,
        "HEADER_MAGIC": mitogen.core.ENC_LEGACY,
        "unpickle_iter": _unpickle_iter,
        "__init__": _message_init,
        "unpickle": _unpickle,
    },
    mitogen.core.Kwargs: {
        "__init__": _kwargs_init,
    },
    mitogen.core.Router: {
        "duplicate_handle_msg": "the handle is already in use",
        "refused_msg": "refused by policy",
        "invalid_handle_msg": "no handler for the handle",
        "too_large_msg": "message too large (max_message_size is %d bytes)",
        "respondent_disconnect_msg": "the respondent disconnected",
        "broker_exit_msg": "the broker has shut down",
        "no_route_msg": "no route to context %r (this is context %r)",
        "unidirectional_msg": "unidirectional mode forbids routing between children: "
                              "%r to %r",
    },
    mitogen.core.Receiver: {
        "closed_msg": mitogen.core.ChannelError.local_msg,
        "raise_channelerror": True,  # unused by Mitogen too: get() always raises
        "__aiter__": _receiver_aiter,
    },
    mitogen.core.Timer: {
        "active": True,
    },
    mitogen.core.Waker: {
        "broker_shutdown_msg": "the broker has shut down: it cannot run %r",
    },
    mitogen.core.Sender: {
        "explicit_close_msg": "the sender closed the channel",
    },
    mitogen.core.CallError: {
        "MSG_MAX_LEN": mitogen.core.MAX_CALL_ERROR,
    },
    mitogen.core.ExternalContext: {
        "detached": False,
    },
    mitogen.core.Importer: {
        "get_filename": _importer_get_filename,
    },
}


#: What replaces a method the bootstrap already defines.
_REPLACED = {"__init__", "unpickle"}


def _install_class_attributes() -> None:
    for cls, attributes in _CLASS_ATTRIBUTES.items():
        for name, value in attributes.items():
            if name not in vars(cls) or name in _REPLACED:
                setattr(cls, name, value)


_install_class_attributes()


# ---------------------------------------------------------------------------------------------
# The names, module by module
# ---------------------------------------------------------------------------------------------

_NAMES: dict[str, dict[str, Any]] = {
    "mitogen.core": {
        # Python 2/3
        "PY24": False,
        "PY3": True,
        "b": str.encode,
        "to_text": to_text,
        "BytesType": bytes,
        "UnicodeType": str,
        "AnyTextType": (bytes, str),
        "FsPathTypes": (str,),
        "BufferType": lambda buf, start: memoryview(buf)[start:],
        "BytesIO": io.BytesIO,
        "integer_types": (int,),
        "iteritems": dict.items,
        "iterkeys": dict.keys,
        "itervalues": dict.values,
        "str_partition": str.partition,
        "str_rpartition": str.rpartition,
        "bytes_partition": bytes.partition,
        "next": builtins.next,
        "all": builtins.all,
        "any": builtins.any,
        "range": builtins.range,
        "BaseException": builtins.BaseException,
        "ModuleNotFoundError": builtins.ModuleNotFoundError,
        "threading__current_thread": threading.current_thread,
        "threading__thread_name": threading__thread_name,
        "IS_WSL": "microsoft" in os.uname().release.lower(),
        # descriptors and helpers
        "get_blocking": os.get_blocking,
        "set_blocking": os.set_blocking,
        "pipe": pipe,
        "socketpair": socketpair,
        "io_op": io_op,
        "iter_split": iter_split,
        "import_module": import_module,
        "module_lineage": module_lineage,
        # serialization
        "Pickler": Pickler,
        "Unpickler": Unpickler,
        "PicklingError": pickle.PicklingError,
        "UnpicklingError": pickle.UnpicklingError,
        "find_deny": find_deny,
        # imports
        "ImportPolicy": ImportPolicy,
        "ModuleDeniedByOverridesError": ModuleDeniedByOverridesError,
        "ModuleDeniedByBlocksError": ModuleDeniedByBlocksError,
        "ModuleUnsuitableError": ModuleUnsuitableError,
        # logging and profiling
        "LOGGERS": LOGGERS,
        "IOLOG": IOLOG,
        "PidfulStreamHandler": PidfulStreamHandler,
        "enable_debug_logging": enable_debug_logging,
        "enable_profiling": enable_profiling,
    },
    "mitogen.parent": {
        "b": str.encode,
        "bytes_partition": bytes.partition,
        "itervalues": dict.values,
        "next": builtins.next,
        "IOLOG": IOLOG,
        "IM_SELF_ATTR": "__self__",
        "closure_attr": "__closure__",
        "IS_LINUX": os.uname().sysname == "Linux",
        "IS_SOLARIS": os.uname().sysname == "SunOS",
        "LINUX_TIOCGPTN": 0x80045430,
        "LINUX_TIOCSPTLCK": 0x40045431,
        "OPENPTY_MSG": "cannot allocate a pseudo-terminal: %s",
        "flags": flags,
        "cfmakeraw": cfmakeraw,
    },
    "mitogen.master": {
        "IOLOG": IOLOG,
        "RLOG": logging.getLogger("mitogen.ctx"),
        "SPECIAL_FILE_PATHS": {"__synthetic__", "<ansible_synthetic_collection_package>"},
        "any": builtins.any,
        "b": str.encode,
        "str_partition": str.partition,
        "str_rpartition": str.rpartition,
        "to_text": to_text,
    },
    "mitogen.utils": {
        "iteritems": dict.items,
    },
    "mitogen.fork": {
        "b": str.encode,
    },
    "mitogen.ssh": {
        "b": str.encode,
        "shlex_quote": shlex.quote,
    },
    "mitogen.setns": {
        "setns": setns,
    },
}


def _lazy(module: str, name: str, factory: Callable[[], Any]) -> None:
    """Names whose value needs a module that is imported only when they are used."""
    _LAZY.setdefault(module, {})[name] = factory


_LAZY: dict[str, dict[str, Callable[[], Any]]] = {}
_lazy("mitogen.core", "LogHandler", _log_handler_class)
_lazy("mitogen.core", "LOAD_RESOURCE", lambda: 113)
for _name in ("EpollPoller", "PollPoller", "POLLERS", "PREFERRED_POLLER", "Timer"):
    _lazy("mitogen.parent", _name, functools.partial(lambda name: _parent_pollers()[name],
                                                     _name))
_lazy("mitogen.parent", "SC_OPEN_MAX", lambda: os.sysconf("SC_OPEN_MAX"))
_lazy("mitogen.parent", "SELINUX_ENABLED", _selinux_enabled)
_lazy("mitogen.setns", "LIBC", _libc)
_lazy("mitogen.setns", "LIBC__strerror", lambda: _libc().strerror)
_lazy("mitogen.utils", "PASSTHROUGH", lambda: (
    int, float, bool, type(None), mitogen.core.Context, mitogen.core.CallError,
    mitogen.core.Blob, mitogen.core.Secret))
for _module in ("ssh", "sudo", "su", "doas", "docker", "podman", "buildah", "setns"):
    _lazy("mitogen." + _module, "LOG", functools.partial(logging.getLogger, "mitogen." + _module))


def _resources_name(name: str) -> Callable[[], Any]:
    def load() -> Any:
        import mitogen.resources

        return getattr(mitogen.resources, name)

    return load


for _name in ("GET_RESOURCE", "ResourceReader", "ResourceRequester"):
    _lazy("mitogen.core", _name, _resources_name(_name))


def _lookup_lazy(module: str, name: str) -> Any:
    factory = _LAZY.get(module, {}).get(name)
    if factory is None:
        raise AttributeError("module %r has no attribute %r" % (module, name))
    value = _NAMES.setdefault(module, {})[name] = factory()
    return value


def lookup(module: str, name: str) -> Any:
    """The compatibility name `name` of `module` (a module's ``__getattr__`` asks here)."""
    try:
        return _NAMES[module][name]
    except KeyError:
        return _lookup_lazy(module, name)
