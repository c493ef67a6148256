"""A host's container: the pieces every container backend uses to make one, start it, and
reach it out of band (``docker exec`` and ``ps``), whichever engine runs it.

The container itself is the Docker SDK's, created through the engine of the node that runs it
(so for the ``swarm`` backend, ``container.client`` is that node's engine): everything here
goes through the container object, never through a fixed engine.
"""

from __future__ import annotations

import io
import subprocess
import tarfile
import time
from typing import Any, Optional, Sequence, Tuple

import docker.errors

from simulator import images
from simulator.backend import BackendError, ExecResult, ProcessInfo

__all__ = ["READY_TIMEOUT", "exec_bounded", "keygen", "processes", "start_ready", "tar"]

READY_TIMEOUT = 60.0


def keygen(path: str, comment: str) -> Tuple[str, str]:
    """A new ed25519 key pair at ``path``: (private, public)."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", path],
                   check=True, capture_output=True, timeout=30)
    with open(path) as private, open(path + ".pub") as public:
        return private.read(), public.read().strip()


def tar(entries: Sequence[Tuple[str, bytes, int, int]], dirs: Sequence[Tuple[str, int]] = ()
        ) -> bytes:
    """A tar of (name, data, mode, uid) files and (name, mode) directories, for put_archive."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for name, mode in dirs:
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, mode, int(time.time())
            archive.addfile(info)
        for name, data, mode, uid in entries:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.uid, info.gid = len(data), mode, uid, uid
            info.mtime = int(time.time())
            archive.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def start_ready(container: Any, label: str, timeout: float = READY_TIMEOUT) -> None:
    """Start the container and wait until its node set-up is done and sshd listens."""
    since = time.time()
    container.start()
    try:
        images.wait_node_ready(container, timeout=timeout, since=since)
    except images.ImageBuildError as exc:
        raise BackendError(f"host {label!r}: {exc}") from None


def exec_bounded(container: Any, label: str, argv: Sequence[str], user: Optional[str] = None,
                 timeout: float = 30.0) -> ExecResult:
    """``docker exec`` through the container's own engine, bounded by coreutils' ``timeout``
    inside the container."""
    bounded = ["timeout", "-s", "KILL", f"{timeout:g}", *argv]
    try:
        code, (out, err) = container.exec_run(bounded, user=user or "root", demux=True)
    except docker.errors.APIError as exc:
        raise BackendError(f"exec on {label!r}: {exc}") from None
    return ExecResult(code, out or b"", err or b"")


def processes(container: Any, label: str) -> Tuple[ProcessInfo, ...]:
    """Every process of the container but ``ps`` itself and its ``timeout`` wrapper."""
    done = exec_bounded(container, label, ["ps", "-eo", "pid=,user:32=,args="])
    if done.returncode != 0:
        raise BackendError(f"ps on {label!r} failed: {done.stderr.decode(errors='replace')}")
    found = []
    for line in done.stdout.decode(errors="replace").splitlines():
        pid, user, command = ([*line.split(None, 2), "", ""])[:3]
        if command.startswith(("ps -eo", "timeout -s KILL")):
            continue
        found.append(ProcessInfo(int(pid), user, command))
    return tuple(found)
