"""The run's report: every kind of event stays visible in the picture, and the title says
which run it was."""

from __future__ import annotations

import calendar
import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

from simulator.report import RunInfo, marker_points, run_title
from simulator.timeline import Timeline
from simulator.topology import parse_topology

TOPOLOGY_DATA = {"version": 1, "name": "pair", "tree": {"top": {"children": {"leaf": None}}}}
TOPOLOGY = parse_topology(TOPOLOGY_DATA, "pair.yml")
KINDS = ("build", "route", "disconnect", "del_route", "keepalive", "call", "shutdown", "test")


def _everything_at_once() -> Timeline:
    """One event of every kind the simulator records, all on the leaf at the same moment,
    as when a keepalive gives up and the disconnect follows within a millisecond."""
    timeline = Timeline(clock=lambda: 100.0)
    fields = {"call": {"path": "master -> leaf", "seconds": 0.001},
              "del_route": {"lost": "leaf", "seconds": 0.002}}
    for kind in KINDS:
        timeline.record(kind, host="top/leaf", **fields.get(kind, {}))
    timeline.record("something_new", host="top/leaf")
    return timeline


def test_every_event_kind_has_a_marker_of_its_own_height():
    events = _everything_at_once().events()
    lanes = ["master", "top", "leaf"]
    points = marker_points(events, TOPOLOGY, lanes)
    assert set(points) == {*KINDS, "something_new"}
    spots = [point for kind_points in points.values() for point in kind_points]
    assert len(set(spots)) == len(spots), "two kinds share a spot: one hides the other"
    for kind_points in points.values():
        assert all(lanes.index("leaf") < y < lanes.index("leaf") + 1 for _x, y in kind_points)


WRITE = """
import json, sys
from simulator.report import RunInfo, write_report
from simulator.topology import parse_topology
events, topology, info = json.load(sys.stdin)
paths = write_report(events, sys.argv[1], parse_topology(topology, "pair.yml"),
                     info=RunInfo(**info))
print(json.dumps(paths))
"""


def test_the_picture_draws_every_kind_and_the_title_names_the_run(tmp_path: Path):
    """In a subprocess, as matplotlib keeps its font files open for the process's life."""
    started = calendar.timegm((2026, 12, 1, 22, 0, 0))
    info = RunInfo(backend="docker", seeds="ci=42", started=started)
    given = [_everything_at_once().events(), TOPOLOGY_DATA, dataclasses.asdict(info)]
    done = subprocess.run([sys.executable, "-c", WRITE, str(tmp_path)], input=json.dumps(given),
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    paths = json.loads(done.stdout)
    assert {Path(p).name for p in paths} == {"summary.json", "summary.md", "timeline.png"}
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["run"]["title"] == run_title(TOPOLOGY, info) == \
        "pair: docker backend, seed ci=42, 2026-12-01 22:00:00 UTC"
    assert summary["keepalive_give_ups"] == 1 and summary["disconnects_seen"] == 1
    assert (tmp_path / "summary.md").read_text().startswith(
        "# Simulator report: pair: docker backend, seed ci=42, ")
    assert re.match(rb"\x89PNG", (tmp_path / "timeline.png").read_bytes())
