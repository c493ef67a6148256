"""Functions that tests call in child contexts.

Standard library only, so that importing this module in a child costs one small GET_MODULE and
nothing else.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time

import mitogen.core


def identity(value):
    return value


def length(value):
    return len(value)


def add(a, b):
    return a + b


def fail(message):
    raise ValueError(message)


def argv0():
    with open("/proc/self/cmdline", "rb") as f:
        return f.read().split(b"\0")[0].decode()


def print_and_log(text):
    print(text)
    logging.getLogger("child.logger").warning("warned: %s", text)
    sys.stdout.flush()
    return os.getpid()


def sleep_forever():
    time.sleep(3600)


def thread_name():
    return threading.current_thread().name


def parent_ids():
    return list(mitogen.parent_ids), mitogen.context_id


@mitogen.core.takes_econtext
def uses_econtext(econtext=None):
    return type(econtext).__name__


@mitogen.core.takes_router
def uses_router(router=None):
    return type(router).__name__


def append_to_file(path, text):
    with open(path, "a") as f:
        f.write(text)


class Holder:
    @classmethod
    def klass(cls, x):
        return ("classmethod", cls.__name__, x)

    @staticmethod
    def static(x):
        return ("staticmethod", x)

    def method(self):
        return "never"
