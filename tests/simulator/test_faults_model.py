"""Faults as data, seeded schedules, the always-healing injector, and the backend interface."""

from __future__ import annotations

import itertools
import pathlib
import threading
import time

import pytest

import simulator.backend as backend_module
import simulator.faults as faults_module
from simulator.backend import Backend, BackendError, ConnectSpec, resolve_plan
from simulator.faults import (
    EDGE_FAULT_KINDS,
    FAULT_KINDS,
    HOST_FAULT_KINDS,
    MAX_SCHEDULE_STEPS,
    Bandwidth,
    Fault,
    FaultError,
    FaultInjector,
    FaultsNotHealed,
    HealAll,
    Kill,
    Latency,
    Loss,
    Partition,
    Pause,
    Restart,
    Schedule,
    Signal,
    SshdDown,
    StreamFault,
    make_fault,
    plan,
    run_plan,
)
from simulator.topology import load_topology, parse_topology

REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dc():
    return load_topology(REPO / "topologies" / "dc.yml")


@pytest.fixture(scope="module")
def large():
    return load_topology(REPO / "topologies" / "large.yml")


# --------------------------------------------------------------------------------------------
# Fault values
# --------------------------------------------------------------------------------------------


def test_faults_normalise_their_units():
    assert Latency("dc1", "200ms", jitter="20ms") == Latency("dc1", 0.2, 0.02)
    assert Bandwidth("dc1", "1mbit").rate == 1_000_000
    assert Loss("dc1", "5%").fraction == pytest.approx(0.05)
    assert Loss("dc1", 0.05).fraction == pytest.approx(0.05)
    assert Kill("n", mode="stop", grace="3s").grace == 3.0
    assert Restart("n", grace=1).grace == 1.0


@pytest.mark.parametrize(("given", "name"), [
    ("STOP", "SIGSTOP"), ("sigcont", "SIGCONT"), ("SIGKILL", "SIGKILL"), (15, "SIGTERM")])
def test_signals_are_normalised_to_names(given, name):
    assert Signal("n", "python", given).signal == name


@pytest.mark.parametrize(("build", "expected"), [
    (lambda: Kill("n", mode="explode"), "Kill.mode: expected one of crash, power_off, stop"),
    (lambda: Kill("", mode="crash"), "Kill.host: expected a host id"),
    (lambda: Kill("a//b"), "Kill.host: expected a host id"),
    (lambda: Pause(None), "Pause.host: expected a host id"),
    (lambda: SshdDown("has space"), "SshdDown.host"),
    (lambda: Signal("n", "", "STOP"), "Signal.process_match: expected a non-empty string"),
    (lambda: Signal("n", "python", "SIGNOPE"), "Signal.signal: expected a signal name"),
    (lambda: Signal("n", "python", 999), "Signal.signal"),
    (lambda: Partition("e", mode="cut"), "Partition.mode: expected one of drop, reset, unplug"),
    (lambda: Partition("e", direction="up"), "Partition.direction: expected one of both"),
    (lambda: Partition("e", mode="unplug", direction="ingress"), "cut both ways"),
    (lambda: Latency("e", "fast"), "Latency.delay: expected a duration"),
    (lambda: Latency("e", 0), "needs a delay or a jitter above 0"),
    (lambda: Latency("e", "10ms", "20ms"), "Latency.jitter: jitter (0.02s) larger"),
    (lambda: Bandwidth("e", "1mbps"), "Bandwidth.rate: expected a rate"),
    (lambda: Loss("e", "150%"), "Loss.fraction: expected a percentage between"),
    (lambda: Loss("e", 0), "Loss.fraction: a loss fault needs a fraction above 0"),
    (lambda: StreamFault("e", kind="melt"), "StreamFault.kind: expected one of reset"),
    (lambda: StreamFault("e", kind="cut_after"), "StreamFault.nbytes: kind 'cut_after' needs"),
    (lambda: StreamFault("e", kind="reset", nbytes=-1), "StreamFault.nbytes: expected a byte"),
    (lambda: Restart("n", grace="soon"), "Restart.grace"),
])
def test_bad_fault_arguments_are_explained(build, expected):
    with pytest.raises(FaultError) as info:
        build()
    assert expected in str(info.value)


