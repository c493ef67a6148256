"""Waiting for processes of the tests' own making."""

from __future__ import annotations

import os
import select


def wait_gone(pid: int, timeout: float = 10.0) -> bool:
    """Wait for `pid` to exit, on its pidfd (the real event), within `timeout`: True when
    it has (or was gone already)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)
