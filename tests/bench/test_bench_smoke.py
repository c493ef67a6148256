"""Smoke tests of the benchmark harness's own code: no venvs, no network, a few seconds.

The benchmark itself never decides whether the suite passes; these tests only check that its
parts work: the physical-limits workload runs and reports, the harness survives failing and
hanging workloads, the plan alternates implementations, and the report is right on input
whose answers are known.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import report, run
from bench.workloads import common

WORKLOADS = Path(run.__file__).resolve().parent / "workloads"
MIB = 1 << 20


def _result_of(stdout: str) -> dict:
    lines = [line for line in stdout.splitlines() if line.startswith(common.RESULT_MARKER)]
    assert len(lines) == 1, stdout
    return json.loads(lines[0][len(common.RESULT_MARKER):])


def test_limits_workload_measures_every_limit(tmp_path):
    params = {"starts": 3, "warmup": 10, "calls": 200, "transfer_bytes": 2 * MIB, "repeat": 2}
    done = subprocess.run([sys.executable, str(WORKLOADS / "limits.py"), "limits",
                           json.dumps(params)], capture_output=True, text=True, timeout=90,
                          cwd=tmp_path, check=False)
    result = _result_of(done.stdout)
    assert done.returncode == 0 and result["ok"], result.get("traceback") or done.stderr
    metrics = result["metrics"]
    assert len(metrics["limits.interpreter_start"]["samples"]) == 3
    for transport in ("pipe", "socketpair"):
        rt = metrics[f"limits.{transport}_rt"]
        tp = metrics[f"limits.{transport}_tp"]
        assert len(rt["samples"]) == 200 and all(0 < s < 1 for s in rt["samples"])
        assert len(tp["samples"]) == 2 and tp["bytes"] == 2 * MIB
    # Starting an interpreter costs more than one round trip over a pipe on any machine.
    start = sorted(metrics["limits.interpreter_start"]["samples"])[1]
    assert start > sorted(metrics["limits.pipe_rt"]["samples"])[100]


def test_generated_package_has_30_modules_and_imports_both_ways(tmp_path):
    for name, dynamic in (("pkg_static", False), ("pkg_dynamic", True)):
        modules = common.make_package(tmp_path, name, dynamic=dynamic)
        assert len(modules) == len(set(modules)) == common.PACKAGE_MODULES
        assert len(list((tmp_path / name).glob("*.py"))) == common.PACKAGE_MODULES
        code = ("import sys; sys.path.insert(0, sys.argv[1]); import importlib; "
                f"print(importlib.import_module('{name}.entry').run(), len("
                f"[m for m in sys.modules if m.startswith('{name}')]))")
        done = subprocess.run([sys.executable, "-I", "-c", code, str(tmp_path)],
                              capture_output=True, text=True, timeout=60, check=True)
        total, loaded = done.stdout.split()
        assert int(total) == common.expected_package_sum()
        assert int(loaded) == common.PACKAGE_MODULES


def test_run_job_reports_a_workload_that_cannot_start(tmp_path):
    rec = run.run_job(Path(sys.executable), WORKLOADS / "limits.py", "no_such_workload", {},
                      timeout=60, cwd=tmp_path)
    assert rec["ok"] is False and not rec.get("timed_out")
    assert "unknown workload 'no_such_workload'" in rec["error"]


def test_run_job_records_a_failure_raised_inside_the_workload(tmp_path):
    rec = run.run_job(Path(sys.executable), WORKLOADS / "limits.py", "limits",
                      {"starts": 2, "calls": 0}, timeout=60, cwd=tmp_path)
    assert rec["ok"] is False and rec["returncode"] == 1
    assert rec["error"] == "ValueError: metric 'limits.pipe_rt': no samples"
    # What was measured before the failure is kept.
    assert len(rec["metrics"]["limits.interpreter_start"]["samples"]) == 2


def test_run_job_kills_the_whole_group_on_timeout(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    script = tmp_path / "hang.py"
    script.write_text(
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "time.sleep(120)\n")
    rec = run.run_job(Path(sys.executable), script, "any", {}, timeout=5, cwd=tmp_path)
    assert rec["timed_out"] is True and rec["ok"] is False
    assert "timed out after 5 s" in rec["error"]
    grandchild = int(pid_file.read_text())
    assert _gone_or_zombie(grandchild)


def _gone_or_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_plan_alternates_implementations_and_meets_the_spec_counts():
    steps = run.build_plan(False, run.WORKLOAD_NAMES, run.IMPL_ORDER)
    by_name = {}
    for step in steps:
        by_name.setdefault(step.workload, []).append(step)
    assert by_name["cold_start"][0].reps >= 15
    assert by_name["roundtrip"][0].params["calls"] >= 5000
    assert sorted(s.params["children"] for s in by_name["fanout"]) == [1, 4, 16, 64, 256]
    assert all("execnet" not in s.impls for s in by_name["multihop"] + by_name["remote_import"])
    jobs = run.jobs_of(by_name["roundtrip"])
    assert [job.impl for job in jobs[:6]] == ["ours", "mitogen", "execnet"] * 2
    quick = run.build_plan(True, ["fanout"], ["mitogen"])
    assert {s.workload for s in quick} == {"fanout"}
    assert all(s.impls == ["mitogen"] and s.params["children"] <= 16 for s in quick)


def test_bad_command_line_names_what_was_wrong(capsys):
    with pytest.raises(SystemExit):
        run.parse_args(["--only", "roundtrip,warp_speed"])
    assert "unknown workload warp_speed" in capsys.readouterr().err


# The report, on a synthetic run whose answers are known -------------------------------------

def _record(impl, workload, metrics, ok=True, **extra):
    return {"impl": impl, "workload": workload, "params": extra.pop("params", {}), "ok": ok,
            "metrics": metrics, "error": extra.pop("error", None), **extra}


def _samples(values, unit="s", **extra):
    return {"unit": unit, "samples": list(values), **extra}


def _synthetic_run():
    us = 1e-6
    records = [
        _record("machine", "limits", {"limits.pipe_rt": _samples([20 * us] * 200)}),
        # Two repetitions each, so that the spread is the range of their medians.
        _record("ours", "roundtrip", {"roundtrip.call": _samples(
            [i * us for i in range(1, 1001)])}),  # median 500.5 µs, p99 990 µs
        _record("ours", "roundtrip", {"roundtrip.call": _samples([100 * us] * 100)}),
        _record("mitogen", "roundtrip", {"roundtrip.call": _samples([800 * us] * 500)}),
        _record("mitogen", "roundtrip", {"roundtrip.call": _samples([900 * us] * 500)}),
        _record("execnet", "roundtrip", {"roundtrip.call": _samples([250 * us] * 500)}),
        _record("ours", "cold_start", {"cold_start.first_child": _samples([0.1])}),
        _record("mitogen", "cold_start", {"cold_start.first_child": _samples([0.2])}),
        _record("execnet", "cold_start", {}, ok=False, timed_out=True,
                error="timed out after 60 s (process group killed)"),
        _record("ours", "throughput", {"throughput.64x1MiB": _samples([0.1], bytes=64 * MIB)}),
        _record("mitogen", "throughput", {"throughput.64x1MiB": _samples([1.0],
                                                                         bytes=64 * MIB)}),
        _record("ours", "bootstrap", {"bootstrap.payload": _samples([15000], unit="B")}),
        _record("mitogen", "bootstrap", {"bootstrap.payload": _samples([19363], unit="B")}),
        _record("ours", "multihop", {}, ok=False, error="AttributeError: no via\nmore"),
        _record("mitogen", "multihop", {f"multihop.{n}": _samples([n * 300 * us] * 150)
                                        for n in (1, 2, 3)}),
        _record("mitogen", "fanout", {"fanout.16": _samples([1.5])}, params={"children": 16}),
        *(_record(impl, "memory", {"memory.child_rss": _samples([rss << 20], unit="B")})
          for impl, rss in (("ours", 18), ("ours", 18), ("mitogen", 20), ("mitogen", 22))),
        _record("ours", "fanout", {"fanout.16": _samples([0.5])}, params={"children": 16}),
        _record("ours", "fanout", {}, ok=False, skipped=True, params={"children": 256},
                error="skipped: time budget of 900 s used up"),
        _record("mitogen", "fanout", {"fanout.256": _samples([30.0])},
                params={"children": 256}),
    ]
    meta = {"date": "2026-11-22T10:00:00+00:00", "command": "python bench/run.py",
            "mode": "full", "complete": True, "duration": 321.0,
            "machine": {"cpu": "Test CPU", "cores": 2, "usable_cores": 2,
                        "kernel": "Linux 6.0", "memory": 24 << 30, "harness_python": "3.11.7"},
            "loadavg_start": [0.5, 0.4, 0.3], "loadavg_end": [1.0, 0.5, 0.3],
            "versions": {"ours": {"python": "3.11.7", "version": "0.3.54", "commit": "abc123",
                                  "requirement": "-e ."},
                         "mitogen": {"python": "3.11.7", "version": "0.3.54",
                                     "requirement": "mitogen==0.3.54"},
                         "execnet": {"python": "3.11.7", "version": "2.1.2",
                                     "requirement": "execnet==2.1.*"}}}
    return {"meta": meta, "records": records}


def _row(text, start):
    rows = [line for line in text.splitlines() if line.startswith(f"| {start}")]
    assert rows, f"no row starting with {start!r}"
    return [cell.strip() for cell in rows[0].strip("|").split("|")]


def test_report_computes_medians_p99_ratios_and_targets(tmp_path):
    path = report.write_results(_synthetic_run(), tmp_path / "RESULTS.md")
    text = path.read_text()
    assert "- Command: `python bench/run.py`" in text
    assert "Test CPU, 2 cores" in text and "Mitogen 0.3.54" in text and "execnet 2.1.2" in text
    # 1100 pooled samples: median of 1..1000 µs plus 100 x 100 µs is 450.5 µs.
    _, ours, mitogen, _, vs_mitogen, vs_execnet = _row(text, "trivial call (os")
    assert ours.startswith("450 µs (p99 989 µs; 100 µs to 500 µs)")  # run medians 500.5, 100
    assert mitogen.startswith("850 µs (p99 900 µs; 800 µs to 900 µs)")
    assert vs_mitogen == "0.530x" and vs_execnet == "1.80x"
    assert _row(text, "Round trip:")[-1] == "NOT met"
    assert _row(text, "Cold start: first child")[3:] == ["0.500x", "<= 0.25x Mitogen 0.3.54",
                                                         "NOT met"]
    assert _row(text, "first child of a fresh master")[3] == "timeout"
    throughput = _row(text, "Throughput: 64 x 1 MiB")
    assert throughput[1:4] == ["671 MB/s", "67.1 MB/s", "10.0x"] and throughput[-1] == "met"
    payload = _row(text, "Bootstrap bytes:")
    assert payload[1] == "14.6 KiB (15,000 B)" and payload[-1] == "met"
    # Identical repetitions show no range; different ones do.
    assert _row(text, "RSS of a fresh idle child")[1:3] == ["18.0 MiB",
                                                           "21.0 MiB (20.0 MiB to 22.0 MiB)"]
    hop = _row(text, "Multi-hop: trivial call through 2 hops")
    assert hop[1:3] == ["failed", "600 µs (p99 600 µs)"] and hop[-1] == "no data"
    assert _row(text, "trivial call through 1 hop")[3] == "n/a"  # execnet: not attempted
    assert _row(text, "256 children")[1:3] == ["skipped", "30.0 s"]
    assert "- ours / multihop (1 of 1 runs): AttributeError: no via" in text
    assert "- execnet / cold_start (1 of 1 runs): timed out after 60 s" in text
    assert "| pipe round trip, 64 bytes, between two Python processes | 20.0 µs" in text


def test_report_is_stable_and_draws_the_plots(tmp_path):
    run_data = _synthetic_run()
    saved = tmp_path / "run.json"
    saved.write_text(json.dumps(run_data))
    # In a subprocess, as run.py does when matplotlib lives in the tools venv (and because
    # matplotlib keeps its font files open for the life of the process).
    done = subprocess.run([sys.executable, report.__file__, "--run", str(saved),
                           "--plots-only", "--plots-dir", str(tmp_path / "plots")],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    plots = [Path(line) for line in done.stdout.split()]
    assert [p.name for p in plots] == list(report.PLOT_FILES)
    for plot in plots:
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 5000
    first = report.write_results(run_data, tmp_path / "RESULTS.md", plots).read_text()
    assert "![fanout](plots/fanout.png)" in first
    again = report.render_results(json.loads(saved.read_text()),
                                  [f"plots/{p.name}" for p in plots])
    assert again == first


def test_report_command_line_reads_a_saved_run(tmp_path):
    saved = tmp_path / "run.json"
    saved.write_text(json.dumps(_synthetic_run()))
    assert report.main(["--run", str(saved), "--no-plots"]) == 0
    text = (tmp_path / "RESULTS.md").read_text()
    assert "No plots (matplotlib missing)." in text
    with pytest.raises(ValueError, match="not a bench run"):
        bad = tmp_path / "bad.json"
        bad.write_text("[]")
        report.load_run(bad)
    assert os.path.exists(saved)


# The ssh workload's plumbing, without an sshd ---------------------------------------------------

def test_plan_has_the_ssh_step_with_the_issue_counts():
    (step,) = [s for s in run.build_plan(False, run.WORKLOAD_NAMES, run.IMPL_ORDER)
               if s.workload == "ssh"]
    assert step.impls == ["machine", *run.IMPL_ORDER]  # machine: the bare ssh login
    assert step.params["connects"] >= 10 and step.params["calls"] >= 2000
    assert step.skip is None and "port" not in step.params  # the sshd's address comes later


def test_ssh_steps_are_skipped_with_the_reason_when_sshd_cannot_run(monkeypatch, tmp_path):
    monkeypatch.setattr(run.sshd, "why_unavailable", lambda: "not root: test says so")
    steps = run.build_plan(True, ["roundtrip", "ssh"], ["ours", "mitogen"])
    with contextlib.ExitStack() as stack:
        given = run.with_ssh_target(steps, stack)
    assert [s.skip for s in given] == [None, "not root: test says so"]
    assert given[0] is steps[0]
    # No interpreter is known for "ours": the job must be recorded without starting one.
    runner = run.Runner(pythons={}, unavailable={}, budget=900, cwd=tmp_path)
    rec = runner.run(run.Job(given[1], "ours", 0))
    assert rec["skipped"] is True and rec["ok"] is False
    assert rec["error"] == "skipped: not root: test says so"


def test_no_sshd_is_started_without_an_ssh_step(monkeypatch):
    def refuse() -> None:
        raise AssertionError("serve() called for a plan without ssh")

    monkeypatch.setattr(run.sshd, "serve", refuse)
    steps = run.build_plan(True, ["roundtrip"], ["ours"])
    with contextlib.ExitStack() as stack:
        assert run.with_ssh_target(steps, stack) == steps


def _ssh_run():
    ms = 1e-3
    data = _synthetic_run()
    data["records"] = [
        *(_record("ours", "ssh", {"ssh.connect": _samples([300 * ms] * 10),
                                  "ssh.call": _samples([150e-6] * 2000)}) for _ in range(2)),
        _record("mitogen", "ssh", {"ssh.connect": _samples([700 * ms] * 10),
                                   "ssh.call": _samples([250e-6] * 2000)}),
        _record("mitogen", "ssh", {"ssh.connect": _samples([800 * ms] * 10),
                                   "ssh.call": _samples([250e-6] * 2000)}),
        _record("execnet", "ssh", {}, ok=False, skipped=True,
                error="skipped: /usr/sbin/sshd is missing"),
        _record("machine", "ssh", {"ssh.login": _samples([250 * ms] * 10)}),
    ]
    return data


def test_report_has_ssh_targets_and_section():
    text = report.render_results(_ssh_run())
    connect = _row(text, "SSH: connect over ssh")
    # Pooled: 20 x 300 ms against 10 x 700 ms + 10 x 800 ms (median 750 ms): 0.4x.
    assert connect[1:] == ["300 ms", "750 ms (700 ms to 800 ms)", "0.400x",
                           "<= 0.5x Mitogen 0.3.54", "met"]
    call = _row(text, "SSH: trivial call (os.getpid) over")
    assert call[1:] == ["150 µs (p99 150 µs)", "250 µs (p99 250 µs)", "0.600x",
                        "<= 0.5x Mitogen 0.3.54", "NOT met"]
    assert "## SSH" in text
    section = _row(text, "connect over ssh")
    assert section[3] == "skipped" and section[4:] == ["0.400x", "—"]
    assert "- execnet / ssh (1 of 1 runs): skipped: /usr/sbin/sshd is missing" in text
    assert "| ssh login to the bench's sshd on 127.0.0.1: first output of echo | 250 ms |" \
        in text
    assert "| ssh login: first output of /usr/bin/python3 -c print | failed |" in text
    # Without ssh records the rows stay, saying so, so that runs diff line by line.
    empty = report.render_results(_synthetic_run())
    assert _row(empty, "SSH: connect over ssh")[1:3] == ["n/a", "n/a"]
