"""Run a local tool that speaks ssh (rsync, scp, git) against a context of the tree.

:func:`run` starts the tool with a directory at the front of its ``PATH`` holding a fake
``ssh``: a small stdlib-only Python script. When the tool runs ``ssh [options] host command``,
the fake ssh connects back to :func:`run` over a UNIX socket in that (mode 0700) directory and
hands over its arguments; :func:`run` starts ``command`` with ``/bin/sh -c`` in the home
directory of the destination context, as sshd would, and relays the bytes: the tool's writes
to the fake ssh's stdin become the command's stdin, the command's stdout and stderr come back
on the fake ssh's, and its exit status becomes the fake ssh's. The host name is ignored: every
connection goes to `dest`. Any number of ssh connections may run, one after another or at once.

Both directions flow through the tree as messages under a flow-control window, so neither
end's memory grows with the amount of data. The directory is removed when :func:`run`
returns; nothing is written in the destination.
"""

from __future__ import annotations

import getopt
import json
import logging
import os
import select
import shlex
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
from typing import Any

import mitogen.core
from mitogen.core import ChannelError, Message, Receiver, Sender

__all__ = ["SSH_GETOPTS", "run"]

LOG = logging.getLogger(__name__)

#: The options of OpenSSH's client (those followed by ':' take a value).
SSH_GETOPTS = "1246ab:c:e:fgi:kl:m:no:p:qstvxACD:E:F:I:KL:MNO:PQ:R:S:TVw:W:XYy"

#: Bytes per message, and bytes sent but not yet acknowledged, in each direction.
CHUNK = 131072
WINDOW = 1048576

# Frames between the fake ssh and run(): kind (1 byte), length (4 bytes), data.
_FRAME = struct.Struct(">cI")
STDIN, STDIN_EOF, STDOUT, STDERR, EXIT = b"i", b"I", b"o", b"e", b"x"

#: The fake ssh. Connects to the socket named in its first line, sends its arguments, then
#: relays: stdin to the socket, frames from the socket to stdout/stderr; exits with the
#: status the last frame carries.
FAKE_SSH = r'''
import json, os, select, socket, struct, sys
FRAME = struct.Struct(">cI")
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    sock.connect(SOCKET_PATH)
except OSError as e:
    sys.stderr.write("fake ssh: cannot reach mitogen.fakessh.run(): %s\n" % (e,))
    sys.exit(255)
args = json.dumps(sys.argv[1:]).encode()
sock.sendall(FRAME.pack(b"a", len(args)) + args)
buf = b""
stdin_open = True
def write_all(fd, data):
    while data:
        data = data[os.write(fd, data):]
while True:
    readable, _, _ = select.select([sock] + ([0] if stdin_open else []), [], [])
    if 0 in readable:
        data = os.read(0, 65536)
        if data:
            sock.sendall(FRAME.pack(b"i", len(data)) + data)
        else:
            stdin_open = False
            sock.sendall(FRAME.pack(b"I", 0))
    if sock in readable:
        data = sock.recv(262144)
        if not data:
            sys.stderr.write("fake ssh: mitogen.fakessh.run() went away\n")
            sys.exit(255)
        buf += data
        while len(buf) >= FRAME.size:
            kind, size = FRAME.unpack_from(buf)
            if len(buf) < FRAME.size + size:
                break
            body, buf = buf[FRAME.size:FRAME.size + size], buf[FRAME.size + size:]
            if kind == b"o":
                write_all(1, body)
            elif kind == b"e":
                write_all(2, body)
            elif kind == b"x":
                sys.exit(int(body))
'''


def parse_ssh_args(argv: list) -> tuple[str | None, list, list]:
    """(host, options, command words) of an ssh command line, as OpenSSH reads it:
    options may come before and after the host; the command starts at the next word."""
    opts: list = []
    rest = list(argv)
    host = None
    while rest:
        found, rest = getopt.getopt(rest, SSH_GETOPTS)
        opts += found
        if host is None and rest:
            host, rest = rest[0], rest[1:]
            continue
        break
    return host, opts, rest


# ---------------------------------------------------------------------------------------------
# Bytes through the tree, under a window
# ---------------------------------------------------------------------------------------------


class _WindowedSender:
    """Sends byte chunks to a remote handle; each is acknowledged with its size, and at most
    WINDOW bytes may be unacknowledged, so a slow reader slows the writer down instead of
    filling memory."""

    def __init__(self, router: Any, sender: Sender) -> None:
        self.sender = sender
        self.acks = Receiver(router, respondent=sender.context)
        self._unacked = 0

    def send(self, kind: bytes, data: bytes = b"") -> None:
        while self._unacked >= WINDOW:
            self._unacked -= self.acks.get().unpickle()
        body = kind + data
        self.sender.context.send(Message(data=body, enc=mitogen.core.ENC_BIN,
                                         handle=self.sender.dst_handle,
                                         reply_to=self.acks.handle))
        self._unacked += len(body)

    def close(self, drain: bool = True) -> None:
        """Stop sending; with `drain`, first take the acknowledgements still due, so that
        none arrives at a closed handle (the peer acknowledges everything until its end)."""
        try:
            while drain and self._unacked > 0:
                self._unacked -= self.acks.get().unpickle()
        except ChannelError:
            pass  # the peer is gone: nothing more will come
        finally:
            self.acks.close()