def test_faults_are_frozen_and_hashable():
    fault = Partition("bastion/dc1", mode="reset", direction="egress")
    with pytest.raises(AttributeError):
        fault.mode = "drop"  # type: ignore[misc]
    assert len({fault, Partition("bastion/dc1", mode="reset", direction="egress")}) == 1
    assert fault.target == "bastion/dc1"
    assert fault.params() == {"fault": "partition", "edge": "bastion/dc1", "mode": "reset",
                              "direction": "egress"}
    assert StreamFault("e", kind="stall", nbytes=10).params()["kind"] == "stall"


@pytest.mark.parametrize(("kind", "params", "expected"), [
    ("kill", {}, Kill("h", mode="crash")),
    ("power_off", {}, Kill("h", mode="power_off")),
    ("stop", {"grace": 2.0}, Kill("h", mode="stop", grace=2.0)),
    ("restart", {}, Restart("h")),
    ("pause", {}, Pause("h")),
    ("signal", {"process": "python", "signal": "KILL"}, Signal("h", "python", "SIGKILL")),
    ("sshd_down", {}, SshdDown("h")),
    ("partition", {"mode": "unplug"}, Partition("h", mode="unplug")),
    ("latency", {"delay": 0.05}, Latency("h", 0.05)),
    ("bandwidth", {"rate": 512_000}, Bandwidth("h", 512_000)),
    ("loss", {"fraction": 0.2}, Loss("h", 0.2)),
    ("stream", {"kind": "cut_after", "nbytes": 7}, StreamFault("h", kind="cut_after", nbytes=7)),
])
def test_make_fault_maps_schedule_kinds_to_faults(kind, params, expected):
    fault = make_fault(kind, "h", params)
    assert fault == expected
    assert (kind in HOST_FAULT_KINDS) == (fault.SCOPE == "host")
    assert (kind in EDGE_FAULT_KINDS) == (fault.SCOPE == "edge")


def test_every_kind_is_either_a_host_or_an_edge_fault():
    assert sorted(HOST_FAULT_KINDS + EDGE_FAULT_KINDS) == sorted(FAULT_KINDS)


@pytest.mark.parametrize(("kind", "params", "expected"), [
    ("melt", {}, "unknown fault kind 'melt'"),
    ("kill", {"grace": 1}, "kill: unknown parameter 'grace'; expected: none"),
    ("latency", {"speed": 1}, "expected: delay, jitter"),
    ("signal", {}, "signal: parameter 'process' is required"),
])
def test_make_fault_rejects_bad_kinds_and_params(kind, params, expected):
    with pytest.raises(FaultError, match=expected):
        make_fault(kind, "h", params)


# --------------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------------


def test_same_seed_same_plan_and_different_seed_different_plan(dc):
    ci = dc.schedule("ci")
    first = plan(ci, dc)
    assert first == plan(ci, dc)
    assert first == plan(ci, dc, seed=ci.seed)
    assert first != plan(ci, dc, seed=ci.seed + 1)
    plans = {tuple(plan(ci, dc, seed=seed)) for seed in range(20)}
    assert len(plans) == 20


def test_plans_end_with_heal_all_and_respect_the_schedule(dc):
    ci = dc.schedule("ci")
    steps = plan(ci, dc, seed=99)
    assert len(steps) == ci.count + 1
    last = steps[-1]
    assert isinstance(last.fault, HealAll)
    assert (last.start, last.duration) == (ci.count * ci.interval, 0.0)
    allowed = {kind: {h.id for h in ci.candidates(dc, kind)} for kind in ci.pick}
    for slot, step in enumerate(steps[:-1]):
        assert step.fault.KIND in ("kill", "partition", "pause", "latency")
        kind = step.fault.KIND if not isinstance(step.fault, Kill) else "kill"
        assert step.fault.target in allowed[kind]
        assert slot * ci.interval <= step.start
        assert step.start + step.duration <= (slot + 1) * ci.interval + 1e-9
        if isinstance(step.fault, Latency):
            assert (step.fault.delay, step.fault.jitter) == (0.2, 0.02)


