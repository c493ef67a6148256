"""Run every workload on this project, Mitogen 0.3.54 and execnet 2.1 in one go; write the report.

Usage::

    python bench/run.py [--quick] [--only WORKLOAD,...] [--impls IMPL,...] [--out bench/out]

Each implementation runs in its own venv under ``bench/.venvs/`` (built on first use, then
reused), through a workload script started as a fresh process with that venv's interpreter.
Within every repetition the implementations take turns (ours, mitogen, execnet, ours, ...),
so that the noise of a shared machine falls on all of them alike; numbers are only compared
within one run. Each process has a time limit: on expiry its whole process group is killed
and the timeout is recorded. A failing implementation (ours, until its core exists) is
recorded with its error text, never stops the run, and never fails anything: this harness
reports where we stand.

The raw results go to ``OUT/<timestamp>/run.json``. A complete run (no ``--quick``,
``--only``, ``--impls`` or ``--results``) then rewrites ``bench/RESULTS.md``, the plots in
``bench/`` and the tables in README.md's Benchmarks section (between its
``bench-table`` markers); a partial run writes its report next to its ``run.json`` instead,
so it never replaces the reference tables.

The ``ssh`` workload logs in to one private sshd on 127.0.0.1 that the harness starts for the
whole run (``bench/sshd.py``) and stops at its end; where that cannot run (not root, no
sshd), the workload is recorded as skipped, with the reason.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

if __package__ in (None, ""):  # run as a script: make ``bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import envs, sshd
from bench.workloads.common import RESULT_MARKER

__all__ = ["IMPL_ORDER", "WORKLOAD_NAMES", "Job", "Step", "build_plan", "main", "run_job"]

BENCH_DIR = Path(__file__).resolve().parent
README = BENCH_DIR.parent / "README.md"
WORKLOAD_DIR = BENCH_DIR / "workloads"
MIB = 1 << 20

#: Implementation name -> (venv, workload script). "machine" is the harness's own interpreter.
IMPLS: Dict[str, tuple] = {
    "ours": ("ours", "mitogen_api.py"),
    "mitogen": ("mitogen", "mitogen_api.py"),
    "execnet": ("execnet", "execnet_api.py"),
    "machine": (None, "limits.py"),
}
IMPL_ORDER = ("ours", "mitogen", "execnet")
MITOGEN_LIKE = ("ours", "mitogen")  # workloads execnet has no counterpart for
WORKLOAD_NAMES = ("limits", "cold_start", "roundtrip", "throughput", "tail", "fanout",
                  "multihop", "aio", "remote_import", "bootstrap", "memory", "scale",
                  "services", "files", "ssh")


@dataclass(frozen=True)
class Step:
    """One workload with fixed parameters, repeated ``reps`` times over ``impls`` in turn."""

    workload: str  # the --only name
    script_workload: str  # the name the workload script knows
    impls: Sequence[str]
    reps: int
    params: Dict[str, Any]
    timeout: float
    skip: Optional[str] = None  # why every job of this step is recorded as skipped


@dataclass
class Job:
    step: Step
    impl: str
    rep: int


@dataclass
class Runner:
    """Runs jobs, keeps the records, and enforces the time budget and the timeout breaker."""

    pythons: Dict[str, Optional[Path]]
    unavailable: Dict[str, str]
    budget: float
    cwd: Path
    records: List[Dict[str, Any]] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    timed_out: set = field(default_factory=set)

    def run(self, job: Job) -> Dict[str, Any]:
        rec: Dict[str, Any] = {
            "workload": job.step.workload, "script_workload": job.step.script_workload,
            "impl": job.impl, "rep": job.rep, "params": job.step.params,
            "ok": False, "error": None, "timed_out": False, "skipped": False, "metrics": {},
        }
        key = (job.step.workload, json.dumps(job.step.params, sort_keys=True), job.impl)
        skip = None
        if job.step.skip is not None:
            skip = f"skipped: {job.step.skip}"
        elif job.impl in self.unavailable:
            skip = f"venv unavailable: {self.unavailable[job.impl]}"
        elif key in self.timed_out:
            skip = "skipped: an earlier repetition of this step timed out"
        elif time.monotonic() - self.started > self.budget:
            skip = f"skipped: time budget of {self.budget:.0f} s used up"
        if skip is not None:
            rec.update(skipped=True, error=skip)
        else:
            python = self.pythons[job.impl] or Path(sys.executable)
            rec.update(run_job(python, WORKLOAD_DIR / IMPLS[job.impl][1],
                               job.step.script_workload, job.step.params,
                               job.step.timeout, self.cwd))
            if rec["timed_out"]:
                self.timed_out.add(key)
        self.records.append(rec)
        return rec


def workload_env() -> Dict[str, str]:
    """The environment for workload processes: ours, minus anything that picks a Python, and
    minus PYTHONDONTWRITEBYTECODE, which the machine this was written on sets but users'
    machines rarely do: without .pyc files every import in every library recompiles."""
    env = dict(os.environ)
    for name in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV", "PYTHONSAFEPATH",
                 "PYTHONDONTWRITEBYTECODE"):
        env.pop(name, None)
    return env


def _group_alive(pgid: int) -> bool:
    """Whether a live process (not a zombie) still belongs to process group ``pgid``
    (Linux /proc)."""
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def _kill_group(pgid: int, wait: float = 5.0) -> None:
    """SIGKILL the group, then wait (at most `wait` seconds) until none of it runs: a
    grandchild is not ours to reap, and dies a moment after the signal."""
    if not _group_alive(pgid):
        return
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + wait
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.01)


def run_job(python: Path, script: Path, workload: str, params: Dict[str, Any],
            timeout: float, cwd: Path) -> Dict[str, Any]:
    """Run one workload process and return its parsed result, or why there is none.

    The process leads its own process group (so do any children it does not move out), which
    is killed on timeout and swept after a normal exit.
    """
    argv = [str(python), str(script), workload, json.dumps(params)]
    start = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd,
                            env=workload_env(), start_new_session=True)
    timed_out = False
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        _kill_group(proc.pid)
        out, err = proc.communicate()
    except BaseException:  # the harness interrupted (Ctrl-C, SIGTERM): take the job with it
        _kill_group(proc.pid)
        proc.wait()
        raise
    _kill_group(proc.pid)
    wall = time.monotonic() - start
    result = _parse_result(out.decode(errors="replace"))
    stderr_tail = err.decode(errors="replace")[-4000:]
    if timed_out:
        partial = result or {}
        return {"ok": False, "timed_out": True, "wall": wall,
                "error": f"timed out after {timeout:.0f} s (process group killed)",
                "metrics": partial.get("metrics", {}), "stderr_tail": stderr_tail}
    if result is None:
        return {"ok": False, "wall": wall, "returncode": proc.returncode,
                "error": f"no result line (exit {proc.returncode}): "
                         f"{_last_line(stderr_tail) or 'no output'}",
                "stderr_tail": stderr_tail}
    result["wall"] = wall
    result["returncode"] = proc.returncode
    if not result.get("ok"):
        result["stderr_tail"] = stderr_tail
    return result


def _parse_result(stdout: str) -> Optional[Dict[str, Any]]:
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            try:
                return json.loads(line[len(RESULT_MARKER):])
            except ValueError:
                return None
    return None


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def build_plan(quick: bool, only: Sequence[str], impls: Sequence[str]) -> List[Step]:
    """The steps of a run, in order. ``--quick`` keeps every step but shrinks its counts."""

    def pick(full: Any, fast: Any) -> Any:
        return fast if quick else full

    def keep(candidates: Sequence[str]) -> List[str]:
        return [impl for impl in candidates if impl in impls]

    everyone, mitogen_like = keep(IMPL_ORDER), keep(MITOGEN_LIKE)
    steps = [
        Step("limits", "limits", ["machine"], pick(3, 1),
             pick({}, {"starts": 5, "warmup": 50, "calls": 500, "transfer_bytes": 8 * MIB,
                       "repeat": 1}), 120),
        Step("cold_start", "cold_start", everyone, pick(15, 3),
             {"later_children": pick(2, 1)}, 60),
        Step("roundtrip", "roundtrip", everyone, pick(5, 1),
             pick({"warmup": 500, "calls": 5000}, {"warmup": 50, "calls": 500}), 120),
        Step("throughput", "throughput", everyone, pick(5, 1),
             pick({"small_bytes": MIB, "small_count": 64, "big_bytes": 64 * MIB},
                  {"small_bytes": MIB, "small_count": 8, "big_bytes": 8 * MIB}), 150),
        # A probe child's round trips, idle and while another child receives big arguments.
        Step("tail", "tail", everyone, pick(2, 1),
             pick({"big_bytes": 256 * MIB, "rounds": 3, "idle_calls": 1000, "transfers": 2,
                   "warmup": 200},
                  {"big_bytes": 16 * MIB, "rounds": 1, "idle_calls": 200, "transfers": 1,
                   "warmup": 20}), pick(900, 120)),
    ]
    sizes = pick([(1, mitogen_like, 3), (4, mitogen_like, 3), (16, everyone, 3),
                  (64, everyone, 3), (256, everyone, 2)],
                 [(1, mitogen_like, 1), (4, mitogen_like, 1), (16, everyone, 1)])
    steps += [_fanout_step(n, who, reps) for n, who, reps in sizes]
    steps += [
        _fanout_step(pick(64, 8), everyone, pick(3, 1), via=True),
        Step("multihop", "multihop", mitogen_like, pick(5, 1),
             pick({"hops": 5, "rounds": 10, "calls_per_round": 100, "warmup": 100},
                  {"hops": 5, "rounds": 2, "calls_per_round": 50, "warmup": 20}), 120),
        Step("aio", "aio", mitogen_like, pick(3, 1),
             {"children": 10, "calls": 1000, "repeat": pick(5, 2)}, 120),
        Step("remote_import", "remote_import", mitogen_like, pick(5, 1), {}, 90),
        Step("bootstrap", "bootstrap", everyone, 1, {}, 60),
        Step("memory", "memory", everyone, pick(3, 1), {"children": pick(64, 8)}, 600),
        # 1,000 children in one master; the workload refuses (recorded as a skip, with the
        # reason) where their memory would not fit in half of what the machine has free.
        Step("scale", "scale", everyone, 1,
             pick({"children": 1000, "workers": 32},
                  {"children": 20, "workers": 4, "reap_timeout": 5}),
             pick(1800, 120)),
        Step("services", "call_service", mitogen_like, pick(5, 1),
             pick({"warmup": 500, "calls": 5000}, {"warmup": 50, "calls": 500}), 120),
        # FileService against the raw socketpair in the same run, then against Mitogen.
        Step("files", "socketpair_transfer", ["machine"], pick(3, 1),
             {"bytes": pick(512, 64) * MIB, "repeat": 2}, 120),
        Step("files", "file_service", mitogen_like, pick(3, 1),
             {"bytes": pick(512, 64) * MIB, "repeat": 2}, 300),
        Step("files", "push_file", mitogen_like, pick(2, 1),
             {"bytes": pick(256, 16) * MIB, "leaves": 8}, 600),
        Step("files", "file_memory", mitogen_like, pick(2, 1),
             {"bytes": pick(1024, 64) * MIB}, 300),
        # The sshd's address and key are added by with_ssh_target() once it runs; "machine"
        # measures the bare ssh login, the floor under every library's connect.
        Step("ssh", "ssh", ["machine", *everyone], pick(3, 1),
             pick({"connects": 10, "warmup": 200, "calls": 2000},
                  {"connects": 3, "warmup": 20, "calls": 200}), 240),
        # One connection per account of the sshd's own, all at once.
        Step("ssh", "ssh_fanout", ["machine", *everyone], pick(3, 1),
             {"accounts": pick(16, 4)}, 300),
    ]
    return [step for step in steps if step.workload in only and step.impls]


def _fanout_step(children: int, impls: Sequence[str], reps: int, via: bool = False) -> Step:
    """N children started concurrently (through one intermediate with ``via``). The limits
    grow with N: on two cores, hundreds of children booting at once take minutes."""
    timeout = 120 + 2.0 * children
    params: Dict[str, Any] = {"children": children, "connect_timeout": 0.9 * timeout}
    if via:
        params["via"] = True
    return Step("fanout", "fanout", impls, reps, params, timeout)


def with_ssh_target(steps: Sequence[Step], stack: contextlib.ExitStack) -> List[Step]:
    """Start the run's sshd if a step needs it (stopped when ``stack`` closes) and give those
    steps its address; or mark them skipped, saying why the server cannot run."""
    if not any(step.workload == "ssh" for step in steps):
        return list(steps)
    accounts = max(int(step.params.get("accounts", 0)) for step in steps
                   if step.workload == "ssh")
    try:
        target: Optional[sshd.SshTarget] = stack.enter_context(sshd.serve(accounts))
        skip = None
    except sshd.SshdUnavailable as exc:
        target, skip = None, str(exc)
        _say(f"ssh workload skipped: {skip}")

    def given(step: Step) -> Step:
        if step.workload != "ssh":
            return step
        if target is None:
            return dataclasses.replace(step, skip=skip)
        return dataclasses.replace(step, params={**step.params, **target.params()})

    return [given(step) for step in steps]


def jobs_of(steps: Sequence[Step]) -> List[Job]:
    """Alternate implementations inside each repetition: A B C, A B C, ..."""
    return [Job(step, impl, rep) for step in steps for rep in range(step.reps)
            for impl in step.impls]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total() -> Optional[int]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def machine_info() -> Dict[str, Any]:
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "kernel": f"{platform.system()} {platform.release()}",
        "memory": _mem_total(),
        "harness_python": platform.python_version(),
    }


def _git_describe() -> Optional[str]:
    try:
        git = ["git", "-C", str(envs.REPO_ROOT)]
        head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=False, timeout=30)
        dirty = subprocess.run([*git, "status", "--porcelain", "--", "mitogen"],
                               capture_output=True, text=True, check=False, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def the_command(argv: Sequence[str]) -> str:
    """The command that reproduces this run, as a person would type it."""
    args = list(argv)
    if os.environ.get("TOX_ENV_NAME") == "bench":
        return "tox -e bench" + (" -- " + shlex.join(args) if args else "")
    return shlex.join(["python", "bench/run.py", *args])


def prepare_envs(impls: Sequence[str], log: List[str]) -> tuple:
    """Build or reuse each needed venv; an implementation whose venv fails is unavailable."""
    specs = envs.env_specs()
    pythons: Dict[str, Optional[Path]] = {"machine": None}
    unavailable: Dict[str, str] = {}
    versions: Dict[str, Dict[str, Any]] = {
        "machine": {"python": platform.python_version(), "version": None}}
    for impl in impls:
        spec = specs[IMPLS[impl][0]]
        try:
            python = pythons[impl] = envs.ensure_env(spec, log=log)
        except RuntimeError as exc:
            unavailable[impl] = str(exc).splitlines()[0]
            versions[impl] = {"python": None, "version": None, "error": str(exc)[-1000:]}
            log.append(f"{impl}: {exc}")
            continue
        versions[impl] = envs.probe_version(python, spec.distribution)
        versions[impl]["requirement"] = " ".join(spec.requirements).replace(
            str(envs.REPO_ROOT), ".")
    if "ours" in versions:
        versions["ours"]["commit"] = _git_describe()
    return pythons, unavailable, versions


def _parse_list(text: str, allowed: Sequence[str], what: str) -> List[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in allowed]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown {what} {', '.join(unknown) or '(none given)'}; choose from "
            f"{', '.join(allowed)}")
    return names


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/run.py", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="small repetition counts: a smoke run of the whole harness")
    parser.add_argument("--only", type=lambda s: _parse_list(s, WORKLOAD_NAMES, "workload"),
                        default=list(WORKLOAD_NAMES), metavar="WORKLOAD,...",
                        help=f"run only these workloads ({', '.join(WORKLOAD_NAMES)})")
    parser.add_argument("--impls", type=lambda s: _parse_list(s, IMPL_ORDER, "implementation"),
                        default=list(IMPL_ORDER), metavar="IMPL,...",
                        help=f"measure only these ({', '.join(IMPL_ORDER)})")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "out",
                        help="where raw results go (default: bench/out)")
    parser.add_argument("--results", type=Path, default=None,
                        help="where RESULTS.md goes (default: bench/RESULTS.md for a complete "
                             "run, else next to run.json)")
    parser.add_argument("--budget", type=float, default=7200.0,
                        help="seconds after which remaining jobs are skipped (default 7200)")
    return parser.parse_args(argv)


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds through run_job, which kills the running job


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    complete = not args.quick and list(args.only) == list(WORKLOAD_NAMES) and \
        list(args.impls) == list(IMPL_ORDER)
    started = dt.datetime.now(dt.timezone.utc)
    run_dir = args.out.resolve() / started.strftime("%Y%m%dT%H%M%SZ")
    run_dir.mkdir(parents=True, exist_ok=True)
    log: List[str] = []
    steps = build_plan(args.quick, args.only, args.impls)
    needed = [impl for impl in IMPL_ORDER if any(impl in step.impls for step in steps)]
    _say(f"preparing venvs for {', '.join(needed) or 'nothing'} under {envs.VENV_ROOT}")
    pythons, unavailable, versions = prepare_envs(needed, log)
    for line in log:
        _say(line)
    meta = {"date": started.isoformat(timespec="seconds"), "command": the_command(argv),
            "mode": "quick" if args.quick else "full", "complete": complete,
            "workloads": list(args.only), "impls": list(args.impls),
            "machine": machine_info(), "versions": versions,
            "loadavg_start": os.getloadavg()}
    with contextlib.ExitStack() as stack:
        cwd = stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-cwd-"))
        steps = with_ssh_target(steps, stack)
        jobs = jobs_of(steps)
        runner = Runner(pythons, unavailable, args.budget, Path(cwd))
        for number, job in enumerate(jobs, start=1):
            rec = runner.run(job)
            _say(_progress(number, len(jobs), job, rec))
            _save(run_dir, meta, runner.records)
    meta["loadavg_end"] = os.getloadavg()
    meta["duration"] = time.monotonic() - runner.started
    path = _save(run_dir, meta, runner.records)
    _say(f"raw results: {path} ({meta['duration']:.0f} s)")
    reference = complete and args.results is None
    results = args.results or (BENCH_DIR / "RESULTS.md" if reference else run_dir / "RESULTS.md")
    plots_dir = BENCH_DIR if reference else results.parent
    _report(path, results, plots_dir, README if reference else None)
    return 0


def _save(run_dir: Path, meta: Dict[str, Any], records: List[Dict[str, Any]]) -> Path:
    path = run_dir / "run.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"meta": meta, "records": records}, indent=1))
    tmp.replace(path)
    return path


def _progress(number: int, total: int, job: Job, rec: Dict[str, Any]) -> str:
    status = "ok" if rec["ok"] else ("skipped" if rec["skipped"] else "FAILED")
    what = job.step.workload
    if job.step.script_workload != job.step.workload:
        what += f" ({job.step.script_workload})"
    if job.step.workload == "fanout":
        what += f" x{job.step.params['children']}" + (" via one" if job.step.params.get(
            "via") else "")
    detail = "" if rec["ok"] else f": {(rec.get('error') or '')[:150]}"
    wall = f" {rec['wall']:.1f}s" if "wall" in rec else ""
    return f"[{number}/{total}] {what} {job.impl} #{job.rep + 1}: {status}{wall}{detail}"


def _report(run_json: Path, results: Path, plots_dir: Path, readme: Optional[Path]) -> None:
    """Write RESULTS.md here; plots where matplotlib is (our interpreter or the tools venv);
    and the README's tables, for the reference run."""
    from bench import report

    run = report.load_run(run_json)
    try:
        import matplotlib  # noqa: F401

        plots = report.write_plots(run, plots_dir)
    except ImportError:
        plots = _plots_in_tools_venv(run_json, plots_dir)
    baseline = report.goals.load_baseline()
    report.write_results(run, results, plots, baseline)
    _say(f"report: {results}")
    if readme is not None:
        report.update_readme(readme, report.render_readme_block(run, baseline))
        _say(f"README tables: {readme}")


def _plots_in_tools_venv(run_json: Path, plots_dir: Path) -> List[Path]:
    try:
        python = envs.ensure_env(envs.env_specs()["tools"])
    except RuntimeError as exc:
        _say(f"no plots: matplotlib unavailable ({str(exc).splitlines()[0]})")
        return []
    done = subprocess.run([str(python), str(BENCH_DIR / "report.py"), "--run", str(run_json),
                           "--plots-only", "--plots-dir", str(plots_dir)],
                          capture_output=True, text=True, check=False, timeout=300)
    if done.returncode != 0:
        _say(f"plots failed: {done.stderr.strip()[-500:]}")
        return []
    return [Path(line) for line in done.stdout.split()]


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    sys.exit(main())
