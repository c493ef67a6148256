"""What a context needs to start children of its own: spawning, bootstrap and routing.

Sent only to contexts that become parents (by ``via=``); the master always has it. The
bootstrap of a child goes like this (see "The UNIX First Stage"):

1. The boot command runs ``python -S -c STUB FIRST_STAGE NAME`` on the target: STUB
   decodes and runs FIRST_STAGE, a few lines of compressed, base64-encoded Python.
2. The first stage forks. The original process re-executes Python with ``argv[0]`` naming the
   context and a pipe as stdin, from which the new interpreter reads its program: one line
   that imports the stdlib modules the core needs (this overlaps with the compile below) and
   then loads two code objects from fd 102: the core's, then its configuration line's.
   The forked half writes ``MITO000``, then reads from the real stdin (so the payload can
   be built while the child starts) an 8-digit length and that many compressed bytes of
   source, then another length and the core's compressed bytecode (length 0: none). It
   inflates the source and, while the new interpreter is still starting up, compiles it,
   unless the bytecode came with this interpreter's magic number: then only the last line
   needs compiling. It writes the code objects onto fd 102 and the source onto fd 101 (so
   the context can later boot children of its own without fetching the core again),
   writes ``MITO001`` and exits. Compiling the core takes about 30 ms, longer than a bare
   interpreter start, so for a child on this machine (see
   :attr:`Connection.sends_bytecode`) the parent sends the bytecode it compiled once.
   Where this process starts the child's Python itself (the ``local`` method: no ssh,
   sudo or container tool in between, see :attr:`Connection.boots_in_place`), one
   interpreter does it all: it is started with ``argv[0]`` naming the context already, and
   :data:`IN_PLACE_STAGE` reads the payload, loads the code and runs it in that very
   process, the source left on fd 101 in a memfd. That saves the fork, the second
   interpreter start and the hand-over between them: about 40 % of the CPU a local child
   takes to start (``python bench/run.py --only fanout``).
3. The program is the minified :mod:`mitogen.core` plus one line calling
   :meth:`ExternalContext.main` with this context's configuration. The master keeps the
   minified, compressed core in a boot image beside the core's bytecode cache (see
   :class:`CoreImage`), so a new master process does not minify it again.

Nothing is ever written to the target's disk.
"""

from __future__ import annotations

import binascii
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import zlib
from typing import Any, Callable, NamedTuple

import mitogen
import mitogen.core
import mitogen.guard  # checks what children send: loaded before they send anything
from mitogen.call import CallChain, CallSpec
from mitogen.core import (
    ADD_ROUTE,
    ALLOCATE_ID,
    DEL_ROUTE,
    SHUTDOWN,
    Error,
    Latch,
    Message,
    MessageStream,
    Stream,
    StreamError,
    TimeoutError,
    listen,
    unlisten,
)

__all__ = [
    "BROKER_SHUTDOWN_MSG",
    "SIGNAL_BY_NUM",
    "Argv",
    "CallChain",
    "CallSpec",
    "CancelledError",
    "Connection",
    "Context",
    "CoreImage",
    "EofError",
    "ModuleForwarder",
    "Options",
    "Process",
    "Reaper",
    "Router",
    "create_best_pipe",
    "create_child",
    "create_socketpair",
    "disable_echo",
    "get_connection_class",
    "get_core_image",
    "get_core_source",
    "get_default_remote_name",
    "get_log_levels",
    "get_sys_executable",
    "hybrid_tty_create_child",
    "is_immediate_child",
    "openpty",
    "popen",
    "returncode_to_str",
    "tty_create_child",
    "upgrade_router",
]

LOG = logging.getLogger("mitogen")

BOOT_START = b"MITO000\n"
BOOT_DONE = b"MITO001\n"

#: How many lines a failed child printed are quoted in its EofError.
ERROR_LINES = 100


class EofError(StreamError):
    """The child closed its output before finishing the bootstrap."""


class CancelledError(StreamError):
    """The broker began shutting down while a connection was being made."""


#: The text of the CancelledError that a connect() gets when the broker shuts down first.
BROKER_SHUTDOWN_MSG = "connection cancelled: the broker was shut down"

#: Logged once when sys.executable cannot start children (see get_sys_executable()).
SYS_EXECUTABLE_MSG = ("sys.executable is %s, so children are started with %s (pass "
                      "python_path= to choose another interpreter)")

#: Signal names by number, for messages about how a child ended.
SIGNAL_BY_NUM = {int(sig): sig.name for sig in signal.Signals}


def returncode_to_str(n: int) -> str:
    """How a process ended, from its subprocess-style return code: ``exited with status
    3`` or, for -11, ``killed by SIGSEGV (exit status -11)``."""
    if n < 0:
        return "killed by %s (exit status %d)" % (SIGNAL_BY_NUM.get(-n, "signal %d" % -n), n)
    return "exited with status %d" % (n,)


_sys_executable_warned: set = set()


def get_sys_executable() -> str:
    """The interpreter children run by default: ``sys.executable``, or, when that is
    empty or not executable (an embedded Python, a deleted virtualenv), ``/usr/bin/python3``
    and then ``/usr/bin/python``, with a warning logged once."""
    current = sys.executable
    if current and os.path.isfile(current) and os.access(current, os.X_OK):
        return current
    fallback = next((p for p in ("/usr/bin/python3", "/usr/bin/python")
                     if os.access(p, os.X_OK)), "/usr/bin/python3")
    if current not in _sys_executable_warned:
        _sys_executable_warned.add(current)
        LOG.warning(SYS_EXECUTABLE_MSG, repr(current) if current else "empty", fallback)
    return fallback


def get_log_levels(loggers: tuple = ("", "mitogen", "mitogen.io")) -> list:
    """The effective levels of `loggers`, in order (a child starts with the root's)."""
    return [logging.getLogger(name).getEffectiveLevel() for name in loggers]


def is_immediate_child(msg: Message, stream: Any) -> bool:
    """Handler policy: accept only messages sent by the context at the other end of the
    stream they arrived on (a direct child, not one of its descendants)."""
    return stream is not None and msg.src_id == stream.remote_id


class Argv:
    """An argument vector that prints as a shell would need it typed (for log lines):
    words with spaces or shell specials are double-quoted, specials escaped."""

    must_escape = frozenset('\\$"`!')
    must_escape_or_space = must_escape | frozenset(" ")

    def __init__(self, argv: list) -> None:
        self.argv = argv

    def escape(self, x: str) -> str:
        if not self.must_escape_or_space.intersection(x):
            return x
        return '"%s"' % "".join("\\" + c if c in self.must_escape else c for c in x)

    def __str__(self) -> str:
        return " ".join(self.escape(a) for a in self.argv)


# ---------------------------------------------------------------------------------------------
# The boot command
# ---------------------------------------------------------------------------------------------

#: Runs on the target with nothing but Python: drops empty sys.path entries (an unreadable
#: working directory after changing user makes Python fail otherwise) and runs the first stage.
STUB = (
    "import sys;sys.path=[p for p in sys.path if p];import binascii,zlib;"
    "exec(zlib.decompress(binascii.a2b_base64(sys.argv[1])))"
)

#: What both first stages below do once the child may speak: say MITO000, read the payload
#: (see Connection.get_preamble) from stdin, inflate the source C and the bytecode K, and find
#: where the configuration line starts (i). Kept small: it travels on the command line.
_READ_PAYLOAD = """\
os.write(1,b'MITO000\\n')
def G(n):
 C=b''
 while len(C)<n:
  try:b=os.read(0,n-len(C))
  except BlockingIOError:select.select([0],[],[]);continue
  if not b:os._exit(1)
  C+=b
 return C
C=zlib.decompress(G(int(G(8))))
n=int(G(8))
K=zlib.decompress(G(n)) if n else b''
import marshal,_frozen_importlib_external as X
i=C.rindex(b'\\n',0,-1)+1
"""

#: The first stage, in the target's Python; see the module docstring. Kept small: it travels
#: on the command line of every new context.
FIRST_STAGE = """\
import os,sys,select
R,W=os.pipe()
r,w=os.pipe()
Q,V=os.pipe()
try:import fcntl;fcntl.fcntl(V,1031,1<<20)
except Exception:pass
if os.fork():
 os.dup2(0,100);os.dup2(R,0);os.dup2(r,101);os.dup2(Q,102)
 for f in R,W,r,w,Q,V:os.close(f)
 os.execl(sys.executable,sys.executable+'(mitogen:'+sys.argv[2]+')','-S')
os.close(R);os.close(r);os.close(Q)
P=b"import marshal,_pickle,_socket,select,_signal,heapq,_struct,fcntl,zlib,threading,mmap;"
P+=b"\\nwith open(102,'rb') as _b:_c=marshal.load(_b),marshal.load(_b)\\nexec(_c[0]);exec(_c[1])"
os.write(W,P);os.close(W)
""" + _READ_PAYLOAD + """\
if K[:4]==X.MAGIC_NUMBER:K=K[4:]
else:K=marshal.dumps(compile(C[:i],'mitogen/core.py','exec'))
for f,D in(V,K+marshal.dumps(compile(C[i:],'mitogen/core.py','exec'))),(w,C):
 with os.fdopen(f,'wb') as o:o.write(D)
os.write(1,b'MITO001\\n')
os._exit(0)
"""


