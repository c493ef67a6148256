"""Inputs for fuzzing what a hostile context sends, and a way to measure what it costs."""

from __future__ import annotations

import pickle
import random
import struct
import tracemalloc

import mitogen.core


def peak_allocated(func) -> int:
    """Peak bytes allocated by Python while `func` runs."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        func()
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


def mutate(rng: random.Random, data: bytes) -> bytes:
    data = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        choice = rng.random()
        pos = rng.randrange(len(data) + 1)
        if choice < 0.4 and data:
            data[min(pos, len(data) - 1)] = rng.randrange(256)
        elif choice < 0.7:
            data[pos:pos] = bytes([rng.randrange(256)]) * rng.randint(1, 8)
        elif choice < 0.85:
            del data[pos:pos + rng.randint(1, 8)]
        else:
            data[pos:pos] = struct.pack("<I", rng.choice([0x7FFFFFFF, 1 << 24, 255, 0]))
    return bytes(data)


SEEDS = [pickle.dumps(v, 4) for v in (
    (None, "os", None, "getpid", (), mitogen.core.Kwargs()), 12345, "text", [1, [2, [3]]],
    {"k": b"v" * 40, "s": {1, 2}, "f": frozenset("ab")}, mitogen.core.CallError("x"),
    mitogen.core.Blob(b"b" * 70), mitogen.core.Context(None, 3, "c"), 1.5 + 2j, range(3),
    bytearray(b"ba"), mitogen.core.Secret("pw"), (2**100, -1, True))]
