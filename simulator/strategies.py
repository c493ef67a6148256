"""Generated inputs for fault campaigns: random trees of hosts and schedules of overlapping faults.

Every generator is written once, against a three-method :class:`Draw` (an integer, a number,
a choice), and driven two ways:

* :class:`RandomDraw` seeded by a string: what a campaign uses, so that run ``k`` of seed
  ``S`` is the same tree and the same schedule on every machine, alone or among others;
* hypothesis (:func:`topologies`, :func:`schedules`): strategies for property tests, which
  shrink towards the simplest values, listed first in every choice here.

Trees (:class:`TreeShape`): 1 to 5 levels, each host with 1 to 8 children, at most
``max_hosts`` hosts, each running one of the interpreters the backend offers (a capability:
:func:`simulator.local.interpreters` on the local backend) with 0 to 2 extra accounts.
Schedules (:class:`FaultMix`): 1 to 6 faults of the kinds the backend can apply, on any host
or edge, starting anywhere within the horizon and overlapping freely, except that one target
has one fault at a time (two faults on one edge would undo each other's heal).
"""

from __future__ import annotations

import dataclasses
import random
from typing import (
    TYPE_CHECKING,
    Any,
    Dict,
    Iterable,
    List,
    Mapping,
    Protocol,
    Sequence,
    Tuple,
    TypeVar,
)

from simulator.faults import Fault, make_fault
from simulator.topology import Topology, parse_topology

if TYPE_CHECKING:
    from hypothesis.strategies import SearchStrategy

__all__ = [
    "CAMPAIGN_KINDS",
    "Draw",
    "FaultMix",
    "PlannedFault",
    "RandomDraw",
    "TreeShape",
    "fault_params",
    "fault_schedule",
    "random_topology",
    "schedules",
    "topologies",
    "tree_document",
]

T = TypeVar("T")

#: Fault kinds a campaign draws from, simplest first (hypothesis shrinks towards the first).
CAMPAIGN_KINDS = ("kill", "partition", "pause", "stop", "restart", "stream", "latency",
                  "bandwidth")
_ROLES = ("bastion", "dc", "rack", "node", "leaf")
_EXTRA_ACCOUNTS = (("app", "nopasswd"), ("web", "password"))


class Draw(Protocol):
    """Where generated values come from."""

    def integer(self, low: int, high: int) -> int: ...

    def number(self, low: float, high: float) -> float: ...

    def choice(self, options: Sequence[T]) -> T: ...


class RandomDraw:
    """Values from :class:`random.Random` seeded with ``seed`` (any string or number)."""

    def __init__(self, seed: object) -> None:
        self._rng = random.Random(str(seed))

    def integer(self, low: int, high: int) -> int:
        return self._rng.randint(low, high)

    def number(self, low: float, high: float) -> float:
        return self._rng.uniform(low, high)

    def choice(self, options: Sequence[T]) -> T:
        return self._rng.choice(list(options))


class _HypothesisDraw:
    """Values from a hypothesis ``draw``, so generated inputs shrink."""

    def __init__(self, draw: Any) -> None:
        from hypothesis import strategies

        self._draw = draw
        self._st = strategies

    def integer(self, low: int, high: int) -> int:
        return self._draw(self._st.integers(low, high))

    def number(self, low: float, high: float) -> float:
        return self._draw(self._st.floats(low, high, allow_nan=False, allow_infinity=False))

    def choice(self, options: Sequence[T]) -> T:
        return self._draw(self._st.sampled_from(list(options)))


# --------------------------------------------------------------------------------------------
# Trees
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TreeShape:
    """What trees to generate. ``pythons`` are the interpreters the backend can run."""

    pythons: Tuple[str, ...]
    depth: Tuple[int, int] = (1, 5)
    fanout: Tuple[int, int] = (1, 8)
    max_hosts: int = 24
    accounts: Tuple[int, int] = (0, 2)
    keepalive_interval: float = 1.0
    keepalive_count: int = 2

    def __post_init__(self) -> None:
        if not self.pythons:
            raise ValueError("TreeShape.pythons: name at least one interpreter")
        for low, high, what in ((*self.depth, "depth"), (*self.fanout, "fanout"),
                                (*self.accounts, "accounts")):
            if not 0 <= low <= high or (what != "accounts" and low < 1):
                least = 0 if what == "accounts" else 1
                raise ValueError(f"TreeShape.{what}: expected {least} <= low <= high, got "
                                 f"({low}, {high})")
        if self.max_hosts < self.depth[1]:
            raise ValueError(f"TreeShape.max_hosts ({self.max_hosts}) is below the deepest "
                             f"tree ({self.depth[1]} levels)")


