"""Services: objects living in a context whose exposed methods other contexts call by name.

A :class:`Service` subclass marks the methods others may call with :func:`expose` and a
:class:`Policy` (:class:`AllowParents`, :class:`AllowAny`); :func:`arg_spec` declares the
argument types checked before the method runs, and :func:`no_reply` marks methods that answer
nothing. A :class:`Pool` of threads receives ``CALL_SERVICE`` messages and runs them through
each service's invoker: :class:`Invoker` (concurrently), :class:`SerializedInvoker` (one at a
time) or :class:`DeduplicatingInvoker` (identical concurrent calls share one execution).

Callers use ``context.call_service(service_name, method_name, **kwargs)`` (or its ``_async``
form, or :func:`call`). In a child, the first ``CALL_SERVICE`` from a parent makes the child
fetch this module, start a pool (:func:`get_or_create_pool`) and import the named service class
(:class:`Activator`); a call from anyone else before that is refused.

Two services move files: :class:`FileService` streams registered files to whoever asks, in
chunks under a flow-control window, and :class:`PushFileService` pushes files down the tree,
storing them at each hop so that every link carries a file once.

The wire format of a call is Mitogen's: the pickled tuple ``(service_name, method_name,
Kwargs)`` sent to ``CALL_SERVICE``; the reply is the pickled result or a ``CallError``.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import stat
import sys
import threading
from typing import Any, Callable

import mitogen
import mitogen.core
import mitogen.select
from mitogen.core import (
    CALL_SERVICE,
    CallError,
    ChannelError,
    Context,
    Kwargs,
    Latch,
    LatchError,
    Message,
    Receiver,
    Sender,
)

__all__ = [
    "Activator",
    "AllowAny",
    "AllowParents",
    "DeduplicatingInvoker",
    "Error",
    "FileService",
    "Invoker",
    "Policy",
    "Pool",
    "PushFileService",
    "SerializedInvoker",
    "Service",
    "arg_spec",
    "call",
    "expose",
    "get_or_create_pool",
    "get_thread_name",
    "no_reply",
    "validate_arg_spec",
]

LOG = logging.getLogger(__name__)


class Error(mitogen.core.Error):
    """A service or pool was set up wrongly (a service registered twice, no router)."""


# ---------------------------------------------------------------------------------------------
# Calling services
# ---------------------------------------------------------------------------------------------


def _service_name(service: Any) -> str:
    """The dotted name a call carries: given as text, or taken from a Service class."""
    if isinstance(service, bytes):
        return service.decode("utf-8")
    if isinstance(service, str):
        return service
    name = getattr(service, "name", None)
    if callable(name):
        return name()
    raise TypeError("service_name must be a Service class or its dotted name, not %r"
                    % (service,))


def send_call(context: Context, service_name: Any, method_name: str, kwargs: dict,
              wait: bool = False) -> Any:
    """Send one service call to `context`: the Receiver of its reply, or with `wait` the
    unpickled reply itself. Behind ``Context.call_service`` and ``call_service_async``."""
    # A plain dict: the reader unpickles it without an Unpickler (no global to look up).
    body = (_service_name(service_name), str(method_name), dict(kwargs))
    msg = Message.pickled(body, handle=CALL_SERVICE)
    if not wait:
        return context.send_async(msg)
    try:
        return context.send_await(msg)
    except ChannelError as e:
        # Refused by the router (a context without a pool yet takes calls from its parents
        # only; a stopped pool takes none) or the context went away: a CallError too.
        raise CallError("%s.%s() in context %d was not answered: %s" % (
            body[0], body[1], context.context_id, e))


def call(service_name: Any, method_name: str, call_context: Context | None = None,
         **kwargs: Any) -> Any:
    """Call a service method: in `call_context` if given, else in this process's own pool,
    on the calling thread and without a policy check (the caller is this process)."""
    if call_context is not None:
        return call_context.call_service(service_name, method_name, **kwargs)
    pool = get_or_create_pool(context=kwargs.get("context"))
    invoker = pool.get_invoker(_service_name(service_name), None)
    return getattr(invoker.service, method_name)(**kwargs)


# ---------------------------------------------------------------------------------------------
# Declaring methods: policies and decorators
# ---------------------------------------------------------------------------------------------


class Policy:
    """Decides whether the sender of a message may call a method."""

    def is_authorized(self, service: Service, msg: Message) -> bool:
        raise NotImplementedError

    def __repr__(self) -> str:
        return "%s()" % (type(self).__name__,)


class AllowAny(Policy):
    """Any context may call."""

    def is_authorized(self, service: Service, msg: Message) -> bool:
        return True


class AllowParents(Policy):
    """Only this context itself and its parents may call (judged by the verified
    ``auth_id``, so a child cannot pretend)."""

    def is_authorized(self, service: Service, msg: Message) -> bool:
        return mitogen.core.has_parent_authority(msg)


def expose(policy: Policy) -> Callable:
    """Let other contexts call the decorated method when `policy` allows; may be repeated,
    and then every policy must allow. Methods never exposed cannot be called at all."""

    def wrapper(func: Callable) -> Callable:
        func.mitogen_service__policies = [  # type: ignore[attr-defined]
            policy, *getattr(func, "mitogen_service__policies", [])]
        return func

    return wrapper


def arg_spec(spec: dict) -> Callable:
    """Declare the required arguments and their types, ``{'path': str}``: a call missing
    one, or passing the wrong type, fails with a CallError before the method runs."""

    def wrapper(func: Callable) -> Callable:
        func.mitogen_service__arg_spec = spec  # type: ignore[attr-defined]
        return func

    return wrapper


def no_reply() -> Callable:
    """The method sends nothing back (its result is dropped, its failure only logged)."""

    def wrapper(func: Callable) -> Callable:
        func.mitogen_service__no_reply = True  # type: ignore[attr-defined]
        return func

    return wrapper


def validate_arg_spec(spec: dict, args: dict) -> None:
    """Raise CallError naming the first argument of `spec` that `args` lacks or mistypes."""
    for name, wanted in spec.items():
        if name not in args:
            raise CallError("required argument %r is missing", name)
        if not isinstance(args[name], wanted):
            raise CallError("argument %r must be %s, not %s", name, _type_names(wanted),
                            type(args[name]).__name__)


def _type_names(wanted: Any) -> str:
    if isinstance(wanted, tuple):
        return " or ".join(t.__name__ for t in wanted)
    return wanted.__name__


_takes_msg_cache: dict = {}


def _takes_msg(method: Callable) -> bool:
    """Whether the method has a parameter named ``msg`` (it then receives the request)."""
    func = getattr(method, "__func__", method)
    found = _takes_msg_cache.get(func)
    if found is None:
        try:
            found = "msg" in inspect.signature(func).parameters
        except (TypeError, ValueError):
            found = False
        _takes_msg_cache[func] = found
    return found


# ---------------------------------------------------------------------------------------------
# Invokers (how a service's calls are run) and services
# ---------------------------------------------------------------------------------------------


class Invoker:
    """Runs calls of one service as they come, as many at once as the pool has threads."""

    unauthorized_msg = "context %d may not call %r of service %s: refused by its policy %r"

    def __init__(self, service: Service) -> None:
        self.service = service

    def __repr__(self) -> str:
        return "%s(%r)" % (type(self).__name__, self.service)

    def _validate(self, method_name: str, kwargs: dict, msg: Message | None) -> Callable:
        """The method to run, after checking it exists, is exposed, the caller passes its
        policies, and the arguments match its spec; else CallError saying which failed."""
        name = self.service.name()
        method = getattr(self.service, method_name, None) if method_name else None
        if method is None or not callable(method):
            raise CallError("service %s has no method %r", name, method_name)
        policies = getattr(method, "mitogen_service__policies", None)
        if not policies:
            raise CallError("method %r of service %s is not exposed (it has no @expose "
                            "policy)", method_name, name)
        if msg is not None:
            for policy in policies:
                if not policy.is_authorized(self.service, msg):
                    raise CallError(self.unauthorized_msg, msg.auth_id, method_name, name,
                                    policy)
        if "msg" in kwargs and _takes_msg(method):
            raise CallError("argument 'msg' of %r is set by the service, not by callers",
                            method_name)
        spec = getattr(method, "mitogen_service__arg_spec", {})
        try:
            validate_arg_spec(spec, kwargs)
        except CallError as e:
            raise CallError("%s.%s(): %s", name, method_name, e)
        return method

    def _invoke(self, method: Callable, kwargs: dict, msg: Message | None) -> Any:
        if _takes_msg(method):
            kwargs["msg"] = msg
        if not getattr(method, "mitogen_service__no_reply", False):
            return method(**kwargs)
        try:
            method(**kwargs)
        except Exception:
            LOG.exception("%r: no-reply method %s failed", self, method.__name__)
        return Service.NO_REPLY

    def invoke(self, method_name: str, kwargs: dict, msg: Message) -> Any:
        method = self._validate(method_name, kwargs, msg)
        response = self._invoke(method, kwargs, msg)
        if response is not Service.NO_REPLY:
            msg.reply(response)
        return Service.NO_REPLY


class SerializedInvoker(Invoker):
    """Runs one call of the service at a time, in arrival order; a pool thread that finds a
    call running queues its own and returns to the pool at once."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._lock = threading.Lock()
        self._queue: list = []
        self._running = False

    def invoke(self, method_name: str, kwargs: dict, msg: Message) -> Any:
        with self._lock:
            self._queue.append((method_name, kwargs, msg))
            if self._running:
                return Service.NO_REPLY
            self._running = True
        while True:
            with self._lock:
                if not self._queue:
                    self._running = False
                    return Service.NO_REPLY
                method_name, kwargs, msg = self._queue.pop(0)
            _run_and_reply(self, super().invoke, method_name, kwargs, msg)


