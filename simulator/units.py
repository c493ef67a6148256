"""Parse the quantities a topology file writes as text: durations, percentages, rates, sizes.

Each parser takes what a YAML file or a Python caller hands over and returns one plain number in
one base unit (seconds, a fraction, bits per second, bytes), so nothing downstream has to know
that ``"20ms"`` and ``0.02`` mean the same thing. A bare number is refused where it would be
ambiguous (is ``latency: 20`` seconds or milliseconds?), except zero, which means the same in
every unit. Errors are :class:`ValueError` whose message says what form was expected; the
topology loader adds the file and the path in front of it.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Union

if TYPE_CHECKING:  # typing.TypeGuard is 3.10+; annotations are never evaluated at run time
    from typing_extensions import TypeGuard

__all__ = [
    "DURATION_PATTERN",
    "PERCENT_PATTERN",
    "RATE_PATTERN",
    "SIZE_PATTERN",
    "parse_duration",
    "parse_fraction",
    "parse_rate",
    "parse_size",
]

Number = Union[int, float]

_DURATION_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_RATE_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12}
_SIZE_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30}

# The JSON schema (simulator/schema.json) uses the same patterns, so editors and the loader
# accept exactly the same spellings.
DURATION_PATTERN = r"^(0|[0-9]+(\.[0-9]+)?(us|ms|s|m|h))$"
PERCENT_PATTERN = r"^(0|[0-9]+(\.[0-9]+)?%)$"
RATE_PATTERN = r"^[0-9]+(\.[0-9]+)?(bit|kbit|mbit|gbit|tbit)$"
SIZE_PATTERN = r"^[0-9]+[bkmg]?$"

_DURATION_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?)(us|ms|s|m|h)")
_PERCENT_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?)%")
_RATE_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?)(bit|kbit|mbit|gbit|tbit)")
_SIZE_RE = re.compile(r"([0-9]+)([bkmg]?)")


def _is_number(value: object) -> TypeGuard[Union[int, float]]:
    """Numbers, but not booleans: YAML turns ``yes`` into True, which is never a quantity."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _finite(value: float, what: str, original: object) -> float:
    if not math.isfinite(value):
        raise ValueError(f"expected a finite {what}, got {original!r}")
    return value


def parse_duration(value: object, *, allow_bare: bool = False) -> float:
    """Return *value* in seconds: ``"20ms"`` -> 0.02, ``"2s"`` -> 2.0, ``0`` -> 0.0.

    ``allow_bare`` accepts plain numbers as seconds; Python callers use it, files do not, because
    in a file a missing unit is more likely a mistake than a choice.
    """
    if _is_number(value) and (allow_bare or value == 0):
        seconds = _finite(float(value), "duration", value)
    elif isinstance(value, str) and (match := _DURATION_RE.fullmatch(value)):
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    elif isinstance(value, str) and value == "0":
        seconds = 0.0
    else:
        raise ValueError(f"expected a duration with a unit (us, ms, s, m, h), like '20ms' or "
                         f"'2s', got {value!r}")
    if seconds < 0:
        raise ValueError(f"expected a duration >= 0, got {value!r}")
    return seconds


def parse_fraction(value: object, *, allow_bare: bool = False) -> float:
    """Return a percentage as a fraction in [0, 1]: ``"0.1%"`` -> 0.001, ``0`` -> 0.0.

    ``allow_bare`` accepts a plain number as the fraction itself (``0.05`` is 5 %).
    """
    if _is_number(value) and (allow_bare or value == 0):
        fraction = _finite(float(value), "fraction", value)
    elif isinstance(value, str) and (match := _PERCENT_RE.fullmatch(value)):
        fraction = float(match.group(1)) / 100.0
    elif isinstance(value, str) and value == "0":
        fraction = 0.0
    else:
        raise ValueError(f"expected a percentage like '0.1%' or '5%', got {value!r}")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"expected a percentage between 0% and 100%, got {value!r}")
    return fraction


def parse_rate(value: object, *, allow_bare: bool = False) -> int:
    """Return a bandwidth in bits per second: ``"100mbit"`` -> 100_000_000.

    Units are decimal, as tc's are (1 kbit = 1000 bit). Byte-based units are not offered
    because tc's ``kbps`` means kilobytes, a classic source of eightfold mistakes.
    """
    if _is_number(value) and allow_bare:
        bits = _finite(float(value), "rate", value)
    elif isinstance(value, str) and (match := _RATE_RE.fullmatch(value)):
        bits = float(match.group(1)) * _RATE_UNITS[match.group(2)]
    else:
        raise ValueError(f"expected a rate like '512kbit', '100mbit' or '1gbit', got {value!r}")
    if bits < 1:
        raise ValueError(f"expected a rate of at least 1bit, got {value!r}")
    return int(bits)


def parse_size(value: object) -> int:
    """Return a memory size in bytes, Docker style: ``"128m"`` -> 134217728, ``4096`` -> 4096."""
    if _is_number(value) and float(value).is_integer():
        size = int(value)
    elif isinstance(value, str) and (match := _SIZE_RE.fullmatch(value)):
        size = int(match.group(1)) * _SIZE_UNITS[match.group(2)]
    else:
        raise ValueError(f"expected a size like '128m', '1g' or a number of bytes, got {value!r}")
    if size <= 0:
        raise ValueError(f"expected a size > 0, got {value!r}")
    return size
