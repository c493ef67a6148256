"""Wait on many receivers at once: scatter a call to many contexts, gather as results arrive.

A Select owns the ``notify`` hook of each receiver (or latch, or nested Select) added to it:
every arrival queues the receiver itself in the Select's own latch, and get() then takes one
message from whichever receiver is first in line. Nothing is copied and no thread is added.
"""

from __future__ import annotations

from typing import Any, AsyncIterator, Iterator

import mitogen.core

__all__ = ["Error", "Event", "Select"]


class Error(mitogen.core.Error):
    """A Select was misused: no receivers, a receiver added twice, or a cycle."""


class Event:
    """What get_event() returns: `source` is the receiver, latch or Select that produced
    `data` (a Message for receivers, the item for latches)."""

    source: Any = None
    data: Any = None

    def __repr__(self) -> str:
        return "Event(%r, %r)" % (self.source, self.data)


class Select:
    """Wait for the first message from any of `receivers`.

    With ``oneshot=True`` (the default) a receiver is removed once it has produced a message,
    which suits collecting exactly one result per call; iterating then stops by itself.
    """

    notify: Any = None
    empty_msg = "the Select has no receivers to wait on"
    loop_msg = "adding %r to %r would create a cycle"
    owned_msg = "%r is already being watched (by another Select?)"
    not_present_msg = "%r is not in %r"

    def __init__(self, receivers: Any = (), oneshot: bool = True) -> None:
        self._receivers: list[Any] = []
        self._oneshot = oneshot
        self._latch = mitogen.core.Latch()
        for recv in receivers:
            self.add(recv)

    @classmethod
    def all(cls, receivers: Any) -> list:
        """Wait for every receiver; return their unpickled results in arrival order, raising
        the first CallError met."""
        return [msg.unpickle() for msg in cls(receivers)]

    def __repr__(self) -> str:
        return "Select(%r)" % (self._receivers,)

    def __bool__(self) -> bool:
        return bool(self._receivers)

    def __enter__(self) -> Select:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __iter__(self) -> Iterator[Any]:
        while self._receivers:
            yield self.get()

    def __aiter__(self) -> AsyncIterator[Any]:
        """``async for msg in select``: as ``for``, from an asyncio loop (mitogen.aio)."""
        import mitogen.aio

        return mitogen.aio.iterate(self)

    def iter_data(self) -> Iterator[Any]:
        while self._receivers:
            yield self.get_event().data

    def iter_events(self) -> Iterator[Event]:
        while self._receivers:
            yield self.get_event()

    def _put(self, source: Any) -> None:
        self._latch.put(source)
        if self.notify is not None:
            self.notify(self)

    def _contains(self, other: Select) -> bool:
        return other is self or any(isinstance(r, Select) and r._contains(other)
                                    for r in self._receivers)

    def add(self, recv: Any) -> None:
        """Watch a Receiver, a Latch or another Select."""
        if isinstance(recv, Select) and recv._contains(self):
            raise Error(self.loop_msg, recv, self)
        if recv.notify is not None:
            raise Error(self.owned_msg, recv)
        self._receivers.append(recv)
        recv.notify = self._put
        for _ in range(recv.size()):
            self._put(recv)

    def remove(self, recv: Any) -> None:
        try:
            self._receivers.remove(recv)
        except ValueError:
            raise Error(self.not_present_msg, recv, self) from None
        recv.notify = None

    def close(self) -> None:
        """Stop watching every receiver (they stay open: they belong to the caller)."""
        for recv in list(self._receivers):
            self.remove(recv)
        self._latch.close()

    def size(self) -> int:
        return sum(recv.size() for recv in self._receivers)

    def empty(self) -> bool:
        return self._latch.empty()

    def get(self, timeout: float | None = None, block: bool = True) -> Any:
        return self.get_event(timeout, block).data

    def get_event(self, timeout: float | None = None, block: bool = True) -> Event:
        if not self._receivers:
            raise Error(self.empty_msg)
        deadline = None if timeout is None else mitogen.core.now() + timeout
        while True:
            remaining = None if deadline is None else max(0.0, deadline - mitogen.core.now())
            source = self._latch.get(timeout=remaining, block=block)
            event = Event()
            event.source = source
            try:
                if isinstance(source, Select):
                    event.data = source.get_event(block=False).data
                else:
                    event.data = source.get(block=False)
            except mitogen.core.TimeoutError:
                continue  # its item was taken directly by someone else: wait for the next
            if self._oneshot and source in self._receivers:
                self.remove(source)
            if isinstance(source, mitogen.core.Receiver):
                event.data.receiver = source
            return event