class DeduplicatingInvoker(Invoker):
    """Identical calls share one execution: a call arriving while the same call (by
    :meth:`key_from_request`) runs waits for its result instead of running again, and a
    result, once produced, answers later identical calls too (errors are not kept)."""

    def __init__(self, service: Service) -> None:
        super().__init__(service)
        self._lock = threading.Lock()
        self._responses: dict = {}
        self._waiters: dict = {}

    def get_response(self, args: Any) -> Any:
        """Mitogen's hook for producing a response by hand; unused by this invoker."""
        raise NotImplementedError

    def key_from_request(self, method_name: str, kwargs: dict) -> str:
        """What makes two calls identical: the method and a stable text of the arguments."""
        return repr((method_name, sorted((k, repr(v)) for k, v in kwargs.items())))

    def invoke(self, method_name: str, kwargs: dict, msg: Message) -> Any:
        method = self._validate(method_name, kwargs, msg)
        key = self.key_from_request(method_name, kwargs)
        with self._lock:
            if key in self._responses:
                msg.reply(self._responses[key])
                return Service.NO_REPLY
            if key in self._waiters:
                self._waiters[key].append(msg)
                return Service.NO_REPLY
            self._waiters[key] = [msg]
        try:
            response = self._invoke(method, kwargs, msg)
            keep = True
        except Exception as e:
            response, keep = CallError(e), False
        with self._lock:
            waiters = self._waiters.pop(key)
            if keep:
                self._responses[key] = response
        if response is not Service.NO_REPLY:
            for waiter in waiters:
                waiter.reply(response)
        return Service.NO_REPLY


