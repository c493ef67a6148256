"""Fuzzing the two parsers a hostile context talks to: the frame decoder and the unpickler
(with mitogen.guard in front of it for messages from below).

The fixed-seed tests run in every suite. The hypothesis tests run a few hundred examples in
the suite; ``tox -e fuzz`` runs each with MITOGEN_FUZZ_EXAMPLES (340,000 by default: over a
million inputs in all).
"""

from __future__ import annotations

import os
import pickle
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mitogen.core
from mitogen.core import HEADER, CorruptFrameError, Decoder, Message, StreamError
from tests.support.fuzzing import SEEDS, mutate, peak_allocated

EXAMPLES = int(os.environ.get("MITOGEN_FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))
MAX_MESSAGE = 300 << 10  # above Decoder.BIG_BODY, so big bodies are received too


def frame(rng: random.Random) -> bytes:
    """A frame, usually valid, sometimes with a bad magic, a length that lies, or a big or
    oversize body."""
    magic = rng.choice([mitogen.core.ENC_PKL, mitogen.core.ENC_BIN, mitogen.core.ENC_LEGACY])
    if rng.random() < 0.02:
        magic = rng.randrange(1 << 16)
    kind = rng.random()
    body = os.urandom(rng.choice([0, 1, 25, 300, 5000]))
    length = len(body)
    if kind < 0.02:
        body = os.urandom(Decoder.BIG_BODY + rng.randrange(4096))
        length = len(body)
    elif kind < 0.04:
        length = MAX_MESSAGE + rng.randrange(1 << 16)  # oversize: skipped, body and all
        body = bytes(length)
    elif kind < 0.06:
        length = rng.randrange(1 << 32)  # a lie; the stream ends first
    fields = [rng.randrange(1 << 32) for _ in range(5)]
    return HEADER.pack(magic, *fields, length) + body


def feed_all(decoder: Decoder, data: bytes, rng: random.Random) -> int:
    """Feed `data` in random chunks, decoding as it goes; returns messages decoded. The
    decoder's buffers never exceed twice what it was given (or one body up to HEAP_BODY)."""
    decoded = pos = 0
    while pos < len(data):
        step = rng.choice([1, 7, 26, 4096, 70_000, 300_000])
        decoder.feed(data[pos:pos + step])
        pos += step
        body = decoder._body
        held = len(decoder._buf) + (len(body) if body is not None else 0)
        assert held <= max(2 * pos, Decoder.HEAP_BODY + 26), (held, pos)
        while decoder.next_message() is not None:
            decoded += 1
    return decoded


def test_decoder_fuzz_fixed_seed():
    """20,000 frames in 2,000 streams of random chunks: each decodes, or the stream is
    refused with CorruptFrameError; nothing else is ever raised."""
    rng = random.Random(2026)
    corrupt = decoded = 0
    for _ in range(2_000):
        stream = b"".join(frame(rng) for _ in range(10))
        if rng.random() < 0.3:
            stream = mutate(rng, stream)
        try:
            decoded += feed_all(Decoder(MAX_MESSAGE), stream, rng)
        except CorruptFrameError:
            corrupt += 1
    assert corrupt > 100 and decoded > 5_000, (corrupt, decoded)


def untrusted(data: bytes) -> Message:
    return Message(data=data, auth_id=4242, src_id=4242)


def load_or_refuse(data: bytes) -> None:
    try:
        untrusted(data).unpickle(throw=False)
    except StreamError:
        pass


@FUZZ
@given(st.binary(max_size=512))
def test_unpickler_takes_any_bytes_from_below(data):
    load_or_refuse(data)


@FUZZ
@given(st.sampled_from(SEEDS), st.integers(0, 2**32 - 1))
def test_unpickler_takes_any_mutated_pickle_from_below(seed, salt):
    load_or_refuse(mutate(random.Random(salt), seed))


@FUZZ
@given(st.lists(st.binary(max_size=64), max_size=20), st.integers(0, 2**32 - 1))
def test_decoder_takes_any_chunks(chunks, salt):
    rng = random.Random(salt)
    stream = b"".join(chunks)
    if chunks and rng.random() < 0.5:  # a valid header in front makes the body path likelier
        stream = HEADER.pack(mitogen.core.ENC_PKL, 1, 2, 3, 4, 5, len(stream)) + stream
    try:
        feed_all(Decoder(MAX_MESSAGE), stream, rng)
    except CorruptFrameError:
        pass


@pytest.mark.parametrize("value", [{"k": [1, 2.5, "x" * 100]}, b"b" * 70_000])
def test_valid_pickles_from_below_cost_what_they_hold(value):
    data = pickle.dumps(value, 4)
    used = peak_allocated(lambda: untrusted(data).unpickle())
    assert used < 4 * len(data) + 65536

