"""mitogen.service: declaring and calling services, policies, activation, invokers, pools,
and the two file services."""

from __future__ import annotations

import hashlib
import logging
import os
import pwd
import re
import signal
import sys
import threading

import pytest

import mitogen.core
import mitogen.master
import mitogen.service
from mitogen.service import FileService, PushFileService
from tests.support import funcs, services
from tests.support.waiting import wait_for

GREETER = "tests.support.services.Greeter"
MIB = 1 << 20


@pytest.fixture
def pool(router):
    """The master's own pool, as a program would start it (one thread: calls run in order)."""
    pool = mitogen.service.Pool(router, services=[services.Greeter(router)], size=1)
    yield pool
    pool.stop()


# --- declaring and calling -------------------------------------------------------------------


def test_call_service_runs_an_exposed_method_with_checked_arguments(router, pool):
    me = router.myself()
    assert me.call_service(GREETER, "greet", name="world") == "hello world!"
    assert me.call_service(services.Greeter, "greet", name="you", punctuation="?") == \
        "hello you?"
    recv = me.call_service_async(services.Greeter, "ping")
    assert recv.get(timeout=10).unpickle() == "pong"
    assert mitogen.service.call(GREETER, "greet", call_context=me, name="x") == "hello x!"


def test_call_without_a_context_runs_in_this_process_on_the_calling_thread(router):
    pool = mitogen.service.get_or_create_pool(router=router)
    try:
        assert mitogen.service.call(GREETER, "greet", name="here") == "hello here!"
        # Activated by that call, in the process's pool.
        assert isinstance(pool.get_service(GREETER), services.Greeter)
    finally:
        pool.stop()


@pytest.mark.parametrize(("service", "method", "kwargs", "error"), [
    ("tests.support.services.NoSuch", "ping", {}, "unknown service"),
    ("no_such_module.Service", "ping", {}, "cannot import no_such_module"),
    ("os.path", "ping", {}, "has no Service class 'path'"),
    (GREETER, "no_such_method", {}, "has no method 'no_such_method'"),
    (GREETER, "unexposed", {}, "'unexposed' of service tests.support.services.Greeter is "
                               "not exposed"),
    (GREETER, "greet", {}, "greet(): required argument 'name' is missing"),
    (GREETER, "greet", {"name": 42}, "argument 'name' must be str, not int"),
    (GREETER, "greet", {"name": "x", "bogus": 1}, "unexpected keyword argument 'bogus'"),
    (GREETER, "caller", {"msg": "forged"}, "'msg' of 'caller' is set by the service"),
    (GREETER, "fail", {"text": "boom"}, "builtins.ValueError: boom"),
])
def test_bad_calls_fail_with_a_call_error_naming_the_problem(router, pool, service, method,
                                                             kwargs, error):
    with pytest.raises(mitogen.core.CallError, match=re.escape(error)):
        router.myself().call_service(service, method, **kwargs)
    assert router.myself().call_service(GREETER, "ping") == "pong"  # the pool carries on


def test_a_no_reply_method_runs_and_answers_nothing(router, pool):
    me = router.myself()
    silent = me.call_service_async(GREETER, "note", text="remember me")
    try:
        # One pool thread: by the time the next call is answered, the first has run, and a
        # reply of its own would have arrived before this one.
        assert me.call_service(GREETER, "notes_seen") == ["remember me"]
        assert silent.empty()
    finally:
        silent.close()


def test_methods_see_the_calling_context(router, pool, local):
    assert router.myself().call_service(GREETER, "caller") == (0, 0)
    src, auth = local.call(services.call_service, router.myself(), GREETER, "caller", {})
    assert src == auth == local.context_id


# --- policies and activation -----------------------------------------------------------------


