"""asyncio's face: await calls and messages from an event loop, with no thread per call.

``await ctx.acall(fn, *args)`` (or ``await mitogen.aio.call(ctx, fn, *args)``) is
``ctx.call()`` for a coroutine; ``await mitogen.aio.get(receiver)`` waits for one message;
``async for msg in receiver`` and ``async for msg in select`` iterate as their ``for``
loops do. Any number of these may be pending on one loop at once.

Nothing blocks and no thread waits: the object waited on (a :class:`mitogen.core.Receiver`,
``Latch`` or :class:`mitogen.select.Select`) gets a ``notify`` callback, run by whichever
thread queued a message for it (the broker, usually), which only schedules a wake-up on the
loop (``call_soon_threadsafe``); the coroutine then takes the message without blocking.
Cancelling a waiting coroutine closes its receiver: the reply, when it comes, is dropped.
Closing a receiver (``recv.close()``) while a coroutine waits on it ends the wait with
ChannelError, as it does for a thread in ``recv.get()``. Mitogen has no such face (its
issue #452).
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Callable

import mitogen.core

__all__ = ["call", "get", "iterate"]


class _Wakeups:
    """Turns a source's ``notify`` callbacks, on any thread, into wake-ups on `loop`; and
    its ``close()`` too, which queues nothing (so calls no ``notify``) but must end a wait."""

    def __init__(self, source: Any, loop: asyncio.AbstractEventLoop) -> None:
        if source.notify is not None:
            raise mitogen.core.Error("%r already has a notify callback (is it in a Select?)",
                                     source)
        self.source = source
        self.loop = loop
        self._future: asyncio.Future | None = None
        self._close = source.close
        source.notify = self._notified
        source.close = self._closed

    def _closed(self) -> None:
        try:
            self._close()
        finally:
            self._notified(self.source)

    def _notified(self, _source: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self._wake)
        except RuntimeError:
            pass  # the loop is closed: nobody is waiting any more

    def _wake(self) -> None:
        if self._future is not None and not self._future.done():
            self._future.set_result(None)

    async def take(self, attempt: Callable[[], Any]) -> Any:
        """``attempt()`` (a non-blocking get) once it stops raising TimeoutError."""
        while True:
            try:
                return attempt()
            except mitogen.core.TimeoutError:
                pass
            # Set before awaiting, on the loop's thread: a wake-up scheduled by a message
            # that arrived after the attempt runs only once this coroutine is suspended.
            self._future = self.loop.create_future()
            try:
                await self._future
            finally:
                self._future = None

    def close(self) -> None:
        if self.source.notify == self._notified:
            self.source.notify = None
        if vars(self.source).get("close") == self._closed:
            del self.source.close


async def get(recv: mitogen.core.Receiver, throw_dead: bool = True) -> mitogen.core.Message:
    """The next message of `recv`, as ``recv.get()`` returns it, without blocking the
    loop; ChannelError if `recv` is closed, or with `throw_dead` if the message is dead."""
    wakeups = _Wakeups(recv, asyncio.get_running_loop())
    try:
        return await wakeups.take(lambda: recv.get(block=False, throw_dead=throw_dead))
    finally:
        wakeups.close()


async def call(context: mitogen.core.Context, fn: Callable[..., Any], *args: Any,
               **kwargs: Any) -> Any:
    """``context.call(fn, *args, **kwargs)`` for a coroutine: the result, or CallError.
    Cancelled, it forgets the call: the function still runs there, its reply is dropped."""
    recv = context.call_async(fn, *args, **kwargs)
    try:
        msg = await get(recv)
        return msg.unpickle()
    finally:
        recv.close()


async def iterate(source: Any) -> AsyncIterator[Any]:
    """``async for`` over a Receiver (its messages, until the channel is closed) or a
    Select (its messages, until no receiver is left), as their ``for`` loops."""
    import mitogen.select

    is_select = isinstance(source, mitogen.select.Select)
    wakeups = _Wakeups(source, asyncio.get_running_loop())
    try:
        while True:
            if is_select:
                if not source:
                    return
                yield await wakeups.take(lambda: source.get(block=False))
                continue
            try:
                msg = await wakeups.take(lambda: source.get(block=False, throw_dead=False))
            except mitogen.core.ChannelError:
                return
            if msg.is_dead:
                return
            yield msg
    finally:
        wakeups.close()
