"""Plumbing shared by the workload scripts, which run inside each implementation's own venv.

The scripts are started by ``bench/run.py`` as ``python SCRIPT WORKLOAD PARAMS_JSON`` with the
venv's interpreter, so that a peer library is never loaded into the harness (or into another
peer). This module therefore imports only the standard library, and it is found next to the
script (``sys.path[0]``), not as part of a package.

A script reports exactly one JSON object on a line that starts with :data:`RESULT_MARKER`.
The marker lets the harness ignore anything else a library or its children print to stdout.
Metrics are recorded as soon as each one is complete, so a workload that fails half-way still
reports what it measured before the failure.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import gc
import json
import os
import platform
import re
import resource
import sys
import threading
import time
import traceback
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

__all__ = [
    "RESULT_MARKER",
    "NotRunnable",
    "Recorder",
    "become_subreaper",
    "bytes_kept_per_cycle",
    "check_memory_for",
    "cpu_seconds",
    "fd_table",
    "live_children",
    "make_package",
    "master_rss",
    "measure",
    "new_fds",
    "private_bytes",
    "raise_nofile",
    "read_rss_bytes",
    "reap_children",
    "record_leftovers",
    "run_main",
    "ssh_client_args",
    "timed",
    "under_load",
    "wait_reaped",
    "warm_pool",
]

#: Prefix of the one stdout line that carries the result.
RESULT_MARKER = "BENCH-RESULT "

#: Number of modules in the generated package, counting its ``__init__``.
PACKAGE_MODULES = 30

Workload = Callable[[Dict[str, Any], "Recorder"], None]


class Recorder:
    """Collects the metrics of one workload run in the shape ``bench/report.py`` reads."""

    def __init__(self) -> None:
        self.metrics: Dict[str, Dict[str, Any]] = {}
        self.info: Dict[str, Any] = {}

    def samples(self, name: str, unit: str, values: Sequence[float], **extra: Any) -> None:
        """Record repeated measurements (seconds, bytes...) of one metric."""
        if not values:
            raise ValueError(f"metric {name!r}: no samples")
        self.metrics[name] = {"unit": unit, "samples": [float(v) for v in values], **extra}

    def value(self, name: str, unit: str, value: float, **extra: Any) -> None:
        """Record a single deterministic measurement (a size, a count)."""
        self.samples(name, unit, [value], **extra)


def measure(func: Callable[..., Any], *args: Any) -> Tuple[float, Any]:
    """Call ``func(*args)``; return how long it took (seconds, high-resolution) and its result."""
    start = time.perf_counter()
    result = func(*args)
    return time.perf_counter() - start, result


def timed(func: Callable[..., Any], *args: Any) -> float:
    """How long ``func(*args)`` took, in seconds."""
    return measure(func, *args)[0]


def read_rss_bytes(pid: int) -> int:
    """Resident set size of a process, from ``/proc/<pid>/status`` (Linux)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                kib = int(line.split()[1])
                return kib * 1024
    raise RuntimeError(f"no VmRSS line in /proc/{pid}/status")


def master_rss() -> int:
    """This process's RSS after a garbage collection (cycles freed, not waiting for one)."""
    gc.collect()
    return read_rss_bytes(os.getpid())


def private_bytes(pid: int) -> int:
    """Memory only this process holds (private clean + dirty pages, ``smaps_rollup``): what
    another copy of it would add to the machine, unlike RSS, which counts shared pages."""
    total = 0
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                total += int(line.split()[1]) * 1024
    return total


def _mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable line in /proc/meminfo")


class NotRunnable(Exception):
    """This implementation cannot run the workload here; the message says why. Recorded as a
    skip with that reason, not as a failure."""


