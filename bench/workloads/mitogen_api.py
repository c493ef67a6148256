"""Workloads written once against the Mitogen 0.3 public API.

The same file runs, unchanged, in the ``mitogen`` venv (Mitogen 0.3.54 from PyPI) and in the
``ours`` venv (this project): that the second works is the compatibility being measured. Only
public API is used, except where a measurement needs an internal named in the report
(``mitogen.parent.Connection`` for the bootstrap sizes, ``router.responder`` as a fallback for
the module-request count).

The remote functions are builtins (``os.getpid``, ``len``) or live in a generated package, so a
child never has to import this script.

Usage: ``python mitogen_api.py WORKLOAD [PARAMS_JSON]``; see ``bench/run.py`` for the params.
"""

from __future__ import annotations

import gc
import importlib
import os
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Optional

import common
from common import Recorder, measure, read_rss_bytes, timed

#: The library under test; imported by :func:`_load` under the result guard, so that an
#: implementation that cannot be imported yet is reported as a failed run.
mitogen: Any = None


def _load() -> str:
    global mitogen
    import mitogen.master
    import mitogen.parent

    return ".".join(str(part) for part in mitogen.__version__)


def _with_router(body: Any, max_message_size: Optional[int] = None) -> None:
    """Run ``body(router)`` with a fresh router that is always shut down afterwards.

    Through ``mitogen.utils.run_with_router`` where it exists; otherwise (a partial
    implementation), or when the router must accept messages larger than its default
    ``max_message_size`` (which its children inherit), with the same Broker/Router steps
    spelled out.
    """
    try:
        utils = importlib.import_module("mitogen.utils")
    except ImportError:
        utils = None
    if utils is not None and max_message_size is None:
        utils.run_with_router(body)
        return
    broker = mitogen.master.Broker()
    try:
        body(mitogen.master.Router(broker, max_message_size=max_message_size))
    finally:
        broker.shutdown()
        broker.join()


def _get_module_count(router: Any) -> int:
    """GET_MODULE requests the master has served so far."""
    stats = getattr(router, "get_stats", None)
    if stats is not None:
        return int(stats()["get_module_count"])
    return int(router.responder.get_module_count)


def cold_start(params: Dict[str, Any], rec: Recorder) -> None:
    """Time from ``router.local()`` to the first trivial call's return.

    The first child of a fresh master also pays the master's one-time costs (preparing the
    bootstrap payload), so it is reported apart from the later children.
    """
    later = int(params.get("later_children", 2))

    def body(router: Any) -> None:
        times: List[float] = []
        for _ in range(1 + later):
            elapsed, ctx = measure(_start_and_call, router)
            times.append(elapsed)
            ctx.shutdown(wait=True)
        rec.samples("cold_start.first_child", "s", times[:1])
        if later:
            rec.samples("cold_start.next_child", "s", times[1:])

    _with_router(body)


def _start_and_call(router: Any, **kwargs: Any) -> Any:
    ctx = router.local(**kwargs)
    pid = ctx.call(os.getpid)
    if not isinstance(pid, int) or pid == os.getpid():
        raise RuntimeError(f"trivial call returned {pid!r}, not the child's pid")
    return ctx


def _call_samples(ctx: Any, count: int) -> List[float]:
    return [timed(ctx.call, os.getpid) for _ in range(count)]


def roundtrip(params: Dict[str, Any], rec: Recorder) -> None:
    """Latency of ``ctx.call(os.getpid)`` to a warm child, one sample per call."""
    warmup, calls = int(params.get("warmup", 500)), int(params.get("calls", 5000))

    def body(router: Any) -> None:
        ctx = _start_and_call(router)
        _call_samples(ctx, warmup)
        rec.samples("roundtrip.call", "s", _call_samples(ctx, calls))

    _with_router(body)


