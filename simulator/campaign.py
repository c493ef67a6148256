"""Fault campaigns: many runs of generated fault schedules over a tree under load, each checked.

A campaign of ``runs`` runs from one ``seed``: run ``k`` draws its fault schedule (and, with a
:class:`~simulator.strategies.TreeShape`, its tree) from ``campaign:<seed>:<k>``, so any run
can be replayed alone. One run (:func:`execute`):

1. builds the tree on the local backend, with the campaign probes in every context
   (:mod:`simulator.workload`) and an environment token in every process it starts;
2. keeps the workload (calls, holds, imports, channels) going over every path while the
   schedule's faults are applied and healed on time, overlapping;
3. heals everything, stops the load, sends every op type to every host and account once
   more, collects each context's route log, shuts the tree down and looks for any process
   that still carries the token;
4. checks the history (:func:`simulator.checker.check`).

A run with violations is shrunk (:func:`shrink`): smaller schedules (none at all, each fault
alone, all but one) are run again, and the smallest that still breaks one of the same
invariants is reported with the seed, its schedule (``schedule.json``, which ``--replay``
takes), the history (JSONL) and the timeline picture with the violations marked
(:func:`write_finding`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import heapq
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import yaml

from simulator.checker import Violation, check, summarise_run
from simulator.faults import AppliedFault, FaultInjector
from simulator.history import Bounds, History
from simulator.strategies import (
    CAMPAIGN_KINDS,
    FaultMix,
    PlannedFault,
    RandomDraw,
    TreeShape,
    fault_schedule,
    tree_document,
)
from simulator.timeline import Timeline
from simulator.topology import Topology, load_topology, parse_topology
from simulator.workload import ContextHook, Workload

__all__ = [
    "ENV_TOKEN",
    "REPLAY_FORMAT",
    "CampaignError",
    "CampaignSettings",
    "Finding",
    "RunPlan",
    "RunResult",
    "command",
    "execute",
    "load_replay",
    "picture",
    "picture_events",
    "plan_run",
    "run_and_report",
    "settings_from",
    "shrink",
    "supported_kinds",
    "write_finding",
]

#: Every process a run starts carries ``ENV_TOKEN=<the run's token>`` in its environment, so a
#: process of the tree that escaped (a daemon, a reparented child) is still found after it.
ENV_TOKEN = "MITOGEN_SIM_CAMPAIGN"
REPLAY_FORMAT = "mitogen-sim-campaign/1"


class CampaignError(RuntimeError):
    """A run could not be carried out (the tree did not come up, a bad replay file...):
    not a violation of the runtime's invariants, but no verdict either."""


@dataclasses.dataclass(frozen=True)
class CampaignSettings:
    """How a campaign runs. ``shape`` set: every run draws its own tree (random shapes);
    None: every run uses the topology given."""

    seed: int
    runs: int = 1
    shape: Optional[TreeShape] = None
    kinds: Tuple[str, ...] = CAMPAIGN_KINDS
    faults: Tuple[int, int] = (1, 6)
    horizon: float = 10.0
    duration: Tuple[float, float] = (0.5, 5.0)
    shrink_runs: int = 6
    out_dir: str = os.path.join(".sim", "campaign")
    workers: int = 4
    pace: float = 0.05
    hold: Tuple[float, float] = (0.2, 1.5)
    immediate: float = 2.0
    healthy: float = 10.0
    shutdown: float = 5.0

    def bounds(self, topology: Topology) -> Bounds:
        net = topology.network
        return Bounds.for_keepalive(net.keepalive_interval, net.keepalive_count,
                                    immediate=self.immediate, healthy=self.healthy,
                                    shutdown=self.shutdown)

    def workload_options(self) -> Dict[str, Any]:
        """The settings a replay needs to run the same load (shape and seed travel apart)."""
        return {"workers": self.workers, "pace": self.pace, "hold": list(self.hold),
                "horizon": self.horizon,
                "immediate": self.immediate, "healthy": self.healthy,
                "shutdown": self.shutdown}


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """One run: its tree (and the YAML text that makes it), its schedule, where it came from."""

    seed: int
    run: int
    topology: Topology
    topology_text: str
    steps: Tuple[PlannedFault, ...]

    @property
    def label(self) -> str:
        return f"seed {self.seed} run {self.run}"

    def with_steps(self, steps: Sequence[PlannedFault]) -> RunPlan:
        return dataclasses.replace(self, steps=tuple(steps))


