"""Behaviours of the runtime found while building and running the fault campaigns
(simulator/campaign.py), kept as reproductions until they are fixed: each test states what
Mitogen 0.3 does and fails (strict xfail) while we do otherwise."""

from __future__ import annotations

import pytest

from tests.support import findings


@pytest.mark.xfail(strict=True, reason=(
    "a leaf context cannot unpickle a sibling's message in an add_handler() handler: "
    "mitogen.guard is imported on first use, and the broker thread, where handlers run, "
    "may not fetch it from the parent (ImportError: mitogen.guard cannot be fetched on "
    "the broker thread); Mitogen 0.3 runs such handlers. simulator/probes.py imports "
    "mitogen.guard by hand to work around it"))
def test_a_handler_in_a_leaf_unpickles_a_message_from_a_sibling(router):
    receiver = router.local(name="leaf")
    sibling = router.local(name="sibling")
    sender = receiver.call(findings.open_handler)
    assert sibling.call(findings.send, sender, {"hello": "sibling"}) is True
    assert receiver.call(findings.what_arrived) == [("ok", {"hello": "sibling"})]
