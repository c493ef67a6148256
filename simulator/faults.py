"""Faults as values, schedules of faults, and the injector that always heals them.

A fault here says *what* goes wrong (``Partition("dc1/rack12", mode="drop")``); a backend says
*how* (iptables in a network namespace, ``docker pause``, a relay that resets a stream). Keeping
the two apart lets a test read as a list of events, lets a schedule be planned, printed and
replayed from a seed without touching a container, and lets each backend be swapped or faked.

Host faults name a host by its id (``"dc1/rack12/node12b"``); edge faults name the edge by the
host at its lower end, since in a tree every host has exactly one edge up to its parent (a root
host's edge is the one from the runner).

:class:`FaultInjector` is the only way tests should apply faults: it remembers what is applied,
heals on exit even when the test body raises, records every step with a monotonic timestamp,
and :meth:`FaultInjector.assert_healed` proves at teardown that nothing was left behind.
"""

from __future__ import annotations

import dataclasses
import random
import re
import signal as signal_module
import threading
import time
from contextlib import contextmanager
from typing import (
    Any,
    Callable,
    ClassVar,
    Dict,
    Iterator,
    List,
    Mapping,
    Optional,
    Protocol,
    Sequence,
    Tuple,
    Union,
)

from simulator.topology import (
    EDGE_FAULT_KINDS,
    FAULT_KINDS,
    FAULT_PARAMS,
    HOST_FAULT_KINDS,
    MAX_SCHEDULE_STEPS,
    FaultError,
    Schedule,
    Topology,
    convert_field,
    set_field,
)
from simulator.units import parse_duration, parse_fraction, parse_rate

__all__ = [
    "EDGE_FAULT_KINDS",
    "FAULT_KINDS",
    "FAULT_PARAMS",
    "HOST_FAULT_KINDS",
    "MAX_SCHEDULE_STEPS",
    "AppliedFault",
    "Bandwidth",
    "Fault",
    "FaultBackend",
    "FaultError",
    "FaultEvent",
    "FaultInjector",
    "FaultsNotHealed",
    "HealAll",
    "Kill",
    "Latency",
    "Loss",
    "Partition",
    "Pause",
    "Restart",
    "Schedule",
    "Signal",
    "SshdDown",
    "Step",
    "StreamFault",
    "describe_seeds",
    "format_plan",
    "make_fault",
    "plan",
    "run_plan",
]


class FaultsNotHealed(AssertionError):
    """Raised by :meth:`FaultInjector.assert_healed` when faults are still applied."""


# --------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------

_TARGET_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*(/[A-Za-z0-9][A-Za-z0-9_-]*)*")


def _check_target(cls_name: str, field: str, value: object) -> str:
    if not isinstance(value, str) or not _TARGET_RE.fullmatch(value):
        raise FaultError(f"{cls_name}.{field}: expected a host id like 'dc1/rack12/node12b', "
                         f"got {value!r}")
    return value


def _check_choice(cls_name: str, field: str, value: object, choices: Sequence[str]) -> str:
    if value not in choices:
        raise FaultError(f"{cls_name}.{field}: expected one of {', '.join(choices)}, "
                         f"got {value!r}")
    return value  # type: ignore[return-value]


def _signal_name(value: object) -> str:
    """Normalise 'STOP', 'SIGSTOP' or 19 to 'SIGSTOP', so plans print and compare the same."""
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            return signal_module.Signals(value).name
        except ValueError:
            pass
    elif isinstance(value, str):
        name = value.upper()
        name = name if name.startswith("SIG") else "SIG" + name
        if isinstance(getattr(signal_module, name, None), signal_module.Signals):
            return name
    raise FaultError(f"Signal.signal: expected a signal name like 'STOP' or 'SIGKILL' or a "
                     f"signal number, got {value!r}")


# --------------------------------------------------------------------------------------------
# Fault values
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Fault:
    """Base of every fault value.

    ``KIND`` is the name a schedule uses; ``SCOPE`` says whether the target is a host or an edge.
    """

    KIND: ClassVar[str] = ""
    SCOPE: ClassVar[str] = ""

    @property
    def target(self) -> str:
        """The host id this fault acts on (for edge faults: the host below the edge)."""
        return getattr(self, self.SCOPE)

    def params(self) -> Dict[str, Any]:
        """The fault's fields as plain data, for timelines and JSONL event logs."""
        return {"fault": self.KIND, **dataclasses.asdict(self)}