class Service:
    """Base class of services. One instance per pool; its exposed methods run on pool threads.

    ``select`` is a :class:`mitogen.select.Select` the pool also watches: add receivers to it
    and their messages arrive at :meth:`on_message` on a pool thread.
    """

    #: Returned by an invoker when the reply was sent (or must not be) some other way.
    NO_REPLY = object()

    invoker_class: type = Invoker

    @classmethod
    def name(cls) -> str:
        return "%s.%s" % (cls.__module__, cls.__name__)

    def __init__(self, router: Any) -> None:
        self.router = router
        self.select = mitogen.select.Select(oneshot=False)

    def __repr__(self) -> str:
        return "%s()" % (type(self).__name__,)

    def on_message(self, event: mitogen.select.Event) -> None:
        """A message arrived on one of the receivers in :attr:`select`."""

    def on_shutdown(self) -> None:
        """The pool has stopped and joined its threads."""


def _run_and_reply(owner: Any, func: Callable, method_name: str, kwargs: dict,
                   msg: Message) -> None:
    """Run one call; turn a failure into a CallError reply (or a log line for no reply)."""
    try:
        func(method_name, kwargs, msg)
    except CallError as e:
        LOG.debug("%r: %r refused: %s", owner, method_name, e)
        msg.reply(e)
    except Exception as e:
        LOG.exception("%r: %r failed", owner, method_name)
        msg.reply(CallError(e))


# ---------------------------------------------------------------------------------------------
# Activation and the pool
# ---------------------------------------------------------------------------------------------


class Activator:
    """Starts a service on its first call: imports the class by its dotted name, if the
    caller is allowed to cause that (by default only this context's parents are)."""

    not_active_msg = ("service %r is not running in context %d, and only a parent may "
                      "start it (the caller is context %d)")

    def is_permitted(self, mod_name: str, class_name: str, msg: Message) -> bool:
        return mitogen.core.has_parent_authority(msg)

    def activate(self, pool: Pool, service_name: str, msg: Message | None) -> Service:
        mod_name, _, class_name = service_name.rpartition(".")
        if msg is not None and not self.is_permitted(mod_name, class_name, msg):
            raise CallError(self.not_active_msg, service_name, mitogen.context_id, msg.auth_id)
        if not mod_name:
            raise CallError("unknown service %r: not a dotted module.Class name", service_name)
        try:
            module = importlib.import_module(mod_name)
        except ImportError as e:
            raise CallError("unknown service %r: cannot import %s: %s", service_name,
                            mod_name, e)
        klass = getattr(module, class_name, None)
        if not (isinstance(klass, type) and issubclass(klass, Service)):
            raise CallError("unknown service %r: %s has no Service class %r", service_name,
                            mod_name, class_name)
        service = klass(router=pool.router)
        pool.add(service)
        return service


