"""Issue 16's targets (speed, wave 2), the figures derived from one run to judge them, and the
ratios of earlier work that must not slip.

Every target compares one of our figures with a reference taken from the same run: a peer's
figure, a limit of the machine measured by the ``limits`` workload, or our own figure under
other conditions (idle against loaded). A target that is not met says whether it was out of
reach: when the machine's own limit of the same run (a raw pipe round trip, the CPU of bare
interpreter starts spread over the cores, bare ssh logins) is already above the bound, no
implementation could meet it on that run.

The kept ratios (throughput, cold start, imports, payload, child RSS against each peer) are
compared with the same ratios of a recorded baseline run (``bench/baseline.json``, written by
``python bench/report.py --run RUN --save-baseline bench/baseline.json``): each must stay
within 5 % of it, or be better.

Pure functions over a run's pooled statistics (``bench.stats``); standard library only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

from bench.stats import Stats, fmt_value, sig

__all__ = [
    "BASELINE",
    "GOALS",
    "KEPT",
    "Floor",
    "Goal",
    "Kept",
    "Reference",
    "Verdict",
    "derive",
    "describe_source",
    "evaluate",
    "kept_ratios",
    "kept_rows",
    "load_baseline",
    "save_baseline",
]

StatsMap = Dict[Tuple[str, str], Stats]

BASELINE = Path(__file__).resolve().parent / "baseline.json"
#: How far a kept ratio may move the wrong way before it counts as slipped.
TOLERANCE = 0.05
PAGE = 4096


# Derived figures ------------------------------------------------------------------------------

def derive(stats: StatsMap) -> StatsMap:
    """Figures computed from measured ones of the same run, per implementation:

    - ``roundtrip_per_pipe.call``: the round trip's median over the raw pipe round trip's;
    - ``multihop_added.N``: the median through N hops minus the median through N - 1;
    - ``fanout_cpu_per_start.N`` (and ``fanout_via_cpu_per_start.N``): CPU per child started
      over the CPU of a bare interpreter start;
    - ``ssh_overhead.connect``: the ssh connect's median minus a bare ``ssh host python3 -c
      print``'s;
    - ``tail_ratio.p99``: the probe's p99 under load over its idle p99.

    Where both figures come from the same repetitions, the repetitions' values are kept
    (the spread shown); otherwise the machine's median is the one reference.
    """
    derived: StatsMap = {}

    def put(impl: str, key: str, value: float, unit: str, runs: Iterable[float] = ()) -> None:
        runs = tuple(runs)
        derived[(impl, key)] = Stats(unit, (value,), runs or (value,))

    pipe = stats.get(("machine", "limits.pipe_rt"))
    start_cpu = stats.get(("machine", "limits.interpreter_start_cpu"))
    login = stats.get(("machine", "ssh.login_python"))
    for (impl, key), fig in stats.items():
        prefix, _, suffix = key.partition(".")
        if key == "roundtrip.call" and pipe is not None:
            put(impl, "roundtrip_per_pipe.call", fig.median / pipe.median, "x",
                (m / pipe.median for m in fig.run_medians))
        elif prefix == "multihop" and suffix.isdigit() and int(suffix) > 1:
            below = stats.get((impl, f"multihop.{int(suffix) - 1}"))
            if below is not None:
                paired = len(below.run_medians) == len(fig.run_medians)
                put(impl, f"multihop_added.{suffix}", fig.median - below.median, "s",
                    (a - b for a, b in zip(fig.run_medians, below.run_medians)) if paired
                    else ())
        elif prefix in ("fanout_cpu", "fanout_via_cpu") and start_cpu is not None:
            put(impl, f"{prefix}_per_start.{suffix}", fig.median / start_cpu.median, "x",
                (m / start_cpu.median for m in fig.run_medians))
        elif key == "ssh.connect" and login is not None:
            put(impl, "ssh_overhead.connect", fig.median - login.median, "s",
                (m - login.median for m in fig.run_medians))
        elif key == "tail.loaded":
            idle = stats.get((impl, "tail.idle"))
            if idle is not None and idle.p99 and fig.p99 is not None:
                put(impl, "tail_ratio.p99", fig.p99 / idle.p99, "x")
    return derived


# Targets ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Reference:
    """What a target compares our figure with: a figure of the same run (a peer's, the
    machine's, or ours under other conditions), or a fixed amount in the figure's unit."""

    impl: str  # "mitogen", "execnet", "machine", "ours", or "fixed"
    key: str = ""
    stat: str = "median"  # "median" or "p99"
    amount: float = 0.0  # for "fixed"
    unit: str = "s"  # the amount's


@dataclass(frozen=True)
class Floor:
    """The least any implementation could reach on this run: ``times`` x a limit of the
    machine, divided by the usable cores when the work can spread over them."""

    key: str
    what: str
    times: float = 1.0
    per_core: bool = False
    stat: str = "median"


@dataclass(frozen=True)
class Goal:
    """Met when our figure's ``stat`` is at most ``factor`` x the reference."""

    section: str
    text: str
    key: str
    factor: float
    reference: Reference
    stat: str = "median"
    floor: Optional[Floor] = None
    short: str = ""  # for a plot's axis

    @property
    def label(self) -> str:
        return self.short or f"{self.section}: {self.text}"


@dataclass(frozen=True)
class Verdict:
    goal: Goal
    unit: str
    ours: Optional[float]
    reference: Optional[float]
    floor: Optional[float]
    missing: Tuple[Tuple[str, str], ...]  # (impl, key) of each figure the run lacks

    @property
    def bound(self) -> Optional[float]:
        return None if self.reference is None else self.goal.factor * self.reference

    @property
    def below_noise(self) -> bool:
        """A figure that cannot be negative came out so: a difference of two medians (a hop's
        increment, an overhead over a bare login) that the run's noise outweighs. Not for a
        fixed bound: memory left after a disconnect may well be negative (the allocator gave
        pages back), and that meets it."""
        if self.goal.reference.impl == "fixed":
            return False
        negative_ours = self.ours is not None and self.ours < 0
        nonpositive_reference = self.reference is not None and self.reference <= 0
        return negative_ours or nonpositive_reference

    @property
    def met(self) -> Optional[bool]:
        if self.ours is None or self.bound is None or self.below_noise:
            return None
        return self.ours <= self.bound

    @property
    def out_of_reach(self) -> bool:
        return self.met is False and self.floor is not None and self.bound is not None and \
            self.floor > self.bound

    @property
    def ratio(self) -> Optional[float]:
        if self.ours is None or not self.reference or self.below_noise:
            return None
        return self.ours / self.reference

    def status(self) -> str:
        """``met``, ``NOT met`` (saying which limit of the run puts it out of reach, if one
        does), ``no data``, or ``not judged`` (a figure below the run's noise)."""
        if self.below_noise:
            return "not judged: a difference of medians came out <= 0 (noise above the effect)"
        if self.met is None:
            return "no data"
        if self.met:
            return "met"
        if self.out_of_reach:
            assert self.floor is not None and self.bound is not None and \
                self.goal.floor is not None
            return (f"NOT met; out of reach: {self.goal.floor.what} of this run "
                    f"({fmt_value(self.floor, self.unit)}) is above the bound "
                    f"({fmt_value(self.bound, self.unit)})")
        return "NOT met"


def _stat(fig: Optional[Stats], stat: str) -> Optional[float]:
    if fig is None:
        return None
    return fig.p99 if stat == "p99" else fig.median


def evaluate(goal: Goal, stats: StatsMap, meta: Dict[str, Any]) -> Verdict:
    """Judge one target on one run's statistics (measured and derived)."""
    missing: List[Tuple[str, str]] = []

    def figure(impl: str, key: str, stat: str) -> Optional[float]:
        value = _stat(stats.get((impl, key)), stat)
        if value is None:
            missing.append((impl, key))
        return value

    ours_fig = stats.get(("ours", goal.key))
    ours = figure("ours", goal.key, goal.stat)
    ref = goal.reference
    reference = ref.amount if ref.impl == "fixed" else figure(ref.impl, ref.key or goal.key,
                                                             ref.stat)
    floor = None
    if goal.floor is not None:
        limit = _stat(stats.get(("machine", goal.floor.key)), goal.floor.stat)
        if limit is not None:
            cores = (meta.get("machine") or {}).get("usable_cores") or 1
            floor = limit * goal.floor.times / (cores if goal.floor.per_core else 1)
    unit = ours_fig.unit if ours_fig is not None else ref.unit
    return Verdict(goal, unit, ours, reference, floor, tuple(missing))


def _fanout_goals() -> List[Goal]:
    goals = []
    for children, via in ((16, False), (64, False), (256, False), (64, True)):
        key = f"fanout_via.{children}" if via else f"fanout.{children}"
        what = f"{children} children started concurrently" + (
            " through one intermediate" if via else "")
        short = f"fan-out {children}" + (" via one" if via else "")
        floor = Floor("limits.interpreter_start_cpu",
                      f"the CPU of {children} bare interpreter starts over the usable cores",
                      times=children, per_core=True)
        goals += [Goal("Fan-out", f"{what}: wall <= 0.75x execnet's", key, 0.75,
                       Reference("execnet"), floor=floor, short=f"{short} <= 0.75x execnet"),
                  Goal("Fan-out", f"{what}: wall <= 0.35x Mitogen's", key, 0.35,
                       Reference("mitogen"), floor=floor, short=f"{short} <= 0.35x Mitogen")]
    return goals


PIPE_FLOOR = Floor("limits.pipe_rt", "the raw pipe round trip")

GOALS: Tuple[Goal, ...] = (
    Goal("Round trip", "median <= 0.7x execnet's", "roundtrip.call", 0.7,
         Reference("execnet"), floor=PIPE_FLOOR, short="round trip <= 0.7x execnet"),
    Goal("Round trip", "p99 <= execnet's p99", "roundtrip.call", 1.0,
         Reference("execnet", stat="p99"), stat="p99",
         floor=Floor("limits.pipe_rt", "the raw pipe round trip's p99", stat="p99"),
         short="round trip p99 <= execnet's"),
    # A hop puts one more process on the path each way: at least one raw round trip more.
    *(Goal("Multi-hop", f"hop {n} adds <= 2x the raw pipe round trip (median {n} hops - "
           f"median {n - 1})", f"multihop_added.{n}", 2.0,
           Reference("machine", "limits.pipe_rt"), floor=PIPE_FLOOR,
           short=f"hop {n} adds <= 2x pipe round trip") for n in range(2, 6)),
    *_fanout_goals(),
    Goal("Tail under load", "p99 of a child's round trip while another child receives "
         "256 MiB arguments <= 3x its idle p99", "tail.loaded", 3.0,
         Reference("ours", "tail.idle", "p99"), stat="p99", short="p99 under load <= 3x idle"),
    Goal("Memory", "master RSS per connected child <= 4 KiB", "memory.master_per_child", 1.0,
         Reference("fixed", amount=PAGE, unit="B"), short="master RSS per child <= 4 KiB"),
    Goal("Memory", "back to baseline after the children disconnect: at most one page "
         "(4 KiB) of the master's growth left", "memory.master_residual", 1.0,
         Reference("fixed", amount=PAGE, unit="B"), short="RSS left after disconnect <= 4 KiB"),
    Goal("Memory", "1,000 children in one master start, answer one call each and shut down "
         "cleanly: no process or descriptor left", "scale.left_behind", 1.0,
         Reference("fixed", amount=0, unit="count")),
    Goal("SSH", "connect overhead above a bare ssh host python3 -c print <= 0.5x Mitogen's",
         "ssh_overhead.connect", 0.5, Reference("mitogen"),
         short="ssh connect overhead <= 0.5x Mitogen"),
    Goal("SSH", "connect overhead above a bare ssh host python3 -c print <= execnet's",
         "ssh_overhead.connect", 1.0, Reference("execnet"),
         short="ssh connect overhead <= execnet"),
    Goal("SSH", "16 connections at once, one account each: wall <= 0.5x Mitogen's",
         "ssh.concurrent", 0.5, Reference("mitogen"),
         floor=Floor("ssh.login_python_concurrent", "16 bare ssh logins at once"),
         short="16 ssh connects at once <= 0.5x Mitogen"),
)


# Kept ratios -------------------------------------------------------------------------------------

#: Figures that were ahead when issue 16 was filed and must stay within 5 % of their ratios.
KEPT: Tuple[str, ...] = (
    "cold_start.first_child",
    "throughput.64x1MiB",
    "throughput.1x64MiB",
    "remote_import.static",
    "remote_import.importlib",
    "bootstrap.payload",
    "memory.child_rss",
)
PEERS = ("mitogen", "execnet")


@dataclass(frozen=True)
class Kept:
    key: str
    peer: str
    baseline: Optional[float]  # ours / peer at the baseline (a rate ratio for throughput)
    now: Optional[float]
    higher_is_better: bool

    def status(self) -> str:
        if self.baseline is None or self.now is None:
            return "no data"
        change = self.now / self.baseline - 1
        worse = -change if self.higher_is_better else change
        if worse > TOLERANCE:
            return f"NOT met: slipped {sig(100 * worse)} %"
        if worse < -TOLERANCE:
            return f"met: better by {sig(-100 * worse)} %"
        return "met: within 5 %"


def kept_ratios(stats: StatsMap) -> Dict[str, Dict[str, float]]:
    """ours / peer of each kept figure's headline (rates for throughput), per peer."""
    ratios: Dict[str, Dict[str, float]] = {}
    for key in KEPT:
        ours = stats.get(("ours", key))
        for peer in PEERS:
            theirs = stats.get((peer, key))
            if ours is not None and theirs is not None and theirs.headline:
                ratios.setdefault(key, {})[peer] = ours.headline / theirs.headline
    return ratios


def kept_rows(stats: StatsMap, baseline: Optional[Dict[str, Any]]) -> List[Kept]:
    now = kept_ratios(stats)
    then = (baseline or {}).get("ratios", {})
    rows = []
    for key in KEPT:
        for peer in PEERS:
            ours = stats.get(("ours", key))
            if key.startswith("remote_import") and peer == "execnet":
                continue  # no counterpart
            rows.append(Kept(key, peer, then.get(key, {}).get(peer), now.get(key, {}).get(peer),
                             higher_is_better=ours.higher_is_better if ours is not None
                             else key.startswith("throughput")))
    return rows


def save_baseline(run: Dict[str, Any], stats: StatsMap, path: Path) -> Path:
    """Record a run's kept ratios, and which run they come from, as the baseline."""
    meta = run.get("meta", {})
    versions = meta.get("versions", {})
    data = {
        "source": {"date": meta.get("date"), "command": meta.get("command"),
                   "commit": (versions.get("ours") or {}).get("commit"),
                   "loadavg_start": meta.get("loadavg_start"),
                   "loadavg_end": meta.get("loadavg_end")},
        "ratios": kept_ratios(stats),
    }
    path = Path(path)
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    return path


def load_baseline(path: Path = BASELINE) -> Optional[Dict[str, Any]]:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("ratios"), dict):
        raise ValueError(f"{path}: not a bench baseline (expected a 'ratios' mapping)")
    return data


def describe_source(baseline: Optional[Dict[str, Any]]) -> str:
    """Which run the baseline's ratios come from, in words."""
    if not baseline:
        return "no baseline is recorded (bench/baseline.json)"
    src = baseline.get("source", {})
    load = src.get("loadavg_start")
    return (f"the baseline is the run of {src.get('date', '?')} at "
            f"{src.get('commit') or '?'} (`{src.get('command', '?')}`"
            + (f", load average {load[0]:.1f} at its start" if load else "") + ")")

