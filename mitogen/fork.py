"""``router.fork()``: children made by os.fork(), without the risks of forking a threaded
process.

A master always has threads (its broker at least), and fork() copies only the calling
thread: a lock some other thread held at that moment stays locked forever in the child, which
is why Python 3.12+ warns about it. So the master never forks itself. Each router instead
starts one *zygote* the first time it is asked to fork: a fresh interpreter that loads the
bootstrap program (the minified :mod:`mitogen.core`) once and then does nothing but wait on a
control socket, single-threaded. A fork request carries the new context's configuration and
one end of a socketpair (passed with SCM_RIGHTS); the zygote forks, and the child becomes the
context on that socketpair at once: no interpreter start-up, no payload on the wire.

What the child does NOT get is the master's memory: `on_fork` and `on_start` therefore name
module-level functions, imported in the child and run there before ``fork()`` returns, instead
of closures. It does get everything else a fork would: the zygote runs the master's
interpreter with the master's flags, and each child takes the master's current ``sys.path``,
environment and working directory, so it imports locally whatever the master could import
(C extensions in site-packages included); only what is nowhere on that path (``__main__``,
say) comes from the master through the importer. The zygote ignores SIGCHLD so its children
never linger as zombies, and exits when the router's broker does.
"""

from __future__ import annotations

import fcntl
import logging
import os
import random
import socket
import subprocess
import sys
import threading
import traceback
from typing import Any, Callable

import mitogen.core
import mitogen.parent
from mitogen.parent import BOOT_DONE, BOOT_START, Process

__all__ = ["FORK_SUPPORTED", "HAVE_OS_REGISTER_AT_FORK", "Connection", "Error", "Options",
           "Process", "Zygote", "fixup_prngs", "handle_child_crash", "on_fork",
           "reset_logging_framework"]

LOG = logging.getLogger("mitogen")

#: Every supported Python can fork.
FORK_SUPPORTED = True
#: Whether os.register_at_fork() exists (it does from 3.7: the stdlib repairs its own
#: state after a fork, which on_fork() then need not do).
HAVE_OS_REGISTER_AT_FORK = hasattr(os, "register_at_fork")


class Error(mitogen.core.StreamError):
    """The zygote could not be started or could not fork."""


#: The zygote's program. argv: control socket fd. stdin: the core source, to EOF.
ZYGOTE = """\
import ast,os,signal,socket,sys,fcntl
src=sys.stdin.buffer.read()
g=sys.modules['__main__'].__dict__
exec(compile(src,'<mitogen.core>','exec'),g)
ctl=socket.socket(fileno=int(sys.argv[1]))
signal.signal(signal.SIGCHLD,signal.SIG_IGN)
def child(config,fd):
 ctl.close();signal.signal(signal.SIGCHLD,signal.SIG_DFL)
 sys.path[:]=config.pop('sys_path');os.chdir(config.pop('cwd'))
 os.environ.clear();os.environ.update(config.pop('environ'))
 r,w=os.pipe()
 try:fcntl.fcntl(w,1031,len(src)+4096)
 except OSError:config['core_fd']=None
 else:os.write(w,src)
 os.close(w);os.dup2(r,101);os.close(r)
 os.dup2(fd,100);os.dup2(fd,1);os.close(fd)
 os.write(1,%r)
 g['ExternalContext'](config).main()
while 1:
 data,fds,_,_=socket.recv_fds(ctl,1<<20,1)
 if not data:os._exit(0)
 pid=os.fork()
 if not pid:
  try:child(ast.literal_eval(data.decode()),fds[0])
  except BaseException:
   import traceback;traceback.print_exc();os._exit(1)
  import atexit;atexit._run_exitfuncs();os._exit(0)
 os.close(fds[0])
 ctl.sendall(b'%%d\\n'%%pid)
""" % (BOOT_START + BOOT_DONE,)


