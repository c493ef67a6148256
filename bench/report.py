"""Turn the raw results of one benchmark run into ``RESULTS.md`` and PNG plots.

Usage::

    python bench/report.py --run bench/out/<timestamp>/run.json [--results PATH]
                           [--plots-dir DIR] [--plots-only | --no-plots]

The layout of ``RESULTS.md`` is fixed (same sections, rows and columns in the same order
whatever the data) so that two runs can be diffed line by line. Every implementation's
samples are pooled over the repetitions of a run; the spread shown is the range of the
per-repetition medians, which is what tells noise from a real difference on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

if __package__ in (None, ""):  # run as a script (in the tools venv): make ``bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import goals
from bench.stats import Stats, aggregate, fmt_value
from bench.stats import fmt_bytes as _fmt_bytes
from bench.stats import fmt_time as _fmt_time
from bench.stats import sig as _sig

__all__ = [
    "Stats",
    "Target",
    "aggregate",
    "load_run",
    "main",
    "render_results",
    "write_plots",
    "write_results",
]

IMPLS = ("ours", "mitogen", "execnet")
PEERS = ("mitogen", "execnet")
PLOT_FILES = ("targets.png", "fanout.png", "roundtrip.png", "hops.png", "tail.png")
COLOURS = {"ours": "tab:blue", "mitogen": "tab:orange", "execnet": "tab:green"}


@dataclass(frozen=True)
class Target:
    """A goal from the spec: a ratio to a peer, an absolute bound, or "no more than the peer"."""

    kind: str  # "ratio_le", "ratio_ge", "abs_le", "le_peer"
    bound: float = 0.0
    peer: str = "mitogen"
    #: The peer's metric, when it is not the same key: this prefix, then the key's last part
    #: (the machine's raw socketpair transfer of the same size as ours, for one).
    peer_metric: Optional[str] = None
    #: What to call the peer in the target's text, when its name alone would not say it.
    peer_label: Optional[str] = None

    def peer_key(self, key: str) -> str:
        if self.peer_metric is None:
            return key
        return self.peer_metric + key[key.rindex("."):]

    def describe(self, names: Dict[str, str]) -> str:
        peer = self.peer_label or names.get(self.peer, self.peer)
        if self.kind == "ratio_le":
            return f"<= {self.bound:g}x {peer}"
        if self.kind == "ratio_ge":
            return f">= {self.bound:g}x {peer}"
        if self.kind == "abs_le":
            return f"<= {_fmt_bytes(self.bound)}"
        return f"<= {peer}"

    def met(self, ours: Optional[Stats], peer: Optional[Stats]) -> Optional[bool]:
        """True or False, or None when the data to decide is missing."""
        if ours is None:
            return None
        if self.kind == "abs_le":
            return ours.headline <= self.bound
        if peer is None or peer.headline == 0:
            return None if self.kind != "le_peer" or peer is None else ours.headline <= 0
        ratio = ours.headline / peer.headline
        if self.kind == "ratio_le":
            return ratio <= self.bound
        if self.kind == "ratio_ge":
            return ratio >= self.bound
        return ours.headline <= peer.headline


@dataclass(frozen=True)
class Family:
    """A group of metric keys shown as one table: fixed keys, or every key under a prefix."""

    section: str
    keys: Tuple[str, ...]  # exact keys; a key ending in ".*" matches a whole prefix
    label: Callable[[str], str]
    target: Optional[Target] = None
    reverse: bool = False  # order of the keys a prefix matches: natural, or reversed
    also: Tuple[Target, ...] = ()  # further targets for the same metric


def _suffix(key: str) -> str:
    return key.split(".", 1)[1]


def _natural(key: str) -> Tuple:
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", key))


def _throughput_label(key: str) -> str:
    count, size = _suffix(key).split("x")
    if count == "1":
        return f"one {size[:-3]} MiB argument, child returns len"
    return f"{count} x {size[:-3]} MiB arguments in turn, child returns len"


def _size_label(key: str) -> str:
    size = key.rsplit(".", 1)[1]
    return size.replace("MiB", " MiB").replace("GiB", " GiB")


FAMILIES: Tuple[Family, ...] = (
    Family("Cold start", ("cold_start.first_child",),
           lambda k: "first child of a fresh master: create, first call returns",
           Target("ratio_le", 0.25)),
    Family("Cold start", ("cold_start.next_child",),
           lambda k: "later children of the same master"),
    Family("Round trip", ("roundtrip.call",),
           lambda k: "trivial call (os.getpid) to a warm child"),
    Family("Round trip", ("roundtrip_per_pipe.call",),
           lambda k: "its median over the raw pipe round trip of this run"),
    Family("Throughput", ("throughput.*",), _throughput_label, Target("ratio_ge", 10),
           reverse=True),
    Family("Tail under load", ("tail.idle",),
           lambda k: "round trip to a probe child, nothing else going on"),
    Family("Tail under load", ("tail.loaded",),
           lambda k: "the same while another child receives 256 MiB arguments back to back"),
    Family("Tail under load", ("tail_ratio.p99",),
           lambda k: "p99 under load over idle p99"),
    Family("Tail under load", ("tail.same_stream",),
           lambda k: "round trip to the child receiving them, one on its way (same stream)"),
    Family("Fan-out", ("fanout.*",), lambda k: (
        "1 child started, one call (wall)" if _suffix(k) == "1" else
        f"{_suffix(k)} children started concurrently, one call each (wall)")),
    Family("Fan-out", ("fanout_via.*",), lambda k: (
        f"{_suffix(k)} children started concurrently through one intermediate (wall)")),
    Family("Fan-out", ("fanout_cpu.*",), lambda k: (
        f"CPU per child, {_suffix(k)} started concurrently (master + children, user + sys)"
        if _suffix(k) != "1" else "CPU of 1 child started (master + child, user + sys)")),
    Family("Fan-out", ("fanout_cpu_per_start.*",),
           lambda k: f"the same, {_suffix(k)} {'child' if _suffix(k) == '1' else 'children'}, "
                     "over a bare interpreter start's CPU"),
    Family("Fan-out", ("fanout_via_cpu.*",),
           lambda k: f"CPU per child, {_suffix(k)} through one intermediate"),
    Family("Fan-out", ("fanout_via_cpu_per_start.*",),
           lambda k: "the same over a bare interpreter start's CPU"),
    Family("Multi-hop", ("multihop.*",),
           lambda k: f"trivial call through {_suffix(k)} hop{'s' if _suffix(k) != '1' else ''}"),
    Family("Multi-hop", ("multihop_added.*",),
           lambda k: f"added by hop {_suffix(k)} (median {_suffix(k)} hops - median "
                     f"{int(_suffix(k)) - 1})"),
    Family("asyncio", ("aio.*",), lambda k: "%s calls awaited at once from one event loop, "
           "%s children (wall); Mitogen: run_in_executor" % tuple(_suffix(k).split("x"))),
    Family("Remote import", ("remote_import.static",),
           lambda k: "first call into a 30-module package, static imports",
           Target("ratio_le", 0.5)),
    Family("Remote import", ("remote_import.static.get_module",),
           lambda k: "GET_MODULE round trips for it", Target("le_peer")),
    Family("Remote import", ("remote_import.importlib",),
           lambda k: "first call into a 30-module package, importlib at call time",
           Target("ratio_le", 0.5)),
    Family("Remote import", ("remote_import.importlib.get_module",),
           lambda k: "GET_MODULE round trips for it", Target("le_peer")),
    Family("Bootstrap bytes", ("bootstrap.payload",),
           lambda k: "payload sent to a new child after its command line",
           Target("abs_le", 16 * 1024)),
    Family("Bootstrap bytes", ("bootstrap.bytecode",),
           lambda k: "core bytecode also sent to a child on this machine (no compile there)"),
    Family("Bootstrap bytes", ("bootstrap.boot_command",),
           lambda k: "boot command line, without the interpreter path"),
    Family("Memory", ("memory.child_rss",), lambda k: "RSS of a fresh idle child",
           Target("ratio_le", 1.0)),
    Family("Memory", ("memory.master_per_child",),
           lambda k: "master RSS growth per connected child (64 started one by one)"),
    Family("Memory", ("memory.master_residual",),
           lambda k: "master RSS growth left once they have all disconnected (in all)"),
    Family("Memory", ("memory.master_leak_per_child",),
           lambda k: "left per child by a second cycle of as many (connect, disconnect)"),
    Family("Memory", ("memory.master_objects_kept_per_child",),
           lambda k: "Python objects kept per child by a further cycle, once its children are "
                     "reaped (tracemalloc; RSS above also holds allocator reserves)"),
    Family("1,000 children", ("scale.start",),
           lambda k: "1,000 children in one master (20 with --quick) started from 32 threads, "
                     "one call each (wall)"),
    Family("1,000 children", ("scale.shutdown",),
           lambda k: "all asked to shut down at once, until each has disconnected (wall)"),
    Family("1,000 children", ("scale.master_rss",), lambda k: "master RSS with all connected"),
    Family("1,000 children", ("scale.master_per_child",),
           lambda k: "master RSS growth per child (starting threads' arenas included)"),
    Family("1,000 children", ("scale.master_residual",),
           lambda k: "master RSS growth left once all have exited"),
    Family("1,000 children", ("scale.left_behind",),
           lambda k: "child processes not reaped and descriptors not closed after 30 s"),
    Family("Services", ("services.call_service",),
           lambda k: "call_service() round trip, trivial method of a service in a warm child",
           Target("ratio_le", 0.5)),
    Family("Files", ("files.file_service.*",),
           lambda k: f"FileService.get() of a {_size_label(k)} file by a local child",
           Target("ratio_ge", 3),
           also=(Target("ratio_ge", 0.5, peer="machine", peer_metric="files.socketpair",
                         peer_label="raw socketpair (same size, same run)"),)),
    Family("Files", ("files.push_file.*",),
           lambda k: f"PushFileService: {_size_label(k)} to 8 leaves behind one "
                     "intermediary, until every leaf has it (rate: bytes delivered)",
           Target("ratio_ge", 3)),
    Family("Files", ("files.master_memory.*",),
           lambda k: f"master RSS peak above idle during a {_size_label(k)} FileService "
                     "transfer", Target("abs_le", 64 * 1024 * 1024)),
    Family("SSH", ("ssh.connect",),
           lambda k: "connect over ssh to sshd on 127.0.0.1, first call returns"),
    Family("SSH", ("ssh_overhead.connect",),
           lambda k: "its overhead above a bare ssh host python3 -c print of this run"),
    Family("SSH", ("ssh.call",),
           lambda k: "trivial call (os.getpid) over the ssh connection", Target("ratio_le", 0.5)),
    Family("SSH", ("ssh.concurrent",),
           lambda k: "16 connections at once (4 with --quick), one account each, all first "
                     "calls returned (wall)"),
)

LIMIT_LABELS = {
    "limits.interpreter_start": "bare interpreter start: python -I -S -c pass",
    "limits.interpreter_start_cpu": "CPU of a bare interpreter start (user + sys)",
    "limits.pipe_rt": "pipe round trip, 64 bytes, between two Python processes",
    "limits.socketpair_rt": "socketpair round trip, 64 bytes",
    "limits.pipe_tp": "pipe throughput, one way",
    "limits.socketpair_tp": "socketpair throughput, one way",
    "ssh.login": "ssh login to the bench's sshd on 127.0.0.1: first output of echo",
    "ssh.login_python": "ssh login: first output of /usr/bin/python3 -c print",
    "ssh.login_python_concurrent": "16 such logins at once, one account each: the last one's "
                                   "first output",
}

#: Figures derived from others (``bench/goals.py``), by the workload whose records they need.
DERIVED_FROM = {"roundtrip_per_pipe": "roundtrip", "multihop_added": "multihop",
                "ssh_overhead": "ssh", "tail_ratio": "tail"}

#: Static text of the methods section (changes only when the harness does).
METHODS = """\
- Every number comes from the single run above. The implementations take turns inside each
  repetition (ours, Mitogen, execnet, ours, ...), each in a fresh process started with its own
  venv's interpreter, so that the machine's noise falls on all of them alike. Compare numbers
  only within one run.
