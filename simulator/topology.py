"""The topology file model: a tree of hosts, their accounts and links, and fault schedules.

Pure data and pure functions: :func:`parse_topology` turns the mapping read from a YAML file into
frozen dataclasses, and nothing here starts a process or touches the network, so the whole model
is unit-tested alone and backends (local, docker, later others) share one reading of a file.

Parsing runs in two stages. The first checks each mapping as it is written (unknown keys,
types, units) so that errors point at the exact place in the file: ``dc.yml:16:
tree.bastion.children.dc[1..2].link.latency: expected a duration ...``. The second resolves
every host from its layers, lowest precedence first (built-in defaults, the top-level
``defaults``, the host's ``profiles`` in order, the ``defaults`` of each ancestor from the root
down, then the host's own keys), deep-merging maps, replacing lists unless written ``key+:``
(append), and checks what only makes sense together (an image offering the python asked for,
the login account existing, sudo passwords being known).

The format is described for users in ``simulator/FORMAT.md`` and for editors in
``simulator/schema.json``.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import types
from typing import (
    Any,
    Callable,
    Dict,
    Iterator,
    List,
    Mapping,
    NoReturn,
    Optional,
    Sequence,
    Tuple,
    Union,
)

import yaml

from simulator.units import parse_duration, parse_fraction, parse_rate, parse_size

__all__ = [
    "EDGE_FAULT_KINDS",
    "FAULT_KINDS",
    "FAULT_PARAMS",
    "HOST_FAULT_KINDS",
    "KNOWN_SUITES",
    "MAX_HOSTS",
    "MAX_SCHEDULE_STEPS",
    "PLACEMENT_RULES",
    "SUDO_MODES",
    "Account",
    "FaultError",
    "Hop",
    "Host",
    "HostNotFound",
    "ImageSpec",
    "KeySpec",
    "Link",
    "Network",
    "NodePlacement",
    "Resources",
    "Schedule",
    "SelectorError",
    "Topology",
    "TopologyError",
    "load_topology",
    "parse_selector",
    "parse_topology",
]

#: Debian suite -> the python3 it ships; a host's ``image`` picks its interpreter through this.
KNOWN_SUITES: Mapping[str, Tuple[str, ...]] = types.MappingProxyType({
    "bullseye": ("python3.9",),
    "bookworm": ("python3.11",),
    "trixie": ("python3.13",),
    "sid": ("python3.14",),
})
SUDO_MODES = ("nopasswd", "password", "requiretty", "targetpw", "none")
KEY_TYPES = ("ed25519", "rsa", "ecdsa")
MAX_HOSTS = 10_000
MAX_RANGE = 1000
MAX_DEPTH = 32

PathPart = Union[str, int]


# --------------------------------------------------------------------------------------------
# Errors, and where in the file a value came from
# --------------------------------------------------------------------------------------------


class TopologyError(ValueError):
    """A topology file is wrong. The message names the file, the place in it and what was
    expected; the parts are also kept as attributes for tools."""

    def __init__(self, source: str, path: str, problem: str, line: Optional[int] = None):
        self.source = source
        self.path = path
        self.problem = problem
        self.line = line
        place = source if line is None else f"{source}:{line}"
        super().__init__(f"{place}: {path}: {problem}" if path else f"{place}: {problem}")


class SelectorError(ValueError):
    """A host selector (``role:node``, ``subtree:bastion/dc1`` ...) is malformed."""


class HostNotFound(LookupError):
    """No host, or more than one, answers to the id or name asked for."""


def _format_path(path: Sequence[PathPart]) -> str:
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else part
    return text


@dataclasses.dataclass(frozen=True)
class _Where:
    """A position in the document: the path of keys from the top, and a line when known."""

    source: str
    path: Tuple[PathPart, ...] = ()
    line: Optional[int] = None

    def key(self, container: object, key: PathPart) -> _Where:
        lines = getattr(container, "key_lines", None) or {}
        return _Where(self.source, (*self.path, key), lines.get(key, self.line))

    def item(self, container: object, index: int) -> _Where:
        lines = getattr(container, "item_lines", None) or []
        line = lines[index] if index < len(lines) else self.line
        return _Where(self.source, (*self.path, index), line)

    def fail(self, problem: str) -> NoReturn:
        raise TopologyError(self.source, _format_path(self.path), problem, self.line)


# --------------------------------------------------------------------------------------------
# YAML with line numbers
# --------------------------------------------------------------------------------------------


class _MarkedDict(dict):
    """A mapping read from YAML that remembers the line of each of its keys."""

    key_lines: Dict[Any, int]


class _MarkedList(list):
    """A sequence read from YAML that remembers the line of each item."""

    item_lines: List[int]


class _MarkingLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that keeps line numbers and refuses duplicate keys.

    PyYAML silently keeps the last of two equal keys, which would hide a mistyped override.
    """


def _construct_mapping(loader: _MarkingLoader, node: yaml.MappingNode) -> Iterator[_MarkedDict]:
    loader.flatten_mapping(node)
    data = _MarkedDict()
    data.key_lines = {}
    yield data
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        try:
            duplicate = key in data
        except TypeError:
            raise yaml.constructor.ConstructorError(
                None, None, "found an unhashable key", key_node.start_mark) from None
        if duplicate:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first on line {data.key_lines[key]})",
                key_node.start_mark)
        data[key] = loader.construct_object(value_node, deep=True)
        data.key_lines[key] = line


def _construct_sequence(loader: _MarkingLoader,
                        node: yaml.SequenceNode) -> Iterator[_MarkedList]:
    data = _MarkedList()
    data.item_lines = [child.start_mark.line + 1 for child in node.value]
    yield data
    data.extend(loader.construct_object(child, deep=True) for child in node.value)


_MarkingLoader.add_constructor("tag:yaml.org,2002:map", _construct_mapping)
_MarkingLoader.add_constructor("tag:yaml.org,2002:seq", _construct_sequence)


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


def _masked_repr(obj: object, secret_fields: Sequence[str]) -> str:
    """A dataclass repr that shows '***' instead of any secret that is set."""
    parts = []
    for field in dataclasses.fields(obj):  # type: ignore[arg-type]
        if not field.repr:
            continue
        value = getattr(obj, field.name)
        shown = "'***'" if field.name in secret_fields and value is not None else repr(value)
        parts.append(f"{field.name}={shown}")
    return f"{type(obj).__name__}({', '.join(parts)})"


