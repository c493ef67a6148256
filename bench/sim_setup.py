"""How long the topology simulator takes to bring a tree up, by size and backend.

``python bench/sim_setup.py [--backend local|docker] [--sizes 10,25,50,100] [--repeat N]``
builds generated trees of the given sizes (a bastion, datacenters, racks and nodes, no link
latency so that only the machinery is timed) plus ``topologies/dc.yml`` as written, from
nothing to every context connected, and writes ``bench/sim_setup.md`` and
``bench/sim_setup.png`` (hosts -> set-up seconds). Docker images must already exist (they are
built once, by ``python -m simulator.images build``); image building is not timed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from simulator.timeline import Timeline  # noqa: E402
from simulator.topology import load_topology  # noqa: E402

#: Targets from the project's issue, in seconds.
TARGETS = {("local", "dc.yml"): 2.0, ("docker", "dc.yml"): 20.0, ("docker", 50): 60.0}


def tree_yaml(hosts: int) -> str:
    """A topology of exactly `hosts` hosts: bastion, then dcs of 4 racks of up to 4 nodes."""
    lines = ["version: 1", "name: gen%d" % hosts, "tree:", "  bastion:", "    role: bastion"]
    remaining = hosts - 1
    if remaining:
        lines.append("    children:")
    dc = 0
    while remaining > 0:
        dc += 1
        remaining -= 1
        lines += ["      dc%d:" % dc, "        role: datacenter"]
        racks = []
        while remaining > 0 and len(racks) < 4:
            nodes = min(4, remaining - 1)
            racks.append(nodes)
            remaining -= 1 + nodes
        if racks:
            lines.append("        children:")
        for r, nodes in enumerate(racks, start=1):
            lines += ["          rack%d_%d:" % (dc, r), "            role: rack"]
            if nodes:
                lines.append("            children:")
                lines += ["              node%d_%d_%d: {role: node}" % (dc, r, n)
                          for n in range(1, nodes + 1)]
    return "\n".join(lines) + "\n"


def make_backend(name: str):
    if name == "local":
        from simulator.local import LocalBackend

        return LocalBackend(Timeline())
    import simulator.dockerbackend

    return simulator.dockerbackend.DockerBackend(Timeline(), prepare=True)


def time_setup(backend_name: str, path: str) -> float:
    topology = load_topology(path)
    backend = make_backend(backend_name)
    began = time.monotonic()
    try:
        backend.create(topology)
        return time.monotonic() - began
    finally:
        backend.destroy()


def run(backend: str, sizes: List[int], repeat: int) -> Dict[str, List[float]]:
    results: Dict[str, List[float]] = {}
    with tempfile.TemporaryDirectory(prefix="sim-setup-") as tmp:
        files = {"dc.yml": str(REPO / "topologies" / "dc.yml")}
        for size in sizes:
            path = os.path.join(tmp, "gen%d.yml" % size)
            Path(path).write_text(tree_yaml(size))
            assert len(load_topology(path).hosts) == size
            files[str(size)] = path
        for _ in range(repeat):
            for label, path in files.items():
                seconds = time_setup(backend, path)
                results.setdefault(label, []).append(seconds)
                print("%s %s: %.2f s" % (backend, label, seconds), flush=True)
    return results


def write_report(backend: str, results: Dict[str, List[float]], command: str) -> None:
    rows = ["| Tree | Hosts | Set-up (median) | Runs | Target | Status |",
            "| --- | --- | --- | --- | --- | --- |"]
    for label, values in results.items():
        hosts = len(load_topology(str(REPO / "topologies" / "dc.yml")).hosts) \
            if label == "dc.yml" else int(label)
        median = statistics.median(values)
        key = (backend, "dc.yml" if label == "dc.yml" else hosts)
        target = TARGETS.get(key)
        status = "" if target is None else ("met" if median <= target else "NOT met")
        rows.append("| %s | %d | %.2f s | %d | %s | %s |" % (
            label, hosts, median, len(values), "" if target is None else "<= %g s" % target,
            status))
    out = REPO / "bench" / ("sim_setup_%s.md" % backend)
    out.write_text("# Simulator set-up time (%s backend)\n\n- Date: %s\n- Command: `%s`\n- "
                   "Machine: %d cores\n\n%s\n\n![set-up](sim_setup_%s.png)\n" % (
                       backend, time.strftime("%Y-%m-%d %H:%M:%S"), command, os.cpu_count(),
                       "\n".join(rows), backend))
    (REPO / "bench" / ("sim_setup_%s.json" % backend)).write_text(
        json.dumps(results, indent=1) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    sizes = sorted(int(k) for k in results if k != "dc.yml")
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(sizes, [statistics.median(results[str(s)]) for s in sizes], "o-", label=backend)
    ax.set_xlabel("hosts")
    ax.set_ylabel("seconds to every context connected")
    ax.set_title("Simulator set-up time (%s)" % backend)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(REPO / "bench" / ("sim_setup_%s.png" % backend), dpi=100)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=("local", "docker"), default="local")
    parser.add_argument("--sizes", default="10,25,50,100")
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    results = run(args.backend, sizes, args.repeat)
    write_report(args.backend, results, "python bench/sim_setup.py " + " ".join(sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
