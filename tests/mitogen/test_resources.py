"""importlib.resources and pkgutil.get_data() in a child, for packages it imported from the
master: the files come from the master too (Python 3.9-3.14 in containers:
test_container_pythons.py)."""

from __future__ import annotations

import pytest

import mitogen.core
import mitogen.resources
from tests.mitogen.test_versions import VERSIONS, find_python
from tests.support import funcs, packages


def _resources(router, child, name):
    before = router.get_stats()["get_resource_count"]
    found = child.call(funcs.resources_of, name, "greeting.txt", "data")
    return found, router.get_stats()["get_resource_count"] - before


def test_files_and_get_data_come_from_the_master(router, data_package):
    name, module, _ = data_package
    child = router.local()
    assert child.call(module.greeting) == packages.DATA_TEXT
    found, requests = _resources(router, child, name)
    assert found == {
        "type": "RemoteTraversable",
        "text": packages.DATA_TEXT,
        "listing": ["__init__.py", "data", "greeting.txt", "use.py"],
        "nested": packages.DATA_BYTES,
        "is_dir": True,
        "is_file": True,
        "get_data": packages.DATA_TEXT.encode(),
        "get_data_nested": packages.DATA_BYTES,
        "legacy": packages.DATA_TEXT.encode(),
    }
    assert requests > 0  # read through GET_RESOURCE, not from the master's path on disk


def test_a_grandchild_reads_through_its_parent(router, data_package):
    name, module, _ = data_package
    middle = router.local(name="middle")
    grandchild = router.local(name="grandchild", via=middle)
    assert grandchild.call(module.greeting) == packages.DATA_TEXT
    found, requests = _resources(router, grandchild, name)
    assert found["nested"] == packages.DATA_BYTES and requests > 0


def test_missing_and_escaping_paths_are_clear_errors(router, data_package):
    name, module, _ = data_package
    child = router.local()
    child.call(module.greeting)
    kind, text = child.call(funcs.missing_resource, name, "absent.txt")
    assert kind == "FileNotFoundError" and "does not exist in the master" in text
    kind, text = child.call(funcs.missing_resource, name, "../" + name + "/greeting.txt")
    assert kind == "ValueError" and "'..'" in text


def test_the_import_policy_applies_to_resources(router, data_package):
    name, module, _ = data_package
    child = router.local()
    child.call(module.greeting)
    router.responder.blacklist_prefix(name)
    kind, text = child.call(funcs.missing_resource, name, "data/deep.bin")
    assert kind == "FileNotFoundError" and "import policy" in text


def test_master_refuses_a_malformed_request(router):
    reply = router.context_by_id(0).send_await(mitogen.core.Message.pickled(
        ("no.such.package", "x"), handle=mitogen.resources.GET_RESOURCE))
    assert reply == ("missing", "cannot find no.such.package: No module named 'no'")
    reply = router.context_by_id(0).send_await(mitogen.core.Message.pickled(
        ("x", 5), handle=mitogen.resources.GET_RESOURCE))
    assert reply == ("missing", "malformed GET_RESOURCE request: package and path must be str")


@pytest.mark.parametrize("version", VERSIONS)
def test_on_every_python_version(router, data_package, version):
    python = find_python(version)
    if python is None:
        pytest.skip("no Python %s interpreter on this machine" % version)
    name, module, _ = data_package
    child = router.local(python_path=python)
    assert child.call(module.greeting) == packages.DATA_TEXT
    found, requests = _resources(router, child, name)
    assert (found["type"], found["nested"], found["get_data"], found["legacy"]) == (
        "RemoteTraversable", packages.DATA_BYTES, packages.DATA_TEXT.encode(),
        packages.DATA_TEXT.encode())
    assert requests > 0


def test_a_file_too_large_is_refused_without_being_read(router, data_package):
    name, _, root = data_package
    with open(root / name / "huge.bin", "wb") as f:  # sparse: 2 GiB that cost no disk
        f.truncate(2 << 30)

    def rss_kib():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))

    peak = rss_kib()
    reply = router.context_by_id(0).send_await(mitogen.core.Message.pickled(
        (name, "huge.bin"), handle=mitogen.resources.GET_RESOURCE))
    assert reply[0] == "missing" and "is too large to send (2147483648 bytes" in reply[1]
    assert rss_kib() - peak < 64 * 1024  # the peak RSS: reading it would add 2 GiB