def test_a_child_starts_its_pool_and_the_service_on_a_parents_first_call(router):
    child = router.local(name="child")
    assert not child.call(funcs.module_loaded, "mitogen.service")
    assert child.call_service(GREETER, "greet", name="child") == "hello child!"
    assert child.call(funcs.module_loaded, "mitogen.service")
    assert child.call(funcs.module_loaded, "tests.support.services")
    # A grandparent is a parent too.
    grandchild = router.local(name="grandchild", via=child)
    assert grandchild.call_service(GREETER, "ping") == "pong"


def test_a_sibling_can_neither_start_nor_call_parent_only_services(router):
    a = router.local(name="a")
    b = router.local(name="b")
    # b has no pool yet: a sibling may not start one.
    kind, text = a.call(services.call_service, b, GREETER, "ping", {})
    assert kind == "error" and "was not answered: refused by policy" in text
    assert not b.call(funcs.module_loaded, "mitogen.service")
    # The master starts Greeter in b; a may then use what AllowAny exposes, nothing more.
    assert b.call_service(GREETER, "ping") == "pong"
    assert a.call(services.call_service, b, GREETER, "ping", {}) == "pong"
    kind, text = a.call(services.call_service, b, GREETER, "greet", {"name": "a"})
    assert kind == "error"
    assert "context %d may not call 'greet'" % a.context_id in text
    assert "AllowParents" in text
    kind, text = a.call(services.call_service, b, "tests.support.services.ParentsOnly",
                        "ping", {})
    assert kind == "error" and "only a parent may start it" in text
    assert b.call_service(GREETER, "greet", name="master") == "hello master!"


# --- invokers and pools ----------------------------------------------------------------------


def test_identical_concurrent_calls_share_one_execution(router):
    services.Expensive.reset()
    callers = 6
    pool = mitogen.service.Pool(router, services=[services.Expensive(router)], size=callers)
    try:
        me = router.myself()
        receivers = [me.call_service_async(services.Expensive, "compute", key="k")
                     for _ in range(callers)]
        assert services.Expensive.started.get(timeout=10) == "k"
        for _ in range(callers - 1):  # every other call is waiting on the running one
            services.Expensive.queued.get(timeout=10)
        services.Expensive.opened.set()
        assert [r.get(timeout=10).unpickle() for r in receivers] == ["K"] * callers
        assert services.Expensive.executions == 1
        # A different argument is a different call; the same one is answered from before.
        assert me.call_service(services.Expensive, "compute", key="other") == "OTHER"
        assert me.call_service(services.Expensive, "compute", key="k") == "K"
        assert services.Expensive.executions == 2
    finally:
        services.Expensive.opened.set()
        pool.stop()


def test_a_serialized_invoker_runs_one_call_at_a_time(router):
    services.Serial.reset()
    services.Serial.finished = False
    pool = mitogen.service.Pool(router, services=[services.Serial(router),
                                                  services.Greeter(router)], size=2)
    me = router.myself()
    try:
        held = me.call_service_async(services.Serial, "hold")
        assert services.Serial.started.get(timeout=10) is True
        second = me.call_service_async(services.Serial, "was_hold_finished")
        # The pool's other thread took the second call (queued behind the first) before
        # this one, which it answers: a plain Invoker would have run the second by now.
        assert me.call_service(GREETER, "ping") == "pong"
        assert second.empty()
        services.Serial.opened.set()
        assert held.get(timeout=10).unpickle() == "held"
        assert second.get(timeout=10).unpickle() is True
    finally:
        services.Serial.opened.set()
        pool.stop()


def test_stopping_a_pool_fails_queued_and_later_calls_and_lets_running_ones_finish(router):
    services.Gate.reset()
    gate = services.Gate(router)
    pool = mitogen.service.Pool(router, services=[gate], size=1)
    me = router.myself()
    try:
        running = me.call_service_async(services.Gate, "hold", token="first")
        assert services.Gate.started.get(timeout=10) == "first"
        queued = [me.call_service_async(services.Gate, "hold", token=str(i)) for i in range(3)]
        router.broker.defer_sync(lambda: None)  # they are in the pool's queue now
        pool.stop(join=False)
        for recv in queued:
            with pytest.raises(mitogen.core.CallError, match="pool of context 0 has stopped"):
                recv.get(timeout=10).unpickle()
        with pytest.raises(mitogen.core.CallError, match="no handler for handle 110"):
            me.call_service(services.Gate, "hold", token="late")
        services.Gate.opened.set()
        assert running.get(timeout=10).unpickle() == "first"
        pool.join()
        assert not any(t.is_alive() for t in pool._threads)
    finally:
        services.Gate.opened.set()
        pool.stop()


