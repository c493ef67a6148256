"""Which run made a Docker resource, and is its runner still alive? Shared by the container
backends (``docker``, ``swarm``).

Every container and network a run makes carries the labels ``mitogen-sim.run`` (the run's id)
and ``mitogen-sim.owner`` (the runner's pid and start time). A run's private keys live in one
0700 directory with the owner tag inside. Three things remove what a run leaves: the backend's
``destroy``; a detached reaper process (``python -m simulator.ownership reap``) that waits for
the runner to end and removes the run from every engine it was given; and the sweep that the
next run (or ``python -m simulator down``, or ``python -m simulator.ownership sweep``) does of
runs whose owner is gone.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import docker
import docker.errors

from simulator import images
from simulator.state import owner_alive

__all__ = ["KEYS_DIR_PREFIX", "LABEL_HOST", "LABEL_OWNER", "LABEL_RUN", "Reaper",
           "make_keys_dir", "reap", "reap_parser", "remove_labelled", "remove_networks",
           "remove_run", "sweep_stale", "sweep_stale_keys"]

LABEL_RUN = images.LABEL_PREFIX + "run"
LABEL_OWNER = images.LABEL_PREFIX + "owner"
LABEL_HOST = images.LABEL_PREFIX + "host"
#: Where a run keeps its private keys: one directory per run, readable by its owner only.
KEYS_DIR_PREFIX = "mitogen-sim-keys-"
REAPER_POLL = 0.5
REAPER_MAX_LIFETIME = 7 * 24 * 3600.0
#: How long an overlay still "in use" is retried (the swarm detaches its nodes late).
NETWORK_WAIT = 20.0


def remove_labelled(client: docker.DockerClient, filters: Dict[str, Any],
                    network_wait: float = NETWORK_WAIT) -> List[str]:
    """Remove every container, then every network, matching ``filters``; never raises for
    resources that vanished meanwhile. A network still in use (a swarm overlay whose nodes
    the swarm has not detached yet) is retried for ``network_wait`` seconds, then left: it
    keeps its labels, so the next sweep finds it again."""
    removed = []
    for container in client.containers.list(all=True, filters=filters, ignore_removed=True):
        try:
            container.remove(force=True)
            removed.append(container.name)
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as exc:
            if "already in progress" not in str(exc):
                raise
    gone, _held = remove_networks(client, filters, network_wait)
    return removed + gone


def remove_networks(client: docker.DockerClient, filters: Dict[str, Any],
                    wait: float = NETWORK_WAIT,
                    for_good: Optional[Callable[[str], bool]] = None,
                    ) -> Tuple[List[str], List[Tuple[str, str]]]:
    """Remove the networks matching ``filters``: (removed names, [(name, why)] still held).

    The swarm detaches a node from an overlay asynchronously after its last container there
    is gone, and another sweeper (a reaper, ``down``) may be removing the containers of the
    same run, so "in use" and "has active endpoints" are retried for ``wait`` seconds (polled:
    the engine has no event for it), except for a network whose refusal ``for_good(message)``
    says will not change (held by a node that is down). A swarm worker sees overlays but
    only a manager removes them: skipped there."""
    removed: List[str] = []
    deadline = time.monotonic() + wait
    final: List[Tuple[str, str]] = []
    while True:
        held: List[Tuple[str, str]] = []
        for network in client.networks.list(filters=filters):
            if any(name == network.name for name, _ in final):
                continue
            try:
                network.remove()
                removed.append(network.name)
            except docker.errors.NotFound:
                pass
            except docker.errors.APIError as exc:
                if "not a swarm manager" in str(exc):
                    continue
                if "not found" in str(exc):
                    continue  # removed meanwhile by another sweeper (the swarm says so by 500)
                if "in use" not in str(exc) and "active endpoints" not in str(exc):
                    raise  # in use: by a swarm node, or by containers another sweeper removes
                if for_good is not None and for_good(str(exc)):
                    final.append((network.name, str(exc)))
                else:
                    held.append((network.name, str(exc)))
        if not held or time.monotonic() > deadline:
            return removed, final + held
        time.sleep(0.5)  # the swarm detaches nodes asynchronously: polled, bounded


def make_keys_dir(run: str, owner: str) -> str:
    """A run's keys directory (0700), with the owner tag inside, so that a sweep can tell
    whether the run that made it is gone even if its reaper was killed too."""
    path = os.path.join(tempfile.gettempdir(), KEYS_DIR_PREFIX + run)
    making = tempfile.mkdtemp(prefix=".making-" + KEYS_DIR_PREFIX)  # 0700; no sweep sees it
    with open(os.path.join(making, "owner"), "w") as f:
        f.write(owner)
    os.rename(making, path)
    return path


def sweep_stale_keys() -> List[str]:
    """Remove keys directories of runs whose runner process is gone."""
    removed = []
    base = tempfile.gettempdir()
    for name in sorted(os.listdir(base)):
        path = os.path.join(base, name)
        if not name.startswith(KEYS_DIR_PREFIX) or not os.path.isdir(path):
            continue
        try:
            with open(os.path.join(path, "owner")) as f:
                owner = f.read().strip()
        except OSError:
            owner = ""
        if not owner_alive(owner):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def stale_runs(client: docker.DockerClient) -> List[str]:
    """The runs with a container or network on this engine whose runner is gone."""
    stale = set()
    for resource in [*client.containers.list(all=True, filters={"label": LABEL_OWNER},
                                             ignore_removed=True),
                     *client.networks.list(filters={"label": LABEL_OWNER})]:
        labels = resource.attrs.get("Labels") or resource.attrs.get("Config", {}).get(
            "Labels") or {}
        if not owner_alive(labels.get(LABEL_OWNER, "")):
            stale.add(labels.get(LABEL_RUN, ""))
    return sorted(stale - {""})


def sweep_stale(client: docker.DockerClient) -> List[str]:
    """Remove containers, networks and keys directories of runs whose runner is gone."""
    removed = sweep_stale_keys()
    for run in stale_runs(client):
        removed += remove_labelled(client, {"label": f"{LABEL_RUN}={run}"})
    return removed


# --------------------------------------------------------------------------------------------
# The reaper: python -m simulator.ownership reap --owner PID:START --run RUN [--engine URL]...
# --------------------------------------------------------------------------------------------


class Reaper:
    """A detached watcher that removes a run's resources from ``engines`` (Docker URLs;
    none: the environment's engine) if the runner dies without doing so. ``module`` is the
    one run as ``python -m MODULE reap ...``: a backend with more to undo (the swarm backend
    leaves a swarm it made) gives its own, which calls :func:`reap` first."""

    def __init__(self, owner: str, run: str, keys_dir: Optional[str],
                 engines: Sequence[str] = (), module: str = "simulator.ownership") -> None:
        argv = [sys.executable, "-m", module, "reap",
                "--owner", owner, "--run", run]
        if keys_dir is not None:
            argv += ["--keys-dir", keys_dir]
        for engine in engines:
            argv += ["--engine", engine]
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            p for p in (root, os.environ.get("PYTHONPATH")) if p))
        self.process: Optional[subprocess.Popen] = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True, env=env, cwd=root)

    def stop(self) -> None:
        """The runner cleaned up itself: end the watcher (SIGTERM, then SIGKILL)."""
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None


def reap(owner: str, run: str, keys_dir: Optional[str] = None,
         engines: Sequence[str] = ()) -> bool:
    """Wait (bounded) for the owner to end, then remove the run's resources, if any are left,
    its keys first; True then. SIGTERM from the owner means it cleaned up itself: return
    False at once."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    deadline = time.monotonic() + REAPER_MAX_LIFETIME
    while owner_alive(owner) and time.monotonic() < deadline:
        if stop.wait(REAPER_POLL):
            return False
    if keys_dir and os.path.basename(keys_dir).startswith(KEYS_DIR_PREFIX):
        remove_run(run, keys_dir, engines)
    else:
        remove_run(run, None, engines)
    return True