#: The first stage of a child whose Python this process starts itself (see the module
#: docstring, 2.): the same protocol on stdin and stdout, without the fork and the second
#: interpreter. The source goes to fd 101 in a memfd: a pipe could not hold it unread.
IN_PLACE_STAGE = "import os,sys,select\n" + _READ_PAYLOAD + """\
K=marshal.loads(K[4:]) if K[:4]==X.MAGIC_NUMBER else compile(C[:i],'mitogen/core.py','exec')
L=compile(C[i:],'mitogen/core.py','exec')
f=os.memfd_create('mitogen-core')
os.write(f,C);os.lseek(f,0,0);os.dup2(f,101);os.close(f);os.dup2(0,100)
os.write(1,b'MITO001\\n')
del C,G,X,f,i,n
sys.argv[:]=['']
exec(K);exec(L)
"""


def _encoded_first_stage(stage: str = FIRST_STAGE) -> str:
    return binascii.b2a_base64(zlib.compress(stage.encode(), 9)).decode().strip()


_core_lock = threading.Lock()
_core_image: CoreImage | None = None

#: First line of a cached boot image; the format's version is part of it.
_IMAGE_MAGIC = b"mitogen-core-image 2"


class CoreImage(NamedTuple):
    """The minified core, and its compressed form ready for any child's payload.

    `compressed` is a zlib header and the deflated source, ended by a full flush: any
    deflate data may follow it, so each child's payload is this prefix plus its own
    compressed configuration line and the stream's checksum (see :func:`build_payload`).
    The prefix never depends on the child, so it can be computed once per installation.
    `bytecode` is what the first stage of a child running a Python with this one's
    bytecode magic number takes instead of compiling the source (see :func:`compile_core`);
    empty until a child needs it, except in the master's cached image.
    """

    source: bytes
    compressed: bytes
    checksum: int  # adler32 of `source`, the running value the payload's checksum continues
    bytecode: bytes = b""

    @classmethod
    def from_source(cls, source: bytes) -> CoreImage:
        compressor = zlib.compressobj(9)
        compressed = compressor.compress(source) + compressor.flush(zlib.Z_FULL_FLUSH)
        return cls(source, compressed, zlib.adler32(source))


def compile_core(source: bytes) -> bytes:
    """The core's code as the first stage takes it: this Python's bytecode magic number,
    then the marshalled code object, compressed.

    Compiled as the first stage compiles it (same file name, no inherited ``__future__``
    flags, no optimisation), so a child runs the same code either way.
    """
    import importlib.util
    import marshal

    code = compile(source, "mitogen/core.py", "exec", dont_inherit=True, optimize=0)
    return zlib.compress(importlib.util.MAGIC_NUMBER + marshal.dumps(code), 6)


def get_core_bytecode() -> bytes:
    """This process's :attr:`CoreImage.bytecode`, compiled on first use (a context that
    starts children of its own pays that once, rather than each of its children)."""
    global _core_image
    image = get_core_image()
    if not image.bytecode:
        bytecode = compile_core(image.source)
        with _core_lock:
            _core_image = image = image._replace(bytecode=bytecode)
    return image.bytecode


def _find_importer() -> Any:
    for finder in sys.meta_path:
        if isinstance(finder, mitogen.core.Importer):
            return finder
    return None


def get_core_source() -> bytes:
    """The minified source of mitogen.core, computed once per process.

    A child that boots children of its own reuses the copy its first stage gave it.
    """
    return get_core_image().source


def get_core_image() -> CoreImage:
    """The :class:`CoreImage` of this process: in a child, built from the core source its
    first stage kept; in the master, read from the boot image cache when it matches the
    installed code, else minified and compressed now (about 25 ms) and cached."""
    global _core_image
    with _core_lock:
        if _core_image is None:
            importer = _find_importer()
            cached = importer.get_cached("mitogen.core") if importer else None
            if cached is not None and not mitogen.is_master:
                source = cached[2]
                cut = source.rfind(b"\nExternalContext(")
                _core_image = CoreImage.from_source(source[: cut + 1] if cut >= 0 else source)
            else:
                _core_image = _master_core_image()
        return _core_image


def _master_core_image() -> CoreImage:
    core_path = mitogen.core.__file__
    with open(core_path, "rb") as f:
        original = f.read()
    key = _image_key(original)
    paths = _image_cache_paths(core_path, key)
    for path in paths:
        image = _read_cached_image(path, key)
        if image is not None:
            return image
    import importlib

    minify = importlib.import_module("mitogen.minify")
    minified = minify.for_boot(original.decode("utf-8"))
    image = CoreImage.from_source(minified.rstrip("\n").encode("utf-8") + b"\n")
    image = image._replace(bytecode=compile_core(image.source))
    if sys.dont_write_bytecode:
        # No file beside the sources, as for bytecode; the user's own cache still saves
        # every later master the minifying (a few hundred ms: it parses the core twice).
        paths = paths[1:]
    any(_write_cached_image(path, key, image) for path in paths)
    return image


def _image_key(original: bytes) -> str:
    """Names what the cached image was made from: the core's text, the minifier's, and the
    Python that parsed them and whose bytecode it holds (its magic number). Two zlib
    checksums rather than a hashlib digest: importing hashlib would cost the first child
    more than reading the cache saves."""
    import importlib.util

    with open(os.path.join(os.path.dirname(mitogen.core.__file__), "minify.py"), "rb") as f:
        text = original + b"\0" + f.read()
    return "%08x%08x%d-py%d.%d-%s" % (zlib.crc32(text), zlib.adler32(text), len(text),
                                      *sys.version_info[:2],
                                      importlib.util.MAGIC_NUMBER.hex())


def _image_cache_paths(core_path: str, key: str) -> list:
    """Beside the core's own bytecode cache (honouring ``sys.pycache_prefix``): the boot
    image is to the payload what a ``.pyc`` is to the module. Where that is not writable (a
    system installation), in the user's cache directory, if it belongs to this user alone:
    whatever is there becomes the code of every child."""
    import importlib.util

    paths = [os.path.join(os.path.dirname(importlib.util.cache_from_source(core_path)),
                          "core.boot-image")]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    if _private_dir(base):
        paths.append(os.path.join(base, "mitogen-tree", "core-%s.boot-image" % (key,)))
    return paths


def _private_dir(path: str) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    return st.st_uid == os.geteuid() and not st.st_mode & 0o022


def _read_cached_image(path: str, key: str) -> CoreImage | None:
    """The image cached at `path` if it was made from the same code and is intact.

    The file: a header line (format, key, the source's adler32, the bytecode's length and
    adler32), the compressed source, then the compressed bytecode.
    """
    try:
        with open(path, "rb") as f:
            header, _, body = f.read().partition(b"\n")
    except OSError:
        return None
    fields = header.split(b" ")
    if len(fields) != 6 or b" ".join(fields[:2]) != _IMAGE_MAGIC or fields[2] != key.encode():
        return None
    try:
        cut = len(body) - int(fields[4])
    except ValueError:
        return None
    compressed, bytecode = body[:cut], body[cut:]
    if not 0 < cut < len(body) or fields[5] != b"%d" % (zlib.adler32(bytecode),):
        return None
    try:
        source = zlib.decompressobj().decompress(compressed)
    except zlib.error:
        return None
    checksum = zlib.adler32(source)
    if fields[3] != b"%d" % (checksum,):
        return None
    return CoreImage(source, compressed, checksum, bytecode)


def _write_cached_image(path: str, key: str, image: CoreImage) -> bool:
    """Best effort and atomic, as Python writes a ``.pyc``; True if it was written."""
    header = b"%s %s %d %d %d\n" % (_IMAGE_MAGIC, key.encode(), image.checksum,
                                    len(image.bytecode), zlib.adler32(image.bytecode))
    tmp = "%s.%d.%d.tmp" % (path, os.getpid(), threading.get_ident())
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(header + image.compressed + image.bytecode)
            os.replace(tmp, path)
        except OSError:
            os.unlink(tmp)
            raise
    except OSError as e:
        LOG.debug("not caching the boot image at %s: %s", path, e)
        return False
    return True


#: Settings a child assumes when its configuration leaves them out (see
#: ExternalContext in mitogen.core).
_CHILD_DEFAULTS = {
    "debug": False, "max_message_size": mitogen.core.Router.max_message_size,
    "unidirectional": False, "whitelist": [], "blacklist": [], "in_fd": 100, "name": None,
}


def build_payload(config: dict) -> bytes:
    """The compressed program a new context runs: core source plus its main() call.

    One zlib stream: the image's prefix, this child's line deflated on its own (the prefix
    ended with a full flush, so nothing refers back across the join), and the adler32 of
    the whole, continued from the image's.
    """
    image = get_core_image()
    line = ("ExternalContext(%r).main()\n" % (config,)).encode("utf-8")
    tail = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return (image.compressed + tail.compress(line) + tail.flush()
            + zlib.adler32(line, image.checksum).to_bytes(4, "big"))


# ---------------------------------------------------------------------------------------------
# Options and processes
# ---------------------------------------------------------------------------------------------


