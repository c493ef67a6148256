"""The same workloads written against execnet 2.1, run inside the ``execnet`` venv.

execnet has no ``Context.call``: its unit of remote work is a source string run with
``remote_exec`` that talks over a channel. The closest equivalent of a call is a request on a
channel to a small dispatch loop started once per gateway (:data:`SERVE`), which is what every
"call" below is. Gateways are made with ``popen//python=<this interpreter>`` so that execnet
ships its own source over the pipe, as it does over ssh, rather than importing an installed
copy: that is the fair match for Mitogen, which always ships itself.

Multi-hop and remote import have no counterpart here (execnet does not forward module
imports, and a ``via=`` gateway is a proxy made for starting, not a chain to call through);
the harness does not run them and the report marks them n/a.
"""

from __future__ import annotations

import os
import sys
import time
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

    def __init__(self, group: Any, spec: str = "", gateway: Any = None) -> None:
        self.gateway = gateway or group.makegateway(spec or f"popen//python={sys.executable}")
        self.channel = self.gateway.remote_exec(SERVE)

    def another_channel(self) -> Child:
        """A second dispatch loop on the same gateway (the same pipe), for a second caller:
        one channel's replies must not be read by two threads."""
        return Child(None, gateway=self.gateway)

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
    """Wall time to make N gateways concurrently (one thread each) and call each once; then
    the CPU seconds that cost, per child (as ``mitogen_api.fanout``).

    With ``via``, the N gateways are made through one intermediate gateway (``popen//via=``,
    made first, untimed; its own CPU is counted in the total).
    """
    children = int(params["children"])
    name = "fanout_via" if params.get("via") else "fanout"
    common.become_subreaper()
    cpu_before = common.cpu_seconds()

    def body(group: Any) -> None:
        spec = ""
        if params.get("via"):
            _start_and_call(group, f"popen//id=intermediate//python={sys.executable}")
            spec = f"popen//via=intermediate//python={sys.executable}"

        def one(_: int) -> int:
            return _start_and_call(group, spec).call("getpid")

        def all_children() -> None:
            with ThreadPoolExecutor(max_workers=children) as pool:
                pids = list(pool.map(one, range(children)))
            if len(set(pids)) != children:
                raise RuntimeError(f"{children} children gave {len(set(pids))} distinct pids")

        rec.samples(f"{name}.{children}", "s", [timed(all_children)])

    _with_group(body)
    left = common.reap_children(timeout=30.0)
    rec.samples(f"{name}_cpu.{children}", "s", [(common.cpu_seconds() - cpu_before) / children])
    if left:
        raise RuntimeError(f"{left} child processes still running 30 s after shutdown")


def tail(params: Dict[str, Any], rec: Recorder) -> None:
    """Round trips to one gateway while another receives a big argument, against the same
    gateway's idle round trips; and round trips on a second channel of the receiving gateway
    while a big argument is on its way (as ``mitogen_api.tail``)."""
    big, rounds = int(params.get("big_bytes", 256 << 20)), int(params.get("rounds", 3))
    idle_calls, transfers = int(params.get("idle_calls", 1000)), int(params.get("transfers", 2))
    warmup = int(params.get("warmup", 200))

    def body(group: Any) -> None:
        sink, probe = _start_and_call(group), _start_and_call(group)
        beside_sink = sink.another_channel()
        payload = os.urandom(1 << 20) * max(1, big >> 20)

        def send_big() -> None:
            if sink.call("len", payload) != len(payload):
                raise RuntimeError("child saw a different length")

        send_big()
        _call_samples(probe, warmup)
        samples: Dict[str, List[float]] = {"idle": [], "loaded": [], "same_stream": []}
        for _ in range(rounds):
            samples["idle"] += _call_samples(probe, idle_calls)
            samples["loaded"] += common.under_load(send_big, lambda: probe.call("getpid"),
                                                   transfers)
            samples["same_stream"] += common.under_load(
                send_big, lambda: beside_sink.call("getpid"), 1)
        for name, values in samples.items():
            rec.samples(f"tail.{name}", "s", values, big_bytes=len(payload))

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
    """RSS of fresh idle children, the master's RSS growth per connected child, what is left
    of it after they exit, and what a second cycle leaves (as ``mitogen_api.memory``).

    The measured gateways live in a group of their own, whose ``terminate()`` waits for them
    to exit; the first gateway stays connected in the outer group.
    """
    children = int(params.get("children", 16))

    def body(group: Any) -> None:
        first = _start_and_call(group)
        rss = [read_rss_bytes(first.call("getpid"))]
        before = common.master_rss()
        cycle = execnet.Group()
        kids = [_start_and_call(cycle) for _ in range(children)]
        connected = common.master_rss()
        rss.extend(read_rss_bytes(kid.call("getpid")) for kid in kids)
        rec.samples("memory.child_rss", "B", rss)
        rec.value("memory.master_per_child", "B", (connected - before) / children)
        del kids
        cycle.terminate(timeout=60.0)
        after_first = common.master_rss()
        rec.value("memory.master_residual", "B", after_first - before)
        cycle = execnet.Group()
        for _ in range(children):
            _start_and_call(cycle)
        cycle.terminate(timeout=60.0)
        rec.value("memory.master_leak_per_child", "B",
                  (common.master_rss() - after_first) / children)

        def traced(pids: Any) -> None:
            third = execnet.Group()
            for i in range(children):
                pids[i] = _start_and_call(third).call("getpid")
            third.terminate(timeout=60.0)

        rec.value("memory.master_objects_kept_per_child", "B",
                  common.bytes_kept_per_cycle(traced, children) / children)

    _with_group(body)


