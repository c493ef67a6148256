"""The interface every simulator backend implements (``local`` and ``docker`` now, others later).

A backend owns everything about *where* hosts run and *how* they are managed: placing them
(processes, containers, pods), wiring their links, reaching them out of band, and applying
faults. Tests, the pytest plugin and the fault injector only see this interface and the pure
topology model, so adding a backend (Kubernetes: pods per host, NetworkPolicies for
partitions, ``kubectl exec`` for out-of-band access) means writing one class, not touching
tests. Nothing here assumes Docker: no container ids, no networks, no image tags cross it.

Two kinds of access are kept apart on purpose:

* *in band*: what the library under test uses, the ssh/sudo chain of
  :meth:`Topology.context_plan`, completed by :meth:`Backend.connect_spec`. Faults hit it.
* *out of band*: :meth:`Backend.exec`, :meth:`Backend.processes`, and the lifecycle calls. They
  must keep working while a host is partitioned or slowed, because tests use them to check
  what really happened (which processes are left, what was written to disk).
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, Dict, FrozenSet, Mapping, Optional, Sequence, Tuple

from simulator.faults import Fault
from simulator.topology import Hop, Topology

__all__ = [
    "Backend",
    "BackendError",
    "ConnectSpec",
    "ExecResult",
    "Placement",
    "ProcessInfo",
    "resolve_plan",
]


class BackendError(RuntimeError):
    """The backend could not do what was asked (the engine is missing, a host is gone...).

    Distinct from :class:`~simulator.topology.TopologyError` (the file is wrong) and
    :class:`~simulator.faults.FaultError` (the fault is wrong): this one is about the world.
    """


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where a host ended up. ``where`` is backend-specific, for reports and debugging only
    (a container name, a pod and node, a local directory); nothing should parse it."""

    host: str
    where: str
    address: Optional[str] = None
    labels: Mapping[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True, repr=False)
class ConnectSpec:
    """How to make the last hop to a host or account: ``router.connect(method, **kwargs)``.

    Passwords may appear in ``kwargs``; ``repr`` masks them.
    """

    method: str
    kwargs: Mapping[str, Any]

    def __repr__(self) -> str:
        shown = {k: ("***" if k == "password" else v) for k, v in self.kwargs.items()}
        return f"ConnectSpec({self.method!r}, {shown})"


@dataclasses.dataclass(frozen=True)
class ExecResult:
    """The outcome of an out-of-band command."""

    returncode: int
    stdout: bytes
    stderr: bytes


@dataclasses.dataclass(frozen=True)
class ProcessInfo:
    """One process seen out of band on a host (for "nothing left behind" checks)."""

    pid: int
    user: str
    command: str


class Backend(abc.ABC):
    """Builds a topology somewhere, manages its hosts, and applies faults to it.

    Lifecycle: ``create(topology)`` once, then any calls, then ``destroy()``, which must be
    safe to call twice and after a failed ``create`` (fixtures call it from finalisers).
    A backend instance serves one topology; parallel test workers each make their own.
    ``apply``/``heal``/``heal_all`` make every backend a
    :class:`~simulator.faults.FaultBackend` (structurally), so the injector drives it; a
    backend that cannot do a fault raises :class:`BackendError` naming it, and lists what it
    can do in :meth:`capabilities` so tests can skip with a reason instead of failing.
    """

    name: str = "abstract"

    # -- lifecycle ---------------------------------------------------------------------------

    @abc.abstractmethod
    def create(self, topology: Topology) -> None:
        """Start every host of ``topology`` with its accounts and links, and wait until each
        accepts logins. Resources are labelled so that a crashed run can be swept later."""

    @abc.abstractmethod
    def destroy(self) -> None:
        """Remove everything ``create`` made. Idempotent; never raises for missing parts."""

    def resources(self) -> Dict[str, Any]:
        """What this run holds outside its processes, for the state record
        (:mod:`simulator.state`): what ``python -m simulator down`` removes when the runner
        is gone (a run id, directories). Plain data; empty by default."""
        return {}

    @abc.abstractmethod
    def capabilities(self) -> FrozenSet[str]:
        """Fault kinds (``simulator.faults.FAULT_KINDS`` names) and features (e.g. ``"netem"``,
        ``"clock_skew"``) this backend supports on this machine, probed, not assumed."""

    # -- placement ---------------------------------------------------------------------------

    @abc.abstractmethod
    def placement(self, host: str) -> Placement:
        """Where ``host`` (an id) runs. Scheduling is the backend's business: a Kubernetes
        backend may spread hosts over nodes, the docker one puts all on this machine."""

    # -- in-band access ----------------------------------------------------------------------

    @abc.abstractmethod
    def connect_spec(self, host: str, account: Optional[str] = None) -> ConnectSpec:
        """The last hop to reach ``host`` (or ``account`` on it) from its parent's context
        (from the runner for a root host). Starts from the topology's logical hop and adds
        what only the backend knows: address, port, identity file, host-key policy."""

    # -- out-of-band management --------------------------------------------------------------

    @abc.abstractmethod
    def start(self, host: str) -> None:
        """Start a stopped host and wait until it accepts logins again."""

    @abc.abstractmethod
    def stop(self, host: str, grace: float = 10.0) -> None:
        """Stop a host gracefully: SIGTERM, then SIGKILL after ``grace`` seconds."""

    @abc.abstractmethod
    def kill(self, host: str, signal: str = "SIGKILL") -> None:
        """Signal every process of a host at once (a crash for SIGKILL)."""

    @abc.abstractmethod
    def pause(self, host: str) -> None:
        """Freeze every process of a host; its sockets stay open."""

    @abc.abstractmethod
    def unpause(self, host: str) -> None:
        """Undo :meth:`pause`."""

    @abc.abstractmethod
    def exec(self, host: str, argv: Sequence[str], user: Optional[str] = None,
             timeout: float = 30.0) -> ExecResult:
        """Run ``argv`` on a host out of band, bypassing the tree's links and their faults."""

    @abc.abstractmethod
    def processes(self, host: str) -> Tuple[ProcessInfo, ...]:
        """The host's processes, seen out of band (works while the host is partitioned)."""

    # -- faults (FaultBackend) ---------------------------------------------------------------

    @abc.abstractmethod
    def apply(self, fault: Fault) -> object:
        """Apply ``fault`` and return a handle for :meth:`heal`."""

    @abc.abstractmethod
    def heal(self, handle: object) -> None:
        """Undo one applied fault."""

    @abc.abstractmethod
    def heal_all(self) -> None:
        """Undo every fault this backend applied, from its own state rather than handles."""


def resolve_plan(hops: Sequence[Hop], backend: Backend) -> Tuple[ConnectSpec, ...]:
    """Turn a chain of logical hops into concrete connection specs, one per hop.

    The runtime builds contexts in order, passing each as ``via=`` to the next; this keeps
    the topology's view (who is reached through whom) and the backend's (addresses, keys)
    in one place.
    """
    return tuple(backend.connect_spec(hop.host, hop.account) for hop in hops)
