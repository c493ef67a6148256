"""The run's report: the timeline as a picture, and the numbers people ask about.

From the timeline's events (see :mod:`simulator.timeline`) and the measures tests keep, it
writes, into one directory:

``timeline.png``  one lane per host, fault periods as shaded bands, and every other kind of
                  event as markers, each kind at its own height in the lane, so that none
                  hides another (a keepalive give-up and the disconnect it causes happen at
                  the same moment); titled with the topology, backend, seeds and date
``summary.json``  set-up time, DEL_ROUTE propagation per hop, shutdown time of the tree,
                  call latency per path, fault counts
``summary.md``    the same, as tables

Matplotlib is imported here only (with the non-interactive Agg backend), so neither the plugin
nor the backends pay for it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Tuple

if TYPE_CHECKING:
    from simulator.topology import Topology

__all__ = ["RunInfo", "marker_points", "plot_timeline", "run_title", "summarise",
           "write_report"]

_FAULT_COLOURS = {
    "kill": "#d62728", "pause": "#9467bd", "partition": "#ff7f0e", "latency": "#1f77b4",
    "bandwidth": "#17becf", "stream": "#8c564b", "restart": "#e377c2", "stop": "#7f7f7f",
}
#: Event kind -> (marker, colour, legend label, height in its lane from 0 (top) to 1).
#: Each kind has a height of its own; kinds drawn later are drawn on top.
_MARKERS = {
    "test": ("|", "#7f7f7f", "test ended", 0.08),
    "call": (".", "#17becf", "measured call", 0.2),
    "build": ("o", "#2ca02c", "context started", 0.32),
    "route": ("s", "#8c564b", "master route added/removed", 0.44),
    "shutdown": ("D", "#e377c2", "shutdown step", 0.56),
    "del_route": ("|", "#1f77b4", "DEL_ROUTE reached this host", 0.68),
    "disconnect": ("x", "#d62728", "disconnect seen by master", 0.8),
    "keepalive": ("v", "#ff7f0e", "keepalive gave up", 0.92),
    "op_failed": ("1", "#bcbd22", "campaign op failed", 0.62),
    "violation": ("X", "#ff0000", "VIOLATION (campaign checker)", 0.5),
}
#: Marker sizes that differ from the default: a violation must stand out.
_SIZES = {"violation": 220}
#: Kinds not listed above still show, at this height, with a generic marker.
_OTHER = ("*", "#000000", "other event", 0.5)  # its legend label is the kind itself


@dataclasses.dataclass(frozen=True)
class RunInfo:
    """What the title says besides the topology: where and how the run ran."""

    backend: str
    seeds: str
    started: float = dataclasses.field(default_factory=time.time)


def run_title(topology: Topology, info: RunInfo) -> str:
    date = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(info.started))
    return f"{topology.name}: {info.backend} backend, seed {info.seeds}, {date}"


def _lane(host: Optional[str], topology: Topology, account: Optional[str] = None) -> str:
    if not host:
        return "master"
    try:
        name = topology.host(host).name
    except LookupError:
        name = str(host).rsplit("/", 1)[-1]
    return name if account is None else f"sudo:{name}:{account}"


def _event_lane(event: Mapping[str, Any], topology: Topology) -> str:
    return _lane(event.get("host"), topology, event.get("account"))


def fault_periods(events: Sequence[Mapping[str, Any]]) -> List[Tuple[str, str, float, float]]:
    """(target host id, fault kind, start, end) for every applied fault; a fault never
    healed ends at the last event."""
    end_of_run = max((e["time"] for e in events), default=0.0)
    open_faults: Dict[Tuple[str, str], List[float]] = {}
    periods = []
    for event in events:
        if event.get("kind") != "fault" or not event.get("fault"):
            continue
        fault = event["fault"]
        target = fault.get("host") or fault.get("edge")
        if target is None:
            continue
        key = (target, fault["fault"])
        if event["action"] == "apply":
            open_faults.setdefault(key, []).append(event["time"])
        elif event["action"] == "heal" and open_faults.get(key):
            periods.append((target, fault["fault"], open_faults[key].pop(0), event["time"]))
    for (target, kind), starts in open_faults.items():
        periods.extend((target, kind, start, end_of_run) for start in starts)
    return sorted(periods, key=lambda p: p[2])


def _stats(values: Sequence[float]) -> Dict[str, float]:
    return {"n": len(values), "min": min(values), "median": statistics.median(values),
            "max": max(values)}


def summarise(events: Sequence[Mapping[str, Any]],
              measures: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """The report's numbers, from events (and measures tests kept)."""
    measures = dict(measures or {})
    calls: Dict[str, List[float]] = {}
    for event in events:
        if event.get("kind") == "call":
            calls.setdefault(event["path"], []).append(event["seconds"])
    hops: Dict[str, List[float]] = {}
    for event in events:
        if event.get("kind") == "del_route":
            seer = event.get("host") or "master"
            hops.setdefault(f"{event.get('fault', 'fault')}: {event['lost']} lost, seen by "
                            f"{seer}", []).append(
                event["seconds"])
    shutdown = [e["seconds"] for e in events
                if e.get("kind") == "shutdown" and e.get("step") == "tree_gone_measured"]
    faults: Dict[str, int] = {}
    for _target, kind, _start, _end in fault_periods(events):
        faults[kind] = faults.get(kind, 0) + 1
    builds = [e for e in events if e.get("kind") == "build" and e.get("action") == "tree_up"]
    return {
        "setup_seconds": builds[0]["seconds"] if builds else measures.get("setup_seconds"),
        "call_latency_seconds": {path: _stats(v) for path, v in sorted(calls.items())},
        "del_route_seconds_after_fault": {hop: _stats(v) for hop, v in sorted(hops.items())},
        "shutdown_seconds": _stats(shutdown) if shutdown else None,
        "faults_applied": faults,
        "disconnects_seen": sum(1 for e in events if e.get("kind") == "disconnect"),
        "keepalive_give_ups": sum(1 for e in events if e.get("kind") == "keepalive"),
        "events": len(events),
    }