class Zygote:
    """The single-threaded process that forks a router's children (see module docs)."""

    def __init__(self, broker: mitogen.core.Broker) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        python = mitogen.parent.get_sys_executable()
        try:
            self.proc = subprocess.Popen(
                [python, *_interpreter_flags(), "-c", ZYGOTE, str(theirs.fileno())],
                stdin=subprocess.PIPE, pass_fds=(theirs.fileno(),), close_fds=True)
        except OSError as e:
            ours.close()
            raise Error("cannot start the fork zygote %s: %s" % (python, e.strerror))
        finally:
            theirs.close()
        self.control = ours
        self._lock = threading.Lock()
        stdin = self.proc.stdin  # a pipe (stdin=PIPE above)
        if stdin is not None:
            stdin.write(mitogen.parent.get_core_source())
            stdin.close()
        mitogen.core.listen(broker, "exit", self.close)

    def fork(self, config: dict, fd: int) -> int:
        """Fork a child that becomes the context described by `config` on `fd`."""
        with self._lock:
            try:
                socket.send_fds(self.control, [repr(config).encode()], [fd])
                reply = self.control.recv(64)
            except OSError as e:
                raise Error("the fork zygote failed: %s" % (e,)) from None
        if not reply:
            status = self.proc.poll()
            raise Error("the fork zygote %s" % (
                "is not answering" if status is None
                else mitogen.parent.returncode_to_str(status),))
        return int(reply)

    def close(self) -> None:
        """Closing the control socket ends the zygote; its children live on."""
        self.control.close()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _interpreter_flags() -> list:
    """The command-line flags that make a new interpreter find modules as this one does
    (-S, -s, -E or -I, as this one was started with)."""
    flags = sys.flags
    chosen = []
    if flags.isolated:
        chosen.append("-I")
    else:
        if flags.ignore_environment:
            chosen.append("-E")
        if flags.no_user_site:
            chosen.append("-s")
    if flags.no_site:
        chosen.append("-S")
    return chosen


_zygote_lock = threading.Lock()


def zygote_for(router: Any) -> Zygote:
    with _zygote_lock:
        zygote = getattr(router, "_fork_zygote", None)
        if zygote is None:
            zygote = router._fork_zygote = Zygote(router.broker)
        return zygote


class ForkedProcess(Process):
    """A child of the zygote, not of this process: it cannot be waited for, only watched
    (its exit status is not known here)."""

    def __init__(self, pid: int, stdin: int, stdout: int, stderr: int | None = None) -> None:
        super().__init__(pid, stdin, stdout, stderr)
        self.status_known = False

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                self.returncode = 0
            except PermissionError:
                pass
        return self.returncode


def _function_name(func: Callable | None, option: str) -> tuple | None:
    """(module, qualname) of a module-level function: the child imports it by name."""
    if func is None:
        return None
    qualname = getattr(func, "__qualname__", "")
    if not callable(func) or "<" in qualname or not getattr(func, "__module__", None):
        raise TypeError("%s must be a module-level function (the forked child imports it "
                        "by name), not %r" % (option, func))
    return func.__module__, qualname


#: Mitogen's name for the process class of a forked child.
Process = ForkedProcess  # type: ignore[misc]  # replaces the name imported from parent


class Options(mitogen.parent.Options):
    #: (module, qualified name) of the function run in the child first, if any.
    on_fork: tuple | None = None
    #: Likewise for the function given the child's ExternalContext, run next.
    on_start: tuple | None = None
    #: Mitogen's fork child reuses its parent's importer; ours is a child like any other.
    importer = None

    def __init__(self, old_router: Any = None, max_message_size: int | None = None,
                 on_fork: Callable | None = None, debug: bool = False,
                 profiling: bool = False, unidirectional: bool = False,
                 on_start: Callable | None = None, name: str | None = None,
                 **kwargs: Any) -> None:
        if max_message_size is None:
            max_message_size = getattr(old_router, "max_message_size", None) or \
                mitogen.core.Router.max_message_size
        super().__init__(max_message_size=max_message_size, name=name, debug=debug,
                         profiling=profiling, unidirectional=unidirectional, **kwargs)
        self.on_fork = _function_name(on_fork, "on_fork")
        self.on_start = _function_name(on_start, "on_start")