def _clients(engines: Sequence[str]) -> List[docker.DockerClient]:
    """Clients of ``engines`` that answer (none given: the environment's engine)."""
    clients = []
    from simulator.dockerd import socket_accepts

    for url in list(engines) or [""]:
        if url and not socket_accepts(url):  # first: the SDK leaks a socket that fails
            continue
        try:
            client = (docker.DockerClient(base_url=url, timeout=120) if url
                      else docker.from_env(timeout=120))
            client.ping()
        except (docker.errors.DockerException, OSError):
            continue  # a node that is gone holds nothing any more
        clients.append(client)
    return clients


def remove_run(run: str, keys_dir: Optional[str] = None, engines: Sequence[str] = ()
               ) -> List[str]:
    """Remove what a run left: its keys directory, then its labelled containers on every
    engine (a network in use by one cannot be removed), then its networks. Engines that do
    not answer are skipped. Returns what was removed."""
    removed = []
    if keys_dir and os.path.isdir(keys_dir):
        shutil.rmtree(keys_dir, ignore_errors=True)
        removed.append(keys_dir)
    clients = _clients(engines)
    label = {"label": f"{LABEL_RUN}={run}"}
    try:
        for client in clients:
            for container in client.containers.list(all=True, filters=label, ignore_removed=True):
                removed += remove_labelled(client, {"id": container.id})
        for client in clients:
            removed += remove_labelled(client, label)
    finally:
        for client in clients:
            client.close()
    return removed


def reap_parser(prog: str) -> Tuple[argparse.ArgumentParser, Any]:
    """The command line of ``python -m PROG reap`` (and its subcommands object)."""
    parser = argparse.ArgumentParser(prog=f"python -m {prog}")
    sub = parser.add_subparsers(dest="command", required=True)
    cmd = sub.add_parser("reap", help="remove a run's resources once its runner is gone")
    cmd.add_argument("--owner", required=True)
    cmd.add_argument("--run", required=True)
    cmd.add_argument("--keys-dir")
    cmd.add_argument("--engine", action="append", default=[],
                     help="a Docker engine URL to clean (repeat; default: the environment's)")
    return parser, sub


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser, sub = reap_parser("simulator.ownership")
    sub.add_parser("sweep", help="remove resources of runs whose runner is gone (this "
                                 "machine's engine and keys directories)")
    args = parser.parse_args(argv)
    if args.command == "reap":
        reap(args.owner, args.run, args.keys_dir, args.engine)
        return 0
    from simulator.dockerd import engine_client

    client = engine_client()
    try:
        for name in sweep_stale(client):
            print(f"removed {name}")
    finally:
        client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