@dataclasses.dataclass
class RunResult:
    """A run's history and verdict."""

    plan: RunPlan
    events: List[Dict[str, Any]]
    violations: List[Violation]
    directory: str
    seconds: float

    @property
    def history_path(self) -> str:
        return os.path.join(self.directory, "history.jsonl")

    def summary(self) -> str:
        counts = summarise_run(self.events)
        ops = ", ".join(f"{n} {outcome}" for outcome, n in sorted(counts["ops"].items()))
        verdict = (f"{len(self.violations)} violation(s)" if self.violations else "ok")
        return (f"{self.plan.label}: {self.plan.topology.name} "
                f"({len(self.plan.topology.hosts)} hosts), {len(self.plan.steps)} fault(s), "
                f"{counts['faults_applied']} applied, ops: {ops or 'none'}, "
                f"{counts['deliveries']} channel messages, {counts['contexts_lost']} contexts "
                f"lost, {self.seconds:.0f} s: {verdict}")


# --------------------------------------------------------------------------------------------
# Planning
# --------------------------------------------------------------------------------------------


def plan_run(settings: CampaignSettings, run: int,
             topology: Optional[Topology] = None) -> RunPlan:
    """Run ``run`` of the campaign: the same tree and schedule for the same seed, anywhere."""
    if settings.shape is not None:
        name = f"random-{settings.seed}-{run}"
        document = tree_document(RandomDraw(f"campaign:{settings.seed}:{run}:tree"),
                                 settings.shape, name)
        topology = parse_topology(document, f"<{name}>")
        text = yaml.safe_dump(document, sort_keys=False)
    elif topology is None:
        raise CampaignError("a campaign needs a topology, or a shape to draw trees from")
    else:
        with open(topology.source, encoding="utf-8") as stream:
            text = stream.read()
    mix = FaultMix(settings.kinds, settings.faults, settings.horizon, settings.duration)
    steps = fault_schedule(RandomDraw(f"campaign:{settings.seed}:{run}:faults"), topology, mix)
    return RunPlan(settings.seed, run, topology, text, tuple(steps))


def supported_kinds(kinds: Sequence[str] = CAMPAIGN_KINDS) -> Tuple[str, ...]:
    """The campaign fault kinds the local backend can apply here."""
    from simulator.local import LocalBackend

    can = LocalBackend(keepalive=False).capabilities()
    return tuple(kind for kind in kinds if kind in can)


# --------------------------------------------------------------------------------------------
# One run
# --------------------------------------------------------------------------------------------


def execute(plan: RunPlan, settings: CampaignSettings, directory: str,
            hooks: Sequence[ContextHook] = ()) -> RunResult:
    """Carry out one run (see the module doc) and check it. ``hooks`` see every new context
    (tests use them to break the runtime on purpose)."""
    from simulator.local import LocalBackend

    shutil.rmtree(directory, ignore_errors=True)
    os.makedirs(directory)
    began = time.monotonic()
    # Each clean-up is registered as soon as what it undoes exists, and all of them run
    # (last first) whatever fails: no process, module directory or token is left behind.
    with contextlib.ExitStack() as cleanup:
        timeline = Timeline(os.path.join(directory, "history.jsonl"))
        cleanup.callback(timeline.close)
        history = History(timeline)
        bounds = settings.bounds(plan.topology)
        longest_grace = max((float(s.params.get("grace", 0.0)) for s in plan.steps),
                            default=0.0)
        token = uuid.uuid4().hex
        workload = Workload(None, plan.topology, history,
                            f"campaign:{plan.seed}:{plan.run}:load",
                            wait=bounds.healthy + bounds.silent + longest_grace + 2.0,
                            workers=settings.workers, pace=settings.pace,
                            hold=settings.hold, hooks=hooks)
        cleanup.callback(workload.close)
        backend = LocalBackend(timeline, on_start=workload.on_start)
        workload.backend = backend
        history.record("campaign", action="begin", seed=plan.seed, run=plan.run,
                       topology=plan.topology.name, bounds=bounds.as_dict(), token=token,
                       steps=[step.as_dict() for step in plan.steps],
                       contexts=[{"host": host, "account": account}
                                 for host, account in workload.targets])
        cleanup.callback(history.record, "campaign", action="end")
        cleanup.callback(_restore_env, ENV_TOKEN, os.environ.get(ENV_TOKEN))
        os.environ[ENV_TOKEN] = token
        cleanup.callback(_find_leftovers, history, token, bounds.shutdown)
        cleanup.callback(backend.destroy)
        cleanup.callback(workload.stop)
        try:
            backend.create(plan.topology)
        except Exception as exc:
            raise CampaignError(f"{plan.label}: the tree did not come up: {exc}") from exc
        workload.start()
        injector, applied = _play(backend, history, plan.steps, settings.horizon)
        _final_heal(backend, injector, history, applied, plan.steps)
        workload.stop()
        workload.final_sweep()
        workload.collect()
    events = timeline.events()
    return RunResult(plan, events, check(events), directory, time.monotonic() - began)


