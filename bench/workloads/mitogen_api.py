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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List

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


def _with_router(body: Any) -> None:
    """Run ``body(router)`` with a fresh router that is always shut down afterwards.

    Through ``mitogen.utils.run_with_router`` where it exists; otherwise (a partial
    implementation) with the same Broker/Router steps spelled out, so the core can be measured
    before its utilities exist.
    """
    try:
        utils = importlib.import_module("mitogen.utils")
    except ImportError:
        utils = None
    if utils is not None:
        utils.run_with_router(body)
        return
    broker = mitogen.master.Broker()
    try:
        body(mitogen.master.Router(broker))
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


def fanout(params: Dict[str, Any], rec: Recorder) -> None:
    """Wall time to start N children concurrently (one thread each) and call each once.

    ``connect_timeout`` (a standard connection option) is raised from its 30 s default: on two
    cores, hundreds of children booting at once can take longer than that, and the curve
    should show how long, not a timeout.
    """
    children = int(params["children"])
    connect_timeout = float(params.get("connect_timeout", 150.0))

    def body(router: Any) -> None:
        def one(_: int) -> int:
            return _start_and_call(router, connect_timeout=connect_timeout).call(os.getpid)

        def all_children() -> None:
            with ThreadPoolExecutor(max_workers=children) as pool:
                pids = list(pool.map(one, range(children)))
            if len(set(pids)) != children:
                raise RuntimeError(f"{children} children gave {len(set(pids))} distinct pids")

        rec.samples(f"fanout.{children}", "s", [timed(all_children)])

    _with_router(body)


def multihop(params: Dict[str, Any], rec: Recorder) -> None:
    """Trivial call latency through a chain of 1, 2 and 3 hops built with ``via=``.

    The chain lengths are interleaved in rounds so that noise spreads over all three.
    """
    hops, rounds = int(params.get("hops", 3)), int(params.get("rounds", 10))
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
    """Bytes a new child needs: the boot command line and the payload sent after it.

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

    _with_router(body)


def memory(params: Dict[str, Any], rec: Recorder) -> None:
    """RSS of fresh idle children, and the master's RSS growth per connected child.

    One child is started before the master's baseline, so that one-time costs (imports,
    payload preparation) are not charged to the children.
    """
    children = int(params.get("children", 16))

    def body(router: Any) -> None:
        first = _start_and_call(router)
        rss = [read_rss_bytes(first.call(os.getpid))]
        gc.collect()
        before = read_rss_bytes(os.getpid())
        ctxs = [_start_and_call(router) for _ in range(children)]
        gc.collect()
        after = read_rss_bytes(os.getpid())
        rss.extend(read_rss_bytes(ctx.call(os.getpid)) for ctx in ctxs)
        rec.samples("memory.child_rss", "B", rss)
        rec.value("memory.master_per_child", "B", (after - before) / children)
        rec.info["threads"] = threading.active_count()

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
    "cold_start": cold_start,
    "fanout": fanout,
    "memory": memory,
    "multihop": multihop,
    "remote_import": remote_import,
    "roundtrip": roundtrip,
    "ssh": ssh,
    "throughput": throughput,
}

if __name__ == "__main__":
    sys.exit(common.run_main(WORKLOADS, _load))