class Pool:
    """Threads that receive ``CALL_SERVICE`` messages and run them on the named services.

    Every thread takes work from one queue (calls, functions given to :meth:`defer`, messages
    for the receivers in a service's ``select``), so threads are shared by all services and
    a call costs one hand-over from the thread that read it. `recv`, a Receiver or Latch
    already holding calls (a child's stub queues them there while this module is fetched),
    is drained too. :meth:`stop` refuses the calls still queued with a CallError, as it does
    any call arriving later, and lets running calls finish.
    """

    activator_class = Activator
    closed = False

    def __init__(self, router: Any, services: Any = (), size: int = 1, overwrite: bool = False,
                 recv: Any = None) -> None:
        self.router = router
        self.closed = False
        self._activator = self.activator_class()
        self._lock = threading.Lock()  # activation
        self._state_lock = threading.Lock()  # closed vs. queueing work
        self._invoker_by_name: dict[str, Invoker] = {}
        self._work = Latch()  # (function, argument) pairs
        self._inherited: list = []
        for service in services:
            self.add(service)
        if recv is not None:
            self._adopt(recv)
        router.add_handler(self._on_call, CALL_SERVICE, overwrite=overwrite)
        mitogen.core.listen(router.broker, "shutdown", self._on_broker_shutdown)
        self._threads = []
        for index in range(size):
            thread = threading.Thread(target=self._worker_main, daemon=True,
                                      name="mitogen.Pool.%04x.%d" % (id(self) & 0xffff, index))
            thread.start()
            self._threads.append(thread)

    def __repr__(self) -> str:
        return "Pool(%04x, size=%d)" % (id(self) & 0xffff, len(self._threads))

    @property
    def size(self) -> int:
        return len(self._threads)

    def add(self, service: Service) -> None:
        name = service.name()
        with self._state_lock:
            if name in self._invoker_by_name:
                raise Error("service named %r already registered" % (name,))
            self._invoker_by_name[name] = service.invoker_class(service=service)
        self._watch(service.select, lambda select: self._on_select(service, select))

    def _adopt(self, recv: Any) -> None:
        """Also run the calls queued in `recv`, a Receiver or Latch (a child's stub queues
        calls there while this module is fetched)."""
        self._inherited.append(recv)
        self._watch(recv, self._take_call)

    def _watch(self, source: Any, func: Callable) -> None:
        """Queue ``func(source)`` for each item `source` (a Latch, Receiver or Select) gets,
        including those it holds already (a spurious one finds nothing and does nothing)."""

        def notify(_: Any) -> None:
            self._queue(func, source)

        source.notify = notify
        for _ in range(source.size()):
            self._queue(func, source)

    def _queue(self, func: Callable, arg: Any) -> bool:
        with self._state_lock:
            if self.closed:
                return False
            self._work.put((func, arg))
            return True

    def get_invoker(self, name: str, msg: Message | None) -> Invoker:
        invoker = self._invoker_by_name.get(name)
        if invoker is None:
            with self._lock:
                invoker = self._invoker_by_name.get(name)
                if invoker is None:
                    self._activator.activate(self, name, msg)
                    invoker = self._invoker_by_name[name]
        return invoker

    def get_service(self, name: str) -> Service:
        return self.get_invoker(name, None).service

    def defer(self, func: Callable, *args: Any, **kwargs: Any) -> None:
        """Run ``func(*args, **kwargs)`` on a pool thread."""
        if not self._queue(_call, (func, args, kwargs)):
            raise Error("the pool has stopped: it cannot run %r" % (func,))

    # --- receiving calls

    def _on_call(self, msg: Message) -> None:
        """The CALL_SERVICE handler: queue the call, or refuse it once stopped."""
        if not msg.is_dead and not self._queue(self._on_service_call, msg):
            self._refuse(msg)

    _on_call.any_thread = True  # type: ignore[attr-defined]  # it only queues

    def _take_call(self, source: Any) -> None:
        try:
            msg = source.get(block=False)
        except (mitogen.core.TimeoutError, LatchError, ChannelError):
            return
        self._on_service_call(msg)

    @staticmethod
    def _on_select(service: Service, select: mitogen.select.Select) -> None:
        try:
            event = select.get_event(block=False)
        except (mitogen.core.TimeoutError, LatchError, ChannelError, mitogen.select.Error):
            return
        service.on_message(event)

    def _refuse(self, msg: Message) -> None:
        if msg.reply_to and not msg.is_dead:
            msg.reply(CallError("the service pool of context %d has stopped",
                                mitogen.context_id))

    def _on_service_call(self, msg: Message) -> None:
        if msg.is_dead:
            return
        try:
            service_name, method_name, kwargs = self._parse(msg)
            invoker = self.get_invoker(service_name, msg)
        except CallError as e:
            LOG.debug("%r: refused %r: %s", self, msg, e)
            msg.reply(e)
            return
        except Exception as e:
            LOG.exception("%r: activating a service for %r failed", self, msg)
            msg.reply(CallError(e))
            return
        _run_and_reply(self, invoker.invoke, method_name, kwargs, msg)

    @staticmethod
    def _parse(msg: Message) -> tuple:
        body = msg.unpickle(throw=False)
        if isinstance(body, CallError):
            raise body  # the caller's own arguments could not be pickled
        if not (isinstance(body, tuple) and len(body) == 3 and isinstance(body[0], str)
                and isinstance(body[1], str) and isinstance(body[2], dict)):
            raise CallError("malformed CALL_SERVICE request: expected (service_name, "
                            "method_name, kwargs)")
        return body[0], body[1], dict(body[2])

    def _worker_main(self) -> None:
        while True:
            try:
                func, arg = self._work.get()
            except LatchError:
                return
            try:
                func(arg)
            except Exception:
                LOG.exception("%r: %r failed", self, func)

    # --- stopping

    def _on_broker_shutdown(self) -> None:
        self.stop(join=False)

    def stop(self, join: bool = True) -> None:
        """Stop taking calls: queued ones are refused with a CallError, running ones
        finish. With `join`, wait for the threads and then call each service's
        ``on_shutdown()``."""
        with self._state_lock:
            first = not self.closed
            self.closed = True
        if first:
            try:
                mitogen.core.unlisten(self.router.broker, "shutdown", self._on_broker_shutdown)
            except ValueError:
                pass
            self.router.del_handler(CALL_SERVICE)
            while not self._work.empty():
                try:
                    func, arg = self._work.get(block=False)
                except mitogen.core.TimeoutError:
                    break
                if func == self._on_service_call:
                    self._refuse(arg)
            for recv in self._inherited:
                recv.notify = None
                while True:
                    try:
                        self._refuse(recv.get(block=False))
                    except (mitogen.core.TimeoutError, LatchError, ChannelError):
                        break
            self._work.close()
        if join:
            self.join()

    def join(self) -> None:
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join()
        for invoker in list(self._invoker_by_name.values()):
            invoker.service.on_shutdown()


def _call(job: tuple) -> None:
    func, args, kwargs = job
    func(*args, **kwargs)


def get_thread_name() -> str:
    """The calling thread's name (pool threads are ``mitogen.Pool.<id>.<n>``)."""
    return threading.current_thread().name


_pool: Pool | None = None
_pool_pid: int | None = None
_pool_lock = threading.Lock()


@mitogen.core.takes_router
def get_or_create_pool(size: int | None = None, router: Any = None,
                       context: Context | None = None, recv: Any = None) -> Pool:
    """This process's service pool, started (with `size` threads, default 2) on first use.
    A child's stub passes `recv`, the calls it queued while this module was fetched."""
    global _pool, _pool_pid
    with _pool_lock:
        if _pool is None or _pool.closed or _pool_pid != os.getpid():
            if router is None:
                if context is None:
                    raise ValueError("no service pool runs here yet, and neither router nor "
                                     "context was given to start one")
                router = context.router
            _pool = Pool(router, size=size or 2, overwrite=True, recv=recv)
            _pool_pid = os.getpid()
        elif recv is not None:
            _pool._adopt(recv)
        return _pool


# ---------------------------------------------------------------------------------------------
# Moving files
# ---------------------------------------------------------------------------------------------

#: Bytes per chunk message. Big enough that per-message costs vanish beside the copying, small
#: enough that several fit in the window.
FILE_CHUNK = 2 * 1048576

#: Bytes a sender may have sent and not had acknowledged: what bounds memory on every side.
FILE_WINDOW = 8 * 1048576


def _send_chunk(context: Context, handle: int, data: Any, ack_handle: int) -> None:
    """One chunk of a file, raw bytes; the receiver answers its ``reply_to`` with the
    number of bytes it took, which reopens the window by that much."""
    msg = Message(enc=mitogen.core.ENC_BIN, handle=handle, reply_to=ack_handle)
    msg.data = data  # any buffer (a slice of a pushed file, a received body): not copied
    context.send(msg)


def _credit(msg: Message) -> int:
    """The byte count an acknowledgement carries; a dead one raises ChannelError."""
    count = msg.unpickle()
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        raise ChannelError("malformed acknowledgement %r" % (count,))
    return count


