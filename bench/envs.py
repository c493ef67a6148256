"""The virtual environments each implementation is measured in, built once and reused.

Every implementation gets its own venv under ``bench/.venvs/`` so that a peer is never
installed into the project's environment, and the workload scripts run with that venv's
interpreter. A venv is rebuilt only when what it should contain changes: the stamp file holds
the base interpreter's version and the pip requirements (for the editable install of this
project, also a digest of ``pyproject.toml``, whose dependencies it pulls in).
"""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

__all__ = ["REPO_ROOT", "VENV_ROOT", "EnvSpec", "ensure_env", "env_specs", "main",
           "probe_version"]

REPO_ROOT = Path(__file__).resolve().parent.parent
VENV_ROOT = REPO_ROOT / "bench" / ".venvs"
STAMP_NAME = ".bench-stamp"
PIP_TIMEOUT = 900.0


@dataclass(frozen=True)
class EnvSpec:
    """One venv: its directory name, what pip installs into it, and the distribution to report.

    ``distribution`` is the installed distribution whose version names the implementation in
    the report (``mitogen-tree`` for ours, since our package is also importable as ``mitogen``).
    """

    name: str
    requirements: Tuple[str, ...]
    distribution: Optional[str]

    def stamp(self) -> str:
        extra = ""
        if str(REPO_ROOT) in self.requirements:
            # A regular install, as users have it (an editable one adds a finder that slows
            # every interpreter start), rebuilt whenever the package's sources change.
            digest = hashlib.sha256((REPO_ROOT / "pyproject.toml").read_bytes())
            for path in sorted((REPO_ROOT / "mitogen").glob("*.py")):
                digest.update(path.name.encode() + path.read_bytes())
            extra = digest.hexdigest()
        return json.dumps({"python": platform.python_version(), "requirements":
                           list(self.requirements), "pyproject": extra}, sort_keys=True)


def env_specs() -> Dict[str, EnvSpec]:
    """The venvs the harness knows, by name."""
    return {
        "ours": EnvSpec("ours", (str(REPO_ROOT),), "mitogen-tree"),
        "mitogen": EnvSpec("mitogen", ("mitogen==0.3.54",), "mitogen"),
        "execnet": EnvSpec("execnet", ("execnet==2.1.*",), "execnet"),
        "tools": EnvSpec("tools", ("matplotlib>=3.7",), "matplotlib"),
    }


def env_python(spec: EnvSpec, root: Path = VENV_ROOT) -> Path:
    return root / spec.name / "bin" / "python"


def ensure_env(spec: EnvSpec, root: Path = VENV_ROOT, log: Optional[List[str]] = None) -> Path:
    """Return the venv's interpreter, creating or refreshing the venv first if needed.

    Raises :class:`RuntimeError` with pip's output when the install fails, so the caller can
    record the implementation as unavailable and go on with the others.
    """
    venv = root / spec.name
    python = env_python(spec, root)
    stamp = venv / STAMP_NAME
    if python.exists() and stamp.exists() and stamp.read_text() == spec.stamp():
        return python
    if venv.exists():
        shutil.rmtree(venv)
    venv.parent.mkdir(parents=True, exist_ok=True)
    _run([sys.executable, "-m", "venv", str(venv)], f"creating venv {venv}")
    _run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
          *spec.requirements], f"pip install {' '.join(spec.requirements)} into {venv}")
    stamp.write_text(spec.stamp())
    if log is not None:
        log.append(f"built venv {spec.name}: {' '.join(spec.requirements)}")
    return python


def _run(argv: List[str], what: str) -> None:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, check=False,
                              timeout=PIP_TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"{what}: no result after {PIP_TIMEOUT:.0f} s") from exc
    if done.returncode != 0:
        tail = (done.stdout + done.stderr).strip()[-3000:]
        raise RuntimeError(f"{what} failed (exit {done.returncode}):\n{tail}")


_PROBE = (
    "import json, platform, sys\n"
    "from importlib import metadata\n"
    "dist = sys.argv[1]\n"
    "try:\n"
    "    version = metadata.version(dist) if dist else None\n"
    "except metadata.PackageNotFoundError:\n"
    "    version = None\n"
    "print(json.dumps({'python': platform.python_version(), 'version': version,\n"
    "                  'implementation': platform.python_implementation()}))\n"
)


def probe_version(python: Path, distribution: Optional[str]) -> Dict[str, Optional[str]]:
    """Interpreter and distribution versions as seen from inside a venv."""
    done = subprocess.run([str(python), "-I", "-c", _PROBE, distribution or ""],
                          capture_output=True, text=True, check=False, timeout=60)
    if done.returncode != 0:
        return {"python": None, "version": None, "error": done.stderr.strip()[-500:]}
    return json.loads(done.stdout)


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m bench.envs NAME``: build the venv NAME if needed and print its interpreter
    (``.ci/run`` gets Mitogen 0.3.54's this way, for the parity test)."""
    names = sys.argv[1:] if argv is None else argv
    specs = env_specs()
    if len(names) != 1 or names[0] not in specs:
        print("usage: python -m bench.envs {%s}" % ",".join(sorted(specs)), file=sys.stderr)
        return 2
    print(ensure_env(specs[names[0]]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
