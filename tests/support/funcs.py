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


# --- routing helpers -------------------------------------------------------------------------

_receivers: dict = {}


@mitogen.core.takes_router
def start_route_trace(router=None):
    router.route_trace = []


@mitogen.core.takes_router
def route_trace(router=None):
    return list(router.route_trace or ())


@mitogen.core.takes_router
def dropped_count(router=None):
    return router.dropped_count


@mitogen.core.takes_router
def open_receiver(router=None):
    """Create a receiver here and return a Sender for it that any context may use."""
    recv = mitogen.core.Receiver(router)
    _receivers[recv.handle] = recv
    return recv.to_sender()


def receive(handle, timeout=10.0):
    return _receivers[handle].get(timeout=timeout).unpickle()


def send_to(sender, value):
    sender.send(value)
    return True


def call_in(context, name, *args):
    """Call the function `name` of this module in another context, from this one."""
    return context.call(globals()[name], *args)


@mitogen.core.takes_router
def forge_call(target_id, auth_id, src_id, path, router=None):
    """Send CALL_FUNCTION to `target_id` claiming another context's authority."""
    msg = mitogen.core.Message.pickled(
        (None, "tests.support.funcs", None, "append_to_file", (path, "forged"),
         mitogen.core.Kwargs()),
        dst_id=target_id, src_id=src_id, auth_id=auth_id, handle=mitogen.core.CALL_FUNCTION)
    router.route(msg)
    return True


@mitogen.core.takes_econtext
def detach_and_sleep(econtext=None):
    econtext.detach()
    time.sleep(3600)


@mitogen.core.takes_router
def unidirectional(router=None):
    return router.unidirectional
