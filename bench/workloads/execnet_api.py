"""The same workloads written against execnet 2.1, run inside the ``execnet`` venv.

execnet has no ``Context.call``: its unit of remote work is a source string run with
``remote_exec`` that talks over a channel. The closest equivalent of a call is a request on a
channel to a small dispatch loop started once per gateway (:data:`SERVE`), which is what every
"call" below is. Gateways are made with ``popen//python=<this interpreter>`` so that execnet
ships its own source over the pipe, as it does over ssh, rather than importing an installed
copy: that is the fair match for Mitogen, which always ships itself.

Multi-hop and remote import have no counterpart here (execnet does not forward module
imports); the harness does not run them and the report marks them n/a.
"""

from __future__ import annotations

import gc
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, List

import common
from common import Recorder, measure, read_rss_bytes, timed

#: The library under test, imported by :func:`_load` under the result guard.
execnet: Any = None

#: Remote side of a "call": answer (op, args) requests until the channel closes.
SERVE = """
import os
ops = {"getpid": os.getpid, "len": len}
for op, args in channel:
    channel.send(ops[op](*args))
"""


class Child:
    """One gateway plus its dispatch channel, with a ``call`` like Mitogen's context."""

    def __init__(self, group: Any, spec: str = "") -> None:
        self.gateway = group.makegateway(spec or f"popen//python={sys.executable}")
        self.channel = self.gateway.remote_exec(SERVE)

    def call(self, op: str, *args: Any) -> Any:
        self.channel.send((op, args))
        return self.channel.receive()

    def close(self) -> None:
        self.channel.close()
        self.gateway.exit()


def _load() -> str:
    global execnet
    import execnet
    import execnet.gateway_io

    return str(execnet.__version__)


def _with_group(body: Callable[[Any], None]) -> None:
    group = execnet.Group()
    try:
        body(group)
    finally:
        group.terminate(timeout=10.0)


def _start_and_call(group: Any, spec: str = "") -> Child:
    child = Child(group, spec)
    pid = child.call("getpid")
    if not isinstance(pid, int) or pid == os.getpid():
        raise RuntimeError(f"trivial call returned {pid!r}, not the child's pid")
    return child


def _call_samples(child: Child, count: int) -> List[float]:
    return [timed(child.call, "getpid") for _ in range(count)]


def cold_start(params: Dict[str, Any], rec: Recorder) -> None:
    """Time from ``makegateway`` to the first call's return; first child apart."""
    later = int(params.get("later_children", 2))

    def body(group: Any) -> None:
        times: List[float] = []
        for _ in range(1 + later):
            elapsed, child = measure(_start_and_call, group)
            times.append(elapsed)
            child.close()
        rec.samples("cold_start.first_child", "s", times[:1])
        if later:
            rec.samples("cold_start.next_child", "s", times[1:])

    _with_group(body)


def roundtrip(params: Dict[str, Any], rec: Recorder) -> None:
    """Latency of one request/reply on the dispatch channel of a warm child."""
    warmup, calls = int(params.get("warmup", 500)), int(params.get("calls", 5000))

    def body(group: Any) -> None:
        child = _start_and_call(group)
        _call_samples(child, warmup)
        rec.samples("roundtrip.call", "s", _call_samples(child, calls))

    _with_group(body)