def get_default_remote_name() -> str:
    """user@host:pid of the process starting a child, as Mitogen names children."""
    import getpass

    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return "%s@%s:%d" % (user, socket.gethostname(), os.getpid())


class Options:
    """Options every connection method accepts; methods subclass it to add their own."""

    #: The context's name (its stream's name when not given).
    name: str | None = None
    #: What the child's argv[0] says after ``mitogen:`` (default user@host:pid).
    remote_name: str | None = None
    #: The interpreter's argv on the target.
    python_path: list | str | None = None
    #: Log the child's own activity at DEBUG level.
    debug = False
    #: Seconds to wait for the child to boot.
    connect_timeout = 30.0
    #: When the child must have booted (now + connect_timeout), from connect() on.
    connect_deadline: float | None = None
    #: Profile the child's threads (see README, "Profiling").
    profiling = False
    #: Forbid the child to message its siblings (and them it).
    unidirectional = False
    #: The largest message the child accepts.
    max_message_size: int | None = None

    def __init__(
        self,
        max_message_size: int,
        name: str | None = None,
        remote_name: str | None = None,
        python_path: str | list | None = None,
        debug: bool = False,
        connect_timeout: float | None = None,
        profiling: bool = False,
        unidirectional: bool = False,
        old_router: Any = None,
        keepalive_interval: float | None = None,
        keepalive_count: int = 3,
    ) -> None:
        # `old_router` is where Mitogen passes the router; a method that needs it (fork,
        # there) takes it in its own Options.
        self.name = name
        if keepalive_interval is not None and keepalive_interval <= 0:
            raise ValueError("keepalive_interval must be a positive number of seconds")
        self.keepalive_interval = keepalive_interval
        self.keepalive_count = keepalive_count
        if remote_name is not None and "/" in remote_name:
            raise ValueError("remote_name %r must not contain '/'" % (remote_name,))
        self.remote_name = remote_name
        if python_path is None:
            python_path = [get_sys_executable()]
        elif isinstance(python_path, str):
            python_path = [python_path]
        self.python_path = list(python_path)
        self.debug = debug
        self.connect_timeout = 30.0 if connect_timeout is None else connect_timeout
        self.connect_deadline = mitogen.core.now() + self.connect_timeout
        self.profiling = profiling
        self.unidirectional = unidirectional
        self.max_message_size = max_message_size


class Process:
    """A started child process: its pid, and the descriptors the parent talks to it on."""

    #: What log lines call the process (the stream's name, once it has one).
    name: str | None = None

    def __init__(self, pid: int, stdin: int, stdout: int, stderr: int | None = None) -> None:
        self.pid = pid
        self.stdin = stdin
        self.stdout = stdout
        self.stderr = stderr
        self.returncode: int | None = None
        self.detached = False
        #: False where the exit status cannot be known (a child reaped by someone else).
        self.status_known = True

    def __repr__(self) -> str:
        return "Process(pid=%d)" % (self.pid,)

    def poll(self) -> int | None:
        """Reap the process if it has exited; its status, or None while it runs."""
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                self.returncode = -1
                return self.returncode
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        """Send `sig` unless the process has already exited (and been reaped)."""
        if self.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def kill_and_reap(self) -> None:
        """Last resort: the process must not outlive its parent's broker."""
        if self.poll() is None and not self.detached:
            self.kill()
            try:
                os.waitpid(self.pid, 0)
            except ChildProcessError:
                pass
            self.returncode = -signal.SIGKILL


#: Kernel buffer asked for each end of a child's socketpair (the kernel caps it at
#: net.core.wmem_max): the default, about 200 KiB, makes a 64 MiB message cost hundreds of
#: hand-overs between the two brokers, and each one a wait for a CPU on a busy machine.
SOCKET_BUFFER = 2 * 1048576


def create_socketpair(size: int | None = None, blocking: bool | None = None) -> tuple:
    """A socketpair (parent's end, child's end) for a child's stdin and stdout: one
    descriptor carries both directions. `size` sets both ends' kernel buffers."""
    parent_end, child_end = socket.socketpair()
    for sock in (parent_end, child_end):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size or SOCKET_BUFFER)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size or SOCKET_BUFFER)
        if blocking is not None:
            sock.setblocking(blocking)
    return parent_end, child_end


def create_best_pipe(escalates_privilege: bool = False, blocking: bool | None = None) -> tuple:
    """(parent's read end, child's write end, child's read end, parent's write end).

    A socketpair where possible; two pipes when the child `escalates_privilege` (sudo
    under SELinux may refuse to pass a UNIX socket on to the new user's process).
    """
    if not escalates_privilege:
        parent_end, child_end = create_socketpair(blocking=blocking)
        return parent_end, child_end, child_end, parent_end
    child_r, parent_w = os.pipe()
    parent_r, child_w = os.pipe()
    if blocking is not None:
        for fd in (child_r, parent_w, parent_r, child_w):
            os.set_blocking(fd, blocking)
    return (os.fdopen(parent_r, "rb", 0), os.fdopen(child_w, "wb", 0),
            os.fdopen(child_r, "rb", 0), os.fdopen(parent_w, "wb", 0))


def _preexec(preexec_fn: Any = None) -> Any:
    """The function to run in a new child before exec: mitogen.core._preexec_hook, then
    `preexec_fn`; None when there is neither (the fast vfork path stays open)."""
    hook = preexec_hook()
    if hook is None or preexec_fn is None:
        return hook or preexec_fn

    def both() -> None:
        hook()
        preexec_fn()

    return both


def preexec_hook() -> Any:
    """``mitogen.core._preexec_hook``: when a program sets it, a function called in every
    new child process just before it execs (to reset CPU affinity, say). Not defined in
    the bootstrap, which no child needs it in."""
    return vars(mitogen.core).get("_preexec_hook")


def popen(**kwargs: Any) -> subprocess.Popen:
    """subprocess.Popen that also runs mitogen.core._preexec_hook in the child."""
    kwargs["preexec_fn"] = _preexec(kwargs.get("preexec_fn"))
    return subprocess.Popen(**kwargs)


def create_child(args: list, merge_stdio: bool = False, stderr_pipe: bool = False,
                 escalates_privilege: bool = False, preexec_fn: Any = None,
                 executable: str | None = None) -> Process:
    """Start `args` in a new session with stdin and stdout on a socketpair (pipes if it
    `escalates_privilege`) whose other ends the returned Process holds; `executable`, if
    given, is the program run (`args[0]` is then only its name).

    stderr goes to stdout with `merge_stdio`, to a pipe of its own (``Process.stderr``)
    with `stderr_pipe`, else it is inherited.
    """
    parent_r, child_w, child_r, parent_w = create_best_pipe(escalates_privilege)
    ends = {id(f): f for f in (parent_r, child_w, child_r, parent_w)}.values()
    err_r = err_w = None
    if stderr_pipe and not merge_stdio:
        err_r, err_w = os.pipe()
    try:
        proc = popen(args=args, executable=executable, stdin=child_r.fileno(),
                     stdout=child_w.fileno(),
                     stderr=child_w.fileno() if merge_stdio else err_w, close_fds=True,
                     start_new_session=True, preexec_fn=preexec_fn)
    except OSError as e:
        for f in ends:
            f.close()
        for fd in (err_r, err_w):
            if fd is not None:
                os.close(fd)
        raise StreamError("cannot start %s: %s (check python_path and the method's "
                          "*_path option)" % (executable or args[0], e.strerror)) from None
    # subprocess would reap the child itself; the Reaper owns that job from now on.
    proc.returncode = 0
    if err_w is not None:
        os.close(err_w)
    stdin = os.dup(parent_w.fileno())
    # A socketpair: one descriptor both ways.
    stdout = stdin if parent_r is parent_w else os.dup(parent_r.fileno())
    for f in ends:
        f.close()
    return Process(proc.pid, stdin, stdout, err_r)


def openpty() -> tuple:
    """A new pseudo-terminal as unbuffered (master, slave) file objects; running out of
    PTYs raises an error that says how to raise the limit."""
    import mitogen.spawn

    master, slave = mitogen.spawn.open_pty()
    return os.fdopen(master, "r+b", 0), os.fdopen(slave, "r+b", 0)


def disable_echo(fd: int) -> None:
    """Turn off echo on terminal `fd`, so that a typed password never comes back."""
    import mitogen.spawn

    mitogen.spawn.disable_echo(fd)


def tty_create_child(args: list) -> Process:
    """Start `args` with a new PTY as its controlling terminal and all its stdio (raw
    mode: the bootstrap and the messages pass through it unchanged)."""
    import mitogen.spawn

    return mitogen.spawn.spawn_with_pty(args, full=True)[0]


def hybrid_tty_create_child(args: list, escalates_privilege: bool = False) -> Process:
    """Start `args` with stdin/stdout on a socketpair (two pipes if it
    `escalates_privilege`) and a new PTY as its controlling terminal and stderr (where
    prompts appear); ``Process.stderr`` is the PTY master."""
    import mitogen.spawn

    return mitogen.spawn.spawn_with_pty(args, full=False, pipes=escalates_privilege)[0]