def _restore_env(name: str, value: Optional[str]) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def _fault_fields(fid: int, step: PlannedFault) -> Dict[str, Any]:
    return {"fid": fid, "host": step.target,
            "fault": {"fault": step.kind, "host": step.target, **step.params}}


def _play(backend: Any, history: History, steps: Sequence[PlannedFault], horizon: float
          ) -> Tuple[FaultInjector, Dict[int, AppliedFault]]:
    """Apply every step on time and heal it ``duration`` seconds after it was applied (a
    backend call that takes a while, a restart, delays what follows, never shortens a
    fault); keep the load going until ``horizon`` at least, whatever the schedule (a shrunk
    schedule must not shorten the run). A step that cannot be applied or healed now is
    recorded and left to the final heal."""
    injector = FaultInjector(backend)
    actions = [(s.start, 1, fid, "apply") for fid, s in enumerate(steps)]
    actions.append((horizon, 2, -1, "end"))
    heapq.heapify(actions)
    applied: Dict[int, AppliedFault] = {}
    began = time.monotonic()
    while actions:
        when, _order, fid, action = heapq.heappop(actions)
        delay = began + when - time.monotonic()
        if delay > 0:
            time.sleep(delay)  # the schedule's own clock, not a wait for something to happen
        if action == "heal":
            _heal_one(injector, history, applied, fid, steps[fid])
        elif action == "apply":
            fields = _fault_fields(fid, steps[fid])
            history.record("fault", action="begin", **fields)
            try:
                applied[fid] = injector.apply(steps[fid].fault())
            except Exception as exc:
                history.record("fault", action="apply_failed", error=_text(exc), **fields)
            else:
                history.record("fault", action="apply", **fields)
                heapq.heappush(actions, (time.monotonic() - began + steps[fid].duration, 0,
                                         fid, "heal"))
    return injector, applied


def _heal_one(injector: FaultInjector, history: History, applied: Dict[int, AppliedFault],
              fid: int, step: PlannedFault) -> None:
    """Heal one applied fault, recording how it went; a fault that stays applied stays in
    ``applied`` for the final heal."""
    fields = _fault_fields(fid, step)
    try:
        injector.heal(applied[fid])
    except Exception as exc:
        history.record("fault", action="heal_failed", error=_text(exc), **fields)
    else:
        del applied[fid]
        history.record("fault", action="heal", **fields)


def _final_heal(backend: Any, injector: FaultInjector, history: History,
                applied: Dict[int, AppliedFault], steps: Sequence[PlannedFault]) -> None:
    """Heal what is still applied, newest first, then have the backend restore everything
    (start every host that is down); a fault whose own heal failed (its host's parent was
    down, say) counts as healed once that worked."""
    for fid in sorted(applied, reverse=True):
        _heal_one(injector, history, applied, fid, steps[fid])
    try:
        backend.heal_all()
    except Exception as exc:
        history.record("fault", action="heal_all_failed", error=_text(exc), fid=None)
        return
    history.record("fault", action="heal_all", fid=None)
    for fid in sorted(applied):
        history.record("fault", action="heal", **_fault_fields(fid, steps[fid]))


def _text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _find_leftovers(history: History, token: str, bound: float) -> None:
    """Record (then end) every process that carries this run's token ``bound`` seconds
    after the tree was shut down."""
    deadline = time.monotonic() + bound
    found = _token_holders(token)
    while found and time.monotonic() < deadline:
        time.sleep(0.05)  # other processes' exits: /proc is all there is to poll
        found = _token_holders(token)
    for pid, command in found.items():
        history.record("leftover", pid=pid, command=command)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _token_holders(token: str) -> Dict[int, str]:
    """pid -> command line of every process (but this one) whose environment has the
    token (``/proc/PID/environ`` is the environment the process started with)."""
    wanted = f"{ENV_TOKEN}={token}".encode()
    found = {}
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as stream:
                if wanted not in stream.read().split(b"\0"):
                    continue
            with open(f"/proc/{name}/cmdline", "rb") as stream:
                command = stream.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{name}/stat") as stream:
                if stream.read().rsplit(")", 1)[1].split()[0] == "Z":
                    continue  # ended, waiting for its parent to reap it
        except OSError:
            continue
        found[int(name)] = command.strip()
    return found


