"""The remote importer: modules only the master has, fetched in as few round trips as can be."""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile

import pytest

import mitogen.core
import mitogen.master
from tests.support import funcs, packages


def _requests(router):
    return router.get_stats()["get_module_count"]


def test_static_package_needs_one_request_and_comes_over_the_wire(router, package):
    entry, names, root = package
    child = router.local()
    child.call(funcs.add, 1, 1)  # load the helper module first
    before = _requests(router)
    assert child.call(entry.run) == packages.expected_sum()
    assert _requests(router) - before == 1
    loader, path, spec_name, pkg_path, pkg = child.call(funcs.module_origin, names[5])
    assert loader == "Importer"
    assert path == str(root / names[5].replace(".", "/")) + ".py"
    assert (spec_name, pkg_path, pkg) == (names[5], None, names[0])
    loader, _, _, pkg_path, pkg = child.call(funcs.module_origin, names[0])
    assert pkg_path == [str(root / names[0])] and pkg == names[0]
    assert str(root) not in child.call(funcs.sys_path)
    assert child.call(funcs.importer_requests) >= 1


def test_grandchild_gets_each_module_from_the_master_once(router, package):
    entry, _names, _ = package
    middle = router.local(name="middle")
    first = router.local(name="first", via=middle)
    second = router.local(name="second", via=middle)
    for child in (first, second):
        child.call(funcs.add, 1, 1)
    stats = router.get_stats()
    assert first.call(entry.run) == packages.expected_sum()
    after_first = router.get_stats()
    assert after_first["get_module_count"] - stats["get_module_count"] == 1
    assert after_first["good_load_module_count"] - stats["good_load_module_count"] == 30
    assert second.call(entry.run) == packages.expected_sum()
    after_second = router.get_stats()
    assert after_second["get_module_count"] == after_first["get_module_count"]
    assert after_second["good_load_module_count"] == after_first["good_load_module_count"]


@pytest.fixture
def dynamic_package(tmp_path, monkeypatch):
    """A package whose entry imports its leaves with importlib at call time (so the master
    has loaded none of them); forgotten by the master afterwards."""
    name = packages.unique_name("dynpkg")
    names = packages.make_package(tmp_path, name, dynamic=True)
    monkeypatch.syspath_prepend(str(tmp_path))
    entry = importlib.import_module(name + ".entry")
    yield entry, names, tmp_path
    for module in names:
        sys.modules.pop(module, None)


def _spy_on_compile(monkeypatch):
    compiled = []
    real_compile = mitogen.master.ModuleFinder._compile
    monkeypatch.setattr(mitogen.master.ModuleFinder, "_compile", staticmethod(
        lambda path, text: compiled.append(os.path.basename(path)) or real_compile(path, text)))
    return compiled


def test_bytecode_is_sent_only_when_the_master_has_it_at_hand(router, dynamic_package,
                                                               monkeypatch):
    """A module with a current .pyc reaches a same-version child as a code object; one the
    master would have to compile goes as source, and answering a request never compiles
    just to send code (that only moves the child's work onto the master's, in series)."""
    import py_compile

    monkeypatch.setattr(mitogen.master.ModuleResponder, "PREPARE_LIMIT", 0)
    entry, names, root = dynamic_package
    with_pyc, without_pyc = names[2], names[3]
    source = str(root / with_pyc.replace(".", "/")) + ".py"
    py_compile.compile(source, cfile=importlib.util.cache_from_source(source), doraise=True)
    compiled = _spy_on_compile(monkeypatch)
    child = router.local()
    assert child.call(entry.run) == packages.expected_sum()
    assert child.call(funcs.arrived_as_code, with_pyc) is True
    assert child.call(funcs.arrived_as_code, without_pyc) is False
    assert not [name for name in compiled if name.startswith("leaf")], compiled


def test_an_idle_master_compiles_ahead_as_much_as_its_child_compiles(router, dynamic_package,
                                                                     monkeypatch):
    """Each module a child receives as source (and compiles itself) earns one module of the
    same package compiled ahead by the idle master, from the far end of the listing; that
    one is then answered at once, as code the child need not compile."""
    _, names, _ = dynamic_package
    leaves = names[2:]
    child = router.local()
    child.call(funcs.add, 1, 1)  # the test helpers' own modules earn and use turns first
    child.call(funcs.import_and_count, names[1])  # the package and its entry module
    assert router.broker.wait_idle(30)
    compiled = _spy_on_compile(monkeypatch)
    assert child.call(funcs.import_and_count, leaves[0]) == 1
    assert child.call(funcs.arrived_as_code, leaves[0]) is False  # compiled by the child
    assert router.broker.wait_idle(30)
    assert compiled == ["leaf28.py"]
    assert child.call(funcs.import_and_count, leaves[-1]) == 1
    assert child.call(funcs.arrived_as_code, leaves[-1]) is True
    assert child.call(funcs.import_and_count, leaves[1]) == 1
    assert router.broker.wait_idle(30)
    assert compiled == ["leaf28.py", "leaf27.py"]


