"""The local backend at scale: a five-level tree of 1,000 contexts up, then one call to each.

``python bench/sim_scale_local.py [--contexts 1000] [--accounts 4] [--repeat 1]`` generates the tree
(bastion > 3 datacenters > 6 racks each > nodes > ``--accounts`` accounts on each node: five
levels of contexts, every host behind its own link relay, every account a context below its
node), builds it with the local backend from nothing, then sends one call (``os.getpid``) to
every context at once and waits for every answer. ``--accounts 0`` puts a fifth level of
hosts under the nodes instead, so that every context is a host with its own relay.

Writes ``bench/sim_scale_local.md`` and ``.json``: contexts, hosts, the set-up time (from
nothing to every context connected), the time for the calls, their sum against the target
(30 s), the CPU time the tree's processes used (relays and contexts apart), and the teardown.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from simulator.timeline import Timeline  # noqa: E402
from simulator.topology import parse_topology  # noqa: E402

TARGET_SECONDS = 30.0
DCS, RACKS = 3, 6


def tree_document(contexts: int, accounts: int) -> Dict[str, Any]:
    """The smallest tree of this shape with at least ``contexts`` contexts."""
    above = 1 + DCS + DCS * RACKS  # bastion, datacenters, racks
    racks = DCS * RACKS
    if accounts:
        nodes = math.ceil((contexts - above) / (racks * (1 + accounts)))
        node: Dict[str, Any] = {"role": "node", "accounts+": [
            {"name": f"app{i}", "sudo": "nopasswd"} for i in range(1, accounts + 1)]}
        leaves = None
    else:
        nodes = 6
        leaves = math.ceil((contexts - above - racks * nodes) / (racks * nodes))
        node = {"role": "node", "children": {f"leaf[1..{leaves}]": {"role": "leaf"}}}
    rack = {"role": "rack", "children": {f"node[1..{nodes}]": node}}
    dc = {"role": "datacenter", "children": {f"rack[1..{RACKS}]": rack}}
    return {"version": 1, "name": f"scale{contexts}",
            "defaults": {"accounts": [{"name": "sim", "keys": ["runner"],
                                       "password": "sim-pw"}]},
            "tree": {"bastion": {"role": "bastion", "children": {f"dc[1..{DCS}]": dc}}}}


def _cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as stream:
            fields = stream.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(contexts: int, accounts: int) -> Dict[str, Any]:
    from simulator.local import LocalBackend

    topology = parse_topology(tree_document(contexts, accounts), "generated")
    backend = LocalBackend(Timeline())
    load = os.getloadavg()[0]
    mine = resource.getrusage(resource.RUSAGE_SELF)
    began = time.monotonic()
    try:
        backend.create(topology)
        up = time.monotonic() - began
        targets = [backend.context(h.id) for h in topology.hosts] + [
            backend.context(h.id, a.name) for h in topology.hosts for a in h.accounts
            if a.name != h.login]
        called = time.monotonic()
        pending = [ctx.call_async(os.getpid) for ctx in targets]
        pids = []
        for recv in pending:
            pids.append(recv.get(timeout=120).unpickle())
            recv.close()
        calls = time.monotonic() - called
        assert len(set(pids)) == len(targets), "two contexts answered with one pid"
        spent = resource.getrusage(resource.RUSAGE_SELF)
        cpu = {"master": spent.ru_utime + spent.ru_stime - mine.ru_utime - mine.ru_stime,
               "relays": 0.0, "contexts": 0.0}
        for pid, label in backend.all_pids().items():
            cpu["relays" if label.startswith("relay:") else "contexts"] += _cpu_seconds(pid)
    finally:
        ended = time.monotonic()
        backend.destroy()
        teardown = time.monotonic() - ended
    return {"contexts": len(targets), "hosts": len(topology.hosts), "setup": up,
            "calls": calls, "total": up + calls, "teardown": teardown,
            "cpu": {k: round(v, 2) for k, v in cpu.items()}, "load_at_start": round(load, 1)}


def write_report(runs: List[Dict[str, Any]], command: str) -> Tuple[Path, Path]:
    rows = ["| Contexts | Hosts (relays) | Set-up | One call to each | Total | Target | Status "
            "| CPU: master / relays / contexts | Teardown | Load at start |",
            "| ---: | ---: | ---: | ---: | ---: | --- | --- | --- | ---: | ---: |"]
    for run in runs:
        status = "met" if run["total"] <= TARGET_SECONDS else "NOT met"
        cpu = run["cpu"]
        rows.append(f"| {run['contexts']} | {run['hosts']} | {run['setup']:.1f} s | "
                    f"{run['calls']:.2f} s | {run['total']:.1f} s | <= {TARGET_SECONDS:g} s | "
                    f"{status} | {cpu['master']:.0f} / {cpu['relays']:.0f} / "
                    f"{cpu['contexts']:.0f} s | {run['teardown']:.1f} s | "
                    f"{run['load_at_start']} |")
    totals = [run["total"] for run in runs]
    floor = ", ".join(f"{sum(run['cpu'].values()) / (os.cpu_count() or 1):.0f} s"
                      for run in runs)
    md = REPO / "bench" / "sim_scale_local.md"
    md.write_text(
        f"# The local backend at scale: a five-level tree of 1,000 contexts\n\n"
        f"- Date: {time.strftime('%Y-%m-%d %H:%M:%S')}\n- Command: `{command}`\n"
        f"- Machine: {os.cpu_count()} cores, shared (load average at the start of each run "
        f"in the table)\n- Median total: {statistics.median(totals):.1f} s\n"
        f"- Floor: the tree's CPU time over the cores, the least this machine could take "
        f"with no one else on it: {floor}\n\n"
        + "\n".join(rows) + "\n\nSet-up: `LocalBackend.create` from nothing to every "
        "context connected (each host a Python interpreter behind its own link relay, each "
        "account an interpreter below its node). One call: `os.getpid` to every context at "
        "once, until the last answer. CPU: user + system seconds of the master, of every "
        "relay and of every context over the whole run.\n")
    js = REPO / "bench" / "sim_scale_local.json"
    js.write_text(json.dumps(runs, indent=1) + "\n")
    return md, js


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", type=int, default=1000)
    parser.add_argument("--accounts", type=int, default=4,
                        help="accounts per node (0: a fifth level of hosts instead)")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    runs = []
    for _ in range(args.repeat):
        run = measure(args.contexts, args.accounts)
        print(json.dumps(run), flush=True)
        runs.append(run)
    if not args.no_write:
        for path in write_report(runs, "python bench/sim_scale_local.py "
                                 + " ".join(sys.argv[1:])):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
