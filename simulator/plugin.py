"""The pytest11 entry point: ``--topology=FILE`` and the fixtures that build a tree from it.

Imports only pytest and the standard library at module level, so that loading the plugin costs
nothing in test runs that do not ask for a topology; the simulator itself is imported when a
topology is given.

Fixtures (all skip, with the reason printed, when ``--topology`` is not given):

``sim_topology``  the parsed :class:`~simulator.topology.Topology` (session)
``sim``           a :class:`Simulation`: the topology built on the chosen backend, a context
                  per host and per account, the timeline, the seed (session; one per xdist
                  worker, since each worker is its own session)
``sim_faults``    a :class:`~simulator.faults.FaultInjector` on the backend, healed and
                  checked after each test; every host is up again afterwards (function)
``sim_testinfra`` ``sim_testinfra(host)`` -> a testinfra host for out-of-band checks (session)

The session's tree is built before the first test that asks for it and before that test's
function-scoped fixtures (pytest sets up wider scopes first), so the per-test leak check of
``tests/conftest.py`` snapshots the running tree and only flags what a test itself leaves.

At the end of the session a report is written to
``<--topology-report>/<topology>/<backend>/<run>/`` (default base ``.sim/report`` under the
root directory; ``<run>`` is the start time, plus the xdist worker), with a ``latest`` link
beside the runs: the JSONL timeline, a PNG of it, and a summary in JSON and Markdown. The
terminal summary says where. A failing test gets the timeline of its own run attached.

Seeds follow the one rule of ``simulator/FORMAT.md`` (:meth:`Schedule.seed_for`):
``--topology-seed``, else the schedule's ``seed``, else the topology's, exactly as
``python -m simulator check`` prints the plans.
"""

from __future__ import annotations

import os
import sys
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, Iterator, List, Optional

import pytest

if TYPE_CHECKING:
    import mitogen.core
    from simulator.backend import Backend
    from simulator.faults import FaultInjector, Step
    from simulator.state import RunRecord
    from simulator.timeline import Timeline
    from simulator.topology import Host, Topology

__all__ = ["Simulation"]

_TOPOLOGY_KEY = pytest.StashKey[Any]()
_SIM_KEY = pytest.StashKey[Any]()
_ITEM_START_KEY = pytest.StashKey[float]()
BACKENDS = ("local", "docker", "swarm")
NO_TOPOLOGY = "no --topology given: the simulator's end-to-end tests need a topology file"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("topology", "topology simulator")
    group.addoption("--topology", metavar="FILE", default=None,
                    help="build the host tree described by FILE (YAML) for the tests")
    group.addoption("--topology-backend", choices=BACKENDS, default="local",
                    help="where the hosts live (default: local)")
    group.addoption("--topology-keep", action="store_true", default=False,
                    help="leave the topology up after a failure, for debugging")
    group.addoption("--topology-seed", type=int, default=None,
                    help="seed of every fault schedule (default: each schedule's own seed, "
                         "else the file's)")
    group.addoption("--topology-report", metavar="DIR", default=None,
                    help="base directory of the run reports, written to "
                         "DIR/<topology>/<backend>/<run>/ (default: .sim/report under the "
                         "root directory)")
    group.addoption("--topology-campaign", metavar="N", type=int, default=None,
                    help="run a fault campaign instead of the tests: N runs of generated, "
                         "overlapping fault schedules over the tree under load, each checked "
                         "(seeded by --topology-seed; local backend)")
    group.addoption("--topology-campaign-shape", choices=("file", "random"), default="file",
                    help="the campaign's trees: the --topology file's (default), or a random "
                         "tree per run (depth 1-5, fan-out 1-8, mixed interpreters)")
    group.addoption("--topology-campaign-shrink", metavar="N", type=int, default=6,
                    help="at most N more runs to shrink a failing schedule (default 6)")
    group.addoption("--topology-campaign-replay", metavar="SCHEDULE", default=None,
                    help="run again the campaign run recorded in SCHEDULE (the schedule.json "
                         "of a finding)")


