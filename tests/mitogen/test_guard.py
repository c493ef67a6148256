"""What a pickle from a context without authority over this one may cost: mitogen.guard and the
restricted unpickler's constructors, without any IO."""

from __future__ import annotations

import pickle
import random
import struct

import pytest

import mitogen.core
import mitogen.guard
from mitogen.core import Message, StreamError
from tests.support.fuzzing import SEEDS, mutate, peak_allocated

#: An ID that is neither this process nor one of its parents: the message comes from below.
STRANGER = 4242


def untrusted(data: bytes) -> Message:
    return Message(data=data, auth_id=STRANGER, src_id=STRANGER)


def refused(data: bytes) -> str:
    """Unpickle `data` as if from below; it must be refused. Returns the error text."""
    with pytest.raises(StreamError) as info:
        untrusted(data).unpickle()
    return str(info.value)


PROTO = b"\x80\x04"


def test_plain_values_from_below_still_load():
    value = {"a": [1, 2.5, None, True, -(10**30)], "b": (b"x" * 1000, "y\u20ac\U0001f600"),
             "c": {1, 2}, "d": frozenset([3]), "e": bytearray(b"z" * 100), "f": 1 + 2j,
             "g": mitogen.core.Blob(b"b" * 500), "h": mitogen.core.Secret("s"),
             "i": mitogen.core.Kwargs(k=1), "j": range(0, 10, 2), "k": [b"a", b"a"]}
    assert untrusted(pickle.dumps(value, 4)).unpickle() == value
    err = untrusted(pickle.dumps(mitogen.core.CallError("boom"), 4)).unpickle(throw=False)
    assert isinstance(err, mitogen.core.CallError) and str(err) == "boom"


def test_memo_index_bombs_are_refused_before_any_allocation():
    # LONG_BINPUT 0x7fffffff and text PUT with a huge index: CPython would grow its memo to it.
    for bomb in (PROTO + b"]r\xff\xff\xff\x7f.", b"]p99999999999\n.", b"]replace."):
        used = peak_allocated(lambda bomb=bomb: refused(bomb))
        assert used < 1 << 20, (bomb, used)
    assert "opcode 0x72" in refused(PROTO + b"]r\xff\xff\xff\x7f.")


@pytest.mark.parametrize("bomb, why", [
    # Constructors given a size instead of the bytes a real pickle holds.
    (PROTO + b"\x8c\x08builtins\x8c\tbytearray\x93J\x00\x00\x00\x10\x85R.", "bytearray"),
    (PROTO + b"\x8c\x0cmitogen.core\x8c\x04Blob\x93J\x00\x00\x00\x10\x85R.", "Blob"),
    # A CallError whose format string has a huge width (Error() would %-format it).
    (PROTO + b"\x8c\x0cmitogen.core\x8c\tCallError\x93\x8c\x0b%999999999s\x8c\x01x\x86R.",
     "CallError"),
    # frozenset(range(N)) and set(range(N)): sets need no constructor in protocol 4.
    (PROTO + b"\x8c\x08builtins\x8c\tfrozenset\x93\x8c\x08builtins\x8c\x05range\x93"
     b"K\x00J\x00\x00\x00\x10K\x01\x87R\x85R.", "frozenset"),
])
def test_constructor_bombs_are_refused_cheaply(bomb, why):
    used = peak_allocated(lambda: refused(bomb))
    assert used < 1 << 20, used
    assert why in refused(bomb)


def test_constructor_refusals_hold_without_the_guard_too():
    """The unpickler's own checks, for messages from parents that the guard does not see."""
    blob_of_size = PROTO + b"\x8c\x0cmitogen.core\x8c\x04Blob\x93J\x00\x00\x00\x10\x85R."
    with pytest.raises(StreamError, match="unexpected arguments"):
        Message(data=blob_of_size).unpickle()
    big = b"B" + struct.pack("<I", 1000) + b"x" * 1000
    twice = (PROTO + b"\x8c\x0cmitogen.core\x8c\x04Blob\x93\x94" + big + b"\x94\x85R"
             + b"h\x00h\x01\x85R\x86.")
    with pytest.raises(StreamError, match="used twice"):
        Message(data=twice).unpickle()


def test_build_cannot_set_the_state_of_a_context_or_a_message_type():
    context = pickle.dumps(mitogen.core.Context(None, 7, "seven"), 4)[:-1]
    forged = context + b"}\x8c\ncontext_id\x94K\x00sb."
    with pytest.raises(StreamError, match="state cannot be set"):
        Message(data=forged).unpickle()  # even from a parent
    assert "opcode 0x62" in refused(forged)


def test_claimed_lengths_must_lie_within_the_pickle():
    # BINBYTES8 claiming 64 GiB: the C unpickler would allocate it before reading.
    assert "past the end" in refused(PROTO + b"\x8e" + struct.pack("<Q", 64 << 30) + b"ab.")
    assert "no STOP" in refused(PROTO + b"N")


def test_expansion_is_bounded_and_stated():
    """Every opcode costs at most EXPANSION bytes per byte received beyond SLACK: an
    empty-set flood, the worst ratio protocol 4 offers, is refused at that bound."""
    flood = PROTO + b"(" + b"\x8f" * 100_000 + b"l."
    text = refused(flood)
    assert "limit is %d x its size" % mitogen.guard.EXPANSION in text
    small_flood = PROTO + b"(" + b"\x8f" * 200 + b"l."  # under SLACK: accepted
    assert len(untrusted(small_flood).unpickle()) == 200


@pytest.mark.parametrize("value", [
    list(range(100_000)), {str(i): i for i in range(20_000)},
    [("x%d" % i, 2.5, None) for i in range(20_000)], b"y" * (1 << 20),
    ["\U0001f600" * 50] * 2_000,
])
def test_estimate_is_an_upper_bound_of_real_memory(value):
    data = pickle.dumps(value, 4)
    estimate = mitogen.guard.estimate(data)
    used = peak_allocated(lambda: pickle.loads(data))
    assert used <= estimate, (used, estimate)
    mitogen.guard.check_pickle(data)  # and real data of these shapes is accepted


def test_fuzzed_pickles_from_below_fail_cleanly_and_cheaply():
    """20,000 mutated pickles from a fixed seed (about 2 s): each loads or is refused with
    StreamError (or is a CallError), and memory never grows past a few MiB."""
    rng = random.Random(1312)
    outcomes = {"loaded": 0, "refused": 0}

    def run():
        for i in range(20_000):
            data = mutate(rng, SEEDS[i % len(SEEDS)])
            try:
                untrusted(data).unpickle(throw=False)
                outcomes["loaded"] += 1
            except StreamError:
                outcomes["refused"] += 1

    used = peak_allocated(run)
    assert used < 8 << 20, used
    assert outcomes["loaded"] > 100 and outcomes["refused"] > 1000, outcomes
