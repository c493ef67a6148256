"""The root of the tree: the program that imports this module is the master.

Never sent to children. Holds what only the master does: allocating context IDs, serving
module source to the whole tree (with preloading), and writing children's log records into
the local logging package.
"""

from __future__ import annotations

import atexit
import collections
import dis
import importlib.machinery
import importlib.util
import logging
import marshal
import os
import pkgutil
import re
import select
import sys
import threading
import types
import weakref
import zlib
from typing import Any, Callable, Iterator

import mitogen
import mitogen.core
import mitogen.parent
import mitogen.parity  # what Mitogen's classes have that the bootstrap has no room for
import mitogen.resources
from mitogen.core import (
    ALLOCATE_ID,
    FORWARD_LOG,
    GET_MODULE,
    LOAD_MODULE,
    Message,
    now,
)

__all__ = ["Broker", "IdAllocator", "LogForwarder", "ModuleFinder", "ModuleResponder",
           "PollPoller", "ResourceResponder", "Router"]

LOG = logging.getLogger("mitogen")


_watched_brokers: weakref.WeakSet = weakref.WeakSet()


def _shut_down_watched_brokers() -> None:
    """At interpreter exit (the main thread has returned): shut down every broker still
    running, gracefully, so that children are told to exit instead of finding their
    stream cut when the process dies."""
    for broker in list(_watched_brokers):
        if not broker._exited:
            broker.shutdown()
            broker._thread.join(broker.shutdown_timeout + 5.0)


atexit.register(_shut_down_watched_brokers)


