"""A child's log records, forwarded to the master: the handler a child installs once
something imports :mod:`logging`.

:mod:`mitogen.core` keeps only what notices that import (and sends the core's own records
straight to the master until then); this module is fetched at that moment, so that a child
that never logs never pays for it.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from mitogen.core import FORWARD_LOG, Message

__all__ = ["LogHandler", "install"]


class LogHandler(logging.Handler):
    """Forwards records to `context`'s FORWARD_LOG handle.

    Records logged while forwarding (by the router or a stream) are dropped, otherwise a
    broken link would log about itself forever.
    """

    def __init__(self, context: Any) -> None:
        logging.Handler.__init__(self)
        self.context = context
        self._local = threading.local()

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(self._local, "busy", False) or record.name == "mitogen.io":
            return
        self._local.busy = True
        try:
            text = self.format(record)
            self.context.send(Message.pickled((record.name, record.levelno, text),
                                              handle=FORWARD_LOG))
        except Exception:
            pass
        finally:
            self._local.busy = False


def install(context: Any, level: int, debug: bool) -> None:
    """Send every record at `level` or above (and the package's own debug records when
    `debug`) to `context`, instead of whatever handlers the root logger had."""
    root = logging.getLogger()
    root.setLevel(level)
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.addHandler(LogHandler(context))
    if debug:
        logging.getLogger("mitogen").setLevel(logging.DEBUG)