def _markdown(summary: Mapping[str, Any], topology: Topology, info: RunInfo) -> str:
    def ms(value: float) -> str:
        return f"{value * 1000:.1f} ms"

    lines = [f"# Simulator report: {run_title(topology, info)}", ""]
    setup = summary["setup_seconds"]
    lines.append(f"- set-up of the tree: {'n/a' if setup is None else f'{setup:.2f} s'}")
    shutdown = summary["shutdown_seconds"]
    lines.append("- shutdown of the whole tree: "
                 + ("n/a" if not shutdown else f"{shutdown['max']:.2f} s (worst of "
                    f"{shutdown['n']})"))
    lines.append(f"- faults applied: {summary['faults_applied'] or 'none'}; disconnects seen "
                 f"by the master: {summary['disconnects_seen']}; keepalive give-ups: "
                 f"{summary['keepalive_give_ups']}")
    for title, key in (("Call latency per path", "call_latency_seconds"),
                       ("DEL_ROUTE arrival after the fault, per hop",
                        "del_route_seconds_after_fault")):
        lines += ["", f"## {title}", "", "| path | n | min | median | max |",
                  "| --- | ---: | ---: | ---: | ---: |"]
        for path, st in summary[key].items():
            lines.append(f"| {path} | {st['n']} | {ms(st['min'])} | {ms(st['median'])} | "
                         f"{ms(st['max'])} |")
    return "\n".join(lines) + "\n"


def _marker_rank(kind: str) -> int:
    kinds = list(_MARKERS)
    return kinds.index(kind) if kind in kinds else len(kinds)