def tree_document(draw: Draw, shape: TreeShape, name: str = "random") -> Dict[str, Any]:
    """A topology document (what a YAML file holds) for one generated tree."""
    depth = draw.integer(*shape.depth)
    count = 0
    bodies: List[List[Dict[str, Any]]] = []
    names: List[List[str]] = []
    for level in range(depth):
        parents = names[-1] if names else [""]
        bodies.append([])
        names.append([])
        for index, parent in enumerate(parents):
            room = shape.max_hosts - count - (depth - 1 - level)
            wanted = draw.integer(*shape.fanout)
            if level == 0:
                wanted = min(wanted, 2)  # the master's own fan-out stays small
            children = min(wanted, max(room, 1 if index == 0 else 0))
            for _ in range(children):
                count += 1
                host = f"{_ROLES[level]}{count}"
                body = _host_body(draw, shape, level)
                bodies[-1].append(body)
                names[-1].append(host)
                body["_parent"] = parent
    tree = _nest(bodies, names)
    return {
        "version": 1,
        "name": name,
        "network": {"keepalive_interval": f"{shape.keepalive_interval:g}s",
                    "keepalive_count": shape.keepalive_count},
        "images": {"local": {"suite": "bookworm", "python": list(shape.pythons)}},
        "defaults": {"image": "local",
                     "accounts": [{"name": "sim", "keys": ["runner"], "password": "sim-pw"}]},
        "tree": tree,
    }


def _host_body(draw: Draw, shape: TreeShape, level: int) -> Dict[str, Any]:
    body: Dict[str, Any] = {"role": _ROLES[level], "python": draw.choice(shape.pythons)}
    extra = draw.integer(*shape.accounts)
    if extra:
        body["accounts+"] = [{"name": name, "sudo": sudo}
                             for name, sudo in _EXTRA_ACCOUNTS[:extra]]
    latency = draw.choice((0, 1, 3))
    if latency:
        body["link"] = {"latency": f"{latency}ms"}
    return body


def _nest(bodies: List[List[Dict[str, Any]]], names: List[List[str]]) -> Dict[str, Any]:
    """Turn the levels into the nested ``tree:``/``children:`` mapping of a topology file."""
    by_name: Dict[str, Dict[str, Any]] = {}
    tree: Dict[str, Any] = {}
    for level_bodies, level_names in zip(bodies, names):
        for body, name in zip(level_bodies, level_names):
            parent = body.pop("_parent")
            siblings = tree if not parent else by_name[parent].setdefault("children", {})
            siblings[name] = body
            by_name[name] = body
    return tree


def random_topology(draw: Draw, shape: TreeShape, name: str = "random") -> Topology:
    """A generated tree, parsed like a file (so it is checked like one)."""
    return parse_topology(tree_document(draw, shape, name), f"<generated {name}>")