def _identity(st: os.stat_result) -> tuple:
    """What must stay the same while a file is sent: a changed one fails the transfer."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _within(path: str, roots: Any) -> bool:
    for root in roots:
        if path == root or path.startswith(root.rstrip("/") + "/"):
            return True
    return False


class _Transfer:
    """One file being sent by a FileService to one receiver."""

    def __init__(self, router: Any, fd: int, st: os.stat_result, path: str,
                 sender: Sender) -> None:
        self.fd = fd
        self.identity = _identity(st)
        self.size = st.st_size
        self.path = path
        self.sender = sender
        self.offset = 0
        self.unacked = 0
        self.acks = Receiver(router, respondent=sender.context)

    def __repr__(self) -> str:
        return "_Transfer(%r to %r, %d/%d)" % (self.path, self.sender.context, self.offset,
                                               self.size)

    def changed(self) -> str | None:
        """Why the file no longer matches what was announced, if it does not."""
        st = os.fstat(self.fd)
        if st.st_nlink == 0:
            return "%s was deleted while it was being sent" % (self.path,)
        now = _identity(st)
        if now != self.identity or os.pread(self.fd, 1, self.size):
            return "%s changed while it was being sent (size %d when announced, %d now)" % (
                self.path, self.size, now[2])
        return None


class FileService(Service):
    """Serves files to other contexts, in chunks under a flow-control window.

    A parent (or the process itself) makes paths available with :meth:`register` and
    :meth:`register_prefix`; only those are served to other contexts, after resolving
    symbolic links and refusing ``..``, and only regular files. A child fetches with the
    classmethod :meth:`get`. The sender reads a chunk only when fewer than
    ``window_size_bytes`` are unacknowledged, so memory stays bounded on every side however
    large the file. Files queued for contexts behind the same stream are sent one after
    another, by one thread per busy stream (a pool thread is never held up). A file
    that changes or shrinks while it is sent fails the transfer: :meth:`get` returns
    ``ok=False`` and logs why.
    """

    unregistered_msg = "path %r is not registered with FileService"
    context_mismatch_msg = "sender= of a fetch must belong to the context that fetches"

    #: Bytes per chunk, and bytes sent but not yet acknowledged, per stream.
    IO_SIZE = FILE_CHUNK
    window_size_bytes = FILE_WINDOW

    #: Transfers queued for one stream at most: each holds an open file, so a context
    #: calling fetch() in a loop must not exhaust this process's descriptors.
    max_queued_per_stream = 64

    def __init__(self, router: Any) -> None:
        super().__init__(router)
        self._paths: set[str] = set()
        self._prefixes: set[str] = set()
        self._lock = threading.Lock()
        self._queues: dict[Any, list[_Transfer]] = {}
        self._stopping = False

    # --- registration

    @expose(policy=AllowParents())
    @arg_spec({"path": str})
    def register(self, path: str) -> None:
        """Let children fetch the file `path`."""
        self._paths.add(_absolute(path))

    @expose(policy=AllowParents())
    @arg_spec({"path": str})
    def register_prefix(self, path: str) -> None:
        """Let children fetch any file under the directory `path`."""
        self._prefixes.add(_absolute(path))

    def _is_registered(self, path: str, resolved: bool = False) -> bool:
        paths, prefixes = set(self._paths), set(self._prefixes)
        if resolved:
            paths = {os.path.realpath(p) for p in paths}
            prefixes = {os.path.realpath(p) for p in prefixes}
        return path in paths or _within(path, prefixes)

    def _open(self, path: Any, msg: Message | None) -> tuple[int, os.stat_result]:
        """Open `path` for the sender of `msg` if it may have it; else CallError saying why.

        Parents may read anything. Anyone else: an absolute path without ``..``, registered
        (or under a registered prefix) both as written and once opened, as the kernel
        resolved it (so a symbolic link cannot lead out), and a regular file.
        """
        if not isinstance(path, str) or not os.path.isabs(path) or "\0" in path:
            raise CallError("FileService serves absolute paths only, not %r", path)
        privileged = msg is None or mitogen.core.has_parent_authority(msg)
        if not privileged:
            if ".." in path.split("/"):
                raise CallError("path %r refused: it contains '..'", path)
            if not self._is_registered(os.path.normpath(path)):
                raise CallError(self.unregistered_msg, path)
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise CallError("%r is not a regular file", path)
            if not privileged:
                real = os.readlink("/proc/self/fd/%d" % (fd,))
                if not self._is_registered(real, resolved=True):
                    raise CallError("path %r refused: it resolves to %r, outside every "
                                    "registered path", path, real)
        except BaseException:
            os.close(fd)
            raise
        return fd, st

    @staticmethod
    def _metadata(st: os.stat_result) -> dict:
        return {
            "size": st.st_size,
            "mode": st.st_mode,
            "owner": _name_or_none("pwd", "getpwuid", st.st_uid, "pw_name"),
            "group": _name_or_none("grp", "getgrgid", st.st_gid, "gr_name"),
            "mtime": float(st.st_mtime),
            "atime": float(st.st_atime),
        }

    # --- the exposed methods

    @expose(policy=AllowAny())
    @arg_spec({"path": str})
    def stat(self, path: str, msg: Message) -> dict:
        """Metadata of a file the caller may fetch: size, mode, owner, group, mtime, atime."""
        fd, st = self._open(path, msg)
        os.close(fd)
        return self._metadata(st)

    @expose(policy=AllowAny())
    @arg_spec({"path": str, "sender": Sender})
    def fetch(self, path: str, sender: Sender, msg: Message) -> dict:
        """Start sending `path` to `sender`, which must be the caller's own; returns the
        file's metadata (see :meth:`stat`). The chunks go to `sender`, each answered with
        the number of bytes taken; a clean end is a dead message without a reason, a
        failure one that says why."""
        if msg.src_id != sender.context.context_id:
            raise CallError(self.context_mismatch_msg)
        fd, st = self._open(path, msg)
        stream = self.router.stream_by_id(sender.context.context_id)
        if stream is None:
            os.close(fd)
            raise CallError("no route to context %d", sender.context.context_id)
        transfer = _Transfer(self.router, fd, st, path, sender)
        with self._lock:
            if self._stopping:
                transfer.acks.close()
                os.close(fd)
                raise CallError("FileService is shutting down")
            queue = self._queues.setdefault(stream, [])
            if len(queue) >= self.max_queued_per_stream:
                transfer.acks.close()
                os.close(fd)
                raise CallError("FileService: %d transfers are already queued for the "
                                "stream to context %d", len(queue), sender.context.context_id)
            queue.append(transfer)
            start = len(queue) == 1
        if start:
            threading.Thread(target=self._pump, args=(stream,), daemon=True,
                             name="mitogen.FileService.%s" % (stream.name,)).start()
        return self._metadata(st)

    @expose(policy=AllowAny())
    @no_reply()
    @arg_spec({"size": int})
    def acknowledge(self, size: int, msg: Message) -> None:
        """Credit `size` bytes to the caller's transfer in progress (for receivers that
        acknowledge this way, as Mitogen's do, rather than by answering each chunk)."""
        stream = self.router.stream_by_id(msg.src_id)
        with self._lock:
            queue = self._queues.get(stream) or []
            mine = [t for t in queue if t.sender.context.context_id == msg.src_id]
        if mine:
            self.router.route(Message.pickled(size, dst_id=mitogen.context_id,
                                              src_id=msg.src_id, handle=mine[0].acks.handle))

    # --- sending

    def _pump(self, stream: Any) -> None:
        """Send the files queued for one stream, one after another, then end."""
        while True:
            with self._lock:
                queue = self._queues.get(stream)
                if not queue:
                    self._queues.pop(stream, None)
                    return
                transfer = queue[0]
            self._send(transfer)
            with self._lock:
                queue.remove(transfer)

    def _send(self, t: _Transfer) -> None:
        context, handle = t.sender.context, t.sender.dst_handle
        reason = None
        try:
            while t.offset < t.size and reason is None:
                while t.unacked >= self.window_size_bytes:
                    t.unacked -= min(t.unacked, _credit(t.acks.get()))
                if self._stopping:
                    reason = "FileService is shutting down"
                    break
                data = os.pread(t.fd, min(self.IO_SIZE, t.size - t.offset), t.offset)
                if not data:
                    reason = "%s was truncated while it was being sent (at %d of %d bytes)" % (
                        t.path, t.offset, t.size)
                    break
                _send_chunk(context, handle, data, t.acks.handle)
                t.offset += len(data)
                t.unacked += len(data)
            if reason is None:
                reason = t.changed()
            while reason is None and t.unacked:
                t.unacked -= min(t.unacked, _credit(t.acks.get()))
        except ChannelError as e:
            if self._stopping:
                reason = "FileService is shutting down"
            else:
                reason = "the receiver of %s went away: %s" % (t.path, e)
        except OSError as e:
            reason = "reading %s failed: %s" % (t.path, e)
        except mitogen.core.Error as e:  # the broker shut down: every link went with it
            LOG.debug("%r: sending %s stopped: %s", self, t.path, e)
            return
        except Exception as e:  # a bug: the receiver must still learn that nothing follows
            LOG.exception("%r: sending %s failed", self, t.path)
            reason = "sending %s failed: %s: %s" % (t.path, type(e).__name__, e)
        finally:
            t.acks.close()
            os.close(t.fd)
        try:
            if reason is None:
                t.sender.close()
            else:
                LOG.error("%r: %s", self, reason)
                context.send(Message.dead(reason, handle=handle))
        except mitogen.core.Error as e:  # as above: nobody is left to tell
            LOG.debug("%r: the end of %s was not sent: %s", self, t.path, e)

    def on_shutdown(self) -> None:
        """Fail every transfer still queued or running: each receiver learns why."""
        with self._lock:
            self._stopping = True
            transfers = [t for queue in self._queues.values() for t in queue]
        for t in transfers:
            t.acks.close()

    # --- receiving (in the context that fetches)

    @classmethod
    def get(cls, context: Context, path: str, out_fp: Any) -> tuple[bool, dict]:
        """Fetch `path` from the FileService of `context` into the binary file object
        `out_fp`. Returns ``(ok, metadata)``: `ok` is False when the transfer was cut short
        or the file changed meanwhile (the reason is logged), and then `out_fp` holds a
        partial file to be discarded. Errors before anything was sent (an unregistered path)
        raise CallError."""
        router = context.router
        # No via_stream: this thread reading the stream itself, message by message, costs
        # more in handing the reading back and forth than the broker's wake-ups do.
        recv = Receiver(router, respondent=context)
        received = 0
        failure = None
        try:
            metadata = context.call_service(cls.name(), "fetch", path=path,
                                            sender=recv.to_sender())
            while True:
                msg = recv.get(throw_dead=False)
                if msg.is_dead:
                    failure = bytes(msg.data).decode("utf-8", "replace") or None
                    break
                out_fp.write(msg.data)
                received += len(msg.data)
                if msg.reply_to:
                    msg.reply(len(msg.data))
        finally:
            recv.close()
        ok = failure is None and received == metadata["size"]
        if not ok:
            LOG.error("FileService.get(%r): %s (received %d of %d bytes)", path,
                      failure or "the transfer ended early", received, metadata["size"])
        return ok, metadata


