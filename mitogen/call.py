"""Function calls into other contexts: :class:`CallChain`, behind ``Context.call()``.

Kept out of :mod:`mitogen.core` because a child does not need it to start: a child that
calls another context fetches this module on its first call, like any other. Also exported
as ``mitogen.parent.CallChain``, where Mitogen documents it.
"""

from __future__ import annotations

import itertools
import os
import socket
import threading
import types
from typing import Any, Callable

import mitogen.core
from mitogen.core import CALL_FUNCTION, Message

__all__ = ["CallChain", "CallSpec"]


class CallSpec:
    """A call, printed as ``module.function(args, key=value)`` (for a log line: formatted
    only when the line is written). Mind secrets among the arguments."""

    def __init__(self, func: Callable[..., Any], args: tuple, kwargs: dict) -> None:
        self.func = func
        self.args = args
        self.kwargs = kwargs

    def __str__(self) -> str:
        owner = getattr(self.func, '__self__', None)
        name = getattr(self.func, '__qualname__', None) or getattr(self.func, '__name__', '?')
        if isinstance(owner, type):
            name = '%s.%s' % (owner.__qualname__, self.func.__name__)
        words = [repr(a) for a in self.args]
        words += ['%s=%r' % item for item in sorted(self.kwargs.items())]
        return '%s.%s(%s)' % (getattr(self.func, '__module__', '?'), name, ', '.join(words))

    __repr__ = __str__


#: (module, class path, name) of the functions called so far, for the next call.
_described: dict = {}


class CallChain:
    """Issues function calls to one context; optionally pipelined.

    With ``pipelined=True`` every call carries this chain's ID: once one call fails, the
    target refuses the rest of the chain with the same error without running them, so a caller
    may send a sequence of dependent calls without waiting for each.
    """

    _counter = itertools.count(1)
    chain_id: str | None

    lambda_msg = ("cannot call a lambda in another context: it has no importable name; "
                  "define it at module level instead")
    closures_msg = ("cannot call a closure in another context: the variables it captures "
                    "cannot be sent; define it at module level and pass them as arguments")
    method_msg = ("cannot call a bound instance method in another context: its instance "
                  "cannot be sent; use a module-level function, a classmethod or a "
                  "staticmethod")

    def __init__(self, context: mitogen.core.Context, pipelined: bool = False) -> None:
        self.context = context
        self.chain_id = self.make_chain_id() if pipelined else None

    @classmethod
    def make_chain_id(cls) -> str:
        return '%s-%d-%x-%x' % (socket.gethostname(), os.getpid(), threading.get_ident(),
                                next(cls._counter))

    def __repr__(self) -> str:
        return 'CallChain(%r, %r)' % (self.context, self.chain_id)

    def __enter__(self) -> CallChain:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget a failure: later calls of this chain run again."""
        if self.chain_id is None:
            return
        saved, self.chain_id = self.chain_id, self.make_chain_id()
        self.context.call_no_reply(mitogen.core.Dispatcher.forget_chain, saved)

    @staticmethod
    def _describe(fn: Callable[..., Any]) -> tuple[str, str | None, str]:
        """(module, class path, function name) naming `fn` so the target can import it."""
        if getattr(fn, '__name__', None) == '<lambda>':
            raise TypeError(CallChain.lambda_msg)
        if getattr(fn, '__closure__', None):
            raise TypeError(CallChain.closures_msg)
        owner = getattr(fn, '__self__', None)
        if isinstance(fn, types.MethodType) and not isinstance(owner, type):
            raise TypeError(CallChain.method_msg)
        if isinstance(owner, type):
            return owner.__module__, owner.__qualname__, fn.__name__
        qualname = getattr(fn, '__qualname__', fn.__name__)
        if '<locals>' in qualname:
            raise TypeError('cannot call %s in another context: it is defined inside '
                            'another function, so it cannot be imported there' % qualname)
        module = fn.__module__
        if module is None and isinstance(owner, types.ModuleType):
            module = owner.__name__
        klass, _, name = qualname.rpartition('.')
        return module, klass or None, name

    def make_msg(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Message:
        try:
            module, klass, name = _described[fn]
        except (KeyError, TypeError):  # TypeError: an unhashable callable
            module, klass, name = self._describe(fn)
            if len(_described) < 4096:
                _described[fn] = module, klass, name
        # A plain dict, not Kwargs: pickling a dict subclass costs five times as much, and
        # the target only ever unpacks it.
        return Message.pickled((self.chain_id, module, klass, name, args, kwargs),
                               handle=CALL_FUNCTION)

    def call_no_reply(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Run `fn` remotely without waiting; a failure is only logged by the target."""
        self.context.send(self.make_msg(fn, *args, **kwargs))

    def call_async(self, fn: Callable[..., Any], *args: Any,
                   **kwargs: Any) -> mitogen.core.Receiver:
        """Start `fn` remotely; returns a Receiver whose get().unpickle() is the result."""
        return self.context.send_async(self.make_msg(fn, *args, **kwargs))

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run ``fn(*args, **kwargs)`` remotely and return its result, or raise CallError."""
        recv, lease = self.context._send_and_lease(self.make_msg(fn, *args, **kwargs))
        try:
            return recv.get(lease=lease).unpickle()
        finally:
            recv.close()