class Broker(mitogen.core.Broker):
    """The master's broker: children get 5 s to disconnect gracefully at shutdown, and work
    that can wait runs when the broker has nothing else to do (see when_idle()).

    With `install_watcher`, a broker still running when the program's main thread ends is
    shut down gracefully at interpreter exit.
    """

    shutdown_timeout = 5.0

    def __init__(self, install_watcher: bool = True, poller_class: Any = None) -> None:
        self._idle_jobs: collections.deque[Callable[[], None]] = collections.deque()
        self._no_idle_jobs = threading.Event()
        self._no_idle_jobs.set()
        super().__init__(poller_class=poller_class)
        if install_watcher:
            _watched_brokers.add(self)

    def when_idle(self, func: Callable[[], None]) -> None:
        """Run `func` on the broker thread once no event is ready and nothing is deferred:
        one job per idle moment, so that a message arriving meanwhile waits for one job at
        most. Broker thread only."""
        self._no_idle_jobs.clear()
        self._idle_jobs.append(func)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until every job given to when_idle() has run; False on timeout."""
        return self._no_idle_jobs.wait(timeout)

    def _next_timeout(self, limit: float | None = None) -> float | None:
        return 0 if self._idle_jobs else super()._next_timeout(limit)

    def _loop_once(self, timeout: float | None = None) -> Any:
        events = super()._loop_once(timeout)
        if not events and self._idle_jobs and not self._deferred and self._alive:
            func = self._idle_jobs.popleft()
            try:
                func()
            except Exception:
                LOG.exception("%r: idle job %r failed", self, func)
            if not self._idle_jobs:
                self._no_idle_jobs.set()
        return events

    def __enter__(self) -> Broker:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()
        self.join()


class PollPoller(mitogen.core.EpollPoller):
    """select.poll, for a master on a system without epoll: its masks change only at the
    next poll(), so streams are never lent to waiting threads (see MessageStream.lease)."""

    READ = select.POLLIN
    WRITE = select.POLLOUT
    thread_safe = False  # changes are only seen by the next poll()

    def __init__(self) -> None:
        self._poll = select.poll()
        self._masks: dict[int, int] = {}

    def close(self) -> None:
        pass

    def set_mask(self, fd: int, mask: int) -> None:
        if mask:
            self._masks[fd] = mask
            self._poll.register(fd, mask)
        elif self._masks.pop(fd, None) is not None:
            self._poll.unregister(fd)

    def poll(self, timeout: float | None) -> list:
        ms = None if timeout is None else int(timeout * 1000 + 0.999)
        return self._poll.poll(ms)


class IdAllocator:
    """Allocates context IDs: one at a time for the master's own children, and blocks of
    1000 to children that start children (so IDs match what Mitogen users see), recorded
    against the stream they went down (see :meth:`mitogen.parent.Router.grant_ids`)."""

    BLOCK_SIZE = mitogen.parent.ID_BLOCK_SIZE

    def __init__(self, router: Router) -> None:
        self.router = router
        self._lock = threading.Lock()
        self._next = 1
        router.add_handler(self.on_allocate_id, ALLOCATE_ID, overwrite=True)

    def allocate(self) -> int:
        with self._lock:
            context_id = self._next
            self._next += 1
            return context_id

    def allocate_block(self) -> tuple[int, int]:
        with self._lock:
            start = self._next
            self._next += self.BLOCK_SIZE
            return start, self._next

    def on_allocate_id(self, msg: Message) -> None:
        """ALLOCATE_ID from a direct child: a block of IDs for its own children."""
        if msg.is_dead:
            return
        stream = self.router.adjacent_stream(msg, "ALLOCATE_ID")
        if stream is None or not self.router.may_grant(stream, msg):
            return
        start, end = self.allocate_block()
        self.router.grant_ids(stream, start, end)
        LOG.debug("allocated IDs %d..%d to %s", start, end - 1, stream.name)
        msg.reply((start, end))


class LogForwarder:
    """Writes records forwarded by children into ``mitogen.ctx.<context name>`` loggers.

    Those loggers are never created here: a master starting thousands of children would
    keep one Logger per child in the logging package for ever. A record goes to the logger
    of its name if a program made one (to configure it), else to its nearest existing
    ancestor, and carries its full name either way.
    """

    def __init__(self, router: Router) -> None:
        self._router = router
        router.add_handler(self._on_forward_log, FORWARD_LOG)

    @staticmethod
    def _logger_for(name: str) -> logging.Logger:
        loggers = logging.Logger.manager.loggerDict
        while True:
            logger = loggers.get(name)
            if isinstance(logger, logging.Logger):
                return logger
            name, _, _ = name.rpartition(".")
            if name == "mitogen":
                return logging.getLogger("mitogen.ctx")

    def _on_forward_log(self, msg: Message) -> None:
        if msg.is_dead:
            return
        try:
            name, level, text = msg.unpickle()
            level = int(level)
        except (mitogen.core.StreamError, ValueError, TypeError):
            LOG.error("%r: malformed FORWARD_LOG from %d", self, msg.src_id)
            return
        context = self._router.context_by_id(msg.src_id, create=False)
        full_name = "mitogen.ctx.%s" % ((context and context.name) or msg.src_id,)
        logger = self._logger_for(full_name)
        if logger.isEnabledFor(level):
            record = logger.makeRecord(
                full_name, level, "(child)", 0, "%s: %s", (name, text), None,
                extra={"mitogen_name": name, "mitogen_context": msg.src_id,
                       "mitogen_msg": text})
            logger.handle(record)


# ---------------------------------------------------------------------------------------------
# Module source, and what to send with it
# ---------------------------------------------------------------------------------------------

#: Where a script's program starts: its ``if __name__ == '__main__':`` guard, or the
#: ``@mitogen.main()`` decorator, which runs the function it decorates at once.
MAIN_RE = re.compile(
    r"""^(if\s+__name__\s*==\s*['"]__main__['"]\s*:|@mitogen\.main\b)""", re.MULTILINE)

#: Why a script without such a point is not sent.
MAIN_GUARD_MSG = (
    "refusing to send __main__ (%s) to a child: it has no `if __name__ == '__main__':` "
    "guard, so importing it there would run the whole script again. Move the script's "
    "top-level code under such a guard.")


def neutralize_main(path: str, source: str) -> str:
    """Cut a script where its program starts, so importing it in a child defines its
    functions without running the program; refuse a script without such a point."""
    match = MAIN_RE.search(source)
    if match is None:
        raise ImportError(MAIN_GUARD_MSG % (path,))
    return source[: match.start()]


def get_child_modules(path: str, fullname: str) -> list[str]:
    """The names (last component only) of the modules directly inside package `fullname`,
    whose ``__init__`` is at `path`."""
    directory = os.path.dirname(path)
    if os.path.isdir(directory):
        return sorted(_modules_in_directory(directory))
    return sorted(info.name for info in pkgutil.iter_modules([directory]))


def is_stdlib_name(modname: str) -> bool:
    """Whether `modname` belongs to the standard library (or is built in)."""
    top = modname.split(".", maxsplit=1)[0]
    if top in sys.builtin_module_names:
        return True
    names = getattr(sys, "stdlib_module_names", None)
    if names is not None:  # Python 3.10+
        return top in names
    module = sys.modules.get(top)
    return module is not None and is_stdlib_path(getattr(module, "__file__", None) or "")


def is_stdlib_path(path: str) -> bool:
    """Whether file `path` lies in the standard library's directories."""
    import sysconfig

    roots = {sysconfig.get_paths()[key] for key in ("stdlib", "platstdlib")}
    path = os.path.realpath(path) if path else ""
    return bool(path) and "site-packages" not in path and "dist-packages" not in path and \
        any(path.startswith(os.path.realpath(root) + os.sep) for root in roots)


class ModuleFinder:
    """Finds the source of modules in the master and the modules each one imports."""

    def __init__(self) -> None:
        self._found: dict[str, Any] = {}
        self._deps: dict[str, list[str]] = {}
        self._codes: dict[str, types.CodeType | None] = {}
        self._loaders: dict[str, Any] = {}
        self._modifiers: dict[str, list[Callable[..., tuple]]] = {}

    def add_source_override(self, fullname: str, path: str, source: str | bytes,
                            is_pkg: bool) -> None:
        """Serve `source` as module `fullname` (found at `path`, a package if `is_pkg`,
        whose submodules are then looked for beside `path`) instead of looking it up;
        source modifiers do not apply. Takes effect for modules not yet served."""
        if isinstance(source, bytes):
            source = source.decode("utf-8")
        submodules = self._submodules(fullname, [os.path.dirname(path)]) if is_pkg else None
        self._found[fullname] = (path, source, submodules)
        self._codes.pop(fullname, None)
        self._deps.pop(fullname, None)

    def add_source_modifier(self, fullname: str, callable: Callable[..., tuple]) -> None:
        """Have ``callable(fullname, path, source, is_pkg)`` return the (path, source,
        is_pkg) to serve for module `fullname` when it is found."""
        self._modifiers.setdefault(fullname, []).append(callable)

    def _apply_modifiers(self, fullname: str, found: tuple) -> tuple:
        path, source, submodules = found
        is_pkg = submodules is not None
        for modify in self._modifiers.get(fullname, ()):
            path, source, is_pkg = modify(fullname, path, source, is_pkg)
            if isinstance(source, bytes):
                source = source.decode("utf-8")
        if is_pkg and submodules is None:
            submodules = self._submodules(fullname, [os.path.dirname(path)])
        return path, source, submodules if is_pkg else None

    def find(self, fullname: str) -> tuple[str, str, list[str] | None] | str | None:
        """(path, source, submodule names or None); None when the master has no such module;
        for a module that exists but cannot be sent, a string saying why."""
        if fullname not in self._found:
            try:
                found = self._find(fullname)
                if isinstance(found, tuple) and fullname in self._modifiers:
                    found = self._apply_modifiers(fullname, found)
                self._found[fullname] = found
            except ImportError as e:
                self._found[fullname] = str(e)
            except Exception as e:
                self._found[fullname] = "cannot find %s: %s: %s" % (
                    fullname, type(e).__name__, e)
        return self._found[fullname]

    def get_module_source(self, fullname: str) -> tuple:
        """(path, source, is package) of `fullname`, or (None, None, None)."""
        found = self.find(fullname)
        if not isinstance(found, tuple):
            return None, None, None
        return found[0], found[1], found[2] is not None

    @staticmethod
    def generate_parent_names(fullname: str) -> Iterator[str]:
        """``a.b`` then ``a`` for ``a.b.c``: the packages above a module, nearest first."""
        while "." in fullname:
            fullname = fullname.rpartition(".")[0]
            yield fullname

    def find_related_imports(self, fullname: str) -> list[str]:
        """The modules `fullname` imports directly that are loaded in this process."""
        return self.dependencies(fullname)

    def find_related(self, fullname: str) -> list[str]:
        """The modules `fullname` imports directly or indirectly (loaded here), sorted."""
        found: set[str] = set()
        stack = [fullname]
        while stack:
            for name in self.find_related_imports(stack.pop()):
                if name not in found:
                    found.add(name)
                    stack.append(name)
        found.discard(fullname)
        return sorted(found)

    def _find(self, fullname: str) -> tuple[str, str, list[str] | None] | str | None:
        if fullname == "__main__":
            return self._find_main()
        module = sys.modules.get(fullname)
        spec = getattr(module, "__spec__", None) if module is not None else None
        if spec is None:
            spec = importlib.util.find_spec(fullname)
        if spec is None:
            return None
        locations = spec.submodule_search_locations
        is_pkg = locations is not None
        if spec.loader is None or spec.origin in (None, "namespace"):
            if locations is not None:  # PEP 420 namespace package: no source of its own
                path = os.path.join(next(iter(locations)), "__init__.py")
                return path, "", self._submodules(fullname, locations)
            return "%s has no loader in the master" % (fullname,)
        self._loaders[fullname] = spec.loader
        get_source = getattr(spec.loader, "get_source", None)
        source = get_source(fullname) if get_source else None
        if source is None and spec.origin and spec.origin.endswith(".py"):
            # Loaders that rewrite code (pytest's assertion rewriter) may not offer source.
            with open(spec.origin, "rb") as f:
                source = importlib.util.decode_source(f.read())
        if source is None:
            return ("%s cannot be sent to a child: it has no Python source in the master "
                    "(%s); install it on the child's host instead" % (fullname, spec.origin))
        return spec.origin, source, (self._submodules(fullname, locations) if is_pkg else None)

    @staticmethod
    def _find_main() -> tuple[str, str, None]:
        main = sys.modules.get("__main__")
        path = getattr(main, "__file__", None)
        if not path:
            raise ImportError("__main__ has no file (interactive session?): define the "
                              "function in a module instead")
        loader: Any = getattr(main, "__loader__", None)
        source = loader.get_source("__main__") if hasattr(loader, "get_source") else None
        if source is None:
            with open(path, encoding="utf-8") as f:
                source = f.read()
        return path, neutralize_main(path, source), None

    @staticmethod
    def _submodules(fullname: str, locations: Any) -> list[str]:
        names: set[str] = set()
        for location in locations:
            names.update(get_child_modules(os.path.join(location, "__init__.py"), fullname))
        return sorted("%s.%s" % (fullname, name) for name in names)

    def code(self, fullname: str, compile_source: bool = True) -> types.CodeType | None:
        """The module's code object, or None when it has no source we can send.

        It comes from the module's ``.pyc`` when there is a current one (reading it is much
        cheaper than compiling); otherwise the source is compiled, unless `compile_source`
        is false. Nothing is written: a module the master never imported keeps its
        directory as it was.
        """
        if fullname not in self._codes:
            found = self.find(fullname)
            if not isinstance(found, tuple):
                self._codes[fullname] = None
            else:
                code = self._cached_code(fullname, found[0])
                if code is None and not compile_source:
                    return None
                self._codes[fullname] = code or self._compile(found[0], found[1])
        return self._codes[fullname]

    def _cached_code(self, fullname: str, path: str) -> types.CodeType | None:
        loader: Any = self._loaders.get(fullname)
        if fullname == "__main__" or not hasattr(loader, "get_code") or not _has_bytecode(
                path, loader):
            return None
        try:
            return loader.get_code(fullname)
        except (ImportError, OSError, SyntaxError):
            return None

    @staticmethod
    def _compile(path: str, source: str) -> types.CodeType | None:
        try:
            return compile(source, path, "exec", dont_inherit=True)
        except SyntaxError:
            return None

    def dependencies(self, fullname: str) -> list[str]:
        """Modules that `fullname`'s code imports and that are loaded in this process.

        Found from the bytecode (IMPORT_NAME, plus IMPORT_FROM names that are modules),
        which is fast and version-independent; the sys.modules filter skips imports that the
        code guards by platform, version or optional dependency.
        """
        if fullname not in self._deps:
            found = self.find(fullname)
            names: set[str] = set()
            if isinstance(found, tuple) and found[1]:
                code = self.code(fullname)
                if code is not None:
                    is_pkg = found[2] is not None
                    package = fullname if is_pkg else fullname.rpartition(".")[0]
                    names = _scan_imports(code, package)
            self._deps[fullname] = sorted(
                n for n in names if n != fullname and sys.modules.get(n) is not None)
        return self._deps[fullname]


def _modules_in_directory(directory: str) -> list[str]:
    """The names pkgutil.iter_modules() finds in a package directory: files with a module
    suffix (longest first, as ``inspect.getmodulename``), and subdirectories holding an
    ``__init__``. Done here because pkgutil imports inspect for it, which costs a fresh
    master milliseconds on its first answer."""
    suffixes = sorted(importlib.machinery.all_suffixes(), key=len, reverse=True)

    def module_name(filename: str) -> str | None:
        return next((filename[: -len(s)] for s in suffixes if filename.endswith(s)), None)

    try:
        entries = list(os.scandir(directory))
    except OSError:
        return []
    names = []
    for entry in entries:
        if entry.is_dir():
            if "." not in entry.name and any(
                    module_name(f) == "__init__" for f in _listdir(entry.path)):
                names.append(entry.name)
        else:
            name = module_name(entry.name)
            if name and name != "__init__":
                names.append(name)
    return names


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


#: Modules are compressed once per master, on the path of a child's import: level 1 is twice
#: as fast as 6 and, on source and bytecode, only a few percent larger.
_MODULE_ZLIB_LEVEL = 1


def _has_bytecode(path: str, loader: Any) -> bool:
    """Whether asking `loader` for code reads a bytecode cache rather than compiling (and
    writing one): true for loaders without source files, and for source files whose
    ``.pyc`` exists (the loader still checks that it is current)."""
    if not isinstance(loader, importlib.machinery.SourceFileLoader):
        return True
    try:
        return os.path.exists(importlib.util.cache_from_source(path))
    except (NotImplementedError, ValueError):
        return False


_IMPORT_NAME = dis.opmap["IMPORT_NAME"]
_IMPORT_FROM = dis.opmap["IMPORT_FROM"]
_IMPORT_NAME_OP = bytes([_IMPORT_NAME])
_LOAD_CONST = dis.opmap["LOAD_CONST"]
_LOAD_SMALL_INT = dis.opmap.get("LOAD_SMALL_INT", -1)  # 3.14 loads import levels this way
_EXTENDED_ARG = dis.EXTENDED_ARG


def _scan_imports(code: types.CodeType, package: str) -> set[str]:
    """Every module name the code (and code nested in it) imports, resolved to absolute.

    Walks the raw bytecode rather than dis.get_instructions(), which is ten times slower: an
    IMPORT_NAME is preceded by the loads of its level and fromlist.
    """
    names: set[str] = set()
    stack = [code]
    while stack:
        co = stack.pop()
        raw, consts, co_names = co.co_code, co.co_consts, co.co_names
        stack.extend(c for c in consts if isinstance(c, types.CodeType))
        if _IMPORT_NAME_OP not in raw[::2]:
            continue  # most functions import nothing: skip the walk (a C-speed test)
        recent: list[Any] = [None, None]
        last_import = None
        extended = 0
        for i in range(0, len(raw), 2):
            op = raw[i]
            arg = raw[i + 1] | extended
            if op == _EXTENDED_ARG:
                extended = arg << 8
                continue
            extended = 0
            if op == _LOAD_CONST:
                recent = [recent[1], consts[arg]]
            elif op == _LOAD_SMALL_INT:
                recent = [recent[1], arg]
            elif op == _IMPORT_NAME:
                level, fromlist = recent
                base = _resolve(co_names[arg], level if isinstance(level, int) else 0, package)
                last_import = base
                if base:
                    parts = base.split(".")
                    names.update(".".join(parts[: i + 1]) for i in range(len(parts)))
                    if isinstance(fromlist, tuple):
                        names.update(base + "." + attr for attr in fromlist if attr != "*")
            elif op == _IMPORT_FROM and last_import:
                names.add(last_import + "." + co_names[arg])
    return names


def parse_get_module(data: Any) -> tuple[str, str, str]:
    """(fullname, hint, bytecode magic) from a GET_MODULE body; the last two may be empty."""
    fields = bytes(data).decode("utf-8").split("\n")
    fields += [""] * (3 - len(fields))
    return fields[0], fields[1], fields[2]


def _resolve(name: str, level: int, package: str) -> str | None:
    if level == 0:
        return name
    parts = package.split(".") if package else []
    if level - 1 > len(parts):
        return None
    base = ".".join(parts[: len(parts) - (level - 1)])
    return "%s.%s" % (base, name) if name and base else (base or name)


class ModuleResponder:
    """Answers GET_MODULE from children with LOAD_MODULE messages, preloading what the
    module will import next ("Import Preloading"):

    * a package is sent after the modules of the same package that it imports;
    * once a child has received a top-level package from us, a submodule of it is sent
      after everything of that package it depends on, directly or indirectly.

    A module is never sent twice down the same stream unless the child asks for it again.
    """

    #: Modules of one package compiled ahead at most (see _prepare_package_of()).
    PREPARE_LIMIT = 256
    #: Where a script's program starts (see neutralize_main()).
    MAIN_RE = MAIN_RE
    main_guard_msg = MAIN_GUARD_MSG

    def __init__(self, router: Router, policy: Any = None) -> None:
        self._router = router
        self._finder = ModuleFinder()
        self._lock = threading.Lock()
        self._built: dict[str, tuple] = {}
        self._related_cache: dict[str, list[str]] = {}
        self._prepared: set[str] = set()
        self._to_prepare: collections.deque[str] = collections.deque()
        self._prepare_turns = 0  # modules children compiled themselves, not yet matched
        self._prepare_scheduled = False
        self._codes: dict[str, bytes | None] = {}
        self._sent: dict[Any, set[str]] = {}
        self._packages: dict[Any, set[str]] = {}
        #: Served only modules under these prefixes (when any): Mitogen's "overrides".
        self.whitelist: list[str] = sorted(getattr(policy, "overrides", ()))
        #: Never served modules under these prefixes: Mitogen's "blocks".
        self.blacklist: list[str] = sorted(getattr(policy, "blocks", ()))
        self.get_module_count = 0
        self.get_module_secs = 0.0
        self.good_load_module_count = 0
        self.good_load_module_size = 0
        self.bad_load_module_count = 0
        router.add_handler(self._on_get_module, GET_MODULE)

    def __repr__(self) -> str:
        return "ModuleResponder"

    def whitelist_prefix(self, fullname: str) -> None:
        """Serve only modules under the given prefixes (the whitelist starts empty = all;
        the first prefix also adds ``mitogen``, which every child needs)."""
        if not self.whitelist:
            self.whitelist.append("mitogen")
        self.whitelist.append(fullname)

    def blacklist_prefix(self, fullname: str) -> None:
        """Never serve modules under `fullname`."""
        self.blacklist.append(fullname)

    def add_source_override(self, fullname: str, path: str, source: str | bytes,
                            is_pkg: bool) -> None:
        """See :meth:`ModuleFinder.add_source_override`."""
        self._finder.add_source_override(fullname, path, source, is_pkg)

    def add_source_modifier(self, fullname: str, callable: Callable[..., tuple]) -> None:
        """See :meth:`ModuleFinder.add_source_modifier`."""
        self._finder.add_source_modifier(fullname, callable)

    def neutralize_main(self, path: str, src: str) -> str:
        """See the module-level :func:`neutralize_main`."""
        return neutralize_main(path, src)

    def _policy_refusal(self, fullname: str) -> str | None:
        def matches(prefixes: list[str]) -> bool:
            return any(fullname == p or fullname.startswith(p + ".") for p in prefixes)

        if self.whitelist and not matches(self.whitelist):
            return "%s is refused by the master's import policy (not in whitelist %r)" % (
                fullname, self.whitelist)
        if matches(self.blacklist):
            return "%s is refused by the master's import policy (blacklisted)" % (fullname,)
        return None

    def _build(self, fullname: str) -> tuple:
        """The first fields of a LOAD_MODULE body for `fullname`: (name, pkg_present, path,
        zlib source), or a negative answer whose third field says why."""
        built = self._built.get(fullname)
        if built is None:
            refusal = self._policy_refusal(fullname)
            found = refusal or self._finder.find(fullname)
            if found is None or isinstance(found, str):
                built = (fullname, None, found, None)
            else:
                path, source, pkg_present = found
                compressed = zlib.compress(source.encode("utf-8"), _MODULE_ZLIB_LEVEL)
                built = (fullname, pkg_present, path, compressed)
            self._built[fullname] = built
        return built

    def _related(self, fullname: str) -> list[str]:
        """Every module of `fullname`'s top-level package that it needs, transitively,
        dependencies first, that the import policy lets us send."""
        related = self._related_cache.get(fullname)
        if related is None:
            top = fullname.split(".", maxsplit=1)[0]
            order: list[str] = []
            seen = {fullname}

            def visit(name: str) -> None:
                for dep in self._finder.dependencies(name):
                    if dep == "mitogen.core":
                        continue  # every context already has it
                    if dep not in seen and (dep == top or dep.startswith(top + ".")):
                        seen.add(dep)
                        visit(dep)
                        order.append(dep)

            visit(fullname)
            related = self._related_cache[fullname] = [
                n for n in order if not self._policy_refusal(n)]
        return related

    def _preloads(self, fullname: str, sent: set[str]) -> list[str]:
        """The related modules of `fullname` that a stream which already has `sent` lacks.

        Finding them means scanning the module's code, which costs a compile when it has
        no ``.pyc``. When every module of its package that the master has loaded is
        already on that stream, the answer is empty whatever the module imports, so the
        scan is skipped: the common case of a package whose submodules are imported one by
        one at run time.
        """
        top = fullname.split(".", maxsplit=1)[0]
        prefix = top + "."
        if all(name in sent or name == fullname for name in list(sys.modules)
               if name == top or name.startswith(prefix)):
            return []
        return [n for n in self._related(fullname) if n not in sent]

    def _on_get_module(self, msg: Message) -> None:
        if msg.is_dead:
            return
        started = now()
        fullname, hint, magic = parse_get_module(msg.data)
        stream = self._router.stream_by_id(msg.src_id)
        with self._lock:
            self.get_module_count += 1
            try:
                self._answer(msg.src_id, stream, fullname, hint, magic=magic)
            finally:
                self.get_module_secs += now() - started

    def _answer(self, dst_id: int, stream: Any, fullname: str, hint: str,
                preload: bool = False, magic: str = "") -> None:
        sent = self._sent.setdefault(stream, set())
        packages = self._packages.setdefault(stream, set())
        built = self._build(fullname)
        wanted: list[str] = []
        top = fullname.split(".", maxsplit=1)[0]
        if built[3] is not None and (preload or built[1] is not None or top in packages
                                     or fullname == top):
            wanted = self._preloads(fullname, sent)
        if hint and hint != fullname and hint.startswith(fullname + "."):
            hinted = self._build(hint)
            if hinted[3] is not None:
                chain = hint.split(".")
                parents = [".".join(chain[:i]) for i in range(2, len(chain))]
                extra = [n for n in [*parents, *self._preloads(hint, sent), hint]
                         if n not in sent and n != fullname]
                wanted += [n for n in extra if n not in wanted]
        same_python = magic == mitogen.core.BYTECODE_MAGIC
        for name in wanted:
            body = self._build(name)
            if body[3] is not None:
                self._send(dst_id, stream, body, same_python)
        self._send(dst_id, stream, built, same_python)
        if built[3] is not None and built[1] is not None and "." not in fullname:
            packages.add(fullname)
        if same_python and built[3] is not None:
            self._prepare_package_of(fullname, built[1] is not None)

    def _prepare_package_of(self, fullname: str, is_package: bool) -> None:
        """Queue the other modules of `fullname`'s package for compiling ahead.

        A package whose submodules a child imports one by one at run time (plugins,
        ``importlib.import_module``) costs one round trip per module, and the seed's
        preloading rules rightly send none of them unasked. Their answers can still be
        ready before the questions: a module compiled ahead is answered at once, with code
        the child need not compile. The queue starts at the far end of the listing, and
        each module a child receives as source (and so compiles itself) earns the master
        one module compiled ahead, while the broker is idle: a child that walks the package
        in order and the master then share the work and meet in the middle, and the master
        never compiles more than its children do. Nothing is sent unasked; each package is
        queued once, at most :attr:`PREPARE_LIMIT` of its modules.
        """
        package = fullname if is_package else fullname.rpartition(".")[0]
        if not package or package in self._prepared:
            return
        self._prepared.add(package)
        found = self._finder.find(package)
        if isinstance(found, tuple) and found[2]:
            ahead = [n for n in reversed(found[2]) if n not in self._built]
            # Ahead of packages queued before: a child is busiest with its newest one.
            self._to_prepare.extendleft(reversed(ahead[: self.PREPARE_LIMIT]))
            self._schedule_prepare()

    def _schedule_prepare(self) -> None:
        when_idle = getattr(self._router.broker, "when_idle", None)
        if when_idle is not None and not self._prepare_scheduled and \
                self._prepare_turns > 0 and self._to_prepare:
            self._prepare_scheduled = True
            when_idle(self._prepare_one)

    def _prepare_one(self) -> None:
        with self._lock:
            self._prepare_scheduled = False
            while self._to_prepare:
                name = self._to_prepare.popleft()
                # A module answered meanwhile went as source: its child compiles it, in
                # parallel with this, so compiling it here as well would be wasted.
                if name not in self._built and not self._policy_refusal(name):
                    built = self._build(name)
                    if built[3] is not None and self._finder.code(name) is not None:
                        self._compressed_code(name)
                    self._prepare_turns -= 1
                    break
            self._schedule_prepare()

    def _send(self, dst_id: int, stream: Any, body: tuple, same_python: bool = False) -> None:
        """Send one LOAD_MODULE: `body` plus the module's related modules (when known: an
        intermediate forwards them along with it) and, for a child on this very Python
        version, its code."""
        self._sent.setdefault(stream, set()).add(body[0])
        code = None
        related = None
        if body[3] is None:
            self.bad_load_module_count += 1
        else:
            self.good_load_module_count += 1
            self.good_load_module_size += len(body[3])
            related = self._related_cache.get(body[0])
            if same_python:
                code = self._compressed_code(body[0])
                if code is not None and len(code) + len(body[3]) > \
                        self._router.max_message_size // 2:
                    code = None  # the source alone must still fit
                if code is None:
                    self._prepare_turns += 1  # the child compiles this one itself
                    self._schedule_prepare()
        msg = Message.pickled((*body, related, code), dst_id=dst_id, handle=LOAD_MODULE)
        if len(msg.data) > self._router.max_message_size:
            # The child must hear about it, or its import would wait forever.
            msg = Message.pickled((body[0], None, "%s is too large to send (%d bytes; "
                                   "max_message_size is %d)" % (body[0], len(msg.data),
                                                               self._router.max_message_size),
                                   None, None, None), dst_id=dst_id, handle=LOAD_MODULE)
        self._router.route(msg)

    def _compressed_code(self, fullname: str) -> bytes | None:
        """zlib'd marshal of the module's code, for children on this very Python version:
        they then skip compiling. Only when the code is at hand (a ``.pyc``, or compiled
        here already to find its imports): compiling just to send it would cost the master
        what it saves the child."""
        if fullname not in self._codes:
            code = self._finder.code(fullname, compile_source=False) \
                if fullname != "__main__" else None
            if code is None:
                return None
            self._codes[fullname] = zlib.compress(marshal.dumps(code), _MODULE_ZLIB_LEVEL)
        return self._codes[fullname]

    def forget_stream(self, stream: Any) -> None:
        self._sent.pop(stream, None)
        self._packages.pop(stream, None)

    def forward_modules(self, context: mitogen.core.Context, fullnames: list[str]) -> None:
        """Preload `fullnames` (and what they need) into `context` before it asks.

        The modules go to the first hop towards `context` like any answer, then FORWARD_MODULE
        asks that hop to pass them on, so that each intermediate caches them once.
        """
        stream = self._router.stream_by_id(context.context_id)
        first_hop = stream.remote_id
        with self._lock:
            for fullname in fullnames:
                if fullname not in self._sent.get(stream, ()):
                    self._answer(first_hop, stream, fullname, "", preload=True)
                if first_hop != context.context_id:
                    self._router.route(Message.pickled(
                        (context, fullname), dst_id=first_hop,
                        handle=mitogen.core.FORWARD_MODULE))


class ResourceResponder:
    """Answers GET_RESOURCE (:mod:`mitogen.resources`): a listing or the bytes of a file
    inside a package the master can serve, for a child's ``importlib.resources`` or
    ``pkgutil.get_data()``.

    The import policy applies as it does to modules; the path is resolved inside the
    package's own directory (or its loader's resource reader, for a zipped package), never
    above it; a file too large for one message is refused with its size.
    """

    def __init__(self, router: Router) -> None:
        self._router = router
        self.get_resource_count = 0
        router.add_handler(self._on_get_resource, mitogen.resources.GET_RESOURCE)

    def __repr__(self) -> str:
        return "ResourceResponder"

    def _on_get_resource(self, msg: Message) -> None:
        if msg.is_dead:
            return
        self.get_resource_count += 1
        try:
            fullname, relpath = msg.unpickle()
            reply = self.answer(fullname, relpath)
        except (mitogen.core.StreamError, ValueError, TypeError) as e:
            reply = ("missing", "malformed GET_RESOURCE request: %s" % (e,))
        msg.reply(reply)

    def answer(self, fullname: str, relpath: str) -> tuple:
        """``('dir', names)``, ``('file', bytes)`` or ``('missing', why)``."""
        if not isinstance(fullname, str) or not isinstance(relpath, str):
            raise TypeError("package and path must be str")
        parts = mitogen.resources.split_path(relpath)
        refusal = self._router.responder._policy_refusal(fullname)
        if refusal:
            return ("missing", refusal)
        root = self._root(fullname)
        if isinstance(root, str):
            return ("missing", root)
        target = root.joinpath(*parts) if parts else root
        where = "%s/%s" % (fullname, relpath)
        if target.is_dir():
            return ("dir", sorted(child.name for child in target.iterdir()))
        if not target.is_file():
            return ("missing", "%s does not exist in the master" % (where,))
        # The size first where the file can say it, and never a read past what a reply may
        # hold (the file may grow meanwhile): a request of a few bytes must not make the
        # master read a gigabyte only to refuse it.
        limit = self._router.max_message_size - 1024
        size = target.stat().st_size if hasattr(target, "stat") else 0
        if size <= limit:
            with target.open("rb") as f:
                data = f.read(limit + 1)
            size = len(data)
        if size > limit:
            return ("missing", "%s is too large to send (%d bytes; max_message_size is %d)"
                    % (where, size, self._router.max_message_size))
        return ("file", data)

    @staticmethod
    def _root(fullname: str) -> Any:
        """The directory of package `fullname` (of a plain module: the one it is in), as
        a Traversable, without importing anything that is not imported already."""
        module = sys.modules.get(fullname)
        spec = getattr(module, "__spec__", None) if module is not None else None
        try:
            spec = spec or importlib.util.find_spec(fullname)
        except (ImportError, ValueError) as e:
            return "cannot find %s: %s" % (fullname, e)
        if spec is None:
            return "%s does not exist in the master" % (fullname,)
        get_reader = getattr(spec.loader, "get_resource_reader", None)
        reader = get_reader(fullname) if get_reader and spec.submodule_search_locations \
            is not None else None
        if reader is not None and hasattr(reader, "files"):
            return reader.files()
        import pathlib

        if spec.submodule_search_locations:
            return pathlib.Path(next(iter(spec.submodule_search_locations)))
        if spec.origin and os.path.isfile(spec.origin):
            return pathlib.Path(os.path.dirname(spec.origin))
        return "%s has no directory in the master" % (fullname,)


class Router(mitogen.parent.Router):
    """The master's router; also a context manager that shuts the broker down on exit."""

    broker_class = Broker
    #: Profile this router's broker thread, and by default every child (see
    #: mitogen.profiling); also set by the ``MITOGEN_PROFILING`` environment variable.
    profiling = os.environ.get("MITOGEN_PROFILING") is not None

    def __init__(self, broker: Broker | None = None, max_message_size: int | None = None):
        if broker is None:
            broker = self.broker_class()
        if max_message_size is not None:
            self.max_message_size = max_message_size
        super().__init__(broker)
        self.id_allocator = IdAllocator(self)
        self.responder = ModuleResponder(self)
        self.resource_responder = ResourceResponder(self)
        self.log_forwarder = LogForwarder(self)
        if self.profiling:
            import mitogen.profiling

            mitogen.profiling.start(self.broker, this_thread=False)

    def __enter__(self) -> Router:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.broker.shutdown()
        self.broker.join()

    def _on_stream_disconnect(self, stream: mitogen.core.MessageStream) -> None:
        super()._on_stream_disconnect(stream)
        self.responder.forget_stream(stream)

    def enable_debug(self) -> None:
        """Log this package's own activity at DEBUG level in every context started later."""
        self.debug = True
        logging.getLogger("mitogen").setLevel(logging.DEBUG)

    def get_stats(self) -> dict:
        responder = self.responder
        return {
            "get_module_count": responder.get_module_count,
            "get_module_secs": responder.get_module_secs,
            "good_load_module_count": responder.good_load_module_count,
            "good_load_module_size": responder.good_load_module_size,
            "bad_load_module_count": responder.bad_load_module_count,
            "get_resource_count": self.resource_responder.get_resource_count,
            "dropped_message_count": self.dropped_count,
        }


def __getattr__(name: str) -> Any:
    """Names kept only for compatibility with Mitogen: see mitogen/parity.py."""
    if name.startswith("__"):
        raise AttributeError(name)
    import mitogen.parity

    return mitogen.parity.lookup(__name__, name)