def _acknowledge(msg: Message) -> None:
    if msg.reply_to:
        msg.reply(len(msg.data))


# ---------------------------------------------------------------------------------------------
# The destination's side
# ---------------------------------------------------------------------------------------------


class _Command:
    """The ssh command line running in the destination context: its stdout and stderr go
    to the caller as they come, the caller's messages go to its stdin, and its exit status
    goes last."""

    def __init__(self, router: Any, command: str, output: Sender) -> None:
        self.proc = subprocess.Popen(command, shell=True, cwd=os.path.expanduser("~"),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, close_fds=True)
        self.output = _WindowedSender(router, output)
        self.input = Receiver(router, respondent=output.context)
        self._lock = threading.Lock()
        threads = [threading.Thread(target=self._feed_stdin, daemon=True)]
        for kind, pipe in ((STDOUT, self.proc.stdout), (STDERR, self.proc.stderr)):
            threads.append(threading.Thread(target=self._relay, args=(kind, pipe),
                                            daemon=True))
        self._readers = threads[1:]
        for thread in threads:
            thread.start()
        threading.Thread(target=self._wait, daemon=True).start()

    def _feed_stdin(self) -> None:
        """Until the caller's dead message ends the input (or the caller is gone): write each
        chunk to the command and acknowledge it; once the command stops reading, the rest is
        acknowledged and dropped."""
        stdin = self.proc.stdin
        try:
            for msg in self.input:
                if stdin is not None:
                    try:
                        stdin.write(msg.data)
                        stdin.flush()
                    except OSError as e:
                        LOG.debug("%r: the command's stdin closed: %s", self, e)
                        stdin = None
                _acknowledge(msg)
        finally:
            self.input.close()
            try:
                if self.proc.stdin is not None:
                    self.proc.stdin.close()
            except OSError:
                pass

    def _relay(self, kind: bytes, pipe: Any) -> None:
        try:
            while True:
                data = os.read(pipe.fileno(), CHUNK)
                if not data:
                    return
                with self._lock:
                    self.output.send(kind, data)
        except (OSError, ChannelError) as e:
            LOG.debug("%r: relaying %r ended: %s", self, kind, e)
        finally:
            pipe.close()

    def _wait(self) -> None:
        status = self.proc.wait()
        for thread in self._readers:
            thread.join()
        if status < 0:
            status = 128 - status  # killed by a signal: as a shell reports it
        drain = True
        try:
            with self._lock:
                self.output.send(EXIT, str(status).encode())
        except ChannelError:
            drain = False
        finally:
            self.output.close(drain)


@mitogen.core.takes_router
def _start_command(command: str, output: Sender, router: Any) -> Sender:
    """Runs in the destination: start `command` and return where its stdin goes."""
    return _Command(router, command, output).input.to_sender()


# ---------------------------------------------------------------------------------------------
# The local side: one session per connection of the fake ssh
# ---------------------------------------------------------------------------------------------


def _read_frame(sock: socket.socket) -> tuple[bytes, bytes]:
    header = _recv_exact(sock, _FRAME.size)
    kind, size = _FRAME.unpack(header)
    return kind, _recv_exact(sock, size)


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise EOFError("the fake ssh closed its connection")
        data += chunk
    return data


