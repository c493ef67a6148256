"""The load a fault campaign keeps on the tree: calls, channels and imports along every path.

A :class:`Workload` runs a few threads in the master, each going round every context of the
tree (every host and every account) in its own seeded order, doing one op at a time:

``call``     ``whoami(token)``: answered at once; the answer names the context that ran it
``hold``     ``hold(seconds, token)``: stays in flight a while, so faults find calls to break
``bulk``     ``whoami`` with 64 KiB more: a frame long enough for a cut to fall inside it
``nested``   a call from the parent context of the target (its host, for an account) into
             it: a call that starts inside the tree, not in the master
``import``   imports a module only the master has (a package written for the run, one fresh
             module per op), so the request climbs every hop to the master
``channel``  asks one context to send tagged messages to another context's sink: they travel
             from one branch to another through their closest common ancestor; each sink
             acknowledges what it got to the master, naming where it arrived

Every op's start and end go into the run's :class:`~simulator.history.History`, with the hosts
its path crosses; every acknowledged message becomes a ``deliver`` event. The workload asserts
nothing itself: :mod:`simulator.checker` judges the history.

Each context gets the campaign probes (:func:`simulator.probes.install_campaign_probes`) as
soon as it starts, from the backend's ``on_start`` hook: its route log and its channel sink.
The master's own route log is kept here (:meth:`Workload.watch_master`).
"""

from __future__ import annotations

import itertools
import os
import random
import shutil
import sys
import tempfile
import threading
import time
import uuid
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import mitogen.core
from simulator import probes
from simulator.history import History
from simulator.topology import Topology

__all__ = ["ContextHook", "Target", "Workload"]

#: (host id, account or None for the host's own context)
Target = Tuple[str, Optional[str]]
#: Called with (context, host id, account) for every context once its probes are in.
ContextHook = Callable[[mitogen.core.Context, str, Optional[str]], None]

#: An op in flight: (op, its receiver, target, the token it must answer with, when it was
#: sent, when its answer arrived: see :meth:`Workload._note_arrival`).
_Pending = Tuple[int, mitogen.core.Receiver, Target, Any, float, List[float]]
#: Op types and how often each is drawn.
_MIX = (("call", 3), ("import", 2), ("channel", 2), ("nested", 2), ("hold", 1), ("bulk", 1))
#: Bytes a ``bulk`` op carries.
BULK_BYTES = 64 * 1024
#: Modules written for one run; imports wrap around after the last one.
MODULES = 400
#: Bytes of padding per module, so a module spans several relay chunks on slow links.
MODULE_PADDING = 2048