@dataclasses.dataclass(frozen=True)
class ImageSpec:
    """A host image: one Debian suite and the interpreters it offers (first = default)."""

    name: str
    suite: str
    python: Tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class KeySpec:
    """An ssh key pair the runner generates per session; accounts accept it for login."""

    name: str
    type: str = "ed25519"


@dataclasses.dataclass(frozen=True)
class Network:
    """Address space and ssh liveness settings shared by the whole tree.

    Short keepalives make disconnect detection times predictable in fault tests.
    """

    supernet: str = "10.213.0.0/16"
    keepalive_interval: float = 2.0
    keepalive_count: int = 3
    connect_timeout: float = 30.0


@dataclasses.dataclass(frozen=True)
class NodePlacement:
    """Where hosts go when a backend spreads the tree over machines (the ``swarm`` backend's
    nodes; single-machine backends ignore it). ``rule``:

    * ``spread``: hosts in walk order, round robin over the nodes;
    * ``subtree``: hosts above ``depth`` (0: the roots) go to the first node; every host at
      ``depth`` takes the next node round robin (from the second node when ``depth`` > 0),
      and its whole subtree goes with it;
    * ``labels``: each host goes to a node whose labels include those of the first entry of
      ``labels`` whose selector matches it, round robin among such nodes; a host no entry
      matches goes with its parent (a root: to the first node).
    """

    rule: str = "spread"
    depth: int = 1
    labels: Tuple[Tuple[str, Mapping[str, str]], ...] = ()


PLACEMENT_RULES = ("spread", "subtree", "labels")


@dataclasses.dataclass(frozen=True)
class Link:
    """The edge from a host up to its parent (or, for a root host, to the runner).

    ``latency``/``jitter`` in seconds, ``loss`` as a fraction, ``rate`` in bits/s (None means
    unlimited). These are the steady-state properties; faults change them for a while.
    """

    latency: float = 0.0
    jitter: float = 0.0
    loss: float = 0.0
    rate: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class Resources:
    """Limits a backend should place on a host (None: no limit)."""

    cpus: Optional[float] = None
    memory: Optional[int] = None


@dataclasses.dataclass(frozen=True, repr=False)
class Account:
    """A user on a host, and how the host's login user becomes it.

    ``sudo`` is the sudoers rule from the login user to this account: ``nopasswd`` (no
    password), ``password`` (sudo asks for the login user's own password), ``targetpw`` (it
    asks for this account's password), ``requiretty`` (no password, but a tty is required) or
    ``none`` (no sudo: reached by ssh with ``keys`` or ``password``). The password is never
    shown in ``repr``.
    """

    name: str
    sudo: str = "none"
    password: Optional[str] = None
    keys: Tuple[str, ...] = ()
    login_delay: float = 0.0
    readonly_home: bool = False

    def __repr__(self) -> str:
        return _masked_repr(self, ("password",))


@dataclasses.dataclass(frozen=True)
class Host:
    """One resolved host. ``id`` is its path from the root (``bastion/dc1/rack12/node12b``)."""

    id: str
    name: str
    parent: Optional[str]
    role: str
    image: ImageSpec
    python: str
    login: str
    accounts: Tuple[Account, ...]
    link: Link
    resources: Resources
    untrusted: bool
    children: Tuple[str, ...]
    depth: int

    @property
    def suite(self) -> str:
        return self.image.suite

    def account(self, name: str) -> Account:
        for account in self.accounts:
            if account.name == name:
                return account
        raise HostNotFound(f"host {self.id!r} has no account {name!r}; it has "
                           f"{', '.join(a.name for a in self.accounts)}")

    @property
    def login_account(self) -> Account:
        return self.account(self.login)


@dataclasses.dataclass(frozen=True, repr=False)
class Hop:
    """One connection step: ``router.connect(method, via=<previous hop>, **kwargs)``.

    ``kwargs`` are logical: ``hostname`` is the host's name as its parent sees it. A backend's
    ``connect_spec`` adds what only it knows (addresses, ports, identity files).
    """

    method: str
    kwargs: Mapping[str, Any]
    host: str
    account: Optional[str] = None

    @property
    def label(self) -> str:
        """A context name in the seed's style: ``ssh:bastion``, ``sudo:node12b:webapp``."""
        if self.method == "sudo":
            return f"sudo:{self.host}:{self.account}"
        user = self.kwargs.get("username")
        return f"ssh:{self.host}" if self.account is None else f"ssh:{user}@{self.host}"

    def __repr__(self) -> str:
        shown = {k: ("***" if k == "password" else v) for k, v in self.kwargs.items()}
        return f"Hop({self.label!r}, {self.method}, {shown})"


# --------------------------------------------------------------------------------------------
# Selectors
# --------------------------------------------------------------------------------------------

_SELECTOR_PREFIXES = ("role", "host", "subtree", "edge")
_PATTERN_RE = re.compile(r"[A-Za-z0-9_*?/-]+")


def parse_selector(selector: object) -> Tuple[str, str]:
    """Split ``prefix:pattern`` into its parts; a bare pattern means ``host:``.

    ``role:<glob>`` hosts by role; ``host:<glob>`` hosts by name (pattern without ``/``) or
    by full id (with ``/``); ``subtree:<glob>`` those hosts and everything below them;
    ``edge:<glob>`` the edges from those hosts' parents down to them. In globs ``*`` and ``?``
    stay within one path segment and ``**`` spans segments.
    """
    if not isinstance(selector, str) or not selector:
        raise SelectorError(f"expected a selector string like 'role:node', got {selector!r}")
    prefix, sep, pattern = selector.partition(":")
    if not sep:
        prefix, pattern = "host", selector
    if prefix not in _SELECTOR_PREFIXES:
        raise SelectorError(f"unknown selector prefix {prefix!r} in {selector!r}; expected "
                            f"one of {', '.join(p + ':' for p in _SELECTOR_PREFIXES)}")
    if not _PATTERN_RE.fullmatch(pattern) or (prefix == "role" and "/" in pattern):
        raise SelectorError(f"bad pattern {pattern!r} in selector {selector!r}: use names, "
                            f"'/', '*', '**' and '?'")
    return prefix, pattern


def _glob_regex(pattern: str) -> re.Pattern:
    parts = re.split(r"(\*\*|\*|\?)", pattern)
    table = {"**": ".*", "*": "[^/]*", "?": "[^/]"}
    return re.compile("".join(table.get(part, re.escape(part)) for part in parts))


