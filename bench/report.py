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
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

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
P99_MIN_SAMPLES = 100
PLOT_FILES = ("fanout.png", "roundtrip.png", "hops.png")
COLOURS = {"ours": "tab:blue", "mitogen": "tab:orange", "execnet": "tab:green"}


@dataclass(frozen=True)
class Stats:
    """One implementation's numbers for one metric, pooled over the run's repetitions."""

    unit: str
    samples: Tuple[float, ...]
    run_medians: Tuple[float, ...]
    nbytes: Optional[int] = None  # set for transfers: the figure shown is a rate

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def p99(self) -> Optional[float]:
        """Nearest-rank 99th percentile, only where there are enough samples to mean it."""
        if len(self.samples) < P99_MIN_SAMPLES:
            return None
        ordered = sorted(self.samples)
        return ordered[math.ceil(0.99 * len(ordered)) - 1]

    @property
    def headline(self) -> float:
        """The number compared across implementations: the median, or the median's rate."""
        return self.nbytes / self.median if self.nbytes else self.median

    def spread(self) -> Optional[Tuple[float, float]]:
        if len(self.run_medians) < 2:
            return None
        values = [self.nbytes / m for m in self.run_medians] if self.nbytes else \
            list(self.run_medians)
        return min(values), max(values)


@dataclass(frozen=True)
class Target:
    """A goal from the spec: a ratio to a peer, an absolute bound, or "no more than the peer"."""

    kind: str  # "ratio_le", "ratio_ge", "abs_le", "le_peer"
    bound: float = 0.0
    peer: str = "mitogen"
    #: The peer's metric, when it is not the same key: this prefix, then the key's last part
    #: (the machine's raw socketpair transfer of the same size as ours, for one).
    peer_metric: Optional[str] = None

    def peer_key(self, key: str) -> str:
        if self.peer_metric is None:
            return key
        return self.peer_metric + key[key.rindex("."):]

    def describe(self, names: Dict[str, str]) -> str:
        peer = names.get(self.peer, self.peer)
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
           lambda k: "trivial call (os.getpid) to a warm child", Target("ratio_le", 0.25)),
    Family("Throughput", ("throughput.*",), _throughput_label, Target("ratio_ge", 10),
           reverse=True),
    Family("Fan-out", ("fanout.*",), lambda k: (
        "1 child started, one call (wall)" if _suffix(k) == "1" else
        f"{_suffix(k)} children started concurrently, one call each (wall)")),
    Family("Multi-hop", ("multihop.*",),
           lambda k: f"trivial call through {_suffix(k)} hop{'s' if _suffix(k) != '1' else ''}",
           Target("ratio_le", 0.25)),
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
    Family("Bootstrap bytes", ("bootstrap.boot_command",),
           lambda k: "boot command line, without the interpreter path"),
    Family("Memory", ("memory.child_rss",), lambda k: "RSS of a fresh idle child",
           Target("ratio_le", 1.0)),
    Family("Memory", ("memory.master_per_child",),
           lambda k: "master RSS growth per connected child"),
    Family("Services", ("services.call_service",),
           lambda k: "call_service() round trip, trivial method of a service in a warm child",
           Target("ratio_le", 0.5)),
    Family("Files", ("files.file_service.*",),
           lambda k: f"FileService.get() of a {_size_label(k)} file by a local child",
           Target("ratio_ge", 3),
           also=(Target("ratio_ge", 0.5, peer="machine", peer_metric="files.socketpair"),)),
    Family("Files", ("files.push_file.*",),
           lambda k: f"PushFileService: {_size_label(k)} to 8 leaves behind one "
                     "intermediary, until every leaf has it (rate: bytes delivered)",
           Target("ratio_ge", 3)),
    Family("Files", ("files.master_memory.*",),
           lambda k: f"master RSS peak above idle during a {_size_label(k)} FileService "
                     "transfer", Target("abs_le", 64 * 1024 * 1024)),
    Family("SSH", ("ssh.connect",),
           lambda k: "connect over ssh to sshd on 127.0.0.1, first call returns",
           Target("ratio_le", 0.5)),
    Family("SSH", ("ssh.call",),
           lambda k: "trivial call (os.getpid) over the ssh connection", Target("ratio_le", 0.5)),
)

LIMIT_LABELS = {
    "limits.interpreter_start": "bare interpreter start: python -I -S -c pass",
    "limits.pipe_rt": "pipe round trip, 64 bytes, between two Python processes",
    "limits.socketpair_rt": "socketpair round trip, 64 bytes",
    "limits.pipe_tp": "pipe throughput, one way",
    "limits.socketpair_tp": "socketpair throughput, one way",
    "ssh.login": "ssh login to the bench's sshd on 127.0.0.1: first output of echo",
    "ssh.login_python": "ssh login: first output of /usr/bin/python3 -c print",
}