class _Session:
    """One connection of the fake ssh: starts the command in `dest` and relays both ways."""

    def __init__(self, router: Any, dest: Any, sock: socket.socket) -> None:
        self.router = router
        self.dest = dest
        self.sock = sock
        self.ending = False
        self.threads = [threading.Thread(target=self._run, daemon=True,
                                         name="mitogen.fakessh.session")]

    def start(self) -> None:
        self.threads[0].start()

    def end(self) -> None:
        """Cut the connection (the tool has exited) and wait for the relaying to stop."""
        self.ending = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        for thread in list(self.threads):
            if thread.ident is not None:
                thread.join()
        self.sock.close()

    def _run(self) -> None:
        output = Receiver(self.router, respondent=self.dest)
        output.via_stream = self.router.stream_by_id(self.dest.context_id)
        status = 255
        try:
            kind, body = _read_frame(self.sock)
            host, opts, words = parse_ssh_args(json.loads(body.decode()))
            if kind != b"a" or host is None or not words:
                self._send(STDERR, b"fake ssh: only 'ssh [options] host command' is "
                                   b"supported\n")
                return
            command = " ".join(words)
            LOG.debug("fakessh: running %r in %r (ssh options %r ignored)", command,
                      self.dest, opts)
            stdin = self.dest.call(_start_command, command, output.to_sender())
            pump = threading.Thread(target=self._pump_stdin, args=(stdin,), daemon=True,
                                    name="mitogen.fakessh.stdin")
            self.threads.append(pump)
            pump.start()
            status = self._relay_output(output)
        except (EOFError, OSError, ValueError, mitogen.core.Error) as e:
            self._send(STDERR, ("fake ssh: %s\n" % (e,)).encode())
        finally:
            output.close()
            self._send(EXIT, str(status).encode())

    def _send(self, kind: bytes, data: bytes) -> None:
        try:
            self.sock.sendall(_FRAME.pack(kind, len(data)) + data)
        except OSError:
            pass

    def _relay_output(self, output: Receiver) -> int:
        """The command's output to the fake ssh, until its exit status arrives (every
        message acknowledged, the last one too: the sender waits for that before it ends)."""
        for msg in output:
            kind, data = bytes(msg.data[:1]), bytes(msg.data[1:])
            _acknowledge(msg)
            if kind == EXIT:
                return int(data)
            self._send(kind, data)
        raise ChannelError("the destination context went away")

    def _pump_stdin(self, stdin: Sender) -> None:
        """The fake ssh's stdin to the command, until its end or the connection's; then a
        dead message ends the command's input (after the acknowledgements still due)."""
        sender = _WindowedSender(self.router, stdin)
        drain = False
        try:
            while True:
                kind, data = _read_frame(self.sock)
                if kind == STDIN:
                    sender.send(b"", data)
                elif kind == STDIN_EOF:
                    drain = True
                    break
        except (EOFError, OSError):
            drain = not self.ending
        except ChannelError:
            pass
        finally:
            sender.close(drain)
            try:
                stdin.close()
            except mitogen.core.Error:
                pass


# ---------------------------------------------------------------------------------------------
# The public API
# ---------------------------------------------------------------------------------------------


@mitogen.core.takes_econtext
@mitogen.core.takes_router
def run(dest: Any, router: Any, args: list, deadline: float | None = None,
        econtext: Any = None) -> int:
    """Run the command `args` (``['rsync', '-a', 'src/', 'host:dst/']``) with a fake ``ssh``
    first on its ``PATH`` that runs every ssh command line in the context `dest` instead.

    Returns the tool's exit status. `deadline` (a :func:`mitogen.core.now` time) bounds the
    run: past it the tool is killed and :class:`mitogen.core.TimeoutError` raised.
    """
    del econtext  # accepted, as in Mitogen, so run() can also be called in a child
    if not args:
        raise ValueError("args must name the tool to run, e.g. ['rsync', ...]")
    tmp = tempfile.mkdtemp(prefix="mitogen_fakessh_")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sessions: list[_Session] = []
    try:
        path = os.path.join(tmp, "sock")
        listener.bind(path)
        listener.listen(16)
        ssh = os.path.join(tmp, "ssh")
        with open(ssh, "w") as f:
            f.write("#!%s\nSOCKET_PATH = %r\n%s" % (sys.executable, path, FAKE_SSH))
        os.chmod(ssh, 0o700)
        env = dict(os.environ, PATH=tmp + os.pathsep + os.environ.get("PATH", ""))
        proc = subprocess.Popen(list(args), env=env)
        try:
            return _serve(router, dest, listener, proc, sessions, deadline, args)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    finally:
        listener.close()
        for session in sessions:
            session.end()
        shutil.rmtree(tmp, ignore_errors=True)


def _serve(router: Any, dest: Any, listener: socket.socket, proc: subprocess.Popen,
           sessions: list, deadline: float | None, args: list) -> int:
    """Accept the fake ssh's connections until the tool exits (or the deadline passes)."""
    # A pidfd becomes readable when the tool exits; without one (Linux < 5.3), look often.
    exited = os.pidfd_open(proc.pid) if hasattr(os, "pidfd_open") else None
    try:
        while True:
            timeout = None if deadline is None else max(0.0, deadline - mitogen.core.now())
            if exited is None:
                timeout = 0.05 if timeout is None else min(timeout, 0.05)
            watched: list[Any] = [listener] if exited is None else [listener, exited]
            ready, _, _ = select.select(watched, [], [], timeout)
            if (exited in ready) if exited is not None else proc.poll() is not None:
                return proc.wait()
            if listener in ready:
                conn, _ = listener.accept()
                session = _Session(router, dest, conn)
                sessions.append(session)
                session.start()
            elif deadline is not None and mitogen.core.now() >= deadline:
                proc.kill()
                raise mitogen.core.TimeoutError("%s did not finish before the deadline",
                                                shlex.join(map(str, args)))
    finally:
        if exited is not None:
            os.close(exited)
