"""Small functions the connection-method tests call inside children.

Kept apart from the test modules so that a child importing them fetches nothing heavier
than the standard library.
"""

from __future__ import annotations

import os
import pwd
import threading

__all__ = ["environ", "first_process", "hooks_run", "hostname", "note_fork", "note_start",
           "set_env", "thread_count", "whoami"]


def whoami() -> str:
    """The account the calling context runs as."""
    return pwd.getpwuid(os.getuid()).pw_name


def set_env(name: str, value: str) -> None:
    """Change this context's environment, which the children it starts inherit."""
    os.environ[name] = value


def environ(name: str) -> str | None:
    return os.environ.get(name)


def thread_count() -> int:
    return threading.active_count()


def hostname() -> str:
    return os.uname().nodename


def first_process() -> str:
    """The command line of PID 1 as this context's PID namespace sees it."""
    with open("/proc/1/cmdline", "rb") as f:
        return f.read().rstrip(b"\0").replace(b"\0", b" ").decode()


_hooks: list = []


def note_fork() -> None:
    """An on_fork hook: runs in the forked child."""
    _hooks.append(("fork", os.getpid()))


def note_start(econtext) -> None:
    """An on_start hook: gets the child's ExternalContext."""
    _hooks.append(("start", type(econtext).__name__))


def hooks_run() -> list:
    return list(_hooks)
