"""A/B of two commits of this project on the bench's own workload scripts, in one run.

``python bench/ab.py BASE [NEW] [--reps N] [--only roundtrip,throughput,cold_start,remote_import]``

Each commit is exported with ``git archive`` and installed (not editable, without its
dependencies: the workloads need only the package) into a virtual environment of its own
under ``bench/.venvs/ab-<commit>``; then the same workload script runs on each in turn,
alternating which goes first, and the medians and their ratio (NEW/BASE) are printed. This is
how "stays within 5 % of the figures before this change" is checked: on the same machine at
the same moment, which a ratio to a figure of another day cannot be.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tarfile
import tempfile
import venv
from pathlib import Path
from typing import Dict, List, Sequence

if __package__ in (None, ""):  # run as a script: make ``bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.run import workload_env
from bench.workloads.common import RESULT_MARKER

__all__ = ["PLANS", "install", "main", "measure"]

REPO_ROOT = Path(__file__).resolve().parent.parent
WORKLOADS = REPO_ROOT / "bench" / "workloads"
VENV_ROOT = REPO_ROOT / "bench" / ".venvs"
MIB = 1 << 20

#: The fast-path workloads and the parameters of a full bench run (bench/run.py).
PLANS: Dict[str, dict] = {
    "roundtrip": {"warmup": 500, "calls": 5000},
    "throughput": {"small_bytes": MIB, "small_count": 64, "big_bytes": 64 * MIB},
    "cold_start": {"later_children": 2},
    "remote_import": {},
}


def _commit(ref: str) -> str:
    out = subprocess.run(["git", "rev-parse", "--verify", ref + "^{commit}"], cwd=REPO_ROOT,
                         capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"bench/ab.py: {ref!r} is not a commit of this repository")
    return out.stdout.strip()


def install(ref: str) -> Path:
    """The python of a virtual environment holding `ref` of this project (made once)."""
    commit = _commit(ref)
    env = VENV_ROOT / f"ab-{commit[:12]}"
    python = env / "bin" / "python"
    if (env / ".installed").exists():
        return python
    venv.create(env, with_pip=True, clear=True)
    with tempfile.TemporaryDirectory(prefix="bench-ab-") as tmp:
        archive = Path(tmp) / "src.tar"
        subprocess.run(["git", "archive", "-o", str(archive), commit], cwd=REPO_ROOT,
                       check=True)
        with tarfile.open(archive) as tar:
            if hasattr(tarfile, "data_filter"):  # 3.12, and 3.9-3.11 since mid-2023
                tar.extractall(Path(tmp) / "src", filter="data")
            else:
                tar.extractall(Path(tmp) / "src")  # our own git archive: trusted
        subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps",
                        str(Path(tmp) / "src")], check=True)
    (env / ".installed").write_text(commit + "\n")
    return python


def measure(python: Path, workload: str, params: dict) -> Dict[str, float]:
    """One run of a workload: each metric's median (a single value stays as it is)."""
    # The environment bench/run.py gives its workloads (no PYTHONDONTWRITEBYTECODE: a
    # master that cannot cache its boot image minifies the core for its first child).
    out = subprocess.run([str(python), str(WORKLOADS / "mitogen_api.py"), workload,
                          json.dumps(params)], cwd=WORKLOADS, capture_output=True, text=True,
                         timeout=600, check=False, env=workload_env())
    lines = [line[len(RESULT_MARKER):] for line in out.stdout.splitlines()
             if line.startswith(RESULT_MARKER)]
    if not lines:
        raise RuntimeError(f"{workload} on {python} printed no result: {out.stderr[-2000:]}")
    result = json.loads(lines[-1])
    if not result["ok"]:
        raise RuntimeError(f"{workload} on {python} failed: {result['error']}")
    figures = {}
    for name, metric in result["metrics"].items():
        values = metric.get("samples") or [metric.get("value")]
        if values and all(isinstance(v, (int, float)) for v in values):
            figures[name] = statistics.median(values)
    return figures


def compare(pythons: Dict[str, Path], workloads: Sequence[str], reps: int) -> List[str]:
    """Alternate the two installs `reps` times per workload; one line per metric."""
    runs: Dict[str, Dict[str, List[float]]] = {}
    for workload in workloads:
        for rep in range(reps):
            order = ["base", "new"] if rep % 2 == 0 else ["new", "base"]
            for side in order:
                for name, value in measure(pythons[side], workload, PLANS[workload]).items():
                    runs.setdefault(name, {}).setdefault(side, []).append(value)
    lines = []
    for name, sides in sorted(runs.items()):
        if "base" in sides and "new" in sides:
            base, new = statistics.median(sides["base"]), statistics.median(sides["new"])
            ratio = new / base if base else float("nan")
            lines.append(f"{name:40} base {base:12.6g}  new {new:12.6g}  new/base {ratio:.3f}")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("base", help="the commit to compare against")
    parser.add_argument("new", nargs="?", default="HEAD", help="default: HEAD")
    parser.add_argument("--reps", type=int, default=7, help="runs of each workload on each")
    parser.add_argument("--only", default=",".join(PLANS),
                        help="workloads, comma-separated (default: %(default)s)")
    args = parser.parse_args(argv)
    workloads = [w for w in args.only.split(",") if w]
    unknown = [w for w in workloads if w not in PLANS]
    if unknown:
        parser.error(f"unknown workloads {unknown}; known: {', '.join(PLANS)}")
    pythons = {"base": install(args.base), "new": install(args.new)}
    print(f"base {_commit(args.base)[:12]}  new {_commit(args.new)[:12]}  reps {args.reps}"
          " (times in seconds: lower is better)", flush=True)
    for line in compare(pythons, workloads, args.reps):
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
