from __future__ import annotations

import importlib
import sys

import pytest

import mitogen.master
from tests.support import packages


@pytest.fixture
def router():
    with mitogen.master.Router() as router:
        yield router


@pytest.fixture
def local(router):
    return router.local(name="worker")


@pytest.fixture
def package(tmp_path, monkeypatch):
    """A fresh 30-module package on the master's sys.path only, imported in the master:
    (entry module, module names, root directory). Forgotten by the master afterwards."""
    name = packages.unique_name("genpkg")
    names = packages.make_package(tmp_path, name)
    monkeypatch.syspath_prepend(str(tmp_path))
    entry = importlib.import_module(name + ".entry")
    yield entry, names, tmp_path
    for module in names:
        sys.modules.pop(module, None)