@mitogen.core.takes_econtext
def _run_hooks(on_fork: tuple | None, on_start: tuple | None, econtext: Any = None) -> None:
    """Runs in the new child: on_fork(), then on_start(econtext)."""
    import importlib

    for ref, args in ((on_fork, ()), (on_start, (econtext,))):
        if ref is not None:
            obj: Any = importlib.import_module(ref[0])
            for part in ref[1].split("."):
                obj = getattr(obj, part)
            obj(*args)


class Connection(mitogen.parent.Connection):
    options_class = Options
    options: Options  # this method's own
    name_prefix = "fork"
    eager_payload = False

    def get_preamble(self) -> bytes:
        return b""  # the zygote already holds the program

    def get_boot_command(self) -> list:
        return []

    def get_econtext_config(self) -> dict:
        """The child's configuration, plus what a fork of this process would share with
        it: the module search path, the environment and the working directory."""
        config = super().get_econtext_config()
        config.update(sys_path=list(sys.path), environ=dict(os.environ), cwd=os.getcwd())
        return config

    def start_child(self, args: list | None = None) -> Process:
        config = self.get_econtext_config()
        ours, theirs = mitogen.parent.create_socketpair()
        try:
            pid = zygote_for(self.router).fork(config, theirs.fileno())
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        fd = ours.detach()
        fcntl.fcntl(fd, fcntl.F_SETFD, fcntl.FD_CLOEXEC)
        return ForkedProcess(pid, fd, os.dup(fd), None)

    def connect(self, context: Any) -> None:
        super().connect(context)
        if self.options.on_fork or self.options.on_start:
            context.call(_run_hooks, self.options.on_fork, self.options.on_start)


# ---------------------------------------------------------------------------------------------
# For programs that fork by themselves
# ---------------------------------------------------------------------------------------------


def fixup_prngs() -> None:
    """Give this process its own random state after a fork: `random` and OpenSSL's PRNG
    would otherwise repeat the parent's numbers."""
    seed = os.urandom(32)
    random.seed(seed)
    ssl = sys.modules.get("ssl")
    if ssl is not None:
        ssl.RAND_add(seed, 32.0)


def reset_logging_framework() -> None:
    """Replace the locks of the logging package and of every handler after a fork: a
    thread of the parent may have held one at that moment, and it would stay held here."""
    logging._lock = threading.RLock()  # type: ignore[attr-defined]
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    for logger in loggers:
        for handler in getattr(logger, "handlers", ()):
            handler.createLock()


def on_fork() -> None:
    """Call in the child each time a program that uses mitogen forks by itself.

    Repairs what the stdlib does not (it does, from Python 3.7, for its own locks): the
    random state, and this thread's latch wake-up socketpair, which would otherwise be shared
    with the parent so that either could wake the other's latches.
    """
    if not HAVE_OS_REGISTER_AT_FORK:
        reset_logging_framework()
    fixup_prngs()
    waker = vars(mitogen.core._thread_state).pop("waker", None)
    if waker is not None:
        waker.close()


def handle_child_crash() -> None:
    """In a child made by os.fork(): report the exception being handled on stderr and
    exit at once with status 1 (never run the parent's atexit handlers or cleanup)."""
    try:
        sys.stderr.write("\n\nforked child %d crashed:\n%s\n" % (os.getpid(),
                                                               traceback.format_exc()))
        sys.stderr.flush()
    finally:
        os._exit(1)


def __getattr__(name: str) -> Any:
    """Names kept only for compatibility with Mitogen: see mitogen/parity.py."""
    if name.startswith("__"):
        raise AttributeError(name)
    import mitogen.parity

    return mitogen.parity.lookup(__name__, name)
