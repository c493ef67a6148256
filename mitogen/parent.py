"""What a context needs to start children of its own: spawning, bootstrap and routing.

Sent only to contexts that become parents (by ``via=``); the master always has it. The
bootstrap of a child goes like this (see "The UNIX First Stage"):

1. The boot command runs ``python -S -c STUB FIRST_STAGE NAME`` on the target: STUB
   decodes and runs FIRST_STAGE, a few lines of compressed, base64-encoded Python.
2. The first stage forks. The original process re-executes Python with ``argv[0]`` naming the
   context and a pipe as stdin, from which the new interpreter reads its program: one line
   that imports the stdlib modules the core needs (this overlaps with the compile below) and
   then loads a code object from fd 102. The forked half writes ``MITO000``, reads an
   8-digit length and then exactly that many compressed bytes from the real stdin (so the
   payload can be built while the child starts), inflates and compiles them while the new
   interpreter is still starting up (so compiling costs no time on the critical path; both
   run the same interpreter binary, so the bytecode always matches), writes the code object
   onto fd 102 and the source onto fd 101 (so the context can later boot children of its own
   without fetching the core again), writes ``MITO001`` and exits.
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
from typing import Any, NamedTuple

import mitogen
import mitogen.core
import mitogen.guard  # checks what children send: loaded before they send anything
from mitogen.call import CallChain
from mitogen.core import (
    ADD_ROUTE,
    ALLOCATE_ID,
    DEL_ROUTE,
    SHUTDOWN,
    Context,
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
    "CallChain",
    "CancelledError",
    "Connection",
    "Context",
    "CoreImage",
    "EofError",
    "Options",
    "Process",
    "Router",
    "get_core_image",
    "get_core_source",
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


# ---------------------------------------------------------------------------------------------
# The boot command
# ---------------------------------------------------------------------------------------------

#: Runs on the target with nothing but Python: drops empty sys.path entries (an unreadable
#: working directory after changing user makes Python fail otherwise) and runs the first stage.
STUB = (
    "import sys;sys.path=[p for p in sys.path if p];import binascii,zlib;"
    "exec(zlib.decompress(binascii.a2b_base64(sys.argv[1])))"
)

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
os.write(W,P+b"exec(marshal.load(open(102,'rb')))");os.close(W)
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
import marshal
for f,D in(V,marshal.dumps(compile(C,'mitogen/core.py','exec'))),(w,C):
 with os.fdopen(f,'wb') as o:o.write(D)
os.write(1,b'MITO001\\n')
os._exit(0)
"""


def _encoded_first_stage() -> str:
    return binascii.b2a_base64(zlib.compress(FIRST_STAGE.encode(), 9)).decode().strip()


_core_lock = threading.Lock()
_core_image: CoreImage | None = None

#: First line of a cached boot image; the format's version is part of it.
_IMAGE_MAGIC = b"mitogen-core-image 1"


class CoreImage(NamedTuple):
    """The minified core, and its compressed form ready for any child's payload.

    `compressed` is a zlib header and the deflated source, ended by a full flush: any
    deflate data may follow it, so each child's payload is this prefix plus its own
    compressed configuration line and the stream's checksum (see :func:`build_payload`).
    The prefix never depends on the child, so it can be computed once per installation.
    """

    source: bytes
    compressed: bytes
    checksum: int  # adler32 of `source`, the running value the payload's checksum continues

    @classmethod
    def from_source(cls, source: bytes) -> CoreImage:
        compressor = zlib.compressobj(9)
        compressed = compressor.compress(source) + compressor.flush(zlib.Z_FULL_FLUSH)
        return cls(source, compressed, zlib.adler32(source))


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
    if not sys.dont_write_bytecode:
        any(_write_cached_image(path, key, image) for path in paths)
    return image


def _image_key(original: bytes) -> str:
    """Names what the cached image was made from: the core's text, the minifier's, and the
    Python that parsed them. Two zlib checksums rather than a hashlib digest: importing
    hashlib would cost the first child more than reading the cache saves."""
    with open(os.path.join(os.path.dirname(mitogen.core.__file__), "minify.py"), "rb") as f:
        text = original + b"\0" + f.read()
    return "%08x%08x%d-py%d.%d" % (zlib.crc32(text), zlib.adler32(text), len(text),
                                   *sys.version_info[:2])


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
    """The image cached at `path` if it was made from the same code and is intact."""
    try:
        with open(path, "rb") as f:
            header, _, compressed = f.read().partition(b"\n")
    except OSError:
        return None
    fields = header.split(b" ")
    if len(fields) != 4 or b" ".join(fields[:2]) != _IMAGE_MAGIC or fields[2] != key.encode():
        return None
    try:
        source = zlib.decompressobj().decompress(compressed)
    except zlib.error:
        return None
    checksum = zlib.adler32(source)
    if fields[3] != b"%d" % (checksum,):
        return None
    return CoreImage(source, compressed, checksum)