def pytest_configure(config: pytest.Config) -> None:
    # Every marker this plugin uses, so projects running with --strict-markers or
    # filterwarnings=error need not declare them.
    config.addinivalue_line(
        "markers", "topology: an end-to-end test on the --topology tree (skipped without it)")
    config.addinivalue_line(
        "markers", "docker: needs a running Docker engine (every test of the tree on "
                   "--topology-backend=docker)")
    path = config.getoption("topology", None)
    if _campaign_wanted(config):
        if config.getoption("topology_backend") != "local":
            raise pytest.UsageError("--topology-campaign: campaigns run on the local backend "
                                    "only (for now); drop --topology-backend")
        if not path and not config.getoption("topology_campaign_replay") and \
                config.getoption("topology_campaign_shape") == "file":
            raise pytest.UsageError("--topology-campaign: give --topology=FILE, or "
                                    "--topology-campaign-shape=random to draw the trees")
        from simulator.pytest_campaign import CampaignPlugin

        config.pluginmanager.register(CampaignPlugin(_topology_of), "simulator-campaign")
    if not path:
        return
    from simulator.preflight import refusals
    from simulator.topology import TopologyError, load_topology

    try:
        topology = load_topology(path)
    except (TopologyError, OSError) as exc:
        raise pytest.UsageError(f"--topology: {exc}") from None
    refused = refusals(topology, config.getoption("topology_backend"))
    if refused:  # the same words as `python -m simulator check` and `up`
        raise pytest.UsageError("--topology: " + "\n--topology: ".join(refused))
    config.stash[_TOPOLOGY_KEY] = topology


def pytest_collection_modifyitems(config: pytest.Config, items: List[pytest.Item]) -> None:
    """On the docker and swarm backends every test of the tree needs Docker: mark it so."""
    if _topology_of(config) is None or \
            config.getoption("topology_backend") not in ("docker", "swarm"):
        return
    for item in items:
        if "sim" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.docker)


def _topology_of(config: pytest.Config) -> Optional[Topology]:
    return config.stash.get(_TOPOLOGY_KEY, None)


def _seed_override(config: pytest.Config) -> Optional[int]:
    """``--topology-seed``, if given; the schedules' own seeds apply otherwise."""
    return config.getoption("topology_seed", None)


def _image_text(config: pytest.Config, topology: Topology) -> str:
    if config.getoption("topology_backend") == "local":
        return (f"none (local backend: every host runs {sys.executable}, "
                f"python {sys.version.split()[0]})")
    from simulator.images import image_tag

    suites = sorted({host.suite for host in topology.hosts})
    return ", ".join(image_tag(suite) for suite in suites)


def pytest_report_header(config: pytest.Config) -> List[str]:
    from simulator.faults import describe_seeds

    topology = _topology_of(config)
    if _campaign_wanted(config):
        from simulator.pytest_campaign import header

        return header(config, topology)
    if topology is None:
        return []
    accounts = sum(len(h.accounts) - 1 for h in topology.hosts)
    return [
        f"topology: {topology.name} ({topology.source}): {len(topology.hosts)} hosts, "
        f"{accounts} extra accounts, schedules: "
        f"{', '.join(s.name for s in topology.schedules) or 'none'}",
        f"topology backend: {config.getoption('topology_backend')}, "
        f"seed: {describe_seeds(topology, _seed_override(config))}",
        f"topology images: {_image_text(config, topology)}",
    ]


# --------------------------------------------------------------------------------------------
# The simulation a session gets
# --------------------------------------------------------------------------------------------


class Simulation:
    """A built topology: the model, the backend it runs on, its contexts and its timeline."""

    def __init__(self, topology: Topology, backend: Backend, timeline: Timeline,
                 seed: Optional[int], report_dir: str) -> None:
        self.topology = topology
        self.backend = backend
        self.timeline = timeline
        #: ``--topology-seed`` (None: each schedule's own seed, see :meth:`plan`)
        self.seed = seed
        self.report_dir = report_dir
        self.report_paths: List[str] = []
        self.record: Optional[RunRecord] = None
        self.started = time.time()
        self.measures: Dict[str, Any] = {}

    @property
    def router(self) -> Any:
        """The master's router (the test runner is the master)."""
        return self.backend.router  # type: ignore[attr-defined]

    def context(self, host: str, account: Optional[str] = None) -> mitogen.core.Context:
        """The current context of a host (id or unique name) or of one of its accounts.

        Ask again after a fault that ended contexts: healing starts new ones.
        """
        return self.backend.context(host, account)  # type: ignore[attr-defined]

    def contexts(self, hosts: Optional[Iterable[Host]] = None
                 ) -> Dict[str, mitogen.core.Context]:
        """Every current context of `hosts` (default: all) by its name: each host, then its
        accounts as ``sudo:HOST:ACCOUNT``."""
        found = {}
        for host in self.topology.hosts if hosts is None else hosts:
            found[host.name] = self.context(host.id)
            for account in host.accounts:
                if account.name != host.login:
                    ctx = self.context(host.id, account.name)
                    found[ctx.name] = ctx
        return found

    def host_of(self, context_id: int) -> str:
        """The name of the host or account whose current context has this id."""
        for name, ctx in self.contexts().items():
            if ctx.context_id == context_id:
                return name
        return "master" if context_id == 0 else str(context_id)

    def plan(self, schedule: str) -> List[Step]:
        """The steps of a named schedule, seeded as ``python -m simulator check`` shows."""
        from simulator.faults import plan

        return plan(self.topology.schedule(schedule), self.topology, self.seed)

    def injector(self) -> FaultInjector:
        """A fault injector whose every step goes to the timeline and to the state record
        (``python -m simulator status`` lists the faults applied)."""
        from simulator.faults import FaultInjector

        def record(event: Any) -> None:
            self.timeline.record("fault", time=event.time, **{
                k: v for k, v in event.to_dict().items() if k != "time"})
            if self.record is not None:
                self.record.set_faults(injector.active)

        injector = FaultInjector(self.backend, on_event=record)  # `record` reads it
        return injector

    def measure(self, name: str, value: Any) -> None:
        """Keep a number for the report (``call_latency``, ``del_route``...)."""
        self.measures.setdefault(name, []).append(value)