class Reaper(Stream):
    """Waits for a child process to exit, on the broker, through a pidfd where available,
    and fires ``'exit'`` once it has.

    With `kill`, escalates from SIGTERM to SIGKILL when the process outlives its stream,
    so that a child that ignores its parent going away is still ended. With
    `wait_on_shutdown`, a graceful broker shutdown waits for the process to exit.
    """

    TERM_AFTER = 1.0
    KILL_AFTER = 3.0

    def __init__(self, broker: mitogen.core.Broker, proc: Process, kill: bool = True,
                 wait_on_shutdown: bool = True, name: str | None = None) -> None:
        Stream.__init__(self, "reaper:%s" % (name or proc.name or proc.pid,))
        self.broker = broker
        self.proc = proc
        self.kill = kill
        self.keep_alive = wait_on_shutdown
        try:
            self.rfd = os.pidfd_open(proc.pid)
        except (AttributeError, OSError):  # Linux < 5.3, a seccomp filter, valgrind: poll
            self.rfd = None
        self._timers: list = []
        self._interval = 0.005

    def start(self) -> None:
        if self.rfd is not None:
            mitogen.core.set_cloexec(self.rfd)
            self.broker.start_receive(self)
        else:
            # Not watched, so not among the streams the broker ends as it exits: told then.
            listen(self.broker, "exit", lambda: self.on_disconnect(self.broker))
            self._poll_later()

    def _poll_later(self) -> None:
        self._timers.append(self.broker.timer(self._interval, self.reap))
        self._interval = min(0.5, self._interval * 2)

    def reap(self) -> None:
        """Collect the process's exit status if it has ended."""
        if self.proc.poll() is not None:
            self._reaped()
        elif self.rfd is None:
            self._poll_later()

    def on_readable(self, broker: mitogen.core.Broker) -> None:
        self.reap()

    def stream_gone(self) -> None:
        """The child's stream disconnected: give the process a moment to exit by itself."""
        if self.proc.detached or self.proc.poll() is not None:
            self._reaped()
            return
        if not self.kill:
            return
        self._timers.append(self.broker.timer(self.TERM_AFTER,
                                              self.proc.terminate))
        self._timers.append(self.broker.timer(self.KILL_AFTER,
                                              self.proc.kill))

    def _reaped(self) -> None:
        for timer in self._timers:
            timer.cancel()
        if self.proc.returncode is not None:
            LOG.debug("%r: child %s", self, returncode_to_str(self.proc.returncode))
            mitogen.core.fire(self, "exit")
        self.on_disconnect(self.broker)

    def on_disconnect(self, broker: mitogen.core.Broker) -> None:
        if not self.closed:
            self.proc.kill_and_reap()
        Stream.on_disconnect(self, broker)


_STDERR_LOG = logging.getLogger("mitogen.stderr")


class StderrStream(Stream):
    """Logs what a child prints on stderr before it takes over its own stdio, and keeps the
    last lines for the error message if the bootstrap fails."""

    def __init__(self, fd: int, name: str) -> None:
        Stream.__init__(self, "stderr:" + name)
        self.rfd = fd
        mitogen.core.set_nonblock(fd)
        mitogen.core.set_cloexec(fd)
        self.lines: list[str] = []
        self._partial = b""
        self._name = name

    def on_readable(self, broker: mitogen.core.Broker) -> None:
        data = mitogen.core.read_chunk(self.rfd)
        if data is None:
            return
        if not data:
            if self._partial:
                self._add([self._partial])
            self.on_disconnect(broker)
            return
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        self._add(lines)

    def _add(self, lines: list[bytes]) -> None:
        for raw in lines:
            line = raw.decode("utf-8", "replace").rstrip("\r")
            self.lines.append(line)
            _STDERR_LOG.debug("%s: %s", self._name, line)  # one logger, not one per child
        del self.lines[:-ERROR_LINES]


# ---------------------------------------------------------------------------------------------
# Bootstrap
# ---------------------------------------------------------------------------------------------


class Keepalive:
    """Notices a link that went silent (a partition that drops packets rather than closing
    the connection) and disconnects it, so routes are deleted and waiters fail.

    Every `interval` seconds without data from the child, a PING is sent, which the child's
    router answers: any answer, or any other traffic, proves the link alive. After `count`
    silent intervals the stream is dropped, so detection takes at most
    ``interval * (count + 1)`` seconds.
    """

    def __init__(self, router: Router, stream: MessageStream, interval: float,
                 count: int) -> None:
        self.router = router
        self.stream = stream
        self.interval = interval
        self.count = count
        self._last_rx = -1
        self._silent = 0
        handle = router._keepalive_handle
        if handle is None:
            handle = router._keepalive_handle = router.add_handler(lambda msg: None)
        self.reply_handle = handle

    def start(self) -> None:
        self.router.broker.timer(self.interval, self._tick)

    def _tick(self) -> None:
        stream = self.stream
        if stream.closed:
            return
        if stream.rx_bytes != self._last_rx or stream.paused is not None:
            # (a paused stream is silent because we do not read it: not the child's doing)
            self._last_rx = stream.rx_bytes
            self._silent = 0
        else:
            self._silent += 1
            if self._silent >= self.count:
                LOG.error("%r: nothing received for %.1fs (keepalive): disconnecting",
                          stream, self.interval * self._silent)
                stream.on_disconnect(self.router.broker)
                return
        stream.send(Message(dst_id=stream.remote_id, handle=mitogen.core.PING,
                            reply_to=self.reply_handle))
        self.router.broker.timer(self.interval, self._tick)


class BootStream(Stream):
    """Talks to a new child until it says MITO001: sends the payload after MITO000, lets
    subclasses answer prompts (passwords, host keys), then hands the descriptors over to a
    MessageStream. Runs on the broker thread."""

    keep_alive = True
    rfd: int
    wfd: int

    def __init__(self, conn: Connection) -> None:
        Stream.__init__(self, "boot:" + conn.stream_name)
        self.conn = conn
        self.rfd = conn.proc.stdout
        self.wfd = conn.proc.stdin
        self._buf = b""
        self._payload_sent = False
        self._pending = b""
        self.output: list[str] = []

    def on_readable(self, broker: mitogen.core.Broker) -> None:
        data = mitogen.core.read_chunk(self.rfd)
        if data is None:
            return
        if not data:
            self.conn._on_boot_eof()
            return
        self._buf += data
        while True:
            if not self._payload_sent:
                index = self._buf.find(BOOT_START)
                if index < 0:
                    self._scan_output()
                    return
                self._note_output(self._buf[:index])
                self._buf = self._buf[index + len(BOOT_START):]
                self.send_payload()
                continue
            index = self._buf.find(BOOT_DONE)
            if index < 0:
                return
            self._note_output(self._buf[:index])
            leftover = self._buf[index + len(BOOT_DONE):]
            self._buf = b""
            self.conn._boot_succeeded(leftover)
            return

    def _scan_output(self) -> None:
        """Offer complete lines (and a trailing prompt) to the connection, keep the rest."""
        lines = self._buf.split(b"\n")
        self._buf = lines.pop()
        for line in lines:
            self._note_output(line)
        if self._buf:
            consumed = self.conn.on_partial_output(self._buf, self)
            if consumed:
                self._note_output(self._buf)
                self._buf = b""

    def _note_output(self, data: bytes) -> None:
        for line in data.split(b"\n"):
            if line.strip():
                text = line.decode("utf-8", "replace").rstrip("\r")
                self.output.append(text)
                del self.output[:-ERROR_LINES]
                self.conn.on_output_line(text, self)

    def write(self, data: bytes) -> None:
        """Queue `data` for the child's stdin (a password, the payload)."""
        self._pending += data
        self.on_writable(self.conn.broker)

    def send_payload(self) -> None:
        if not self._payload_sent:
            self._payload_sent = True
            if not self.conn.payload_sent_early:
                self.write(self.conn.payload)

    def on_writable(self, broker: mitogen.core.Broker) -> None:
        while self._pending:
            try:
                written = os.write(self.wfd, self._pending)
            except BlockingIOError:
                break
            except OSError as e:
                self.conn._boot_failed(EofError, "write to child failed: %s" % (e,))
                return
            self._pending = self._pending[written:]
        if self._pending:
            broker._start_transmit(self)
        else:
            broker._stop_transmit(self)

    def release(self, broker: mitogen.core.Broker) -> None:
        """Stop watching the descriptors without closing them: a MessageStream takes over."""
        broker.stop_receive(self)
        broker._stop_transmit(self)
        self.closed = True