# --------------------------------------------------------------------------------------------
# Shrinking and reporting
# --------------------------------------------------------------------------------------------


def _smaller(steps: Sequence[PlannedFault]) -> List[List[PlannedFault]]:
    """Candidate schedules smaller than ``steps``, the smallest first."""
    steps = list(steps)
    candidates: List[List[PlannedFault]] = [[]] if steps else []
    if len(steps) > 1:
        candidates += [[step] for step in steps]
    if len(steps) > 2:
        candidates += [steps[:i] + steps[i + 1:] for i in range(len(steps))]
    return candidates


def shrink(first: RunResult, settings: CampaignSettings,
           hooks: Sequence[ContextHook] = (),
           progress: Callable[[str], None] = lambda line: None) -> Tuple[RunResult, int]:
    """Find a smaller schedule that still breaks one of ``first``'s invariants, in at most
    ``settings.shrink_runs`` more runs. Returns the smallest failing run and the number of
    runs tried. Runs are not deterministic (timing), so a candidate that passes once is
    simply not taken; the one reported did fail, and its history shows how."""
    wanted = {v.invariant for v in first.violations}
    best, tried = first, 0
    seen = {_schedule_key(first.plan.steps)}
    improved = True
    while improved and tried < settings.shrink_runs:
        improved = False
        for candidate in _smaller(best.plan.steps):
            if tried >= settings.shrink_runs:
                break
            if _schedule_key(candidate) in seen:
                continue
            seen.add(_schedule_key(candidate))
            tried += 1
            directory = os.path.join(first.directory, f"shrink-{tried}")
            result = execute(best.plan.with_steps(candidate), settings, directory, hooks)
            broken = {v.invariant for v in result.violations} & wanted
            progress(f"  shrink {tried}: {len(candidate)} fault(s): "
                     + (f"still violates {', '.join(sorted(broken))}" if broken else "passes"))
            if broken:
                best, improved = result, True
                break
            shutil.rmtree(directory, ignore_errors=True)
    return best, tried


def _schedule_key(steps: Sequence[PlannedFault]) -> str:
    return json.dumps([step.as_dict() for step in steps], sort_keys=True)


@dataclasses.dataclass
class Finding:
    """A run that broke invariants, and the smallest run found that still does."""

    original: RunResult
    shrunk: RunResult
    tried: int
    paths: Dict[str, str]

    def text(self) -> str:
        first, best = self.original, self.shrunk
        lines = [f"campaign {first.plan.label} ({first.plan.topology.name}, "
                 f"{len(first.plan.topology.hosts)} hosts): "
                 f"{len(first.violations)} violation(s)"]
        lines += [f"  {v.invariant}: {v.message}" for v in first.violations[:20]]
        if len(first.violations) > 20:
            lines.append(f"  ... and {len(first.violations) - 20} more (violations.json)")
        lines.append(f"schedule of {len(first.plan.steps)} fault(s):")
        lines += ["  " + step.describe() for step in first.plan.steps]
        lines.append(f"shrunk in {self.tried} more run(s) to {len(best.plan.steps)} fault(s)"
                     + (", none at all" if not best.plan.steps else "") + ", still breaking "
                     + ", ".join(sorted({v.invariant for v in best.violations})) + ":")
        lines += ["  " + step.describe() for step in best.plan.steps]
        lines += [f"  {v.invariant}: {v.message}" for v in best.violations[:10]]
        lines += [f"replay:   python -m simulator campaign --replay {self.paths['schedule']}",
                  f"          (or pytest --topology-campaign-replay={self.paths['schedule']})",
                  f"history:  {self.paths['history']}",
                  f"picture:  {self.paths['picture']}",
                  f"original: {first.history_path} ({self.paths['original_picture']})"]
        return "\n".join(lines)


