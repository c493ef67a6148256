"""What the connection methods that log in share: PTYs, password prompts, and their errors.

ssh, sudo, su and doas read passwords (and ssh its host key question) from a terminal, never
from stdin, so a child that may prompt gets a pseudo-terminal as its controlling terminal:

* "hybrid" (sudo, doas, ssh with a password): stdin/stdout stay a socketpair that carries
  the bootstrap and then the messages, and only stderr and /dev/tty are the PTY. Prompts and
  diagnostics arrive on the PTY, read by a :class:`PromptStream`.
* "full" (su, which talks to its terminal only): all stdio is the PTY, put in raw mode so
  that the binary payload and messages pass through it untouched.

The child is started with ``posix_spawn``: ``setsid`` then opening the terminal by name makes
it the controlling terminal, without running any Python between fork and exec (which is not
safe in a threaded master). Only when ``mitogen.core._preexec_hook`` is set, which must run
between fork and exec, is it started by fork and exec instead.

Prompts are recognised in many languages and formats, and a second prompt after a password
was sent means the password was refused, whatever the language of the message in between.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import termios
import threading
import tty
from typing import Any

import mitogen.core
import mitogen.parent
from mitogen.core import Secret, StreamError
from mitogen.parent import Process, StderrStream

__all__ = [
    "PASSWORD_PROMPT_PATTERN",
    "HostKeyError",
    "PasswordError",
    "PromptStream",
    "PtyConnection",
    "is_password_prompt",
    "is_refusal",
    "open_pty",
    "to_secret",
]

LOG = logging.getLogger("mitogen")

PTY_MAX_PATH = "/proc/sys/kernel/pty/max"
PTY_NR_PATH = "/proc/sys/kernel/pty/nr"


class PasswordError(StreamError):
    """A login needed a password that was not given, or refused the one that was."""


class HostKeyError(StreamError):
    """ssh refused the target's host key: unknown, or changed since it was recorded."""


# ---------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------

#: "Password" in the languages sudo, su (PAM), doas and ssh are translated into, plus the
#: smartcard and key variants; a prompt is one of these followed by a colon at the end.
_PASSWORD_WORDS = (
    "password", "passwort", "passwd", "passphrase", "pin for", "mot de passe", "contraseña",
    "contrasenya", "senha", "wachtwoord", "parola", "пароль", "hasło", "heslo", "lösenord",
    "adgangskode", "passord", "salasana", "jelszó", "şifre", "parool", "geslo", "lozinka",
    "lozinku", "slaptažodis", "parole", "κωδικός", "סיסמה", "كلمة المرور", "mật khẩu",
    "密码", "密碼", "口令", "パスワード", "암호", "비밀번호", "รหัสผ่าน",
)
PASSWORD_PROMPT_PATTERN = re.compile(
    r"(?:%s)[^\n]*[:\uff1a]\s*$" % "|".join(re.escape(w) for w in _PASSWORD_WORDS),
    re.IGNORECASE,
)

#: Messages that follow a refused password (English, translated, sudo-rs, doas, su, ssh).
_REFUSAL_RE = re.compile(
    r"sorry, try again|incorrect password|authentication fail|permission denied|"
    r"try again|désolé|essayez de nouveau|falsches passwort|versuchen sie es noch|"
    r"lo siento|inténtelo de nuevo|incorrect|échec de l'authentification|"
    r"authentifizierungsfehler|fallo de autenticación|認証|认证失败|密码错误",
    re.IGNORECASE,
)

_FEEDBACK_RE = re.compile(r"^[*\s]+")


def is_password_prompt(text: str) -> bool:
    """True when `text` (a line, or output waiting for input) asks for a password.

    Leading ``pwfeedback`` asterisks from an earlier answer are ignored.
    """
    text = _FEEDBACK_RE.sub("", text.replace("\r", ""))
    return bool(PASSWORD_PROMPT_PATTERN.search(text))


def is_refusal(text: str) -> bool:
    """True when `text` says an authentication attempt failed."""
    return bool(_REFUSAL_RE.search(text))


def to_secret(value: Any, option: str = "password") -> Secret | None:
    """Options keep passwords as Secret, whose repr hides them in logs and tracebacks."""
    if value is None or isinstance(value, Secret):
        return value
    if not isinstance(value, str):
        raise TypeError("%s must be a str, not %s" % (option, type(value).__name__))
    return Secret(value)