def test_a_module_is_scanned_when_a_loaded_sibling_may_need_preloading(
        router, tmp_path, monkeypatch):
    """The scan for related modules is skipped only when it cannot change the answer: here
    the master has loaded pkg.b, the child has not got it, and pkg.a imports it."""
    name = packages.unique_name("scanpkg")
    pkg = tmp_path / name
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from %s import b\n\nVALUE = b.VALUE + 1\n" % name)
    (pkg / "b.py").write_text("VALUE = 41\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.import_module(name + ".b")
    try:
        child = router.local()
        child.call(funcs.import_and_count, name)
        assert child.call(funcs.import_and_count, name + ".a") == 1  # b came along
        assert child.call(funcs.module_origin, name + ".b")[0] == "Importer"
    finally:
        for module in (name, name + ".a", name + ".b"):
            sys.modules.pop(module, None)


def test_eight_threads_importing_one_module_cause_one_request(router, package):
    _, names, _ = package
    child = router.local()
    child.call(funcs.add, 1, 1)
    before = child.call(funcs.importer_requests)
    assert child.call(funcs.import_in_threads, names[7], 8) == [6] * 8
    assert child.call(funcs.importer_requests) - before == 1


def test_missing_submodule_fails_locally_without_a_message(router, package):
    entry, names, _ = package
    child = router.local()
    child.call(entry.run)
    before_child = child.call(funcs.importer_requests)
    before_master = _requests(router)
    kind, _text = child.call(funcs.try_import, names[0] + ".no_such_module")
    assert kind == "ModuleNotFoundError"
    assert child.call(funcs.importer_requests) == before_child
    assert _requests(router) == before_master


def test_stdlib_and_modules_the_child_has_never_cross_the_wire(router):
    child = router.local()
    child.call(funcs.add, 1, 1)
    before = router.get_stats()
    assert child.call(funcs.try_import, "json.decoder") == ("ok", None)
    assert child.call(funcs.try_import, "msvcrt")[0] == "ModuleNotFoundError"
    assert router.get_stats()["get_module_count"] == before["get_module_count"]


def test_a_package_in_the_childs_site_packages_is_imported_there(router):
    """Children start without site (-S, for speed); the first import that is neither the
    standard library's nor the master's loads it, and the local copy wins."""
    import hypothesis  # installed in this venv's site-packages, so in the child's too

    child = router.local()
    # Only the standard library so far (eval is a builtin): no site-packages on sys.path.
    probe = "__import__('site').getsitepackages()[0] in __import__('sys').path"
    assert child.call(eval, probe) is False
    assert child.call(funcs.module_file, "hypothesis") == hypothesis.__file__
    assert not child.call(funcs.fetched, "hypothesis")  # imported there, not sent
    assert child.call(funcs.fetched, "tests.support.funcs")
    assert child.call(eval, probe) is True


def test_a_local_package_with_a_copy_cached_imports_its_own_submodules(router):
    """A context may hold a parent's copy of a package it also has itself (an intermediate
    keeps what it forwards to its children). The local package wins, and its submodules come
    from the same place, never from the cached copy."""
    import hypothesis.strategies

    child = router.local()
    assert child.call(funcs.fetch_copy, "hypothesis")  # cached, not imported
    path = child.call(eval, "__import__('hypothesis.strategies').strategies.__file__")
    assert path == hypothesis.strategies.__file__
    assert child.call(funcs.module_file, "hypothesis._native") == \
        sys.modules["hypothesis._native"].__file__


def test_namespace_package_and_zip_module(router, tmp_path, monkeypatch):
    ns = packages.unique_name("nspkg")
    (tmp_path / ns).mkdir()
    (tmp_path / ns / "part.py").write_text("def hello():\n    return 'from a namespace'\n")
    zipped = packages.unique_name("zipped")
    archive = tmp_path / "mods.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr(zipped + ".py", "def hello():\n    return 'from a zip'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(archive))
    part = importlib.import_module(ns + ".part")
    zmod = importlib.import_module(zipped)
    try:
        child = router.local()
        assert child.call(part.hello) == "from a namespace"
        assert child.call(zmod.hello) == "from a zip"
    finally:
        sys.modules.pop(ns, None)
        sys.modules.pop(ns + ".part", None)
        sys.modules.pop(zipped, None)


