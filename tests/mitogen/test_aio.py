"""mitogen.aio: awaiting calls and messages from an asyncio event loop, no thread each."""

from __future__ import annotations

import asyncio
import os
import threading

import pytest

import mitogen.aio
import mitogen.core
import mitogen.select
from tests.support import funcs


def test_acall_returns_results_and_raises_call_errors(router, local):
    async def main():
        assert await local.acall(funcs.add, 2, 3) == 5
        assert await mitogen.aio.call(local, funcs.identity, b"x") == b"x"
        with pytest.raises(mitogen.core.CallError, match="ValueError: no"):
            await local.acall(funcs.fail, "no")

    asyncio.run(main())


def test_many_pending_calls_need_no_thread_each(router):
    contexts = [router.local() for _ in range(4)]
    threads_before = threading.active_count()
    peak = []

    async def one(context, i):
        peak.append(threading.active_count())
        return await context.acall(funcs.add, i, 1)

    async def main():
        return await asyncio.gather(*[one(c, i) for i in range(100) for c in contexts])

    results = asyncio.run(main())
    assert sorted(results) == sorted(i + 1 for i in range(100) for _ in contexts)
    assert max(peak) == threads_before  # 400 calls in flight, not one thread more


def test_async_for_over_a_receiver_ends_when_the_channel_closes(router):
    recv = mitogen.core.Receiver(router)
    sender = recv.to_sender()

    async def main():
        loop = asyncio.get_running_loop()
        # Sent from another thread while the loop waits: the wake-up crosses threads.
        loop.call_later(0.01, lambda: threading.Thread(target=produce).start())
        return [msg.unpickle() async for msg in recv]

    def produce():
        for i in range(5):
            sender.send(i)
        sender.close()

    assert asyncio.run(main()) == [0, 1, 2, 3, 4]
    recv.close()


def test_async_for_over_a_select_gathers_from_many_contexts(router):
    contexts = [router.local() for _ in range(3)]

    async def main():
        select = mitogen.select.Select(c.call_async(os.getpid) for c in contexts)
        return sorted([msg.unpickle() async for msg in select])

    pids = asyncio.run(main())
    assert pids == sorted(c.call(os.getpid) for c in contexts)


def test_get_awaits_one_message_and_notices_a_closed_receiver(router):
    recv = mitogen.core.Receiver(router)

    async def main():
        recv.to_sender().send("first")
        assert (await mitogen.aio.get(recv)).unpickle() == "first"
        # recv.close looked up when called: a wait that is under way wraps it.
        asyncio.get_running_loop().call_soon(lambda: recv.close())  # noqa: PLW0108
        with pytest.raises(mitogen.core.ChannelError):
            await mitogen.aio.get(recv)

    asyncio.run(main())


def test_cancelling_a_call_forgets_its_reply(router, local):
    async def main():
        recv_count = len(router._handle_map)
        task = asyncio.ensure_future(local.acall(funcs.sleep_then_return, 0.3, "late"))
        await asyncio.sleep(0)  # let it send the call and start waiting
        assert len(router._handle_map) == recv_count + 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert len(router._handle_map) == recv_count  # the reply's handle is gone
        # The context finishes the call; its reply is dropped, the next call is answered.
        assert await local.acall(funcs.add, 1, 1) == 2

    asyncio.run(main())


def test_a_receiver_waited_on_by_two_is_refused(router):
    recv = mitogen.core.Receiver(router)

    async def main():
        first = asyncio.ensure_future(mitogen.aio.get(recv))
        await asyncio.sleep(0)
        with pytest.raises(mitogen.core.Error, match="already has a notify callback"):
            await mitogen.aio.get(recv)
        recv.to_sender().send(1)
        assert (await first).unpickle() == 1

    asyncio.run(main())
    recv.close()