class BecomeOptions(mitogen.parent.Options):
    """Options shared by the methods that become another user on a terminal (su, doas):
    whom to become, the password, and how to recognise its prompts."""

    username = "root"
    password: str | None = None
    #: A substring of the prompt to answer (case-insensitive); None: any password prompt
    #: (in the languages mitogen.spawn knows).
    password_prompt: str | None = None
    #: Extra substrings that mean the password was refused.
    incorrect_prompts: tuple = ()

    def __init__(
        self,
        username: str | None = None,
        password: str | None = None,
        password_prompt: str | None = None,
        incorrect_prompts: tuple | list | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.username = username or "root"
        self.password = to_secret(password)
        self.password_prompt = password_prompt
        self.incorrect_prompts = tuple(incorrect_prompts or ())


# ---------------------------------------------------------------------------------------------
# PTYs and spawning
# ---------------------------------------------------------------------------------------------


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def out_of_ptys_message(err: OSError) -> str:
    limit, used = _read_int(PTY_MAX_PATH), _read_int(PTY_NR_PATH)
    return (
        "cannot allocate a pseudo-terminal (%s): the system has run out of PTYs "
        "(%s of kernel.pty.max=%s in use). Raise the limit, e.g. "
        "'sysctl -w kernel.pty.max=8192' (persist it in /etc/sysctl.d/), or close idle "
        "sessions; ssh without a password and without check_host_keys='accept' needs no PTY"
        % (err.strerror, "?" if used is None else used, "?" if limit is None else limit)
    )


def open_pty() -> tuple[int, int]:
    """A new (master, slave) pair; running out of PTYs gives an error that says so."""
    try:
        master, slave = os.openpty()
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EAGAIN, errno.ENXIO, errno.EIO):
            raise StreamError(out_of_ptys_message(e)) from None
        raise
    return master, slave


def disable_echo(fd: int) -> None:
    """Answers typed into a hybrid PTY must never come back as output (into logs)."""
    attrs = termios.tcgetattr(fd)
    attrs[3] &= ~(termios.ECHO | termios.ECHONL)
    termios.tcsetattr(fd, termios.TCSANOW, attrs)


def _spawn(args: list, actions: list, stdio: tuple) -> int:
    """Start `args` in a new session whose controlling terminal is the PTY: posix_spawn
    with `actions`, or, when mitogen.core._preexec_hook is set, fork and exec with `stdio`
    (the descriptors for 0, 1, 2; the PTY is 2) and the hook run just before exec."""
    try:
        if mitogen.parent.preexec_hook() is None:
            return os.posix_spawnp(args[0], args, dict(os.environ), file_actions=actions,
                                   setsid=True)
        proc = mitogen.parent.popen(args=args, stdin=stdio[0], stdout=stdio[1],
                                    stderr=stdio[2], close_fds=True, start_new_session=True,
                                    preexec_fn=_take_terminal)
    except OSError as e:
        raise StreamError("cannot start %s: %s (check the method's *_path option)"
                          % (args[0], e.strerror)) from None
    proc.returncode = 0  # the Reaper reaps it, not subprocess
    return proc.pid


def _take_terminal() -> None:
    """In the new child, after setsid(): make the PTY on stderr its controlling terminal."""
    fcntl.ioctl(2, termios.TIOCSCTTY, 0)


def spawn_with_pty(args: list, full: bool, pipes: bool = False) -> tuple[Process, int]:
    """Start `args` in a new session whose controlling terminal is a new PTY.

    Returns the process and the PTY master, on which prompts are answered. A hybrid child
    (not `full`) talks on a socketpair, or on two pipes with `pipes` (for a child that
    escalates privilege, as SELinux may refuse to hand a UNIX socket to the new user).
    """
    master, slave = open_pty()
    try:
        name = os.ttyname(slave)
        if full:
            tty.setraw(slave)
            actions = [(os.POSIX_SPAWN_OPEN, 0, name, os.O_RDWR, 0),
                       (os.POSIX_SPAWN_DUP2, 0, 1), (os.POSIX_SPAWN_DUP2, 0, 2)]
            pid = _spawn(args, actions, (slave, slave, slave))
            return Process(pid, master, os.dup(master), None), master
        disable_echo(slave)
        if pipes:
            child_in, ours_in = os.pipe()
            ours_out, child_out = os.pipe()
        else:
            ours, theirs = mitogen.parent.create_socketpair()
            ours_in = ours_out = ours.detach()
            child_in = child_out = theirs.detach()
        try:
            actions = [(os.POSIX_SPAWN_DUP2, child_in, 0),
                       (os.POSIX_SPAWN_DUP2, child_out, 1),
                       (os.POSIX_SPAWN_OPEN, 2, name, os.O_RDWR, 0)]
            pid = _spawn(args, actions, (child_in, child_out, slave))
        except BaseException:
            for fd in {ours_in, ours_out}:
                os.close(fd)
            raise
        finally:
            for fd in {child_in, child_out}:
                os.close(fd)
        if not pipes:
            ours_out = os.dup(ours_in)
        return Process(pid, ours_in, ours_out, master), master
    except BaseException:
        os.close(master)
        raise
    finally:
        os.close(slave)