def _write_cached_image(path: str, key: str, image: CoreImage) -> bool:
    """Best effort and atomic, as Python writes a ``.pyc``; True if it was written."""
    header = b"%s %s %d\n" % (_IMAGE_MAGIC, key.encode(), image.checksum)
    tmp = "%s.%d.%d.tmp" % (path, os.getpid(), threading.get_ident())
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(header + image.compressed)
            os.replace(tmp, path)
        except OSError:
            os.unlink(tmp)
            raise
    except OSError as e:
        LOG.debug("not caching the boot image at %s: %s", path, e)
        return False
    return True


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


def default_remote_name() -> str:
    """user@host:pid of the process starting a child, as Mitogen names children."""
    import getpass

    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return "%s@%s:%d" % (user, socket.gethostname(), os.getpid())


class Options:
    """Options every connection method accepts; methods subclass it to add their own."""

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
        keepalive_interval: float | None = None,
        keepalive_count: int = 3,
    ) -> None:
        self.name = name
        if keepalive_interval is not None and keepalive_interval <= 0:
            raise ValueError("keepalive_interval must be a positive number of seconds")
        self.keepalive_interval = keepalive_interval
        self.keepalive_count = keepalive_count
        if remote_name is not None and "/" in remote_name:
            raise ValueError("remote_name %r must not contain '/'" % (remote_name,))
        self.remote_name = remote_name
        if python_path is None:
            python_path = [sys.executable]
        elif isinstance(python_path, str):
            python_path = [python_path]
        self.python_path = list(python_path)
        self.debug = debug
        self.connect_timeout = 30.0 if connect_timeout is None else connect_timeout
        self.profiling = profiling
        self.unidirectional = unidirectional
        self.max_message_size = max_message_size


class Process:
    """A started child process: its pid, and the descriptors the parent talks to it on."""

    def __init__(self, pid: int, stdin: int, stdout: int, stderr: int | None = None) -> None:
        self.pid = pid
        self.stdin = stdin
        self.stdout = stdout
        self.stderr = stderr
        self.returncode: int | None = None
        self.detached = False

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

    def signal(self, signum: int) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, signum)
            except ProcessLookupError:
                pass

    def kill_and_reap(self) -> None:
        """Last resort: the process must not outlive its parent's broker."""
        if self.poll() is None and not self.detached:
            self.signal(signal.SIGKILL)
            try:
                os.waitpid(self.pid, 0)
            except ChildProcessError:
                pass
            self.returncode = -signal.SIGKILL


