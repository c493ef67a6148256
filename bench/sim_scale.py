"""The simulator at scale on the container backends: set-up time, and call latency by how many
swarm-node boundaries a call crosses.

``python bench/sim_scale.py docker [--hosts 200]``: one machine's engine brings up a tree of
``--hosts`` hosts (the generated trees of ``bench/sim_setup.py``); the target is <= 120 s
for 200 hosts.

``python bench/sim_scale.py swarm [--hosts 100] [--nodes 1,3]``: the same tree on a swarm of
1 node and of 3 nodes, each node a Docker engine in its own network namespace on this machine
(``simulator/swarmlab.py``), placed a subtree per node (``placement: {rule: subtree}``), with
the median latency of a trivial call to each host, grouped by how many times its path from
the runner crosses from one node to another.

Each run appends its figures to ``bench/sim_scale.json`` and rewrites ``bench/sim_scale.md``
and ``bench/sim_scale.png`` from all of them (latest per line). As root; the images must be
built (``python -m simulator images build bookworm``); building them and loading them into
the lab's engines are not timed.
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
from typing import Any, Dict, List

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from sim_setup import tree_yaml  # noqa: E402

from simulator import probes  # noqa: E402
from simulator.timeline import Timeline  # noqa: E402
from simulator.topology import Topology, load_topology  # noqa: E402

RESULTS = REPO / "bench" / "sim_scale.json"
TARGETS = {("docker", 200): 120.0}
CALLS = 5


def crossings(topology: Topology, nodes: Dict[str, str], host_id: str) -> int:
    """How many edges of the path runner -> host join hosts on different nodes (the first
    hop, runner -> root, is on the runner's own node when the root is on the first node)."""
    host = topology.host(host_id)
    chain = [*topology.ancestors(host), host]
    count = 0
    for upper, lower in zip(chain, chain[1:]):
        count += nodes[upper.id] != nodes[lower.id]
    return count


def latencies(backend: Any, topology: Topology) -> Dict[str, float]:
    """Median seconds of a trivial call to each host (after one warm-up call)."""
    found = {}
    for host in topology.hosts:
        context = backend.context(host.id)
        context.call(probes.identity, 0)
        samples = []
        for _ in range(CALLS):
            began = time.perf_counter()
            context.call(probes.identity, 0)
            samples.append(time.perf_counter() - began)
        found[host.id] = statistics.median(samples)
    return found


def bench_docker(path: str) -> Dict[str, Any]:
    from simulator.dockerbackend import DockerBackend

    topology = load_topology(path)
    backend = DockerBackend(Timeline(), prepare=True)
    began = time.monotonic()
    try:
        backend.create(topology)
        setup = time.monotonic() - began
        lat = latencies(backend, topology)
    finally:
        backend.destroy()
    return {"backend": "docker", "nodes": 1, "hosts": len(topology.hosts), "setup": setup,
            "latency": {"0": statistics.median(lat.values())}}


def bench_swarm(path: str, nodes: int) -> Dict[str, Any]:
    from simulator import images
    from simulator.swarmbackend import SwarmBackend
    from simulator.swarmlab import SwarmLab

    topology = load_topology(path)
    with SwarmLab(nodes) as lab:
        lab.load_images(sorted({images.image_tag(h.suite) for h in topology.hosts}))
        backend = SwarmBackend(Timeline(), engine=lab.manager)
        began = time.monotonic()
        try:
            backend.create(topology)
            setup = time.monotonic() - began
            placed = {h.id: backend.node_of(h.id) for h in topology.hosts}
            lat = latencies(backend, topology)
        finally:
            backend.destroy()
    by_crossings: Dict[str, List[float]] = {}
    for host_id, seconds in lat.items():
        by_crossings.setdefault(str(crossings(topology, placed, host_id)), []).append(seconds)
    return {"backend": "swarm", "nodes": nodes, "hosts": len(topology.hosts), "setup": setup,
            "latency": {k: statistics.median(v) for k, v in sorted(by_crossings.items())},
            "hosts_by_crossings": {k: len(v) for k, v in sorted(by_crossings.items())}}


def _line(entry: Dict[str, Any]) -> str:
    return f"{entry['backend']} {entry['nodes']} node{'s' * (entry['nodes'] > 1)}"


def write_report(entries: List[Dict[str, Any]]) -> None:
    latest: Dict[str, Dict[str, Any]] = {}
    for entry in entries:
        latest[f"{_line(entry)}, {entry['hosts']} hosts"] = entry
    rows = ["| Line | Hosts | Set-up | Call latency by node crossings (median; hosts) | "
            "Target | Status | Date |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for entry in latest.values():
        target = TARGETS.get((entry["backend"], entry["hosts"]))
        status = "" if target is None else ("met" if entry["setup"] <= target else "NOT met")
        counts = entry.get("hosts_by_crossings", {})
        lat = "; ".join(f"{k}: {v * 1000:.1f} ms" + (f" ({counts[k]})" if k in counts else "")
                        for k, v in entry["latency"].items())
        rows.append(f"| {_line(entry)} | {entry['hosts']} | {entry['setup']:.1f} s | {lat} | "
                    f"{'' if target is None else f'<= {target:g} s'} | {status} | "
                    f"{entry['date']} |")
    (REPO / "bench" / "sim_scale.md").write_text(
        "# Simulator at scale (container backends)\n\n"
        f"Machine: {os.cpu_count()} cores, shared; every swarm node is an engine in a network "
        "namespace of this one machine, so 3 nodes share the same 2 cores: the figures show "
        "the swarm's own overhead (overlays, VXLAN, helpers), not extra capacity.\n"
        "Command: `python bench/sim_scale.py docker --hosts 200`, "
        "`python bench/sim_scale.py swarm --hosts 100 --nodes 1,3`.\n\n"
        + "\n".join(rows) + "\n\n![scale](sim_scale.png)\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    names = list(latest)
    left.bar(range(len(names)), [latest[n]["setup"] for n in names], color="tab:blue")
    left.set_xticks(range(len(names)), [n.replace(", ", "\n") for n in names], fontsize=8)
    left.set_ylabel("seconds to every context connected")
    left.set_title("Set-up time")
    for name in names:
        entry = latest[name]
        keys = sorted(entry["latency"], key=int)
        right.plot([int(k) for k in keys], [entry["latency"][k] * 1000 for k in keys], "o-",
                   label=name)
    right.set_xlabel("swarm-node boundaries on the path from the runner")
    right.set_ylabel("median trivial call, ms")
    right.set_title("Call latency across nodes")
    right.legend(fontsize=8)
    for ax in (left, right):
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(REPO / "bench" / "sim_scale.png", dpi=100)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("backend", choices=("docker", "swarm"))
    parser.add_argument("--hosts", type=int, default=None, help="200 (docker), 100 (swarm)")
    parser.add_argument("--nodes", default="1,3", help="swarm sizes to run (default 1,3)")
    args = parser.parse_args()
    hosts = args.hosts or (200 if args.backend == "docker" else 100)
    entries = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
    with tempfile.TemporaryDirectory(prefix="sim-scale-") as tmp:
        path = os.path.join(tmp, f"gen{hosts}.yml")
        text = tree_yaml(hosts)
        if args.backend == "swarm":
            text += "placement: {rule: subtree, depth: 1}\n"
        Path(path).write_text(text)
        runs = [None] if args.backend == "docker" else [int(n) for n in args.nodes.split(",")]
        for nodes in runs:
            entry = bench_docker(path) if nodes is None else bench_swarm(path, nodes)
            entry["date"] = time.strftime("%Y-%m-%d %H:%M")
            print(json.dumps(entry), flush=True)
            entries.append(entry)
            RESULTS.write_text(json.dumps(entries, indent=1) + "\n")
    write_report(entries)
    return 0


if __name__ == "__main__":
    sys.exit(main())
