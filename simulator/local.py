"""The ``local`` backend: every host is a local context of one tree, on this machine.

No Docker, no root, no ssh: a host is the interpreter that ``router.local(name=host.name,
via=<parent host's context>)`` starts, and its accounts are further local contexts below it
(``sudo:node12b:webapp``). Nothing changes user: the local backend has **no real sudo**, so
account contexts exercise routing and the tree's shape, not privilege changes; the ``docker``
backend covers those.

Each host's edge up to its parent is a link relay (``simulator/relay.py``) that the parent
context runs as the host's interpreter: the boot command becomes ``python relay.py --control
SOCK --exec -- python -S -c STUB ...``, so the relay passes our first stage its argv and sits
on its stdin/stdout. Through the relay's control socket the backend sets the link's steady
latency, jitter and bandwidth from the topology, and applies edge faults:

=========================  ================================================================
fault                      local effect
=========================  ================================================================
``kill`` (crash)           SIGKILL the host's context and account processes
``kill`` (stop)            SIGTERM, then SIGKILL after ``grace``
``restart``                stop, then start the host's subtree again
``pause``                  SIGSTOP / SIGCONT the host's context (not its accounts)
``partition`` drop         relay *stall* (bytes wait, none are lost, as TCP under loss)
``partition`` reset/unplug relay *reset*: both ends see the stream close
``latency``, ``bandwidth`` relay settings, restored to the link's own on heal
``stream``                 relay reset / stall / cut_after
=========================  ================================================================

Healing a fault that ended contexts (kill, reset, cut) starts the hosts of that subtree again,
with new contexts; :meth:`LocalBackend.context` always returns the current one.

Keepalives: the library under test has none of its own; over ssh, liveness comes from ssh's
``ServerAliveInterval``/``ServerAliveCountMax``. Local links have no ssh, so the backend
emulates exactly that: it pings every host each ``keepalive_interval`` (answered on the
host's broker thread, never queued behind user calls) and, when a host missed
``keepalive_count`` pings in a row while its parent answers, resets that host's link, as an
ssh client giving up would. A silent partition is therefore detected within
``interval * (count + 1)`` seconds.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import glob
import os
import shutil
import signal as signal_module
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Dict, FrozenSet, List, Optional, Sequence, Tuple

import mitogen.core
import mitogen.master
from simulator.backend import (
    Backend,
    BackendError,
    ConnectSpec,
    ExecResult,
    Placement,
    ProcessInfo,
)
from simulator.faults import (
    Bandwidth,
    Fault,
    Kill,
    Latency,
    Partition,
    Pause,
    Restart,
    StreamFault,
)
from simulator.relay import RelayControl, RelayControlError
from simulator.timeline import Timeline
from simulator.topology import Host, Topology

__all__ = ["RELAY_PATH", "LocalBackend", "interpreters", "sweep_stale_dirs"]

RELAY_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "relay.py")
#: Runs the relay at the path in argv[1] from its bytecode cache, as an import would: run as
#: a script it is compiled on every start (40 ms of CPU per link, a thousand links a tree).
RELAY_FROM_BYTECODE = (
    "import sys,importlib.util as u;s=u.spec_from_file_location('relay',sys.argv.pop(1));"
    "m=sys.modules['relay']=u.module_from_spec(s);s.loader.exec_module(m);sys.exit(m.main())"
)
#: Seconds a relay keeps a link open after its parent side closed; also how long a paused
#: (SIGSTOPped) orphan can survive a killed runner before its relay kills it.
RELAY_LINGER = 2.0
#: How long a relay gives its child after SIGTERM (relay.KILL_GRACE), plus a margin.
RELAY_STOP_GRACE = 3.0

#: Hosts started at once while building a tree (each waits mostly on its links).
BUILD_THREADS = 8
CONTROL_TIMEOUT = 5.0
DISCONNECT_WAIT = 10.0
_DIR_PREFIX = "mitogen-sim-"
_SUPPORTED = frozenset({"kill", "stop", "restart", "pause", "partition", "latency",
                        "bandwidth", "stream"})


def _base_dir() -> str:
    return os.path.join(tempfile.gettempdir(), f"{_DIR_PREFIX}{os.getuid()}")


def _pid_alive(pid: int) -> bool:
    """True for a running (or stopped) process; a zombie has already ended."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def sweep_stale_dirs() -> List[str]:
    """Remove control directories left by runs whose process is gone (a killed pytest).

    A directory is named after the pid that made it; the processes of that run end by
    themselves when their parent's stream closes, only their directory would stay. One
    whose run still has a state record is left to ``python -m simulator down``.
    """
    removed: List[str] = []
    base = _base_dir()
    try:
        names = os.listdir(base)
    except FileNotFoundError:
        return removed
    for name in names:
        owner = name.split("-", 1)[0]
        path = os.path.join(base, name)
        if owner.isdigit() and not _pid_alive(int(owner)) and not _recorded(path, owner):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(name)
    return removed


