"""One state record per running topology, so any process can list and end what runs.

Whoever builds a tree (``python -m simulator up``, or the pytest plugin) writes a record when
the tree is up, rewrites it when faults are applied or healed, and removes it when it tears
the tree down. ``python -m simulator status`` reads the records, ``down`` acts on them: it
asks a live ``up`` to tear its tree down and waits until the record is gone, and for a runner
that is gone (killed, or a pytest run with ``--topology-keep``) removes what the record names
itself: containers and networks (by their run label), the keys and control directory, and
the record. Both backends write the same record; only ``resources`` differs.

Records are JSON files in :func:`state_dir`, written atomically (a reader never sees half a
record), named ``<topology>-<backend>-<pid>.json``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from typing import Any, Dict, Iterable, List, Optional

__all__ = ["RECORD_VERSION", "RunRecord", "load_records", "owner_alive", "owner_tag",
           "state_dir"]

RECORD_VERSION = 1


def state_dir() -> str:
    """``$MITOGEN_SIM_STATE``, else ``<tmp>/mitogen-sim-<uid>/runs``: per user, like the
    processes and containers the records describe."""
    configured = os.environ.get("MITOGEN_SIM_STATE")
    if configured:
        return configured
    return os.path.join(tempfile.gettempdir(), f"mitogen-sim-{os.getuid()}", "runs")


def _start_time(pid: int) -> Optional[str]:
    """The process's start time in clock ticks since boot: with the pid, a unique identity.
    None for a process that is gone or has ended (a zombie its parent has not reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    if len(fields) < 20 or fields[0] in ("Z", "X"):
        return None
    return fields[19]


def owner_tag(pid: Optional[int] = None) -> str:
    """``PID:START``: names a process for as long as it lives, never a later one."""
    pid = os.getpid() if pid is None else pid
    return f"{pid}:{_start_time(pid)}"


def owner_alive(tag: str) -> bool:
    pid, _, started = tag.partition(":")
    return pid.isdigit() and _start_time(int(pid)) == started


@dataclasses.dataclass
class RunRecord:
    """What runs, where, for whom; see the module docstring."""

    topology: str
    file: str
    backend: str
    command: str  # "up" or "pytest"
    seeds: str
    owner: str = dataclasses.field(default_factory=owner_tag)
    started: float = dataclasses.field(default_factory=time.time)
    #: per host: id, name, where it runs, its context id and its accounts' context ids
    hosts: List[Dict[str, Any]] = dataclasses.field(default_factory=list)
    #: the faults applied now, as ``repr`` and parameters, oldest first
    faults: List[Dict[str, Any]] = dataclasses.field(default_factory=list)
    #: what ``down`` removes when the owner is gone (backend-specific; see the backends'
    #: ``resources()``)
    resources: Dict[str, Any] = dataclasses.field(default_factory=dict)
    kept: bool = False  # left up on purpose (--topology-keep) when the owner ended
    path: str = ""

    @property
    def pid(self) -> int:
        return int(self.owner.split(":", 1)[0])

    @property
    def alive(self) -> bool:
        return owner_alive(self.owner)

    def save(self) -> str:
        """Write (or rewrite) the record atomically; returns its path."""
        directory = state_dir()
        os.makedirs(directory, mode=0o700, exist_ok=True)
        if not self.path:
            self.path = os.path.join(directory,
                                     f"{self.topology}-{self.backend}-{self.pid}.json")
        data = {k: v for k, v in dataclasses.asdict(self).items() if k != "path"}
        data["version"] = RECORD_VERSION
        fd, temporary = tempfile.mkstemp(dir=os.path.dirname(self.path), prefix=".record-")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as stream:
                json.dump(data, stream, indent=2, sort_keys=True)
            os.replace(temporary, self.path)
        except BaseException:
            try:
                os.unlink(temporary)
            except FileNotFoundError:
                pass
            raise
        return self.path

    def set_faults(self, faults: Iterable[Any]) -> None:
        """Record the faults applied now (each a :class:`~simulator.faults.Fault`)."""
        self.faults = [{"fault": repr(fault), "params": fault.params()} for fault in faults]
        self.save()

    def remove(self) -> None:
        if self.path:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


def describe_hosts(backend: Any) -> List[Dict[str, Any]]:
    """The record's ``hosts`` for a created backend: where each runs and its contexts."""
    hosts = []
    for host in backend.topology.hosts:
        placement = backend.placement(host.id)
        accounts = {}
        for account in host.accounts:
            if account.name != host.login:
                accounts[account.name] = backend.context(host.id, account.name).context_id
        hosts.append({"id": host.id, "name": host.name, "where": placement.where,
                      "labels": dict(placement.labels),
                      "context_id": backend.context(host.id).context_id,
                      "accounts": accounts})
    return hosts


def load_records() -> List[RunRecord]:
    """Every readable record, oldest first; unreadable files are skipped (a record is
    written atomically, so only a foreign file can be unreadable)."""
    directory = state_dir()
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return []
    records = []
    fields = {f.name for f in dataclasses.fields(RunRecord)}
    for name in names:
        if not name.endswith(".json") or name.startswith("."):
            continue
        path = os.path.join(directory, name)
        try:
            with open(path, encoding="utf-8") as stream:
                data = json.load(stream)
            record = RunRecord(**{k: v for k, v in data.items() if k in fields})
        except (OSError, ValueError, TypeError):
            continue
        record.path = path
        records.append(record)
    return sorted(records, key=lambda r: r.started)