@dataclasses.dataclass(frozen=True)
class Kill(Fault):
    """Take a host down. Healing starts it again.

    ``crash`` is SIGKILL: the kernel closes its sockets, so peers see FIN/RST at once.
    ``power_off`` first cuts the host's edges, then kills it, so peers see only silence, like a
    pulled plug. ``stop`` is a graceful stop: SIGTERM, then SIGKILL after ``grace`` seconds.
    """

    host: str
    mode: str = "crash"
    grace: float = 10.0
    KIND: ClassVar[str] = "kill"
    SCOPE: ClassVar[str] = "host"
    MODES: ClassVar[Tuple[str, ...]] = ("crash", "power_off", "stop")

    def __post_init__(self) -> None:
        _check_target("Kill", "host", self.host)
        _check_choice("Kill", "mode", self.mode, self.MODES)
        set_field(self, "grace", convert_field("Kill", "grace", parse_duration, self.grace))


@dataclasses.dataclass(frozen=True)
class Restart(Fault):
    """Stop a host gracefully (``grace`` seconds before SIGKILL) and start it again."""

    host: str
    grace: float = 10.0
    KIND: ClassVar[str] = "restart"
    SCOPE: ClassVar[str] = "host"

    def __post_init__(self) -> None:
        _check_target("Restart", "host", self.host)
        set_field(self, "grace", convert_field("Restart", "grace", parse_duration, self.grace))


@dataclasses.dataclass(frozen=True)
class Pause(Fault):
    """Freeze every process of a host (cgroup freezer): TCP stays open, nothing answers."""

    host: str
    KIND: ClassVar[str] = "pause"
    SCOPE: ClassVar[str] = "host"

    def __post_init__(self) -> None:
        _check_target("Pause", "host", self.host)


@dataclasses.dataclass(frozen=True)
class Signal(Fault):
    """Send a signal to the remote processes whose command line matches ``process_match``.

    Aimed at one interpreter rather than a whole host: SIGSTOP freezes one context while its
    parent keeps running (healing sends SIGCONT); SIGKILL ends it as a crash would.
    """

    host: str
    process_match: str
    signal: Union[str, int] = "SIGSTOP"
    KIND: ClassVar[str] = "signal"
    SCOPE: ClassVar[str] = "host"

    def __post_init__(self) -> None:
        _check_target("Signal", "host", self.host)
        if not isinstance(self.process_match, str) or not self.process_match.strip():
            raise FaultError(f"Signal.process_match: expected a non-empty string to match "
                             f"against remote command lines, got {self.process_match!r}")
        set_field(self, "signal", _signal_name(self.signal))


@dataclasses.dataclass(frozen=True)
class SshdDown(Fault):
    """Stop the host's sshd while the host stays up: new logins fail, live sessions survive."""

    host: str
    KIND: ClassVar[str] = "sshd_down"
    SCOPE: ClassVar[str] = "host"

    def __post_init__(self) -> None:
        _check_target("SshdDown", "host", self.host)


@dataclasses.dataclass(frozen=True)
class Partition(Fault):
    """Cut the edge between a host and its parent.

    ``drop`` discards packets silently (detection needs keepalives), ``reset`` answers with TCP
    RST (peers fail at once), ``unplug`` removes the interface (ENETUNREACH on the host's side).
    ``direction`` makes the cut one-way: ``ingress`` drops traffic into the host, ``egress``
    traffic out of it. Unplugging is always both ways.
    """

    edge: str
    mode: str = "drop"
    direction: str = "both"
    KIND: ClassVar[str] = "partition"
    SCOPE: ClassVar[str] = "edge"
    MODES: ClassVar[Tuple[str, ...]] = ("drop", "reset", "unplug")
    DIRECTIONS: ClassVar[Tuple[str, ...]] = ("both", "ingress", "egress")

    def __post_init__(self) -> None:
        _check_target("Partition", "edge", self.edge)
        _check_choice("Partition", "mode", self.mode, self.MODES)
        _check_choice("Partition", "direction", self.direction, self.DIRECTIONS)
        if self.mode == "unplug" and self.direction != "both":
            raise FaultError(f"Partition.direction: an unplugged link is cut both ways; "
                             f"direction {self.direction!r} needs mode 'drop' or 'reset'")


