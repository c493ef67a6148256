"""ensure_dockerd: idempotent, starts a daemon only when none answers, says what to do when it
cannot.

The machine's own engine is shared with every other docker test (and xdist worker), so it is
never stopped here; the start path is exercised on a private engine whose socket, pid file,
data and log live in a temporary directory, stopped and removed by the test.
"""

from __future__ import annotations

import os
import signal
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, List

import pytest

from simulator import dockerd, images
from simulator.dockerd import DockerdError, Engine, ensure_dockerd


def _dockerd_pids() -> List[int]:
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if Path(f"/proc/{name}/comm").read_text().strip() == "dockerd":
                    pids.append(int(name))
            except OSError:
                continue
    return sorted(pids)


def _ppid(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def _gone_or_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _refuse_launch(*_args: Any) -> None:
    raise AssertionError("ensure_dockerd started a daemon although one answers")


@pytest.mark.docker
def test_running_engine_is_left_alone(monkeypatch: pytest.MonkeyPatch):
    try:
        first = dockerd.engine_client()  # started before pytest (.ci/run), never here
    except DockerdError as exc:
        pytest.skip(str(exc))
    try:
        pid = dockerd.default_engine().running_pid()
        daemons = _dockerd_pids()
        monkeypatch.setattr(dockerd, "_launch", _refuse_launch)
        second = ensure_dockerd(timeout=60)
        try:
            assert second.ping() is True
            assert dockerd.default_engine().running_pid() == pid
            assert _dockerd_pids() == daemons
        finally:
            second.close()
    finally:
        first.close()


@pytest.fixture
def private_engine() -> Iterator[Engine]:
    """An engine in a short /tmp path (unix socket paths are limited to 108 bytes)."""
    if os.geteuid() != 0:
        pytest.skip("starting a Docker engine needs root")
    state = Path(tempfile.mkdtemp(prefix="msd-", dir="/tmp"))
    engine = Engine(state_dir=state)
    try:
        yield engine
    finally:
        pid = engine.running_pid()
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 30
            while not _gone_or_zombie(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert _gone_or_zombie(pid), f"private dockerd {pid} did not stop"
        images.remove_tree(state)


@pytest.mark.docker
@pytest.mark.slow
def test_stopped_engine_is_started_once(private_engine: Engine,
                                        monkeypatch: pytest.MonkeyPatch):
    if dockerd.shutil.which("dockerd") is None:
        pytest.skip("dockerd is not installed (bash containers/ensure-docker.sh installs it)")
    launches: List[Engine] = []
    real_launch = dockerd._launch

    def counting_launch(engine: Engine, binary: str) -> None:
        launches.append(engine)
        real_launch(engine, binary)

    monkeypatch.setattr(dockerd, "_launch", counting_launch)
    # A pid file left by a killed daemon, naming a pid now used by another process (ours):
    # dockerd itself would refuse to start over it.
    private_engine.pidfile.write_text(f"{os.getpid()}\n")
    progress: List[str] = []
    first = ensure_dockerd(timeout=60, engine=private_engine, progress=progress.append)
    try:
        assert launches == [private_engine]
        assert any("removing stale" in line for line in progress)
        pid = private_engine.running_pid()
        assert pid is not None
        assert _ppid(pid) != os.getpid()  # detached: not a child this process must reap
        assert first.info()["DockerRootDir"] == str(private_engine.state_dir / "data")
        assert "--bridge=none" in private_engine.log_path.read_text()
        assert any("starting" in line for line in progress)
        second = ensure_dockerd(timeout=60, engine=private_engine, progress=progress.append)
        try:
            assert second.ping() is True
            assert launches == [private_engine]
            assert private_engine.running_pid() == pid
        finally:
            second.close()
    finally:
        first.close()


def test_without_root_says_what_to_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(dockerd, "_is_root", lambda: False)
    with pytest.raises(DockerdError, match=r"needs root.*ensure-docker\.sh"):
        ensure_dockerd(timeout=5, engine=Engine(state_dir=tmp_path), progress=lambda _l: None)
    with pytest.raises(DockerdError, match=r"apt-get install -y docker\.io"):
        dockerd.apt_install(["docker.io"], progress=lambda _l: None)


def test_a_remote_docker_host_is_never_started(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("DOCKER_HOST", "tcp://127.0.0.1:9")  # discard port: nothing answers
    engine = dockerd.default_engine()
    assert not engine.startable
    with pytest.raises(DockerdError, match="DOCKER_HOST"):
        ensure_dockerd(timeout=5, engine=engine, progress=lambda _l: None)