def write_finding(first: RunResult, best: RunResult, tried: int,
                  settings: CampaignSettings) -> Finding:
    """Write what a finding needs to be understood and replayed, next to the histories:
    the schedules (``schedule.json`` is the shrunk one), the topology, the violations, and
    both timeline pictures with the violations marked."""
    paths = {"history": best.history_path,
             "schedule": os.path.join(first.directory, "schedule.json"),
             "original_schedule": os.path.join(first.directory, "original-schedule.json"),
             "topology": os.path.join(first.directory, "topology.yml"),
             "violations": os.path.join(first.directory, "violations.json"),
             "picture": os.path.join(best.directory, "timeline.png"),
             "original_picture": os.path.join(first.directory, "timeline.png")}
    with open(paths["topology"], "w", encoding="utf-8") as stream:
        stream.write(first.plan.topology_text)
    for key, result in (("schedule", best), ("original_schedule", first)):
        with open(paths[key], "w", encoding="utf-8") as stream:
            json.dump(_replay_document(result, settings), stream, indent=1)
            stream.write("\n")
    with open(paths["violations"], "w", encoding="utf-8") as stream:
        json.dump({"original": [dataclasses.asdict(v) for v in first.violations],
                   "shrunk": [dataclasses.asdict(v) for v in best.violations]}, stream,
                  indent=1)
    for result in {id(first): first, id(best): best}.values():
        try:
            picture(result, os.path.join(result.directory, "timeline.png"))
        except (CampaignError, subprocess.TimeoutExpired) as exc:
            # The finding matters more than its picture: say why it is missing, go on.
            for key in ("picture", "original_picture"):
                if os.path.dirname(paths[key]) == result.directory:
                    paths[key] = f"not drawn: {str(exc)[-300:]}"
    return Finding(first, best, tried, paths)


def _replay_document(result: RunResult, settings: CampaignSettings) -> Dict[str, Any]:
    return {"format": REPLAY_FORMAT, "seed": result.plan.seed, "run": result.plan.run,
            "topology": "topology.yml", "settings": settings.workload_options(),
            "steps": [step.as_dict() for step in result.plan.steps],
            "violations": sorted({v.invariant for v in result.violations})}


def picture(result: RunResult, path: str) -> None:
    """Draw the run's timeline (:func:`picture_events`) into ``path``, in a process of its own:
    matplotlib keeps its font files open for as long as the process that drew lives."""
    import simulator

    data = {"events": picture_events(result), "topology": result.plan.topology_text,
            "source": result.plan.topology.source,
            "seeds": f"{result.plan.seed}, run {result.plan.run} (fault campaign)"}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as stream:
        json.dump(data, stream, default=str)
    root = os.path.dirname(os.path.dirname(os.path.abspath(simulator.__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [root, os.environ.get("PYTHONPATH")]))}
    try:
        done = subprocess.run([sys.executable, "-c", _DRAW, stream.name, path], env=env,
                              capture_output=True, text=True, timeout=300, check=False)
    finally:
        os.unlink(stream.name)
    if done.returncode != 0:
        raise CampaignError(f"could not draw {path}: {done.stderr.strip()[-2000:]}")


_DRAW = """
import json, sys, yaml
from simulator.report import RunInfo, plot_timeline
from simulator.topology import parse_topology
with open(sys.argv[1]) as stream:
    data = json.load(stream)
topology = parse_topology(yaml.safe_load(data["topology"]), data["source"])
plot_timeline(data["events"], topology, sys.argv[2], RunInfo("local", data["seeds"]))
"""


def picture_events(result: RunResult) -> List[Dict[str, Any]]:
    """What the picture shows: faults, contexts started and lost, keepalive give-ups,
    DEL_ROUTE per hop, the shutdown, failed ops, and the violations, marked."""
    shown = []
    for event in result.events:
        kind = event.get("kind")
        if kind in ("op", "deliver", "channel", "probe", "campaign", "route"):
            if kind == "op" and event.get("action") == "end" and event.get("outcome") != "ok":
                shown.append({**event, "kind": "op_failed"})
            continue
        shown.append(event)
    return shown + [v.as_event() for v in result.violations]


