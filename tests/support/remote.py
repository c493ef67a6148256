"""Small functions the connection-method tests call inside children.

Kept apart from the test modules so that a child importing them fetches nothing heavier
than the standard library.
"""

from __future__ import annotations

import os
import pwd
import threading

__all__ = ["environ", "set_env", "thread_count", "whoami"]


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