class PromptStream(StderrStream):
    """Reads a hybrid child's PTY: logs its lines like stderr, and offers them and any
    unfinished line (a prompt waits without a newline) to the connection while it boots."""

    def __init__(self, fd: int, conn: PtyConnection) -> None:
        StderrStream.__init__(self, fd, conn.stream_name)
        self.conn = conn
        #: Set once no process holds the terminal open any more (reads fail with EIO).
        self.let_go = threading.Event()

    def on_readable(self, broker: mitogen.core.Broker) -> None:
        data = mitogen.core.read_chunk(self.rfd)  # EIO: every holder of the tty has gone
        if data is None:
            return
        if not data:
            if self._partial:
                self._lines([self._partial])
            self._partial = b""
            stream = self.conn.stream
            if stream is not None and not stream.closed:
                self._keep_until(stream, broker)
                return
            self.on_disconnect(broker)
            return
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        self._lines(lines)
        if self._partial and self.conn.on_partial_output(self._partial, None):
            self._add([self._partial])
            self._partial = b""

    def _keep_until(self, stream: mitogen.core.MessageStream,
                    broker: mitogen.core.Broker) -> None:
        """The booted child let go of its terminal, but it may still be the terminal's
        session leader (a launcher that exec'd Python itself leaves nothing else holding
        it): closing our end now would hang the terminal up and kill the child with SIGHUP.
        Stop reading it, and close it once the child's stream is gone."""
        broker.stop_receive(self)
        self.let_go.set()
        mitogen.core.listen(stream, "disconnect", lambda: self.on_disconnect(broker))

    def _lines(self, lines: list[bytes]) -> None:
        self._add(lines)
        for raw in lines:
            text = raw.decode("utf-8", "replace").rstrip("\r")
            if text.strip():
                self.conn.check_output(text, partial=False)


class PtyConnection(mitogen.parent.Connection):
    """A connection whose child may prompt on a terminal (see the module docstring).

    Subclasses set `tty_mode`, build `get_boot_command()`, and may extend `check_output()`
    (extra questions) and `diagnose()` (their own failure messages).
    """

    #: "hybrid", "full", or None for no PTY at all.
    tty_mode: str | None = "hybrid"
    #: The word users know the program by, in error messages.
    program = "the login program"

    def __init__(self, options: Any, router: Any) -> None:
        super().__init__(options, router)
        self.pty_master: int | None = None
        #: The PromptStream reading pty_master: kept after the boot too, as it holds the
        #: terminal open for the child (see PromptStream._keep_until()).
        self.pty_stream: PromptStream | None = None
        self.password_sent = False

    # --- spawning

    def wants_pty(self) -> bool:
        return self.tty_mode is not None

    def start_child(self, args: list | None = None) -> Process:
        if not self.wants_pty():
            return super().start_child(args)
        if args is None:
            args = self.get_boot_command()
        proc, self.pty_master = spawn_with_pty(args, full=self.tty_mode == "full")
        return proc

    def make_stderr_stream(self, fd: int) -> StderrStream:
        if fd == self.pty_master:
            self.pty_stream = PromptStream(fd, self)
            return self.pty_stream
        return super().make_stderr_stream(fd)

    # --- prompts

    def on_output_line(self, line: str, boot: Any) -> None:
        super().on_output_line(line, boot)
        self.check_output(line, partial=False)

    def on_partial_output(self, data: bytes, boot: Any) -> bool:
        if self._done:
            return False
        return self.check_output(data.decode("utf-8", "replace"), partial=True)

    def check_output(self, text: str, partial: bool) -> bool:
        """Answer what `text` asks; True when it was a question that is now answered.

        Questions wait for input without a newline, so only `partial` output is one; a
        complete line can only be news (a refusal, a warning) for `check_line()`.
        """
        if self._done:
            return False
        if not partial:
            self.check_line(text)
            return False
        if self.is_prompt(text):
            self.answer_password()
            return True
        return False

    def is_prompt(self, text: str) -> bool:
        """The method's own `password_prompt` (a case-insensitive substring), else any
        password prompt mitogen.spawn knows."""
        custom = getattr(self.options, "password_prompt", None)
        if custom:
            return custom.lower() in text.lower()
        return is_password_prompt(text)

    def is_refusal(self, text: str) -> bool:
        extra = getattr(self.options, "incorrect_prompts", None) or ()
        lowered = text.lower()
        return is_refusal(text) or any(p.lower() in lowered for p in extra)

    def check_line(self, line: str) -> None:
        """A complete line the child printed while booting; methods look for failures."""

    def answer(self, text: str) -> None:
        """Type `text` and Enter on the child's terminal."""
        if self.pty_master is not None:
            os.write(self.pty_master, text.encode("utf-8") + b"\n")

    def answer_password(self) -> None:
        password = getattr(self.options, "password", None)
        if self.password_sent:
            self._boot_failed(PasswordError, self.refused_message())
        elif password is None:
            self._boot_failed(PasswordError, self.missing_password_message())
        else:
            LOG.debug("%s: answering the password prompt", self.stream_name)
            self.password_sent = True
            self.answer(password)

    def missing_password_message(self) -> str:
        return "%s asked for a password but none was given: pass password=..." % (
            self.program,)

    def refused_message(self) -> str:
        return ("%s refused the password: check the password= given (and the account, "
                "which may be locked or lack the right to log in)" % (self.program,))

    def diagnose(self, exc_class: type, reason: str, lines: list) -> tuple:
        if exc_class is not mitogen.core.TimeoutError and self.password_sent and \
                any(self.is_refusal(line) for line in lines):
            return PasswordError, self.refused_message()
        return exc_class, reason