def _absolute(path: str) -> str:
    if not path:
        raise CallError("an empty path cannot be registered")
    return os.path.normpath(os.path.abspath(path))


def _name_or_none(module: str, func: str, number: int, attr: str) -> str | None:
    try:
        return getattr(getattr(importlib.import_module(module), func)(number), attr)
    except (KeyError, ImportError):
        return None


class _Entry:
    """One file as a PushFileService holds it: complete (read from disk in the context that
    pushes it, or given as bytes), or arriving chunk by chunk from the parent. Readers of an
    arriving entry wait for each chunk, so a context forwards a chunk as soon as it has it."""

    def __init__(self, path: str, size: int, identity: tuple | None = None) -> None:
        self.path = path
        self.size = size
        self.identity = identity  # set when the file is read from disk, as it is needed
        self._cond = threading.Condition()
        self._chunks: list | None = []
        self._bounds: list[tuple[int, int]] = []
        self._data: bytes | None = None
        self.received = 0
        self.failed: str | None = None

    def __repr__(self) -> str:
        return "_Entry(%r, %d/%d)" % (self.path, self.received, self.size)

    @classmethod
    def from_bytes(cls, path: str, data: Any) -> _Entry:
        entry = cls(path, len(data))
        view = memoryview(bytes(data))
        for start in range(0, len(view), FILE_CHUNK):
            entry.add(view[start:start + FILE_CHUNK])
        return entry

    @property
    def complete(self) -> bool:
        return self.identity is not None or (self.received == self.size and not self.failed)

    def add(self, data: Any) -> None:
        with self._cond:
            if self.received + len(data) > self.size:
                self.failed = "%s: more bytes arrived than announced" % (self.path,)
            else:
                self._bounds.append((self.received, self.received + len(data)))
                self._chunks.append(data)  # type: ignore[union-attr]
                self.received += len(data)
            self._cond.notify_all()

    def fail(self, reason: str) -> None:
        with self._cond:
            if not self.complete and not self.failed:
                self.failed = reason
            self._cond.notify_all()

    def reader(self) -> Any:
        """Something whose ``chunk(i)`` returns chunk `i` (waiting for it to arrive) and
        whose ``close()`` ends the reading; both raise CallError when the entry failed or,
        for a file read from disk, the file changed."""
        if self.identity is None:
            return self
        return _DiskReader(self)

    def close(self, check: bool = True) -> None:
        pass

    def chunk(self, index: int) -> Any:
        with self._cond:
            while len(self._bounds) <= index and not self.failed:
                self._cond.wait()
            if self.failed:
                raise CallError(self.failed)
            if self._data is not None:
                start, end = self._bounds[index]
                return memoryview(self._data)[start:end]
            return self._chunks[index]  # type: ignore[index]

    def data(self) -> bytes:
        """The whole file (waiting for it). Joined once; the chunks are then dropped."""
        if self.identity is not None:
            with open(self.path, "rb") as f:
                return f.read()
        with self._cond:
            while not self.complete and not self.failed:
                self._cond.wait()
            if self.failed:
                raise CallError(self.failed)
            if self._data is None:
                self._data = b"".join(self._chunks)  # type: ignore[arg-type]
                self._chunks = None
            return self._data