- Cells read: median (p99, only over >= 100 samples; range of the per-repetition medians).
  Ratios are ours / peer of the medians; for throughput, of the rates (higher is better).
- Issue 16's targets compare ours with a reference of the same run: a peer's median (or p99),
  a limit of this machine (the raw pipe round trip), or ours idle. A target out of reach names
  the limit of the same run that is already above its bound: the raw pipe round trip for a
  round trip; for fan-out, N bare interpreter starts' CPU spread over the usable cores; for
  16 ssh connections, 16 bare ssh logins at once. Kept ratios are compared with
  `bench/baseline.json` (`python bench/report.py --run RUN --save-baseline PATH` records
  one).
- Calls are `ctx.call(os.getpid)` / `ctx.call(len, data)` through the Mitogen API
  (`bench/workloads/mitogen_api.py`, unchanged for ours and Mitogen). execnet has no call
  API: its "call" is one request/reply on a channel to a dispatch loop started once per
  gateway, and its gateways are `popen//python=...`, which ship execnet's source over the
  pipe as over ssh (`bench/workloads/execnet_api.py`). Multi-hop and remote import have no
  execnet counterpart (n/a).
- Cold start, first child: from `router.local()` to the first call's return in a fresh master,
  so it includes the master's one-time preparation of the bootstrap payload.