class Connection:
    """Starts one child context and bootstraps it; subclasses implement a method each.

    `get_boot_command()` is the whole method-specific part for most methods: the Python
    command line wrapped in ssh, sudo, docker exec, ...
    """

    options_class: Callable[..., Options] = Options
    options: Options
    name_prefix = "local"
    #: Whether the payload may be written before MITO000 arrives, saving a round trip
    #: (it then waits in the socket until the first stage reads it). Only where nothing but
    #: our first stage can read the child's stdin: here, where this process starts Python
    #: itself. A login shell, a profile script or a wrapper could read it away otherwise.
    eager_payload = True
    #: Whether the process started is the child's Python itself (else a wrapper: ssh,
    #: sudo, docker exec, ...).
    child_is_immediate_subprocess = True
    #: Whether the payload carries the core's bytecode as well as its source (about 58
    #: KiB more): a child whose Python has this one's bytecode magic number then skips
    #: compiling the core, 30 ms on the critical path of its start; any other compiles the
    #: source as before. For children on this machine, where bytes cost next to nothing;
    #: not over a network (ssh, kubectl).
    sends_bytecode = True
    #: Keyword arguments for create_child(): stderr on a pipe of its own, read for
    #: diagnosis while the child boots.
    create_child_args: dict = {"stderr_pipe": True}
    #: Starts the boot command: create_child(args, **create_child_args).
    create_child = staticmethod(create_child)
    #: Appended to the error of a child that closed its output during bootstrap.
    eof_error_hint: str | None = None
    #: Why a boot failed, when the child closed its output and is still running.
    eof_error_msg = "the child closed its output during bootstrap"
    #: The process started, once connect() has started it (None before).
    proc: Process = None  # type: ignore[assignment]
    #: Whether the child detached (ExternalContext.detach()): it outlives its stream.
    detached = False
    #: The exception connect() raised, if it failed.
    exception: BaseException | None = None

    def __init__(self, options: Options, router: Router) -> None:
        self.options = options
        self.router = router
        self.broker = router.broker
        # proc and context are set by connect(), before anything else uses them.
        self.proc = None  # type: ignore[assignment]
        self.stream: MessageStream | None = None
        self.context: Context = None  # type: ignore[assignment]
        self.payload = b""
        self.payload_sent_early = False
        self._latch = Latch()
        self._boot: BootStream | None = None
        self._stderr: StderrStream | None = None
        self._reaper: Reaper | None = None
        self._timer: Any = None
        self._done = False
        self.stream_name = ""

    @property
    def stdio_stream(self) -> MessageStream | None:
        """The stream of messages to the child, once it has booted."""
        return self.stream

    @property
    def stderr_stream(self) -> StderrStream | None:
        """The stream reading the child's stderr (or its PTY), while it is open."""
        return self._stderr

    # --- the method-specific part

    def get_preamble(self) -> bytes:
        """The compressed program for this connection's context. It is sent after MITO000,
        preceded by its length as 8 ASCII digits, and followed by the core's bytecode
        likewise (length 0 where :attr:`sends_bytecode` is false)."""
        if not self.payload:
            preamble = build_payload(self.get_econtext_config())
            bytecode = get_core_bytecode() if self.sends_bytecode else b""
            self.payload = b"%08d%s%08d%s" % (len(preamble), preamble, len(bytecode), bytecode)
        return self.payload[8:8 + int(self.payload[:8])]

    def get_econtext_config(self) -> dict:
        """The configuration the child's ExternalContext.main() starts with."""
        return self.router._child_config(self.context, self.options)

    def get_python_argv(self) -> list:
        path = self.options.python_path  # a list once Options() has run
        return [path] if isinstance(path, str) else list(path or ())

    def get_boot_command(self) -> list:
        name = self.remote_name()
        return [*self.get_python_argv(), "-S", "-c", STUB, _encoded_first_stage(), name]

    @property
    def boots_in_place(self) -> bool:
        """Whether the child is booted by :data:`IN_PLACE_STAGE`: when the boot command is
        this process starting Python itself (no method wraps it in ssh, sudo, ...) on
        Linux (memfd), so that this process sets the child's ``argv[0]``."""
        return (type(self).get_boot_command is Connection.get_boot_command
                and self.create_child is create_child and len(self.get_python_argv()) == 1
                and sys.platform.startswith("linux"))

    def get_in_place_command(self) -> tuple:
        """(executable, argv) of a child booted in place; argv[0] names the context as
        the second interpreter of the usual first stage would."""
        python = self.get_python_argv()[0]
        if "/" in python:
            executable = python
        else:
            import shutil  # only for a bare name: not worth loading in every parent

            executable = shutil.which(python) or python
        argv0 = "%s(mitogen:%s)" % (executable, self.remote_name())
        return executable, [argv0, "-S", "-c", STUB, _encoded_first_stage(IN_PLACE_STAGE)]

    def remote_name(self) -> str:
        """What the child's argv[0] says it is; never empty, as a login shell (sudo -i, su)
        would drop an empty argument."""
        name = self.options.remote_name or self.options.name or self.stream_name or \
            get_default_remote_name()
        return name.replace("/", "_").replace("'", "_")

    def make_stream_name(self, pid: int) -> str:
        return "%s.%d" % (self.name_prefix, pid)

    def on_output_line(self, line: str, boot: BootStream) -> None:
        """A line the child printed before MITO000: methods with prompts look here."""
        LOG.debug("%s: %s", self.stream_name or self.name_prefix, line)

    def on_partial_output(self, data: bytes, boot: BootStream) -> bool:
        """Output without a newline yet (a prompt); return True when it was handled."""
        return False

    def make_stderr_stream(self, fd: int) -> StderrStream:
        """The stream that reads the child's stderr during boot; methods whose prompts
        arrive there (on a PTY) return one that also looks for them."""
        return StderrStream(fd, self.stream_name)

    def diagnose(self, exc_class: type, reason: str, lines: list) -> tuple:
        """Turn a failed boot into the exception a user can act on (a refused password, an
        unknown host key); `lines` is what the child printed. The default keeps it."""
        return exc_class, reason

    def start_child(self, args: list | None = None) -> Process:
        """Start the boot command (`args`, by default get_boot_command())."""
        executable = None
        if args is None:
            if self.boots_in_place:
                executable, args = self.get_in_place_command()
            else:
                args = self.get_boot_command()
        LOG.debug("%s: starting %s", self.name_prefix, Argv(args))
        if executable is not None:
            return create_child(args, executable=executable, **self.create_child_args)
        return self.create_child(args, **self.create_child_args)

    # --- the common part

    def connect(self, context: Context) -> None:
        """Start the child for `context` and wait until it is ready for messages."""
        if not self.broker.running:
            raise CancelledError(BROKER_SHUTDOWN_MSG)
        self.context = context
        self.proc = self.start_child()
        self.stream_name = self.make_stream_name(self.proc.pid)
        self.proc.name = self.stream_name
        # Built while the child's interpreter starts: the length is no longer on its
        # command line, so the first child of a process does not wait for the minifier.
        self.get_preamble()
        if self.eager_payload:
            self._write_early()
        try:
            self.broker.defer(self._start_boot)
        except Error:  # the broker exited meanwhile
            for fd in {self.proc.stdin, self.proc.stdout, self.proc.stderr}:
                if fd is not None:
                    os.close(fd)
            self.proc.kill_and_reap()
            raise CancelledError(BROKER_SHUTDOWN_MSG) from None
        try:
            ok, value = self._latch.get(timeout=self.options.connect_timeout)
        except TimeoutError:
            try:
                self.broker.defer(self._boot_failed, TimeoutError,
                                  "%s: no answer within connect_timeout=%.1fs"
                                  % (self.router.connection_timeout_msg,
                                     self.options.connect_timeout))
            except Error:
                pass  # the broker has exited: it failed the boot as it did
            ok, value = self._latch.get()
        self._latch = None  # type: ignore[assignment]  # done with: keep a child small
        if not ok:
            self.exception = value
            raise value
        if self.options.profiling:
            import mitogen.profiling

            context.call(mitogen.profiling.start_in_child)

    def _write_early(self) -> None:
        try:
            written = os.write(self.proc.stdin, self.payload)
        except (BlockingIOError, OSError):
            return
        if written == len(self.payload):
            self.payload_sent_early = True
        else:
            self.payload = self.payload[written:]

    def _start_boot(self) -> None:
        try:
            self._watch_boot()
        except Exception as e:
            LOG.exception("%s: cannot watch the new child", self.stream_name)
            self._boot_failed(StreamError, "cannot watch the new child: %s" % (e,))

    def _watch_boot(self) -> None:
        proc = self.proc
        self._reaper = Reaper(self.broker, proc, name=self.stream_name)
        self._reaper.start()
        if proc.stderr is not None:
            self._stderr = self.make_stderr_stream(proc.stderr)
            self.broker.start_receive(self._stderr)
        self._boot = BootStream(self)
        mitogen.core.set_nonblock(proc.stdout)
        mitogen.core.set_nonblock(proc.stdin)
        self.broker.start_receive(self._boot)
        listen(self.broker, "shutdown", self._on_broker_shutdown)

    def _stop_listening(self) -> None:
        try:
            unlisten(self.broker, "shutdown", self._on_broker_shutdown)
        except ValueError:
            pass  # the boot failed before it was listening

    def _on_broker_shutdown(self) -> None:
        if not self._done:
            self._boot_failed(CancelledError, BROKER_SHUTDOWN_MSG)

    #: How long a child that closed its output during bootstrap may take to exit, so that
    #: its exit status (a signal, often) can be reported.
    EXIT_WAIT = 2.0

    def _on_boot_eof(self) -> None:
        """The child closed its output before MITO001: report how it ended, which its
        reaper learns at once when it has exited (a crashing child says nothing itself)."""
        self.broker.stop_receive(self._boot)
        reaper = self._reaper
        if self.proc.poll() is not None or reaper is None or reaper.closed:
            self._boot_ended()
            return
        listen(reaper, "exit", self._boot_ended)
        self._timer = self.broker.timer(self.EXIT_WAIT, self._boot_ended)

    def _boot_ended(self) -> None:
        returncode = self.proc.poll()
        if returncode is None:
            reason = "%s (the process is still running)" % (self.eof_error_msg,)
        elif not self.proc.status_known:
            reason = "child exited during bootstrap"
        else:
            reason = "child %s during bootstrap" % (returncode_to_str(returncode),)
        self._boot_failed(EofError, reason)

    def _boot_failed(self, exc_class: type, reason: str) -> None:
        if self._done:
            return
        self._done = True
        if self._timer is not None:
            self._timer.cancel()
        self._stop_listening()
        lines = list(self._boot.output if self._boot else [])
        if self._stderr is not None:
            self._stderr.on_readable(self.broker)
            lines += self._stderr.lines
        exc_class, reason = self.diagnose(exc_class, reason, lines)
        text = "%s: %s" % (self.stream_name, reason)
        if lines and exc_class is not CancelledError:
            text += "; last %d lines of output:\n  %s" % (len(lines[-ERROR_LINES:]),
                                                         "\n  ".join(lines[-ERROR_LINES:]))
        if issubclass(exc_class, EofError) and self.eof_error_hint:
            text += "\n\n" + self.eof_error_hint
        if self._boot is not None:
            self._boot.on_disconnect(self.broker)
        if self._stderr is not None:
            self._stderr.on_disconnect(self.broker)
        if self._boot is None or self._stderr is None:
            # Failed before the streams that own them existed: close what is left.
            self._close_unowned_fds()
        if self._reaper is not None:
            self._reaper.on_disconnect(self.broker)
        else:
            self.proc.kill_and_reap()
        self._latch.put((False, exc_class(text)))

    def _close_unowned_fds(self) -> None:
        proc = self.proc
        fds = set() if self._boot is not None else {proc.stdin, proc.stdout}
        if self._stderr is None and proc.stderr is not None:
            fds.add(proc.stderr)
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass

    def _boot_succeeded(self, leftover: bytes) -> None:
        if self._done:
            return
        self._done = True
        if self._timer is not None:
            self._timer.cancel()
        self.payload = b""  # 16-74 KiB a child, of no more use
        if self._boot is not None:
            self._boot.release(self.broker)
            self._boot = None
        self._stderr = None  # the broker reads it until the child lets go of it
        self._stop_listening()
        stream_class = IoLoggingChildStream if IOLOG.isEnabledFor(logging.DEBUG) \
            else ChildStream
        stream = stream_class(self.router, self.proc.stdout, self.proc.stdin,
                             self.stream_name, remote_id=self.context.context_id)
        stream.conn = self
        self.stream = stream
        if leftover:
            stream.decoder.feed(leftover)
        if self.context.name is None:
            self.context.name = self.stream_name
        self.router.register(self.context, stream)
        self.router.announce(self.context)
        self.broker.start_receive(stream)
        if leftover:
            stream.process_buffered(self.broker)
        if self.options.keepalive_interval:
            Keepalive(self.router, stream, self.options.keepalive_interval,
                      self.options.keepalive_count).start()
        self._latch.put((True, self.context))

    def _on_stream_disconnect(self) -> None:
        if self._reaper is not None:
            self._reaper.stream_gone()