class _DiskReader:
    """Reads a pushed file from disk chunk by chunk, failing if it is not the file that was
    announced (same inode, size and mtime) from the first chunk to the last."""

    def __init__(self, entry: _Entry) -> None:
        self.entry = entry
        self.fd = os.open(entry.path, os.O_RDONLY | os.O_CLOEXEC)
        self.closed = False
        if _identity(os.fstat(self.fd)) != entry.identity:
            self.close(check=False)
            raise CallError("%s changed since it was first pushed" % (entry.path,))

    def chunk(self, index: int) -> bytes:
        start = index * FILE_CHUNK
        wanted = min(FILE_CHUNK, self.entry.size - start)
        data = os.pread(self.fd, wanted, start)
        if len(data) != wanted:
            raise CallError("%s was truncated while it was being pushed" % (self.entry.path,))
        return data

    def close(self, check: bool = True) -> None:
        if self.closed:
            return
        try:
            if check and _identity(os.fstat(self.fd)) != self.entry.identity:
                raise CallError("%s changed while it was being pushed" % (self.entry.path,))
        finally:
            os.close(self.fd)
            self.closed = True


class PushFileService(Service):
    """Pushes files down the tree, storing them in every context they pass through.

    :meth:`propagate_to` in the context that has the file (the master, usually) sends it
    towards `context`: over each link at most once, to the next context on the way, which
    keeps it (in memory) and sends it on. A second destination behind the same link costs
    that link a small ``forward`` request, not the file. Chunks are forwarded as soon as they
    arrive, each link under its own flow-control window. In the destination,
    ``get(path)`` (a local call, e.g. through :func:`call`) waits for the file and returns it.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self._entries: dict[str, _Entry] = {}
        self._waiting: dict[str, list[Context]] = {}  # forward() before the file began
        self._sent: dict[Any, dict[str, _Entry]] = {}  # stream -> path -> entry sent on it
        self._extra_sys_paths: set[str] = set()

    def get(self, path: str) -> bytes:
        """The file pushed here as `path`, once it has arrived; CallError if its transfer
        failed."""
        with self._arrived:
            while path not in self._entries:
                self._arrived.wait()
            entry = self._entries[path]
        return entry.data()

    def _install(self, entry: _Entry) -> None:
        with self._arrived:
            self._entries[entry.path] = entry
            waiting = self._waiting.pop(entry.path, [])
            self._arrived.notify_all()
        for context in waiting:
            try:
                self._forward(entry, context)
            except CallError as e:
                LOG.error("%r: forwarding %s to %r failed: %s", self, entry.path, context, e)

    # --- the exposed methods

    @expose(policy=AllowParents())
    @arg_spec({"context": Context, "paths": list})
    def propagate_paths_and_modules(self, context: Context, paths: list,
                                    overridden_sources: dict | None = None,
                                    extra_sys_paths: list | None = None) -> None:
        """Push every path in `paths` to `context` (an entry of `overridden_sources` is sent
        instead of the file's content), and add `extra_sys_paths` to this context's
        ``sys.path``, as Mitogen does."""
        for path in paths:
            source = (overridden_sources or {}).get(path)
            self.propagate_to(context, path, source)
        for extra in extra_sys_paths or ():
            if extra not in self._extra_sys_paths:
                self._extra_sys_paths.add(extra)
                sys.path.append(extra)

    @expose(policy=AllowParents())
    @arg_spec({"context": Context, "path": str})
    def propagate_to(self, context: Context, path: str,
                     overridden_source: Any = None) -> None:
        """Send the file `path` (or `overridden_source`, bytes, in its place) towards
        `context`; returns once its first link is under way."""
        with self._lock:
            entry = self._entries.get(path)
        if overridden_source is not None:
            if isinstance(overridden_source, str):
                overridden_source = overridden_source.encode("utf-8")
            entry = _Entry.from_bytes(path, overridden_source)
            self._install(entry)
        elif entry is None or entry.identity is None or \
                entry.identity != _identity(os.stat(path)):
            st = os.stat(path)
            if not stat.S_ISREG(st.st_mode):
                raise CallError("%r is not a regular file", path)
            entry = _Entry(path, st.st_size, _identity(st))
            self._install(entry)
        self._forward(entry, context)

    @expose(policy=AllowParents())
    @no_reply()
    @arg_spec({"path": str, "data": bytes, "context": Context})
    def store_and_forward(self, path: str, data: bytes, context: Context) -> None:
        """Keep `data` as the file `path` here, and send it on towards `context`."""
        entry = _Entry.from_bytes(path, data)
        self._install(entry)
        self._forward(entry, context)

    @expose(policy=AllowParents())
    @no_reply()
    @arg_spec({"path": str, "context": Context})
    def forward(self, path: str, context: Context) -> None:
        """Send the file `path`, which is here or on its way here, on towards `context`."""
        with self._lock:
            entry = self._entries.get(path)
            if entry is None:
                self._waiting.setdefault(path, []).append(context)
                return
        self._forward(entry, context)

    @expose(policy=AllowParents())
    @arg_spec({"path": str, "size": int, "context": Context})
    def begin_store_and_forward(self, path: str, size: int, context: Context,
                                msg: Message) -> Sender:
        """The parent is about to send `size` bytes of the file `path`, destined for
        `context`: keep them here, forward them as they come. Returns the Sender the chunks
        go to (each answered with its byte count, for the sender's window)."""
        entry = _Entry(path, size)
        upstream = self.router.context_by_id(msg.src_id)
        handle = self.router.add_handler(lambda m: self._on_chunk(entry, m),
                                         respondent=upstream)
        if size == 0:
            self.router.del_handler(handle)
        self._install(entry)
        self._forward(entry, context)
        return Sender(self.router.myself(), handle)

    def _on_chunk(self, entry: _Entry, msg: Message) -> None:
        if msg.is_dead:
            reason = bytes(msg.data).decode("utf-8", "replace")
            entry.fail(reason or "%s: the sender stopped early" % (entry.path,))
        else:
            entry.add(msg.data)
            if msg.reply_to:
                msg.reply(len(msg.data))
        if entry.complete or entry.failed:
            self.router.del_handler(msg.handle)

    # --- sending towards a destination

    def _forward(self, entry: _Entry, context: Context) -> None:
        """Send `entry` one link further towards `context`, unless it already went (or is
        going) over that link: then only ask the next context to forward it."""
        if context.context_id == mitogen.context_id:
            return
        stream = self.router.stream_by_id(context.context_id)
        if stream is None or stream is self.router.parent_stream:
            raise CallError("context %d is not below context %d: files are pushed down the "
                            "tree only", context.context_id, mitogen.context_id)
        hop = self.router.context_by_id(stream.remote_id)
        with self._lock:
            sent = self._sent.get(stream)
            if sent is None:
                sent = self._sent[stream] = {}
                mitogen.core.listen(stream, "disconnect",
                                    lambda: self._forget_stream(stream))
            already = sent.get(entry.path) is entry
            sent[entry.path] = entry
        if not already:
            threading.Thread(target=self._push, args=(entry, hop, context, stream),
                             daemon=True, name="mitogen.PushFileService.%s" % (
                                 stream.name,)).start()
        elif hop.context_id != context.context_id:
            body = (self.name(), "forward", Kwargs(path=entry.path, context=context))
            hop.send(Message.pickled(body, handle=CALL_SERVICE))

    def _forget_stream(self, stream: Any) -> None:
        with self._lock:
            self._sent.pop(stream, None)

    def _push(self, entry: _Entry, hop: Context, context: Context, stream: Any) -> None:
        """Send `entry` over one link, to `hop`, on its way to `context`."""
        acks = Receiver(self.router, respondent=hop)
        sender: Any = None
        reader: Any = None
        try:
            # The hop first, so that a failure to read is always told downstream.
            sender = hop.call_service(self.name(), "begin_store_and_forward", path=entry.path,
                                      size=entry.size, context=context)
            reader = entry.reader()
            sent = unacked = index = 0
            while sent < entry.size:
                data = reader.chunk(index)
                index += 1
                while unacked >= FILE_WINDOW:
                    unacked -= min(unacked, _credit(acks.get()))
                _send_chunk(hop, sender.dst_handle, data, acks.handle)
                sent += len(data)
                unacked += len(data)
            reader, finished = None, reader
            finished.close()
            while unacked:
                unacked -= min(unacked, _credit(acks.get()))
        except Exception as e:  # whatever it was, the hop (and those below) must learn it
            if isinstance(e, (CallError, ChannelError, OSError)):
                LOG.error("%r: pushing %s to %r failed: %s", self, entry.path, hop, e)
            else:
                LOG.exception("%r: pushing %s to %r failed", self, entry.path, hop)
            with self._lock:
                if self._sent.get(stream, {}).get(entry.path) is entry:
                    del self._sent[stream][entry.path]
            if sender is not None:
                hop.send(Message.dead("%s: %s" % (entry.path, e), handle=sender.dst_handle))
        finally:
            acks.close()
            if reader is not None:
                reader.close(check=False)
