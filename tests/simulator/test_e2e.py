"""End-to-end tests on the tree of ``--topology=FILE`` (``pytest --topology=topologies/dc.yml``).

Without ``--topology`` every test here is skipped, with the reason printed. The session's
tree is shared by the tests; each test that breaks part of it heals it (the ``sim_faults``
fixture starts every host again), and the shutdown test builds a tree of its own.

Bounds (also stated in the README): a crash fails every pending call into the lost subtree
within 1 s on the local backend, 2 s on the docker backend; a silent partition is detected by
the keepalives (emulated on local, ssh's own on docker) within
``keepalive_interval * (keepalive_count + 1)`` seconds (8 s for dc.yml) plus 1 s; the master's
shutdown leaves no process of the tree within 5 s (on docker: no process on any host that was
not there before, and no file that the bootstrap wrote).
"""

from __future__ import annotations

import logging
import os
import platform
import socket
import sys
import threading
import time
import uuid
from typing import Dict, List, Sequence, Tuple

import pytest

import mitogen.core
from simulator import probes
from simulator.faults import Kill, Partition, run_plan
from tests.support import funcs

CRASH_BOUND = {"local": 1.0, "docker": 2.0, "swarm": 2.0}
SHUTDOWN_BOUND = 5.0
CALL_TIMEOUT = 30.0


def _host(sim, name: str, role: str):
    """The host called ``name`` if the topology has one, else its first host of ``role``."""
    try:
        return sim.topology.host(name)
    except LookupError:
        hosts = sim.topology.select(f"role:{role}")
        if not hosts:
            pytest.skip(f"topology {sim.topology.name!r} has no host {name!r} and no {role}")
        return hosts[0]


def _webapps(sim) -> List[Tuple[str, str]]:
    found = [(host.id, "webapp") for host in sim.topology.hosts
             if any(a.name == "webapp" for a in host.accounts)]
    if len(found) < 2:
        pytest.skip(f"topology {sim.topology.name!r} has fewer than two 'webapp' accounts")
    return found[:2]


def _tree_path(sim, src_host: str, dst_host: str) -> List[str]:
    """Host names from ``src_host`` up to the closest common ancestor and down to ``dst_host``."""
    topology = sim.topology
    up = [topology.host(src_host), *reversed(topology.ancestors(topology.host(src_host)))]
    down = [*topology.ancestors(topology.host(dst_host)), topology.host(dst_host)]
    shared = [h for h in up if h in down]
    if not shared:  # different roots: the path crosses the master
        return [h.name for h in up] + ["master"] + [h.name for h in down]
    top = shared[0]
    return ([h.name for h in up[:up.index(top) + 1]]
            + [h.name for h in down[down.index(top) + 1:]])


def _subtree_contexts(sim, host) -> Dict[str, mitogen.core.Context]:
    return sim.contexts(sim.topology.subtree(host))


def _others(sim, host) -> Dict[str, mitogen.core.Context]:
    lost = {below.id for below in sim.topology.subtree(host)}
    return sim.contexts(h for h in sim.topology.hosts if h.id not in lost)


def _answers(contexts: Dict[str, mitogen.core.Context], timeout: float = CALL_TIMEOUT) -> None:
    pending = {name: ctx.call_async(probes.identity, name) for name, ctx in contexts.items()}
    for name, recv in pending.items():
        assert recv.get(timeout=timeout).unpickle() == name


# --------------------------------------------------------------------------------------------
# 1. Routing
# --------------------------------------------------------------------------------------------


def test_every_host_and_account_is_reachable_from_the_master(sim):
    routes = sim.router.get_routes()
    for name, ctx in sim.contexts().items():
        pid, _relay = ctx.call(probes.pids)
        assert ctx.context_id in routes, name
        for _ in range(5):
            began = time.monotonic()
            assert ctx.call(probes.identity, name) == name
            sim.timeline.record("call", path=f"master -> {name}",
                                seconds=time.monotonic() - began)
        if name not in {h.name for h in sim.topology.hosts}:
            continue
        if sim.backend.name == "local":
            assert sim.backend.placement(name).where.startswith(f"local pid {pid} ")
        else:  # each host is a machine of its own: the context runs on the right one
            assert ctx.call(socket.gethostname) == name