#: Static text of the methods section (changes only when the harness does).
METHODS = """\
- Every number comes from the single run above. The implementations take turns inside each
  repetition (ours, Mitogen, execnet, ours, ...), each in a fresh process started with its own
  venv's interpreter, so that the machine's noise falls on all of them alike. Compare numbers
  only within one run.
- Cells read: median (p99, only over >= 100 samples; range of the per-repetition medians).
  Ratios are ours / peer of the medians; for throughput, of the rates (higher is better).
- Calls are `ctx.call(os.getpid)` / `ctx.call(len, data)` through the Mitogen API
  (`bench/workloads/mitogen_api.py`, unchanged for ours and Mitogen). execnet has no call
  API: its "call" is one request/reply on a channel to a dispatch loop started once per
  gateway, and its gateways are `popen//python=...`, which ship execnet's source over the
  pipe as over ssh (`bench/workloads/execnet_api.py`). Multi-hop and remote import have no
  execnet counterpart (n/a).
- Cold start, first child: from `router.local()` to the first call's return in a fresh master,
  so it includes the master's one-time preparation of the bootstrap payload.
- Fan-out: one thread per child, each starting its child and calling it once; wall time of
  the whole. Remote import: a fresh child per variant, time of its first call into the
  package and the change in `router.get_stats()['get_module_count']`.
- Bootstrap bytes: Mitogen-API implementations through `mitogen.parent.Connection`
  (`get_preamble()`, `get_boot_command()`); execnet: bytes written to the child's stdin while
  its gateway is made (uncompressed source).
- Memory: VmRSS from /proc of a child right after its first call; master growth over 16 more
  children after a first one (so one-time costs are not charged to them).
- SSH: one sshd for the whole run on 127.0.0.1, own config, host key and client key (login
  root, key only), started by the harness. `router.ssh(check_host_keys='ignore',
  python_path='/usr/bin/python3')`, `-F /dev/null` and no known_hosts files; execnet:
  `ssh=... -p PORT -i KEY -l root 127.0.0.1//python=/usr/bin/python3` with the same options.
  Connect: fresh connections one after another, each closed before the next; round trip:
  calls over the last one after a warm-up. The bare ssh logins under the physical limits use
  the same sshd and options. Skipped (with the reason) when not root or no sshd.
- A failed, timed-out or skipped run is listed under Failures; it never fails a test suite."""


def load_run(path: Path) -> Dict[str, Any]:
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or "meta" not in data or "records" not in data:
        raise ValueError(f"{path}: not a bench run (expected keys 'meta' and 'records')")
    return data


def aggregate(records: Sequence[Dict[str, Any]]) -> Dict[Tuple[str, str], Stats]:
    """Pool each (implementation, metric)'s samples over every record that has them."""
    pooled: Dict[Tuple[str, str], List[Dict[str, Any]]] = {}
    for rec in records:
        for key, metric in (rec.get("metrics") or {}).items():
            if metric.get("samples"):
                pooled.setdefault((rec["impl"], key), []).append(metric)
    stats = {}
    for (impl, key), metrics in pooled.items():
        samples = tuple(s for m in metrics for s in m["samples"])
        stats[(impl, key)] = Stats(
            unit=metrics[0]["unit"], samples=samples,
            run_medians=tuple(statistics.median(m["samples"]) for m in metrics),
            nbytes=metrics[0].get("bytes"))
    return stats


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

def _fmt_time(seconds: float) -> str:
    for scale, unit in ((1.0, "s"), (1e-3, "ms"), (1e-6, "µs")):
        if seconds >= scale or unit == "µs":
            return f"{_sig(seconds / scale)} {unit}"
    raise AssertionError("unreachable")


def _sig(value: float) -> str:
    """Three significant figures, without scientific notation."""
    if value == 0:
        return "0"
    digits = max(0, 2 - math.floor(math.log10(abs(value))))
    return f"{value:.{digits}f}"


def _fmt_bytes(value: float) -> str:
    if abs(value) >= 1 << 30:
        return f"{_sig(value / (1 << 30))} GiB"
    if abs(value) >= 1 << 20:
        return f"{_sig(value / (1 << 20))} MiB"
    if abs(value) >= 1 << 10:
        return f"{_sig(value / 1024)} KiB"
    return f"{value:,.0f} B"