#: In a control directory whose run has a state record: the records' directory.
_RECORDED = "recorded-in"


def _recorded(path: str, owner: str) -> bool:
    """True while a state record of the run that made ``path`` exists: then ``down`` removes
    the directory and says so (a sweep by another run in between would take that away)."""
    try:
        with open(os.path.join(path, _RECORDED), encoding="utf-8") as stream:
            records = stream.read().strip()
    except OSError:
        return False
    return bool(records) and bool(glob.glob(os.path.join(glob.escape(records),
                                                         f"*-local-{owner}.json")))


@dataclasses.dataclass
class _HostState:
    """What the backend knows about one running host."""

    host: Host
    context: mitogen.core.Context
    pid: int
    relay_pid: int
    control: str
    ping_handle: int
    accounts: Dict[str, Tuple[mitogen.core.Context, int]]
    alive: bool = True
    generation: int = 0
    down: threading.Event = dataclasses.field(default_factory=threading.Event)

    def pids(self) -> List[int]:
        return [self.pid, *(pid for _ctx, pid in self.accounts.values())]


@dataclasses.dataclass(frozen=True)
class _Handle:
    """What ``apply`` returns: enough to undo one fault."""

    fault: Fault
    target: str
    undo: str  # "cont" | "relay" | "revive" | "none"


