"""The files of packages that a child imported from the master: ``importlib.resources`` and
``pkgutil.get_data()`` in a child.

A package served by the master has no directory on the child's host (or, worse, a directory
of the same name that belongs to something else), so its data files must come from where its
code came from. The importer (:class:`mitogen.core.Importer`, the loader of every module the
master served) hands importlib a :class:`ResourceReader` whose ``files()`` is a
:class:`RemoteTraversable`: each listing or read is one GET_RESOURCE request to the master,
answered by :class:`mitogen.master.ResourceResponder`. Nothing is written to the child's
disk, except by ``importlib.resources.as_file()``/``path()``, whose callers ask for a file.

Requests go straight to the master, routed through the tree like any message. Listings are
cached by the child; file contents are not (they may be large, and are read rarely).
"""

from __future__ import annotations

import io
import os
import posixpath
import threading
import weakref
from typing import Any, Iterator

import mitogen.core
from mitogen.core import Message

try:
    from importlib.resources.abc import Traversable
except ImportError:  # Python < 3.11
    from importlib.abc import Traversable

__all__ = ["GET_RESOURCE", "RemoteTraversable", "ResourceReader", "ResourceRequester",
           "get_data", "reader"]

#: The master's handle for resource requests: ``(package, relative path)``, pickled.
GET_RESOURCE = 112

#: Mitogen's handle for resource replies; ours are replies to the request's ``reply_to``.
LOAD_RESOURCE = 113