def scale(params: Dict[str, Any], rec: Recorder) -> None:
    """N gateways at once in one master: made from ``workers`` threads, one call each, then
    all terminated (``Group.terminate()``, which waits for every process); the times and the
    master's RSS (as ``mitogen_api.scale``)."""
    children, workers = int(params.get("children", 1000)), int(params.get("workers", 32))
    reap_timeout = float(params.get("reap_timeout", 30.0))
    rec.info["nofile"] = common.raise_nofile(8 * children + 256)

    def body(group: Any) -> None:
        first = _start_and_call(group)
        common.check_memory_for(children, first.call("getpid"))
        with common.warm_pool(workers, lambda: None) as pool:
            rss_before, fds_before = common.master_rss(), common.fd_table()
            many = execnet.Group()
            elapsed, kids = measure(lambda: list(pool.map(lambda _: _start_and_call(many),
                                                          range(children))))
            pids = [kid.call("getpid") for kid in kids]
            if len(set(pids)) != children:
                raise RuntimeError(f"{children} children gave {len(set(pids))} distinct pids")
            rec.samples("scale.start", "s", [elapsed])
            rss_connected = common.master_rss()
            rec.value("scale.master_rss", "B", rss_connected)
            rec.value("scale.master_per_child", "B", (rss_connected - rss_before) / children)
            del kids
            rec.samples("scale.shutdown", "s", [timed(many.terminate, None)])
            deadline = time.monotonic() + reap_timeout
            common.wait_reaped(pids, deadline)
            rec.value("scale.master_residual", "B", common.master_rss() - rss_before)
        common.record_leftovers(rec, pids, fds_before, deadline)

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


def ssh_fanout(params: Dict[str, Any], rec: Recorder) -> None:
    """Wall time of one ssh gateway per account, all made at once from one thread each,
    until each has answered its first call (as ``mitogen_api.ssh_fanout``)."""
    users = list(params["usernames"])

    def body(group: Any) -> None:
        def one(user: str) -> int:
            return _start_and_call(group, ssh_spec({**params, "username": user})).call(
                "getpid")

        def all_connections() -> None:
            with ThreadPoolExecutor(max_workers=len(users)) as pool:
                pids = list(pool.map(one, users))
            if len(set(pids)) != len(users):
                raise RuntimeError(f"{len(users)} connections gave {len(set(pids))} pids")

        rec.samples("ssh.concurrent", "s", [timed(all_connections)], connections=len(users))

    _with_group(body)


WORKLOADS = {
    "bootstrap": bootstrap,
    "cold_start": cold_start,
    "fanout": fanout,
    "memory": memory,
    "roundtrip": roundtrip,
    "scale": scale,
    "ssh": ssh,
    "ssh_fanout": ssh_fanout,
    "tail": tail,
    "throughput": throughput,
}

if __name__ == "__main__":
    sys.exit(common.run_main(WORKLOADS, _load))