class LocalBackend(Backend):
    """Hosts as local contexts in one tree; see the module docstring."""

    name = "local"

    def __init__(self, timeline: Optional[Timeline] = None, keepalive: bool = True,
                 router: Optional[mitogen.master.Router] = None,
                 on_start: Optional[Callable[[str], None]] = None) -> None:
        self.timeline = timeline or Timeline()
        #: Called with a host's id each time it (re)starts, once its contexts answer and
        #: before anything else sees them (the fault campaign installs its probes there).
        self.on_start = on_start
        self.keepalive = keepalive
        self._router = router
        self._own_router = router is None
        self._topology: Optional[Topology] = None
        self._states: Dict[str, _HostState] = {}
        self._lock = threading.RLock()
        self._dir: Optional[str] = None
        self._paused: Dict[str, List[int]] = {}
        self._relay_changed: Dict[str, str] = {}  # host id -> why its relay differs
        self._monitor: Optional[_KeepaliveMonitor] = None
        #: When heal_all last made every link whole: silences measured before do not count.
        self._healed_at = 0.0
        self._every_pid: Dict[int, str] = {}
        self.build_seconds: Optional[float] = None

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def router(self) -> mitogen.master.Router:
        if self._router is None:
            raise BackendError("the local backend is not created yet")
        return self._router

    @property
    def topology(self) -> Topology:
        if self._topology is None:
            raise BackendError("the local backend is not created yet")
        return self._topology

    def create(self, topology: Topology) -> None:
        if self._topology is not None:
            raise BackendError("this LocalBackend already serves a topology; make another")
        self._topology = topology
        sweep_stale_dirs()
        os.makedirs(_base_dir(), mode=0o700, exist_ok=True)
        self._dir = tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=_base_dir())
        if self._router is None:
            self._router = mitogen.master.Router()
        began = time.monotonic()
        try:
            self._start_tree(topology)
        except BaseException:
            self.destroy()
            raise
        self.build_seconds = time.monotonic() - began
        self.timeline.record("build", host=None, action="tree_up", seconds=self.build_seconds,
                             hosts=len(topology.hosts))
        if self.keepalive:
            net = topology.network
            self._monitor = _KeepaliveMonitor(self, net.keepalive_interval,
                                              net.keepalive_count)
            self._monitor.start()

    def destroy(self) -> None:
        """Resume what is paused, shut the tree down, and make sure no process is left."""
        if self._monitor is not None:
            self._monitor.stop()
            self._monitor = None
        for pids in self._paused.values():
            self._signal(pids, signal_module.SIGCONT)
        self._paused.clear()
        if self._router is not None and self._own_router:
            self.timeline.record("shutdown", step="router_shutdown")
            self._router.broker.shutdown()
            self._router.broker.join()
            self._router = None
        leftovers = self.wait_gone(list(self._every_pid), timeout=5.0)
        for pid in leftovers:  # never expected; a last resort so nothing outlives the run
            if "mitogen:" in _cmdline(pid) or RELAY_PATH in _cmdline(pid):
                self._signal([pid], signal_module.SIGKILL)
        self.timeline.record("shutdown", step="tree_gone", leftovers=leftovers)
        self._states.clear()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def capabilities(self) -> FrozenSet[str]:
        return _SUPPORTED

    def resources(self) -> Dict[str, Any]:
        """What a state record names for ``down``: the control directory of the links (the
        processes end by themselves with their runner; their relays see it go). From now on
        the directory is ``down``'s to remove: other runs' sweeps spare it while the record
        is there (see :func:`sweep_stale_dirs`)."""
        from simulator.state import state_dir

        if self._dir is not None:
            with open(os.path.join(self._dir, _RECORDED), "w", encoding="utf-8") as stream:
                stream.write(state_dir())
        return {"control_dir": self._dir}

    # -- building ----------------------------------------------------------------------------

    def _control_path(self, host: Host) -> str:
        assert self._dir is not None
        index = [h.id for h in self.topology.hosts].index(host.id)
        return os.path.join(self._dir, f"h{index}-{host.name[:40]}.sock")  # AF_UNIX: 108 max

    def _python_path(self, host: Host, control: str) -> List[str]:
        """The relay, told the link's steady properties, running the host's interpreter.
        It needs only the standard library: ``-S`` spares it site's start-up (a third of
        its own), which counts when a tree has a thousand links."""
        link = host.link
        argv = [sys.executable, "-S", "-c", RELAY_FROM_BYTECODE, RELAY_PATH,
                "--control", control, "--linger", str(RELAY_LINGER)]
        if link.latency or link.jitter:
            argv += ["--latency", repr(link.latency),
                     "--jitter", repr(min(link.jitter, link.latency))]
        if link.rate:
            argv += ["--bandwidth", repr(link.rate / 8.0)]
        return [*argv, "--exec", "--", self.interpreter(host.id)]

    def connect_spec(self, host: str, account: Optional[str] = None) -> ConnectSpec:
        """The local method, its interpreter wrapped by the link relay (hosts) or not
        (accounts: they live on the host, no link in between)."""
        found = self.topology.host(host)
        if account is None or account == found.login:
            control = self._control_path(found)
            return ConnectSpec("local", {"name": found.name,
                                         "python_path": self._python_path(found, control)})
        found.account(account)
        return ConnectSpec("local", {"name": f"sudo:{found.name}:{account}",
                                     "python_path": [self.interpreter(found.id)]})

    def interpreter(self, host: str) -> str:
        """The interpreter a host's contexts run: the one its image names (``python3.9``) if
        this machine has it, else the runner's own, so that a tree mixing versions can be
        tried without Docker wherever those interpreters are installed."""
        wanted = self.topology.host(host).python
        return _find_python(wanted) or sys.executable

    def _start_tree(self, topology: Topology) -> None:
        """Start every host as soon as its parent is up: separate subtrees are built at
        the same time, which matters when links have latency."""
        with concurrent.futures.ThreadPoolExecutor(max_workers=BUILD_THREADS,
                                                   thread_name_prefix="sim-build") as pool:
            pending = {pool.submit(self._start_host, root) for root in topology.roots()}
            while pending:
                done, pending = concurrent.futures.wait(
                    pending, return_when=concurrent.futures.FIRST_COMPLETED)
                for future in done:
                    host = future.result().host
                    pending |= {pool.submit(self._start_host, child)
                                for child in topology.children(host)}

    def _start_host(self, host: Host) -> _HostState:
        parent = None if host.parent is None else self._states[host.parent]
        if parent is not None and not parent.alive:
            raise BackendError(f"cannot start {host.id!r}: its parent is down")
        spec = self.connect_spec(host.id)
        began = time.monotonic()
        context = self.router.local(via=parent.context if parent else None,
                                    connect_timeout=self.topology.network.connect_timeout,
                                    **spec.kwargs)
        # Standard library calls only: importing anything else would make the new
        # interpreter load site, a good part of its start-up. Keepalives go to the router's
        # own PING handler, answered on the broker thread, never behind user calls.
        pid = context.call(os.getpid)
        relay_pid = context.call(os.getppid)
        ping_handle = mitogen.core.PING
        accounts = {}
        for account in host.accounts:
            if account.name == host.login:
                continue
            aspec = self.connect_spec(host.id, account.name)
            actx = self.router.local(via=context, **aspec.kwargs)
            apid = actx.call(os.getpid)
            accounts[account.name] = (actx, apid)
            self._every_pid[apid] = aspec.kwargs["name"]
            self._watch(host.id, actx, account.name)
            self.timeline.record("build", host=host.id, account=account.name,
                                 context_id=actx.context_id, pid=apid)
        old = self._states.get(host.id)
        state = _HostState(host, context, pid, relay_pid, self._control_path(host),
                           ping_handle, accounts,
                           generation=0 if old is None else old.generation + 1)
        with self._lock:
            self._states[host.id] = state
        self._every_pid[pid] = host.name
        self._every_pid[relay_pid] = f"relay:{host.name}"
        self._watch(host.id, context, None)
        self.timeline.record("build", host=host.id, context_id=context.context_id, pid=pid,
                             relay_pid=relay_pid, seconds=time.monotonic() - began,
                             accounts={k: v[0].context_id for k, v in accounts.items()})
        self.timeline.record("route", action="add", host=host.id,
                             context_id=context.context_id)
        if self.on_start is not None:
            self.on_start(host.id)
        return state

    def _watch(self, host_id: str, context: mitogen.core.Context,
               account: Optional[str]) -> None:
        """Record the master's view of a context going away, and mark the host down."""
        def gone() -> None:
            self.timeline.record("disconnect", host=host_id, account=account,
                                 context_id=context.context_id, name=context.name)
            if account is None:
                self.timeline.record("route", action="del", host=host_id,
                                     context_id=context.context_id)
                with self._lock:
                    state = self._states.get(host_id)
                    if state is not None and state.context is context:
                        state.alive = False
                        state.down.set()
        mitogen.core.listen(context, "disconnect", gone)

    # -- lookups -----------------------------------------------------------------------------

    def state(self, host: str) -> _HostState:
        host_id = self.topology.host(host).id
        try:
            return self._states[host_id]
        except KeyError:
            raise BackendError(f"host {host_id!r} was never started") from None

    def context(self, host: str, account: Optional[str] = None) -> mitogen.core.Context:
        """The current context of ``host`` (an id or unique name), or of one of its accounts."""
        state = self.state(host)
        if account is None or account == state.host.login:
            return state.context
        if account not in state.accounts:
            state.host.account(account)  # raises HostNotFound naming the accounts
        return state.accounts[account][0]

    def is_up(self, host: str) -> bool:
        return self.state(host).alive

    def placement(self, host: str) -> Placement:
        state = self.state(host)
        return Placement(state.host.id, f"local pid {state.pid} (relay {state.relay_pid})",
                         labels={"backend": "local", "control": state.control})

    def all_pids(self) -> Dict[int, str]:
        """Every pid this backend ever started (contexts and relays), with a label."""
        return dict(self._every_pid)

    @staticmethod
    def wait_gone(pids: Sequence[int], timeout: float) -> List[int]:
        """Wait until every pid has ended; return those still running at ``timeout``."""
        deadline = time.monotonic() + timeout
        left = [pid for pid in pids if _pid_alive(pid)]
        while left and time.monotonic() < deadline:
            time.sleep(0.01)  # polling /proc: there is no event for a non-child's exit
            left = [pid for pid in left if _pid_alive(pid)]
        return left

    # -- out-of-band management --------------------------------------------------------------

    def start(self, host: str) -> None:
        self.revive(self.topology.host(host).id)

    def stop(self, host: str, grace: float = 10.0) -> None:
        state = self.state(host)
        self._signal(state.pids(), signal_module.SIGTERM)
        left = self.wait_gone(state.pids(), grace)
        self._signal(left, signal_module.SIGKILL)
        self._wait_down(state.host.id)

    def kill(self, host: str, signal: str = "SIGKILL") -> None:
        state = self.state(host)
        self._signal(state.pids(), getattr(signal_module, signal))

    def pause(self, host: str) -> None:
        """Freeze the host's context. Its account contexts stay runnable: every message to
        or from them crosses the frozen context anyway, and a frozen orphan could never
        end, while these end by themselves once the host's context is gone (a killed runner:
        the host's relay kills the frozen host after its linger time)."""
        state = self.state(host)
        self._signal([state.pid], signal_module.SIGSTOP)
        self._paused[state.host.id] = [state.pid]

    def unpause(self, host: str) -> None:
        host_id = self.topology.host(host).id
        self._signal(self._paused.pop(host_id, []), signal_module.SIGCONT)

    def exec(self, host: str, argv: Sequence[str], user: Optional[str] = None,
             timeout: float = 30.0) -> ExecResult:
        """Run ``argv`` on this machine (every local host is this machine); ``user`` must be
        the current user or None, since the local backend cannot change users."""
        self.topology.host(host)
        if user is not None and user != _current_user():
            raise BackendError(f"the local backend runs everything as {_current_user()!r}; "
                               f"it cannot exec as {user!r}")
        done = subprocess.run(list(argv), capture_output=True, timeout=timeout, check=False)
        return ExecResult(done.returncode, done.stdout, done.stderr)

    def processes(self, host: str) -> Tuple[ProcessInfo, ...]:
        """The host's context and account processes that are still running."""
        state = self.state(host)
        user = _current_user()
        return tuple(ProcessInfo(pid, user, _cmdline(pid))
                     for pid in state.pids() if _pid_alive(pid))

    @staticmethod
    def _signal(pids: Sequence[int], signum: int) -> None:
        for pid in pids:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    # -- links -------------------------------------------------------------------------------

    def relay(self, host: str, action: Callable[[RelayControl], Any]) -> Any:
        """Run ``action`` with a control connection to the relay of ``host``'s edge."""
        state = self.state(host)
        try:
            with RelayControl(state.control, timeout=CONTROL_TIMEOUT) as control:
                return action(control)
        except RelayControlError as exc:
            raise BackendError(f"link relay of {state.host.id!r}: {exc}") from exc

    def _restore_link(self, host_id: str) -> None:
        """Back to the topology's steady link: clear faults, restore settings."""
        if self._relay_changed.pop(host_id, None) is None:
            return
        state = self._states[host_id]
        if state.alive:
            self.relay(host_id, lambda control: control.heal())

    # -- faults ------------------------------------------------------------------------------

    def apply(self, fault: Fault) -> object:
        target = self.topology.host(fault.target).id
        state = self.state(target)
        if not state.alive:
            raise BackendError(f"cannot apply {fault!r}: {target!r} is down")
        if isinstance(fault, Kill):
            return self._apply_kill(fault, target)
        if isinstance(fault, Restart):
            self.stop(target, fault.grace)
            self.revive(target)
            return _Handle(fault, target, "none")
        if isinstance(fault, Pause):
            self.pause(target)
            return _Handle(fault, target, "cont")
        if isinstance(fault, Partition):
            return self._apply_partition(fault, target)
        if isinstance(fault, Latency):
            self._relay_changed[target] = "latency"
            self.relay(target, lambda c: c.set(latency=fault.delay, jitter=fault.jitter))
            return _Handle(fault, target, "relay")
        if isinstance(fault, Bandwidth):
            self._relay_changed[target] = "bandwidth"
            self.relay(target, lambda c: c.set(bandwidth=fault.rate / 8.0))
            return _Handle(fault, target, "relay")
        if isinstance(fault, StreamFault):
            return self._apply_stream(fault, target)
        raise BackendError(f"the local backend cannot apply {fault.KIND!r} faults; it can do "
                           f"{', '.join(sorted(_SUPPORTED))}")

    def _apply_kill(self, fault: Kill, target: str) -> _Handle:
        if fault.mode == "crash":
            self.kill(target)
        elif fault.mode == "stop":
            self.stop(target, fault.grace)
        else:
            raise BackendError("the local backend cannot do Kill(mode='power_off'): a relay "
                               "notices its child's exit and closes the link; use a "
                               "Partition(mode='drop') then a kill instead")
        return _Handle(fault, target, "revive")

    def _apply_partition(self, fault: Partition, target: str) -> _Handle:
        if fault.mode == "drop":
            direction = {"both": "both", "ingress": "upstream",
                         "egress": "downstream"}[fault.direction]
            self._relay_changed[target] = "stall"
            self.relay(target, lambda c: c.fault("stall", direction=direction))
            return _Handle(fault, target, "relay")
        self.relay(target, lambda c: c.fault("reset"))
        return _Handle(fault, target, "revive")

    def _apply_stream(self, fault: StreamFault, target: str) -> _Handle:
        if fault.kind == "stall":
            self._relay_changed[target] = "stall"
            if fault.nbytes:
                self.relay(target, lambda c: c.fault("cut_after", nbytes=fault.nbytes))
            self.relay(target, lambda c: c.fault("stall"))
            return _Handle(fault, target, "relay")
        nbytes = fault.nbytes or 0
        if fault.kind == "reset" and not nbytes:
            self.relay(target, lambda c: c.fault("reset"))
            return _Handle(fault, target, "revive")
        # A cut that has not happened yet must not happen after the heal: the relay is
        # healed too (which disarms it), then the host started again if it did happen.
        self._relay_changed[target] = "cut"
        self.relay(target, lambda c: c.fault("cut_after", nbytes=nbytes))
        return _Handle(fault, target, "relay")

    def heal(self, handle: object) -> None:
        if not isinstance(handle, _Handle):
            raise BackendError(f"heal: not a handle of the local backend: {handle!r}")
        if handle.undo == "cont":
            self.unpause(handle.target)
        elif handle.undo == "relay":
            self._restore_link(handle.target)
        if handle.undo in ("revive", "relay"):
            self.revive(handle.target)

    def heal_all(self) -> None:
        """Resume paused hosts, restore every changed link, start every host that is down.

        Keepalive silences from before count no more: a link the monitor was about to give
        up (a host paused until now) stays, and one it is giving up this moment is waited
        for and started again, so that every host runs once this returns."""
        for host_id in list(self._paused):
            self.unpause(host_id)
        for host_id in list(self._relay_changed):
            self._restore_link(host_id)
        if self._monitor is not None:
            self._monitor.forgive()
        with self._lock:
            self._healed_at = time.monotonic()
        for host in self.topology.roots():
            self.revive(host.id)

    def revive(self, host_id: str) -> List[str]:
        """Start again every host of ``host_id``'s subtree that is down; return their ids.

        Waits first until the master has seen the old contexts go, so that routes to a
        dead context never linger next to its replacement, and until the old link relay has
        ended, so that the new one can take its control socket (a relay whose link was
        reset lingers a moment, then stops its child).
        """
        started = []
        for host in self.topology.subtree(self.topology.host(host_id)):
            state = self._states.get(host.id)
            if state is not None and state.alive:
                continue
            if state is not None:
                self._wait_down(host.id)
                self._wait_relay_gone(state)
            self._start_host(host)
            started.append(host.id)
        if started:
            self.timeline.record("build", host=host_id, action="revived", hosts=started)
        return started

    def _wait_relay_gone(self, state: _HostState) -> None:
        """Wait (bounded) for a dead link's relay to end; end it if it outstays that."""
        if self.wait_gone([state.relay_pid], RELAY_LINGER + RELAY_STOP_GRACE):
            self._signal([state.relay_pid], signal_module.SIGKILL)
            self.wait_gone([state.relay_pid], 5.0)

    def _wait_down(self, host_id: str) -> None:
        """Wait until the master saw the host's context disconnect (bounded)."""
        state = self._states[host_id]
        if not state.down.wait(DISCONNECT_WAIT):
            raise BackendError(f"{host_id!r}: its context did not disconnect within "
                               f"{DISCONNECT_WAIT:g} s after it was stopped")

    def give_up_link(self, host_id: str, silent_for: float,
                     decided_at: Optional[float] = None) -> None:
        """What an ssh client does after ServerAliveCountMax unanswered keepalives: close
        the link. The parent then sees the stream end and sends DEL_ROUTE up the tree.

        The host counts as down from now (a revive waits for its context to go, then starts
        it again); not if ``heal_all`` ran since the silence was judged (``decided_at``)."""
        with self._lock:
            state = self._states.get(host_id)
            if state is None or not state.alive or (
                    decided_at is not None and decided_at <= self._healed_at):
                return
            state.alive = False
        self.timeline.record("keepalive", host=host_id, silent_for=round(silent_for, 3))
        try:
            self.relay(host_id, lambda c: c.fault("reset"))
        except BackendError:
            pass  # already gone: its parent has seen it end


