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

import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

__all__ = [
    "RESULT_MARKER",
    "Recorder",
    "make_package",
    "measure",
    "read_rss_bytes",
    "run_main",
    "ssh_client_args",
    "timed",
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

    def samples(self, name: str, unit: str, values: List[float], **extra: Any) -> None:
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


def _parse_argv(argv: List[str], workloads: Dict[str, Workload]) -> tuple:
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


def run_main(workloads: Dict[str, Workload], load: Optional[Callable[[], str]] = None,
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
