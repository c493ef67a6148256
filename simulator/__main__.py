"""Command line for people: ``python -m simulator check|up|status|down|images``.

``check FILE``   parse the topology, print its hosts, the context plan and every schedule's
                 fault plan (seeded as pytest seeds it), and what a backend would refuse; no
                 processes, no Docker
``up FILE``      build the tree (``--backend local``, the default, or ``docker``), print where
                 each host runs, optionally play a fault schedule (``--schedule``), and keep it
                 up until Ctrl-C, SIGTERM or ``down``: the tree's contexts belong to *this*
                 process, so the tree lives exactly as long as the command does
``status``       list every tree running for this user (from ``up`` or from pytest), on either
                 backend: hosts, contexts, where they run, and the faults applied now
``down [FILE]``  tear down the ``up`` trees (all, or those of FILE) and wait until each is gone;
                 remove what a runner that is gone left (containers, networks, keys, records)
``images ...``   build, list and prune the docker backend's host images (``images --help``)
``campaign``     a fault campaign: N runs of generated fault schedules over a tree (FILE's,
                 or random trees) under load, each checked; a failing run is shrunk and
                 written down with its seed, so that ``--replay`` runs it again

Every tree has one state record (:mod:`simulator.state`), whichever backend runs it, and
``status`` and ``down`` work from those records.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from typing import Any, List, Optional

__all__ = ["main"]

#: How long ``down`` waits for one ``up`` to tear its tree down.
DOWN_TIMEOUT = 120.0


def _load(path: str) -> Any:
    from simulator.topology import TopologyError, load_topology

    try:
        return load_topology(path)
    except (TopologyError, OSError) as exc:
        raise SystemExit(f"simulator: {exc}") from None


def _refusals(topology: Any, backends: List[str]) -> List[str]:
    from simulator.preflight import refusals

    return [line for backend in backends for line in refusals(topology, backend)]


def cmd_check(args: argparse.Namespace) -> int:
    from simulator.faults import FaultError, format_plan, plan

    topology = _load(args.file)
    print(f"{topology.name}: {len(topology.hosts)} hosts, seed {topology.seed}")
    for (host_id, account), hops in topology.context_plan().items():
        if account is None or account != topology.host(host_id).login:
            print(f"  {host_id}{'' if account is None else ' as ' + account}: "
                  f"{' -> '.join(hop.label for hop in hops)}")
    for schedule in topology.schedules:
        try:
            seed = schedule.seed_for(topology, args.seed)
        except FaultError as exc:
            print(f"schedule {schedule.name}: {exc}")
            continue
        print(f"schedule {schedule.name} (seed {seed}):")
        for line in format_plan(plan(schedule, topology, args.seed)):
            print(f"  {line}")
    refused = _refusals(topology, ["local", "docker"] if args.backend == "both"
                        else [args.backend])
    for line in refused:
        print(f"simulator: {line}", file=sys.stderr)
    return 1 if refused else 0


def _backend(args: argparse.Namespace, timeline: Any) -> Any:
    progress = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    if args.backend == "docker":
        from simulator.dockerbackend import DockerBackend

        return DockerBackend(timeline, prepare=True, progress=progress)
    if args.backend == "swarm":
        from simulator.swarmbackend import SwarmBackend

        return SwarmBackend(timeline, prepare=True, progress=progress, engine=args.engine)
    from simulator.local import LocalBackend

    return LocalBackend(timeline, keepalive=not args.no_keepalive)


def cmd_up(args: argparse.Namespace) -> int:
    from simulator.faults import FaultError, describe_seeds, plan
    from simulator.state import RunRecord, describe_hosts
    from simulator.timeline import Timeline

    topology = _load(args.file)
    refused = _refusals(topology, [args.backend])
    if refused:
        raise SystemExit("\n".join(f"simulator: {line}" for line in refused))
    steps = None
    if args.schedule:
        try:
            steps = plan(topology.schedule(args.schedule), topology, args.seed)
        except (LookupError, FaultError) as exc:
            raise SystemExit(f"simulator: --schedule: {exc}") from None
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, lambda *_: stop.set())
    with Timeline(args.timeline) as timeline:
        backend = _backend(args, timeline)
        record = RunRecord(topology=topology.name, file=os.path.abspath(args.file),
                           backend=args.backend, command="up",
                           seeds=describe_seeds(topology, args.seed))
        try:
            record.resources = backend.resources()
            record.save()
            backend.create(topology)
            record.hosts = describe_hosts(backend)
            record.resources = backend.resources()
            record.save()
            _print_up(topology, backend, args)
            if steps is not None and not stop.is_set():
                _play(backend, record, args.schedule, steps, stop)
            stop.wait()
        finally:
            backend.destroy()
            record.remove()
    print(f"{topology.name} is down")
    return 0


def _print_up(topology: Any, backend: Any, args: argparse.Namespace) -> None:
    print(f"{topology.name} is up in {backend.build_seconds:.2f} s ({args.backend} backend, "
          f"this process: pid {os.getpid()})", flush=True)
    for host in topology.hosts:
        placement = backend.placement(host.id)
        print(f"  {host.id}: context {backend.context(host.id).context_id}, {placement.where}")
    print("Ctrl-C here, or `python -m simulator down` from another shell, tears it down; "
          "`python -m simulator status` shows it.", flush=True)


def _play(backend: Any, record: Any, name: str, steps: Any, stop: threading.Event) -> None:
    """Run a schedule's plan once, keeping the state record's fault list current."""
    from simulator.faults import FaultInjector, run_plan

    injector: Optional[FaultInjector] = None

    def on_event(event: Any) -> None:
        backend.timeline.record("fault", time=event.time, **{
            k: v for k, v in event.to_dict().items() if k != "time"})
        if injector is not None:
            record.set_faults(injector.active)
            if event.action == "apply":
                print(f"  {time.strftime('%H:%M:%S')} applied {event.fault!r}", flush=True)

    injector = FaultInjector(backend, on_event=on_event)
    print(f"playing schedule {name}: {len(steps) - 1} faults over {steps[-1].start:g} s",
          flush=True)
    applied = run_plan(injector, steps, stop=stop)
    record.set_faults(())
    print(f"schedule {name}: {applied} of {len(steps) - 1} faults applied"
          + (" (stopped early)" if stop.is_set() else "")
          + ", all healed; the tree stays up until Ctrl-C or `down`", flush=True)


def _matches(record: Any, wanted: Optional[str]) -> bool:
    return wanted is None or record.topology == wanted or \
        record.file == os.path.abspath(wanted)


def cmd_status(args: argparse.Namespace) -> int:
    from simulator.state import load_records

    records = [r for r in load_records() if _matches(r, args.file)]
    if not records:
        print("no topology is running" + (f" for {args.file}" if args.file else ""))
    for record in records:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.started))
        print(f"{record.topology}: {record.backend} backend, `{record.command}` pid "
              f"{record.pid}, since {since}, seed {record.seeds} ({record.file})")
        if not record.alive:
            print(f"  its runner (pid {record.pid}) is gone"
                  + (" (--topology-keep)" if record.kept else "")
                  + "; `python -m simulator down` removes what it left")
        live = _live(record)
        if not record.hosts:
            print("  starting: no host is up yet")
        for host in record.hosts:
            print(f"  {host['id']}: context {host['context_id']}, {host['where']}"
                  + (f" [{live[host['id']]}]" if host["id"] in live else ""))
            for account, context_id in sorted(host.get("accounts", {}).items()):
                print(f"    as {account}: context {context_id}")
        faults = [f["fault"] for f in record.faults]
        print(f"  faults applied: {', '.join(faults) if faults else 'none'}")
    return 0


def _live(record: Any) -> dict:
    """What the hosts look like now: a local link's byte counts and faults, or a
    container's state. Empty when nothing answers."""
    if not record.alive and record.backend == "local":
        return {}
    if record.backend in ("docker", "swarm"):
        return _container_states(record)
    from simulator.relay import RelayControl, RelayControlError

    found = {}
    for host in record.hosts:
        control = host.get("labels", {}).get("control")
        if control is None:
            continue
        try:
            with RelayControl(control, timeout=2.0) as relay:
                stats = relay.stats()
        except RelayControlError as exc:
            found[host["id"]] = f"link: no answer ({exc})"
            continue
        faulted = [d for d in ("upstream", "downstream")
                   if stats[d]["stalled"] or stats[d]["blackhole"]]
        found[host["id"]] = (f"link up {stats['upstream']['forwarded']} B, down "
                             f"{stats['downstream']['forwarded']} B"
                             + (f", faulted: {', '.join(faulted)}" if faulted else ""))
    return found


