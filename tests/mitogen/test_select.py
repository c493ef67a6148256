"""mitogen.select.Select: gathering results from many contexts."""

from __future__ import annotations

import os

import pytest

import mitogen.core
import mitogen.select
from tests.support import funcs


def test_select_all_gathers_every_result(router):
    children = [router.local() for _ in range(3)]
    pids = mitogen.select.Select.all(c.call_async(os.getpid) for c in children)
    assert sorted(pids) == sorted(c.call(os.getpid) for c in children)


def test_iteration_yields_each_message_once_with_its_receiver(router):
    child = router.local()
    receivers = [child.call_async(funcs.add, i, 0) for i in range(5)]
    seen = {}
    with mitogen.select.Select(receivers) as select:
        for msg in select:
            seen[receivers.index(msg.receiver)] = msg.unpickle()
    assert seen == {i: i for i in range(5)}


def test_latches_and_nested_selects():
    latch = mitogen.core.Latch()
    inner_latch = mitogen.core.Latch()
    inner = mitogen.select.Select([inner_latch])
    outer = mitogen.select.Select([latch, inner], oneshot=False)
    inner_latch.put("inner")
    latch.put("outer")
    got = {outer.get(timeout=5), outer.get(timeout=5)}
    assert got == {"inner", "outer"}
    with pytest.raises(mitogen.select.Error, match="cycle"):
        inner.add(outer)
    with pytest.raises(mitogen.core.TimeoutError):
        outer.get(timeout=0.01)


def test_errors_are_clear():
    with pytest.raises(mitogen.select.Error, match="no receivers"):
        mitogen.select.Select().get(block=False)
    latch = mitogen.core.Latch()
    mitogen.select.Select([latch])
    with pytest.raises(mitogen.select.Error, match="already being watched"):
        mitogen.select.Select([latch])
