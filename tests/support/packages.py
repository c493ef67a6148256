"""Generate Python packages on disk for importer tests: they exist only where we put them."""

from __future__ import annotations

import itertools
from pathlib import Path

_counter = itertools.count()

#: Modules in a generated package: __init__, entry and this many leaves minus two.
PACKAGE_SIZE = 30


def unique_name(prefix: str) -> str:
    """A module name no other test in this process uses, so caches never mix tests."""
    return "%s_%d" % (prefix, next(_counter))


def make_package(root: Path, name: str, dynamic: bool = False) -> list[str]:
    """Write package `name` under `root`: ``__init__``, ``entry`` and 28 leaves, each leaf
    defining VALUE = its number. ``entry.run()`` returns the sum of the leaves' VALUEs,
    importing them statically, or with importlib at call time when `dynamic`."""
    leaves = ["leaf%02d" % i for i in range(1, PACKAGE_SIZE - 1)]
    pkg = root / name
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text('"""Generated for a test."""\n')
    for number, leaf in enumerate(leaves, start=1):
        (pkg / (leaf + ".py")).write_text(
            "import os\n\nVALUE = %d\n\n\ndef where():\n    return __file__, __loader__\n"
            % number)
    if dynamic:
        body = ("import importlib\n\nLEAVES = %r\n\n\ndef run():\n"
                "    return sum(importlib.import_module(%r + '.' + leaf).VALUE "
                "for leaf in LEAVES)\n" % (leaves, name))
    else:
        body = ("from %s import %s\n\nMODULES = [%s]\n\n\ndef run():\n"
                "    return sum(m.VALUE for m in MODULES)\n"
                % (name, ", ".join(leaves), ", ".join(leaves)))
    (pkg / "entry.py").write_text(body)
    return [name, name + ".entry", *(name + "." + leaf for leaf in leaves)]


def expected_sum() -> int:
    return sum(range(1, PACKAGE_SIZE - 1))


#: The files make_data_package() writes beside its code.
DATA_TEXT = "greetings from the master\n"
DATA_BYTES = bytes(range(256)) * 4


def make_data_package(root: Path, name: str) -> list[str]:
    """Write package `name` under `root` with data files: ``greeting.txt`` (DATA_TEXT) and
    ``data/deep.bin`` (DATA_BYTES); ``use.py`` reads them through importlib.resources."""
    pkg = root / name
    (pkg / "data").mkdir(parents=True)
    (pkg / "__init__.py").write_text('"""Generated for a test: a package with data."""\n')
    (pkg / "greeting.txt").write_text(DATA_TEXT)
    (pkg / "data" / "deep.bin").write_bytes(DATA_BYTES)
    (pkg / "use.py").write_text(
        "import importlib.resources\n\n\ndef greeting():\n"
        "    return importlib.resources.files(__package__).joinpath('greeting.txt')"
        ".read_text()\n")
    return [name, name + ".use"]