# ---------------------------------------------------------------------------------------------
# Routing between contexts: ID allocation, ADD_ROUTE/DEL_ROUTE
# ---------------------------------------------------------------------------------------------


#: Context IDs handed out per ALLOCATE_ID request.
ID_BLOCK_SIZE = 1000
#: ID blocks one child stream may hold (a million IDs): each costs its parent memory.
MAX_ID_BLOCKS = 1000


class ChildIdAllocator:
    """Hands out context IDs in a child that starts children: from a block of 1000 that its
    parent grants over ALLOCATE_ID, asking for a new block when one runs out.

    Allocation is hop by hop, so that every context on the way down knows which IDs belong
    below which of its streams: a child asking for a block is served with a block its
    parent asks for on its behalf, recorded against that child's stream at each hop (see
    :meth:`Router.grant_ids`). A subtree can then announce routes only for its own IDs.
    """

    def __init__(self, router: Router) -> None:
        self.router = router
        self._lock = threading.Lock()
        self._next = 0
        self._end = 0
        router.add_handler(self._on_allocate_id, ALLOCATE_ID, overwrite=True)

    def allocate(self) -> int:
        with self._lock:
            if self._next >= self._end:
                parent = self.router.context_by_id(mitogen.parent_id)
                start, end = parent.send_await(Message(handle=ALLOCATE_ID))
                self._next, self._end = start, end
            context_id = self._next
            self._next += 1
            return context_id

    def _on_allocate_id(self, msg: Message) -> None:
        """A child of ours starts children: get it a block from our parent (without
        waiting: this is the broker thread) and record it against the child's stream."""
        stream = self.router.adjacent_stream(msg, "ALLOCATE_ID")
        if stream is None or not self.router.may_grant(stream, msg):
            return
        parent = self.router.context_by_id(mitogen.parent_id)

        def on_block(reply: Message) -> None:
            if reply.is_dead:
                msg.reply(Message.dead("no ID block: %s" % (reply._dead_reason(),)))
                return
            start, end = reply.unpickle()
            self.router.grant_ids(stream, start, end)
            msg.reply((start, end))

        handle = self.router.add_handler(on_block, persist=False, respondent=parent)
        parent.send(Message(handle=ALLOCATE_ID, reply_to=handle))


class ChildStream(MessageStream):
    """The parent's end of the stream to a child: asks it to shut down with the broker, and
    tells its Connection when it is gone."""

    def _gone(self, broker: mitogen.core.Broker) -> None:
        super()._gone(broker)
        if self.conn is not None:
            self.conn._on_stream_disconnect()

    def on_shutdown(self, broker: mitogen.core.Broker) -> None:
        if not self.closed:
            self.send(Message(dst_id=self.remote_id, handle=SHUTDOWN))


#: Logs every read and write of the streams to children (``log_to_file(level="IO")``).
IOLOG = logging.getLogger("mitogen.io")

#: How many bytes of each read or write an IO record shows.
IO_LOG_BYTES = 64


class IoLoggingChildStream(ChildStream):
    """A ChildStream that logs each read and write, with its first bytes, on ``mitogen.io``
    at DEBUG: the stream a child gets while that logger is enabled for DEBUG. (Chosen per
    stream, so that other streams pay nothing for it.)"""

    def _read_into_decoder(self) -> int | None:
        target = self.decoder.read_target()
        n = super()._read_into_decoder()
        if n:
            head = b"" if target is not None else \
                bytes(mitogen.core._read_buffer()[:min(n, IO_LOG_BYTES)])
            IOLOG.debug("%s: read %d bytes: %r", self.name, n, head)
        return n

    def _write_now(self, header: bytes, data: Any) -> str | None:
        before = self.tx_bytes
        failed = super()._write_now(header, data)
        self._log_write(before, bytes(header) + bytes(data[:IO_LOG_BYTES]))
        return failed

    def on_writable(self, broker: mitogen.core.Broker) -> None:
        before = self.tx_bytes
        head = bytes(self._out[0][:IO_LOG_BYTES]) if self._out else b""
        super().on_writable(broker)
        self._log_write(before, head)

    def _log_write(self, before: int, head: bytes) -> None:
        written = self.tx_bytes - before
        if written:
            IOLOG.debug("%s: wrote %d bytes: %r", self.name, written, head[:written])


