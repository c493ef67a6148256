"""Children on every supported Python version, driven by this master."""

from __future__ import annotations

import glob
import os
import shutil

import pytest

from tests.support import funcs, packages

VERSIONS = ["3.9", "3.10", "3.11", "3.12", "3.13", "3.14"]


def find_python(version: str) -> str | None:
    """An interpreter of `version` on this machine: on PATH (not a pyenv shim, which may
    refuse to run), or under pyenv."""
    found = shutil.which("python" + version)
    if found and "/shims/" not in found:
        return found
    candidates = sorted(glob.glob(os.path.expanduser(
        "~/.pyenv/versions/%s.*/bin/python%s" % (version, version))))
    return candidates[-1] if candidates else None


@pytest.mark.parametrize("version", VERSIONS)
def test_child_on_python(version, router, package):
    python = find_python(version)
    if python is None:
        pytest.skip("no Python %s interpreter on this machine" % version)
    child = router.local(python_path=python, name="py" + version)
    assert child.call(funcs.python_version)[:2] == tuple(int(p) for p in version.split("."))
    entry = package[0]
    assert child.call(entry.run) == packages.expected_sum()