@dataclasses.dataclass(frozen=True)
class Latency(Fault):
    """Delay traffic on an edge by ``delay`` seconds, varied by up to ``jitter`` seconds."""

    edge: str
    delay: float = 0.1
    jitter: float = 0.0
    KIND: ClassVar[str] = "latency"
    SCOPE: ClassVar[str] = "edge"

    def __post_init__(self) -> None:
        _check_target("Latency", "edge", self.edge)
        set_field(self, "delay", convert_field("Latency", "delay", parse_duration, self.delay))
        set_field(self, "jitter", convert_field("Latency", "jitter", parse_duration, self.jitter))
        if self.delay == 0 and self.jitter == 0:
            raise FaultError("Latency.delay: a latency fault needs a delay or a jitter above 0")
        if self.jitter > self.delay:
            raise FaultError(f"Latency.jitter: jitter ({self.jitter}s) larger than the delay "
                             f"({self.delay}s) would need negative delays")


@dataclasses.dataclass(frozen=True)
class Bandwidth(Fault):
    """Cap an edge to ``rate`` bits per second (accepts '1mbit' style strings)."""

    edge: str
    rate: int = 1_000_000
    KIND: ClassVar[str] = "bandwidth"
    SCOPE: ClassVar[str] = "edge"

    def __post_init__(self) -> None:
        _check_target("Bandwidth", "edge", self.edge)
        set_field(self, "rate", convert_field("Bandwidth", "rate", parse_rate, self.rate))


@dataclasses.dataclass(frozen=True)
class Loss(Fault):
    """Drop a ``fraction`` of packets on an edge at random (0.05 or '5%')."""

    edge: str
    fraction: float = 0.1
    KIND: ClassVar[str] = "loss"
    SCOPE: ClassVar[str] = "edge"

    def __post_init__(self) -> None:
        _check_target("Loss", "edge", self.edge)
        set_field(self, "fraction",
                  convert_field("Loss", "fraction", parse_fraction, self.fraction))
        if self.fraction == 0:
            raise FaultError("Loss.fraction: a loss fault needs a fraction above 0")


@dataclasses.dataclass(frozen=True)
class StreamFault(Fault):
    """Break the TCP streams crossing an edge at the byte level.

    ``reset`` closes them with RST, ``stall`` stops forwarding while keeping them open, and
    ``cut_after`` closes them after ``nbytes`` more bytes, usually in the middle of a frame.
    For ``reset`` and ``stall``, ``nbytes`` optionally lets that many bytes pass first.
    """

    edge: str
    kind: str = "reset"
    nbytes: Optional[int] = None
    KIND: ClassVar[str] = "stream"
    SCOPE: ClassVar[str] = "edge"
    KINDS: ClassVar[Tuple[str, ...]] = ("reset", "stall", "cut_after")

    def __post_init__(self) -> None:
        _check_target("StreamFault", "edge", self.edge)
        _check_choice("StreamFault", "kind", self.kind, self.KINDS)
        if self.nbytes is not None and (
                not isinstance(self.nbytes, int) or isinstance(self.nbytes, bool)
                or self.nbytes < 0):
            raise FaultError(f"StreamFault.nbytes: expected a byte count >= 0, "
                             f"got {self.nbytes!r}")
        if self.kind == "cut_after" and self.nbytes is None:
            raise FaultError("StreamFault.nbytes: kind 'cut_after' needs nbytes, the number "
                             "of bytes to let through before cutting")


@dataclasses.dataclass(frozen=True)
class HealAll:
    """The last step of every schedule: undo every fault still applied."""

    KIND: ClassVar[str] = "heal_all"

    def params(self) -> Dict[str, Any]:
        return {"fault": self.KIND}


# --------------------------------------------------------------------------------------------
# Kinds, as a schedule names them
# --------------------------------------------------------------------------------------------

_REQUIRED_PARAMS = {"signal": ("process",)}


def make_fault(kind: str, target: str, params: Optional[Mapping[str, Any]] = None) -> Fault:
    """Build the fault a schedule means by ``kind`` on ``target`` with ``params``."""
    params = dict(params or {})
    if kind not in FAULT_PARAMS:
        raise FaultError(f"unknown fault kind {kind!r}; expected one of {', '.join(FAULT_KINDS)}")
    unknown = sorted(set(params) - set(FAULT_PARAMS[kind]))
    if unknown:
        allowed = ", ".join(FAULT_PARAMS[kind]) or "none"
        raise FaultError(f"{kind}: unknown parameter {unknown[0]!r}; expected: {allowed}")
    missing = [name for name in _REQUIRED_PARAMS.get(kind, ()) if name not in params]
    if missing:
        raise FaultError(f"{kind}: parameter {missing[0]!r} is required")
    if kind in ("kill", "power_off", "stop"):
        return Kill(target, mode="crash" if kind == "kill" else kind, **params)
    if kind == "signal":
        return Signal(target, process_match=params["process"],
                      signal=params.get("signal", "SIGSTOP"))
    if kind == "stream":
        return StreamFault(target, kind=params.get("kind", "reset"),
                           nbytes=params.get("nbytes"))
    constructors: Dict[str, Callable[..., Fault]] = {
        "restart": Restart, "pause": Pause, "sshd_down": SshdDown, "partition": Partition,
        "latency": Latency, "bandwidth": Bandwidth, "loss": Loss,
    }
    return constructors[kind](target, **params)