def split_path(relpath: str) -> list[str]:
    """The components of a path inside a package, refusing anything that could leave it."""
    if not isinstance(relpath, str) or "\0" in relpath or relpath.startswith("/"):
        raise ValueError("not a relative resource path: %r" % (relpath,))
    parts = [p for p in relpath.split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise ValueError("resource path %r may not contain '.' or '..'" % (relpath,))
    return parts


class ResourceRequester:
    """Asks `context` (the master) for the files of packages; one per router."""

    def __init__(self, router: mitogen.core.Router, context: mitogen.core.Context) -> None:
        self.router = router
        self.context = context
        self._lock = threading.Lock()
        self._listings: dict[tuple[str, str], Any] = {}

    def fetch(self, fullname: str, relpath: str) -> tuple:
        """``('dir', [names])``, ``('file', bytes)`` or ``('missing', why)`` for the file
        `relpath` (``/``-separated, ``''`` for the package's own directory) of `fullname`."""
        key = (fullname, relpath)
        with self._lock:
            cached = self._listings.get(key)
        if cached is not None:
            return cached
        reply = self.context.send_await(Message.pickled((fullname, relpath),
                                                        handle=GET_RESOURCE))
        if not (isinstance(reply, tuple) and len(reply) == 2 and
                reply[0] in ("dir", "file", "missing")):
            raise mitogen.core.StreamError("malformed GET_RESOURCE reply for %s/%s"
                                           % (fullname, relpath))
        if reply[0] != "file":
            with self._lock:
                self._listings[key] = reply
        return reply


_requester_lock = threading.Lock()
_requesters: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def requester_for(router: mitogen.core.Router) -> ResourceRequester:
    with _requester_lock:
        found = _requesters.get(router)
        if found is None:
            master = router.context_by_id(0, name="master")
            found = _requesters[router] = ResourceRequester(router, master)
        return found


class RemoteTraversable(Traversable):
    """A file or directory of a package, as the master has it (``importlib.resources``'
    Traversable protocol)."""

    def __init__(self, requester: ResourceRequester, fullname: str, relpath: str = "") -> None:
        self._requester = requester
        self._fullname = fullname
        self._parts = split_path(relpath)

    @property
    def _relpath(self) -> str:
        return "/".join(self._parts)

    def __repr__(self) -> str:
        return "RemoteTraversable(%r, %r)" % (self._fullname, self._relpath)

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RemoteTraversable) and \
            (other._fullname, other._parts) == (self._fullname, self._parts)

    def __hash__(self) -> int:
        return hash((self._fullname, self._relpath))

    @property
    def name(self) -> str:
        return self._parts[-1] if self._parts else self._fullname.rpartition(".")[2]

    def _fetch(self) -> tuple:
        return self._requester.fetch(self._fullname, self._relpath)

    def is_dir(self) -> bool:
        return self._fetch()[0] == "dir"

    def is_file(self) -> bool:
        return self._fetch()[0] == "file"

    def iterdir(self) -> Iterator[RemoteTraversable]:
        kind, value = self._fetch()
        if kind != "dir":
            raise NotADirectoryError("%r is not a directory (%s)" % (self, kind))
        for name in value:
            yield self.joinpath(name)

    def joinpath(self, *descendants: str | os.PathLike) -> RemoteTraversable:
        parts = list(self._parts)
        for descendant in descendants:
            parts += split_path(str(descendant))
        return RemoteTraversable(self._requester, self._fullname, "/".join(parts))

    def __truediv__(self, child: str | os.PathLike) -> RemoteTraversable:
        return self.joinpath(child)

    def read_bytes(self) -> bytes:
        kind, value = self._fetch()
        if kind == "file":
            return value
        if kind == "dir":
            raise IsADirectoryError("%r is a directory" % (self,))
        raise FileNotFoundError("%r: %s" % (self, value))

    def read_text(self, encoding: str | None = None, errors: str | None = None) -> str:
        return self.read_bytes().decode(encoding or "utf-8", errors or "strict")

    def open(self, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if mode not in ("r", "rb"):
            raise ValueError("%r can only be opened for reading, not %r" % (self, mode))
        stream = io.BytesIO(self.read_bytes())
        if mode == "rb":
            return stream
        return io.TextIOWrapper(stream, *args, **kwargs)


class ResourceReader:
    """What ``Importer.get_resource_reader()`` returns: the files of package `fullname`.

    Offers ``files()`` (Python 3.10+ use only that) and the older reader methods that
    Python 3.9's ``importlib.resources`` functions call.
    """

    def __init__(self, requester: ResourceRequester, fullname: str) -> None:
        self.requester = requester
        self.fullname = fullname

    def files(self) -> RemoteTraversable:
        return RemoteTraversable(self.requester, self.fullname)

    def open_resource(self, resource: str) -> io.BytesIO:
        return io.BytesIO(self.files().joinpath(resource).read_bytes())

    def resource_path(self, resource: str) -> str:
        # importlib then copies the bytes into a temporary file, as for a zipped package.
        raise FileNotFoundError("%s/%s has no path on this host: it lives in the master"
                                % (self.fullname, resource))

    def is_resource(self, name: str) -> bool:
        return self.files().joinpath(name).is_file()

    def contents(self) -> list[str]:
        kind, value = self.files()._fetch()
        return list(value) if kind == "dir" else []


def fix_files(common: Any) -> None:
    """Python 3.9's ``importlib.resources.files()`` (``importlib._common.from_package``)
    never asks a package's loader: it returns the directory of the package's ``__file__``,
    which is the master's path, not a directory of this host. Make it ask our loader for
    the packages it loaded. (Run by the child when it imports ``importlib._common``.)"""
    original = common.from_package

    def from_package(package: Any) -> Any:
        spec = package.__spec__
        if isinstance(spec.loader, mitogen.core.Importer):
            return spec.loader.get_resource_reader(spec.name).files()
        return original(package)

    common.from_package = from_package


def reader(importer: mitogen.core.Importer, fullname: str) -> ResourceReader:
    """The reader for `fullname`, a module `importer` loaded."""
    return ResourceReader(requester_for(importer._router), fullname)


def get_data(importer: mitogen.core.Importer, path: str) -> bytes:
    """``loader.get_data(path)`` for a `path` inside the directory of a module `importer`
    loaded (``pkgutil.get_data()`` joins the module's ``__file__`` directory and a
    resource name): the file comes from the master."""
    path = posixpath.normpath(path)
    best = None
    for fullname, entry in list(importer._cache.items()):
        if not isinstance(entry, tuple):
            continue
        directory = posixpath.dirname(entry[1])
        if path.startswith(directory + "/") and (best is None or len(directory) > len(best[1])):
            best = (fullname, directory)  # the master resolves a module to its directory
    if best is None:
        raise FileNotFoundError("%s is not in a package this context imported from its "
                                "parent" % (path,))
    relpath = path[len(best[1]) + 1:]
    traversable = RemoteTraversable(requester_for(importer._router), best[0], relpath)
    return traversable.read_bytes()