def throughput(params: Dict[str, Any], rec: Recorder) -> None:
    """Seconds to send bytes to a child that returns ``len``: many small, one big."""
    small, count = int(params.get("small_bytes", 1 << 20)), int(params.get("small_count", 64))
    big = int(params.get("big_bytes", 64 << 20))
    repeat = int(params.get("repeat", 1))

    def body(group: Any) -> None:
        child = _start_and_call(group)
        chunk = os.urandom(small)
        if child.call("len", chunk) != small:
            raise RuntimeError("child saw a different length")

        def many() -> None:
            for _ in range(count):
                if child.call("len", chunk) != small:
                    raise RuntimeError("child saw a different length")

        rec.samples(f"throughput.{count}x{small >> 20}MiB", "s",
                    [timed(many) for _ in range(repeat)], bytes=small * count)
        payload = chunk * (big // small)

        def one() -> None:
            if child.call("len", payload) != len(payload):
                raise RuntimeError("child saw a different length")

        rec.samples(f"throughput.1x{big >> 20}MiB", "s",
                    [timed(one) for _ in range(repeat)], bytes=len(payload))

    _with_group(body)


def fanout(params: Dict[str, Any], rec: Recorder) -> None:
    """Wall time to make N gateways concurrently (one thread each) and call each once."""
    children = int(params["children"])

    def body(group: Any) -> None:
        def one(_: int) -> int:
            return _start_and_call(group).call("getpid")

        def all_children() -> None:
            with ThreadPoolExecutor(max_workers=children) as pool:
                pids = list(pool.map(one, range(children)))
            if len(set(pids)) != children:
                raise RuntimeError(f"{children} children gave {len(set(pids))} distinct pids")

        rec.samples(f"fanout.{children}", "s", [timed(all_children)])

    _with_group(body)


def bootstrap(params: Dict[str, Any], rec: Recorder) -> None:
    """Bytes written to a new child's stdin while its gateway is made, and its command line.

    Counted by wrapping the master side's pipe ``write`` for the duration of ``makegateway``.
    execnet sends its source uncompressed; that is what goes down the pipe.
    """
    del params
    io_class = execnet.gateway_io.Popen2IOMaster
    original = io_class.write
    written: List[int] = []

    def counting_write(self: Any, data: bytes) -> None:
        written.append(len(data))
        original(self, data)

    def body(group: Any) -> None:
        io_class.write = counting_write  # type: ignore[method-assign]
        try:
            gateway = group.makegateway(f"popen//python={sys.executable}")
        finally:
            io_class.write = original  # type: ignore[method-assign]
        argv = execnet.gateway_io.popen_args(gateway.spec)
        rec.value("bootstrap.payload", "B", sum(written))
        rec.value("bootstrap.boot_command", "B", len(" ".join(argv[1:]).encode()))

    _with_group(body)


def memory(params: Dict[str, Any], rec: Recorder) -> None:
    """RSS of fresh idle children, and the master's RSS growth per connected child."""
    children = int(params.get("children", 16))

    def body(group: Any) -> None:
        first = _start_and_call(group)
        rss = [read_rss_bytes(first.call("getpid"))]
        gc.collect()
        before = read_rss_bytes(os.getpid())
        kids = [_start_and_call(group) for _ in range(children)]
        gc.collect()
        after = read_rss_bytes(os.getpid())
        rss.extend(read_rss_bytes(kid.call("getpid")) for kid in kids)
        rec.samples("memory.child_rss", "B", rss)
        rec.value("memory.master_per_child", "B", (after - before) / children)

    _with_group(body)


def ssh_spec(params: Dict[str, Any]) -> str:
    """An ``ssh=`` gateway spec with the options Mitogen passes (``common.ssh_client_args``).

    execnet splits the ``ssh=`` value on whitespace into ssh's arguments (adding ``-C``, as
    Mitogen's default ``compression=True`` does); no value here may hold a space or ``//``.
    """
    args = common.ssh_client_args(params)
    bad = [arg for arg in [*args, params["python_path"]] if " " in arg or "//" in arg]
    if bad:
        raise ValueError(f"ssh spec arguments must not hold spaces or '//': {bad}")
    return f"ssh={' '.join(args)}//python={params['python_path']}"


def ssh(params: Dict[str, Any], rec: Recorder) -> None:
    """Make an ssh gateway and the first call, on fresh gateways one after another; then the
    call's round trip over the last (as ``mitogen_api.ssh``).

    Each gateway but the last lives in a group of its own, terminated (which waits for the
    gateway to go) before the next connection starts.
    """
    connects = int(params.get("connects", 10))
    warmup, calls = int(params.get("warmup", 200)), int(params.get("calls", 2000))
    if connects < 1:
        raise ValueError(f"connects={connects}: need at least one connection")
    spec = ssh_spec(params)
    times: List[float] = []

    def connect_and_close(group: Any) -> None:
        elapsed, child = measure(_start_and_call, group, spec)
        times.append(elapsed)
        child.close()

    def connect_and_call(group: Any) -> None:
        elapsed, child = measure(_start_and_call, group, spec)
        times.append(elapsed)
        rec.samples("ssh.connect", "s", times)
        _call_samples(child, warmup)
        rec.samples("ssh.call", "s", _call_samples(child, calls))

    for _ in range(connects - 1):
        _with_group(connect_and_close)
    _with_group(connect_and_call)


WORKLOADS = {
    "bootstrap": bootstrap,
    "cold_start": cold_start,
    "fanout": fanout,
    "memory": memory,
    "roundtrip": roundtrip,
    "ssh": ssh,
    "throughput": throughput,
}

if __name__ == "__main__":
    sys.exit(common.run_main(WORKLOADS, _load))