def check_memory_for(children: int, sample_pid: int, share: float = 0.5) -> None:
    """Refuse (:class:`NotRunnable`) to start ``children`` more children like ``sample_pid``
    when their private memory would take more than ``share`` of the memory available: the
    machine is shared, and an out-of-memory kill would hit whoever comes first."""
    need, available = children * private_bytes(sample_pid), _mem_available()
    if need > share * available:
        raise NotRunnable(f"{children} children would need {need / (1 << 30):.1f} GiB of "
                          f"private memory ({private_bytes(sample_pid) >> 10} KiB each), over "
                          f"{share:.0%} of the {available / (1 << 30):.1f} GiB available")


def cpu_seconds() -> float:
    """User + system CPU seconds of this process (every thread) and of every descendant it
    has waited for (``RUSAGE_CHILDREN`` counts a grandchild once its parent waited for it
    and was itself waited for; :func:`become_subreaper` makes orphans ours to wait for)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    waited = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + waited.ru_utime + waited.ru_stime


PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> None:
    """Make this process the reaper of its orphaned descendants (Linux ``prctl``), so that a
    grandchild whose parent exits first is still waited for here, and its CPU counted."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def live_children(pids: Optional[Sequence[int]] = None) -> List[int]:
    """Processes (running or zombie) whose parent is this process: all of them, or those
    among ``pids``."""
    me, found = os.getpid(), []
    for name in (os.listdir("/proc") if pids is None else [str(pid) for pid in pids]):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == me:
            found.append(int(name))
    return found