def _make_backend(kind: str, timeline: Timeline, topology: Topology) -> Backend:
    if kind == "local":
        from simulator.local import LocalBackend

        return LocalBackend(timeline)
    suites = sorted({host.suite for host in topology.hosts})
    try:
        from simulator.dockerbackend import DockerBackend, docker_unavailable
        from simulator.swarmbackend import SwarmBackend, swarm_unavailable
    except ImportError as exc:
        raise pytest.UsageError(f"--topology-backend={kind}: not available here ({exc})")
    # Nothing is installed, started or built inside a test's timeout: a missing engine or
    # image skips, saying what to run (.ci/run prepares both, and there a skip fails).
    reason = docker_unavailable(suites) if kind == "docker" else swarm_unavailable(suites)
    if reason:
        pytest.skip(f"--topology-backend={kind}: {reason}")
    if kind == "swarm":
        # The manager's engine: MITOGEN_SIM_SWARM (e.g. a lab's socket), else this machine's.
        return SwarmBackend(timeline, engine=os.environ.get("MITOGEN_SIM_SWARM") or None)
    return DockerBackend(timeline)


def _report_dir(config: pytest.Config, topology: Topology) -> str:
    """``<base>/<topology>/<backend>/<run>``: runs never share a directory, whatever their
    backend, and a run's name sorts by its start time."""
    base = config.getoption("topology_report", None) or os.path.join(
        str(config.rootpath), ".sim", "report")
    run = time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}"
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker is not None:
        run += f"-{worker}"
    return os.path.join(base, topology.name, config.getoption("topology_backend"), run)


def _link_latest(report_dir: str) -> None:
    """Point ``latest`` beside the runs at this one (replaced atomically)."""
    parent, run = os.path.split(report_dir)
    temporary = os.path.join(parent, f".latest-{os.getpid()}")
    try:
        if os.path.lexists(temporary):
            os.unlink(temporary)
        os.symlink(run, temporary)
        os.replace(temporary, os.path.join(parent, "latest"))
    except OSError as exc:  # e.g. a filesystem without symlinks: the run is still there
        sys.stderr.write(f"\nsimulator: could not link {parent}/latest: {exc}\n")


@pytest.fixture(scope="session")
def sim_topology(pytestconfig: pytest.Config) -> Topology:
    topology = _topology_of(pytestconfig)
    if topology is None:
        pytest.skip(NO_TOPOLOGY)
    return topology


@pytest.fixture(scope="session")
def sim(pytestconfig: pytest.Config, sim_topology: Topology) -> Iterator[Simulation]:
    from simulator.timeline import Timeline

    report_dir = _report_dir(pytestconfig, sim_topology)
    timeline = Timeline(os.path.join(report_dir, "timeline.jsonl"))
    backend = _make_backend(pytestconfig.getoption("topology_backend"), timeline,
                            sim_topology)
    simulation = Simulation(sim_topology, backend, timeline, _seed_override(pytestconfig),
                            report_dir)
    pytestconfig.stash[_SIM_KEY] = simulation
    record = None
    try:
        backend.create(sim_topology)
        simulation.measures["setup_seconds"] = getattr(backend, "build_seconds", None)
        record = simulation.record = _record(simulation, str(pytestconfig.getoption("topology")))
        yield simulation
    finally:
        keep = getattr(backend, "keep", None)
        kept = False
        if pytestconfig.stash.get(_FAILED_KEY, False) and \
                pytestconfig.getoption("topology_keep"):
            if keep is not None:
                resources = backend.resources()  # before keep() lets go of them
                sys.stderr.write(f"\n--topology-keep: {sim_topology.name} left up: {keep()}\n")
                if record is not None:  # for `python -m simulator down`
                    record.kept, record.resources = True, resources
                    record.save()
                    kept = True
            else:
                sys.stderr.write(f"\n--topology-keep: {sim_topology.name} left up (on the "
                                 f"local backend it still ends with this process)\n")
        else:
            backend.destroy()
        if record is not None and not kept:
            record.remove()
        timeline.close()
        _write_report(simulation)


