"""What a backend would refuse in a topology, found before anything starts.

``python -m simulator check``, ``python -m simulator up``, the pytest plugin and
:meth:`DockerBackend.create` all ask :func:`refusals`, so a file that one of them refuses is
refused by all, with the same message, and ``check`` shows it without Docker, root or a
single process started.

The parser (:mod:`simulator.topology`) already refuses what is wrong on every backend; this is
what only one backend cannot do:

- ``docker``: an image whose suite has no recipe (``stretch``), an interpreter the suite's
  image does not have, CPU or memory limits the engine refuses, a supernet too small for the
  tree's network segments.
- ``local``: nothing: every host is a local process, whose interpreter falls back to the
  runner's own, and limits are not applied.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Sequence, Tuple

from simulator.recipes import ImageBuildError, load_recipes
from simulator.topology import Topology

__all__ = ["BACKENDS", "MIN_MEMORY", "refusals", "refusals_text"]

BACKENDS = ("local", "docker", "swarm")
#: The smallest memory limit Docker accepts for a container.
MIN_MEMORY = 6 * 1024 * 1024
#: The smallest CPU limit Docker accepts (``--cpus``).
MIN_CPUS = 0.01


def refusals(topology: Topology, backend: str) -> List[str]:
    """Every reason ``backend`` would refuse ``topology``, one message each (empty: none)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if backend == "local":
        return []
    where = f"{topology.source}: the {backend} backend cannot run topology {topology.name!r}"
    return [f"{where}: {problem}" for problem in _docker_problems(topology)]


def refusals_text(topology: Topology, backends: Sequence[str]) -> str:
    """The refusals of every backend in ``backends``, one per line ('' when none)."""
    return "\n".join(line for backend in backends for line in refusals(topology, backend))


def _docker_problems(topology: Topology) -> List[str]:
    try:
        recipes = load_recipes()
    except ImageBuildError as exc:
        return [str(exc)]
    problems = []
    used: Dict[str, Tuple[Any, List[Any]]] = {}
    for host in topology.hosts:
        used.setdefault(host.image.name, (host.image, []))[1].append(host)
    for name, (image, hosts) in sorted(used.items()):
        named = f"image {name!r}" if name == image.suite else \
            f"image {name!r} (suite {image.suite!r})"
        recipe = recipes.get(image.suite)
        if recipe is None:
            problems.append(f"{named} used by {_hosts(hosts)}: suite {image.suite!r} has no "
                            f"image recipe; there are recipes for: {', '.join(sorted(recipes))}")
            continue
        wanted = sorted({host.python for host in hosts} | set(image.python))
        missing = [python for python in wanted if not recipe.offers(python)]
        if missing:
            versioned = f"python{recipe.python}" if recipe.python else "python3.N (rolling)"
            offered = ["python3", versioned, *sorted(recipe.extra_interpreters)]
            problems.append(f"{named} used by {_hosts(hosts)}: the {image.suite} image has "
                            f"{', '.join(offered)}, not {', '.join(missing)}")
    cpus = os.cpu_count() or 1
    for host in topology.hosts:
        limits = host.resources
        if limits.cpus is not None and not MIN_CPUS <= limits.cpus <= cpus:
            problems.append(f"host {host.id!r}: resources.cpus {limits.cpus:g} is outside what "
                            f"Docker accepts here ({MIN_CPUS:g} to {cpus}, this machine's CPUs)")
        if limits.memory is not None and limits.memory < MIN_MEMORY:
            problems.append(f"host {host.id!r}: resources.memory {limits.memory} bytes is below "
                            f"Docker's minimum of 6m")
    problems += _network_problems(topology)
    return problems


def _network_problems(topology: Topology) -> List[str]:
    from simulator.backend import BackendError
    from simulator.segments import blocks, plan_segments

    try:
        plan_segments(topology, blocks(topology.network.supernet)[0])
    except BackendError as exc:
        return [str(exc)]
    return []


def _hosts(hosts: Sequence[object]) -> str:
    ids = [getattr(host, "id", str(host)) for host in hosts]
    shown = ", ".join(repr(i) for i in ids[:3])
    return f"host {shown}" if len(ids) == 1 else \
        f"hosts {shown}" + (f" and {len(ids) - 3} more" if len(ids) > 3 else "")