def test_candidates_follow_the_targets(dc):
    ci = dc.schedule("ci")
    assert [h.id for h in ci.candidates(dc, "kill")] == [
        "bastion/dc1/rack12/node12b", "bastion/dc2/rack22/node22a"]
    assert [h.id for h in ci.candidates(dc, "partition")] == [
        "bastion/dc1", "bastion/dc2", "bastion/dc2/rack22", "bastion/dc2/rack22/node22a"]
    assert len(ci.candidates(dc, "latency")) == len(dc.hosts)  # no targets: every edge


def test_large_schedule_uses_every_kind_it_picks(large):
    soak = large.schedule("soak")
    kinds = {step.fault.KIND for seed in range(5) for step in plan(soak, large, seed=seed)}
    assert {"kill", "partition", "pause", "latency", "loss", "bandwidth", "stream",
            "sshd_down", "heal_all"} <= kinds


def test_seed_precedence_argument_then_schedule_then_topology():
    data = {"version": 1, "seed": 5, "tree": {"a": None, "b": None, "c": None},
            "faults": {"own": {"seed": 6, "interval": "2s", "duration": "1s", "count": 8,
                               "pick": ["kill", "pause"]},
                       "inherits": {"interval": "2s", "duration": "1s", "count": 8,
                                    "pick": ["kill", "pause"]}}}
    topology = parse_topology(data, "seeds.yml")
    own, inherits = topology.schedule("own"), topology.schedule("inherits")
    assert plan(own, topology) == plan(own, topology, seed=6) != plan(own, topology, seed=5)
    assert plan(inherits, topology) == plan(inherits, topology, seed=5)
    del data["seed"]
    unseeded = parse_topology(data, "seeds.yml")
    with pytest.raises(FaultError, match="no seed"):
        plan(unseeded.schedule("inherits"), unseeded)


def test_unmatched_selectors_fail_at_plan_time_for_python_built_schedules(dc):
    schedule = Schedule("s", "2s", "1s", pick=("kill",), targets={"kill": ["role:ghost"]})
    with pytest.raises(FaultError, match="'role:ghost' matches no host"):
        plan(schedule, dc, seed=1)


