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


def _generated(tmp_path, monkeypatch, prefix, make, first):
    """Generate a package with `make` on the master's sys.path only and import its module
    `first`; yield (package name, that module, module names, root), then forget them."""
    name = packages.unique_name(prefix)
    root = tmp_path / prefix
    names = make(root, name)
    monkeypatch.syspath_prepend(str(root))
    module = importlib.import_module(name + first)
    yield name, module, names, root
    for fullname in names:
        sys.modules.pop(fullname, None)


@pytest.fixture
def package(tmp_path, monkeypatch):
    """A fresh 30-module package on the master's sys.path only, imported in the master:
    (entry module, module names, root directory). Forgotten by the master afterwards."""
    for _, entry, names, root in _generated(tmp_path, monkeypatch, "genpkg",
                                            packages.make_package, ".entry"):
        yield entry, names, root


@pytest.fixture
def data_package(tmp_path, monkeypatch):
    """A fresh package with data files (packages.make_data_package), imported in the
    master: (package name, its ``use`` module, root directory)."""
    for name, use, _, root in _generated(tmp_path, monkeypatch, "datapkg",
                                         packages.make_data_package, ".use"):
        yield name, use, root
