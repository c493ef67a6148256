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
of closures. The zygote ignores SIGCHLD so its children never linger as zombies, and exits
when the router's broker does.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import subprocess
import sys
import threading
from typing import Any, Callable

import mitogen.core
import mitogen.parent
from mitogen.parent import BOOT_DONE, BOOT_START, Process

__all__ = ["Connection", "Error", "Options", "Zygote"]

LOG = logging.getLogger("mitogen")


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
  finally:os._exit(0)
 os.close(fds[0])
 ctl.sendall(b'%%d\\n'%%pid)
""" % (BOOT_START + BOOT_DONE,)


class Zygote:
    """The single-threaded process that forks a router's children (see module docs)."""

    def __init__(self, broker: mitogen.core.Broker) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-S", "-c", ZYGOTE, str(theirs.fileno())],
                stdin=subprocess.PIPE, pass_fds=(theirs.fileno(),), close_fds=True)
        except OSError as e:
            ours.close()
            raise Error("cannot start the fork zygote %s: %s" % (sys.executable, e.strerror))
        finally:
            theirs.close()
        self.control = ours
        self._lock = threading.Lock()
        self.proc.stdin.write(mitogen.parent.get_core_source())
        self.proc.stdin.close()
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
            raise Error("the fork zygote exited (status %r)" % (self.proc.poll(),))
        return int(reply)

    def close(self) -> None:
        """Closing the control socket ends the zygote; its children live on."""
        self.control.close()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


_zygote_lock = threading.Lock()


def zygote_for(router: Any) -> Zygote:
    with _zygote_lock:
        zygote = getattr(router, "_fork_zygote", None)
        if zygote is None:
            zygote = router._fork_zygote = Zygote(router.broker)
        return zygote


class ForkedProcess(Process):
    """A child of the zygote, not of this process: it cannot be waited for, only watched."""

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


class Options(mitogen.parent.Options):
    def __init__(self, on_fork: Callable | None = None, on_start: Callable | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
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
    name_prefix = "fork"
    eager_payload = False

    def get_preamble(self) -> bytes:
        return b""  # the zygote already holds the program

    def get_boot_command(self) -> list:
        return []

    def start_child(self, args: list) -> Process:
        config = self.router._child_config(self.context, self.options)
        ours, theirs = socket.socketpair()
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