# --------------------------------------------------------------------------------------------
# Fault schedules: the `faults:` section (simulator.faults builds and applies the faults)
# --------------------------------------------------------------------------------------------


class FaultError(ValueError):
    """A fault, a schedule or an injector call was given something it cannot use."""


def convert_field(cls_name: str, field: str, parser: Callable[..., Any], value: object) -> Any:
    """Run a unit parser, naming the fault (or schedule) and field in the error."""
    try:
        return parser(value, allow_bare=True)
    except ValueError as exc:
        raise FaultError(f"{cls_name}.{field}: {exc}") from None


def set_field(obj: object, field: str, value: object) -> None:
    """Store a normalised value on a frozen dataclass during ``__post_init__``."""
    object.__setattr__(obj, field, value)


#: Parameter types per fault kind: the vocabulary of the ``faults:`` section, shared with
#: :mod:`simulator.faults` (which builds the faults) and with schema.json.
FAULT_PARAMS: Mapping[str, Mapping[str, str]] = types.MappingProxyType({
    "kill": {},
    "power_off": {},
    "stop": {"grace": "duration"},
    "restart": {"grace": "duration"},
    "pause": {},
    "signal": {"process": "string", "signal": "string"},
    "sshd_down": {},
    "partition": {"mode": "string", "direction": "string"},
    "latency": {"delay": "duration", "jitter": "duration"},
    "bandwidth": {"rate": "rate"},
    "loss": {"fraction": "percent"},
    "stream": {"kind": "string", "nbytes": "integer"},
})
FAULT_KINDS: Tuple[str, ...] = tuple(FAULT_PARAMS)
HOST_FAULT_KINDS: Tuple[str, ...] = (
    "kill", "power_off", "stop", "restart", "pause", "signal", "sshd_down")
