"""Helpers for programs that drive Mitogen: logging set-up, a router's lifetime, plain data.

These are the functions Mitogen 0.3 publishes in ``mitogen.utils``, with the same names and
signatures. :mod:`mitogen.master` and :mod:`mitogen.core` are imported only when a function
needs them: this module is imported by :func:`mitogen.main` before any router exists, and may
be imported where :mod:`mitogen.master` cannot run.
"""

from __future__ import annotations

import datetime
import functools
import logging
import os
import re
import sys
import threading
from typing import Any, Callable, Dict, Optional, Set, Tuple, TypeVar, Union

__all__ = [
    "cast",
    "disable_site_packages",
    "log_get_formatter",
    "log_levels_configure",
    "log_to_file",
    "run_with_router",
    "setup_gil",
    "with_router",
]

T = TypeVar("T")

#: Environment variable that, when set, wins over the `level` passed to :func:`log_to_file`.
LOG_LEVEL_ENV = "MITOGEN_LOG_LEVEL"
#: Logger that records every byte Mitogen reads and writes; silent unless level ``IO`` is used.
IO_LOGGER = "mitogen.io"
_HANDLER_NAME = "mitogen.utils.log_to_file"
_handler_lock = threading.Lock()

# A thread woken by I/O waits up to this long for the GIL while another thread computes; the
# broker thread then routes every message that late. 1 ms instead of Python's 5 ms: measured
# on 3.11, the wake-up delay follows the interval (5.15 ms -> 1.15 ms) while two CPU-bound
# threads lose 5-15% to the extra switches. Shorter intervals gain little more latency (the
# floor is ~0.15 ms) and keep adding switches, so 1e-6 would only thrash.
_GIL_SWITCH_INTERVAL = 0.001

_SITE_DIR_NAMES = frozenset(["site-packages", "dist-packages"])
_PATH_SEPARATORS = re.compile(r"[\\/]")

# Leaves that are already plain, returned as they are. bool is final, so `type() is` suffices.
_PLAIN_LEAVES = frozenset([str, bytes, int, float, bool, type(None)])
# mitogen.core types that its unpickler lets through, so cast() must not flatten them.
_CORE_PASSTHROUGH_NAMES = ("Blob", "Secret", "Context", "Sender", "CallError")


# -- logging ------------------------------------------------------------------------------------