# --------------------------------------------------------------------------------------------
# Fault schedules
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PlannedFault:
    """One fault of a campaign schedule: ``kind`` on ``target`` (a host id; for an edge
    fault, the host below the edge) from ``start`` for ``duration`` seconds."""

    start: float
    duration: float
    kind: str
    target: str
    params: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def end(self) -> float:
        return self.start + self.duration

    def fault(self) -> Fault:
        return make_fault(self.kind, self.target, self.params)

    def as_dict(self) -> Dict[str, Any]:
        return {"start": self.start, "duration": self.duration, "kind": self.kind,
                "target": self.target, "params": dict(self.params)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PlannedFault:
        planned = cls(float(data["start"]), float(data["duration"]), str(data["kind"]),
                      str(data["target"]), dict(data.get("params") or {}))
        planned.fault()  # refuses a kind, target or parameter that makes no fault
        return planned

    def describe(self) -> str:
        params = " ".join(f"{k}={v}" for k, v in sorted(self.params.items()))
        return (f"{self.start:7.2f}s +{self.duration:5.2f}s  {self.kind:<9} {self.target}"
                + (f"  {params}" if params else ""))


@dataclasses.dataclass(frozen=True)
class FaultMix:
    """What schedules to generate: fault kinds (those the backend can apply), how many,
    within what horizon, for how long each."""

    kinds: Tuple[str, ...]
    count: Tuple[int, int] = (1, 6)
    horizon: float = 10.0
    duration: Tuple[float, float] = (0.5, 5.0)

    def __post_init__(self) -> None:
        if not self.kinds:
            raise ValueError("FaultMix.kinds: name at least one fault kind")
        unknown = sorted(set(self.kinds) - set(CAMPAIGN_KINDS))
        if unknown:
            raise ValueError(f"FaultMix.kinds: {unknown[0]!r} is not a campaign fault kind; "
                             f"expected some of {', '.join(CAMPAIGN_KINDS)}")
        if not 0 <= self.count[0] <= self.count[1] or self.horizon <= 0 \
                or not 0 < self.duration[0] <= self.duration[1]:
            raise ValueError(f"FaultMix: bad count, horizon or duration: {self!r}")


def fault_params(draw: Draw, kind: str) -> Dict[str, Any]:
    """Parameters for one fault of ``kind``, as :func:`~simulator.faults.make_fault` takes."""
    if kind in ("stop", "restart"):
        return {"grace": round(draw.number(0.1, 1.5), 2)}
    if kind == "partition":
        mode = draw.choice(("reset", "drop"))
        if mode == "drop":
            return {"mode": mode, "direction": draw.choice(("both", "ingress", "egress"))}
        return {"mode": mode}
    if kind == "latency":
        delay = round(draw.number(0.01, 0.3), 3)
        return {"delay": delay, "jitter": round(delay * draw.number(0.0, 0.25), 3)}
    if kind == "bandwidth":
        return {"rate": draw.integer(256_000, 10_000_000)}
    if kind == "stream":
        stream = draw.choice(("reset", "stall", "cut_after"))
        if stream == "cut_after":
            return {"kind": stream, "nbytes": draw.integer(0, 4096)}
        return {"kind": stream}
    return {}


def fault_schedule(draw: Draw, topology: Topology, mix: FaultMix) -> List[PlannedFault]:
    """A schedule of overlapping faults on ``topology``, ordered by start."""
    hosts = [host.id for host in topology.walk()]
    planned: List[PlannedFault] = []
    for _ in range(draw.integer(*mix.count)):
        kind = draw.choice(mix.kinds)
        target = draw.choice(hosts)
        start = round(draw.number(0.0, mix.horizon), 2)
        duration = round(draw.number(*mix.duration), 2)
        params = fault_params(draw, kind)
        start = _free_slot([p for p in planned if p.target == target], start, duration)
        planned.append(PlannedFault(start, duration, kind, target, params))
    return sorted(planned, key=lambda p: (p.start, p.target))


def _free_slot(taken: Iterable[PlannedFault], start: float, duration: float) -> float:
    """The first start at or after ``start`` where ``duration`` seconds overlap none of
    ``taken`` (with a tenth of a second between one heal and the next apply)."""
    for other in sorted(taken, key=lambda p: p.start):
        if start < other.end + 0.1 and start + duration > other.start - 0.1:
            start = round(other.end + 0.1, 2)
    return start


# --------------------------------------------------------------------------------------------
# hypothesis strategies (for tests; hypothesis is a test dependency)
# --------------------------------------------------------------------------------------------


def topologies(shape: TreeShape) -> SearchStrategy[Topology]:
    """Random trees of ``shape``, shrinking towards one small host."""
    from hypothesis import strategies

    @strategies.composite
    def build(draw: Any) -> Topology:
        return random_topology(_HypothesisDraw(draw), shape)

    return build()


def schedules(topology: Topology, mix: FaultMix) -> SearchStrategy[List[PlannedFault]]:
    """Random schedules on ``topology``, shrinking towards one early kill of the first host."""
    from hypothesis import strategies

    @strategies.composite
    def build(draw: Any) -> List[PlannedFault]:
        return fault_schedule(_HypothesisDraw(draw), topology, mix)

    return build()