def reap_children(timeout: float) -> int:
    """Wait for every child of this process to exit, and reap it, for at most ``timeout``
    seconds; return how many were left. Call it only once the library has shut down: it
    reaps children the library may have meant to wait for itself."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return 0
        if pid:
            continue
        if time.monotonic() > deadline:
            return len(live_children())
        time.sleep(0.01)  # no event says "a child exited" without a SIGCHLD handler


def bytes_kept_per_cycle(cycle: Callable[[Any], None], children: int,
                         reap_timeout: float = 60.0) -> int:
    """Growth of the live Python allocations (tracemalloc) across one ``cycle(pids)`` of
    connecting ``children`` children and disconnecting them, once they are reaped: objects
    the library keeps per cycle, as opposed to memory its allocators keep for reuse.

    Measured between the ends of two traced cycles, not from the start of tracing: a block
    allocated during a cycle that merely replaces an older one (a container's table rebuilt
    at the same size, the buffer of the poll call the broker thread is blocked in) is alive
    at both ends. ``pids`` is an array of ``children`` slots the cycle fills with its
    children's pids, made before tracing starts so that it is not counted. Tracing slows the
    cycles: run this after every timing and RSS figure.
    """
    pids = array.array("q", bytes(8 * children))
    ends = []
    gc.collect()
    tracemalloc.start()
    try:
        for _ in range(2):
            cycle(pids)
            deadline = time.monotonic() + reap_timeout
            while live_children(pids.tolist()) and time.monotonic() < deadline:
                time.sleep(0.05)  # the library's reaper runs on its own schedule
            gc.collect()
            ends.append(tracemalloc.get_traced_memory()[0])
    finally:
        tracemalloc.stop()
    return ends[1] - ends[0]


def fd_table() -> Dict[int, str]:
    """This process's open descriptors and what each refers to (``socket:[inode]``, a path)."""
    table = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            table[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:  # the listing's own descriptor, or one closed meanwhile
            continue
    return table


def new_fds(before: Mapping[int, str]) -> List[str]:
    """What the descriptors opened since ``before`` (a :func:`fd_table`) refer to; socket
    inodes are dropped (``socket``), so that equal leftovers read alike in a report."""
    return sorted(re.sub(r"\[\d+\]$", "", target) for fd, target in fd_table().items()
                  if before.get(fd) != target)


def wait_reaped(pids: Sequence[int], deadline: float) -> None:
    """Wait until none of ``pids`` is this process's child any more (reaped by the library),
    or until ``deadline`` (``time.monotonic()``)."""
    while live_children(pids) and time.monotonic() < deadline:
        time.sleep(0.05)  # the library's reaper runs on its own schedule


def record_leftovers(rec: Recorder, pids: Sequence[int], fds_before: Mapping[int, str],
                     deadline: float) -> None:
    """Record what the library left behind (``scale.left_behind``: children not reaped and
    descriptors not closed, which ones in ``info``), waiting for them until ``deadline``.

    Call it once the threads the workload started have exited: a library may keep a
    descriptor per thread for the thread's life (ours: the socketpair a thread sleeps on,
    made the first time it has to wait), which is the thread's, not the children's.
    """
    wait_reaped(pids, deadline)
    while new_fds(fds_before) and time.monotonic() < deadline:
        time.sleep(0.05)  # closing threads of the library may still be finishing
    unreaped, fds = len(live_children(pids)), new_fds(fds_before)
    rec.value("scale.left_behind", "count", unreaped + len(fds))
    rec.info["scale_unreaped"] = unreaped
    if fds:
        rec.info["scale_open_fds"] = fds


def raise_nofile(needed: int) -> int:
    """Raise this process's open-file limit to at least ``needed`` (the hard limit too, when
    root); return the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return soft
    if hard != resource.RLIM_INFINITY and hard < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, needed))  # root only
    else:
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


@contextlib.contextmanager
def warm_pool(workers: int, first: Callable[[], Any]) -> Iterator[ThreadPoolExecutor]:
    """A thread pool whose ``workers`` threads all exist already and have each run
    ``first()`` (a call, which may leave a per-thread resource behind), so that memory and
    descriptors counted after this point are not theirs."""
    barrier = threading.Barrier(workers)

    def warm() -> None:
        first()
        barrier.wait(60.0)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for future in [pool.submit(warm) for _ in range(workers)]:
            future.result()
        yield pool


def under_load(big: Callable[[], Any], small: Callable[[], Any], transfers: int) -> List[float]:
    """Round trips of ``small()``, made back to back for as long as another thread runs
    ``big()`` ``transfers`` times in a row: the latency one caller sees while another moves a
    large message. Raises what ``big()`` raised."""
    done = threading.Event()
    errors: List[BaseException] = []

    def pump() -> None:
        try:
            for _ in range(transfers):
                big()
        except BaseException as exc:  # handed to the measuring thread
            errors.append(exc)
        finally:
            done.set()

    thread = threading.Thread(target=pump, name="bench-big-transfers", daemon=True)
    thread.start()
    samples = []
    while not done.is_set():
        samples.append(timed(small))
    thread.join()
    if errors:
        raise errors[0]
    return samples


def _module_body(index: int) -> str:
    """Source of one leaf module: a few kilobytes of ordinary code, like a real library's."""
    funcs = "\n\n".join(
        f"def helper_{index}_{j}(values):\n"
        f'    """Fold the values with constant {j}; exists to give the module a real size."""\n'
        f"    total = {j}\n"
        f"    for value in values:\n"
        f"        total = (total * 31 + value) % 1000003\n"
        f"    return total\n"
        for j in range(8)
    )
    return (
        f'"""Leaf module {index} of the generated benchmark package."""\n\n'
        f"VALUE = {index}\n"
        f"TABLE = {list(range(index, index + 40))!r}\n\n\n"
        f"class Thing{index}:\n"
        f'    """A small class so that the module holds more than functions."""\n\n'
        f"    def __init__(self, seed):\n"
        f"        self.seed = seed\n\n"
        f"    def score(self):\n"
        f"        return helper_{index}_0(TABLE) + self.seed\n\n\n"
        f"{funcs}"
    )


def make_package(root: Path, name: str, dynamic: bool) -> List[str]:
    """Write a package of :data:`PACKAGE_MODULES` modules under ``root``; return their names.

    The package has ``__init__``, ``entry`` and 28 leaves. ``entry.run()`` imports every leaf
    and returns the sum of their ``VALUE``: with ``dynamic=False`` through static ``from .
    import`` statements (which an importer can see in advance), with ``dynamic=True`` through
    ``importlib.import_module`` at call time (which it cannot).
    """
    leaves = [f"m{i:02d}" for i in range(1, PACKAGE_MODULES - 1)]
    pkg = root / name
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(f'"""Generated benchmark package {name}."""\n')
    for index, leaf in enumerate(leaves, start=1):
        (pkg / f"{leaf}.py").write_text(_module_body(index))
    if dynamic:
        entry = (
            '"""Imports the leaves only when run() is called."""\n\n'
            "import importlib\n\n"
            f"LEAVES = {leaves!r}\n\n\n"
            "def run():\n"
            f"    mods = [importlib.import_module('{name}.' + leaf) for leaf in LEAVES]\n"
            "    return sum(mod.VALUE for mod in mods)\n"
        )
    else:
        entry = (
            '"""Imports the leaves statically, as most code does."""\n\n'
            f"from {name} import {', '.join(leaves)}\n\n"
            f"MODS = [{', '.join(leaves)}]\n\n\n"
            "def run():\n"
            "    return sum(mod.VALUE for mod in MODS)\n"
        )
    (pkg / "entry.py").write_text(entry)
    return [name, f"{name}.entry", *(f"{name}.{leaf}" for leaf in leaves)]


def expected_package_sum() -> int:
    """What ``entry.run()`` of a generated package returns."""
    return sum(range(1, PACKAGE_MODULES - 1))


def ssh_client_args(params: Dict[str, Any]) -> List[str]:
    """ssh's arguments (after ``ssh``, before the remote command) to log in to the harness's
    sshd the way Mitogen does for ``check_host_keys='ignore'`` and an identity file: batch
    mode, only that key, no host key check, no known_hosts read or written; and ``-F
    /dev/null`` so that the invoking user's ~/.ssh/config plays no part."""
    return ["-F", "/dev/null", "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "GlobalKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
            "-i", str(params["identity_file"]), "-p", str(int(params["port"])),
            "-l", str(params["username"]), str(params["hostname"])]


def _parse_argv(argv: List[str], workloads: Mapping[str, Workload]) -> tuple:
    if len(argv) not in (2, 3):
        raise SystemExit(f"usage: {Path(sys.argv[0]).name} WORKLOAD [PARAMS_JSON]; "
                         f"workloads: {', '.join(sorted(workloads))}")
    name = argv[1]
    if name not in workloads:
        raise SystemExit(f"unknown workload {name!r}; known: {', '.join(sorted(workloads))}")
    params = json.loads(argv[2]) if len(argv) == 3 else {}
    if not isinstance(params, dict):
        raise SystemExit(f"PARAMS_JSON must be a JSON object, got {type(params).__name__}")
    return name, params


def run_main(workloads: Mapping[str, Workload], load: Optional[Callable[[], str]] = None,
             argv: Optional[List[str]] = None) -> int:
    """Run the workload named on the command line and print its result line.

    ``load`` imports the library under test and returns its version; it runs inside the same
    guard as the workload. Any exception becomes ``ok: false`` with the error text, so that an
    implementation that cannot run a workload yet (or cannot even be imported) is recorded as
    a failure rather than crashing the harness.
    """
    name, params = _parse_argv(list(sys.argv if argv is None else argv), workloads)
    rec = Recorder()
    result: Dict[str, Any] = {"workload": name, "ok": True, "error": None}
    rec.info.update(python=platform.python_version(), pid=os.getpid())
    start = time.perf_counter()
    try:
        if load is not None:
            rec.info["version"] = load()
        workloads[name](params, rec)
    except NotRunnable as exc:
        result.update(ok=False, skipped=True, error=f"skipped: {exc}"[:2000])
    except BaseException as exc:  # reported, never raised: the harness decides
        result["ok"] = False
        result["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        result["traceback"] = traceback.format_exc()[-6000:]
    result["elapsed"] = time.perf_counter() - start
    result["metrics"] = rec.metrics
    result["info"] = rec.info
    sys.stdout.flush()
    sys.stdout.write("\n" + RESULT_MARKER + json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0 if result["ok"] else 1