def test_a_call_between_the_webapps_takes_the_tree_path_hop_by_hop(sim):
    (dst_host, dst_account), (src_host, src_account) = _webapps(sim)
    src, dst = sim.context(src_host, src_account), sim.context(dst_host, dst_account)
    contexts = sim.contexts()
    sim.router.route_trace = []
    for ctx in contexts.values():
        ctx.call(probes.start_route_trace)
    try:
        sender = dst.call(funcs.open_receiver)
        assert src.call(funcs.send_to, sender, "hello sibling") is True
        assert dst.call(funcs.receive, sender.dst_handle) == "hello sibling"
    finally:
        traces = {name: ctx.call(probes.take_route_trace) for name, ctx in contexts.items()}
        traces["master"] = list(sim.router.route_trace)
        sim.router.route_trace = None
    ids = {ctx.context_id: name for name, ctx in contexts.items()}
    ids[0] = "master"
    hops = {}
    for name, trace in traces.items():
        for s, d, came_from, went_to in trace:
            if (s, d) == (src.context_id, dst.context_id):
                hops[name] = (ids.get(came_from), ids.get(went_to))
    first = [name for name, (came_from, _) in hops.items() if came_from == src.name]
    assert len(first) == 1, hops
    path = [src.name, first[0]]
    while path[-1] != dst.name:
        path.append(hops[path[-1]][1])
        assert len(path) <= len(contexts) + 2, f"the route loops: {path}"
    expected = [src.name, *_tree_path(sim, src_host, dst_host), dst.name]
    assert path == expected
    assert set(hops) == set(expected[1:-1])  # nobody off the path saw it, not the master
    sender = dst.call(probes.open_receiver)
    assert src.call(probes.send_stamps, sender, 5) == 5
    for seconds in dst.call(probes.receive_delays, sender.dst_handle, 5):
        sim.timeline.record("call", path=f"{src.name} -> {dst.name} (one way)",
                            seconds=seconds)


# --------------------------------------------------------------------------------------------
# 2. Disconnect propagation
# --------------------------------------------------------------------------------------------


def _watch(sim, rack, lost: Dict[str, mitogen.core.Context]):
    """Disconnect events in the master, and DEL_ROUTE arrival times in each ancestor."""
    events = {name: threading.Event() for name in lost}
    for name, ctx in lost.items():
        mitogen.core.listen(ctx, "disconnect", events[name].set)
    ids = [ctx.context_id for ctx in lost.values()]
    ancestors = [sim.context(a.id) for a in sim.topology.ancestors(rack)]
    for ctx in ancestors:
        ctx.call(probes.watch_disconnects, ids)
    master_seen: Dict[int, float] = {}
    for ctx in lost.values():
        mitogen.core.listen(ctx, "disconnect", _stamp(master_seen, ctx.context_id))
    return events, ancestors, master_seen


def _stamp(table: Dict[int, float], context_id: int):
    def stamp() -> None:
        table.setdefault(context_id, time.monotonic())
    return stamp


def _record_propagation(sim, fault: str, rack, lost, ancestors, master_seen,
                        began: float) -> None:
    """Per hop, when the loss of ``rack`` became known, relative to the fault."""
    rack_id = lost[rack.name].context_id
    for ctx in reversed(ancestors):
        seen = ctx.call(probes.disconnect_times, [rack_id]).get(rack_id)
        if seen is not None:
            sim.timeline.record("del_route", host=sim.topology.host(ctx.name).id,
                                lost=rack.name, fault=fault, seconds=seen - began, time=seen)
    if rack_id in master_seen:
        sim.timeline.record("del_route", host=None, lost=rack.name, fault=fault,
                            seconds=master_seen[rack_id] - began, time=master_seen[rack_id])


def test_killing_a_rack_fails_its_subtree_fast_and_spares_the_rest(sim, sim_faults,
                                                                    sim_testinfra):
    rack = _host(sim, "rack12", "rack")
    lost = _subtree_contexts(sim, rack)
    if sim.backend.name == "local":
        old_pids = [pid for below in sim.topology.subtree(rack)
                    for pid in sim.backend.state(below.id).pids()]
    else:  # per host: each container has its own pid namespace
        old_by_host = _context_pids(sim, rack)
    others = _others(sim, rack)
    events, ancestors, master_seen = _watch(sim, rack, lost)
    pending = {name: ctx.call_async(funcs.sleep_forever) for name, ctx in lost.items()}
    began = time.monotonic()
    sim_faults.apply(Kill(rack.id))
    failed_at = {}
    for name, recv in pending.items():
        with pytest.raises(mitogen.core.ChannelError):
            recv.get(timeout=CALL_TIMEOUT)
        failed_at[name] = time.monotonic() - began
    assert max(failed_at.values()) <= CRASH_BOUND[sim.backend.name], failed_at
    assert all(event.wait(5.0) for event in events.values())
    _record_propagation(sim, "kill", rack, lost, ancestors, master_seen, began)
    routes = sim.router.get_routes()
    assert not {ctx.context_id for ctx in lost.values()} & set(routes)
    _answers(others)
    # Out of band: nothing of the lost subtree still runs on its hosts.
    if sim.backend.name != "local":
        assert _left_running(sim, old_by_host, 5.0) == {}
        return
    assert sim.backend.wait_gone(old_pids, 5.0) == []
    infra = sim_testinfra(rack.id)
    running = {p.pid for p in infra.process.filter()}
    assert not running & set(old_pids)