def _container_states(record: Any) -> dict:
    try:
        from simulator.dockerd import DockerdError, engine_client
        from simulator.ownership import LABEL_HOST, LABEL_RUN

        client = engine_client(client_timeout=10)
    except (ImportError, DockerdError):
        return {}
    try:
        run = record.resources.get("run")
        containers = client.containers.list(all=True, filters={"label": f"{LABEL_RUN}={run}"},
                                            ignore_removed=True)
        return {c.labels[LABEL_HOST]: f"container {c.name} {c.status}" for c in containers
                if LABEL_HOST in c.labels}  # not the overlay keepers of a swarm run
    finally:
        client.close()


def cmd_down(args: argparse.Namespace) -> int:
    from simulator.state import load_records

    failed = False
    acted = 0
    for record in load_records():
        if not _matches(record, args.file):
            continue
        name = f"{record.topology} ({record.backend} backend, pid {record.pid})"
        if record.alive:
            if record.command != "up":
                print(f"{name}: a {record.command} session; it tears its tree down itself")
                continue
            os.kill(record.pid, signal.SIGTERM)
            print(f"{name}: asked to tear its tree down; waiting", flush=True)
            if not _wait_gone(record, DOWN_TIMEOUT):
                print(f"{name}: still up after {DOWN_TIMEOUT:g} s", file=sys.stderr)
                failed = True
                continue
        if os.path.exists(record.path):  # its runner is gone without cleaning up
            for item in _remove_left(record):
                print(f"{name}: removed {item}")
            record.remove()
        print(f"{name}: down")
        acted += 1
    for item in _sweep():
        print(f"removed {item}")
    if not acted and not failed:
        print("no topology was running" + (f" for {args.file}" if args.file else ""))
    return 1 if failed else 0