class _KeepaliveMonitor(threading.Thread):
    """ssh-style keepalives for links that have no ssh; see the module docstring."""

    def __init__(self, backend: LocalBackend, interval: float, count: int) -> None:
        super().__init__(name="sim-keepalive", daemon=True)
        self.backend = backend
        self.interval = interval
        self.count = count
        self._stop_event = threading.Event()
        self._ready = threading.Event()
        self._last_ok: Dict[Tuple[str, int], float] = {}

    def start(self) -> None:
        """Start, and return once the thread holds every resource it will ever hold: the
        leak check of the first test must not see its latch wake-up pipe appear."""
        super().start()
        self._ready.wait(5.0)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=self.interval + 5.0)

    def run(self) -> None:
        mitogen.core._warm_thread_resources()
        self._ready.set()
        while not self._stop_event.is_set():
            began = time.monotonic()
            try:
                self._round(began)
            except mitogen.core.Error:
                if not self.backend.router.broker.running:
                    return
            self._stop_event.wait(max(0.0, began + self.interval - time.monotonic()))

    def _round(self, began: float) -> None:
        with self.backend._lock:
            states = [s for s in self.backend._states.values() if s.alive]
        pending = []
        for state in states:
            key = (state.host.id, state.generation)
            self._last_ok.setdefault(key, began)
            msg = mitogen.core.Message(handle=state.ping_handle)
            pending.append((state, key, state.context.send_async(msg)))
        for _state, key, recv in pending:
            try:
                recv.get(timeout=max(0.0, began + self.interval - time.monotonic()))
                self._last_ok[key] = time.monotonic()
            except mitogen.core.TimeoutError:
                pass
            except mitogen.core.ChannelError:
                self._last_ok.pop(key, None)
            finally:
                recv.close()
        self._judge(states)

    def _judge(self, states: List[_HostState]) -> None:
        now = time.monotonic()
        bound = self.interval * self.count
        silent = {s.host.id: now - self._last_ok.get((s.host.id, s.generation), now)
                  for s in states}
        for state in states:
            quiet = silent[state.host.id]
            parent = state.host.parent
            parent_fine = parent is None or silent.get(parent, 0.0) < bound
            if quiet >= bound and parent_fine and state.alive:
                self.backend.give_up_link(state.host.id, quiet, decided_at=now)

    def forgive(self) -> None:
        """Every link counts as answered now (``heal_all`` made them whole)."""
        now = time.monotonic()
        for key in list(self._last_ok):
            self._last_ok[key] = now


#: The interpreter names a topology may ask the local backend for.
KNOWN_PYTHONS = ("python3.9", "python3.10", "python3.11", "python3.12", "python3.13",
                 "python3.14")


def interpreters() -> Tuple[str, ...]:
    """The interpreters a local host can really run here (others fall back to the runner's):
    its own version always, the others where this machine has them (on PATH, or pyenv's)."""
    mine = "python%d.%d" % sys.version_info[:2]
    return tuple(name for name in KNOWN_PYTHONS if name == mine or _find_python(name))


def _find_python(name: str) -> Optional[str]:
    """``python3.9`` on PATH (not a pyenv shim, which may refuse to run) or under pyenv."""
    found = shutil.which(name)
    if found and "/shims/" not in found:
        return found
    version = name[len("python"):]
    if not version or not all(part.isdigit() for part in version.split(".")):
        return None
    root = os.path.expanduser("~/.pyenv/versions")
    try:
        candidates = sorted(d for d in os.listdir(root) if d.startswith(version + "."))
    except OSError:
        return None
    for directory in reversed(candidates):
        path = os.path.join(root, directory, "bin", name)
        if os.access(path, os.X_OK):
            return path
    return None


def _current_user() -> str:
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name