def load_replay(path: str) -> Tuple[RunPlan, Dict[str, Any]]:
    """A run written by :func:`write_finding`, and the workload settings it ran with."""
    try:
        with open(path, encoding="utf-8") as stream:
            data = json.load(stream)
    except (OSError, ValueError) as exc:
        raise CampaignError(f"cannot read the replay file {path!r}: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != REPLAY_FORMAT:
        raise CampaignError(f"{path!r} is not a campaign replay file (format "
                            f"{REPLAY_FORMAT!r}); the schedule.json of a finding is")
    topology_path = os.path.join(os.path.dirname(os.path.abspath(path)), data["topology"])
    try:
        topology = load_topology(topology_path)
        steps = tuple(PlannedFault.from_dict(step) for step in data["steps"])
    except Exception as exc:
        raise CampaignError(f"{path}: {exc}") from None
    with open(topology_path, encoding="utf-8") as stream:
        text = stream.read()
    return (RunPlan(int(data["seed"]), int(data["run"]), topology, text, steps),
            dict(data.get("settings") or {}))


def run_and_report(plan: RunPlan, settings: CampaignSettings,
                   hooks: Sequence[ContextHook] = (),
                   progress: Callable[[str], None] = lambda line: None,
                   directory: Optional[str] = None) -> Tuple[RunResult, Optional[Finding]]:
    """One run; if it breaks invariants, shrink it and write the finding."""
    directory = directory or run_directory(settings, plan)
    result = execute(plan, settings, directory, hooks)
    progress(result.summary())
    if not result.violations:
        return result, None
    progress(f"  {len(result.violations)} violation(s); shrinking (at most "
             f"{settings.shrink_runs} runs)")
    best, tried = shrink(result, settings, hooks, progress)
    return result, write_finding(result, best, tried, settings)


def run_directory(settings: CampaignSettings, plan: RunPlan) -> str:
    """``<out>/<topology>/seed-<seed>/run-<run>``; random trees file under ``random``."""
    name = "random" if settings.shape is not None else plan.topology.name
    return os.path.join(settings.out_dir, name, f"seed-{plan.seed}", f"run-{plan.run}")


def settings_from(options: Mapping[str, Any], **fields: Any) -> CampaignSettings:
    """Settings from a replay file's ``settings`` plus explicit fields."""
    known = {f.name for f in dataclasses.fields(CampaignSettings)}
    given = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()
             if k in known}
    return CampaignSettings(**{**given, **fields})


# --------------------------------------------------------------------------------------------
# python -m simulator campaign
# --------------------------------------------------------------------------------------------


def command(args: Any) -> int:
    """``python -m simulator campaign``: run, print one line per run and every finding;
    exit status 1 when a run broke an invariant."""
    def say(line: str) -> None:
        print(line, flush=True)

    try:
        settings, topology, plans = _command_plans(args)
    except (CampaignError, ValueError, OSError) as exc:
        raise SystemExit(f"simulator campaign: {exc}") from None
    shape = "random trees" if settings.shape is not None else f"the tree of {topology.name}"
    say(f"campaign: seed {settings.seed}, {len(plans)} run(s) on {shape} (local backend), "
        f"faults {', '.join(settings.kinds)}; writing under {settings.out_dir}")
    failed = 0
    for plan, directory in plans:
        try:
            _result, finding = run_and_report(plan, settings, progress=say,
                                              directory=directory)
        except CampaignError as exc:
            say(f"{plan.label}: {exc}")
            failed += 1
            continue
        if finding is not None:
            say(finding.text())
            failed += 1
    say(f"campaign: {len(plans)} run(s), {failed} with violations or errors")
    return 1 if failed else 0


def _command_plans(args: Any) -> Tuple[CampaignSettings, Any, List[Tuple[RunPlan, Optional[str]]]]:
    from simulator.local import interpreters

    if args.replay:
        plan, options = load_replay(args.replay)
        settings = settings_from(options, seed=plan.seed, shrink_runs=args.shrink,
                                 out_dir=args.out)
        directory = os.path.join(os.path.dirname(os.path.abspath(args.replay)), "replay")
        return settings, plan.topology, [(plan, directory)]
    topology = load_topology(args.file) if args.file else None
    random_shapes = (args.shape or ("file" if args.file else "random")) == "random"
    if not random_shapes and topology is None:
        raise CampaignError("--shape file needs a topology FILE")
    low, _, high = args.faults.partition("-")
    kinds = tuple(k.strip() for k in args.kinds.split(",")) if args.kinds else CAMPAIGN_KINDS
    missing = sorted(set(kinds) - set(supported_kinds(kinds)))
    if missing:
        raise CampaignError(f"--kinds: the local backend cannot apply {', '.join(missing)}")
    seed = args.seed if args.seed is not None else (topology.seed if topology else None) or 0
    settings = CampaignSettings(
        seed=seed, runs=args.runs, kinds=kinds, faults=(int(low), int(high or low)),
        horizon=args.horizon, shrink_runs=args.shrink, out_dir=args.out,
        shape=TreeShape(pythons=interpreters(), max_hosts=args.max_hosts)
        if random_shapes else None)
    runs = args.only or range(1, settings.runs + 1)
    return settings, topology, [(plan_run(settings, run, topology), None) for run in runs]
