"""Checks on a pickle from a context that has no authority over this one, before it is loaded.

The restricted unpickler in :mod:`mitogen.core` decides which objects may be built; it cannot
decide how much memory a few bytes may make it allocate. CPython's C unpickler grows its memo
to whatever index a ``PUT`` names (a 9-byte pickle can ask for gigabytes), allocates a
``BINBYTES8`` of the size its header claims before reading it, and an empty set costs 216
bytes for one byte of input. So a pickle from below (a child's reply, a sibling's message) is
walked opcode by opcode first, in this module, which :mod:`mitogen.core` imports on the first
such message (the master and every parent import it at start):

* only the opcodes that protocol 4 uses for the types the unpickler allows are accepted
  (no ``PUT`` family, no ``BUILD``, no text-mode opcodes, no ``persistent_load``);
* every length field must lie within the pickle;
* the memory the loaded objects can take is estimated from above, opcode by opcode, and the
  pickle is refused when that exceeds :data:`EXPANSION` times its size plus :data:`SLACK`.

Messages from this context's parents are not checked: a parent can run code here anyway.
The check costs about two to four times the unpickling itself for structured data, and
nothing for bulk bytes, whose payload is skipped, not read.
"""

from __future__ import annotations

from typing import Union

__all__ = ["EXPANSION", "SLACK", "UnsafePickleError", "check_pickle", "estimate"]

#: A pickle may make at most this many bytes of objects per byte received, plus SLACK.
EXPANSION = 64
#: Bytes of objects any pickle may make, whatever its size (small messages are never refused).
SLACK = 65536

Buffer = Union[bytes, bytearray, memoryview]

# (opcode, argument, cost per byte of a counted argument, fixed cost): the argument is the
# number of bytes that follow the opcode, or -n for an n-byte little-endian length followed by
# that many bytes. Costs are upper bounds in bytes on a 64-bit CPython, each including 32 for
# the slot the object takes on the stack, in the memo or in the container it ends up in.
_SPEC = (
    (0x80, 1, 0, 0),      # PROTO
    (0x95, 8, 0, 0),      # FRAME: its contents are opcodes like any others
    (0x2E, 0, 0, 0),      # STOP
    (0x28, 0, 0, 16),     # MARK
    (0x30, 0, 0, 0),      # POP
    (0x31, 0, 0, 0),      # POP_MARK
    (0x32, 0, 0, 40),     # DUP
    (0x4E, 0, 0, 40),     # NONE
    (0x88, 0, 0, 40),     # NEWTRUE
    (0x89, 0, 0, 40),     # NEWFALSE
    (0x4A, 4, 0, 80),     # BININT
    (0x4B, 1, 0, 80),     # BININT1
    (0x4D, 2, 0, 80),     # BININT2
    (0x8A, -1, 1, 80),    # LONG1
    (0x8B, -4, 1, 80),    # LONG4
    (0x47, 8, 0, 80),     # BINFLOAT
    (0x8C, -1, 4, 120),   # SHORT_BINUNICODE: up to 4 bytes a character (UCS-4)
    (0x58, -4, 4, 120),   # BINUNICODE
    (0x8D, -8, 4, 120),   # BINUNICODE8
    (0x43, -1, 1, 90),    # SHORT_BINBYTES
    (0x42, -4, 1, 90),    # BINBYTES
    (0x8E, -8, 1, 90),    # BINBYTES8
    (0x29, 0, 0, 40),     # EMPTY_TUPLE
    (0x85, 0, 0, 100),    # TUPLE1
    (0x86, 0, 0, 100),    # TUPLE2
    (0x87, 0, 0, 100),    # TUPLE3
    (0x74, 0, 0, 100),    # TUPLE
    (0x5D, 0, 0, 100),    # EMPTY_LIST
    (0x61, 0, 0, 0),      # APPEND
    (0x65, 0, 0, 0),      # APPENDS
    (0x6C, 0, 0, 100),    # LIST
    (0x7D, 0, 0, 110),    # EMPTY_DICT
    (0x73, 0, 0, 0),      # SETITEM
    (0x75, 0, 0, 0),      # SETITEMS
    (0x64, 0, 0, 110),    # DICT
    (0x8F, 0, 0, 260),    # EMPTY_SET
    (0x90, 0, 0, 0),      # ADDITEMS
    (0x91, 0, 0, 260),    # FROZENSET
    (0x94, 0, 0, 16),     # MEMOIZE
    (0x68, 1, 0, 40),     # BINGET
    (0x6A, 4, 0, 40),     # LONG_BINGET
    (0x93, 0, 0, 40),     # STACK_GLOBAL
    (0x52, 0, 0, 200),    # REDUCE: an allowed constructor's result (copies are bounded)
)

_ARGUMENT: list = [None] * 256
_PER_BYTE = [0] * 256
_FIXED = [0] * 256
for _op, _arg, _per_byte, _fixed in _SPEC:
    _ARGUMENT[_op] = _arg
    _PER_BYTE[_op] = _per_byte
    _FIXED[_op] = _fixed
_STOP = 0x2E
#: The unpickler's own stack, memo and buffers before the first opcode.
_UNPICKLER = 4096


class UnsafePickleError(ValueError):
    """A pickle that the restricted unpickler must not be given."""


def estimate(data: Buffer) -> int:
    """An upper bound on the bytes of objects that loading `data` makes; raises
    UnsafePickleError for an opcode the unpickler must not see or a truncated argument."""
    argument, per_byte, fixed = _ARGUMENT, _PER_BYTE, _FIXED
    pos = 0
    cost = _UNPICKLER
    end = len(data)
    while pos < end:
        op = data[pos]
        arg = argument[op]
        if arg is None:
            raise UnsafePickleError("opcode 0x%02x at offset %d is not allowed" % (op, pos))
        pos += 1
        if arg < 0:
            count = int.from_bytes(data[pos:pos - arg], "little")
            pos += count - arg
            cost += count * per_byte[op]
        else:
            pos += arg
        cost += fixed[op]
        if op == _STOP:
            return cost
    if pos > end:
        raise UnsafePickleError("an argument runs %d bytes past the end" % (pos - end,))
    raise UnsafePickleError("the pickle has no STOP opcode")


def check_pickle(data: Buffer) -> None:
    """Raise UnsafePickleError unless `data` is safe to give the restricted unpickler."""
    cost = estimate(data)
    limit = EXPANSION * len(data) + SLACK
    if cost > limit:
        raise UnsafePickleError(
            "loading it could take %d bytes for %d received (the limit is %d x its size "
            "+ %d)" % (cost, len(data), EXPANSION, SLACK))