class _LogFormatter(logging.Formatter):
    """``HH:MM:SS.ffffff L logger: msg``: wall-clock microseconds line up logs of many hosts."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname).1s %(name)s: %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: Optional[str] = None) -> str:
        return datetime.datetime.fromtimestamp(record.created).strftime("%H:%M:%S.%f")


def log_get_formatter() -> logging.Formatter:
    """The formatter of log_to_file(): ``HH:MM:SS.ffffff L logger: msg``."""
    return _LogFormatter()


def log_levels_configure(default: Union[str, int] = "INFO") -> None:
    """Set the root logger's level to `default`, or to ``$MITOGEN_LOG_LEVEL`` when set.
    ``IO`` is DEBUG plus the ``mitogen.io`` logger, which otherwise stays at INFO or above
    because it logs every read and write of the streams to children started from then on."""
    from_env = os.environ.get(LOG_LEVEL_ENV)
    numeric_level, log_io = _parse_level(from_env or default, from_env=bool(from_env))
    logging.getLogger().setLevel(numeric_level)
    io_level = logging.DEBUG if log_io else max(numeric_level, logging.INFO)
    logging.getLogger(IO_LOGGER).setLevel(io_level)


def log_to_file(
    path: Union[str, os.PathLike, None] = None, level: Union[str, int] = "INFO"
) -> None:
    """Send every log record of this process to `path`, or to stderr when `path` is None.

    The levels are set by :func:`log_levels_configure`: ``MITOGEN_LOG_LEVEL`` overrides
    `level`, so a user can turn on debugging without editing the program, and ``IO`` also
    logs the bytes read from and written to each child (``mitogen.io``). A file is
    truncated first, so each run starts a fresh log. Calling this again replaces the handler
    installed before (and closes its file) instead of printing every record twice.
    """
    from_env = os.environ.get(LOG_LEVEL_ENV)
    _parse_level(from_env or level, from_env=bool(from_env))  # a bad name fails first
    if path is None:
        handler: logging.Handler = logging.StreamHandler(sys.stderr)
    else:
        handler = logging.FileHandler(os.fspath(path), mode="w", encoding="utf-8")
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(log_get_formatter())
    root = logging.getLogger()
    with _handler_lock:
        for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
            root.removeHandler(old)
            old.close()
        root.addHandler(handler)
        log_levels_configure(level)


def _parse_level(level: Union[str, int], from_env: bool) -> Tuple[int, bool]:
    """Return (numeric level, whether I/O logging is on) for a level name or number."""
    if isinstance(level, int) and not isinstance(level, bool):
        return level, False
    if not isinstance(level, str):
        raise TypeError(f"log level must be a name or an int, not {type(level).__name__}")
    name = level.strip().upper()
    if name == "IO":
        return logging.DEBUG, True
    numeric = logging.getLevelName(name)
    if not isinstance(numeric, int):
        source = f" (from ${LOG_LEVEL_ENV})" if from_env else ""
        raise ValueError(f"unknown log level {level!r}{source}: use DEBUG, INFO, WARNING, "
                         "ERROR, CRITICAL or IO")
    return numeric, False


# -- plain data ---------------------------------------------------------------------------------


def cast(obj: Any) -> Any:
    """Return `obj` rebuilt from plain built-in types, so that it can be sent to a context.

    The receiving unpickler refuses every class it does not know, which includes harmless
    subclasses such as ``OrderedDict``, a ``namedtuple`` or a ``str`` subclass from some
    library. This converts, recursively: dict subclasses to dict; lists and tuples (and
    their subclasses: a namedtuple's class is a global the receiver refuses) to lists, as
    Mitogen's does, except tuples in dict keys, which stay tuples; str and bytes subclasses
    to str and bytes; int and float subclasses (``IntEnum``) to int and float. The
    underlying value is kept even if the subclass overrides ``__str__`` or ``__bytes__``.
    ``mitogen.core``'s ``Blob``, ``Secret``, ``Context``, ``Sender`` and ``CallError`` pass
    unchanged, and a ``Kwargs`` stays a ``Kwargs`` with its values cast. Any other type
    raises :class:`TypeError`; a container that holds itself raises :class:`ValueError`.
    """
    passthrough, kwargs_type = _core_types()
    return _Caster(passthrough, kwargs_type).cast(obj)


def _core_types() -> Tuple[Tuple[type, ...], Optional[type]]:
    """Find mitogen.core's sendable types, if that module can be imported here."""
    core = sys.modules.get("mitogen.core")
    if core is None:
        try:
            from mitogen import core
        except ImportError:
            return (), None
    found = (getattr(core, name, None) for name in _CORE_PASSTHROUGH_NAMES)
    kwargs_type = getattr(core, "Kwargs", None)
    return tuple(t for t in found if isinstance(t, type)), (
        kwargs_type if isinstance(kwargs_type, type) else None)


class _Caster:
    """One cast() call: the types to keep, and the containers being rebuilt (to catch cycles)."""

    def __init__(self, passthrough: Tuple[type, ...], kwargs_type: Optional[type]) -> None:
        self.passthrough = passthrough
        self.kwargs_type = kwargs_type
        self.open_containers: Set[int] = set()

    def cast(self, obj: Any, hashable: bool = False) -> Any:
        """`obj` rebuilt; `hashable` (a dict key) keeps tuples tuples, as lists could not
        be keys."""
        kind = type(obj)
        if kind in _PLAIN_LEAVES or (self.passthrough and isinstance(obj, self.passthrough)):
            return obj
        if isinstance(obj, (dict, list, tuple)):
            return self._container(obj, hashable)
        if isinstance(obj, str):
            return "".join((obj,))  # a str copy without calling an overridden __str__
        if isinstance(obj, bytes):
            return b"".join((obj,))
        if isinstance(obj, int) and not isinstance(obj, bool):
            return int.__index__(obj)
        if isinstance(obj, float):
            return float.__float__(obj)
        raise TypeError(f"cannot cast {_type_name(kind)} to a type that can be sent: only "
                        "dict, list, tuple, str, bytes, int, float, bool, None and their "
                        "subclasses can")

    def _container(self, obj: Union[Dict[Any, Any], list, tuple], hashable: bool) -> Any:
        key = id(obj)
        if key in self.open_containers:
            raise ValueError(f"cannot cast a {_type_name(type(obj))} that contains itself")
        self.open_containers.add(key)
        try:
            if isinstance(obj, dict):
                items = [(self.cast(k, True), self.cast(v)) for k, v in obj.items()]
                if self.kwargs_type is not None and isinstance(obj, self.kwargs_type):
                    return self.kwargs_type(items)
                return dict(items)
            if hashable and isinstance(obj, tuple):
                return tuple(self.cast(v, True) for v in obj)
            return [self.cast(v) for v in obj]
        finally:
            self.open_containers.discard(key)


def _type_name(kind: type) -> str:
    module = kind.__module__
    return kind.__qualname__ if module == "builtins" else f"{module}.{kind.__qualname__}"


# -- process set-up -----------------------------------------------------------------------------


def setup_gil() -> None:
    """Let a thread woken by I/O take the GIL within about 1 ms instead of 5 ms.

    The broker thread spends its life waiting for I/O; when the main thread is busy
    computing, every message the broker routes waits for the GIL first. See
    ``_GIL_SWITCH_INTERVAL`` for the measurement behind the value.
    """
    sys.setswitchinterval(_GIL_SWITCH_INTERVAL)


def disable_site_packages() -> None:
    """Remove site-packages and dist-packages directories from :data:`sys.path`, in place.

    A process that must import only the standard library and what its parent sends (as a
    child does) then cannot pick up a different, locally installed version of a package.
    Entries are matched by a whole path component, so '/src/site-packages-tools' stays.
    """
    sys.path[:] = [entry for entry in sys.path if not _is_site_dir(entry)]


def _is_site_dir(entry: object) -> bool:
    if not isinstance(entry, str):
        return False
    return not _SITE_DIR_NAMES.isdisjoint(_PATH_SEPARATORS.split(entry))


# -- router lifetime ----------------------------------------------------------------------------


def run_with_router(func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call ``func(router, *args, **kwargs)`` with a new router, and always shut it down.

    The broker is shut down and joined whether `func` returns or raises, so that no child
    context and no broker thread outlives the call.
    """
    from mitogen import master  # deferred: a child importing this module has no master

    broker = master.Broker()
    try:
        router = master.Router(broker)
        return func(router, *args, **kwargs)
    finally:
        broker.shutdown()
        broker.join()


def with_router(func: Callable[..., T]) -> Callable[..., T]:
    """Decorate `func` so that each call runs through :func:`run_with_router`.

    The caller leaves out the router argument; the wrapper keeps `func`'s name, docstring
    and attributes.
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        return run_with_router(func, *args, **kwargs)

    return wrapper


def __getattr__(name: str) -> Any:
    """Names kept only for compatibility with Mitogen: see mitogen/parity.py."""
    if name.startswith("__"):
        raise AttributeError(name)
    import mitogen.parity

    return mitogen.parity.lookup(__name__, name)