# --------------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Step:
    """One planned fault: apply at ``start`` seconds after the plan begins, heal after
    ``duration`` seconds. The final step carries :class:`HealAll` and a duration of 0."""

    start: float
    duration: float
    fault: Union[Fault, HealAll]


def plan(schedule: Schedule, topology: Topology, seed: Optional[int] = None) -> List[Step]:
    """The timed steps of ``schedule`` on ``topology``, seeded by
    :meth:`~simulator.topology.Schedule.seed_for` (``seed`` is the command line's override).

    Pure and deterministic: no clock, no global RNG. Ends with a :class:`HealAll` step.
    """
    rng = random.Random(f"{schedule.name}:{schedule.seed_for(topology, seed)}")
    pools = {kind: schedule.candidates(topology, kind) for kind in schedule.pick}
    slack = schedule.interval - schedule.duration
    steps = []
    for slot in range(schedule.count):
        kind = rng.choice(schedule.pick)
        host = rng.choice(pools[kind])
        start = round(slot * schedule.interval + rng.uniform(0.0, slack), 3)
        fault = make_fault(kind, host.id, schedule.params.get(kind))
        steps.append(Step(start=start, duration=schedule.duration, fault=fault))
    steps.append(Step(start=round(schedule.count * schedule.interval, 3), duration=0.0,
                      fault=HealAll()))
    return steps


def describe_seeds(topology: Topology, override: Optional[int] = None) -> str:
    """The seeds a run uses, for headers and titles: ``ci=42`` per schedule, or the one seed
    when the topology has no schedule (``none`` when there is none at all)."""
    if not topology.schedules:
        chosen = override if override is not None else topology.seed
        return "none" if chosen is None else str(chosen)
    parts = []
    for schedule in topology.schedules:
        try:
            parts.append(f"{schedule.name}={schedule.seed_for(topology, override)}")
        except FaultError:
            parts.append(f"{schedule.name}=none")
    return ", ".join(parts)


def format_plan(steps: Sequence[Step]) -> List[str]:
    """One line per step, as ``python -m simulator check`` prints a schedule's plan."""
    return [f"{step.start:8.3f}s +{step.duration:g}s {step.fault!r}" for step in steps]


# --------------------------------------------------------------------------------------------
# Backends and the injector
# --------------------------------------------------------------------------------------------


class FaultBackend(Protocol):
    """What a backend offers the injector. ``apply`` returns an opaque handle for ``heal``.

    ``heal_all`` must undo everything this backend applied, including faults whose handle was
    lost (a crashed test, an exception between apply and record), so it works from the
    backend's own state (iptables chains it owns, containers it paused), not from handles.
    """

    def apply(self, fault: Fault) -> object: ...

    def heal(self, handle: object) -> None: ...

    def heal_all(self) -> None: ...


@dataclasses.dataclass(frozen=True)
class FaultEvent:
    """One entry of the fault timeline. ``time`` comes from a monotonic clock."""

    time: float
    action: str  # apply | heal | heal_all | apply_failed | heal_failed
    fault: Union[Fault, HealAll, None]
    error: Optional[str] = None

    def to_dict(self) -> Dict[str, Any]:
        """Plain data, for a JSONL timeline."""
        fault = self.fault.params() if self.fault is not None else None
        return {"time": self.time, "action": self.action, "fault": fault, "error": self.error}


@dataclasses.dataclass(frozen=True, eq=False)
class AppliedFault:
    """The injector's receipt for one applied fault; pass it to :meth:`FaultInjector.heal`."""

    fault: Fault
    handle: object
    seq: int


class _Waiter(Protocol):
    def wait(self, timeout: Optional[float] = None) -> bool: ...

    def is_set(self) -> bool: ...