def test_defer_and_service_selects_run_on_pool_threads(router):
    listening = services.Listening(router)
    pool = mitogen.service.Pool(router, services=[listening], size=2)
    try:
        done = mitogen.core.Latch()
        pool.defer(lambda value: done.put((value, threading.current_thread().name)), "x")
        value, thread = done.get(timeout=10)
        assert value == "x" and thread.startswith("mitogen.Pool.")
        listening.recv.to_sender().send("hello")
        text, thread = listening.seen.get(timeout=10)
        assert text == "hello" and thread.startswith("mitogen.Pool.")
    finally:
        pool.stop()
    assert listening.seen.get(timeout=10) == "shut down"  # stop() joined, then on_shutdown
    with pytest.raises(mitogen.service.Error, match="the pool has stopped"):
        pool.defer(print)


def test_registering_a_service_twice_is_an_error(router, pool):
    with pytest.raises(mitogen.service.Error, match="already registered"):
        pool.add(services.Greeter(router))


def test_get_or_create_pool_is_one_pool_per_process_until_stopped(router):
    first = mitogen.service.get_or_create_pool(router=router)
    try:
        assert mitogen.service.get_or_create_pool() is first
        assert first.size == 2
    finally:
        first.stop()
    second = mitogen.service.get_or_create_pool(router=router)
    try:
        assert second is not first
    finally:
        second.stop()
    with pytest.raises(ValueError, match="neither router nor context"):
        mitogen.service.get_or_create_pool()


# --- FileService -----------------------------------------------------------------------------


@pytest.fixture
def files(router, tmp_path):
    """A FileService in the master with a registered file and a registered prefix."""
    root = tmp_path / "served"
    (root / "dir").mkdir(parents=True)
    (root / "dir" / "inside.txt").write_bytes(b"inside the prefix")
    (tmp_path / "single.txt").write_bytes(b"registered alone")
    (tmp_path / "secret.txt").write_bytes(b"never served")
    (root / "dir" / "escape").symlink_to(tmp_path / "secret.txt")
    (root / "dir" / "alias").symlink_to(root / "dir" / "inside.txt")
    service = FileService(router)
    pool = mitogen.service.Pool(router, services=[service], size=2)
    me = router.myself()
    me.call_service(FileService, "register", path=str(tmp_path / "single.txt"))
    me.call_service(FileService, "register_prefix", path=str(root))
    yield tmp_path
    pool.stop()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_file_service_serves_registered_paths_and_prefixes_only(router, files, local):
    master = router.myself()
    dropped = router.get_stats()["dropped_message_count"]
    for path, content in [(files / "single.txt", b"registered alone"),
                          (files / "served" / "dir" / "inside.txt", b"inside the prefix"),
                          (files / "served" / "dir" / "alias", b"inside the prefix")]:
        ok, size, digest, metadata = local.call(services.fetch, master, str(path))
        assert (ok, size, digest) == (True, len(content), _sha(content))
        assert metadata["size"] == len(content)
        assert metadata["owner"] == pwd.getpwuid(os.getuid()).pw_name
    # Chunks and acknowledgements all found their handles.
    assert router.get_stats()["dropped_message_count"] == dropped
    assert local.call(funcs.dropped_count) == 0
    refused = {
        files / "secret.txt": "is not registered with FileService",
        files / "served" / "dir" / ".." / ".." / "secret.txt": "contains '..'",
        files / "served" / "dir" / "escape": "resolves to %r, outside every registered" % (
            str(files / "secret.txt"),),
        files / "served" / "dir": "is not a regular file",
        "served/dir/inside.txt": "absolute paths only",
    }
    for path, error in refused.items():
        assert error in local.call(services.fetch_error, master, str(path))
        kind, text = local.call(services.call_service, master, FileService.name(), "stat",
                                {"path": str(path)})
        assert kind == "error" and error in text
    missing = local.call(services.fetch_error, master, str(files / "served" / "gone"))
    assert "FileNotFoundError" in missing
    # Only parents register; a child may not widen what it may read.
    kind, text = local.call(services.call_service, master, FileService.name(),
                            "register_prefix", {"path": "/"})
    assert kind == "error" and "may not call 'register_prefix'" in text
    assert "is not registered" in local.call(services.fetch_error, master, "/etc/passwd")


