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


def test_public_api_does_not_drift():
    """The names Mitogen 0.3 programs use are where they expect them, and each module's
    __all__ names only what it defines or re-exports."""
    import importlib

    expected = {
        "mitogen.core": ["Blob", "Broker", "CallError", "Channel", "ChannelError", "Context",
                         "Error", "Kwargs", "Latch", "LatchError", "Message", "Receiver",
                         "Router", "Secret", "Sender", "StreamError", "TimeoutError",
                         "listen", "takes_econtext", "takes_router", "GET_MODULE",
                         "CALL_FUNCTION", "IS_DEAD"],
        "mitogen.parent": ["CancelledError", "Context", "EofError", "Router"],
        "mitogen.master": ["Broker", "Router", "ModuleResponder"],
        "mitogen.select": ["Event", "Select"],
        "mitogen.utils": ["cast", "log_to_file", "run_with_router", "with_router"],
        "mitogen.ssh": ["Connection", "HostKeyError", "Options", "PasswordError"],
        "mitogen.sudo": ["Connection", "Options", "PasswordError"],
    }
    for module_name, names in expected.items():
        module = importlib.import_module(module_name)
        missing = [n for n in names if not hasattr(module, n)]
        assert not missing, (module_name, missing)
        exported = getattr(module, "__all__", None)
        assert exported is not None, module_name + " has no __all__"
        assert all(hasattr(module, n) for n in exported), module_name
    import mitogen.core
    import mitogen.ssh
    import mitogen.sudo

    assert mitogen.ssh.PasswordError is mitogen.sudo.PasswordError  # defined once
    assert issubclass(mitogen.ssh.HostKeyError, mitogen.core.StreamError)
