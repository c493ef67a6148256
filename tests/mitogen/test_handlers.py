"""add_handler() handlers run on the broker thread, which never imports: a pickle from a
context without parent authority still reaches them, checked by mitogen.guard, which a leaf
fetches on a thread of its own the first time such a message comes (found by the fault
campaigns' probes)."""

from __future__ import annotations

from tests.support import handlers


def test_a_handler_in_a_leaf_unpickles_messages_from_a_sibling_in_order(router):
    receiver = router.local(name="leaf")
    sibling = router.local(name="sibling")
    sender = receiver.call(handlers.open_handler)
    assert receiver.call(handlers.guard_loaded) is False
    values = [{"n": n} for n in range(20)]
    assert sibling.call(handlers.send, sender, values) is True
    assert receiver.call(handlers.what_arrived, len(values)) == [("ok", v) for v in values]
    assert receiver.call(handlers.guard_loaded) is True

