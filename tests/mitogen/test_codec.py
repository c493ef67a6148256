"""The frame codec and the restricted unpickler, without any IO."""

from __future__ import annotations

import os
import pickle
import random
import struct

import pytest

import mitogen.core
import mitogen.parent
from mitogen.core import HEADER_LEN, Decoder, Message


def make(data=b"hello", **kw):
    fields = {"dst_id": 1, "src_id": 2, "auth_id": 3, "handle": 101, "reply_to": 1000}
    fields.update(kw)
    return Message(data=data, **fields)


def test_header_is_the_seeds_big_endian_layout():
    frame = make(b"xyz", enc=mitogen.core.ENC_BIN).pack()
    assert len(frame) == 26 + 3
    assert struct.unpack(">HIIIIII", frame[:26]) == (0x4D4B, 1, 2, 3, 101, 1000, 3)


def test_round_trip_in_arbitrary_chunks():
    msgs = [make(os.urandom(n)) for n in (0, 1, 25, 26, 27, 1000, 300_000, 5)]
    stream = b"".join(m.pack() for m in msgs)
    rng = random.Random(1)
    decoder = Decoder(max_message_size=1 << 20)
    out = []
    pos = 0
    while pos < len(stream):
        step = rng.randint(1, 70_000)
        decoder.feed(stream[pos:pos + step])
        pos += step
        while (msg := decoder.next_message()) is not None:
            out.append(msg)
    assert [bytes(m.data) for m in out] == [m.data for m in msgs]
    assert [(m.dst_id, m.src_id, m.auth_id, m.handle, m.reply_to) for m in out] == \
        [(1, 2, 3, 101, 1000)] * len(msgs)
    assert not decoder.pending


def test_big_body_can_be_read_into_directly():
    body = os.urandom(1 << 20)
    frame = make(body).pack()
    decoder = Decoder(max_message_size=1 << 21)
    decoder.feed(frame[:100])
    assert decoder.next_message() is None
    pos = 100
    while (target := decoder.read_target()) is not None and pos < len(frame):
        n = len(target)
        target[:] = frame[pos:pos + n]
        target.release()
        decoder.advance(n)
        pos += n
    assert pos == len(frame)
    assert bytes(decoder.next_message().data) == body


def test_big_body_buffer_grows_with_what_arrives_not_what_the_header_claims():
    claimed = 128 << 20
    step = Decoder.HEAP_BODY
    decoder = Decoder(max_message_size=claimed)
    decoder.feed(make(b"").pack_header()[:-4] + claimed.to_bytes(4, "big") + b"x" * 1000)
    assert decoder.next_message() is None
    assert len(decoder._body) == step  # all a stalled header costs
    decoder.feed(b"y" * step)
    assert len(decoder._body) == 2 * step
    decoder.feed(b"z" * (4 * step))
    assert len(decoder._body) == 8 * step  # at most twice what arrived


def test_a_body_up_to_the_heap_bound_is_allocated_whole():
    body = b"b" * Decoder.HEAP_BODY
    frame = make(body).pack()
    decoder = Decoder(max_message_size=1 << 30)
    decoder.feed(frame[:HEADER_LEN + 10])
    assert decoder.next_message() is None
    assert type(decoder._body) is bytearray and len(decoder._body) == len(body)
    decoder.feed(frame[HEADER_LEN + 10:])
    assert bytes(decoder.next_message().data) == body


def test_oversize_frame_is_skipped_and_reported_without_buffering():
    decoder = Decoder(max_message_size=100)
    big = make(b"x" * 5000)
    small = make(b"after")
    decoder.feed(big.pack() + small.pack())
    first = decoder.next_message()
    assert first.oversize == 5000 and first.data == b"" and first.reply_to == 1000
    assert decoder.next_message().data == b"after"
    assert len(decoder._buf) == 0


def test_corrupt_magic_raises_and_truncation_is_visible():
    decoder = Decoder(max_message_size=100)
    decoder.feed(b"\x00" * 26)
    with pytest.raises(mitogen.core.CorruptFrameError, match="magic"):
        decoder.next_message()
    decoder = Decoder(max_message_size=100)
    decoder.feed(make(b"abcdef").pack()[:-2])
    assert decoder.next_message() is None
    assert decoder.pending


def test_fuzzed_garbage_never_raises_anything_but_corrupt_frame():
    rng = random.Random(7)
    for _ in range(300):
        decoder = Decoder(max_message_size=4096)
        decoder.feed(bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 200))))
        try:
            while decoder.next_message() is not None:
                pass
        except mitogen.core.CorruptFrameError:
            pass


