from __future__ import annotations

import pytest

import mitogen.master


@pytest.fixture
def router():
    with mitogen.master.Router() as router:
        yield router


@pytest.fixture
def local(router):
    return router.local(name="worker")