EDGE_FAULT_KINDS: Tuple[str, ...] = ("partition", "latency", "bandwidth", "loss", "stream")
MAX_SCHEDULE_STEPS = 1000
_UNIT_PARSERS: Mapping[str, Callable[..., Any]] = {
    "duration": parse_duration, "rate": parse_rate, "percent": parse_fraction}


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A named, seeded fault schedule (one entry of a topology file's ``faults:`` section).

    Every ``interval`` seconds one fault, drawn from ``pick``, is applied to a target drawn
    from ``targets[kind]`` (selectors; all hosts or edges when absent) for ``duration``
    seconds, ``count`` times; then everything is healed. At most one fault is applied at a
    time, so ``duration`` may not exceed ``interval``. Faults start at a seeded random moment
    within their slot, so the same seed replays the same plan.
    """

    name: str
    interval: float
    duration: float
    pick: Tuple[str, ...]
    count: int = 5
    targets: Mapping[str, Tuple[str, ...]] = dataclasses.field(default_factory=dict)
    params: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    seed: Optional[int] = None
    final: str = "heal"

    def __post_init__(self) -> None:
        where = f"schedule {self.name!r}"
        if not isinstance(self.name, str) or not self.name:
            raise FaultError(f"schedule name: expected a non-empty string, got {self.name!r}")
        set_field(self, "interval", convert_field(where, "interval", parse_duration, self.interval))
        set_field(self, "duration", convert_field(where, "duration", parse_duration, self.duration))
        if self.interval <= 0 or self.duration <= 0:
            raise FaultError(f"{where}: interval and duration must be above 0")
        if self.duration > self.interval:
            raise FaultError(f"{where}: duration ({self.duration}s) exceeds interval "
                             f"({self.interval}s); faults of one schedule never overlap")
        if (not isinstance(self.count, int) or isinstance(self.count, bool)
                or not 1 <= self.count <= MAX_SCHEDULE_STEPS):
            raise FaultError(f"{where}: count: expected 1..{MAX_SCHEDULE_STEPS}, "
                             f"got {self.count!r}")
        if self.seed is not None and (not isinstance(self.seed, int)
                                      or isinstance(self.seed, bool)):
            raise FaultError(f"{where}: seed: expected an integer, got {self.seed!r}")
        if self.final != "heal":
            raise FaultError(f"{where}: final: the only final step is 'heal', "
                             f"got {self.final!r}")
        set_field(self, "pick", self._checked_pick(where))
        set_field(self, "targets", self._checked_targets(where))
        set_field(self, "params", self._checked_params(where))

    def _checked_pick(self, where: str) -> Tuple[str, ...]:
        pick = tuple(self.pick) if isinstance(self.pick, (list, tuple)) else ()
        if not pick:
            raise FaultError(f"{where}: pick: expected a non-empty list of fault kinds")
        for kind in pick:
            if kind not in FAULT_PARAMS:
                raise FaultError(f"{where}: pick: unknown fault kind {kind!r}; expected one "
                                 f"of {', '.join(FAULT_KINDS)}")
        return pick

    def _checked_targets(self, where: str) -> Mapping[str, Tuple[str, ...]]:
        targets = {}
        for kind, given in dict(self.targets).items():
            if kind not in self.pick:
                raise FaultError(f"{where}: targets: {kind!r} is not in pick")
            selectors = (given,) if isinstance(given, str) else tuple(given)
            for selector in selectors:
                try:
                    prefix, _pattern = parse_selector(selector)
                except SelectorError as exc:
                    raise FaultError(f"{where}: targets.{kind}: {exc}") from None
                if prefix == "edge" and kind in HOST_FAULT_KINDS:
                    raise FaultError(f"{where}: targets.{kind}: {kind!r} acts on hosts, but "
                                     f"{selector!r} selects edges")
            targets[kind] = selectors
        return types.MappingProxyType(targets)

    def _checked_params(self, where: str) -> Mapping[str, Mapping[str, Any]]:
        """Names and units are checked here; values that only a fault can judge (a mode, a
        signal) when :func:`simulator.faults.plan` builds the faults."""
        params = {}
        for kind, given in dict(self.params).items():
            if kind not in self.pick:
                raise FaultError(f"{where}: params: {kind!r} is not in pick")
            values = dict(given)
            for name, value in given.items():
                unit = FAULT_PARAMS[kind].get(name)
                if unit is None:
                    allowed = ", ".join(FAULT_PARAMS[kind]) or "none"
                    raise FaultError(f"{where}: params.{kind}: unknown parameter {name!r}; "
                                     f"expected: {allowed}")
                if unit in _UNIT_PARSERS:
                    values[name] = convert_field(f"{where}: params.{kind}", name,
                                            _UNIT_PARSERS[unit], value)
            params[kind] = types.MappingProxyType(values)
        return types.MappingProxyType(params)

    def candidates(self, topology: Topology, kind: str) -> Tuple[Host, ...]:
        """The hosts (or, for edge faults, the hosts below the edges) ``kind`` may hit."""
        selectors = self.targets.get(kind)
        if selectors is None:
            return tuple(topology.walk())
        found: Dict[str, Host] = {}
        for selector in selectors:
            matched = topology.select(selector)
            if not matched:
                raise FaultError(f"schedule {self.name!r}: targets.{kind}: {selector!r} "
                                 f"matches no host in topology {topology.name!r}")
            for host in matched:
                found.setdefault(host.id, host)
        order = {host.id: index for index, host in enumerate(topology.walk())}
        return tuple(sorted(found.values(), key=lambda host: order[host.id]))

    def seed_for(self, topology: Topology, override: Optional[int] = None) -> int:
        """The seed rule (simulator/FORMAT.md), the one ``check``, ``up`` and pytest use: a
        seed given on the command line (``--seed``, ``--topology-seed``), else the schedule's
        own ``seed``, else the topology's."""
        chosen = next((s for s in (override, self.seed, topology.seed) if s is not None), None)
        if chosen is None:
            raise FaultError(f"schedule {self.name!r}: no seed; give the schedule or the "
                             f"topology a `seed`, or pass one")
        return chosen


# --------------------------------------------------------------------------------------------
# The topology
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, repr=False)
class Topology:
    """A resolved topology. ``hosts`` are in walk order: every parent before its children."""

    name: str
    source: str
    version: int
    seed: Optional[int]
    network: Network
    images: Tuple[ImageSpec, ...]
    keys: Tuple[KeySpec, ...]
    hosts: Tuple[Host, ...]
    schedules: Tuple[Schedule, ...]
    placement: NodePlacement = NodePlacement()
    _by_id: Mapping[str, Host] = dataclasses.field(init=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_id",
                           types.MappingProxyType({host.id: host for host in self.hosts}))

    def __repr__(self) -> str:
        return (f"Topology(name={self.name!r}, source={self.source!r}, "
                f"hosts={len(self.hosts)}, schedules={[s.name for s in self.schedules]})")

    def walk(self) -> Iterator[Host]:
        """Every host, parents before children (depth-first, in file order)."""
        return iter(self.hosts)

    def roots(self) -> Tuple[Host, ...]:
        return tuple(host for host in self.hosts if host.parent is None)

    def host(self, id_or_name: str) -> Host:
        """The host with this id, or else the only host with this name."""
        if id_or_name in self._by_id:
            return self._by_id[id_or_name]
        named = [host for host in self.hosts if host.name == id_or_name]
        if len(named) == 1:
            return named[0]
        if named:
            raise HostNotFound(f"name {id_or_name!r} is ambiguous in topology {self.name!r}; "
                               f"use an id: {', '.join(host.id for host in named)}")
        raise HostNotFound(f"no host {id_or_name!r} in topology {self.name!r}")

    def parent(self, host: Host) -> Optional[Host]:
        return None if host.parent is None else self._by_id[host.parent]

    def children(self, host: Host) -> Tuple[Host, ...]:
        return tuple(self._by_id[child] for child in host.children)

    def ancestors(self, host: Host) -> Tuple[Host, ...]:
        """From the root down to the host's parent."""
        chain = []
        parent = self.parent(host)
        while parent is not None:
            chain.append(parent)
            parent = self.parent(parent)
        return tuple(reversed(chain))

    def subtree(self, host: Host) -> Tuple[Host, ...]:
        """The host and everything below it, in walk order."""
        prefix = host.id + "/"
        return tuple(h for h in self.hosts if h.id == host.id or h.id.startswith(prefix))

    def schedule(self, name: str) -> Schedule:
        for schedule in self.schedules:
            if schedule.name == name:
                return schedule
        known = ", ".join(s.name for s in self.schedules) or "none"
        raise LookupError(f"no fault schedule {name!r} in topology {self.name!r}; "
                          f"it has: {known}")

    def image(self, name: str) -> ImageSpec:
        for image in self.images:
            if image.name == name:
                return image
        raise LookupError(f"no image {name!r} in topology {self.name!r}")

    def select(self, selector: str) -> Tuple[Host, ...]:
        """The hosts a selector names, in walk order (see :func:`parse_selector`).

        For ``edge:`` the hosts returned are the lower ends of the selected edges.
        """
        prefix, pattern = parse_selector(selector)
        regex = _glob_regex(pattern)
        if prefix == "role":
            return tuple(host for host in self.hosts if regex.fullmatch(host.role))
        by_id = "/" in pattern
        matched = [host for host in self.hosts
                   if regex.fullmatch(host.id if by_id else host.name)]
        if prefix != "subtree":
            return tuple(matched)
        wanted = {below.id for host in matched for below in self.subtree(host)}
        return tuple(host for host in self.hosts if host.id in wanted)

    def accounts(self) -> Tuple[Tuple[Host, Account], ...]:
        """Every (host, account) pair, hosts in walk order."""
        return tuple((host, account) for host in self.hosts for account in host.accounts)

    def _ssh_hop(self, host: Host, username: str, password: Optional[str],
                 account: Optional[str]) -> Hop:
        kwargs: Dict[str, Any] = {
            "hostname": host.name,
            "username": username,
            "python_path": host.python,
            "connect_timeout": self.network.connect_timeout,
            "keepalive_interval": self.network.keepalive_interval,
            "keepalive_count": self.network.keepalive_count,
        }
        if password is not None:
            kwargs["password"] = password
        return Hop("ssh", types.MappingProxyType(kwargs), host.id, account)

    def _sudo_hop(self, host: Host, account: Account) -> Hop:
        kwargs: Dict[str, Any] = {"username": account.name, "python_path": host.python}
        if account.sudo == "password":
            kwargs["password"] = host.login_account.password
        elif account.sudo == "targetpw":
            kwargs["password"] = account.password
        return Hop("sudo", types.MappingProxyType(kwargs), host.id, account.name)

    def context_plan(self) -> Dict[Tuple[str, Optional[str]], Tuple[Hop, ...]]:
        """For every host and account, the hops from the master that reach it.

        Keys are ``(host_id, None)`` for the host's login context and ``(host_id, account)``
        for accounts. A host is reached by ssh from its parent's context; an account with a
        sudo rule by sudo from the host's context; an account without one (``sudo: none``) by
        ssh from the parent's context, logging in as that account. The login account maps to
        the host's own hops. Each chain is the previous one plus one hop, so the runtime can
        build contexts in order and pass the last one as ``via=``.
        """
        plan: Dict[Tuple[str, Optional[str]], Tuple[Hop, ...]] = {}
        for host in self.hosts:
            above = () if host.parent is None else plan[(host.parent, None)]
            login = host.login_account
            chain = (*above, self._ssh_hop(host, login.name, _ssh_password(login), None))
            plan[(host.id, None)] = chain
            for account in host.accounts:
                if account.name == host.login:
                    plan[(host.id, account.name)] = chain
                elif account.sudo == "none":
                    hop = self._ssh_hop(host, account.name, _ssh_password(account), account.name)
                    plan[(host.id, account.name)] = (*above, hop)
                else:
                    plan[(host.id, account.name)] = (*chain, self._sudo_hop(host, account))
        return plan