def _context_pids(sim, top) -> Dict[str, set]:
    """Per host of ``top``'s subtree, the pids (as the host sees them) of its contexts."""
    found = {}
    for below in sim.topology.subtree(top):
        contexts = [sim.context(below.id), *(sim.context(below.id, a.name)
                                             for a in below.accounts if a.name != below.login)]
        found[below.id] = {ctx.call(probes.pids)[0] for ctx in contexts}
    return found


def _left_running(sim, pids_by_host: Dict[str, set], timeout: float) -> Dict[str, List[int]]:
    """Which of these processes still run after ``timeout`` (seen out of band; a host that
    is down runs nothing)."""
    deadline = time.monotonic() + timeout
    while True:
        left = {}
        for host, pids in pids_by_host.items():
            if sim.backend.running(host):
                alive = pids & {p.pid for p in sim.backend.processes(host)}
                if alive:
                    left[host] = sorted(alive)
        if not left or time.monotonic() >= deadline:
            return left


def test_a_silent_partition_is_detected_within_the_keepalive_bound(sim, sim_faults):
    rack = _host(sim, "rack12", "rack")
    net = sim.topology.network
    bound = net.keepalive_interval * (net.keepalive_count + 1) + 1.0
    lost = _subtree_contexts(sim, rack)
    others = _others(sim, rack)
    events, ancestors, master_seen = _watch(sim, rack, lost)
    pending = {name: ctx.call_async(funcs.sleep_forever) for name, ctx in lost.items()}
    began = time.monotonic()
    sim_faults.apply(Partition(rack.id, mode="drop"))
    _answers(others)  # the rest of the tree works while the edge is cut
    for recv in pending.values():
        with pytest.raises(mitogen.core.ChannelError):
            recv.get(timeout=bound + 10.0)
    detected = time.monotonic() - began
    assert detected <= bound, detected
    assert all(event.wait(5.0) for event in events.values())
    _record_propagation(sim, "silent partition", rack, lost, ancestors, master_seen, began)
    gave_up = sim.timeline.events(since=began, kinds=["keepalive"])
    assert [e["host"] for e in gave_up] == [rack.id]


# --------------------------------------------------------------------------------------------
# 3. Source verification
# --------------------------------------------------------------------------------------------