def test_file_service_stat_and_sender_must_be_the_callers(router, files, local):
    master = router.myself()
    path = str(files / "single.txt")
    assert local.call(services.call_service, master, FileService.name(), "stat",
                      {"path": path})["size"] == len(b"registered alone")
    # A sender belonging to another context (here: the master's own) is refused.
    recv = mitogen.core.Receiver(router)
    try:
        kind, text = local.call(services.call_service, master, FileService.name(), "fetch",
                                {"path": path, "sender": recv.to_sender()})
        assert kind == "error" and "sender= of a fetch must belong" in text
    finally:
        recv.close()


def test_fetch_in_a_loop_cannot_exhaust_the_servers_descriptors(router, files):
    """A context that calls fetch() and never reads holds at most max_queued_per_stream
    open files in the server (the window stalls the first transfer until it reads or goes
    away), and they close when it goes."""
    fds = len(os.listdir("/proc/self/fd"))
    child = router.local(name="flooder")
    limit = FileService.max_queued_per_stream
    accepted, refusal = child.call(services.flood_fetch, router.myself(),
                                   str(files / "single.txt"), limit + 20)
    assert accepted == limit and "transfers are already queued" in refusal
    child.shutdown(wait=True)
    assert wait_for(lambda: len(os.listdir("/proc/self/fd")) <= fds), (
        fds, sorted(os.listdir("/proc/self/fd")))


@pytest.mark.slow
def test_a_1_gib_sparse_file_moves_with_the_receivers_memory_bounded(router, files, local):
    path = files / "served" / "sparse.img"
    with open(path, "wb") as f:
        f.truncate(1 << 30)
        for offset in (0, 12345678, (1 << 30) - 4096):
            f.seek(offset)
            f.write(os.urandom(4096))
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 * MIB):
            digest.update(chunk)
    ok, size, sha, metadata, rss_before, rss_peak = local.call(
        services.fetch_measuring_rss, router.myself(), str(path))
    assert (ok, size, sha) == (True, 1 << 30, digest.hexdigest())
    assert metadata["size"] == 1 << 30
    # The window is 8 MiB; the receiver may hold that plus a chunk being read and hashed.
    assert rss_peak - rss_before < 32 * MIB, (rss_before, rss_peak)


@pytest.mark.parametrize("damage", ["truncate", "grow", "delete"])
def test_a_file_changed_mid_transfer_fails_it_cleanly(router, files, local, damage, caplog):
    path = files / "served" / "changing.bin"
    path.write_bytes(os.urandom(32 * MIB))
    with caplog.at_level(logging.ERROR, logger="mitogen.service"):
        ok, _received, announced = local.call(services.fetch_and_damage, router.myself(),
                                             str(path), damage)
    assert ok is False and announced == 32 * MIB
    reasons = {"truncate": "was truncated while it was being sent",
               "grow": "changed while it was being sent",
               "delete": "was deleted while it was being sent"}
    assert reasons[damage] in caplog.text
    # The service carries on: the next transfer works.
    assert local.call(services.fetch, router.myself(),
                      str(files / "single.txt"))[0] is True