def test_pickled_plain_types_and_mitogen_types_round_trip():
    value = {"a": [1, 2.5, None, True], "b": (b"x", "y"), "c": {1, 2}, "d": frozenset([3]),
             "e": bytearray(b"z"), "f": 1 + 2j, "g": mitogen.core.Blob(b"b"),
             "h": mitogen.core.Secret("s"), "i": mitogen.core.Kwargs(k=1)}
    msg = Message.pickled(value)
    assert msg.unpickle() == value
    assert repr(mitogen.core.Secret("hunter2")) == "[secret]"
    assert repr(mitogen.core.Blob(b"abc")) == "[blob: 3 bytes]"


class Evil:
    ran = False

    def __reduce__(self):
        return (os.system, ("true",))


def test_unpickler_refuses_other_globals_naming_them_without_calling():
    data = pickle.dumps(Evil(), protocol=4)
    msg = Message(data=data)
    with pytest.raises(mitogen.core.StreamError, match=r"refused to unpickle (posix|os)\.system"):
        msg.unpickle()
    msg = Message(data=pickle.dumps(Evil, protocol=4))
    with pytest.raises(mitogen.core.StreamError, match=r"refused to unpickle tests\.mitogen"):
        msg.unpickle()


def test_call_error_carries_type_and_traceback_and_is_bounded():
    try:
        raise KeyError("k" * 200_000)
    except KeyError as e:
        err = mitogen.core.CallError(e)
    assert err.type_name == "builtins.KeyError"
    assert len(str(err)) <= mitogen.core.MAX_CALL_ERROR + 100
    copy = Message.pickled(err).unpickle(throw=False)
    assert isinstance(copy, mitogen.core.CallError) and str(copy) == str(err)


def test_errors_are_defined_once_with_the_builtin_timeout():
    assert issubclass(mitogen.core.TimeoutError, TimeoutError)
    assert issubclass(mitogen.core.TimeoutError, mitogen.core.Error)
    assert str(mitogen.core.Error("a %s %d", "b", 1)) == "a b 1"
    assert issubclass(mitogen.parent.EofError, mitogen.core.StreamError)
    assert issubclass(mitogen.parent.CancelledError, mitogen.core.StreamError)


def test_dead_message_unpickles_to_channel_error_with_reason():
    msg = Message.dead("because", src_id=5)
    assert msg.is_dead
    with pytest.raises(mitogen.core.ChannelError, match="because"):
        msg.unpickle()


def test_standard_handles_match_mitogen():
    c = mitogen.core
    assert (c.GET_MODULE, c.CALL_FUNCTION, c.FORWARD_LOG, c.ADD_ROUTE, c.DEL_ROUTE,
            c.ALLOCATE_ID, c.SHUTDOWN, c.LOAD_MODULE, c.FORWARD_MODULE, c.DETACHING) == \
        tuple(range(100, 110))
    assert c.IS_DEAD == 999


# --- Mitogen's behaviours (mitogen.parity, loaded by the master)


class UserThing:
    """A class the default unpickler refuses."""

    def __init__(self, value):
        self.value = value


def test_message_validates_its_arguments():
    with pytest.raises(TypeError, match="no field colour"):
        Message(colour=1)
    with pytest.raises(TypeError, match="must be bytes or bytearray, not str"):
        Message(data="text")
    with pytest.raises(ValueError, match="enc must be"):
        Message(enc=0x1234)
    assert Message(data=bytearray(b"ok"), enc=mitogen.core.ENC_BIN).data == b"ok"


def test_unpickle_with_find_class_allows_what_the_caller_allows():
    msg = Message(data=pickle.dumps(UserThing(5), protocol=4))
    with pytest.raises(mitogen.core.StreamError, match="refused to unpickle"):
        msg.unpickle()

    def allow_user_thing(module, name):
        if (module, name) == (__name__, "UserThing"):
            return UserThing
        raise pickle.UnpicklingError("no %s.%s" % (module, name))

    assert msg.unpickle(find_class=allow_user_thing).value == 5
    with pytest.raises(pickle.UnpicklingError, match=r"no builtins\.print"):
        Message(data=pickle.dumps(print)).unpickle(find_class=allow_user_thing)
    assert list(Message.pickled([1, 2]).unpickle_iter()) == [[1, 2]]


def test_errors_and_kwargs_turn_bytes_into_text():
    assert str(mitogen.core.Error(b"caf\xc3\xa9")) == "caf\u00e9"
    assert str(mitogen.core.CallError(b"remote %s")) == "remote %s"
    assert str(mitogen.core.StreamError(b"%d bytes", 5)) == "5 bytes"
    kwargs = mitogen.core.Kwargs({b"name": 1, "other": 2})
    assert kwargs == {"name": 1, "other": 2} and type(kwargs) is mitogen.core.Kwargs
    assert all(type(k) is str for k in kwargs)


def test_sender_sends_raw_bytes_with_enc_bin(router):
    recv = mitogen.core.Receiver(router)
    recv.to_sender().send(b"\x00raw", enc=mitogen.core.ENC_BIN)
    msg = recv.get(timeout=10)
    assert msg.enc == mitogen.core.ENC_BIN and msg.unpickle() == b"\x00raw"
    recv.close()
