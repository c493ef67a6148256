"""The wheel is the product: built from the sources, installed (not editable) into a fresh
virtual environment outside the repository, it runs a topology in a project of its own."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Dict, List

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: Not part of the sources a wheel is built from.
NOT_SOURCES = (".git", ".venv", ".tox", ".sim", ".venvs", "__pycache__", "build", "dist",
               "*.egg-info", "out")
PACKAGE_DATA = ["simulator/py.typed", "mitogen/py.typed", "simulator/schema.json",
                "simulator/FORMAT.md", "simulator/containers/suites.json",
                "simulator/containers/node_setup.py", "simulator/containers/entrypoint.sh",
                "simulator/containers/finalize-rootfs.sh", "simulator/containers/sshd_config"]

OUTSIDE_TOPOLOGY = """\
version: 1
name: outside
seed: 3
tree:
  gate:
    link: {latency: 1ms}
    children:
      inner:
        accounts+: [{name: app, sudo: nopasswd}]
faults:
  quick: {interval: 1s, duration: 500ms, count: 2, pick: [pause, latency]}
"""
OUTSIDE_TEST = """\
import os

import simulator
from simulator.faults import run_plan


def test_the_installed_package_runs_the_tree(sim, sim_faults):
    assert "site-packages" in simulator.__file__
    assert sim.context("inner", "app").call(os.getpid) > 0
    assert run_plan(sim_faults, sim.plan("quick")) == 2
    assert sim.context("inner").call(os.getpid) > 0
"""
OUTSIDE_INI = """\
[pytest]
addopts = --strict-markers -p no:cacheprovider
filterwarnings = error
"""


def _run(argv: List[str], cwd: Path, env: Dict[str, str], timeout: float = 300.0) -> str:
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)
    assert done.returncode == 0, f"{' '.join(argv)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_wheel_runs_a_topology_in_a_project_outside_the_repository(tmp_path: Path):
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV") and not k.startswith("PYTEST_")}
    sources = tmp_path / "sources"
    shutil.copytree(ROOT, sources, ignore=shutil.ignore_patterns(*NOT_SOURCES))
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w",
          str(tmp_path / "dist"), str(sources)], tmp_path, env)
    (wheel,) = (tmp_path / "dist").glob("mitogen_tree-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    assert not [name for name in PACKAGE_DATA if name not in names]

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], tmp_path, env)
    python = str(venv / "bin" / "python")
    _run([python, "-m", "pip", "install", "--quiet", f"{wheel}[simulator]", "pytest"],
         tmp_path, env)
    recipes = _run([python, "-c", "from simulator.recipes import load_recipes, RECIPE_DIR; "
                    "print(RECIPE_DIR, sorted(load_recipes()))"], tmp_path, env)
    assert "site-packages/simulator/containers" in recipes and "'bookworm'" in recipes

    project = tmp_path / "project"
    project.mkdir()
    (project / "tree.yml").write_text(OUTSIDE_TOPOLOGY)
    (project / "test_outside.py").write_text(OUTSIDE_TEST)
    (project / "pytest.ini").write_text(OUTSIDE_INI)
    out = _run([python, "-m", "pytest", "--topology=tree.yml"], project, env)
    assert "1 passed" in out, out
    assert "topology backend: local, seed: quick=3" in out
    report = project / ".sim" / "report" / "outside" / "local" / "latest"
    assert (report / "timeline.png").stat().st_size > 0
    check = _run([python, "-m", "simulator", "check", "tree.yml"], project, env)
    assert "schedule quick (seed 3):" in check