def _wait_gone(record: Any, timeout: float) -> bool:
    """Wait until the ``up`` process ended (it removes its record as it goes)."""
    deadline = time.monotonic() + timeout
    while record.alive and time.monotonic() < deadline:
        time.sleep(0.1)  # another process: no event to wait on
    return not record.alive


def _remove_left(record: Any) -> List[str]:
    if record.backend in ("docker", "swarm"):
        from simulator.ownership import remove_run

        run = record.resources.get("run")
        return remove_run(run, record.resources.get("keys_dir"),
                          record.resources.get("engines") or ()) if run else []
    import shutil

    control = record.resources.get("control_dir")
    if control and os.path.isdir(control):
        shutil.rmtree(control, ignore_errors=True)
        return [control]
    return []


def _sweep() -> List[str]:
    """Local control directories and Docker runs whose runner is gone (when an engine
    answers; nothing is started to ask)."""
    from simulator.local import sweep_stale_dirs

    removed = sweep_stale_dirs()
    try:
        from simulator.dockerd import DockerdError, engine_client
        from simulator.ownership import sweep_stale

        client = engine_client(client_timeout=60)
    except (ImportError, DockerdError):
        return removed
    try:
        from simulator.swarmbackend import leave_made_swarm

        removed += sweep_stale(client)
        if leave_made_swarm(client):
            removed.append("the one-node swarm the simulator made")
        return removed
    finally:
        client.close()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m simulator", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split(
        "\n\n", 1)[1])
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="parse FILE, print its hosts and fault plans, and "
                                         "what a backend would refuse")
    check.add_argument("file")
    check.add_argument("--seed", type=int, default=None,
                       help="seed of every schedule (as --topology-seed; default: each "
                            "schedule's own, else the file's)")
    check.add_argument("--backend", choices=("local", "docker", "swarm", "both"),
                       default="both", help="check what this backend would refuse (default: "
                                            "both: local and docker; swarm refuses as docker)")
    check.set_defaults(run=cmd_check)
    up = sub.add_parser("up", help="build FILE's tree and keep it up until Ctrl-C or `down`")
    up.add_argument("file")
    up.add_argument("--backend", choices=("local", "docker", "swarm"), default="local")
    up.add_argument("--engine", default=None, metavar="URL",
                    help="swarm backend: the manager's Docker engine (default: this machine's; "
                         "a one-node swarm is made on it if it is in none)")
    up.add_argument("--schedule", metavar="NAME", default=None,
                    help="play this fault schedule of FILE once, then keep the tree up")
    up.add_argument("--seed", type=int, default=None,
                    help="seed of the schedule (default: its own, else the file's)")
    up.add_argument("--timeline", default=None, help="write the JSONL timeline here")
    up.add_argument("--no-keepalive", action="store_true",
                    help="do not emulate ssh keepalives on the links (local backend)")
    up.set_defaults(run=cmd_up)
    status = sub.add_parser("status", help="list the running trees, their hosts, contexts "
                                           "and faults")
    status.add_argument("file", nargs="?", help="only this topology (file or name)")
    status.set_defaults(run=cmd_status)
    down = sub.add_parser("down", help="tear down `up` trees and remove what dead runs left")
    down.add_argument("file", nargs="?", help="only this topology (file or name)")
    down.set_defaults(run=cmd_down)
    sub.add_parser("images", help="build, list or prune the docker backend's images (see "
                                  "`python -m simulator images --help`)")
    campaign = sub.add_parser("campaign", help="run a fault campaign: generated schedules, "
                                               "checked, shrunk (local backend)")
    campaign.add_argument("file", nargs="?", help="the topology (default: random trees)")
    campaign.add_argument("--runs", type=int, default=10, help="how many runs (default 10)")
    campaign.add_argument("--seed", type=int, default=None,
                          help="the campaign's seed (default: FILE's seed, else 0)")
    campaign.add_argument("--run", type=int, action="append", default=None, metavar="K",
                          dest="only",
                          help="only run K of the seed (repeatable): replays one run")
    campaign.add_argument("--shape", choices=("file", "random"), default=None,
                          help="FILE's tree for every run, or a random tree per run (default: "
                               "file when FILE is given)")
    campaign.add_argument("--max-hosts", type=int, default=24,
                          help="random trees: at most this many hosts (default 24)")
    campaign.add_argument("--horizon", type=float, default=10.0,
                          help="seconds of load and faults per run (default 10)")
    campaign.add_argument("--faults", default="1-6", metavar="LOW-HIGH",
                          help="faults per run (default 1-6)")
    campaign.add_argument("--kinds", default=None,
                          help="fault kinds to draw from, comma-separated (default: all the "
                               "local backend can apply)")
    campaign.add_argument("--shrink", type=int, default=6, metavar="N",
                          help="at most N more runs to shrink a failing run (default 6)")
    campaign.add_argument("--out", default=os.path.join(".sim", "campaign"),
                          help="where runs write their history (default .sim/campaign)")
    campaign.add_argument("--replay", metavar="SCHEDULE", default=None,
                          help="run again the run recorded in SCHEDULE (a finding's "
                               "schedule.json)")
    campaign.set_defaults(run=_cmd_campaign)
    return parser


def _cmd_campaign(args: argparse.Namespace) -> int:
    from simulator.campaign import command

    return command(args)


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["images"]:  # its own command line, --help included
        from simulator.images import main as images_main

        return images_main(argv[1:])
    args = _parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