class FaultInjector:
    """Apply faults through a backend, remember them, and heal them no matter what.

    Use it as a context manager (``with FaultInjector(backend) as faults:``): leaving the block
    heals everything, whether the block returned or raised. ``on_event`` receives every
    :class:`FaultEvent` as it happens; ``events`` keeps them all. Thread-safe, so a schedule
    thread and a test body can share one injector.
    """

    def __init__(self, backend: FaultBackend,
                 on_event: Optional[Callable[[FaultEvent], None]] = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._backend = backend
        self._on_event = on_event
        self._clock = clock
        self._lock = threading.RLock()
        self._active: List[AppliedFault] = []
        self._seq = 0
        self.events: List[FaultEvent] = []

    def __enter__(self) -> FaultInjector:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.heal_all()

    @property
    def active(self) -> Tuple[Fault, ...]:
        """The faults applied and not yet healed, oldest first."""
        with self._lock:
            return tuple(applied.fault for applied in self._active)

    def _record(self, action: str, fault: Union[Fault, HealAll, None],
                error: Optional[BaseException] = None) -> None:
        event = FaultEvent(self._clock(), action, fault,
                           None if error is None else f"{type(error).__name__}: {error}")
        self.events.append(event)
        if self._on_event is not None:
            self._on_event(event)

    def apply(self, fault: Fault) -> AppliedFault:
        """Apply ``fault`` now; keep the receipt to heal it, or let the injector do it."""
        if not isinstance(fault, Fault):
            raise FaultError(f"apply: expected a Fault, got {fault!r}")
        with self._lock:
            try:
                handle = self._backend.apply(fault)
            except BaseException as exc:
                self._record("apply_failed", fault, exc)
                raise
            self._seq += 1
            applied = AppliedFault(fault, handle, self._seq)
            self._active.append(applied)
            self._record("apply", fault)
            return applied

    def heal(self, applied: AppliedFault) -> None:
        """Undo one applied fault. Healing a fault twice is an error: it hides bookkeeping bugs."""
        with self._lock:
            if applied not in self._active:
                raise FaultError(f"heal: {applied.fault!r} is not applied (healed already?)")
            try:
                self._backend.heal(applied.handle)
            except BaseException as exc:
                self._record("heal_failed", applied.fault, exc)
                raise
            self._active.remove(applied)
            self._record("heal", applied.fault)

    def is_applied(self, applied: AppliedFault) -> bool:
        with self._lock:
            return applied in self._active

    @contextmanager
    def applied(self, fault: Fault) -> Iterator[AppliedFault]:
        """Apply ``fault`` for the duration of a ``with`` block, healing on any exit."""
        receipt = self.apply(fault)
        try:
            yield receipt
        finally:
            if self.is_applied(receipt):
                self.heal(receipt)

    def heal_all(self) -> None:
        """Heal every applied fault (newest first), then let the backend sweep its own state.

        Keeps going when one heal fails, so one broken rule does not leave the others in
        place; the first failure is raised at the end.
        """
        with self._lock:
            failures: List[BaseException] = []
            for applied in reversed(list(self._active)):
                try:
                    self.heal(applied)
                except Exception as exc:
                    failures.append(exc)
            try:
                self._backend.heal_all()
            except Exception as exc:
                self._record("heal_failed", HealAll(), exc)
                failures.append(exc)
            else:
                self._record("heal_all", HealAll())
            if failures:
                raise FaultError(f"heal_all: {len(failures)} heal(s) failed; first: "
                                 f"{failures[0]}") from failures[0]

    def assert_healed(self) -> None:
        """Raise :class:`FaultsNotHealed` naming every fault still applied."""
        still = self.active
        if still:
            raise FaultsNotHealed(f"{len(still)} fault(s) still applied: "
                                  + ", ".join(repr(fault) for fault in still))


def _wait_until(stop: _Waiter, clock: Callable[[], float], deadline: float) -> bool:
    """Wait until ``deadline`` on ``clock``; True means a stop was requested instead."""
    remaining = deadline - clock()
    if remaining > 0:
        return stop.wait(remaining)
    return stop.is_set()


def run_plan(injector: FaultInjector, steps: Sequence[Step], *,
             stop: Optional[_Waiter] = None,
             clock: Callable[[], float] = time.monotonic) -> int:
    """Run ``steps`` in time through ``injector``; always heal everything at the end.

    ``stop`` is a :class:`threading.Event` (or anything with ``wait``/``is_set``): setting it
    ends the run early, still healing. Returns the number of faults that were applied.
    """
    stop = stop if stop is not None else threading.Event()
    began = clock()
    applied_count = 0
    try:
        for step in steps:
            if isinstance(step.fault, HealAll) or _wait_until(stop, clock, began + step.start):
                break
            with injector.applied(step.fault):
                applied_count += 1
                stopped = _wait_until(stop, clock, began + step.start + step.duration)
            if stopped:
                break
    finally:
        injector.heal_all()
    return applied_count