class Reaper(Stream):
    """Waits for a child process to exit, on the broker, through a pidfd where available.

    Escalates from SIGTERM to SIGKILL when the process outlives its stream, so that a child
    that ignores its parent going away is still ended.
    """

    keep_alive = True
    TERM_AFTER = 1.0
    KILL_AFTER = 3.0

    def __init__(self, broker: mitogen.core.Broker, proc: Process, name: str) -> None:
        Stream.__init__(self, "reaper:" + name)
        self.broker = broker
        self.proc = proc
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
        self._timers.append(self.broker.timer(self._interval, self._check))
        self._interval = min(0.5, self._interval * 2)

    def _check(self) -> None:
        if self.proc.poll() is not None:
            self._reaped()
        elif self.rfd is None:
            self._poll_later()

    def on_readable(self, broker: mitogen.core.Broker) -> None:
        self._check()

    def stream_gone(self) -> None:
        """The child's stream disconnected: give the process a moment to exit by itself."""
        if self.proc.detached or self.proc.poll() is not None:
            self._reaped()
            return
        self._timers.append(self.broker.timer(self.TERM_AFTER,
                                              lambda: self.proc.signal(signal.SIGTERM)))
        self._timers.append(self.broker.timer(self.KILL_AFTER,
                                              lambda: self.proc.signal(signal.SIGKILL)))

    def _reaped(self) -> None:
        for timer in self._timers:
            timer.cancel()
        LOG.debug("%r: exited with status %r", self, self.proc.returncode)
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
        handle = getattr(router, "_keepalive_handle", None)
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
            self.conn._boot_failed(EofError, "EOF on stream during bootstrap")
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

    options_class = Options
    name_prefix = "local"
    #: Methods that never prompt can have the payload written before MITO000 arrives,
    #: saving a round trip: it waits in the pipe until the first stage reads it.
    eager_payload = True
    #: Whether the method talks to the child over a socketpair (else pipes).
    use_socketpair = True

    def __init__(self, options: Options, router: Router) -> None:
        self.options = options
        self.router = router
        self.broker = router.broker
        self.proc: Process | None = None
        self.stream: MessageStream | None = None
        self.context: Context | None = None
        self.payload = b""
        self.payload_sent_early = False
        self._latch = Latch()
        self._boot: BootStream | None = None
        self._stderr: StderrStream | None = None
        self._reaper: Reaper | None = None
        self._timer: Any = None
        self._done = False
        self.stream_name = ""

    # --- the method-specific part

    def get_preamble(self) -> bytes:
        """The compressed program for this connection's context. It is sent after MITO000,
        preceded by its length as 8 ASCII digits."""
        if not self.payload:
            preamble = build_payload(self.router._child_config(self.context, self.options))
            self.payload = b"%08d" % (len(preamble),) + preamble
        return self.payload[8:]

    def get_python_argv(self) -> list:
        return list(self.options.python_path)

    def get_boot_command(self) -> list:
        name = self.remote_name()
        return [*self.get_python_argv(), "-S", "-c", STUB, _encoded_first_stage(), name]

    def remote_name(self) -> str:
        """What the child's argv[0] says it is; never empty, as a login shell (sudo -i, su)
        would drop an empty argument."""
        name = self.options.remote_name or self.options.name or self.stream_name or \
            default_remote_name()
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

    def start_child(self, args: list) -> Process:
        """Spawn the boot command with its stdio on a socketpair (or pipes) we keep one
        end of, and stderr on a pipe for diagnosis."""
        if self.use_socketpair:
            ours, theirs = socket.socketpair()
            child_in = child_out = theirs.fileno()
        else:
            in_r, in_w = os.pipe()
            out_r, out_w = os.pipe()
            child_in, child_out = in_r, out_w
        err_r, err_w = os.pipe()
        try:
            popen = subprocess.Popen(args, stdin=child_in, stdout=child_out, stderr=err_w,
                                     close_fds=True, start_new_session=True)
        except OSError as e:
            for fd in (err_r, *((ours.fileno(),) if self.use_socketpair else (in_w, out_r))):
                os.close(fd)
            if self.use_socketpair:
                ours.detach()
            raise StreamError("cannot start %s: %s (check python_path and the method's "
                              "*_path option)" % (args[0], e.strerror)) from None
        finally:
            os.close(err_w)
            if self.use_socketpair:
                theirs.close()
            else:
                os.close(in_r)
                os.close(out_w)
        # subprocess would reap the child itself; the Reaper owns that job from now on.
        popen.returncode = 0
        if self.use_socketpair:
            fd = os.dup(ours.fileno())
            ours.close()
            return Process(popen.pid, fd, fd, err_r)  # one descriptor both ways
        return Process(popen.pid, in_w, out_r, err_r)

    # --- the common part

    def connect(self, context: Context) -> None:
        """Start the child for `context` and wait until it is ready for messages."""
        if not self.broker.running:
            raise Error("the broker has shut down: cannot start a child")
        self.context = context
        args = self.get_boot_command()
        self.proc = self.start_child(args)
        self.stream_name = self.make_stream_name(self.proc.pid)
        # Built while the child's interpreter starts: the length is no longer on its
        # command line, so the first child of a process does not wait for the minifier.
        self.get_preamble()
        if self.eager_payload:
            self._write_early()
        try:
            self.broker.defer(self._start_boot)
        except Error:
            for fd in {self.proc.stdin, self.proc.stdout, self.proc.stderr} - {None}:
                os.close(fd)
            self.proc.kill_and_reap()
            raise
        try:
            ok, value = self._latch.get(timeout=self.options.connect_timeout)
        except TimeoutError:
            self.broker.defer(self._boot_failed, TimeoutError,
                              "no answer within connect_timeout=%.1fs"
                              % (self.options.connect_timeout,))
            ok, value = self._latch.get()
        self._latch = None  # done with: a connected child's state is kept small
        if not ok:
            raise value

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
        self._reaper = Reaper(self.broker, proc, self.stream_name)
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
            self._boot_failed(CancelledError, "the broker shut down while connecting")

    def _boot_failed(self, exc_class: type, reason: str) -> None:
        if self._done:
            return
        self._done = True
        self._stop_listening()
        lines = list(self._boot.output if self._boot else [])
        if self._stderr is not None:
            self._stderr.on_readable(self.broker)
            lines += self._stderr.lines
        exc_class, reason = self.diagnose(exc_class, reason, lines)
        text = "%s: %s" % (self.stream_name, reason)
        if lines:
            text += "; last %d lines of output:\n  %s" % (len(lines[-ERROR_LINES:]),
                                                         "\n  ".join(lines[-ERROR_LINES:]))
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
        self.payload = b""  # 15 KiB a child, of no more use
        self._boot.release(self.broker)
        self._boot = None
        self._stderr = None  # the broker reads it until the child lets go of it
        self._stop_listening()
        stream = ChildStream(self.router, self.proc.stdout, self.proc.stdin,
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


class Router(mitogen.core.Router):
    """A router that can start children and forward routes for them."""

    context_class = Context
    debug = False
    profiling = False

    def __init__(self, broker: mitogen.core.Broker) -> None:
        super().__init__(broker)
        self._become_parent()

    def _become_parent(self) -> None:
        """State and handlers of a context that has children (also run by upgrade_router on
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
        if msg.is_dead or conn is None or stream.remote_id != msg.src_id:
            return
        LOG.debug("%r: %r is detaching", self, stream)
        conn.proc.detached = True

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
        responder = getattr(self, "responder", None)
        return {
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

    def allocate_id(self) -> int:
        return self.id_allocator.allocate()

    def _connection_class(self, method_name: str) -> type:
        if method_name == "local":
            return Connection
        import importlib

        try:
            module = importlib.import_module("mitogen." + method_name)
        except ImportError as e:
            raise Error("unknown connection method %r: %s", method_name, e) from None
        return module.Connection

    def connect(self, method_name: str, name: str | None = None, **kwargs: Any) -> Context:
        """Start a child with `method_name` (``local``, ``ssh``, ...) and return its Context.

        With ``via=context`` the child is started by that context instead of this one.
        """
        via = kwargs.pop("via", None)
        if via is not None:
            return self.proxy_connect(via, method_name, name=name, **kwargs)
        kwargs.setdefault("max_message_size", self.max_message_size)
        conn_class = self._connection_class(method_name)
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
                      **kwargs: Any) -> Context:
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

    def local(self, **kwargs: Any) -> Context:
        return self.connect("local", **kwargs)

    def fork(self, **kwargs: Any) -> Context:
        return self.connect("fork", **kwargs)

    def ssh(self, **kwargs: Any) -> Context:
        return self.connect("ssh", **kwargs)

    def sudo(self, **kwargs: Any) -> Context:
        return self.connect("sudo", **kwargs)

    def su(self, **kwargs: Any) -> Context:
        return self.connect("su", **kwargs)

    def doas(self, **kwargs: Any) -> Context:
        return self.connect("doas", **kwargs)

    def docker(self, **kwargs: Any) -> Context:
        return self.connect("docker", **kwargs)

    def podman(self, **kwargs: Any) -> Context:
        return self.connect("podman", **kwargs)

    def buildah(self, **kwargs: Any) -> Context:
        return self.connect("buildah", **kwargs)

    def kubectl(self, **kwargs: Any) -> Context:
        return self.connect("kubectl", **kwargs)

    def lxc(self, **kwargs: Any) -> Context:
        return self.connect("lxc", **kwargs)

    def lxd(self, **kwargs: Any) -> Context:
        return self.connect("lxd", **kwargs)

    def setns(self, **kwargs: Any) -> Context:
        return self.connect("setns", **kwargs)


class ModuleForwarder:
    """Serves GET_MODULE from children of an intermediate context: from this context's
    importer cache, or by asking its own parent once and caching the answer, so the master
    never sends a module twice down the same stream."""

    def __init__(self, router: Router, importer: mitogen.core.Importer) -> None:
        self.router = router
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
        router._become_parent()
        router.forwarder = ModuleForwarder(router, econtext.importer)
    return router


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
