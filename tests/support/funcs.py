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
    return cmdline()[0]


def cmdline():
    """This process's command line as the kernel (and ps) shows it."""
    with open("/proc/self/cmdline", "rb") as f:
        return [part.decode() for part in f.read().split(b"\0")[:-1]]


def print_and_log(text):
    print(text)
    logging.getLogger("child.logger").warning("warned: %s", text)
    sys.stdout.flush()
    return os.getpid()


def sleep_forever():
    time.sleep(3600)


def warn_and_return(text):
    """Log a warning (forwarded to the master on the parent stream) and return `text`."""
    logging.getLogger("child.logger").warning("%s", text)
    return text


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


def send_numbered(sender, count, size):
    """Send `count` messages of `size` bytes, each with its number, to `sender`."""
    for number in range(count):
        sender.send((number, b"x" * size))
    return count


def receive_numbered_or_value(handle, count, timeout=30.0):
    """The next `count` values sent to the receiver `handle`."""
    return [_receivers[handle].get(timeout=timeout).unpickle() for _ in range(count)]


def receive_numbered(handle, count, timeout=30.0):
    """The numbers of the next `count` messages sent to the receiver `handle`."""
    return [_receivers[handle].get(timeout=timeout).unpickle()[0] for _ in range(count)]


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


def profile_import(name):
    """Import `name` under cProfile; return the top entries (for performance work)."""
    import cProfile
    import io
    import pstats

    profiler = cProfile.Profile()
    started = time.perf_counter()
    profiler.enable()
    __import__(name)
    profiler.disable()
    elapsed = time.perf_counter() - started
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(15)
    return elapsed, out.getvalue()


# --- importer helpers ------------------------------------------------------------------------


def _importer():
    return next(f for f in sys.meta_path if type(f).__name__ == "Importer")


def importer_requests():
    """How many GET_MODULE requests this context's importer has sent."""
    return _importer().get_module_count


def fetched(fullname):
    """Whether this context's importer got `fullname` from its parent."""
    return _importer().get_cached(fullname) is not None


def fetch_copy(fullname):
    """Have this context's importer fetch `fullname` from its parent without importing it,
    as an intermediate does for its children; whether a copy is now cached."""
    return isinstance(_importer()._fetch(fullname), tuple)


def arrived_as_code(fullname):
    """Whether `fullname` reached this context's importer as a code object (so it was not
    compiled here)."""
    entry = _importer().get_cached(fullname)
    return isinstance(entry, tuple) and len(entry) > 5 and entry[5] is not None


def import_and_count(name):
    """Import `name`; return how many GET_MODULE requests that took."""
    import importlib

    before = _importer().get_module_count
    importlib.import_module(name)
    return _importer().get_module_count - before


def module_origin(name):
    import importlib

    module = importlib.import_module(name)
    return (type(module.__loader__).__name__, module.__file__, module.__spec__.name,
            getattr(module, "__path__", None), module.__package__)


def sys_path():
    return list(sys.path)


def import_in_threads(name, count):
    import importlib

    barrier = threading.Barrier(count)
    results = []

    def run():
        barrier.wait()
        results.append(importlib.import_module(name).VALUE)

    threads = [threading.Thread(target=run) for _ in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def try_import(name):
    import importlib

    try:
        importlib.import_module(name)
    except ImportError as e:
        return type(e).__name__, str(e)
    return "ok", None


def python_version():
    return tuple(sys.version_info[:3])


def run_shell(command):
    return os.system(command)


@mitogen.core.takes_router
def corrupt_parent_stream(router=None):
    """Write bytes that are not a frame onto the link to the parent."""
    os.write(router.parent_stream.wfd, b"\x00" * 64)
    return True


def make_bytes(size):
    """A bytes object of `size` zero bytes, made here (for transfer tests)."""
    return bytes(size)


def module_file(name):
    import importlib

    return importlib.import_module(name).__file__


# --- resources ---------------------------------------------------------------------------


def resources_of(package, name, subdir):
    """What importlib.resources and pkgutil give for the files of `package` here."""
    import importlib.resources
    import pkgutil
    import warnings

    root = importlib.resources.files(package)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the legacy API, on 3.11+
        legacy = importlib.resources.read_binary(package, name)
    return {
        "type": type(root).__name__,
        "text": root.joinpath(name).read_text(),
        "listing": sorted(c.name for c in root.iterdir() if c.name != "__pycache__"),
        "nested": (root / subdir / "deep.bin").read_bytes(),
        "is_dir": (root / subdir).is_dir(),
        "is_file": root.joinpath(name).is_file(),
        "get_data": pkgutil.get_data(package, name),
        "get_data_nested": pkgutil.get_data(package, subdir + "/deep.bin"),
        "legacy": legacy,
    }


def missing_resource(package, name):
    import importlib.resources

    try:
        importlib.resources.files(package).joinpath(name).read_bytes()
    except Exception as e:
        return type(e).__name__, str(e)
    return "ok", None


# --- the child's process state -----------------------------------------------------------


def open_fds():
    return sorted(int(name) for name in os.listdir("/proc/self/fd"))


def child_processes():
    """(pid, state) of every process whose parent is this one (zombies included)."""
    me = str(os.getpid())
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % name) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[1] == me:
            found.append((int(name), fields[0]))
    return found


@mitogen.core.takes_router
def print_then_wait(sender, marker, router=None):
    """Print `marker` without flushing, then wait for the master's go-ahead: a line-buffered
    stdout has already sent it by then, a block-buffered one has not."""
    recv = mitogen.core.Receiver(router)
    sender.send(recv.to_sender())
    print(marker)
    try:
        return recv.get(timeout=30).unpickle()
    finally:
        recv.close()


@mitogen.core.takes_router
def channel_doubler(handle, router=None):
    """Open a Channel to the master's `handle`, tell it ours, then answer every number it
    sends with its double until the master closes the channel; return how many."""
    chan = mitogen.core.Channel(router, router.context_by_id(0), handle)
    chan.send(chan.handle)
    count = 0
    for msg in chan:
        chan.send(msg.unpickle() * 2)
        count += 1
    chan.close()
    return count


def c_extension_import():
    """Import PyYAML and say whether its C extension loaded, and from where."""
    import yaml

    return yaml.__with_libyaml__, type(yaml._yaml.__loader__).__name__, yaml._yaml.__file__


def module_loader_and_file(name):
    import importlib

    module = importlib.import_module(name)
    return type(module.__loader__).__name__, module.__file__


def cwd_and_env(name):
    return os.getcwd(), os.environ.get(name)


def sleep_then_return(seconds, value):
    time.sleep(seconds)
    return value


def module_loaded(name):
    """Whether this context has imported `name`."""
    return name in sys.modules


_disconnected: dict = {}


@mitogen.core.takes_router
def watch_disconnect(context_id, router=None):
    """Start noticing when the context `context_id` disconnects (DEL_ROUTE reaches us)."""
    latch = _disconnected[context_id] = mitogen.core.Latch()
    context = router.context_by_id(context_id)
    mitogen.core.listen(context, "disconnect", lambda: latch.put(True))


def wait_disconnect(context_id, timeout):
    """True once the context watched with watch_disconnect() has disconnected."""
    return _disconnected.pop(context_id).get(timeout=timeout)