def _ssh_password(account: Account) -> Optional[str]:
    """Key login is preferred; a password is passed only to accounts that have no key."""
    return None if account.keys else account.password


# --------------------------------------------------------------------------------------------
# Stage 1: checking values where they are written
# --------------------------------------------------------------------------------------------

Checker = Callable[[Any, _Where], Any]

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
_USER_RE = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
_PYTHON_RE = re.compile(r"python[0-9]+(\.[0-9]+)?")
_RANGE_RE = re.compile(r"([A-Za-z0-9_-]*)\[([0-9]+)\.\.([0-9]+)\]([A-Za-z0-9_-]*)")


def _type_name(value: object) -> str:
    names = {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean",
             int: "an integer", float: "a number", type(None): "nothing (null)"}
    for kind, name in names.items():
        if isinstance(value, kind):
            return name
    return type(value).__name__


def _want(where: _Where, expected: str, value: object) -> NoReturn:
    where.fail(f"expected {expected}, got {_type_name(value)} {value!r}"
               if not isinstance(value, (dict, list)) else
               f"expected {expected}, got {_type_name(value)}")


def _regex_checker(regex: re.Pattern, expected: str) -> Checker:
    def check(value: Any, where: _Where) -> str:
        if not isinstance(value, str) or not regex.fullmatch(value):
            _want(where, expected, value)
        return value
    return check


_name = _regex_checker(_NAME_RE, "a name of letters, digits, '-' and '_'")
_username = _regex_checker(_USER_RE, "a user name (lower case letters, digits, '_', '-')")
_interpreter = _regex_checker(_PYTHON_RE, "an interpreter name like 'python3.11'")


def _string(value: Any, where: _Where) -> str:
    if not isinstance(value, str) or not value:
        _want(where, "a non-empty string", value)
    return value


def _boolean(value: Any, where: _Where) -> bool:
    if not isinstance(value, bool):
        _want(where, "true or false", value)
    return value


def _integer(value: Any, where: _Where) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        _want(where, "an integer", value)
    return value


def _unit_checker(parser: Callable[[Any], Any]) -> Checker:
    def check(value: Any, where: _Where) -> Any:
        try:
            return parser(value)
        except ValueError as exc:
            where.fail(str(exc))
    return check


_duration = _unit_checker(parse_duration)
_percent = _unit_checker(parse_fraction)
_rate = _unit_checker(parse_rate)
_size = _unit_checker(parse_size)


def _cpus(value: Any, where: _Where) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        _want(where, "a number of CPUs above 0, like 0.25", value)
    return float(value)


def _supernet(value: Any, where: _Where) -> str:
    try:
        return str(ipaddress.ip_network(value, strict=True))
    except (TypeError, ValueError):
        _want(where, "a network in CIDR form like '10.213.0.0/16'", value)


def _optional(check: Checker) -> Checker:
    def optional(value: Any, where: _Where) -> Any:
        return None if value is None else check(value, where)
    return optional


def _one_of(*choices: Any) -> Checker:
    def check(value: Any, where: _Where) -> Any:
        if value not in choices or isinstance(value, bool):
            where.fail(f"expected one of {', '.join(map(str, choices))}, got {value!r}")
        return value
    return check


def _list_of(check: Checker, *, non_empty: bool = False) -> Checker:
    def check_list(value: Any, where: _Where) -> Tuple[Any, ...]:
        if not isinstance(value, list) or (non_empty and not value):
            _want(where, "a non-empty list" if non_empty else "a list", value)
        return tuple(check(item, where.item(value, i)) for i, item in enumerate(value))
    return check_list


def _map_of(check_key: Checker, check_value: Checker) -> Checker:
    def check_map(value: Any, where: _Where) -> Dict[str, Any]:
        if not isinstance(value, dict):
            _want(where, "a mapping", value)
        result = {}
        for key, item in value.items():
            inner = where.key(value, key)
            check_key(key, inner)
            result[key] = check_value(item, inner)
        return result
    return check_map


def _check_fields(value: Any, where: _Where, fields: Mapping[str, Checker],
                  required: Sequence[str] = ()) -> Tuple[Dict[str, Any], Dict[str, _Where]]:
    """Check a mapping against a field table; return the converted values and their places."""
    if not isinstance(value, dict):
        _want(where, "a mapping", value)
    values, wheres = {}, {}
    for key, item in value.items():
        inner = where.key(value, key)
        if key not in fields:
            inner.fail(f"unknown key {key!r}; expected one of: {', '.join(sorted(fields))}")
        values[key] = fields[key](item, inner)
        wheres[key] = inner
    missing = [key for key in required if key not in value]
    if missing:
        where.fail(f"missing required key {missing[0]!r}")
    return values, wheres


def _record(fields: Mapping[str, Checker], required: Sequence[str] = ()) -> Checker:
    def check(value: Any, where: _Where) -> Dict[str, Any]:
        return _check_fields(value, where, fields, required)[0]
    return check


@dataclasses.dataclass(frozen=True)
class _AccountDecl:
    """An account as written, with its place, so later checks can point at it."""

    account: Account
    where: _Where


_ACCOUNT_FIELDS: Mapping[str, Checker] = {
    "name": _username,
    "sudo": _one_of(*SUDO_MODES),
    "password": _string,
    "keys": _list_of(_name),
    "login_delay": _duration,
    "readonly_home": _boolean,
}