class Workload:
    """Calls, channels and imports across ``topology`` on ``backend`` (see module doc)."""

    def __init__(self, backend: Any, topology: Topology, history: History, seed: str, *,
                 wait: float, workers: int = 4, pace: float = 0.05, messages: int = 3,
                 hold: Tuple[float, float] = (0.2, 1.5),
                 hooks: Sequence[ContextHook] = ()) -> None:
        self.backend = backend
        self.topology = topology
        self.history = history
        self.seed = seed
        self.wait = wait
        self.workers = workers
        self.pace = pace
        self.messages = messages
        self.hold = hold
        self.hooks = list(hooks)
        self.targets: List[Target] = [(host.id, None) for host in topology.walk()] + [
            (host.id, account.name) for host in topology.walk() for account in host.accounts
            if account.name != host.login]
        self._paths = {host.id: [a.id for a in topology.ancestors(host)] + [host.id]
                       for host in topology.walk()}
        self._ids = itertools.count(1)
        self._bulk = os.urandom(BULK_BYTES)
        self._modules = itertools.count(0)
        self._sinks: Dict[int, mitogen.core.Sender] = {}
        self._ack: Optional[mitogen.core.Sender] = None
        self._stop = threading.Event()
        self._threads: List[threading.Thread] = []
        self._lock = threading.Lock()
        self._package = f"simcampaign_{uuid.uuid4().hex[:12]}"
        self._dir = tempfile.mkdtemp(prefix="sim-campaign-modules-")
        self._write_package()

    # -- set-up ------------------------------------------------------------------------------

    def _write_package(self) -> None:
        """A package only the master has: a child must fetch each module over the tree."""
        package = os.path.join(self._dir, self._package)
        os.mkdir(package)
        with open(os.path.join(package, "__init__.py"), "w") as stream:
            stream.write('"""Modules for one fault-campaign run."""\n')
        padding = "x" * MODULE_PADDING
        for index in range(MODULES):
            with open(os.path.join(package, f"m{index}.py"), "w") as stream:
                stream.write(f'WHO = "{self._package}.m{index}"\nPAD = "{padding}"\n')
        sys.path.insert(0, self._dir)

    def watch_master(self) -> None:
        """Log every context the master forgets, and open the master's end of the channel
        acknowledgements. Call once the backend's router exists (its first ``on_start``)."""
        router = self.backend.router
        forget = router._forget_context
        history = self.history

        def logged_forget(context_id: int) -> None:
            history.record("del_route", host=None, lost=context_id)
            forget(context_id)

        router._forget_context = logged_forget
        handle = router.add_handler(self._on_ack)
        self._ack = mitogen.core.Sender(router.myself(), handle)

    def _on_ack(self, msg: mitogen.core.Message) -> None:
        if msg.is_dead:
            return
        body = msg.unpickle()
        self.history.record("deliver", op=body.get("op"), tag=body.get("tag"),
                            to=body.get("to"), at=body.get("at"), src=body.get("src"),
                            came_from=msg.src_id)

    def on_start(self, host_id: str) -> None:
        """The backend's hook: probes into a host's new contexts, before anything else."""
        with self._lock:  # roots start on several build threads at once
            if self._ack is None:
                self.watch_master()
        host = self.topology.host(host_id)
        for account in [None, *(a.name for a in host.accounts if a.name != host.login)]:
            context = self.backend.context(host_id, account)
            try:
                sink = context.call(probes.install_campaign_probes, self._ack)
            except mitogen.core.Error as exc:
                self.history.record("probe", host=host_id, account=account,
                                    context_id=context.context_id, error=str(exc))
                continue
            with self._lock:
                self._sinks[context.context_id] = sink
            self.history.record("probe", host=host_id, account=account,
                                context_id=context.context_id)
            for hook in self.hooks:
                hook(context, host_id, account)

    # -- the load ----------------------------------------------------------------------------

    def start(self) -> None:
        for index in range(self.workers):
            thread = threading.Thread(target=self._worker, args=(index,), daemon=True,
                                      name=f"sim-workload-{index}")
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """Finish the ops in flight (each bounded by ``wait``) and stop."""
        self._stop.set()
        for thread in self._threads:
            thread.join(self.wait + 10.0)
        self._threads = []

    def _worker(self, index: int) -> None:
        rng = random.Random(f"{self.seed}:worker{index}")
        order = list(self.targets)
        rng.shuffle(order)
        kinds = [kind for kind, weight in _MIX for _ in range(weight)]
        partners = {}  # each sender goes round every other context in turn: every path
        for target in order:
            others = [t for t in self.targets if t != target] or [target]
            rng.shuffle(others)
            partners[target] = itertools.cycle(others)
        for turn in itertools.count():
            if self._stop.is_set():
                return
            target = order[turn % len(order)]
            kind = rng.choice(kinds)
            try:
                if kind == "channel":
                    self._channel(target, next(partners[target]))
                else:
                    self._call(kind, target, "load", rng)
            except Exception as exc:  # a load thread that died would thin the load unseen
                self.history.record("workload_error", op_kind=kind, host=target[0],
                                    account=target[1], error=f"{type(exc).__name__}: {exc}")
            self._stop.wait(self.pace)

    def _describe(self, target: Target) -> Tuple[mitogen.core.Context, Dict[str, Any]]:
        host, account = target
        context = self.backend.context(host, account)
        return context, {"host": host, "account": account, "context_id": context.context_id}

    def _caller(self, target: Target) -> Optional[Target]:
        """The context that may call ``target`` from inside the tree: its host for an account,
        its parent host's context for a host; None for a root host."""
        host, account = target
        if account is not None:
            return host, None
        parent = self.topology.host(host).parent
        return None if parent is None else (parent, None)

    def _call(self, kind: str, target: Target, phase: str,
              rng: Optional[random.Random] = None) -> None:
        self._finish(*self._send(kind, target, phase, rng))

    def _send(self, kind: str, target: Target, phase: str,
              rng: Optional[random.Random] = None) -> _Pending:
        """Start one op (not a channel); what :meth:`_finish` needs to wait for it. Without
        ``rng`` a hold is as short as holds go."""
        caller = self._caller(target) if kind == "nested" else None
        if kind == "nested" and caller is None:
            kind = "call"  # a root host has no context above it but the master
        context, dst = self._describe(target)
        op = next(self._ids)
        if kind == "nested":
            assert caller is not None
            token: Any = op
            fn: Callable[..., Any] = probes.call_into
            args: Tuple[Any, ...] = (dst["context_id"], op)
            context = self._describe(caller)[0]
        elif kind == "import":
            token = f"{self._package}.m{next(self._modules) % MODULES}"
            fn, args = probes.import_named, (token,)
        elif kind == "bulk":
            token = op
            fn, args = probes.whoami, (op, self._bulk)
        elif kind == "hold":
            token = op
            seconds = self.hold[0] if rng is None else round(rng.uniform(*self.hold), 2)
            fn, args = probes.hold, (seconds, op)
        else:
            token = op
            fn, args = probes.whoami, (op,)
        self.history.op_start(op, kind, phase, dst, self._paths[target[0]])
        recv = self._started(op, target, lambda: context.call_async(fn, *args))
        return op, recv, target, token, time.monotonic(), self._note_arrival(recv)

    def _started(self, op: int, target: Target,
                 send: Callable[[], mitogen.core.Receiver]) -> mitogen.core.Receiver:
        """``send()``, the op ended as an error if it raises: an op that started never
        stays open in the history (the checker would call it hung)."""
        try:
            return send()
        except Exception as exc:
            self.history.op_end(op, "error", error=f"{type(exc).__name__}: {exc}",
                                host=target[0], account=target[1])
            raise

    @staticmethod
    def _note_arrival(recv: mitogen.core.Receiver) -> List[float]:
        """A list that gets the moment the answer arrives (so that an op waited for after
        others still ends when its answer came). Call right after sending."""
        arrived: List[float] = []
        recv.notify = lambda _recv: arrived.append(time.monotonic())  # type: ignore[assignment]
        if recv.size():
            arrived.append(time.monotonic())  # it came before anyone was told to note it
        return arrived

    def _finish(self, op: int, recv: mitogen.core.Receiver, target: Target, token: Any,
                began: float, arrived: List[float]) -> None:
        """Wait for one op's answer (until ``wait`` after ``began``) and record how it ended,
        when the answer arrived."""
        host, account = target
        try:
            at, answer = recv.get(timeout=max(0.0, began + self.wait - time.monotonic())
                                  ).unpickle()
        except mitogen.core.TimeoutError:
            self.history.op_end(op, "timeout", error=f"no answer within {self.wait:g} s",
                                host=host, account=account)
        except mitogen.core.Error as exc:
            self.history.op_end(op, "error", error=f"{type(exc).__name__}: {exc}",
                                host=host, account=account, time=arrived[0] if arrived else None)
        else:
            if at is None and isinstance(answer, dict) and "failed" in answer:
                # call_into's inner call failed: when it began counts (see probes.call_into)
                self.history.op_end(op, "error", error=str(answer["failed"]), host=host,
                                    account=account, time=arrived[0] if arrived else None,
                                    ran=float(answer["ran"]))
            else:
                self.history.op_end(op, "ok", at=at, host=host, account=account,
                                    error=None if answer == token else
                                    f"answered {answer!r}, not {token!r}",
                                    time=arrived[0] if arrived else None)
        finally:
            recv.notify = None
            recv.close()

    def _channel(self, source: Target, destination: Target) -> None:
        self._finish(*self._send_channel(source, destination, "load"))

    def _send_channel(self, source: Target, destination: Target, phase: str) -> _Pending:
        """Start a channel op from ``source`` to ``destination``'s sink."""
        with self._lock:
            src_context, src = self._describe(source)
            dst_context, dst = self._describe(destination)
            sink = self._sinks.get(dst_context.context_id)
        if sink is None:  # its probes are not in yet (it is starting): a plain call instead
            return self._send("call", source, phase)
        op = next(self._ids)
        path = list(dict.fromkeys(self._paths[source[0]] + self._paths[destination[0]]))
        self.history.op_start(op, "channel", phase, src, self._paths[source[0]], to=dst)
        self.history.record("channel", op=op, count=self.messages, path=path,
                            host=dst["host"], account=dst["account"])
        recv = self._started(op, source, lambda: src_context.call_async(
            probes.channel_send, sink, op, dst["context_id"], self.messages))
        return op, recv, source, self.messages, time.monotonic(), self._note_arrival(recv)

    # -- after the faults --------------------------------------------------------------------

    def final_sweep(self) -> None:
        """Once everything is healed: every op type to every host and account (a channel
        to the next one in turn, a hold as short as holds go), all at once."""
        pending = []
        neighbours = self.targets[1:] + self.targets[:1]
        for target, neighbour in zip(self.targets, neighbours):
            for kind, _weight in _MIX:
                if kind == "channel":
                    pending.append(self._send_channel(target, neighbour, "final"))
                else:
                    pending.append(self._send(kind, target, "final"))
        for entry in pending:
            self._finish(*entry)

    def collect(self) -> Dict[str, Any]:
        """Each current context's route log into the history (``del_route`` per hop), the
        ids of the contexts that serve each host and account now, and those of every
        context whose process has ended (the lost ones)."""
        from simulator.local import _pid_alive  # the backend's module: loaded by now

        current = []
        logs = []
        for host, account in self.targets:
            context = self.backend.context(host, account)
            current.append({"host": host, "account": account,
                            "context_id": context.context_id})
            logs.append((host, account, context.call_async(probes.take_route_log)))
        deadline = time.monotonic() + self.wait  # one wait for all: a hung one is not n
        for host, account, recv in logs:
            try:
                for when, lost in recv.get(timeout=max(0.0, deadline - time.monotonic())
                                           ).unpickle():
                    self.history.record("del_route", time=when, host=host, account=account,
                                        lost=lost)
            except mitogen.core.Error as exc:
                self.history.record("collect_failed", host=host, account=account,
                                    error=str(exc))
            finally:
                recv.close()
        dead = sorted(int(e["context_id"]) for e in self.history.events()
                      if e.get("kind") == "build" and e.get("pid") is not None
                      and not _pid_alive(int(e["pid"])))
        return self.history.record("campaign", action="collect", current=current, dead=dead)

    def close(self) -> None:
        """Remove the run's modules from disk, ``sys.path`` and ``sys.modules``."""
        if self._dir in sys.path:
            sys.path.remove(self._dir)
        for name in [n for n in sys.modules if n.split(".")[0] == self._package]:
            del sys.modules[name]
        shutil.rmtree(self._dir, ignore_errors=True)