def _record(simulation: Simulation, path: str) -> RunRecord:
    """The state record of this session's tree, for ``python -m simulator status``."""
    from simulator.faults import describe_seeds
    from simulator.state import RunRecord, describe_hosts

    record = RunRecord(topology=simulation.topology.name, file=os.path.abspath(path),
                       backend=simulation.backend.name, command="pytest",
                       seeds=describe_seeds(simulation.topology, simulation.seed),
                       hosts=describe_hosts(simulation.backend),
                       resources=simulation.backend.resources())
    record.save()
    return record


_FAILED_KEY = pytest.StashKey[bool]()


def _write_report(simulation: Simulation) -> None:
    from simulator.faults import describe_seeds
    from simulator.report import RunInfo, write_report

    info = RunInfo(backend=simulation.backend.name,
                   seeds=describe_seeds(simulation.topology, simulation.seed),
                   started=simulation.started)
    try:
        simulation.report_paths = write_report(
            simulation.timeline.events(), simulation.report_dir, simulation.topology,
            simulation.measures, info)
    except Exception as exc:  # a broken report must not hide the tests' outcome
        sys.stderr.write(f"\nsimulator: could not write the report: {exc!r}\n")
    _link_latest(simulation.report_dir)


@pytest.fixture
def sim_faults(sim: Simulation) -> Iterator[FaultInjector]:
    """Faults for one test; all healed afterwards, and every host answers again."""
    injector = sim.injector()
    try:
        yield injector
    finally:
        injector.heal_all()
        injector.assert_healed()
        sim.backend.heal_all()


@pytest.fixture(scope="session")
def sim_testinfra(sim: Simulation) -> Callable[[str], Any]:
    """``sim_testinfra(host)``: a testinfra host that reaches ``host`` out of band."""
    import testinfra

    def get(host: str) -> Any:
        sim.topology.host(host)  # a clear error for a host that is not in the topology
        if sim.backend.name == "local":
            return testinfra.get_host("local://")
        placement = sim.backend.placement(host)
        return testinfra.get_host(f"docker://{placement.where}")

    return get


# --------------------------------------------------------------------------------------------
# Timeline per test, attached to failures
# --------------------------------------------------------------------------------------------


def pytest_runtest_setup(item: pytest.Item) -> None:
    item.stash[_ITEM_START_KEY] = time.monotonic()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Any:
    report = yield
    simulation = item.config.stash.get(_SIM_KEY, None)
    if simulation is None or "sim" not in getattr(item, "fixturenames", ()):
        return report
    if report.when == "call":
        simulation.timeline.record("test", nodeid=item.nodeid, outcome=report.outcome)
    if report.failed:
        item.config.stash[_FAILED_KEY] = True
        since = item.stash.get(_ITEM_START_KEY, None)
        report.sections.append((f"simulator timeline ({report.when})",
                                simulation.timeline.format(since=since)))
        tails = getattr(simulation.backend, "log_tails", None)
        if tails is not None:
            text = "\n".join(f"--- {host}\n{tail}" for host, tail in tails().items())
            report.sections.append((f"container logs ({report.when})", text))
    return report


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    simulation = config.stash.get(_SIM_KEY, None)
    if simulation is None:
        return
    terminalreporter.write_sep("-", "simulator report")
    terminalreporter.write_line(f"report:   {simulation.report_dir}")
    for path in simulation.report_paths:
        terminalreporter.write_line(f"  {os.path.basename(path):14} {path}")
    latest = os.path.join(os.path.dirname(simulation.report_dir), "latest")
    terminalreporter.write_line(f"latest:   {latest}")


def _campaign_wanted(config: pytest.Config) -> bool:
    return bool(config.getoption("topology_campaign", None)
                or config.getoption("topology_campaign_replay", None))