class Context(mitogen.core.Context):
    """A context as its parents see it; also has acall(), for asyncio programs."""

    #: What default_call_chain is made of.
    call_chain_class = CallChain

    @property
    def default_call_chain(self) -> CallChain:
        if self._call_chain is None:
            self._call_chain = self.call_chain_class(self)
        return self._call_chain

    async def acall(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """``await ctx.acall(fn, ...)``: call() for an asyncio event loop; see
        :func:`mitogen.aio.call`."""
        import mitogen.aio

        return await mitogen.aio.call(self, fn, *args, **kwargs)


class Router(mitogen.core.Router):
    """A router that can start children and forward routes for them."""

    context_class = Context
    #: The handle keepalive answers arrive on (made by the first Keepalive).
    _keepalive_handle: int | None = None
    debug = False
    #: Default for the `profiling` option of every connection method.
    profiling = False
    #: Error text of a connection whose child did not boot within connect_timeout.
    connection_timeout_msg = "connection timed out"
    #: Allocates context IDs (the master's own allocator in the master).
    id_allocator: Any = None
    #: The master's ModuleResponder (None in a child, whose ModuleForwarder is `forwarder`).
    responder: Any = None
    #: The master's LogForwarder.
    log_forwarder: Any = None

    def __init__(self, broker: mitogen.core.Broker) -> None:
        super().__init__(broker)
        self._become_parent()

    def _become_parent(self) -> None:
        """State and handlers of a context that has children (also run by upgrade() on
        a plain child's router)."""
        self._connections: list[Connection] = []
        self._id_blocks: dict[MessageStream, list[tuple[int, int]]] = {}
        self.id_allocator: Any = ChildIdAllocator(self)
        self.add_handler(self._on_add_route, ADD_ROUTE, overwrite=True)
        self.add_handler(self._on_del_route_msg, DEL_ROUTE, overwrite=True)
        self.add_handler(self._on_detaching, mitogen.core.DETACHING, overwrite=True)

    # --- who owns which IDs

    def adjacent_stream(self, msg: Message, what: str) -> MessageStream | None:
        """The child stream `msg` came on, if the child at its other end wrote it itself
        (route messages travel hop by hop); else count and log the drop and return None."""
        stream = self._stream_by_id.get(msg.src_id)
        if stream is None or stream is self.parent_stream or \
                stream.remote_id != msg.src_id or msg.auth_id != msg.src_id:
            self._drop(msg, stream or self.parent_stream,
                       "%s must come from a directly connected child" % (what,))
            return None
        return stream

    def may_grant(self, stream: MessageStream, msg: Message) -> bool:
        if len(self._id_blocks.get(stream, ())) < MAX_ID_BLOCKS:
            return True
        self._drop(msg, stream, "it already holds %d ID blocks" % (MAX_ID_BLOCKS,))
        msg.reply(Message.dead("no more ID blocks for %s" % (stream.name,)))
        return False

    def grant_ids(self, stream: MessageStream, start: int, end: int) -> None:
        """Record that IDs start..end-1 belong to the subtree behind `stream`."""
        self._id_blocks.setdefault(stream, []).append((start, end))

    def owns(self, stream: MessageStream, context_id: int) -> bool:
        """Whether `context_id` was granted to the subtree behind `stream`."""
        return any(start <= context_id < end for start, end in self._id_blocks.get(stream, ()))

    def _on_stream_disconnect(self, stream: MessageStream) -> None:
        """Keep nothing of a child stream that is gone: its routes, ID blocks, connection
        and what was sent down it."""
        super()._on_stream_disconnect(stream)
        self._id_blocks.pop(stream, None)
        if stream.conn in self._connections:
            self._connections.remove(stream.conn)
        forwarder = getattr(self, "forwarder", None)
        if forwarder is not None:
            forwarder.forget_stream(stream)

    # --- routes

    def _on_detaching(self, msg: Message) -> None:
        """A direct child is detaching: its process must survive its stream."""
        stream = self._stream_by_id.get(msg.src_id)
        conn = getattr(stream, "conn", None)
        if msg.is_dead or conn is None or not is_immediate_child(msg, stream):
            return
        LOG.debug("%r: %r is detaching", self, stream)
        conn.detached = conn.proc.detached = True

    def _on_add_route(self, msg: Message) -> None:
        """A child announces a context in its subtree: accepted only for an ID that was
        granted to that subtree, and never over a route through another stream."""
        if msg.is_dead:
            return
        stream = self.adjacent_stream(msg, "ADD_ROUTE")
        if stream is None:
            return
        target_id, name = msg.unpickle()
        if not (isinstance(target_id, int) and (name is None or isinstance(name, str))):
            self._drop(msg, stream, "malformed ADD_ROUTE")
            return
        current = self._stream_by_id.get(target_id)
        if current not in (None, stream) or not self.owns(stream, target_id):
            self._drop(msg, stream, "ADD_ROUTE for %r, an ID never granted to %s"
                       % (target_id, stream.name))
            return
        self.context_by_id(target_id, via_id=msg.src_id, name=name)
        self.add_route(target_id, stream)
        self._propagate_up(ADD_ROUTE, (target_id, name))

    def _on_del_route_msg(self, msg: Message) -> None:
        """DEL_ROUTE from a parent is news of a context gone elsewhere; from a child, it
        may delete only a route through that child, and never the child's own."""
        if msg.is_dead:
            return
        if self.stream_by_id(msg.src_id) is self.parent_stream:
            if not mitogen.core.has_parent_authority(msg):
                self._drop(msg, self.parent_stream, "DEL_ROUTE from a non-parent")
                return
            target_id = msg.unpickle()
            if target_id not in self._stream_by_id:
                self._forget_context(target_id)
                self._notify_streams(target_id, exclude=self.parent_stream)
            return
        stream = self.adjacent_stream(msg, "DEL_ROUTE")
        if stream is None:
            return
        target_id = msg.unpickle()
        if target_id == stream.remote_id or self._stream_by_id.get(target_id) is not stream:
            self._drop(msg, stream, "DEL_ROUTE for %r, which %s may not delete"
                       % (target_id, stream.name))
            return
        self.del_route(target_id)

    def _propagate_up(self, handle: int, body: Any) -> None:
        if self.parent_stream is not None:
            parent = self.context_by_id(mitogen.parent_id)
            parent.send(Message.pickled(body, handle=handle))

    def del_route(self, target_id: int) -> None:
        """Forget `target_id` and tell our parent and every stream that talked to it."""
        stream = self._stream_by_id.get(target_id)
        super().del_route(target_id)
        if stream is None:
            return
        self._notify_streams(target_id, exclude=stream)
        if self.parent_stream is not None and self.parent_stream is not stream:
            self._propagate_up(DEL_ROUTE, target_id)

    def _notify_streams(self, target_id: int, exclude: Any) -> None:
        """Send DEL_ROUTE down every child stream that ever carried a message for
        `target_id`, so that whoever waits on it there learns at once."""
        body = Message.pickled(target_id, handle=DEL_ROUTE).data
        for other in self._all_message_streams():
            if other is not exclude and other is not self.parent_stream and \
                    target_id in other.egress_ids:
                other.egress_ids.discard(target_id)
                other.send(Message(dst_id=other.remote_id, handle=DEL_ROUTE, data=body))

    def _all_message_streams(self) -> list:
        streams = {id(s): s for s in self._stream_by_id.values()}
        return list(streams.values())

    def get_streams(self) -> dict:
        """{context_id: stream} for every route, as Mitogen's Router.get_streams()."""
        return dict(self._stream_by_id)

    # --- starting children

    def _child_config(self, context: Context, options: Options) -> dict:
        """What the child's ExternalContext starts with. A setting that equals the child's
        own default is left out: the line travels in every boot payload."""
        responder = getattr(self, "responder", None)
        config = {
            "context_id": context.context_id,
            "parent_ids": [mitogen.context_id, *mitogen.parent_ids],
            "log_level": logging.getLogger().getEffectiveLevel(),
            "debug": options.debug,
            "max_message_size": options.max_message_size,
            "unidirectional": options.unidirectional,
            "version": list(mitogen.__version__),
            "whitelist": list(getattr(responder, "whitelist", ())),
            "blacklist": list(getattr(responder, "blacklist", ())),
            "core_fd": 101,
            "in_fd": 100,
            "name": context.name,
        }
        for key, default in _CHILD_DEFAULTS.items():
            if config[key] == default:
                del config[key]
        return config

    def allocate_id(self) -> int:
        return self.id_allocator.allocate()

    def upgrade(self, importer: Any = None, parent: Any = None) -> None:
        """Let a plain child's router, whose class has just become this one (see
        upgrade_router()), start children: ID allocation, routes, and a ModuleForwarder that
        serves its children from `importer`'s cache and asks `parent` for the rest. A
        router that was built as a Router has all that already."""
        if "id_allocator" in vars(self):
            return
        self._become_parent()
        if importer is not None:
            self.forwarder = ModuleForwarder(self, parent, importer)

    def connect(self, method_name: str, name: str | None = None,
                **kwargs: Any) -> mitogen.core.Context:
        """Start a child with `method_name` (``local``, ``ssh``, ...) and return its Context.

        With ``via=context`` the child is started by that context instead of this one.
        """
        via = kwargs.pop("via", None)
        if via is not None:
            return self.proxy_connect(via, method_name, name=name, **kwargs)
        kwargs.setdefault("max_message_size", self.max_message_size)
        kwargs.setdefault("profiling", self.profiling)
        conn_class = get_connection_class(method_name)
        try:
            options = conn_class.options_class(name=name, **kwargs)
        except TypeError as e:
            raise TypeError("%s(): %s" % (method_name, e)) from None
        conn = conn_class(options, self)
        context = self.context_class(self, self.allocate_id(), name=name)
        conn.connect(context)
        self._connections.append(conn)
        return context

    def announce(self, context: Context) -> None:
        """Tell the parents about a new child, before anything from it is read (the broker
        calls this between registering its stream and reading it), so that no message from
        the child can reach a parent ahead of the route back to it."""
        if self.parent_stream is not None:
            self._propagate_up(ADD_ROUTE, (context.context_id, context.name))

    def proxy_connect(self, via_context: Context, method_name: str, name: str | None = None,
                      **kwargs: Any) -> mitogen.core.Context:
        responder = getattr(self, "responder", None)
        if responder is not None:
            # What the via context will import to start the child travels ahead of the call,
            # on the same ordered streams: no GET_MODULE round trip across the tree.
            modules = ["mitogen.parent"]
            if method_name != "local":
                modules.append("mitogen." + method_name)
            responder.forward_modules(via_context, modules)
        context_id, stream_name = via_context.call(_proxy_connect, name, method_name, kwargs)
        if context_id is None:
            raise _connect_error(*stream_name)
        self.broker.defer_sync(lambda: self._learn_route(via_context, context_id))
        context = self.context_by_id(context_id, via_id=via_context.context_id,
                                     name=name or stream_name)
        if name is None and via_context.name:
            # Compose along the route: sudo.root started by ssh.host:22 is named
            # ssh.host:22.sudo.root (the ADD_ROUTE that got here first used the short name).
            context.name = "%s.%s" % (via_context.name, stream_name)
        context.via = via_context
        return context

    def _learn_route(self, via_context: Context, context_id: int) -> None:
        """Route `context_id`, which `via_context` reports having started, through the
        stream towards it, unless its ADD_ROUTE already did (it travels ahead of the
        reply); refuse an ID that was never granted to that subtree."""
        stream = self._stream_by_id.get(via_context.context_id)
        current = self._stream_by_id.get(context_id)
        if stream is None or current not in (None, stream) or (
                current is None and not self.owns(stream, context_id)):
            raise StreamError("%r reported starting context %r, an ID it does not own"
                              % (via_context, context_id))
        if current is None:
            self.add_route(context_id, stream)

    def disconnect(self, context: Context) -> None:
        stream = self._stream_by_id.get(context.context_id)
        if stream is not None and stream.remote_id == context.context_id:
            self.broker.defer(stream.on_disconnect, self.broker)

    def disconnect_stream(self, stream: MessageStream) -> None:
        self.broker.defer(stream.on_disconnect, self.broker)

    def disconnect_all(self) -> None:
        for stream in self._all_message_streams():
            self.disconnect_stream(stream)

    # --- the connection methods, as Mitogen names them

    def local(self, **kwargs: Any) -> mitogen.core.Context:
        return self.connect("local", **kwargs)

    def fork(self, **kwargs: Any) -> mitogen.core.Context:
        return self.connect("fork", **kwargs)

    def ssh(self, **kwargs: Any) -> mitogen.core.Context:
        return self.connect("ssh", **kwargs)

    def sudo(self, **kwargs: Any) -> mitogen.core.Context:
        return self.connect("sudo", **kwargs)

    def su(self, **kwargs: Any) -> mitogen.core.Context:
        return self.connect("su", **kwargs)

    def doas(self, **kwargs: Any) -> mitogen.core.Context:
        return self.connect("doas", **kwargs)

    def docker(self, **kwargs: Any) -> mitogen.core.Context:
        return self.connect("docker", **kwargs)

    def podman(self, **kwargs: Any) -> mitogen.core.Context:
        return self.connect("podman", **kwargs)

    def buildah(self, **kwargs: Any) -> mitogen.core.Context:
        return self.connect("buildah", **kwargs)

    def kubectl(self, **kwargs: Any) -> mitogen.core.Context:
        return self.connect("kubectl", **kwargs)

    def lxc(self, **kwargs: Any) -> mitogen.core.Context:
        return self.connect("lxc", **kwargs)

    def lxd(self, **kwargs: Any) -> mitogen.core.Context:
        return self.connect("lxd", **kwargs)

    def incus(self, **kwargs: Any) -> mitogen.core.Context:
        return self.connect("incus", **kwargs)

    def jail(self, **kwargs: Any) -> mitogen.core.Context:
        return self.connect("jail", **kwargs)

    def setns(self, **kwargs: Any) -> mitogen.core.Context:
        return self.connect("setns", **kwargs)


class ModuleForwarder:
    """Serves GET_MODULE from children of an intermediate context: from this context's
    importer cache, or by asking its own parent (`parent_context`, through the importer)
    once and caching the answer, so the master never sends a module twice down the same
    stream."""

    def __init__(self, router: Router, parent_context: Any,
                 importer: mitogen.core.Importer) -> None:
        self.router = router
        self.parent_context = parent_context
        self.importer = importer
        self._sent: dict[Any, set[str]] = {}
        router.add_handler(self._on_get_module, mitogen.core.GET_MODULE, overwrite=True)
        router.add_handler(self._on_forward_module, mitogen.core.FORWARD_MODULE,
                           policy=mitogen.core.has_parent_authority, overwrite=True)

    def forget_stream(self, stream: MessageStream) -> None:
        self._sent.pop(stream, None)

    def _on_get_module(self, msg: Message) -> None:
        if msg.is_dead:
            return
        fields = [*bytes(msg.data).decode("utf-8").split("\n"), "", ""]
        fullname, hint, magic = fields[:3]
        stream = self.router.stream_by_id(msg.src_id)
        if stream is self.router.parent_stream:
            LOG.error("%r: ignoring GET_MODULE from above (%d)", self, msg.src_id)
            return
        same_python = magic == mitogen.core.BYTECODE_MAGIC
        self.importer.request(
            fullname, lambda: self._send(msg.src_id, stream, fullname, True, same_python),
            hint or None)

    def _on_forward_module(self, msg: Message) -> None:
        if msg.is_dead:
            return
        context, fullname = msg.unpickle()
        stream = self.router.stream_by_id(context.context_id)
        if stream is self.router.parent_stream:
            return
        self.importer.request(
            fullname, lambda: self._forward(context, stream, fullname))

    def _forward(self, context: Context, stream: Any, fullname: str) -> None:
        self._send(stream.remote_id, stream, fullname, False)
        if stream.remote_id != context.context_id:
            stream.send(Message.pickled((context, fullname), dst_id=stream.remote_id,
                                        handle=mitogen.core.FORWARD_MODULE))

    def _send(self, dst_id: int, stream: Any, fullname: str, asked: bool,
              same_python: bool = False) -> None:
        """Send `fullname` (after the related modules we hold) unless already sent; code
        objects go along only to a child on this context's own Python version."""
        sent = self._sent.setdefault(stream, set())
        entry = self.importer.get_cached(fullname)
        if isinstance(entry, tuple):
            for name in entry[3]:
                related = self.importer.get_cached(name)
                if name not in sent and isinstance(related, tuple):
                    self._send_entry(dst_id, stream, name, related, sent, same_python)
        if asked or fullname not in sent:
            self._send_entry(dst_id, stream, fullname, entry, sent, same_python)

    def _send_entry(self, dst_id: int, stream: Any, fullname: str, entry: Any,
                    sent: set, same_python: bool) -> None:
        sent.add(fullname)
        if isinstance(entry, tuple):
            compressed = entry[4] if len(entry) > 4 else zlib.compress(entry[2], 9)
            code = entry[5] if same_python and len(entry) > 5 else None
            body = (fullname, entry[0], entry[1], compressed, entry[3], code)
        else:
            body = (fullname, None, entry, None, None, None)
        stream.send(Message.pickled(body, dst_id=dst_id, handle=mitogen.core.LOAD_MODULE))


def upgrade_router(econtext: Any) -> Router:
    """Turn a plain child's router into a parent router, the first time it starts a child."""
    router = econtext.router
    if not isinstance(router, Router):
        router.__class__ = Router
        router.upgrade(econtext.importer, econtext.parent)
    return router


def get_connection_class(name: str) -> type[Connection]:
    """The Connection class of connection method `name` (``local``, ``ssh``, ...)."""
    if name == "local":
        return Connection
    import importlib

    try:
        module = importlib.import_module("mitogen." + name)
    except ImportError as e:
        raise Error("unknown connection method %r: %s", name, e) from None
    return module.Connection


def detach(econtext: Any) -> None:
    """Let `econtext`'s context outlive its parent (``ExternalContext.detach()``): tell the
    parent not to end this process, then drop the link once what is queued has gone.

    Calls still running carry on; this context and its subtree no longer belong to the
    program that started them.
    """
    econtext.detached = True
    broker = econtext.broker
    stream = econtext.router.parent_stream
    try:
        os.setsid()
    except OSError:
        pass  # already a session leader
    econtext.parent.send(Message(handle=mitogen.core.DETACHING))
    unlisten(stream, "disconnect", econtext._on_parent_disconnect)
    deadline = mitogen.core.now() + 2.0
    broker.defer_sync(lambda: None)
    while stream.pending_bytes and mitogen.core.now() < deadline:
        broker.defer_sync(lambda: None)
    broker.defer_sync(lambda: stream.on_disconnect(broker))


@mitogen.core.takes_econtext
def _proxy_connect(name: str | None, method_name: str, kwargs: dict, econtext: Any) -> tuple:
    """Runs in the `via` context: start the child there and report its ID and stream name."""
    router = upgrade_router(econtext)
    try:
        context = router.connect(method_name, name=name, **kwargs)
    except (StreamError, TimeoutError) as e:
        # Sent back as data, so that the caller raises the same class (PasswordError, ...)
        # rather than a CallError wrapping it.
        return None, ("%s.%s" % (type(e).__module__, type(e).__qualname__), str(e))
    return context.context_id, context.name


def _connect_error(type_name: str, text: str) -> Exception:
    """The exception a connection made by a `via` context failed with, rebuilt here when it
    is one of mitogen's own connection errors, else a plain StreamError."""
    module_name, _, class_name = type_name.rpartition(".")
    if module_name == "mitogen" or module_name.startswith("mitogen."):
        import importlib

        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError):
            cls = None
        if isinstance(cls, type) and issubclass(cls, (StreamError, TimeoutError)):
            return cls(text)
    return StreamError("%s: %s" % (type_name, text))


def __getattr__(name: str) -> Any:
    """Names kept only for compatibility with Mitogen: see mitogen/parity.py."""
    if name.startswith("__"):
        raise AttributeError(name)
    import mitogen.parity

    return mitogen.parity.lookup(__name__, name)