def throughput(params: Dict[str, Any], rec: Recorder) -> None:
    """Seconds to pass bytes arguments to a child that returns ``len``: many small, one big."""
    small, count = int(params.get("small_bytes", 1 << 20)), int(params.get("small_count", 64))
    big = int(params.get("big_bytes", 64 << 20))
    repeat = int(params.get("repeat", 1))

    def body(router: Any) -> None:
        ctx = _start_and_call(router)
        chunk = os.urandom(small)
        if ctx.call(len, chunk) != small:  # warm-up, and a check that the bytes arrived
            raise RuntimeError("child saw a different length")

        def many() -> None:
            for _ in range(count):
                if ctx.call(len, chunk) != small:
                    raise RuntimeError("child saw a different length")

        rec.samples(f"throughput.{count}x{small >> 20}MiB", "s",
                    [timed(many) for _ in range(repeat)], bytes=small * count)
        payload = chunk * (big // small)

        def one() -> None:
            if ctx.call(len, payload) != len(payload):
                raise RuntimeError("child saw a different length")

        rec.samples(f"throughput.1x{big >> 20}MiB", "s",
                    [timed(one) for _ in range(repeat)], bytes=len(payload))

    _with_router(body)


def tail(params: Dict[str, Any], rec: Recorder) -> None:
    """Round trips to one child while another child receives a big argument, against the
    same child's round trips with nothing else going on.

    Each round measures ``idle_calls`` idle round trips to the probe child; then round trips
    to it for as long as a second thread passes ``big_bytes`` to the sink child ``transfers``
    times in a row (the window); then round trips to the sink child itself for as long as one
    more big argument is on its way to it (the same stream).
    """
    big, rounds = int(params.get("big_bytes", 256 << 20)), int(params.get("rounds", 3))
    idle_calls, transfers = int(params.get("idle_calls", 1000)), int(params.get("transfers", 2))
    warmup = int(params.get("warmup", 200))

    def body(router: Any) -> None:
        sink, probe = _start_and_call(router), _start_and_call(router)
        payload = os.urandom(1 << 20) * max(1, big >> 20)

        def send_big() -> None:
            if sink.call(len, payload) != len(payload):
                raise RuntimeError("child saw a different length")

        send_big()  # warm-up: page in the buffers on both sides
        _call_samples(probe, warmup)
        samples: Dict[str, List[float]] = {"idle": [], "loaded": [], "same_stream": []}
        for _ in range(rounds):
            samples["idle"] += _call_samples(probe, idle_calls)
            samples["loaded"] += common.under_load(send_big, _getpid_of(probe), transfers)
            samples["same_stream"] += common.under_load(send_big, _getpid_of(sink), 1)
        for name, values in samples.items():
            rec.samples(f"tail.{name}", "s", values, big_bytes=len(payload))

    # Both libraries refuse messages above 128 MiB by default: room for the argument as each
    # pickles it (Mitogen's protocol 2 turns bytes into latin-1 text, up to twice the size),
    # on both sides (children inherit the limit).
    _with_router(body, max_message_size=max(128 << 20, 2 * big + (16 << 20)))


def _getpid_of(ctx: Any) -> Any:
    return lambda: ctx.call(os.getpid)


def fanout(params: Dict[str, Any], rec: Recorder) -> None:
    """Wall time to start N children concurrently (one thread each) and call each once; then
    the CPU seconds that cost, per child.

    With ``via``, the N children are started through one intermediate child (started first,
    untimed; its own CPU is counted in the total). The CPU is the master's (every thread) plus
    every descendant's once reaped, from before the router exists to after it has shut down:
    it includes starting, calling and shutting down the children, and the master's own work
    for all of that.

    ``connect_timeout`` (a standard connection option) is raised from its 30 s default: on two
    cores, hundreds of children booting at once can take longer than that, and the curve
    should show how long, not a timeout.
    """
    children = int(params["children"])
    connect_timeout = float(params.get("connect_timeout", 150.0))
    name = "fanout_via" if params.get("via") else "fanout"
    common.become_subreaper()
    cpu_before = common.cpu_seconds()

    def body(router: Any) -> None:
        options: Dict[str, Any] = {"connect_timeout": connect_timeout}
        if params.get("via"):
            options["via"] = _start_and_call(router)

        def one(_: int) -> int:
            return _start_and_call(router, **options).call(os.getpid)

        def all_children() -> None:
            with ThreadPoolExecutor(max_workers=children) as pool:
                pids = list(pool.map(one, range(children)))
            if len(set(pids)) != children:
                raise RuntimeError(f"{children} children gave {len(set(pids))} distinct pids")

        rec.samples(f"{name}.{children}", "s", [timed(all_children)])

    _with_router(body)
    _record_cpu_per_child(rec, f"{name}_cpu.{children}", cpu_before, children)


def _record_cpu_per_child(rec: Recorder, name: str, cpu_before: float, children: int) -> None:
    """Reap what is left, then record the CPU seconds since ``cpu_before`` per child."""
    left = common.reap_children(timeout=30.0)
    rec.samples(name, "s", [(common.cpu_seconds() - cpu_before) / children])
    if left:
        raise RuntimeError(f"{left} child processes still running 30 s after shutdown")


def multihop(params: Dict[str, Any], rec: Recorder) -> None:
    """Trivial call latency through a chain of 1 to ``hops`` hops built with ``via=``.

    The chain lengths are interleaved in rounds so that noise spreads over all of them.
    """
    hops, rounds = int(params.get("hops", 5)), int(params.get("rounds", 10))
    per_round, warmup = int(params.get("calls_per_round", 100)), int(params.get("warmup", 100))

    def body(router: Any) -> None:
        chain: List[Any] = []
        for _ in range(hops):
            chain.append(_start_and_call(router, via=chain[-1]) if chain
                         else _start_and_call(router))
        samples: Dict[int, List[float]] = {n: [] for n in range(1, hops + 1)}
        for ctx in chain:
            _call_samples(ctx, warmup)
        for _ in range(rounds):
            for depth, ctx in enumerate(chain, start=1):
                samples[depth].extend(_call_samples(ctx, per_round))
        for depth, values in samples.items():
            rec.samples(f"multihop.{depth}", "s", values)

    _with_router(body)


def remote_import(params: Dict[str, Any], rec: Recorder) -> None:
    """First call into a 30-module package only the master has; time and GET_MODULE count.

    Each variant gets a fresh child (connected, one trivial call done) and its own package, so
    neither benefits from the other's modules.
    """
    with tempfile.TemporaryDirectory(prefix="bench-pkg-") as root:
        sys.path.insert(0, root)
        try:
            _remote_import_in(Path(root), rec)
        finally:
            sys.path.remove(root)


def _remote_import_in(root: Path, rec: Recorder) -> None:
    entries = {}
    for variant, dynamic in (("static", False), ("importlib", True)):
        common.make_package(root, f"benchpkg_{variant}", dynamic=dynamic)
        entries[variant] = importlib.import_module(f"benchpkg_{variant}.entry").run

    def body(router: Any) -> None:
        for variant, run in entries.items():
            ctx = _start_and_call(router)
            before = _get_module_count(router)
            elapsed, result = measure(ctx.call, run)
            requests = _get_module_count(router) - before
            if result != common.expected_package_sum():
                raise RuntimeError(f"{variant}: entry.run() returned {result!r}")
            rec.samples(f"remote_import.{variant}", "s", [elapsed])
            rec.value(f"remote_import.{variant}.get_module", "count", requests)

    _with_router(body)


def bootstrap(params: Dict[str, Any], rec: Recorder) -> None:
    """Bytes a new child needs: the boot command line and the payload sent after it (and,
    where the library sends it, the core's bytecode a child on this machine gets as well).

    Built the way the library builds them for a real ``local()`` child, through its
    ``Connection``; the command is counted without the interpreter path (which varies by
    machine), arguments joined by single spaces.
    """
    del params

    def body(router: Any) -> None:
        options = mitogen.parent.Options(max_message_size=router.max_message_size,
                                         name="bench-bootstrap")
        conn = mitogen.parent.Connection(options, router)
        conn.context = router.context_class(router, 4242)
        try:  # first: the command line holds the payload's length
            preamble, missing = conn.get_preamble(), None
        except AttributeError as exc:
            preamble, missing = b"", exc
        argv = conn.get_boot_command()
        rec.value("bootstrap.boot_command", "B", len(" ".join(argv[1:]).encode()))
        if missing is not None:
            raise missing
        rec.value("bootstrap.payload", "B", len(preamble))
        if getattr(conn, "sends_bytecode", False):  # ours, to a child on this machine
            rec.value("bootstrap.bytecode", "B", len(mitogen.parent.get_core_bytecode()))

    _with_router(body)


def memory(params: Dict[str, Any], rec: Recorder) -> None:
    """RSS of fresh idle children; the master's RSS growth per connected child; what is left
    of that growth once they have disconnected; and what a second cycle of as many children
    (connect, disconnect) leaves on top of that: a leak grows with every cycle, memory the
    allocator keeps for reuse does not.

    One child is started before the master's baseline, so that one-time costs (imports,
    payload preparation) are not charged to the children; it stays connected throughout.
    Last, two more cycles under tracemalloc: how much the live Python objects grow per cycle
    once its children are reaped (a leak of objects shows there, allocator memory does not).
    """
    children = int(params.get("children", 16))

    def body(router: Any) -> None:
        first = _start_and_call(router)
        rss = [read_rss_bytes(first.call(os.getpid))]
        before = common.master_rss()
        ctxs = [_start_and_call(router) for _ in range(children)]
        connected = common.master_rss()
        rss.extend(read_rss_bytes(ctx.call(os.getpid)) for ctx in ctxs)
        rec.samples("memory.child_rss", "B", rss)
        rec.value("memory.master_per_child", "B", (connected - before) / children)
        rec.info["threads"] = threading.active_count()
        _shutdown_all(ctxs, timeout=60.0)
        del ctxs
        after_first = common.master_rss()
        rec.value("memory.master_residual", "B", after_first - before)
        _shutdown_all([_start_and_call(router) for _ in range(children)], timeout=60.0)
        rec.value("memory.master_leak_per_child", "B",
                  (common.master_rss() - after_first) / children)

        def cycle(pids: Any) -> None:
            ctxs = [_start_and_call(router) for _ in range(children)]
            for i, ctx in enumerate(ctxs):
                pids[i] = ctx.call(os.getpid)
            _shutdown_all(ctxs, timeout=60.0)

        rec.value("memory.master_objects_kept_per_child", "B",
                  common.bytes_kept_per_cycle(cycle, children) / children)

    _with_router(body)


def _shutdown_all(ctxs: List[Any], timeout: float) -> None:
    """Ask every context to shut down at once, then wait for each to disconnect."""
    for latch in [ctx.shutdown() for ctx in ctxs]:
        latch.get(timeout=timeout)


def scale(params: Dict[str, Any], rec: Recorder) -> None:
    """N children connected to one master at once: start them all (from ``workers``
    threads), one call each, then shut them all down; the times, and the master's RSS.

    Runs only where the children's private memory fits in half of what the machine has
    available (measured on a first child, which stays connected throughout and is not
    counted). The starting threads exist before the master's baseline RSS is taken and until
    the last RSS is read, so that their stacks are not charged to the children. Clean means:
    every child process gone and reaped by the library within ``reap_timeout`` seconds of
    the last disconnect, and, once the starting threads have exited too, no descriptor open
    that was not before (a thread's own descriptors are the thread's).
    """
    children, workers = int(params.get("children", 1000)), int(params.get("workers", 32))
    reap_timeout = float(params.get("reap_timeout", 30.0))
    connect_timeout = float(params.get("connect_timeout", 300.0))
    rec.info["nofile"] = common.raise_nofile(8 * children + 256)

    def body(router: Any) -> None:
        first = _start_and_call(router)
        common.check_memory_for(children, first.call(os.getpid))
        with common.warm_pool(workers, _getpid_of(first)) as pool:
            rss_before, fds_before = common.master_rss(), common.fd_table()

            def one(_: int) -> Any:
                return _start_and_call(router, connect_timeout=connect_timeout)

            elapsed, ctxs = measure(lambda: list(pool.map(one, range(children))))
            pids = [ctx.call(os.getpid) for ctx in ctxs]
            if len(set(pids)) != children:
                raise RuntimeError(f"{children} children gave {len(set(pids))} distinct pids")
            rec.samples("scale.start", "s", [elapsed])
            rss_connected = common.master_rss()
            rec.value("scale.master_rss", "B", rss_connected)
            rec.value("scale.master_per_child", "B", (rss_connected - rss_before) / children)
            rec.samples("scale.shutdown", "s", [timed(_shutdown_all, ctxs, connect_timeout)])
            del ctxs
            deadline = time.monotonic() + reap_timeout
            common.wait_reaped(pids, deadline)
            rec.value("scale.master_residual", "B", common.master_rss() - rss_before)
        common.record_leftovers(rec, pids, fds_before, deadline)

    _with_router(body)


#: Keep ssh away from the invoking user's own ssh setup: no ~/.ssh/config, and no
#: known_hosts read or written (check_host_keys='ignore' says the same; this makes it so
#: whatever a library does with that).
SSH_ISOLATION = ["-F", "/dev/null", "-o", "UserKnownHostsFile=/dev/null",
                 "-o", "GlobalKnownHostsFile=/dev/null"]


def _ssh_connect_and_call(router: Any, params: Dict[str, Any]) -> Any:
    ctx = router.ssh(hostname=params["hostname"], port=int(params["port"]),
                     username=params["username"], identity_file=params["identity_file"],
                     check_host_keys="ignore", python_path=params["python_path"],
                     ssh_args=list(SSH_ISOLATION))
    pid = ctx.call(os.getpid)
    if not isinstance(pid, int) or pid == os.getpid():
        raise RuntimeError(f"trivial call over ssh returned {pid!r}, not the remote pid")
    return ctx


def ssh(params: Dict[str, Any], rec: Recorder) -> None:
    """Connect over ssh (to the harness's sshd on 127.0.0.1) and make the first call, on
    fresh connections one after another; then the trivial call's round trip over the last.

    Every connection but the last is shut down (and waited for) before the next starts, so
    each pays the whole price: ssh's handshake, the remote interpreter, the bootstrap.
    """
    connects = int(params.get("connects", 10))
    warmup, calls = int(params.get("warmup", 200)), int(params.get("calls", 2000))
    if connects < 1:
        raise ValueError(f"connects={connects}: need at least one connection")

    def body(router: Any) -> None:
        times: List[float] = []
        ctx = None
        for number in range(connects):
            elapsed, ctx = measure(_ssh_connect_and_call, router, params)
            times.append(elapsed)
            if number < connects - 1:
                ctx.shutdown(wait=True)
        rec.samples("ssh.connect", "s", times)
        _call_samples(ctx, warmup)
        rec.samples("ssh.call", "s", _call_samples(ctx, calls))

    _with_router(body)


def ssh_fanout(params: Dict[str, Any], rec: Recorder) -> None:
    """Wall time of one ssh connection per account (all to the harness's sshd), started at
    once from one thread each, until each has answered its first call."""
    users = list(params["usernames"])

    def body(router: Any) -> None:
        def one(user: str) -> int:
            return _ssh_connect_and_call(router, {**params, "username": user}).call(os.getpid)

        def all_connections() -> None:
            with ThreadPoolExecutor(max_workers=len(users)) as pool:
                pids = list(pool.map(one, users))
            if len(set(pids)) != len(users):
                raise RuntimeError(f"{len(users)} connections gave {len(set(pids))} pids")

        rec.samples("ssh.concurrent", "s", [timed(all_connections)], connections=len(users))

    _with_router(body)


# --- services and files ------------------------------------------------------------------------

#: A module children import from the master for the service workloads: the same source works
#: with both implementations, since it uses only mitogen.service's public API.
SERVICE_MODULE = '''"""Service and helpers for the bench's service workloads."""

import os

import mitogen.core
import mitogen.service


class Echo(mitogen.service.Service):
    @mitogen.service.expose(policy=mitogen.service.AllowParents())
    def ping(self):
        return 1


def fetch(context, path):
    with open(os.devnull, "wb") as out:
        ok, metadata = mitogen.service.FileService.get(context, path, out)
    return ok, metadata["size"]


@mitogen.core.takes_router
def pushed_size(path, router=None):
    pool = mitogen.service.get_or_create_pool(router=router)
    return len(pool.get_service("mitogen.service.PushFileService").get(path))
'''


def _with_service_module(body: Any) -> None:
    """Run ``body(module)`` with SERVICE_MODULE importable (by the master and its children).
    mitogen.service is imported only here, so the other workloads run without it."""
    importlib.import_module("mitogen.service")
    with tempfile.TemporaryDirectory(prefix="bench-svc-") as root:
        (Path(root) / "benchsvc.py").write_text(SERVICE_MODULE)
        sys.path.insert(0, root)
        try:
            body(importlib.import_module("benchsvc"))
        finally:
            sys.path.remove(root)
            sys.modules.pop("benchsvc", None)


def _write_random_file(path: Path, size: int) -> None:
    chunk = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for _ in range(size // len(chunk)):
            f.write(chunk)
        f.write(chunk[:size % len(chunk)])


def _size_name(size: int) -> str:
    if size >= 1 << 30 and not size % (1 << 30):
        return f"{size >> 30}GiB"
    return f"{size >> 20}MiB"


def _read_status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} line in /proc/self/status")


def call_service(params: Dict[str, Any], rec: Recorder) -> None:
    """Round trip of ``ctx.call_service()`` to a trivial method of a service in a warm child
    (started by the first call, which is not counted)."""
    warmup, calls = int(params.get("warmup", 500)), int(params.get("calls", 5000))

    def with_module(module: Any) -> None:
        def body(router: Any) -> None:
            ctx = _start_and_call(router)
            name = "benchsvc.Echo"
            if ctx.call_service(name, "ping") != 1:
                raise RuntimeError("the service answered something else")
            for _ in range(warmup):
                ctx.call_service(name, "ping")
            rec.samples("services.call_service", "s",
                        [timed(ctx.call_service, name, "ping") for _ in range(calls)])

        _with_router(body)

    _with_service_module(with_module)


def _serving(router: Any, path: Path) -> Any:
    """A pool in the master with a FileService that serves `path`."""
    service = mitogen.service.FileService(router)
    pool = mitogen.service.Pool(router, services=[service], size=2)
    service.register(str(path))
    return pool


def file_service(params: Dict[str, Any], rec: Recorder) -> None:
    """``FileService.get()`` of a file (random bytes, in the page cache) by a local child
    into /dev/null; seconds per transfer, after one untimed warm-up transfer."""
    size, repeat = int(params.get("bytes", 512 << 20)), int(params.get("repeat", 2))

    def with_module(module: Any) -> None:
        with tempfile.TemporaryDirectory(prefix="bench-files-") as root:
            path = Path(root) / "payload.bin"
            _write_random_file(path, size)

            def body(router: Any) -> None:
                pool = _serving(router, path)
                try:
                    ctx = _start_and_call(router)

                    def one() -> None:
                        got = ctx.call(module.fetch, router.myself(), str(path))
                        if tuple(got) != (True, size):
                            raise RuntimeError(f"the transfer failed or was short: {got!r}")

                    one()
                    rec.samples(f"files.file_service.{_size_name(size)}", "s",
                                [timed(one) for _ in range(repeat)], bytes=size)
                finally:
                    pool.stop()

            _with_router(body)

    _with_service_module(with_module)


def file_memory(params: Dict[str, Any], rec: Recorder) -> None:
    """The master's peak RSS above idle while a child fetches a (sparse) file through
    ``FileService``: idle is the RSS just before the first transfer (child started, pool
    running), the peak is VmHWM, reset through /proc/self/clear_refs at that moment."""
    size = int(params.get("bytes", 1 << 30))

    def with_module(module: Any) -> None:
        with tempfile.TemporaryDirectory(prefix="bench-files-") as root:
            path = Path(root) / "sparse.img"
            with open(path, "wb") as f:
                f.truncate(size)

            def body(router: Any) -> None:
                pool = _serving(router, path)
                try:
                    ctx = _start_and_call(router)
                    gc.collect()
                    with open("/proc/self/clear_refs", "w") as f:
                        f.write("5")
                    idle = read_rss_bytes(os.getpid())
                    got = ctx.call(module.fetch, router.myself(), str(path))
                    peak = _read_status_bytes("VmHWM")
                    if tuple(got) != (True, size):
                        raise RuntimeError(f"the transfer failed or was short: {got!r}")
                    rec.value(f"files.master_memory.{_size_name(size)}", "B", peak - idle)
                finally:
                    pool.stop()

            _with_router(body)

    _with_service_module(with_module)


def push_file(params: Dict[str, Any], rec: Recorder) -> None:
    """``PushFileService.propagate_to()`` of one file to N leaves behind one intermediary:
    seconds from the first push until every leaf has the whole file (``get()`` returned)."""
    size, leaves = int(params.get("bytes", 256 << 20)), int(params.get("leaves", 8))

    def with_module(module: Any) -> None:
        with tempfile.TemporaryDirectory(prefix="bench-files-") as root:
            path = Path(root) / "payload.bin"
            _write_random_file(path, size)
            # Mitogen sends the file in one message: allow it that (ours sends chunks).
            router = mitogen.master.Router(max_message_size=2 * size + (64 << 20))
            try:
                service = mitogen.service.PushFileService(router=router)
                pool = mitogen.service.Pool(router, services=[service], size=2)
                try:
                    rack = _start_and_call(router)
                    nodes = [_start_and_call(router, via=rack) for _ in range(leaves)]

                    def push() -> None:
                        for node in nodes:  # in the master, as its own code would
                            service.propagate_to(context=node, path=str(path))
                        pending = [node.call_async(module.pushed_size, str(path))
                                   for node in nodes]
                        got = [recv.get().unpickle() for recv in pending]
                        if got != [size] * leaves:
                            raise RuntimeError(f"the leaves got {got!r}, not {size} bytes")

                    rec.samples(f"files.push_file.{_size_name(size)}", "s", [timed(push)],
                                bytes=size * leaves)
                finally:
                    pool.stop()
            finally:
                router.broker.shutdown()
                router.broker.join()

    _with_service_module(with_module)


def aio(params: Dict[str, Any], rec: Recorder) -> None:
    """Wall time of N calls awaited concurrently from one asyncio loop, spread over C warm
    children. Ours awaits ``ctx.acall()`` (no thread per pending call); Mitogen has no asyncio
    face, so there each call runs in the loop's default thread pool
    (``loop.run_in_executor(None, ctx.call, ...)``), as its users must do."""
    import asyncio

    children, calls = int(params.get("children", 10)), int(params.get("calls", 1000))
    repeat = int(params.get("repeat", 5))

    def body(router: Any) -> None:
        contexts = [_start_and_call(router) for _ in range(children)]
        threads: List[int] = []

        async def one(ctx: Any) -> int:
            if hasattr(ctx, "acall"):
                return await ctx.acall(os.getpid)
            return await asyncio.get_running_loop().run_in_executor(None, ctx.call, os.getpid)

        async def all_calls() -> None:
            pids = await asyncio.gather(*[one(contexts[i % children]) for i in range(calls)])
            threads.append(threading.active_count())
            if len(set(pids)) != children:
                raise RuntimeError(f"{calls} calls reached {len(set(pids))} children")

        def run_once() -> None:
            asyncio.run(all_calls())

        run_once()  # warm-up: the executor's threads, the children's imports
        rec.samples(f"aio.{calls}x{children}", "s", [timed(run_once) for _ in range(repeat)])
        rec.info["aio_threads"] = max(threads)

    _with_router(body)


WORKLOADS = {
    "aio": aio,
    "bootstrap": bootstrap,
    "call_service": call_service,
    "cold_start": cold_start,
    "file_memory": file_memory,
    "file_service": file_service,
    "fanout": fanout,
    "memory": memory,
    "multihop": multihop,
    "push_file": push_file,
    "remote_import": remote_import,
    "roundtrip": roundtrip,
    "scale": scale,
    "ssh": ssh,
    "ssh_fanout": ssh_fanout,
    "tail": tail,
    "throughput": throughput,
}

if __name__ == "__main__":
    sys.exit(common.run_main(WORKLOADS, _load))