@pytest.mark.parametrize("how", ["gives up", "dies"])
def test_a_receiver_that_goes_away_mid_transfer_ends_the_transfer(router, files, how, caplog):
    path = files / "served" / "big.bin"
    path.write_bytes(os.urandom(64 * MIB))
    child = router.local(name="quitter")
    damage = "nothing" if how == "gives up" else "die"
    with caplog.at_level(logging.ERROR, logger="mitogen.service"):
        pending = child.call_async(services.fetch_and_damage, router.myself(), str(path),
                                   damage)
        error = mitogen.core.CallError if how == "gives up" else mitogen.core.ChannelError
        with pytest.raises(error):
            pending.get(timeout=30).unpickle()
        # The sender's thread ends (the leak check would see it), and says why.
        assert router.myself().call_service(FileService, "stat", path=str(path))["size"] == \
            64 * MIB
    if how == "gives up":
        child.shutdown(wait=True)


def test_stopping_the_pool_fails_transfers_in_flight_cleanly(router, tmp_path, local, caplog):
    path = tmp_path / "big.bin"
    path.write_bytes(os.urandom(32 * MIB))
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    service = FileService(router)
    pool = mitogen.service.Pool(router, services=[service], size=1)
    service.register(str(path))
    pending = local.call_async(services.fetch_pausing, router.myself(), str(path), str(fifo))
    with caplog.at_level(logging.ERROR, logger="mitogen.service"):
        with open(fifo, "wb") as f:  # returns once the child is stopped at its first chunk
            pool.stop()  # joins the pool, then FileService.on_shutdown()
            f.write(b"go")
        ok, received, announced = pending.get(timeout=30).unpickle()
    assert ok is False and received < announced == 32 * MIB
    assert "FileService is shutting down" in caplog.text


# --- PushFileService -------------------------------------------------------------------------


def _tree(router):
    """master -> i1 -> i2 -> 8 leaves."""
    i1 = router.local(name="i1")
    i2 = router.local(name="i2", via=i1)
    leaves = [router.local(name="leaf%d" % n, via=i2) for n in range(8)]
    return i1, i2, leaves


def _link_counters(router, i1, i2, leaves):
    """Bytes sent so far over each link of the tree: (master->i1, i1->i2, {leaf: i2->leaf})."""
    master_tx = router.get_streams()[i1.context_id].tx_bytes
    i1_children, _ = i1.call(services.link_bytes)
    i2_children, _ = i2.call(services.link_bytes)
    return master_tx, i1_children[i2.context_id], {
        leaf.context_id: i2_children[leaf.context_id] for leaf in leaves}


def test_push_file_service_crosses_each_link_once(router, tmp_path):
    i1, i2, leaves = _tree(router)
    for context in (i1, i2, *leaves):  # imports are not what is counted
        context.call(services.loaded, "mitogen.service")
    pool = mitogen.service.get_or_create_pool(router=router)
    try:
        path = tmp_path / "payload.bin"
        content = os.urandom(8 * MIB + 12345)
        path.write_bytes(content)
        before = _link_counters(router, i1, i2, leaves)
        me = router.myself()
        for leaf in leaves:
            me.call_service(PushFileService, "propagate_to", context=leaf, path=str(path))
        for leaf in leaves:
            assert leaf.call(services.pushed_digest, str(path)) == (len(content), _sha(content))
        after = _link_counters(router, i1, i2, leaves)
        size = len(content)
        # Imports of mitogen.service and the calls add a little; a second copy would add
        # the whole file again.
        allowance = size // 50 + 256 * 1024
        assert size <= after[0] - before[0] <= size + allowance
        assert size <= after[1] - before[1] <= size + allowance
        for leaf in leaves:
            sent = after[2][leaf.context_id] - before[2][leaf.context_id]
            assert size <= sent <= size + allowance, (leaf, sent)
        assert all(c.call(funcs.dropped_count) == 0 for c in (i1, i2, *leaves))
        # The intermediaries kept it too.
        assert i2.call(services.pushed_digest, str(path)) == (size, _sha(content))
        # Pushing again to a leaf that has it moves nothing over any link.
        again = _link_counters(router, i1, i2, leaves)
        me.call_service(PushFileService, "propagate_to", context=leaves[0], path=str(path))
        assert leaves[0].call(services.pushed_digest, str(path)) == (size, _sha(content))
        final = _link_counters(router, i1, i2, leaves)
        assert final[0] - again[0] < 64 * 1024 and final[1] - again[1] < 64 * 1024
    finally:
        pool.stop()