def _account(value: Any, where: _Where) -> _AccountDecl:
    values, wheres = _check_fields(value, where, _ACCOUNT_FIELDS, required=("name",))
    account = Account(**values)
    if account.sudo == "targetpw" and account.password is None:
        wheres["sudo"].fail("sudo 'targetpw' asks for this account's own password; give the "
                            "account a `password`")
    return _AccountDecl(account, where)


_LINK_FIELDS: Mapping[str, Checker] = {
    "latency": _duration, "jitter": _duration, "loss": _percent, "rate": _optional(_rate),
}
_RESOURCE_FIELDS: Mapping[str, Checker] = {
    "cpus": _optional(_cpus), "memory": _optional(_size),
}
_LAYER_FIELDS: Dict[str, Checker] = {
    "role": _name,
    "image": _name,
    "python": _optional(_interpreter),
    "login": _username,
    "accounts": _list_of(_account),
    "accounts+": _list_of(_account),
    "link": _record(_LINK_FIELDS),
    "resources": _record(_RESOURCE_FIELDS),
    "untrusted": _boolean,
}


@dataclasses.dataclass(frozen=True)
class _Layer:
    """One mapping of host settings (defaults, a profile, a host's own keys), checked."""

    values: Mapping[str, Any]
    wheres: Mapping[str, _Where]


def _layer(value: Any, where: _Where) -> _Layer:
    if value is None:
        return _Layer({}, {})
    values, wheres = _check_fields(value, where, _LAYER_FIELDS)
    if "accounts" in values and "accounts+" in values:
        wheres["accounts+"].fail("use either 'accounts' (replace) or 'accounts+' (append) "
                                 "in one mapping, not both")
    return _Layer(values, wheres)


@dataclasses.dataclass(frozen=True)
class _HostDecl:
    """One key of a ``tree``/``children`` mapping (possibly a range), checked."""

    key: str
    names: Tuple[str, ...]
    where: _Where
    layer: _Layer
    profiles: Tuple[Tuple[str, _Where], ...]
    defaults: _Layer
    children: Tuple[_HostDecl, ...]


def _expand_range(key: Any, where: _Where) -> Tuple[str, ...]:
    """``node[1..4]`` -> node1..node4; ``n[01..12]`` keeps the zero padding."""
    if not isinstance(key, str):
        _want(where, "a host name", key)
    if _NAME_RE.fullmatch(key):
        return (key,)
    match = _RANGE_RE.fullmatch(key)
    if not match:
        where.fail(f"bad host name {key!r}: expected letters, digits, '-' and '_', with at "
                   f"most one range like 'node[1..4]'")
    head, low, high, tail = match.groups()
    start, stop = int(low), int(high)
    if start > stop or stop - start + 1 > MAX_RANGE:
        where.fail(f"bad range in {key!r}: expected [low..high] with low <= high and at most "
                   f"{MAX_RANGE} names")
    padded = (len(low) > 1 and low.startswith("0")) or (len(high) > 1 and high.startswith("0"))
    width = max(len(low), len(high)) if padded else 0
    names = tuple(f"{head}{n:0{width}d}{tail}" for n in range(start, stop + 1))
    for name in names:
        if not _NAME_RE.fullmatch(name):
            where.fail(f"range {key!r} makes the bad host name {name!r}")
    return names


def _host_decls(value: Any, where: _Where, depth: int) -> Tuple[_HostDecl, ...]:
    if value is None:
        return ()
    if not isinstance(value, dict):
        _want(where, "a mapping of host names to hosts", value)
    if depth > MAX_DEPTH:
        where.fail(f"the tree is deeper than {MAX_DEPTH} levels")
    decls = []
    for key, body in value.items():
        inner = where.key(value, key)
        names = _expand_range(key, inner)
        decls.append(_host_decl(key, names, body, inner, depth))
    return tuple(decls)


def _host_decl(key: str, names: Tuple[str, ...], body: Any, where: _Where,
               depth: int) -> _HostDecl:
    body = {} if body is None else body
    if not isinstance(body, dict):
        _want(where, "a mapping of host settings (or nothing)", body)
    own = {k: v for k, v in body.items() if k not in ("profiles", "defaults", "children")}
    for k in own:
        if k not in _LAYER_FIELDS:
            allowed = sorted([*_LAYER_FIELDS, "children", "defaults", "profiles"])
            where.key(body, k).fail(f"unknown key {k!r}; expected one of: {', '.join(allowed)}")
    layer_map = _MarkedDict(own)
    layer_map.key_lines = getattr(body, "key_lines", {})
    profiles: Tuple[Tuple[Any, _Where], ...] = ()
    if "profiles" in body:
        profiles_where = where.key(body, "profiles")
        names_list = _list_of(_name)(body["profiles"], profiles_where)
        profiles = tuple((name, profiles_where.item(body["profiles"], i))
                         for i, name in enumerate(names_list))
    return _HostDecl(
        key=key,
        names=names,
        where=where,
        layer=_layer(layer_map, where),
        profiles=profiles,
        defaults=_layer(body.get("defaults"), where.key(body, "defaults")),
        children=_host_decls(body.get("children"), where.key(body, "children"), depth + 1),
    )


_PARAM_CHECKERS: Mapping[str, Checker] = {
    "duration": _duration, "rate": _rate, "percent": _percent, "string": _string,
    "integer": _integer,
}


def _fault_params(value: Any, where: _Where) -> Dict[str, Dict[str, Any]]:
    result = {}
    for kind, params in _map_of(_one_of(*FAULT_KINDS), lambda v, w: v)(value, where).items():
        table = {name: _PARAM_CHECKERS[kind_of] for name, kind_of in FAULT_PARAMS[kind].items()}
        result[kind] = _check_fields(params, where.key(value, kind), table)[0]
    return result


def _selector(value: Any, where: _Where) -> str:
    try:
        parse_selector(value)
    except SelectorError as exc:
        where.fail(str(exc))
    return value


_SCHEDULE_FIELDS: Mapping[str, Checker] = {
    "seed": _integer,
    "interval": _duration,
    "duration": _duration,
    "count": _integer,
    "pick": _list_of(_one_of(*FAULT_KINDS), non_empty=True),
    "targets": _map_of(_one_of(*FAULT_KINDS), _list_of(_selector, non_empty=True)),
    "params": _fault_params,
    "final": _one_of("heal"),
}


