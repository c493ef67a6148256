"""Command line for people: ``python -m simulator check|up|status|down FILE``.

``check FILE``   parse the topology and print its hosts and the context plan (no processes)
``up FILE``      build the tree (``--backend local``, the default, or ``docker``), print where
                 each host runs, and keep it up until Ctrl-C or SIGTERM: the tree's contexts
                 belong to *this* process, so it lives exactly as long as the command does
``status``       list the local trees running on this machine (from ``up`` or from pytest),
                 with each link relay's byte counts and faults
``down [FILE]``  stop the ``up`` commands running on this machine (all, or those of FILE) and
                 sweep what killed runs left: local control directories, and containers and
                 networks whose runner is gone (when a Docker engine answers)
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from typing import List, Optional, Tuple

__all__ = ["main"]


def _load(path: str):
    from simulator.topology import TopologyError, load_topology

    try:
        return load_topology(path)
    except (TopologyError, OSError) as exc:
        raise SystemExit(f"simulator: {exc}") from None


def cmd_check(args: argparse.Namespace) -> int:
    topology = _load(args.file)
    print(f"{topology.name}: {len(topology.hosts)} hosts, seed {topology.seed}")
    for (host_id, account), hops in topology.context_plan().items():
        if account is None or account != topology.host(host_id).login:
            print(f"  {host_id}{'' if account is None else ' as ' + account}: "
                  f"{' -> '.join(hop.label for hop in hops)}")
    for schedule in topology.schedules:
        print(f"schedule {schedule.name}:")
        for step in schedule.plan(topology, args.seed):
            print(f"  {step.start:8.3f}s +{step.duration:g}s {step.fault!r}")
    return 0


def _backend(name: str, timeline, keepalive: bool):
    if name == "docker":
        from simulator.dockerbackend import DockerBackend

        return DockerBackend(timeline)
    from simulator.local import LocalBackend

    return LocalBackend(timeline, keepalive=keepalive)


def cmd_up(args: argparse.Namespace) -> int:
    from simulator.timeline import Timeline

    topology = _load(args.file)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, lambda *_: stop.set())
    with Timeline(args.timeline) as timeline:
        backend = _backend(args.backend, timeline, keepalive=not args.no_keepalive)
        try:
            backend.create(topology)
            print(f"{topology.name} is up in {backend.build_seconds:.2f} s "
                  f"({args.backend} backend, this process: pid {os.getpid()})", flush=True)
            for host in topology.hosts:
                placement = backend.placement(host.id)
                context = backend.context(host.id)
                print(f"  {host.id}: context {context.context_id}, {placement.where}")
            print("Ctrl-C or `python -m simulator down` tears it down.", flush=True)
            stop.wait()
        finally:
            backend.destroy()
    print(f"{topology.name} is down")
    return 0


def _runs() -> List[Tuple[int, str, str]]:
    """(owner pid, control directory, owner command line) of every local tree running."""
    from simulator.local import _base_dir, _cmdline, _pid_alive

    found = []
    base = _base_dir()
    for name in sorted(os.listdir(base)) if os.path.isdir(base) else ():
        owner = name.split("-", 1)[0]
        if owner.isdigit() and _pid_alive(int(owner)):
            found.append((int(owner), os.path.join(base, name), _cmdline(int(owner))))
    return found


def cmd_status(args: argparse.Namespace) -> int:
    from simulator.relay import RelayControl, RelayControlError

    runs = _runs()
    if not runs:
        print("no local topology is running")
    for owner, directory, command in runs:
        print(f"pid {owner}: {command}")
        for sock in sorted(os.listdir(directory)):
            path = os.path.join(directory, sock)
            try:
                with RelayControl(path, timeout=2.0) as control:
                    stats = control.stats()
            except RelayControlError as exc:
                print(f"  {sock}: no answer ({exc})")
                continue
            faults = [d for d in ("upstream", "downstream")
                      if stats[d]["stalled"] or stats[d]["blackhole"]]
            print(f"  {sock}: context pid {stats.get('child_pid')}, "
                  f"up {stats['upstream']['forwarded']} B, "
                  f"down {stats['downstream']['forwarded']} B"
                  + (f", faulted: {', '.join(faults)}" if faults else ""))
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    from simulator.local import sweep_stale_dirs

    stopped = 0
    for owner, _directory, command in _runs():
        if " -m simulator up " not in f" {command} " and "simulator/__main__.py up" not in command:
            continue  # a pytest session: it cleans up after itself
        if args.file and os.path.abspath(args.file) not in command and args.file not in command:
            continue
        os.kill(owner, signal.SIGTERM)
        stopped += 1
        print(f"asked pid {owner} to tear its tree down")
    swept = sweep_stale_dirs()
    if swept:
        print(f"removed {len(swept)} stale control directories")
    for name in _sweep_docker():
        print(f"removed {name}")
    if not stopped:
        print("no `up` command was running")
    return 0


def _sweep_docker() -> List[str]:
    """Containers and networks of dead runs, if a Docker engine is there to ask."""
    try:
        import docker

        from simulator.dockerbackend import sweep_stale
    except ImportError:
        return []
    try:
        client = docker.from_env(timeout=10)
        client.ping()
    except Exception:
        return []
    try:
        return sweep_stale(client)
    finally:
        client.close()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m simulator", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="parse FILE and print the hosts and fault plans")
    check.add_argument("file")
    check.add_argument("--seed", type=int, default=None)
    check.set_defaults(run=cmd_check)
    up = sub.add_parser("up", help="build FILE's tree and keep it up until Ctrl-C")
    up.add_argument("file")
    up.add_argument("--backend", choices=("local", "docker"), default="local")
    up.add_argument("--timeline", default=None, help="write the JSONL timeline here")
    up.add_argument("--no-keepalive", action="store_true",
                    help="do not emulate ssh keepalives on the links")
    up.set_defaults(run=cmd_up)
    status = sub.add_parser("status", help="list local trees and their links")
    status.add_argument("file", nargs="?")
    status.set_defaults(run=cmd_status)
    down = sub.add_parser("down", help="stop `up` commands and sweep leftovers")
    down.add_argument("file", nargs="?")
    down.set_defaults(run=cmd_down)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