def marker_points(events: Sequence[Mapping[str, Any]], topology: Topology,
                  lanes: Sequence[str]) -> Dict[str, List[Tuple[float, float]]]:
    """(seconds since the first event, y) of every event drawn as a marker, by kind: every
    kind but ``fault`` (a shaded band), each at its own height within its lane."""
    index = {name: i for i, name in enumerate(lanes)}
    start = min((e["time"] for e in events), default=0.0)
    points: Dict[str, List[Tuple[float, float]]] = {}
    for event in events:
        kind = event.get("kind", "?")
        lane = _event_lane(event, topology)
        if kind == "fault" or lane not in index:
            continue
        height = _MARKERS.get(kind, _OTHER)[3]
        points.setdefault(kind, []).append((event["time"] - start, index[lane] + height))
    return dict(sorted(points.items(), key=lambda item: _marker_rank(item[0])))


def _plot(events: Sequence[Mapping[str, Any]], topology: Topology, path: str,
          info: RunInfo) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot
    from matplotlib.patches import Patch

    lanes = ["master", *(host.name for host in topology.hosts)]
    lanes += sorted({_event_lane(e, topology) for e in events} - set(lanes))
    index = {name: i for i, name in enumerate(lanes)}
    start = min((e["time"] for e in events), default=0.0)
    figure, axes = pyplot.subplots(figsize=(12, 1.4 + 0.6 * len(lanes)))
    try:
        kinds_seen = set()
        for target, kind, begin, end in fault_periods(events):
            row = index.get(_lane(target, topology))
            if row is None:
                continue
            axes.broken_barh([(begin - start, max(end - begin, 0.02))], (row + 0.05, 0.9),
                             color=_FAULT_COLOURS.get(kind, "#bbbbbb"), alpha=0.35, lw=0)
            kinds_seen.add(kind)
        handles: List[Any] = [Patch(color=_FAULT_COLOURS.get(k, "#bbbbbb"), alpha=0.35,
                                    label=k) for k in sorted(kinds_seen)]
        for kind, points in marker_points(events, topology, lanes).items():
            marker, colour, label, _height = _MARKERS.get(kind, _OTHER)
            xs, ys = zip(*points)
            handles.append(axes.scatter(xs, ys, marker=marker, color=colour,
                                        label=label if kind in _MARKERS else kind,
                                        s=_SIZES.get(kind, 30),
                                        zorder=3 + _marker_rank(kind)))
        axes.set_yticks([i + 0.5 for i in range(len(lanes))], lanes)
        axes.set_ylim(0, len(lanes))
        axes.invert_yaxis()
        axes.set_xlabel("seconds since the timeline began (monotonic clock)")
        axes.set_title(run_title(topology, info))
        axes.grid(axis="x", alpha=0.3)
        if handles:
            axes.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0),
                        fontsize="small")
        figure.tight_layout()
        figure.savefig(path, dpi=100)
    finally:
        pyplot.close(figure)


def plot_timeline(events: Sequence[Mapping[str, Any]], topology: Topology, path: str,
                  info: RunInfo) -> None:
    """Draw ``events`` as ``timeline.png`` draws them, into ``path``."""
    _plot(events, topology, path, info)


def write_report(events: Sequence[Mapping[str, Any]], out_dir: str, topology: Topology,
                 measures: Optional[Mapping[str, Any]] = None,
                 info: Optional[RunInfo] = None) -> List[str]:
    """Write the picture and the summaries into ``out_dir``; return the paths written."""
    info = info or RunInfo(backend="?", seeds="?")
    os.makedirs(out_dir, exist_ok=True)
    summary = summarise(events, measures)
    summary["run"] = {"topology": topology.name, "backend": info.backend,
                      "seeds": info.seeds, "title": run_title(topology, info)}
    paths = []
    json_path = os.path.join(out_dir, "summary.json")
    with open(json_path, "w", encoding="utf-8") as stream:
        json.dump(summary, stream, indent=2, sort_keys=True)
    paths.append(json_path)
    md_path = os.path.join(out_dir, "summary.md")
    with open(md_path, "w", encoding="utf-8") as stream:
        stream.write(_markdown(summary, topology, info))
    paths.append(md_path)
    png_path = os.path.join(out_dir, "timeline.png")
    _plot(events, topology, png_path, info)
    paths.append(png_path)
    timeline_path = os.path.join(out_dir, "timeline.jsonl")
    if os.path.exists(timeline_path):
        paths.append(timeline_path)
    return paths