@dataclasses.dataclass(frozen=True)
class _ScheduleDecl:
    schedule: Schedule
    where: _Where
    wheres: Mapping[str, _Where]
    raw: Any


def _schedule(name: str, value: Any, where: _Where) -> _ScheduleDecl:
    values, wheres = _check_fields(value, where, _SCHEDULE_FIELDS,
                                   required=("interval", "duration", "pick"))
    try:
        schedule = Schedule(name=name, **values)
    except FaultError as exc:
        where.fail(str(exc))
    return _ScheduleDecl(schedule, where, wheres, value)


def _image(value: Any, where: _Where) -> Dict[str, Any]:
    values, wheres = _check_fields(value, where, {
        "suite": _name, "python": _list_of(_interpreter, non_empty=True)}, required=("suite",))
    if "python" not in values:
        if values["suite"] not in KNOWN_SUITES:
            wheres["suite"].fail(f"suite {values['suite']!r} is not one of "
                                 f"{', '.join(KNOWN_SUITES)}, so list its interpreters in "
                                 f"`python`")
        values["python"] = KNOWN_SUITES[values["suite"]]
    return values


_NETWORK_FIELDS: Mapping[str, Checker] = {
    "supernet": _supernet,
    "keepalive_interval": _duration,
    "keepalive_count": _integer,
    "connect_timeout": _duration,
}

_TOP_FIELDS: Mapping[str, Checker] = {
    "version": _one_of(1),
    "name": _name,
    "seed": _integer,
    "network": _record(_NETWORK_FIELDS),
    "images": _map_of(_name, _image),
    "keys": _map_of(_name, _record({"type": _one_of(*KEY_TYPES)})),
    "defaults": _layer,
    "profiles": _map_of(_name, _layer),
    "tree": lambda value, where: value,  # checked with its own walker below
    "faults": lambda value, where: value,
    "placement": lambda value, where: value,  # checked once the hosts are known
}


# --------------------------------------------------------------------------------------------
# Stage 2: resolving hosts from their layers
# --------------------------------------------------------------------------------------------

_BUILTIN_WHERE = _Where("<built-in defaults>")
_BUILTIN_LAYER = _Layer(
    values={
        "role": "host",
        "image": "bookworm",
        "python": None,
        "login": "sim",
        "accounts": (_AccountDecl(Account("sim", keys=("runner",)), _BUILTIN_WHERE),),
        "link": {},
        "resources": {},
        "untrusted": False,
    },
    wheres={},
)


def _merge(layers: Sequence[_Layer]) -> Tuple[Dict[str, Any], Dict[str, _Where]]:
    """Merge layers, later ones winning; maps merge key by key, ``key+`` appends to lists."""
    values: Dict[str, Any] = {}
    wheres: Dict[str, _Where] = {}
    for layer in layers:
        for key, value in layer.values.items():
            base = key[:-1] if key.endswith("+") else key
            if key.endswith("+"):
                values[base] = (*values.get(base, ()), *value)
            elif isinstance(value, dict):
                values[base] = {**values.get(base, {}), **value}
            else:
                values[base] = value
            if key in layer.wheres:
                wheres[base] = layer.wheres[key]
    return values, wheres


@dataclasses.dataclass
class _Resolver:
    """Turns host declarations into :class:`Host` values, checking what needs context."""

    top_defaults: _Layer
    profiles: Mapping[str, _Layer]
    images: Mapping[str, ImageSpec]
    keys: Mapping[str, KeySpec]
    hosts: List[Host] = dataclasses.field(default_factory=list)

    def resolve(self, decls: Sequence[_HostDecl], parent: Optional[str],
                inherited: Tuple[_Layer, ...], depth: int) -> None:
        seen: Dict[str, str] = {}
        for decl in decls:
            for name in decl.names:
                if name in seen:
                    decl.where.fail(f"host name {name!r} is declared twice under "
                                    f"{parent or 'the tree'} (also by {seen[name]!r})")
                seen[name] = decl.key
        for decl in decls:
            layers = [_BUILTIN_LAYER, self.top_defaults]
            for profile, profile_where in decl.profiles:
                if profile not in self.profiles:
                    profile_where.fail(f"unknown profile {profile!r}; expected one of: "
                                       f"{', '.join(sorted(self.profiles)) or 'none defined'}")
                layers.append(self.profiles[profile])
            layers.extend(inherited)
            layers.append(decl.layer)
            values, wheres = _merge(layers)
            for name in decl.names:
                host_id = name if parent is None else f"{parent}/{name}"
                children = tuple(f"{host_id}/{child}" for c in decl.children for child in c.names)
                self.hosts.append(self._host(host_id, name, parent, depth, children,
                                             values, wheres, decl.where))
                if len(self.hosts) > MAX_HOSTS:
                    decl.where.fail(f"the topology has more than {MAX_HOSTS} hosts")
                self.resolve(decl.children, host_id, (*inherited, decl.defaults), depth + 1)

    def _host(self, host_id: str, name: str, parent: Optional[str], depth: int,
              children: Tuple[str, ...], values: Dict[str, Any], wheres: Dict[str, _Where],
              where: _Where) -> Host:
        def place(key: str) -> _Where:
            return wheres.get(key, where)

        image = self.images.get(values["image"])
        if image is None:
            place("image").fail(f"host {host_id!r}: unknown image {values['image']!r}; "
                                f"expected one of: {', '.join(sorted(self.images))}")
        python = values["python"] or image.python[0]
        if python not in image.python:
            place("python").fail(f"host {host_id!r}: image {image.name!r} offers "
                                 f"{', '.join(image.python)}, not {python!r}")
        accounts = self._accounts(host_id, values, where)
        return Host(
            id=host_id, name=name, parent=parent, role=values["role"], image=image,
            python=python, login=values["login"], accounts=accounts,
            link=Link(**values["link"]), resources=Resources(**values["resources"]),
            untrusted=values["untrusted"], children=children, depth=depth,
        )

    def _accounts(self, host_id: str, values: Dict[str, Any],
                  where: _Where) -> Tuple[Account, ...]:
        decls: Tuple[_AccountDecl, ...] = values["accounts"]
        by_name: Dict[str, _AccountDecl] = {}
        for decl in decls:
            first = by_name.get(decl.account.name)
            if first is not None:
                decl.where.fail(f"host {host_id!r}: account {decl.account.name!r} is declared "
                                f"twice (also at {_format_path(first.where.path)})")
            by_name[decl.account.name] = decl
            for key in decl.account.keys:
                if key not in self.keys:
                    decl.where.fail(f"host {host_id!r}: account {decl.account.name!r} uses "
                                    f"unknown key {key!r}; expected one of: "
                                    f"{', '.join(sorted(self.keys))}")
        login = by_name.get(values["login"])
        if login is None:
            where.fail(f"host {host_id!r}: login account {values['login']!r} is not among its "
                       f"accounts ({', '.join(by_name) or 'none'}); add it or set `login`")
        if login.account.sudo != "none":
            login.where.fail(f"host {host_id!r}: {login.account.name!r} is the login account, "
                             f"reached by ssh, so its `sudo` must be 'none'; to let it become "
                             f"root add an account {{name: root, sudo: nopasswd}}")
        for decl in decls:
            account = decl.account
            if account.sudo == "none" and not (account.keys or account.password):
                decl.where.fail(f"host {host_id!r}: account {account.name!r} has no sudo rule, "
                                f"no keys and no password, so nothing can reach it")
            if account.sudo == "password" and login.account.password is None:
                decl.where.fail(f"host {host_id!r}: sudo 'password' asks for the login user's "
                                f"own password, and login account {login.account.name!r} has "
                                f"no `password`")
        return tuple(decl.account for decl in decls)


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------


