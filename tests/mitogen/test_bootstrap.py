"""Starting children: the boot command, the payload, and every way a start can fail."""

from __future__ import annotations

import base64
import logging
import os
import subprocess
import sys
import threading
import zlib

import pytest

import mitogen.core
import mitogen.master
import mitogen.parent
from tests.support import funcs

CORE_PATH = mitogen.core.__file__


def test_core_is_self_contained_and_stdlib_only():
    """Exec the bootstrap source in a bare interpreter: it imports nothing but the stdlib
    and has no import-time side effects (no thread, no output)."""
    script = (
        "import sys, threading\n"
        "before = set(sys.modules)\n"
        "src = open(sys.argv[1]).read()\n"
        "exec(compile(src, 'core', 'exec'), {'__name__': 'bootstrap_check'})\n"
        "new = sorted(set(sys.modules) - before)\n"
        "import sysconfig\n"
        "stdlib = sysconfig.get_paths()['stdlib']\n"
        "bad = [m for m in new if getattr(sys.modules[m], '__file__', None) and\n"
        "       not sys.modules[m].__file__.startswith(stdlib)]\n"
        "assert not bad, bad\n"
        "assert threading.active_count() == 1\n"
        "print('ok', len(new))\n"
    )
    out = subprocess.run([sys.executable, "-I", "-S", "-c", script, CORE_PATH],
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok ")
    assert out.stderr == ""


def test_payload_is_at_most_16_kib():
    config = {"context_id": 1, "parent_ids": [0], "name": "x" * 40}
    payload = mitogen.parent.build_payload(config)
    assert len(payload) <= 16 * 1024, len(payload)
    source = zlib.decompress(payload)
    assert source.rstrip().endswith(b"ExternalContext(%r).main()" % (config,))


def _fresh_image(monkeypatch, *paths):
    monkeypatch.setattr(mitogen.parent, "_image_cache_paths",
                        lambda core_path, key: [str(p) for p in paths])
    return mitogen.parent._master_core_image()


def test_boot_image_is_cached_and_reused(tmp_path, monkeypatch):
    """The minified, compressed core is written beside the bytecode cache once; a later
    master reads it instead of minifying again, and builds the same payload from it."""
    monkeypatch.setattr(sys, "dont_write_bytecode", False)
    cache = tmp_path / "core.boot-image"
    built = _fresh_image(monkeypatch, cache)
    assert cache.exists()

    def no_minify(source):
        raise AssertionError("the cached image should have been used")

    monkeypatch.setattr("mitogen.minify.for_boot", no_minify)
    read = _fresh_image(monkeypatch, cache)
    assert read == built
    assert read.source == mitogen.parent.get_core_source()
    monkeypatch.setattr(mitogen.parent, "_core_image", read)
    config = {"context_id": 7, "parent_ids": [0]}
    assert zlib.decompress(mitogen.parent.build_payload(config)) == \
        read.source + b"ExternalContext(%r).main()\n" % (config,)


def test_boot_image_falls_back_to_a_private_user_cache(tmp_path, monkeypatch):
    """A read-only installation caches the image in the user's own cache directory, and
    only if nobody else can write there (the image becomes every child's code)."""
    monkeypatch.setattr(sys, "dont_write_bytecode", False)
    user = tmp_path / "home-cache"
    user.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_CACHE_HOME", str(user))
    cache_paths = mitogen.parent._image_cache_paths
    paths = cache_paths("/nonexistent/mitogen/core.py", "KEY")
    assert paths[1] == str(user / "mitogen-tree" / "core-KEY.boot-image")
    (tmp_path / "a-file").write_text("")  # not a directory: even root cannot write there
    unwritable = tmp_path / "a-file" / "core.boot-image"
    built = _fresh_image(monkeypatch, unwritable, paths[1])
    assert (user / "mitogen-tree" / "core-KEY.boot-image").exists()
    assert built.source == mitogen.parent.get_core_source()
    user.chmod(0o777)
    assert len(cache_paths("/x/core.py", "KEY")) == 1


@pytest.mark.parametrize("content", [
    b"",
    b"garbage",
    b"mitogen-core-image 1 0123 5\nnot zlib",
    b"mitogen-core-image 2 0123 5 -3 1\nnot zlib",
])
def test_stale_or_damaged_boot_image_is_rebuilt(tmp_path, monkeypatch, content):
    monkeypatch.setattr(sys, "dont_write_bytecode", False)
    cache = tmp_path / "core.boot-image"
    cache.write_bytes(content)
    image = _fresh_image(monkeypatch, cache)
    assert image.source == mitogen.parent.get_core_source()
    assert cache.read_bytes().startswith(b"mitogen-core-image 2 ")
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("damage", ["source checksum", "bytecode checksum",
                                    "bytecode length", "truncated"])
def test_boot_image_with_a_wrong_checksum_is_rebuilt(tmp_path, monkeypatch, damage):
    monkeypatch.setattr(sys, "dont_write_bytecode", False)
    cache = tmp_path / "core.boot-image"
    good = _fresh_image(monkeypatch, cache)
    assert good.bytecode
    header, _, body = cache.read_bytes().partition(b"\n")
    fields = header.split(b" ")
    if damage == "truncated":
        cache.write_bytes(header + b"\n" + body[:-1])
    else:
        index = {"source checksum": 3, "bytecode length": 4, "bytecode checksum": 5}[damage]
        fields[index] = b"%d" % (int(fields[index]) + 1,)
        cache.write_bytes(b" ".join(fields) + b"\n" + body)
    assert _fresh_image(monkeypatch, cache) == good
    assert cache.read_bytes() == header + b"\n" + body


def test_with_bytecode_writing_off_the_image_goes_to_the_user_cache_only(tmp_path,
                                                                        monkeypatch):
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    beside, user = tmp_path / "pycache", tmp_path / "user"
    image = _fresh_image(monkeypatch, beside / "core.boot-image", user / "core.boot-image")
    assert image.source == mitogen.parent.get_core_source()
    assert not beside.exists()
    assert (user / "core.boot-image").read_bytes().startswith(b"mitogen-core-image 2 ")


def test_unwritable_boot_image_cache_is_ignored(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "dont_write_bytecode", False)
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    image = _fresh_image(monkeypatch, blocker / "core.boot-image")
    assert image.source == mitogen.parent.get_core_source()


def test_first_stage_preimports_only_what_the_core_imports():
    """The new interpreter imports the core's heavy stdlib modules while the first stage
    still compiles the core: the list must stay a subset of the core's own imports."""
    import ast

    line = next(part for part in mitogen.parent.FIRST_STAGE.split('b"')[1:]
                if part.startswith("import marshal"))
    preloaded = line.split(";")[0][len("import "):].split(",")
    with open(CORE_PATH) as f:
        tree = ast.parse(f.read())
    imported = {alias.name for node in tree.body if isinstance(node, ast.Import)
                for alias in node.names}
    assert len(preloaded) > 5
    assert set(preloaded) <= imported, set(preloaded) - imported


def _run_first_stage(payload: bytes) -> subprocess.CompletedProcess:
    """The boot command without a parent: the payload goes in once MITO000 is out."""
    options = mitogen.parent.Options(max_message_size=1 << 20, name="first-stage-test")
    argv = mitogen.parent.Connection(options, router=_NoRouter()).get_boot_command()
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdin is not None
    assert proc.stdout.readline() == mitogen.parent.BOOT_START
    out, err = proc.communicate(payload, timeout=60)
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def _first_stage_payload(source: bytes, bytecode_source: bytes | None,
                         magic: bytes = b"") -> bytes:
    """Source and bytecode in the payload's framing; the last source line always runs."""
    import importlib.util
    import marshal

    bytecode = b""
    if bytecode_source is not None:
        code = compile(bytecode_source, "mitogen/core.py", "exec", dont_inherit=True)
        bytecode = zlib.compress((magic or importlib.util.MAGIC_NUMBER) + marshal.dumps(code))
    compressed = zlib.compress(source)
    return b"%08d%s%08d%s" % (len(compressed), compressed, len(bytecode), bytecode)


@pytest.mark.parametrize("bytecode_source,magic,expected", [
    (None, b"", b"source"),
    (b"WHERE = 'bytecode'\n", b"", b"bytecode"),
    (b"WHERE = 'bytecode'\n", b"\0\0\r\n", b"source"),  # another Python's magic number
])
def test_first_stage_runs_the_bytecode_only_with_its_own_magic_number(bytecode_source,
                                                                      magic, expected):
    """The core's bytecode replaces compiling its source, in a Python with the same magic
    number only; the configuration line is compiled and run either way."""
    source = b"WHERE = 'source'\nimport os; os.write(1, WHERE.encode())\n"
    done = _run_first_stage(_first_stage_payload(source, bytecode_source, magic))
    assert done.returncode == 0, done.stderr
    assert done.stdout == mitogen.parent.BOOT_DONE + expected, done.stdout


def test_children_on_this_machine_get_bytecode_and_ssh_children_do_not():
    import mitogen.ssh

    options = mitogen.parent.Options(max_message_size=1 << 20, name="payload-test")
    local = mitogen.parent.Connection(options, router=_NoRouter())  # type: ignore[arg-type]
    local.get_econtext_config = lambda: {"context_id": 5, "parent_ids": [0]}
    preamble = local.get_preamble()
    size = len(preamble)
    assert local.payload[:8 + size] == b"%08d" % (size,) + preamble
    bytecode = local.payload[16 + size:]
    assert int(local.payload[8 + size:16 + size]) == len(bytecode) > 16 * 1024
    assert bytecode == mitogen.parent.get_core_bytecode()
    assert mitogen.parent.Connection.sends_bytecode
    assert not mitogen.ssh.Connection.sends_bytecode


def test_minified_core_keeps_line_numbers():
    source = mitogen.parent.get_core_source().decode()
    with open(CORE_PATH) as f:
        original = f.read().splitlines()
    minified = source.splitlines()
    assert len(minified) == len(original)
    line = next(i for i, text in enumerate(original) if "def _verify_source" in text)
    assert "def _verify_source" in minified[line]


def test_boot_command_carries_the_compressed_first_stage():
    options = mitogen.parent.Options(max_message_size=1 << 20, name="boot-test")
    conn = mitogen.parent.Connection(options, router=_NoRouter())  # type: ignore[arg-type]
    argv = conn.get_boot_command()
    assert argv[0] == sys.executable
    assert argv[argv.index("-c") + 1] == mitogen.parent.STUB
    first_stage = zlib.decompress(base64.b64decode(argv[-2])).decode()
    assert first_stage == mitogen.parent.FIRST_STAGE
    assert argv[-1] == "boot-test"
    assert sum(len(a) for a in argv) < 1200


class _NoRouter:
    broker = None


def test_bad_python_path_is_a_clear_error(router):
    with pytest.raises(mitogen.core.StreamError, match="/nonexistent/python"):
        router.local(python_path="/nonexistent/python")


def test_child_that_dies_during_boot_gives_eof_error_with_its_output(router):
    with pytest.raises(mitogen.parent.EofError) as info:
        router.local(python_path=["/bin/sh", "-c", "echo interpreter-exploded >&2; exit 3"])
    assert "interpreter-exploded" in str(info.value)


def test_connect_timeout_gives_timeout_error_and_kills_the_child(router):
    with pytest.raises(mitogen.core.TimeoutError, match="connect_timeout"):
        router.local(python_path=["/bin/sh", "-c", "exec sleep 60"], connect_timeout=0.3)


class _Seen(logging.Handler):
    def __init__(self, needle: str) -> None:
        super().__init__(logging.DEBUG)
        self.needle = needle
        self.event = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.needle in record.getMessage():
            self.event.set()


def test_broker_shutdown_during_connect_gives_cancelled_error():
    seen = _Seen("child-is-waiting")
    logger = logging.getLogger("mitogen.stderr")
    logger.addHandler(seen)
    old_level = logger.level
    logger.setLevel(logging.DEBUG)
    errors = []
    try:
        with mitogen.master.Router() as router:
            def connect():
                try:
                    router.local(python_path=[
                        "/bin/sh", "-c", "echo child-is-waiting >&2; exec sleep 60"])
                except Exception as e:
                    errors.append(e)

            thread = threading.Thread(target=connect)
            thread.start()
            assert seen.event.wait(30)
            router.broker.shutdown()
            thread.join(30)
    finally:
        logger.removeHandler(seen)
        logger.setLevel(old_level)
    (error,) = errors
    assert type(error) is mitogen.parent.CancelledError
    # A plain message: the stream's name and why, no internal repr, no child output.
    name, _, text = str(error).partition(": ")
    assert name.startswith("local.") and text == mitogen.parent.BROKER_SHUTDOWN_MSG


def test_context_ids_follow_mitogen(router):
    first = router.local()
    second = router.local()
    assert (first.context_id, second.context_id) == (1, 2)


def test_child_keeps_the_core_source_for_its_own_children(router):
    child = router.local()
    assert child.call(_child_core_source_length) == len(mitogen.parent.get_core_source())


def _child_core_source_length():
    return len(mitogen.parent.get_core_source())


def test_stdin_of_the_child_is_dev_null(router):
    child = router.local()
    assert child.call(os.readlink, "/proc/self/fd/0") == "/dev/null"
    assert child.call(funcs.identity, 5) == 5


# --- how a boot ends, and what it leaves


def test_broker_shut_down_before_connect_gives_cancelled_error_with_a_plain_message():
    router = mitogen.master.Router()
    router.broker.shutdown()
    router.broker.join()
    with pytest.raises(mitogen.parent.CancelledError) as info:
        router.local()
    assert str(info.value) == mitogen.parent.BROKER_SHUTDOWN_MSG


@pytest.mark.parametrize(("command", "expected"), [
    ("kill -SEGV $$", "child killed by SIGSEGV (exit status -11) during bootstrap"),
    ("kill -TERM $$", "child killed by SIGTERM (exit status -15) during bootstrap"),
    ("exit 3", "child exited with status 3 during bootstrap"),
])
def test_a_child_that_dies_during_boot_says_how(router, command, expected):
    with pytest.raises(mitogen.parent.EofError) as info:
        router.local(python_path=["/bin/sh", "-c", command])
    assert expected in str(info.value)


def test_returncode_to_str_names_the_signal():
    assert mitogen.parent.returncode_to_str(-9) == "killed by SIGKILL (exit status -9)"
    assert mitogen.parent.returncode_to_str(0) == "exited with status 0"
    assert mitogen.parent.SIGNAL_BY_NUM[11] == "SIGSEGV"


def test_a_local_child_boots_in_one_interpreter(router):
    """No fork and no second interpreter: the process this one started runs the context,
    named on its command line, and boots children of its own from the source it kept."""
    child = router.local(name="in-place")
    argv = child.call(funcs.cmdline)
    assert argv[0] == mitogen.parent.get_sys_executable() + "(mitogen:in-place)"
    assert argv[1:4] == ["-S", "-c", mitogen.parent.STUB]
    assert child.call(funcs.child_processes) == []
    grandchild = router.local(via=child)
    assert grandchild.call(funcs.cmdline)[1:3] == ["-S", "-c"]
    assert grandchild.call(os.getppid) == child.call(os.getpid)


def test_a_wrapped_python_boots_with_the_first_stage(router):
    """A python_path of more than the interpreter (a wrapper, options) gets the usual
    first stage: its second interpreter is what the context runs in."""
    child = router.local(name="staged", python_path=[sys.executable, "-E"])
    assert child.call(funcs.cmdline) == [sys.executable + "(mitogen:staged)", "-S"]
    assert child.call(funcs.child_processes) == []
    grandchild = router.local(via=child, python_path=[sys.executable, "-E"])
    assert grandchild.call(os.getppid) == child.call(os.getpid)


@pytest.mark.parametrize("method, in_place", [
    ("local", True), ("ssh", False), ("sudo", False), ("docker", False), ("fork", False),
])
def test_only_a_python_this_process_starts_itself_boots_in_place(method, in_place):
    conn_class = mitogen.parent.get_connection_class(method)
    options = conn_class.options_class(max_message_size=1 << 20, **(
        {"hostname": "h"} if method == "ssh" else {"container": "c"} if method == "docker"
        else {}))
    assert conn_class(options, router=_NoRouter()).boots_in_place is in_place  # type: ignore


def test_the_child_closes_the_boot_descriptors_and_reaps_the_first_stage(router):
    child = router.local()
    fds = child.call(funcs.open_fds)
    assert not {100, 101, 102} & set(fds), fds
    # The first stage was its child: reaped, so not even a zombie is left.
    assert child.call(funcs.child_processes) == []


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.texts: list = []
        self.event = threading.Event()
        self.wanted = None

    def emit(self, record: logging.LogRecord) -> None:
        self.texts.append(record.getMessage())
        if self.wanted and self.wanted in record.getMessage():
            self.event.set()


def test_childs_stdout_is_line_buffered(router, caplog):
    caplog.set_level(logging.INFO)  # a child forwards its stdout at INFO
    handler = _Lines()
    handler.wanted = marker = "a-line-without-flush"
    logger = logging.getLogger("mitogen.ctx")
    logger.addHandler(handler)
    try:
        child = router.local(name="printer")
        recv = mitogen.core.Receiver(router)
        result = child.call_async(funcs.print_then_wait, recv.to_sender(), marker)
        go = recv.get(timeout=30).unpickle()
        # The child now waits for us: its line must already have arrived.
        assert handler.event.wait(30), handler.texts
        go.send("done")
        assert result.get(timeout=30).unpickle() == "done"
        recv.close()
    finally:
        logger.removeHandler(handler)


# --- the interpreter and the exec hook


def test_empty_sys_executable_falls_back_to_usr_bin_python3(monkeypatch, caplog):
    if not os.access("/usr/bin/python3", os.X_OK):
        pytest.skip("no /usr/bin/python3 on this machine")
    monkeypatch.setattr(sys, "executable", "")
    monkeypatch.setattr(mitogen.parent, "_sys_executable_warned", set())
    with caplog.at_level(logging.WARNING, logger="mitogen"):
        options = mitogen.parent.Options(max_message_size=1 << 20)
    assert options.python_path == ["/usr/bin/python3"]
    assert "sys.executable is empty, so children are started with /usr/bin/python3" \
        in caplog.text


def test_unusable_sys_executable_falls_back_with_a_warning_once(monkeypatch, caplog, tmp_path):
    if not os.access("/usr/bin/python3", os.X_OK):
        pytest.skip("no /usr/bin/python3 on this machine")
    not_executable = tmp_path / "python"
    not_executable.write_text("")
    monkeypatch.setattr(sys, "executable", str(not_executable))
    monkeypatch.setattr(mitogen.parent, "_sys_executable_warned", set())
    with caplog.at_level(logging.WARNING, logger="mitogen"):
        first = mitogen.parent.get_sys_executable()
        second = mitogen.parent.get_sys_executable()
    assert first == second == "/usr/bin/python3"
    assert caplog.text.count("sys.executable is") == 1


def test_preexec_hook_runs_in_each_new_child_before_exec(router, monkeypatch):
    def hook():
        os.environ["MITOGEN_PREEXEC_TEST"] = "pid %d" % os.getpid()

    monkeypatch.setattr(mitogen.core, "_preexec_hook", hook, raising=False)
    child = router.local()
    pid = child.call(os.getpid)
    # Run in the forked process before exec: its exec'd program (the child) has it.
    assert child.call(funcs.cwd_and_env, "MITOGEN_PREEXEC_TEST")[1] == "pid %d" % pid
    assert "MITOGEN_PREEXEC_TEST" not in os.environ