class _Flag(logging.Handler):
    def __init__(self, needle: str) -> None:
        super().__init__(logging.ERROR)
        self.needle = needle
        self.seen = threading.Event()
        self.records: List[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if self.needle in record.getMessage():
            self.records.append(record)
            self.seen.set()


def test_a_compromised_node_cannot_forge_the_master_or_a_sibling(sim, tmp_path):
    node = _host(sim, "node12b", "node")
    rack = sim.topology.parent(node)
    sibling = next((h for h in sim.topology.select("role:node") if h.id != node.id), None)
    if rack is None or sibling is None:
        pytest.skip("the topology needs a node below another host and a second node")
    evil = sim.context(node.id)
    victims: Sequence[mitogen.core.Context] = [
        sim.context(sibling.id), *(sim.context(sibling.id, a.name) for a in sibling.accounts
                                   if a.name != sibling.login)]
    contexts = sim.contexts()
    before = {name: ctx.call(probes.dropped_count) for name, ctx in contexts.items()}
    master_before = sim.router.get_stats()["dropped_message_count"]
    flag = _Flag("cannot arrive on this stream")
    ctx_logger = logging.getLogger(f"mitogen.ctx.{sim.context(rack.id).name}")
    ctx_logger.addHandler(flag)
    # A directory every host has, so that a forged call that ran would leave the file.
    path = (str(tmp_path / "forged") if sim.backend.name == "local"
            else f"/tmp/mitogen-sim-forged-{uuid.uuid4().hex}")
    forged = []
    try:
        sibling_id = sim.context(sibling.id).context_id
        for victim in victims:
            forged.append((victim.context_id, 0, 0))  # as the master
            if victim.context_id != sibling_id:
                forged.append((victim.context_id, sibling_id, sibling_id))  # as the sibling
        forged.append((sibling_id, sibling_id, sibling_id))  # as the sibling, to itself
        forged.append((sim.context(rack.id).context_id, 0, 0))  # as the master, to its parent
        for target, auth_id, src_id in forged:
            assert evil.call(funcs.forge_call, target, auth_id, src_id, path) is True
        # Every hop after the evil node forwards in order: an honest round trip from each
        # victim through the same parent proves the forged frames were handled before it.
        _answers({v.name: v for v in victims})
        assert flag.seen.wait(10.0)
    finally:
        ctx_logger.removeHandler(flag)
    after = {name: ctx.call(probes.dropped_count) for name, ctx in contexts.items()}
    grown = {name: after[name] - before[name] for name in contexts if after[name] != before[name]}
    assert grown == {rack.name: len(forged)}  # dropped at the first hop, and only there
    assert sim.router.get_stats()["dropped_message_count"] == master_before
    assert not os.path.exists(path)  # nothing ran anywhere
    if sim.backend.name != "local":
        for host in sim.topology.hosts:
            assert sim.backend.exec(host.id, ["test", "-e", path]).returncode == 1, host.id


# --------------------------------------------------------------------------------------------
# 4. Shutdown
# --------------------------------------------------------------------------------------------


def test_master_shutdown_leaves_no_process_within_bound(sim):
    if sim.backend.name in ("docker", "swarm"):
        _docker_shutdown(sim)
        return
    from simulator.local import LocalBackend

    backend = LocalBackend(keepalive=False)  # its own timeline: a second tree, not the session's
    try:
        backend.create(sim.topology)
        pids = backend.all_pids()
        gone_at: Dict[str, float] = {}
        for name, ctx in _all_contexts(backend, sim.topology).items():
            mitogen.core.listen(ctx, "disconnect", _stamp_name(gone_at, name))
        began = time.monotonic()
        sim.timeline.record("shutdown", step="begin", hosts=len(pids))
        backend.router.broker.shutdown()
        backend.router.broker.join()
        left = backend.wait_gone(list(pids), SHUTDOWN_BOUND)
        elapsed = time.monotonic() - began
        for name, seen in sorted(gone_at.items(), key=lambda item: item[1]):
            sim.timeline.record("shutdown", step="context_gone", host=name,
                                seconds=seen - began, time=seen)
        sim.timeline.record("shutdown", step="tree_gone_measured", seconds=elapsed)
        assert left == [], {pid: pids[pid] for pid in left}
        assert elapsed <= SHUTDOWN_BOUND
        assert not _processes_mentioning(backend._dir)  # no relay of this tree is left
    finally:
        backend.destroy()


def _docker_shutdown(sim) -> None:
    """A second master builds the whole tree over the session's containers and shuts down:
    every process it caused on any host ends within the bound, and no host's disk differs
    from the baseline the backend took after set-up (``docker diff``)."""
    import mitogen.master

    backend = sim.backend
    hosts = [h.id for h in sim.topology.hosts]
    before = {h: {p.pid for p in backend.processes(h)} for h in hosts}
    router = mitogen.master.Router()
    try:
        contexts = backend.connect_tree(router)
        for name, ctx in contexts.items():
            assert ctx.call(probes.identity, name) == name
        during = {h: {p.pid for p in backend.processes(h)} for h in hosts}
        assert all(during[h] - before[h] for h in hosts), "the second tree runs nowhere"
        gone_at: Dict[str, float] = {}
        for name, ctx in contexts.items():
            mitogen.core.listen(ctx, "disconnect", _stamp_name(gone_at, name))
        began = time.monotonic()
        sim.timeline.record("shutdown", step="begin", hosts=len(hosts))
    finally:
        router.broker.shutdown()
        router.broker.join()
    left: Dict[str, List[str]] = {}
    while time.monotonic() < began + SHUTDOWN_BOUND:
        now = {h: backend.processes(h) for h in hosts}
        left = {h: [p.command for p in procs if p.pid not in before[h]]
                for h, procs in now.items()}
        left = {h: commands for h, commands in left.items() if commands}
        if not left:
            break
    elapsed = time.monotonic() - began
    for name, seen in sorted(gone_at.items(), key=lambda item: item[1]):
        sim.timeline.record("shutdown", step="context_gone", host=name,
                            seconds=seen - began, time=seen)
    sim.timeline.record("shutdown", step="tree_gone_measured", seconds=elapsed)
    assert left == {}
    assert elapsed <= SHUTDOWN_BOUND
    changed = {h: sorted(backend.diff(h) - backend.baseline[h]) for h in hosts}
    assert {h: c for h, c in changed.items() if c} == {}


def _all_contexts(backend, topology) -> Dict[str, mitogen.core.Context]:
    found = {}
    for host in topology.hosts:
        found[host.name] = backend.context(host.id)
        for account in host.accounts:
            if account.name != host.login:
                found[f"sudo:{host.name}:{account.name}"] = backend.context(host.id,
                                                                            account.name)
    return found


def _stamp_name(table: Dict[str, float], name: str):
    def stamp() -> None:
        table.setdefault(name, time.monotonic())
    return stamp


def _processes_mentioning(text: str) -> List[int]:
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    if text.encode() in f.read():
                        found.append(int(name))
            except OSError:
                pass
    return found


# --------------------------------------------------------------------------------------------
# 5. Interpreters
# --------------------------------------------------------------------------------------------


def test_every_host_runs_its_own_python(sim):
    """Each host's context runs the interpreter its image gives it (mixed-python.yml mixes
    3.9, 3.11, 3.13 and 3.14 in one tree); on the local backend every host is the runner's."""
    seen = {}
    for host in sim.topology.hosts:
        version = sim.context(host.id).call(platform.python_version)
        seen[host.name] = ".".join(version.split(".")[:2])
    if sim.backend.name == "local":
        # Each host's own version where this machine has that interpreter, else the runner's.
        mine = "%d.%d" % sys.version_info[:2]
        expected = {}
        for host in sim.topology.hosts:
            used = sim.backend.interpreter(host.id)
            expected[host.name] = host.python[len("python"):] if used != sys.executable \
                else mine
    else:
        expected = {host.name: host.python[len("python"):] for host in sim.topology.hosts}
    assert seen == expected


# --------------------------------------------------------------------------------------------
# 6. The CI fault schedule
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_ci_fault_schedule_runs_and_every_host_heals(sim, sim_faults):
    try:
        steps = sim.plan("ci")
    except LookupError:
        pytest.skip(f"topology {sim.topology.name!r} has no 'ci' fault schedule")
    kinds = {step.fault.KIND for step in steps[:-1]}
    missing = kinds - sim.backend.capabilities()
    assert not missing, f"backend {sim.backend.name} cannot do {missing}"
    applied = run_plan(sim_faults, steps)
    assert applied == len(steps) - 1
    sim_faults.assert_healed()
    applies = [e for e in sim_faults.events if e.action == "apply"]
    heals = [e for e in sim_faults.events if e.action == "heal"]
    assert [e.fault for e in applies] == [s.fault for s in steps[:-1]]
    assert len(heals) == len(applies)
    _answers(sim.contexts())  # every host and account answers again


# --------------------------------------------------------------------------------------------
# 7. Services: a file pushed down the tree
# --------------------------------------------------------------------------------------------


def test_a_file_pushed_from_the_master_reaches_every_context(sim, tmp_path):
    """PushFileService, store-and-forward: the master pushes one file to every host and
    account; each context on the way keeps it (in memory: nothing is written on any host, as
    the shutdown test's ``docker diff`` checks) and forwards it, and every one of them ends
    up with the same bytes."""
    import hashlib

    import mitogen.service
    from tests.support import services

    path = tmp_path / "pushed.bin"
    content = os.urandom(2 * 1048576 + 4321)
    path.write_bytes(content)
    expected = [len(content), hashlib.sha256(content).hexdigest()]
    pool = mitogen.service.get_or_create_pool(router=sim.router)
    try:
        contexts = sim.contexts()
        master = sim.router.myself()
        for ctx in contexts.values():
            master.call_service(mitogen.service.PushFileService, "propagate_to", context=ctx,
                                path=str(path))
        pending = {name: ctx.call_async(services.pushed_digest, str(path))
                   for name, ctx in contexts.items()}
        got = {name: list(recv.get(timeout=CALL_TIMEOUT).unpickle())
               for name, recv in pending.items()}
        assert got == {name: expected for name in contexts}
    finally:
        pool.stop()
    if sim.backend.name == "docker":
        hosts = [h.id for h in sim.topology.hosts]
        changed = {h: sorted(sim.backend.diff(h) - sim.backend.baseline[h]) for h in hosts}
        assert {h: c for h, c in changed.items() if c} == {}