def _builtin_images() -> Dict[str, ImageSpec]:
    return {suite: ImageSpec(suite, suite, python) for suite, python in KNOWN_SUITES.items()}


def parse_topology(data: Any, source: str) -> Topology:
    """Check and resolve a topology document (the mapping a YAML file holds).

    ``source`` names the document in error messages, usually the file's path. Mappings read
    by :func:`load_topology` carry line numbers, which errors then include.
    """
    top = _Where(source, (), getattr(data, "line", None))
    if not isinstance(data, dict):
        _want(top, "a mapping at the top of the file", data)
    values, wheres = _check_fields(data, top, _TOP_FIELDS, required=("version", "tree"))
    network = Network(**values.get("network", {}))
    images = _builtin_images()
    images.update({name: ImageSpec(name, spec["suite"], tuple(spec["python"]))
                   for name, spec in values.get("images", {}).items()})
    keys = {"runner": KeySpec("runner")}
    keys.update({name: KeySpec(name, **spec) for name, spec in values.get("keys", {}).items()})
    decls = _host_decls(data["tree"], wheres["tree"], depth=0)
    if not decls:
        wheres["tree"].fail("expected at least one host")
    resolver = _Resolver(values.get("defaults", _Layer({}, {})),
                         values.get("profiles", {}), images, keys)
    resolver.resolve(decls, None, (), 0)
    schedules = _schedules(data["faults"], wheres["faults"]) if "faults" in data else []
    stem = os.path.splitext(os.path.basename(source))[0]
    topology = Topology(
        name=values.get("name", stem if _NAME_RE.fullmatch(stem) else "topology"),
        source=source, version=values["version"], seed=values.get("seed"), network=network,
        images=tuple(images.values()), keys=tuple(keys.values()), hosts=tuple(resolver.hosts),
        schedules=tuple(decl.schedule for decl in schedules),
    )
    _check_schedule_targets(topology, schedules)
    if "placement" in data:
        topology = dataclasses.replace(topology, placement=_placement(
            topology, data["placement"], wheres["placement"]))
    return topology


def _label_map(value: Any, where: _Where) -> Dict[str, str]:
    labels = _map_of(_string, _string)(value, where)
    if not labels:
        _want(where, "a non-empty mapping of node labels", value)
    return labels


_PLACEMENT_ENTRY: Mapping[str, Checker] = {"select": _selector, "node": _label_map}


def _placement(topology: Topology, value: Any, where: _Where) -> NodePlacement:
    """The ``placement`` section: a rule, and for ``labels`` selectors that must each match
    a host (typos fail here, as in ``faults``)."""
    values, wheres = _check_fields(value, where, {
        "rule": _one_of(*PLACEMENT_RULES), "depth": _integer,
        "labels": _list_of(_record(_PLACEMENT_ENTRY, required=("select", "node")),
                           non_empty=True)}, required=("rule",))
    rule = values["rule"]
    if "depth" in values and (rule != "subtree" or values["depth"] < 0):
        wheres["depth"].fail("depth is for rule 'subtree', and at least 0")
    if (rule == "labels") != ("labels" in values):
        (wheres.get("labels") or wheres["rule"]).fail(
            "rule 'labels' needs a `labels` list, and only it takes one")
    entries = []
    for index, entry in enumerate(values.get("labels", ())):
        if not topology.select(entry["select"]):
            wheres["labels"].item(value["labels"], index).fail(
                f"selector {entry['select']!r} matches no host")
        entries.append((entry["select"], types.MappingProxyType(dict(entry["node"]))))
    return NodePlacement(rule, values.get("depth", 1), tuple(entries))


def _schedules(value: Any, where: _Where) -> List[_ScheduleDecl]:
    if not isinstance(value, dict):
        _want(where, "a mapping of schedule names to schedules", value)
    decls = []
    for name, body in value.items():
        inner = where.key(value, name)
        _name(name, inner)
        decls.append(_schedule(name, body, inner))
    return decls


def _check_schedule_targets(topology: Topology, decls: Sequence[_ScheduleDecl]) -> None:
    """Every selector of every schedule must name at least one host: typos fail early."""
    for decl in decls:
        targets = decl.raw.get("targets") or {}
        for kind, selectors in targets.items():
            kind_where = decl.wheres["targets"].key(targets, kind)
            for index, selector in enumerate(selectors):
                if not topology.select(selector):
                    kind_where.item(selectors, index).fail(
                        f"selector {selector!r} matches no host")


def load_topology(path: Union[str, os.PathLike]) -> Topology:
    """Read and parse a topology YAML file; errors name the file and line."""
    source = os.fspath(path)
    with open(source, encoding="utf-8") as stream:
        text = stream.read()
    try:
        data = yaml.load(text, Loader=_MarkingLoader)  # a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = None if mark is None else mark.line + 1
        raise TopologyError(source, "", f"not valid YAML: {exc.problem or exc}", line) from None
    except yaml.YAMLError as exc:
        raise TopologyError(source, "", f"not valid YAML: {exc}") from None
    return parse_topology(data, source)
