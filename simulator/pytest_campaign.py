"""Fault campaigns in pytest: ``pytest --topology=FILE --topology-campaign=N --topology-seed=S``.

The plugin (:mod:`simulator.plugin`) declares the options and calls in here. With
``--topology-campaign=N`` the session runs N campaign runs (:mod:`simulator.campaign`), one
test item each (``campaign[<seed>-<run>]``), instead of the tests (no test file is read); they
distribute over xdist workers like any test, each building its own tree.
``--topology-campaign-replay=schedule.json`` runs one recorded run again (no ``--topology``
needed: the replay file names its tree). A run that breaks an invariant fails, and its report
is the finding: the seed, the shrunk schedule, the replay command, the history and picture.
"""

from __future__ import annotations

import os
from typing import Any, Callable, List, Optional

import pytest

from simulator.campaign import (
    CampaignError,
    CampaignSettings,
    Finding,
    load_replay,
    plan_run,
    run_and_report,
    settings_from,
    supported_kinds,
)
from simulator.topology import Topology

__all__ = ["CampaignPlugin", "CampaignRun", "header", "make_items", "settings_for"]

#: Shape of the random trees ``--topology-campaign-shape=random`` draws (the local backend's
#: interpreters are added at run time).
RANDOM_MAX_HOSTS = 12


class CampaignFailed(Exception):
    """A run broke invariants; ``finding`` says how and how to replay it."""

    def __init__(self, finding: Finding) -> None:
        super().__init__(finding.text())
        self.finding = finding


def settings_for(config: pytest.Config, topology: Optional[Topology]) -> CampaignSettings:
    """The campaign the command line asks for (seeds follow FORMAT.md's rule: the option,
    else the file's ``seed``, else 0)."""
    from simulator.local import interpreters
    from simulator.strategies import TreeShape

    seed = config.getoption("topology_seed", None)
    if seed is None:
        seed = (topology.seed if topology is not None else None) or 0
    shape = None
    if config.getoption("topology_campaign_shape") == "random":
        shape = TreeShape(pythons=interpreters(), max_hosts=RANDOM_MAX_HOSTS)
    elif topology is None:
        raise pytest.UsageError("--topology-campaign: give --topology=FILE, or "
                                "--topology-campaign-shape=random to draw the trees")
    base = config.getoption("topology_report", None) or os.path.join(
        str(config.rootpath), ".sim", "report")
    return CampaignSettings(seed=seed, runs=config.getoption("topology_campaign") or 1,
                            shape=shape, kinds=supported_kinds(),
                            shrink_runs=config.getoption("topology_campaign_shrink"),
                            out_dir=os.path.join(base, "campaign"))


class CampaignRun(pytest.Item):
    """One run of the campaign (or one replayed run)."""

    def __init__(self, *, settings: CampaignSettings, run: int,
                 topology: Optional[Topology] = None, replay: Optional[str] = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.settings = settings
        self.run = run
        self.topology = topology
        self.replay = replay

    def runtest(self) -> None:
        settings = self.settings
        if self.replay is not None:
            plan, options = load_replay(self.replay)
            settings = settings_from(options, seed=plan.seed, out_dir=settings.out_dir,
                                     shrink_runs=settings.shrink_runs)
            directory = os.path.join(os.path.dirname(os.path.abspath(self.replay)), "replay")
        else:
            plan = plan_run(settings, self.run, self.topology)
            directory = None
        lines: List[str] = []
        result, finding = run_and_report(plan, settings, progress=lines.append,
                                         directory=directory)
        self.user_properties.append(("campaign", result.summary()))
        self.add_report_section("call", "campaign", "\n".join(lines))
        if finding is not None:
            raise CampaignFailed(finding)

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException],
                     style: Optional[str] = None) -> Any:
        if isinstance(excinfo.value, (CampaignFailed, CampaignError)):
            return str(excinfo.value)
        return super().repr_failure(excinfo)

    def reportinfo(self) -> Any:
        return self.path, None, f"fault campaign {self.name}"


