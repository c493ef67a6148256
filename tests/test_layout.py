"""The package's public surface does not drift by accident."""

import mitogen


def test_version_is_a_tuple_as_mitogen_publishes_it():
    assert mitogen.__version__ == (0, 3, 54)
    assert isinstance(mitogen.__version__, tuple)


def test_master_globals():
    assert mitogen.is_master is True
    assert mitogen.context_id == 0
    assert mitogen.parent_id is None
    assert mitogen.parent_ids == []