def _fmt(value: float, stats: Stats) -> str:
    if stats.nbytes:
        return f"{_sig(value / 1e6)} MB/s"
    if stats.unit == "s":
        return _fmt_time(value)
    if stats.unit == "B":
        return _fmt_bytes(value)
    return f"{value:g}"


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
    if ours is None or peer is None or peer.headline == 0:
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
        versions = self.meta.get("versions", {})
        self.names = {"ours": "ours", "machine": "raw socketpair (same size, same run)"}
        for impl, title in (("mitogen", "Mitogen"), ("execnet", "execnet")):
            version = (versions.get(impl) or {}).get("version")
            self.names[impl] = f"{title} {version}" if version else title

    def get(self, impl: str, key: str) -> Optional[Stats]:
        return self.stats.get((impl, key))

    def _attempts(self, impl: str, key: str) -> List[Dict[str, Any]]:
        workload, suffix = key.split(".", 1)
        found = []
        for rec in self.records:
            if rec["impl"] != impl or rec["workload"] != workload:
                continue
            if workload == "fanout" and str(rec.get("params", {}).get("children")) != suffix:
                continue
            found.append(rec)
        return found

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
        return "failed"


def render_results(run: Dict[str, Any], plots: Sequence[str] = ()) -> str:
    """The whole of RESULTS.md as text."""
    table = Table(run)
    lines = ["# Benchmark results", ""]
    lines += _header(table)
    lines += ["", "## Targets", "",
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


def write_results(run: Dict[str, Any], path: Path, plots: Sequence[Path] = ()) -> Path:
    """Write RESULTS.md, linking the plots relative to it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rel = [_relative(Path(p), path.parent) for p in plots]
    path.write_text(render_results(run, rel))
    return path


def _relative(target: Path, base: Path) -> str:
    try:
        return str(target.resolve().relative_to(base.resolve()))
    except ValueError:
        return str(target.resolve())


# Plots --------------------------------------------------------------------------------------

def write_plots(run: Dict[str, Any], directory: Path) -> List[Path]:
    """Draw the fan-out curve, the round-trip distribution and the hop latencies as PNGs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = Table(run)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, draw in zip(PLOT_FILES, (_plot_fanout, _plot_roundtrip, _plot_hops)):
        fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
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


def _plot_fanout(ax: Any, table: Table) -> bool:
    drawn = False
    for impl in IMPLS:
        points = sorted((int(_suffix(key)), stats) for (who, key), stats in table.stats.items()
                        if who == impl and key.startswith("fanout."))
        if not points:
            continue
        xs = [n for n, _ in points]
        ys = [s.median for _, s in points]
        lo = [s.median - min(s.run_medians) for _, s in points]
        hi = [max(s.run_medians) - s.median for _, s in points]
        ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=table.names[impl],
                    color=COLOURS[impl])
        drawn = True
    from matplotlib.ticker import FixedLocator, ScalarFormatter

    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    sizes = sorted({int(_suffix(key)) for (_, key) in table.stats if key.startswith("fanout.")})
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
    for impl in IMPLS:
        points = sorted((int(_suffix(key)), stats) for (who, key), stats in table.stats.items()
                        if who == impl and key.startswith("multihop."))
        if not points:
            continue
        xs = [n for n, _ in points]
        ax.plot(xs, [s.median * 1e6 for _, s in points], marker="o", color=COLOURS[impl],
                label=f"{table.names[impl]} median")
        p99 = [(n, s.p99) for n, s in points if s.p99 is not None]
        if p99:
            ax.plot([n for n, _ in p99], [v * 1e6 for _, v in p99], marker="x",
                    linestyle="--", color=COLOURS[impl], label=f"{table.names[impl]} p99")
        drawn = True
    ax.set_xticks([1, 2, 3])
    ax.set_xlabel("hops (via=)")
    ax.set_ylabel("round trip (µs)")
    ax.set_ylim(bottom=0)
    ax.set_title("Trivial call through a chain of contexts")
    if drawn:
        ax.legend()
    return drawn


# Command line -------------------------------------------------------------------------------

def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/report.py", description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="run.json written by run.py")
    parser.add_argument("--results", type=Path, help="RESULTS.md to write "
                        "(default: next to run.json)")
    parser.add_argument("--plots-dir", type=Path, help="where PNGs go (default: beside "
                        "RESULTS.md)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--plots-only", action="store_true", help="print plot paths, no md")
    group.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    run = load_run(args.run)
    results = args.results or args.run.parent / "RESULTS.md"
    plots_dir = args.plots_dir or results.parent
    plots = [] if args.no_plots else write_plots(run, plots_dir)
    if args.plots_only:
        print("\n".join(str(p) for p in plots))
        return 0
    write_results(run, results, plots)
    print(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