class CampaignPlugin:
    """Registered by :mod:`simulator.plugin` when a campaign is asked for: the campaign's
    items replace the collected tests, and the summary lists each run's verdict."""

    def __init__(self, topology_of: Callable[[pytest.Config], Optional[Topology]]) -> None:
        self._topology_of = topology_of

    def pytest_ignore_collect(self, collection_path: Any) -> Optional[bool]:
        """No test file is read: importing a suite only to drop it takes seconds. Directories
        are left to pytest's own rules (``--ignore``, ``norecursedirs``, virtualenvs)."""
        return True if collection_path.is_file() else None

    @pytest.hookimpl(tryfirst=True)
    def pytest_collection_modifyitems(self, session: pytest.Session, config: pytest.Config,
                                      items: List[pytest.Item]) -> None:
        """Before ``-k`` and ``-m`` select: the runs are the session's items."""
        if items:
            config.hook.pytest_deselected(items=list(items))
        items[:] = make_items(session, self._topology_of(config))

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        lines = _summary_lines(terminalreporter)
        if lines:
            terminalreporter.write_sep("-", "fault campaign")
            for line in lines:
                terminalreporter.write_line(line)


def _summary_lines(terminalreporter: Any) -> List[str]:
    """Each campaign run's one-line summary (it travels from xdist workers with its report)."""
    lines = []
    for reports in terminalreporter.stats.values():
        for report in reports:
            if getattr(report, "when", None) == "call":
                lines += [value for key, value in getattr(report, "user_properties", ())
                          if key == "campaign"]
    return sorted(lines)


def make_items(session: pytest.Session, topology: Optional[Topology]) -> List[pytest.Item]:
    """The session's campaign items."""
    config = session.config
    replay = config.getoption("topology_campaign_replay", None)
    settings = settings_for(config, topology) if replay is None else CampaignSettings(
        seed=0, shrink_runs=config.getoption("topology_campaign_shrink"),
        out_dir=os.path.join(str(config.rootpath), ".sim", "report", "campaign"))
    if replay is not None:
        runs = [("replay", 0)]
    else:
        runs = [(f"{settings.seed}-{run}", run) for run in range(1, settings.runs + 1)]
    items: List[pytest.Item] = []
    for name, run in runs:
        item = CampaignRun.from_parent(session, name=f"campaign[{name}]",
                                       nodeid=f"campaign[{name}]", settings=settings,
                                       run=run, topology=topology, replay=replay)
        if config.pluginmanager.hasplugin("timeout"):
            item.add_marker(pytest.mark.timeout(_time_limit(settings, topology)))
        items.append(item)
    return items


def _time_limit(settings: CampaignSettings, topology: Optional[Topology]) -> float:
    """Generous: building the tree on a loaded machine, the load, the waits for ops that hang,
    the final heal, for the run and each shrinking run."""
    hosts = len(topology.hosts) if topology is not None else RANDOM_MAX_HOSTS
    one = 60.0 + 3.0 * hosts + settings.horizon + settings.duration[1] + 4 * (
        settings.healthy + 30.0)
    return one * (1 + settings.shrink_runs)


def header(config: pytest.Config, topology: Optional[Topology]) -> List[str]:
    if config.getoption("topology_campaign_replay", None):
        return [f"topology campaign: replaying {config.getoption('topology_campaign_replay')}"]
    settings = settings_for(config, topology)
    shape = "random trees" if settings.shape is not None else f"the tree of {topology.name}" \
        if topology is not None else "?"
    return [f"topology campaign: {settings.runs} run(s) of seed {settings.seed} on {shape}, "
            f"faults {', '.join(settings.kinds)}; shrinking in up to {settings.shrink_runs} "
            f"runs; findings under {settings.out_dir} (no other test runs)"]
