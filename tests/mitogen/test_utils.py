"""mitogen.utils: logging set-up, cast(), sys.path and GIL tuning, a router's lifetime."""

from __future__ import annotations

import collections
import enum
import logging
import re
import sys
import time
import types
from typing import Any, Iterator, List, NamedTuple

import pytest

import mitogen
import mitogen.utils
from mitogen.utils import (
    cast,
    disable_site_packages,
    log_to_file,
    run_with_router,
    setup_gil,
    with_router,
)

LINE_FORMAT = re.compile(r"^\d\d:\d\d:\d\d\.\d{6} [A-Z] [\w.]+: .*$")


@pytest.fixture(autouse=True)
def restore_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Undo every logging change a test makes, closing the handlers it added."""
    monkeypatch.delenv("MITOGEN_LOG_LEVEL", raising=False)
    root = logging.getLogger()
    io_logger = logging.getLogger("mitogen.io")
    handlers, root_level, io_level = list(root.handlers), root.level, io_logger.level
    yield
    for handler in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(handler)
        handler.close()
    root.setLevel(root_level)
    io_logger.setLevel(io_level)


def installed_handlers() -> List[logging.Handler]:
    return [h for h in logging.getLogger().handlers if h.get_name() == "mitogen.utils.log_to_file"]


def test_public_names() -> None:
    assert sorted(mitogen.utils.__all__) == [
        "cast", "disable_site_packages", "log_get_formatter", "log_levels_configure",
        "log_to_file", "run_with_router", "setup_gil", "with_router",
    ]


# -- log_to_file --------------------------------------------------------------------------------


def test_log_format_to_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    log_to_file()
    created = 1700000000.123456
    record = logging.makeLogRecord({
        "name": "mitogen.demo", "levelno": logging.WARNING, "levelname": "WARNING",
        "msg": "disk %s", "args": ("full",), "created": created,
    })
    logging.getLogger().handle(record)
    clock = time.strftime("%H:%M:%S", time.localtime(created))
    assert capsys.readouterr().err == f"{clock}.123456 W mitogen.demo: disk full\n"


def test_default_level_is_info(capsys: pytest.CaptureFixture[str]) -> None:
    log_to_file()
    logging.getLogger("mitogen.demo").debug("hidden")
    logging.getLogger("mitogen.demo").info("shown")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].endswith(" I mitogen.demo: shown")
    assert LINE_FORMAT.match(lines[0])


def test_environment_overrides_level(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MITOGEN_LOG_LEVEL", "debug")
    log_to_file(level="ERROR")
    assert logging.getLogger().level == logging.DEBUG
    logging.getLogger("mitogen.demo").debug("shown")
    assert capsys.readouterr().err.endswith(" D mitogen.demo: shown\n")


def test_io_level_enables_io_logger(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    log_to_file(level="DEBUG")
    logging.getLogger("mitogen.io").debug("bytes hidden")
    logging.getLogger("mitogen.demo").debug("debug shown")
    assert capsys.readouterr().err.count("\n") == 1

    monkeypatch.setenv("MITOGEN_LOG_LEVEL", "IO")
    log_to_file(level="INFO")
    assert logging.getLogger().level == logging.DEBUG
    assert logging.getLogger("mitogen.io").level == logging.DEBUG
    logging.getLogger("mitogen.io").debug("bytes shown")
    assert capsys.readouterr().err.endswith(" D mitogen.io: bytes shown\n")


def test_io_logger_follows_a_quieter_level(capsys: pytest.CaptureFixture[str]) -> None:
    log_to_file(level="IO")
    log_to_file(level="WARNING")
    logging.getLogger("mitogen.io").info("hidden")
    assert capsys.readouterr().err == ""


def test_second_call_replaces_handler(capsys: pytest.CaptureFixture[str]) -> None:
    before = len(logging.getLogger().handlers)
    log_to_file()
    log_to_file()
    assert len(logging.getLogger().handlers) == before + 1
    logging.getLogger("mitogen.demo").warning("once")
    assert capsys.readouterr().err.count("once") == 1


def test_log_to_path_then_back_to_stderr(tmp_path: Any) -> None:
    path = tmp_path / "mitogen.log"
    path.write_text("left from an earlier run\n")
    log_to_file(str(path), level="DEBUG")
    file_handler = installed_handlers()[0]
    logging.getLogger("mitogen.demo").debug("to the file")
    text = path.read_text()
    assert "earlier run" not in text
    assert text.endswith(" D mitogen.demo: to the file\n") and LINE_FORMAT.match(text)

    log_to_file()  # the file handler is replaced and its file closed
    assert installed_handlers() != [file_handler]
    assert file_handler.stream is None  # type: ignore[attr-defined]
    logging.getLogger("mitogen.demo").warning("to stderr")
    assert "to stderr" not in path.read_text()


def test_accepts_path_objects_and_numeric_levels(tmp_path: Any) -> None:
    path = tmp_path / "numeric.log"
    log_to_file(path, level=logging.WARNING)
    assert logging.getLogger().level == logging.WARNING
    logging.getLogger("mitogen.demo").error("boom")
    assert path.read_text().endswith(" E mitogen.demo: boom\n")


def test_unknown_level_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="'LOUD'"):
        log_to_file(level="LOUD")
    monkeypatch.setenv("MITOGEN_LOG_LEVEL", "chatty")
    with pytest.raises(ValueError, match=r"'chatty' \(from \$MITOGEN_LOG_LEVEL\)"):
        log_to_file()
    assert installed_handlers() == []


# -- cast ---------------------------------------------------------------------------------------


class MyStr(str):
    def __str__(self) -> str:
        return "overridden"


class MyBytes(bytes):
    def __bytes__(self) -> bytes:
        return b"overridden"


class MyList(list):
    pass


class MyTuple(tuple):
    pass


class Point(NamedTuple):
    x: int
    y: int


class Colour(enum.IntEnum):
    RED = 1


class Celsius(float):
    pass


def assert_plain(obj: Any) -> None:
    """Fail unless `obj` and everything inside it has an exact built-in type."""
    assert type(obj) in (dict, list, tuple, str, bytes, int, float, bool, type(None)), type(obj)
    if isinstance(obj, dict):
        for key, value in obj.items():
            assert_plain(key)
            assert_plain(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            assert_plain(value)


def test_cast_plain_values_come_back_unchanged() -> None:
    for value in ["text", b"bytes", 7, 2.5, True, None]:
        assert cast(value) is value
    value = {"a": [1, [2, "x"]], b"k": None, (1, "t"): 0.5}
    assert cast(value) == value
    assert_plain(cast(value))


def test_cast_turns_tuples_into_lists_as_mitogen_does() -> None:
    assert cast((1, (2, [3, (4,)]))) == [1, [2, [3, [4]]]]
    # A tuple used as a dict key stays a tuple (a list cannot be a key).
    result = cast({(1, (2, 3)): (4, 5)})
    assert result == {(1, (2, 3)): [4, 5]}
    assert type(next(iter(result))) is tuple


@pytest.mark.parametrize(("given", "expected"), [
    (MyStr("abc"), "abc"),
    (MyBytes(b"abc"), b"abc"),
    (MyList([1, 2]), [1, 2]),
    (MyTuple((1, 2)), [1, 2]),
    (Point(1, 2), [1, 2]),
    (collections.OrderedDict(a=1), {"a": 1}),
    (collections.defaultdict(list, a=[1]), {"a": [1]}),
    (Colour.RED, 1),
    (Celsius(21.5), 21.5),
], ids=lambda value: type(value).__name__)
def test_cast_subclass_to_plain_type(given: Any, expected: Any) -> None:
    result = cast(given)
    assert result == expected
    assert type(result) is type(expected)


def test_cast_is_recursive_keys_included() -> None:
    given = collections.OrderedDict([
        (MyStr("k"), MyList([Point(1, 2), {MyBytes(b"b"): MyTuple((Colour.RED, MyStr("s")))}])),
        ((MyStr("t"), 1), None),
    ])
    result = cast(given)
    assert result == {"k": [[1, 2], {b"b": [1, "s"]}], ("t", 1): None}
    assert_plain(result)


def test_cast_does_not_modify_its_argument() -> None:
    inner = MyList([MyStr("a")])
    given = {"x": inner}
    cast(given)
    assert type(given["x"]) is MyList and type(inner[0]) is MyStr


@pytest.mark.parametrize("value", [object(), {1, 2}, bytearray(b"x"), 1j, len],
                         ids=lambda value: type(value).__name__)
def test_cast_refuses_other_types_naming_them(value: Any) -> None:
    with pytest.raises(TypeError, match=re.escape(type(value).__qualname__)):
        cast({"nested": [value]})


def test_cast_names_the_module_of_a_foreign_type() -> None:
    expected = r"cannot cast tests\.mitogen\.test_utils\._odd\.<locals>\.Odd "
    with pytest.raises(TypeError, match=expected):
        cast([_odd()])


def _odd() -> Any:
    class Odd:
        pass

    return Odd()


def test_cast_refuses_a_container_holding_itself() -> None:
    looped: List[Any] = [1]
    looped.append({"again": looped})
    with pytest.raises(ValueError, match="list that contains itself"):
        cast(looped)
    shared = [1]
    assert cast([shared, shared]) == [[1], [1]]  # shared but not cyclic is fine


@pytest.fixture
def fake_core(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """A stand-in mitogen.core holding only the types cast() looks for."""
    core = types.ModuleType("mitogen.core")
    for name, base in [("Blob", bytes), ("Secret", str), ("Kwargs", dict)]:
        setattr(core, name, type(name, (base,), {}))
    for name in ["Context", "Sender", "CallError"]:
        setattr(core, name, type(name, (), {}))
    monkeypatch.setitem(sys.modules, "mitogen.core", core)
    monkeypatch.setattr(mitogen, "core", core, raising=False)
    return core


def test_cast_keeps_mitogen_core_types(fake_core: types.ModuleType) -> None:
    blob, secret = fake_core.Blob(b"\0" * 4), fake_core.Secret("hunter2")
    context, sender, error = fake_core.Context(), fake_core.Sender(), fake_core.CallError()
    kwargs = fake_core.Kwargs(opts=MyList([MyStr("v"), secret]))
    result = cast([blob, secret, context, sender, error, kwargs])
    assert result[:5] == [blob, secret, context, sender, error]
    assert all(a is b for a, b in zip(result[:5], [blob, secret, context, sender, error]))
    assert type(result[5]) is fake_core.Kwargs and result[5] is not kwargs
    assert result[5] == {"opts": ["v", "hunter2"]}
    assert type(result[5]["opts"][0]) is str and result[5]["opts"][1] is secret


def test_cast_works_without_mitogen_core(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mitogen.core", None)  # makes the import fail
    monkeypatch.delattr(mitogen, "core", raising=False)
    assert cast(MyList([MyStr("a")])) == ["a"]
    with pytest.raises(TypeError, match="object"):
        cast(object())


def test_cast_with_the_real_mitogen_core() -> None:
    import mitogen.core

    secret = mitogen.core.Secret("pw")
    result = cast(mitogen.core.Kwargs(password=secret, names=Point(1, 2)))
    assert type(result) is mitogen.core.Kwargs
    assert result["password"] is secret and type(result["names"]) is list


# -- process set-up -----------------------------------------------------------------------------


def test_disable_site_packages_edits_sys_path_in_place(monkeypatch: pytest.MonkeyPatch) -> None:
    path = [
        "",
        "/usr/lib/python3.11",
        "/usr/lib/python3/dist-packages",
        "/venv/lib/python3.11/site-packages",
        "/home/u/.local/lib/python3.11/site-packages/thing-1.0.egg",
        "C:\\Python311\\Lib\\site-packages",
        "/src/site-packages-tools",
        "/opt/app",
    ]
    monkeypatch.setattr(sys, "path", path)
    disable_site_packages()
    assert sys.path is path
    assert path == ["", "/usr/lib/python3.11", "/src/site-packages-tools", "/opt/app"]


def test_setup_gil_shortens_switch_interval() -> None:
    previous = sys.getswitchinterval()
    try:
        sys.setswitchinterval(0.005)
        setup_gil()
        assert sys.getswitchinterval() == pytest.approx(0.001)
    finally:
        sys.setswitchinterval(previous)


# -- run_with_router / with_router --------------------------------------------------------------


@pytest.fixture
def fake_master(monkeypatch: pytest.MonkeyPatch) -> List[str]:
    """Put a stand-in mitogen.master in place; return the list of what happened to it."""
    events: List[str] = []

    class Broker:
        def shutdown(self) -> None:
            events.append("shutdown")

        def join(self) -> None:
            events.append("join")

    class Router:
        fail = False

        def __init__(self, broker: Broker) -> None:
            if Router.fail:
                raise RuntimeError("router failed")
            self.broker = broker
            events.append("router")

    master = types.ModuleType("mitogen.master")
    master.Broker = Broker  # type: ignore[attr-defined]
    master.Router = Router  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "mitogen.master", master)
    monkeypatch.setattr(mitogen, "master", master, raising=False)
    return events


def test_run_with_router_passes_router_and_arguments(fake_master: List[str]) -> None:
    def work(router: Any, a: int, b: int = 0) -> tuple:
        fake_master.append("work")
        return type(router).__name__, type(router.broker).__name__, a, b

    assert run_with_router(work, 1, b=2) == ("Router", "Broker", 1, 2)
    assert fake_master == ["router", "work", "shutdown", "join"]


def test_run_with_router_shuts_down_when_func_raises(fake_master: List[str]) -> None:
    def work(router: Any) -> None:
        raise KeyError("inside")

    with pytest.raises(KeyError, match="inside"):
        run_with_router(work)
    assert fake_master == ["router", "shutdown", "join"]


def test_run_with_router_shuts_down_when_router_fails(fake_master: List[str]) -> None:
    sys.modules["mitogen.master"].Router.fail = True  # type: ignore[attr-defined]
    with pytest.raises(RuntimeError, match="router failed"):
        run_with_router(lambda router: None)
    assert fake_master == ["shutdown", "join"]


def test_with_router_wraps(fake_master: List[str]) -> None:
    def work(router: Any, value: int) -> int:
        """Double it."""
        fake_master.append("work")
        return value * 2

    work.marker = "kept"  # type: ignore[attr-defined]
    wrapped = with_router(work)
    assert (wrapped.__name__, wrapped.__doc__, wrapped.marker) == ("work", "Double it.", "kept")
    assert wrapped.__wrapped__ is work  # type: ignore[attr-defined]
    assert wrapped(21) == 42
    with pytest.raises(TypeError):
        wrapped()  # the router is supplied, the value is still required
    assert fake_master == ["router", "work", "shutdown", "join", "router", "shutdown", "join"]


def test_run_with_router_with_the_real_master() -> None:
    """The real Broker and Router: the broker thread must be gone when the call returns."""
    import mitogen.master

    def context_id_of_master(router: Any) -> int:
        assert isinstance(router, mitogen.master.Router)
        return router.myself().context_id

    assert run_with_router(context_id_of_master) == 0


def test_log_level_io_logs_the_bytes_of_each_read_and_write(tmp_path: Any) -> None:
    import mitogen.master
    from tests.support import funcs

    path = tmp_path / "io.log"
    log_to_file(str(path), level="IO")
    with mitogen.master.Router() as router:
        child = router.local(name="io-child")
        assert child.call(funcs.add, 20, 22) == 42
    records = [line for line in path.read_text().splitlines() if " mitogen.io: " in line]
    assert all(LINE_FORMAT.match(line) for line in records)
    wrote = [r for r in records if re.search(r"mitogen\.io: local\.\d+: wrote \d+ bytes: b'MJ", r)]
    read = [r for r in records if re.search(r"mitogen\.io: local\.\d+: read \d+ bytes: b'MJ", r)]
    assert wrote and read, records
    assert any("tests.support.funcs" in r for r in wrote)  # the call, as its bytes show it


def test_without_io_level_nothing_is_logged_on_mitogen_io(tmp_path: Any) -> None:
    import mitogen.master
    from tests.support import funcs

    path = tmp_path / "debug.log"
    log_to_file(str(path), level="DEBUG")
    with mitogen.master.Router() as router:
        router.local(name="quiet-child").call(funcs.add, 1, 1)
    assert " mitogen.io: " not in path.read_text()