- Round trip: 5,000 calls after 500 of warm-up, per repetition. Multi-hop: a chain of 5
  contexts built with `via=`, the depths taking turns in rounds of 100 calls; "added by hop
  N" is the median through N hops less the median through N - 1.
- Tail under load: two children, a probe and a sink. Each round: 1,000 idle round trips to
  the probe; then round trips to the probe, back to back, for as long as another thread
  passes a 256 MiB bytes argument to the sink twice in a row (`ctx.call(len, data)`); then
  round trips to the sink itself while one more is on its way (execnet: on a second channel
  of the sink's gateway). Three rounds per repetition.
- Fan-out: one thread per child, each starting its child and calling it once; wall time of
  the whole. Through one intermediate: `router.local(via=intermediate)` (execnet:
  `popen//via=...`), the intermediate started first, untimed. CPU per child: user + system
  seconds of the master (every thread) and of every descendant, reaped (the workload is a
  child subreaper, so that grandchildren are counted too), from before the router exists to
  after it has shut down, divided by N; the intermediate's own CPU is included. The bare
  interpreter start's CPU is measured the same way (this process and the interpreter it
  waited for: its own share is the fork, exec and wait, as a master's is for a child).
- Remote import: a fresh child per variant, time of its first call into the package and the
  change in `router.get_stats()['get_module_count']`.
- Bootstrap bytes: Mitogen-API implementations through `mitogen.parent.Connection`
  (`get_preamble()`, `get_boot_command()`); execnet: bytes written to the child's stdin while
  its gateway is made (uncompressed source).
- Memory: VmRSS from /proc of a child right after its first call; the master's growth over 64
  more children started one by one after a first one (so one-time costs are not charged to
  them), after `gc.collect()`; what is left of it once those 64 have disconnected; and what a
  second cycle of 64 (connect, disconnect) leaves on top of that, per child. RSS counts what
  the allocators keep for reuse (glibc's free chunks, CPython's free pool blocks) and one-time
  costs a first cycle pays (a thread's read buffer, tables grown to 64 entries); the objects
  kept are the growth of tracemalloc's live total across one more cycle, measured between the
  ends of two traced cycles once each's children are reaped, after every RSS figure.
- 1,000 children: started from 32 threads (created, and each having made a call, before the
  baseline RSS), one call each, then all asked to shut down at once (execnet:
  `Group.terminate()`). Left behind: child processes still there (running or zombie) 30 s
  after the last disconnect, and descriptors open then that were not before, once the 32
  threads have exited too (a library may keep one per thread for the thread's life). An
  implementation whose children would need more than half of the memory available (measured
  on a first child's private pages) is not run, and the report says so. The open-file limit
  is raised as needed.
- SSH: one sshd for the whole run on 127.0.0.1, own config, host key and client key (login
  root, key only), started by the harness, with 16 accounts of its own for the concurrent
  connections (deleted at the end). `router.ssh(check_host_keys='ignore',
  python_path='/usr/bin/python3')`, `-F /dev/null` and no known_hosts files; execnet:
  `ssh=... -p PORT -i KEY -l root 127.0.0.1//python=/usr/bin/python3` with the same options.
  Connect: fresh connections one after another, each closed before the next; round trip:
  calls over the last one after a warm-up; connect overhead: the connect's median less the
  bare `ssh host python3 -c print`'s. 16 at once: one connection per account, each from its
  own thread, until every first call has returned; the bare counterpart keeps every session
  open until all have printed. The bare ssh logins use the same sshd and options. Skipped
  (with the reason) when not root or no sshd.
- A failed, timed-out or skipped run is listed under Failures; it never fails a test suite."""


def load_run(path: Path) -> Dict[str, Any]:
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or "meta" not in data or "records" not in data:
        raise ValueError(f"{path}: not a bench run (expected keys 'meta' and 'records')")
    return data


def _keys_of(family: Family, stats: Dict[Tuple[str, str], Stats]) -> List[str]:
    keys: List[str] = []
    for pattern in family.keys:
        if pattern.endswith(".*"):
            prefix = pattern[:-1]
            found = {k for (_, k) in stats if k.startswith(prefix)}
            keys.extend(sorted(found, key=_natural, reverse=family.reverse))
        else:
            keys.append(pattern)
    return keys


# Formatting ---------------------------------------------------------------------------------

def _fmt(value: float, stats: Stats) -> str:
    if stats.nbytes:
        return f"{_sig(value / 1e6)} MB/s"
    return fmt_value(value, stats.unit)


def _cell(stats: Stats) -> str:
    text = _fmt(stats.headline, stats)
    if stats.unit == "B" and len(stats.samples) == 1 and stats.headline >= 1024:
        text += f" ({stats.headline:,.0f} B)"
    extra = []
    if stats.p99 is not None and not stats.nbytes:
        extra.append(f"p99 {_fmt(stats.p99, stats)}")
    spread = stats.spread()
    if spread is not None:
        low, high = _fmt(spread[0], stats), _fmt(spread[1], stats)
        if low != high:  # identical repetitions: nothing to show
            extra.append(f"{low} to {high}")
    return text + (f" ({'; '.join(extra)})" if extra else "")


def _ratio(ours: Optional[Stats], peer: Optional[Stats]) -> str:
    if ours is None or peer is None or peer.headline <= 0 or ours.headline < 0:
        return "—"
    return f"{_sig(ours.headline / peer.headline)}x"


def _status(met: Optional[bool]) -> str:
    return {True: "met", False: "NOT met", None: "no data"}[met]


class Table:
    """Builds the run's tables: looks up cells, and explains a missing one."""

    def __init__(self, run: Dict[str, Any]) -> None:
        self.meta = run["meta"]
        self.records = run["records"]
        self.stats = aggregate(self.records)
        self.stats.update(goals.derive(self.stats))
        versions = self.meta.get("versions", {})
        self.names = {"ours": "ours", "machine": "this machine"}
        for impl, title in (("mitogen", "Mitogen"), ("execnet", "execnet")):
            version = (versions.get(impl) or {}).get("version")
            self.names[impl] = f"{title} {version}" if version else title

    def get(self, impl: str, key: str) -> Optional[Stats]:
        return self.stats.get((impl, key))

    def _attempts(self, impl: str, key: str) -> List[Dict[str, Any]]:
        prefix, suffix = key.split(".", 1)
        workload = "fanout" if prefix.startswith("fanout") else DERIVED_FROM.get(prefix, prefix)
        found = []
        for rec in self.records:
            if rec["impl"] != impl or rec["workload"] != workload:
                continue
            params = rec.get("params", {})
            if workload == "fanout" and (str(params.get("children")) != suffix or
                                         bool(params.get("via")) != ("_via" in prefix)):
                continue
            found.append(rec)
        return found

    def produced(self, impl: str, key: str) -> bool:
        """Whether this run should have given ``key`` for ``impl``: a job of its workload failed,
        or one gave that very metric. False when every job of the workload succeeded without it
        (the plan asked for other sizes) or there was no such job."""
        return any(not rec.get("ok") or key in rec.get("metrics", {})
                   for rec in self._attempts(impl, key))

    def attempted(self, impl: str, key: str) -> bool:
        """Whether this run had a job that should have measured ``key`` (it may have failed);
        False for a figure its plan (``--quick``, ``--only``) left out."""
        return bool(self._attempts(impl, key))

    def cell(self, impl: str, key: str) -> str:
        stats = self.get(impl, key)
        if stats is not None:
            return _cell(stats)
        attempts = self._attempts(impl, key)
        if not attempts:
            return "n/a"
        if all(rec.get("skipped") for rec in attempts):
            return "skipped"
        if any(rec.get("timed_out") for rec in attempts):
            return "timeout"
        if all(rec.get("ok") for rec in attempts):
            return "no data"  # a derived figure whose other half is missing
        return "failed"


def render_results(run: Dict[str, Any], plots: Sequence[str] = (),
                   baseline: Optional[Dict[str, Any]] = None) -> str:
    """The whole of RESULTS.md as text; ``baseline`` is the recorded run the kept ratios are
    compared with (``goals.load_baseline()``), or None."""
    table = Table(run)
    lines = ["# Benchmark results", ""]
    lines += _header(table)
    lines += _goal_lines(table)
    lines += _kept_lines(table, baseline)
    lines += ["", "## Targets of earlier issues", "",
              f"Ratio to {table.names['mitogen']} in the same run, medians.", "",
              f"| Metric | ours | {table.names['mitogen']} | ours/Mitogen | Target | Status |",
              "| --- | --- | --- | --- | --- | --- |"]
    sections: Dict[str, List[str]] = {}
    for family in FAMILIES:
        for key in _keys_of(family, table.stats):
            row = _metric_row(table, family, key)
            sections.setdefault(family.section, []).append(row)
            for target in (family.target, *family.also):
                if target is not None:
                    lines.append(_target_row(table, family, key, target))
    peer_cols = " | ".join(table.names[p] for p in PEERS)
    for section, rows in sections.items():
        lines += ["", f"## {section}", "",
                  f"| Metric | ours | {peer_cols} | ours/Mitogen | ours/execnet |",
                  "| --- | --- | --- | --- | --- | --- |", *rows]
    lines += ["", "## Physical limits of this machine", "",
              "Measured in the same run with the harness's interpreter and no library.", "",
              "| Limit | Value |", "| --- | --- |"]
    for key, label in LIMIT_LABELS.items():
        stats = table.get("machine", key)
        lines.append(f"| {label} | {_cell(stats) if stats else table.cell('machine', key)} |")
    lines += ["", "## Failures", ""]
    lines += _failures(table.records) or ["None."]
    lines += ["", "## Plots", ""]
    lines += [f"![{Path(p).stem}]({p})" for p in plots] or ["No plots (matplotlib missing)."]
    lines += ["", "## How it is measured", "", METHODS, ""]
    return "\n".join(lines)


GOALS_INTRO = ("Each against a reference from this same run: a peer's figure, a limit of this "
               "machine, or ours idle. \"Out of reach\" names the limit of this run that is "
               "already above the bound.")


def _goal_lines(table: Table) -> List[str]:
    """Issue 16's targets, one status line each (``bench/goals.py``)."""
    return ["", "## Targets of issue 16", "", GOALS_INTRO, "", *_goal_table(table)]


def _goal_table(table: Table) -> List[str]:
    lines = ["| Target | ours | reference | ours / reference | target | status |",
             "| --- | --- | --- | --- | --- | --- |"]
    for goal in goals.GOALS:
        verdict = goals.evaluate(goal, table.stats, table.meta)
        lines.append(_goal_row(table, verdict))
    return lines


def _goal_row(table: Table, verdict: goals.Verdict) -> str:
    goal, ref = verdict.goal, verdict.goal.reference
    suffix = " (p99)" if goal.stat == "p99" else ""
    ours = (fmt_value(verdict.ours, verdict.unit) + suffix if verdict.ours is not None
            else table.cell("ours", goal.key))
    if ref.impl == "fixed":
        reference = "—"
    else:
        who = "ours idle" if ref.impl == "ours" else table.names.get(ref.impl, ref.impl)
        value = (fmt_value(verdict.reference, verdict.unit) if verdict.reference is not None
                 else table.cell(ref.impl, ref.key or goal.key))
        reference = f"{who}: {value}" + (" (p99)" if ref.stat == "p99" else "")
    ratio = f"{_sig(verdict.ratio)}x" if verdict.ratio is not None else "—"
    bound = f"<= {goal.factor:g}x" if ref.impl != "fixed" else \
        f"<= {fmt_value(goal.factor * ref.amount, verdict.unit)}"
    status = verdict.status()
    if status == "no data" and verdict.missing and all(
            not table.attempted(impl, key) for impl, key in verdict.missing):
        status = "not in this run"
    elif status == "no data" and verdict.missing:
        status += " (" + ", ".join(f"{table.names.get(i, i)} {k}: {table.cell(i, k)}"
                                   for i, k in verdict.missing) + ")"
    return f"| {goal.section}: {goal.text} | {ours} | {reference} | {ratio} | {bound} | " \
           f"{status} |"


def _kept_lines(table: Table, baseline: Optional[Dict[str, Any]]) -> List[str]:
    """The ratios that must not slip by more than 5 % against the recorded baseline."""
    return ["", "## Kept ratios", "", _kept_intro(baseline), "",
            *_kept_table(table, baseline)]


def _kept_intro(baseline: Optional[Dict[str, Any]]) -> str:
    return ("Each ratio to a peer must stay within 5 % of its ratio in the baseline run, "
            "or get better (throughput: ratio of the rates, higher is better; the others: "
            f"of the medians, lower is better); {goals.describe_source(baseline)}.")


def _kept_table(table: Table, baseline: Optional[Dict[str, Any]]) -> List[str]:
    lines = ["| Metric | against | ratio then | ratio now | status |",
             "| --- | --- | --- | --- | --- |"]
    for kept in goals.kept_rows(table.stats, baseline):
        then = f"{_sig(kept.baseline)}x" if kept.baseline is not None else "—"
        now = f"{_sig(kept.now)}x" if kept.now is not None else \
            f"{table.cell('ours', kept.key)} / {table.cell(kept.peer, kept.key)}"
        status = kept.status()
        if kept.now is None and not (table.produced("ours", kept.key) or
                                     table.produced(kept.peer, kept.key)):
            status = "not in this run"  # the plan measured other sizes (--quick) or no such step
            now = "—"
        lines.append(f"| {_label_of(kept.key)} | {table.names[kept.peer]} | {then} | {now} | "
                     f"{status} |")
    return lines


def _label_of(key: str) -> str:
    """"Section: label" of a metric, from the family that shows it."""
    for family in FAMILIES:
        if any(key == pattern or (pattern.endswith(".*") and key.startswith(pattern[:-1]))
               for pattern in family.keys):
            return f"{family.section}: {family.label(key)}"
    return key


def _header(table: Table) -> List[str]:
    meta, machine = table.meta, table.meta.get("machine", {})
    versions = meta.get("versions", {})
    memory = machine.get("memory")
    load = meta.get("loadavg_start"), meta.get("loadavg_end")
    lines = [
        f"- Date: {meta.get('date', '?')} ({meta.get('mode', '?')} run"
        f"{'' if meta.get('complete') else ', partial'}"
        + (f", {meta['duration']:.0f} s" if "duration" in meta else "") + ")",
        f"- Command: `{meta.get('command', '?')}`",
        f"- Machine: {machine.get('cpu', '?')}, {machine.get('cores', '?')} cores "
        f"({machine.get('usable_cores', '?')} usable), "
        f"{_fmt_bytes(memory) if memory else '? memory'}, {machine.get('kernel', '?')}",
        "- Load average (1/5/15 min) at start: "
        + (" / ".join(f"{x:.2f}" for x in load[0]) if load[0] else "?")
        + "; at end: " + (" / ".join(f"{x:.2f}" for x in load[1]) if load[1] else "?"),
        f"- Harness Python: {machine.get('harness_python', '?')}",
    ]
    for impl in IMPLS:
        info = versions.get(impl)
        if info is None:
            continue
        if impl == "ours":
            what = f"ours: mitogen-tree {info.get('version') or '(not installed)'}"
            what += f" at {info['commit']}" if info.get("commit") else ""
        else:
            what = table.names[impl] + ("" if info.get("version") else " (not installed)")
        lines.append(f"- {what}, Python {info.get('python') or '?'}, venv `bench/.venvs/{impl}`"
                     f" (`pip install {info.get('requirement', '?')}`)")
    return lines


def _metric_row(table: Table, family: Family, key: str) -> str:
    cells = [table.cell(impl, key) for impl in IMPLS]
    ours = table.get("ours", key)
    ratios = [_ratio(ours, table.get(peer, key)) for peer in PEERS]
    return f"| {family.label(key)} | " + " | ".join(cells + ratios) + " |"


def _target_row(table: Table, family: Family, key: str, target: Target) -> str:
    peer_key = target.peer_key(key)
    ours, peer = table.get("ours", key), table.get(target.peer, peer_key)
    label = f"{family.section}: {family.label(key)}"
    return (f"| {label} | {table.cell('ours', key)} | {table.cell(target.peer, peer_key)} | "
            f"{_ratio(ours, peer)} | {target.describe(table.names)} | "
            f"{_status(target.met(ours, peer))} |")


def _failures(records: Sequence[Dict[str, Any]]) -> List[str]:
    """One line per (implementation, workload, error), with how many runs it hit."""
    groups: Dict[Tuple[str, str, str], List[int]] = {}
    totals: Dict[Tuple[str, str], int] = {}
    for rec in records:
        totals[(rec["impl"], rec["workload"])] = totals.get((rec["impl"], rec["workload"]), 0) + 1
        if rec.get("ok"):
            continue
        error = (rec.get("error") or "unknown error").strip().splitlines()[0][:240]
        groups.setdefault((rec["impl"], rec["workload"], error), []).append(1)
    lines = []
    for (impl, workload, error), hits in sorted(groups.items()):
        lines.append(f"- {impl} / {workload} ({len(hits)} of {totals[(impl, workload)]} runs): "
                     f"{error.replace('|', '/')}")
    return lines


README_START = "<!-- bench-table:start -->"
README_END = "<!-- bench-table:end -->"


def render_readme_block(run: Dict[str, Any], baseline: Optional[Dict[str, Any]] = None) -> str:
    """The README's benchmark tables, from one complete run: issue 16's targets and the kept
    ratios, with the run's date, command, code and load, between the block's markers."""
    table = Table(run)
    meta = table.meta
    load = meta.get("loadavg_start"), meta.get("loadavg_end")
    commit = ((meta.get("versions") or {}).get("ours") or {}).get("commit") or "?"
    duration = f", {meta['duration'] / 60:.0f} min" if "duration" in meta else ""
    when = (f"Generated from the run of {meta.get('date', '?')}{duration}: "
            f"`{meta.get('command', '?')}`, ours at {commit}, "
            f"{(meta.get('machine') or {}).get('cores', '?')} cores, load average "
            + (f"{load[0][0]:.1f} at its start and {load[1][0]:.1f} at its end"
               if load[0] and load[1] else "unknown")
            + " (all figures in [`bench/RESULTS.md`](bench/RESULTS.md)).")
    lines = [README_START, when, "", GOALS_INTRO, "", *_goal_table(table), "",
             _kept_intro(baseline), "", *_kept_table(table, baseline), README_END]
    return "\n".join(lines)


def update_readme(path: Path, block: str) -> Path:
    """Replace the README's generated block (between its markers) with ``block``."""
    path = Path(path)
    text = path.read_text()
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        raise ValueError(f"{path}: no {README_START} ... {README_END} block to replace")
    path.write_text(text[:start] + block + text[end + len(README_END):])
    return path


def write_results(run: Dict[str, Any], path: Path, plots: Sequence[Path] = (),
                  baseline: Optional[Dict[str, Any]] = None) -> Path:
    """Write RESULTS.md, linking the plots relative to it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rel = [_relative(Path(p), path.parent) for p in plots]
    path.write_text(render_results(run, rel, baseline))
    return path


def _relative(target: Path, base: Path) -> str:
    try:
        return str(target.resolve().relative_to(base.resolve()))
    except ValueError:
        return str(target.resolve())


# Plots --------------------------------------------------------------------------------------

def write_plots(run: Dict[str, Any], directory: Path) -> List[Path]:
    """Draw every target against its bound, the fan-out curve, the round-trip distribution,
    the hop latencies and the tail under load as PNGs (``PLOT_FILES``, in that order)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = Table(run)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    drawers = (_plot_targets, _plot_fanout, _plot_roundtrip, _plot_hops, _plot_tail)
    for name, draw in zip(PLOT_FILES, drawers):
        size = (8, 7) if draw is _plot_targets else (7, 4.5)
        fig, ax = plt.subplots(figsize=size, dpi=100)
        try:
            if not draw(ax, table):
                ax.text(0.5, 0.5, "no data in this run", ha="center", va="center",
                        transform=ax.transAxes)
            ax.grid(True, which="both", alpha=0.3)
            fig.tight_layout()
            path = directory / name
            fig.savefig(path, metadata={"Software": None})
            paths.append(path)
        finally:
            plt.close(fig)
    return paths


def _plain_log_labels(axis: Any) -> None:
    """Label a log axis with plain numbers: at 1, 2 and 5 times each power of ten over a short
    range, at the powers of ten only over a long one (where more labels would collide)."""
    from matplotlib.ticker import FuncFormatter

    def label(value: float, _pos: int) -> str:
        low, high = sorted(axis.get_view_interval())
        if value <= 0 or low <= 0:
            return ""
        wanted = (1, 2, 5) if math.log10(high / low) <= 2.5 else (1,)
        mantissa = round(value / 10 ** math.floor(math.log10(value)))
        return f"{value:g}" if mantissa in wanted else ""

    axis.set_major_formatter(FuncFormatter(label))
    axis.set_minor_formatter(FuncFormatter(label))


def _plot_targets(ax: Any, table: Table) -> bool:
    """Every target of issue 16 as ours over its bound (left of 1 is met, log scale), with
    the machine's floor over the same bound where the run measured one."""
    rows = []
    for goal in goals.GOALS:
        verdict = goals.evaluate(goal, table.stats, table.meta)
        if verdict.ours is not None and verdict.bound and not verdict.below_noise:
            floor = verdict.floor / verdict.bound if verdict.floor is not None else None
            rows.append((goal.label, verdict.ours / verdict.bound, bool(verdict.met), floor))
    if not rows:
        return False
    ys = list(range(len(rows)))[::-1]
    for y, (_, ratio, met, floor) in zip(ys, rows):
        ax.plot([1, max(ratio, 1e-3)], [y, y], color="tab:green" if met else "tab:red",
                linewidth=4, solid_capstyle="butt")
        if floor is not None:
            ax.plot([max(floor, 1e-3)], [y], marker="|", markersize=14, color="black")
    ax.axvline(1.0, color="grey", linestyle="--")
    ax.set_xscale("log")
    _plain_log_labels(ax.xaxis)
    ax.set_yticks(ys)
    ax.set_yticklabels([label for label, *_ in rows], fontsize=8)
    ax.set_xlabel("ours / bound (green: met; black tick: the machine's floor / bound)")
    ax.set_title("Issue 16's targets in this run (those without data left out)")
    return True


def _plot_fanout(ax: Any, table: Table) -> bool:
    drawn = False
    for impl in IMPLS:
        for prefix, marker, line, via in (("fanout.", "o", "-", ""),
                                          ("fanout_via.", "s", ":", " through one")):
            points = sorted((int(_suffix(key)), stats) for (who, key), stats
                            in table.stats.items() if who == impl and key.startswith(prefix))
            if not points:
                continue
            xs = [n for n, _ in points]
            ys = [s.median for _, s in points]
            lo = [s.median - min(s.run_medians) for _, s in points]
            hi = [max(s.run_medians) - s.median for _, s in points]
            ax.errorbar(xs, ys, yerr=[lo, hi], marker=marker, linestyle=line, capsize=3,
                        label=table.names[impl] + via, color=COLOURS[impl])
            drawn = True
    from matplotlib.ticker import FixedLocator, ScalarFormatter

    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    sizes = sorted({int(_suffix(key)) for (_, key) in table.stats if key.startswith("fanout.")})
    start_cpu = table.get("machine", "limits.interpreter_start_cpu")
    cores = (table.meta.get("machine") or {}).get("usable_cores") or 1
    if sizes and start_cpu is not None:
        ax.plot(sizes, [n * start_cpu.median / cores for n in sizes], color="grey",
                linestyle="--", label=f"N bare starts' CPU over {cores} cores")
    if sizes:
        ax.xaxis.set_major_locator(FixedLocator(sizes))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    _plain_log_labels(ax.yaxis)
    ax.set_xlabel("children started concurrently")
    ax.set_ylabel("wall time to all first calls (s)")
    ax.set_title("Fan-out (median, range of repetitions)")
    if drawn:
        ax.legend()
    return drawn


def _plot_roundtrip(ax: Any, table: Table) -> bool:
    drawn = False
    for impl in IMPLS:
        stats = table.get(impl, "roundtrip.call")
        if stats is None:
            continue
        xs = sorted(s * 1e6 for s in stats.samples)
        ys = [(i + 1) / len(xs) for i in range(len(xs))]
        ax.plot(xs, ys, label=f"{table.names[impl]} (median {_fmt_time(stats.median)})",
                color=COLOURS[impl])
        drawn = True
    floor = table.get("machine", "limits.pipe_rt")
    if floor is not None:
        ax.axvline(floor.median * 1e6, color="grey", linestyle="--",
                   label=f"raw pipe round trip ({_fmt_time(floor.median)})")
    ax.set_xscale("log")
    _plain_log_labels(ax.xaxis)
    ax.set_xlabel("round trip (µs)")
    ax.set_ylabel("fraction of calls")
    ax.set_title("Trivial call round trip: distribution")
    if drawn:
        ax.legend(loc="lower right")
    return drawn


def _plot_hops(ax: Any, table: Table) -> bool:
    drawn = False
    depths: List[int] = []
    for impl in IMPLS:
        points = sorted((int(_suffix(key)), stats) for (who, key), stats in table.stats.items()
                        if who == impl and key.startswith("multihop."))
        if not points:
            continue
        xs = [n for n, _ in points]
        depths = sorted(set(depths) | set(xs))
        ax.plot(xs, [s.median * 1e6 for _, s in points], marker="o", color=COLOURS[impl],
                label=f"{table.names[impl]} median")
        p99 = [(n, s.p99) for n, s in points if s.p99 is not None]
        if p99:
            ax.plot([n for n, _ in p99], [v * 1e6 for _, v in p99], marker="x",
                    linestyle="--", color=COLOURS[impl], label=f"{table.names[impl]} p99")
        drawn = True
    pipe, first = table.get("machine", "limits.pipe_rt"), table.get("ours", "multihop.1")
    if depths and pipe is not None and first is not None:
        ax.plot(depths, [(first.median + 2 * (n - 1) * pipe.median) * 1e6 for n in depths],
                color="grey", linestyle=":", label="target: ours at 1 hop + 2x pipe per hop")
    ax.set_xticks(depths or [1, 2, 3, 4, 5])
    ax.set_xlabel("hops (via=)")
    ax.set_ylabel("round trip (µs)")
    ax.set_ylim(bottom=0)
    ax.set_title("Trivial call through a chain of contexts")
    if drawn:
        ax.legend(fontsize=8)
    return drawn


def _plot_tail(ax: Any, table: Table) -> bool:
    """Distribution of the probe's round trips, idle (dashed) and while another child
    receives big arguments (solid)."""
    drawn = False
    for impl in IMPLS:
        for key, line, what in (("tail.idle", "--", "idle"), ("tail.loaded", "-", "loaded")):
            stats = table.get(impl, key)
            if stats is None:
                continue
            xs = sorted(s * 1e6 for s in stats.samples)
            ys = [(i + 1) / len(xs) for i in range(len(xs))]
            p99 = f", p99 {_fmt_time(stats.p99)}" if stats.p99 is not None else ""
            ax.plot(xs, ys, linestyle=line, color=COLOURS[impl],
                    label=f"{table.names[impl]} {what}{p99}")
            drawn = True
    ax.set_xscale("log")
    _plain_log_labels(ax.xaxis)
    ax.set_xlabel("round trip to the probe child (µs)")
    ax.set_ylabel("fraction of calls")
    ax.set_title("Tail under load: another child receiving 256 MiB arguments")
    if drawn:
        ax.legend(loc="lower right", fontsize=8)
    return drawn


# Command line -------------------------------------------------------------------------------

def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/report.py", description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="run.json written by run.py")
    parser.add_argument("--results", type=Path, help="RESULTS.md to write "
                        "(default: next to run.json)")
    parser.add_argument("--plots-dir", type=Path, help="where PNGs go (default: beside "
                        "RESULTS.md)")
    parser.add_argument("--baseline", type=Path, default=goals.BASELINE,
                        help="the recorded run the kept ratios are compared with "
                             "(default: bench/baseline.json)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--plots-only", action="store_true", help="print plot paths, no md")
    group.add_argument("--no-plots", action="store_true")
    group.add_argument("--save-baseline", type=Path, metavar="PATH",
                       help="record this run's kept ratios as the baseline in PATH, and stop")
    group.add_argument("--readme", type=Path, metavar="PATH",
                       help="rewrite the benchmark tables in README PATH from this run, and "
                            "stop")
    args = parser.parse_args(argv)
    run = load_run(args.run)
    if args.save_baseline:
        print(goals.save_baseline(run, Table(run).stats, args.save_baseline))
        return 0
    if args.readme:
        block = render_readme_block(run, goals.load_baseline(args.baseline))
        print(update_readme(args.readme, block))
        return 0
    results = args.results or args.run.parent / "RESULTS.md"
    plots_dir = args.plots_dir or results.parent
    plots = [] if args.no_plots else write_plots(run, plots_dir)
    if args.plots_only:
        print("\n".join(str(p) for p in plots))
        return 0
    write_results(run, results, plots, goals.load_baseline(args.baseline))
    print(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