def test_a_file_changed_while_it_is_pushed_fails_every_copy_downstream(router, tmp_path):
    hop = router.local(name="hop")
    leaf = router.local(name="leaf", via=hop)
    other = router.local(name="other", via=hop)
    path = tmp_path / "changing.bin"
    path.write_bytes(os.urandom(4 * MIB))
    leaf.call(services.loaded, "mitogen.service")
    service = PushFileService(router=router)
    pool = mitogen.service.Pool(router, services=[service], size=1)
    hop_pid = hop.call(os.getpid)
    try:
        # The hop is stopped, so the push cannot have read the file when it changes.
        os.kill(hop_pid, signal.SIGSTOP)
        try:
            service.propagate_to(context=leaf, path=str(path))
            st = path.stat()
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**10))
        finally:
            os.kill(hop_pid, signal.SIGCONT)
        # The failure reaches the leaf: its copy fails too (it is not left waiting).
        with pytest.raises(mitogen.core.CallError, match="changed since it was first pushed"):
            leaf.call(services.pushed_digest, str(path))
        # Pushed again, the file as it is now goes out, over the same links.
        service.propagate_to(context=other, path=str(path))
        content = path.read_bytes()
        assert other.call(services.pushed_digest, str(path)) == (len(content), _sha(content))
    finally:
        pool.stop()


def test_propagate_paths_and_modules_pushes_each_path_or_its_override(router, tmp_path):
    leaf = router.local(name="leaf")
    first, second = tmp_path / "first.txt", tmp_path / "second.py"
    first.write_bytes(b"first")
    second.write_bytes(b"print('on disk')")
    extra = str(tmp_path / "extra-sys-path")
    service = PushFileService(router=router)
    pool = mitogen.service.Pool(router, services=[service], size=1)
    try:
        router.myself().call_service(
            PushFileService, "propagate_paths_and_modules", context=leaf,
            paths=[str(first), str(second)],
            overridden_sources={str(second): "print('overridden')"}, extra_sys_paths=[extra])
        assert leaf.call(services.pushed_digest, str(first)) == (5, _sha(b"first"))
        assert leaf.call(services.pushed_digest, str(second)) == (
            len(b"print('overridden')"), _sha(b"print('overridden')"))
        assert sys.path.count(extra) == 1  # in the pushing context, as Mitogen does
    finally:
        pool.stop()
        while extra in sys.path:
            sys.path.remove(extra)


def test_push_file_service_refuses_siblings_and_destinations_above(router, tmp_path):
    a = router.local(name="a")
    b = router.local(name="b")
    path = tmp_path / "small.txt"
    path.write_bytes(b"small")
    pool = mitogen.service.get_or_create_pool(router=router)
    try:
        router.myself().call_service(PushFileService, "propagate_to", context=b,
                                     path=str(path))
        assert b.call(services.pushed_digest, str(path)) == (5, _sha(b"small"))
        kind, text = a.call(services.call_service, b, PushFileService.name(), "store_and_forward",
                            {"path": str(path), "data": b"forged", "context": b})
        assert kind == "error" and "may not call 'store_and_forward'" in text
        assert b.call(services.pushed_digest, str(path)) == (5, _sha(b"small"))
        kind, text = b.call(services.call_service, b, PushFileService.name(), "propagate_to",
                            {"path": "/etc/hostname", "context": router.myself()})
        assert kind == "error" and "is not below context" in text
    finally:
        pool.stop()