@pytest.mark.parametrize(("kwargs", "expected"), [
    ({"duration": "3s"}, "exceeds interval"),
    ({"interval": 0}, "must be above 0"),
    ({"count": 0}, f"count: expected 1..{MAX_SCHEDULE_STEPS}"),
    ({"count": MAX_SCHEDULE_STEPS + 1}, f"count: expected 1..{MAX_SCHEDULE_STEPS}"),
    ({"pick": ()}, "pick: expected a non-empty list"),
    ({"pick": ("melt",)}, "unknown fault kind 'melt'"),
    ({"targets": {"pause": ["role:x"]}}, "targets: 'pause' is not in pick"),
    ({"targets": {"kill": ["edge:x"]}}, "'kill' acts on hosts, but 'edge:x' selects edges"),
    ({"targets": {"kill": ["colour:x"]}}, "unknown selector prefix 'colour'"),
    ({"params": {"kill": {"grace": 1}}}, "params.kill: unknown parameter 'grace'"),
    ({"final": "party"}, "the only final step is 'heal'"),
    ({"seed": "abc"}, "seed: expected an integer"),
])
def test_bad_schedules_are_explained(kwargs, expected):
    arguments = {"name": "s", "interval": "2s", "duration": "1s", "pick": ("kill",), **kwargs}
    with pytest.raises(FaultError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        Schedule(**arguments)


def test_plans_are_bounded():
    schedule = Schedule("s", "1s", "1s", pick=("pause",), count=MAX_SCHEDULE_STEPS)
    topology = parse_topology({"version": 1, "tree": {"h": None}}, "one.yml")
    assert len(plan(schedule, topology, seed=1)) == MAX_SCHEDULE_STEPS + 1


# --------------------------------------------------------------------------------------------
# The injector, with an in-memory backend
# --------------------------------------------------------------------------------------------


class FakeBackend:
    """Keeps applied faults in a dict; can be told to fail on given faults."""

    def __init__(self, fail_apply=(), fail_heal=()):
        self.applied: dict[int, Fault] = {}
        self.calls: list[tuple] = []
        self._handles = itertools.count(1)
        self.fail_apply = set(fail_apply)
        self.fail_heal = set(fail_heal)

    def apply(self, fault):
        self.calls.append(("apply", fault))
        if fault in self.fail_apply:
            raise BackendError(f"cannot apply {fault!r}")
        handle = next(self._handles)
        self.applied[handle] = fault
        return handle

    def heal(self, handle):
        self.calls.append(("heal", self.applied[handle]))
        if self.applied[handle] in self.fail_heal:
            raise BackendError(f"cannot heal {self.applied[handle]!r}")
        del self.applied[handle]

    def heal_all(self):
        self.calls.append(("heal_all",))
        self.applied.clear()


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


PAUSE = Pause("bastion/dc1/rack12")
CUT = Partition("bastion/dc1", mode="reset")


def test_applied_heals_on_normal_exit_and_records_events():
    backend, seen = FakeBackend(), []
    injector = FaultInjector(backend, on_event=seen.append)
    with injector.applied(PAUSE) as receipt:
        assert receipt.fault is PAUSE
        assert list(backend.applied.values()) == [PAUSE]
        assert injector.active == (PAUSE,)
    assert backend.applied == {}
    assert injector.active == ()
    assert [(e.action, e.fault) for e in injector.events] == [("apply", PAUSE), ("heal", PAUSE)]
    assert seen == injector.events
    assert [e.time for e in injector.events] == sorted(e.time for e in injector.events)
    injector.assert_healed()


def test_applied_heals_when_the_body_raises():
    backend = FakeBackend()
    injector = FaultInjector(backend)
    with pytest.raises(RuntimeError, match="test body failed"), injector.applied(CUT):
        raise RuntimeError("test body failed")
    assert backend.applied == {}
    assert [e.action for e in injector.events] == ["apply", "heal"]
    injector.assert_healed()


def test_event_times_come_from_the_injected_monotonic_clock():
    clock, backend = FakeClock(), FakeBackend()
    injector = FaultInjector(backend, clock=clock)
    receipt = injector.apply(PAUSE)
    clock.advance(2.5)
    injector.heal(receipt)
    assert [(e.action, e.time) for e in injector.events] == [("apply", 100.0), ("heal", 102.5)]
    record = injector.events[0].to_dict()
    assert record == {"time": 100.0, "action": "apply", "error": None,
                      "fault": {"fault": "pause", "host": "bastion/dc1/rack12"}}


def test_the_injector_context_heals_everything_even_on_error():
    backend = FakeBackend()
    with pytest.raises(ValueError, match="boom"), FaultInjector(backend) as injector:
        injector.apply(PAUSE)
        injector.apply(CUT)
        raise ValueError("boom")
    assert backend.applied == {}
    assert injector.active == ()
    # Newest first, then the backend's own sweep.
    assert backend.calls[-3:] == [("heal", CUT), ("heal", PAUSE), ("heal_all",)]
    assert injector.events[-1].action == "heal_all"


def test_assert_healed_names_what_is_left():
    injector = FaultInjector(FakeBackend())
    receipt = injector.apply(CUT)
    with pytest.raises(FaultsNotHealed, match=r"1 fault\(s\) still applied: Partition"):
        injector.assert_healed()
    injector.heal(receipt)
    injector.assert_healed()


def test_healing_twice_is_an_error():
    injector = FaultInjector(FakeBackend())
    receipt = injector.apply(PAUSE)
    injector.heal(receipt)
    with pytest.raises(FaultError, match="is not applied"):
        injector.heal(receipt)


def test_manual_heal_inside_applied_block_is_not_repeated():
    backend = FakeBackend()
    injector = FaultInjector(backend)
    with injector.applied(PAUSE) as receipt:
        injector.heal(receipt)
    assert [call[0] for call in backend.calls] == ["apply", "heal"]


def test_a_failed_apply_is_recorded_and_leaves_nothing_applied():
    injector = FaultInjector(FakeBackend(fail_apply={CUT}))
    with pytest.raises(BackendError, match="cannot apply"):
        injector.apply(CUT)
    assert injector.active == ()
    assert injector.events[-1].action == "apply_failed"
    assert "BackendError: cannot apply" in injector.events[-1].error


def test_heal_all_keeps_going_after_a_failed_heal():
    backend = FakeBackend(fail_heal={PAUSE})
    injector = FaultInjector(backend)
    injector.apply(PAUSE)
    injector.apply(CUT)
    with pytest.raises(FaultError, match=r"1 heal\(s\) failed"):
        injector.heal_all()
    actions = [(e.action, e.fault) for e in injector.events]
    assert ("heal", CUT) in actions and ("heal_failed", PAUSE) in actions
    assert actions[-1] == ("heal_all", HealAll())
    assert backend.applied == {}  # the backend's sweep still ran
    assert injector.active == (PAUSE,)  # and the injector says what it could not confirm


def test_apply_rejects_non_faults():
    with pytest.raises(FaultError, match="expected a Fault"):
        FaultInjector(FakeBackend()).apply("pause bastion")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# Running a plan
# --------------------------------------------------------------------------------------------


class FakeStop:
    """Stands in for threading.Event: waiting advances the fake clock instead of sleeping."""

    def __init__(self, clock, stop_after_waits=None):
        self.clock = clock
        self.waits = []
        self.stop_after_waits = stop_after_waits

    def wait(self, timeout=None):
        self.waits.append(timeout)
        self.clock.advance(timeout)
        return self.is_set()

    def is_set(self):
        return self.stop_after_waits is not None and len(self.waits) >= self.stop_after_waits


def test_run_plan_applies_each_step_in_time_and_heals_all(dc):
    clock, backend = FakeClock(), FakeBackend()
    injector = FaultInjector(backend, clock=clock)
    steps = plan(dc.schedule("ci"), dc)
    count = run_plan(injector, steps, stop=FakeStop(clock), clock=clock)
    assert count == len(steps) - 1
    applies = [e for e in injector.events if e.action == "apply"]
    heals = [e for e in injector.events if e.action == "heal"]
    assert [e.fault for e in applies] == [step.fault for step in steps[:-1]]
    for event, step in zip(applies, steps):
        assert event.time == pytest.approx(100.0 + step.start)
    for event, step in zip(heals, steps):
        assert event.time == pytest.approx(100.0 + step.start + step.duration)
    assert injector.events[-1].action == "heal_all"
    injector.assert_healed()
    assert backend.applied == {}


def test_run_plan_stops_early_and_still_heals(dc):
    clock, backend = FakeClock(), FakeBackend()
    injector = FaultInjector(backend, clock=clock)
    steps = plan(dc.schedule("ci"), dc)
    # Waits alternate: until a start, then until its end. Stop during the second fault.
    count = run_plan(injector, steps, stop=FakeStop(clock, stop_after_waits=4), clock=clock)
    assert count == 2
    assert [e.action for e in injector.events] == [
        "apply", "heal", "apply", "heal", "heal_all"]
    injector.assert_healed()


def test_run_plan_heals_when_the_backend_fails_mid_plan(dc):
    clock = FakeClock()
    steps = plan(dc.schedule("ci"), dc)
    backend = FakeBackend(fail_apply={steps[2].fault})
    injector = FaultInjector(backend, clock=clock)
    with pytest.raises(BackendError):
        run_plan(injector, steps, stop=FakeStop(clock), clock=clock)
    assert injector.events[-1].action == "heal_all"
    assert backend.applied == {}


def test_run_plan_in_real_time_with_an_event():
    topology = parse_topology({"version": 1, "tree": {"h": None}}, "one.yml")
    steps = plan(Schedule("quick", "20ms", "10ms", pick=("pause",), count=2), topology, seed=3)
    backend = FakeBackend()
    injector = FaultInjector(backend)
    began = time.monotonic()
    assert run_plan(injector, steps, stop=threading.Event()) == 2
    assert time.monotonic() - began >= steps[-2].start + steps[-2].duration - 0.001
    times = [e.time for e in injector.events]
    assert times == sorted(times)
    injector.assert_healed()


# --------------------------------------------------------------------------------------------
# The backend interface
# --------------------------------------------------------------------------------------------


class MemoryBackend(Backend):
    """The smallest complete backend: proves the interface can be implemented as written."""

    name = "memory"

    def __init__(self):
        self.topology = None
        self.faults = FakeBackend()
        self.state = {}

    def create(self, topology):
        self.topology = topology
        self.state = {host.id: "running" for host in topology.walk()}

    def destroy(self):
        self.state.clear()

    def capabilities(self):
        return frozenset(FAULT_KINDS)

    def placement(self, host):
        return backend_module.Placement(host=host, where=f"memory:{host}")

    def connect_spec(self, host, account=None):
        hops = self.topology.context_plan()[(host, account)]
        return ConnectSpec(hops[-1].method, {**hops[-1].kwargs, "port": 2222})

    def start(self, host):
        self.state[host] = "running"

    def stop(self, host, grace=10.0):
        self.state[host] = "stopped"

    def kill(self, host, signal="SIGKILL"):
        self.state[host] = "stopped"

    def pause(self, host):
        self.state[host] = "paused"

    def unpause(self, host):
        self.state[host] = "running"

    def exec(self, host, argv, user=None, timeout=30.0):
        return backend_module.ExecResult(0, " ".join(argv).encode(), b"")

    def processes(self, host):
        return (backend_module.ProcessInfo(1, "root", "sshd"),)

    def apply(self, fault):
        return self.faults.apply(fault)

    def heal(self, handle):
        self.faults.heal(handle)

    def heal_all(self):
        self.faults.heal_all()


def test_an_incomplete_backend_cannot_be_instantiated():
    class Partial(Backend):
        def create(self, topology):
            pass

    with pytest.raises(TypeError, match="abstract"):
        Partial()  # type: ignore[abstract]


def test_a_backend_drives_the_injector_and_resolves_plans(dc):
    backend = MemoryBackend()
    backend.create(dc)
    with FaultInjector(backend) as injector, injector.applied(Pause("bastion/dc2")):
        assert list(backend.faults.applied.values()) == [Pause("bastion/dc2")]
    assert backend.faults.applied == {}
    hops = dc.context_plan()[("bastion/dc1/rack12/node12b", "webapp")]
    specs = resolve_plan(hops, backend)
    assert [spec.method for spec in specs] == [hop.method for hop in hops]
    assert all(spec.kwargs["port"] == 2222 for spec in specs)
    assert specs[-1].kwargs["username"] == "webapp"
    assert "***" in repr(specs[-1]) and "sim-login-pw" not in repr(specs[-1])
    backend.destroy()


def test_public_names_exist():
    for module in (faults_module, backend_module):
        for name in module.__all__:
            assert hasattr(module, name), f"{module.__name__}.{name}"