def test_blacklisted_module_fails_naming_the_policy(router, package):
    entry, names, _ = package
    router.responder.blacklist_prefix(names[0])
    early = router.local()
    with pytest.raises(mitogen.core.CallError, match="import policy"):
        early.call(entry.run)
    late = router.local()  # started after: it knows the policy itself
    kind, text = late.call(funcs.try_import, names[0])
    assert kind == "ImportError" and "import policy" in text


def test_native_extension_fails_at_once_and_is_remembered(router, tmp_path, monkeypatch):
    spec = importlib.util.find_spec("_testcapi")
    if spec is None or not spec.origin.endswith(".so"):
        pytest.skip("this interpreter has no _testcapi extension file to copy")
    name = packages.unique_name("extpkg")
    (tmp_path / name).mkdir()
    (tmp_path / name / "__init__.py").write_text("")
    shutil.copy(spec.origin, tmp_path / name / os.path.basename(spec.origin))
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.import_module(name + "._testcapi")  # the master can load it
    try:
        child = router.local()
        child.call(funcs.add, 1, 1)
        kind, text = child.call(funcs.try_import, name + "._testcapi")
        assert kind == "ImportError" and "no Python source" in text
        requests = router.get_stats()["get_module_count"]
        assert child.call(funcs.try_import, name + "._testcapi")[0] == "ImportError"
        assert router.get_stats()["get_module_count"] == requests
        assert router.get_stats()["bad_load_module_count"] >= 1
    finally:
        sys.modules.pop(name, None)
        sys.modules.pop(name + "._testcapi", None)


GUARDED = """
import os
import mitogen.master

def child_pid():
    return os.getpid()

if __name__ == '__main__':
    with mitogen.master.Router() as router:
        child = router.local()
        print('child pid', child.call(child_pid) != os.getpid())
"""

UNGUARDED = """
import os
import mitogen.core
import mitogen.master

def child_pid():
    return os.getpid()

with mitogen.master.Router() as router:
    child = router.local()
    try:
        child.call(child_pid)
    except mitogen.core.CallError as e:
        print('refused:', e)
"""


@pytest.mark.parametrize("script,expected", [
    (GUARDED, "child pid True"),
    (UNGUARDED, "refused: builtins.ImportError: refusing to send __main__"),
])
def test_functions_of_the_main_script(tmp_path, script, expected):
    path = tmp_path / "script.py"
    path.write_text(textwrap.dedent(script))
    out = subprocess.run([sys.executable, str(path)], capture_output=True, text=True,
                         timeout=60, check=False)
    assert expected in out.stdout, (out.stdout, out.stderr)
    if "refused" in expected:
        assert "if __name__ == '__main__':" in out.stdout


def test_forward_modules_preloads_a_grandchild_through_each_hop(router, package):
    entry, names, _ = package
    middle = router.local(name="middle")
    leaf = router.local(name="leaf", via=middle)
    leaf.call(funcs.add, 1, 1)
    middle_before = middle.call(funcs.importer_requests)
    leaf_before = leaf.call(funcs.importer_requests)
    router.responder.forward_modules(leaf, [names[1]])
    # FORWARD_MODULE and the call travel the same ordered streams: no request is needed.
    assert leaf.call(entry.run) == packages.expected_sum()
    assert leaf.call(funcs.importer_requests) == leaf_before
    assert middle.call(funcs.importer_requests) == middle_before


def test_a_module_larger_than_max_message_size_fails_its_import_cleanly(tmp_path, monkeypatch):
    name = packages.unique_name("bigmod")
    (tmp_path / (name + ".py")).write_text(
        "DATA = %r\n\ndef size():\n    return len(DATA)\n" % (os.urandom(40000).hex(),))
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module(name)
    try:
        with mitogen.master.Router(max_message_size=32768) as router:
            child = router.local()
            with pytest.raises(mitogen.core.CallError, match="too large to send"):
                child.call(module.size)
            assert child.call(os.getpid) > 0
    finally:
        sys.modules.pop(name, None)
