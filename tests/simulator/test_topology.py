"""The topology file model: loading, inheritance, ranges, selectors, errors, context plans."""

from __future__ import annotations

import copy
import json
import pathlib
import re
import textwrap

import pytest
import yaml

import simulator.topology as topology_module
from simulator import units
from simulator.topology import (
    HostNotFound,
    SelectorError,
    TopologyError,
    load_topology,
    parse_topology,
)

REPO = pathlib.Path(__file__).resolve().parents[2]
TOPOLOGY_FILES = sorted((REPO / "topologies").glob("*.yml"))
SCHEMA_PATH = REPO / "simulator" / "schema.json"


def doc(tree: dict, **top) -> dict:
    """A minimal valid document around ``tree``."""
    return {"version": 1, "tree": tree, **top}


def parse(data: dict, source: str = "t.yml"):
    return parse_topology(data, source)


def write(tmp_path: pathlib.Path, text: str, name: str = "dc.yml") -> pathlib.Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


# --------------------------------------------------------------------------------------------
# The shipped files
# --------------------------------------------------------------------------------------------


def test_there_are_example_topologies():
    names = {path.name for path in TOPOLOGY_FILES}
    assert {"dc.yml", "large.yml", "mixed-python.yml"} <= names


@pytest.mark.parametrize("path", TOPOLOGY_FILES, ids=lambda p: p.name)
def test_every_shipped_file_loads_and_walks_parents_first(path):
    topology = load_topology(path)
    order = [host.id for host in topology.walk()]
    assert len(order) == len(set(order)) > 0
    for index, host in enumerate(topology.walk()):
        if host.parent is not None:
            assert order.index(host.parent) < index
            assert host.id == f"{host.parent}/{host.name}"
            assert host.id in topology.host(host.parent).children
        assert host.python in host.image.python


def test_dc_reproduces_the_seed_tree():
    topology = load_topology(REPO / "topologies" / "dc.yml")
    assert [host.id for host in topology.walk()] == [
        "bastion",
        "bastion/dc1",
        "bastion/dc1/rack12",
        "bastion/dc1/rack12/node12b",
        "bastion/dc2",
        "bastion/dc2/rack22",
        "bastion/dc2/rack22/node22a",
    ]
    for name in ("node12b", "node22a"):
        webapp = topology.host(name).account("webapp")
        assert webapp.sudo in ("password", "nopasswd")
    assert {topology.host(n).account("webapp").sudo for n in ("node12b", "node22a")} == {
        "password", "nopasswd"}
    ci = topology.schedule("ci")
    assert ci.seed is not None
    assert topology.host("bastion").link.latency == pytest.approx(0.020)
    assert topology.host("bastion").link.loss == pytest.approx(0.001)
    assert topology.host("dc1").link.rate == 100_000_000


def test_large_has_at_least_fifty_hosts_from_ranges():
    topology = load_topology(REPO / "topologies" / "large.yml")
    assert len(topology.hosts) >= 50
    nodes = topology.select("role:node")
    assert len(nodes) == 48
    assert {host.name for host in nodes} == {"node01", "node02", "node03", "node04"}
    assert len(topology.select("role:datacenter")) == 3


def test_mixed_python_covers_the_four_suites():
    topology = load_topology(REPO / "topologies" / "mixed-python.yml")
    seen = {(host.suite, host.python) for host in topology.walk()}
    assert {("bullseye", "python3.9"), ("bookworm", "python3.11"),
            ("trixie", "python3.13"), ("sid", "python3.14")} <= seen
    assert topology.host("unstable").untrusted is True
    assert topology.host("stable").untrusted is False


# --------------------------------------------------------------------------------------------
# Inheritance
# --------------------------------------------------------------------------------------------


def layered_doc(leaf: dict) -> dict:
    """A chain top defaults < profile < grandparent defaults < parent defaults < leaf keys."""
    return doc(
        {"gp": {
            "defaults": {"role": "from-gp-defaults", "image": "trixie"},
            "children": {"p": {
                "defaults": {"role": "from-parent-defaults"},
                "children": {"leaf": leaf},
            }},
        }},
        defaults={"role": "from-top-defaults", "untrusted": True,
                  "link": {"latency": "5ms", "loss": "1%"}},
        profiles={"prof": {"role": "from-profile", "image": "sid",
                           "link": {"jitter": "1ms"}}},
    )


def test_nearest_ancestor_defaults_win_over_farther_ones_and_profiles():
    topology = parse(layered_doc({"profiles": ["prof"]}))
    leaf = topology.host("gp/p/leaf")
    assert leaf.role == "from-parent-defaults"   # nearest ancestor defaults
    assert leaf.image.suite == "trixie"           # grandparent defaults beat the profile
    assert leaf.untrusted is True                 # top-level defaults fill the rest


def test_host_keys_win_over_everything():
    topology = parse(layered_doc({"profiles": ["prof"], "role": "own", "image": "bullseye"}))
    leaf = topology.host("gp/p/leaf")
    assert (leaf.role, leaf.image.suite, leaf.python) == ("own", "bullseye", "python3.9")


def test_profiles_beat_top_level_defaults():
    topology = parse(doc({"solo": {"profiles": ["prof"]}, "plain": None},
                         defaults={"role": "top"}, profiles={"prof": {"role": "prof"}}))
    assert topology.host("solo").role == "prof"
    assert topology.host("plain").role == "top"


def test_later_profiles_beat_earlier_ones():
    data = doc({"h": {"profiles": ["a", "b"]}},
               profiles={"a": {"role": "a", "untrusted": True}, "b": {"role": "b"}})
    host = parse(data).host("h")
    assert (host.role, host.untrusted) == ("b", True)


def test_builtin_defaults_apply_when_nothing_is_set():
    host = parse(doc({"h": None})).host("h")
    assert (host.role, host.image.suite, host.python, host.login) == (
        "host", "bookworm", "python3.11", "sim")
    assert [a.name for a in host.accounts] == ["sim"]
    assert host.link == topology_module.Link()


def test_maps_deep_merge_across_layers():
    leaf = parse(layered_doc({"profiles": ["prof"], "link": {"rate": "1mbit"}})).host("gp/p/leaf")
    assert leaf.link.latency == pytest.approx(0.005)   # top defaults
    assert leaf.link.loss == pytest.approx(0.01)       # top defaults
    assert leaf.link.jitter == pytest.approx(0.001)    # profile
    assert leaf.link.rate == 1_000_000                 # own


def test_a_hosts_own_defaults_apply_below_it_not_to_it():
    data = doc({"top": {"defaults": {"role": "below"}, "children": {"kid": None}}})
    topology = parse(data)
    assert topology.host("top").role == "host"
    assert topology.host("kid").role == "below"


def test_lists_replace_unless_appended_with_plus():
    ops = {"name": "ops", "keys": ["runner"]}
    data = doc(
        {"replaced": {"accounts": [ops], "login": "ops"},
         "appended": {"accounts+": [{"name": "app", "sudo": "nopasswd"}]},
         "parent": {"defaults": {"accounts+": [{"name": "one", "sudo": "nopasswd"}]},
                    "children": {"kid": {"accounts+": [{"name": "two", "sudo": "nopasswd"}]}}}},
    )
    topology = parse(data)
    assert [a.name for a in topology.host("replaced").accounts] == ["ops"]
    assert [a.name for a in topology.host("appended").accounts] == ["sim", "app"]
    assert [a.name for a in topology.host("kid").accounts] == ["sim", "one", "two"]


def test_replace_and_append_in_one_mapping_is_an_error():
    data = doc({"h": {"accounts": [{"name": "sim", "keys": ["runner"]}],
                      "accounts+": [{"name": "x", "sudo": "nopasswd"}]}})
    with pytest.raises(TopologyError, match=r"tree\.h\.accounts\+: use either"):
        parse(data)


def test_python_defaults_to_the_images_first_interpreter():
    data = doc({"h": {"image": "custom"}},
               images={"custom": {"suite": "bookworm", "python": ["python3.12", "python3.11"]}})
    assert parse(data).host("h").python == "python3.12"


# --------------------------------------------------------------------------------------------
# Ranges
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("key", "names"), [
    ("node[1..4]", ["node1", "node2", "node3", "node4"]),
    ("n[01..03]", ["n01", "n02", "n03"]),
    ("rack[8..10]", ["rack8", "rack9", "rack10"]),
    ("r[9..11]x", ["r9x", "r10x", "r11x"]),
    ("solo", ["solo"]),
])
def test_ranges_expand(key, names):
    topology = parse(doc({key: None}))
    assert [host.name for host in topology.walk()] == names


def test_a_range_gives_each_host_its_own_subtree():
    topology = parse(doc({"dc[1..2]": {"children": {"rack[1..3]": None}}}))
    assert len(topology.hosts) == 8
    assert topology.host("dc2/rack3").parent == "dc2"
    assert topology.host("dc1").children == ("dc1/rack1", "dc1/rack2", "dc1/rack3")


@pytest.mark.parametrize(("key", "problem"), [
    ("node[4..1]", "bad range"),
    ("node[1..2000]", "at most 1000"),
    ("node[1..2][1..2]", "bad host name"),
    ("no de", "bad host name"),
    ("node[a..b]", "bad host name"),
])
def test_bad_ranges_are_rejected(key, problem):
    with pytest.raises(TopologyError, match=re.escape(problem)) as info:
        parse(doc({key: None}))
    assert info.value.path == f"tree.{key}"


def test_names_colliding_after_expansion_are_rejected():
    with pytest.raises(TopologyError, match="'node2' is declared twice"):
        parse(doc({"node[1..3]": None, "node2": None}))


# --------------------------------------------------------------------------------------------
# Lookup and selectors
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dc():
    return load_topology(REPO / "topologies" / "dc.yml")


def ids(hosts):
    return [host.id for host in hosts]


@pytest.mark.parametrize(("selector", "expected"), [
    ("role:node", ["bastion/dc1/rack12/node12b", "bastion/dc2/rack22/node22a"]),
    ("role:rack*", ["bastion/dc1/rack12", "bastion/dc2/rack22"]),
    ("host:node12b", ["bastion/dc1/rack12/node12b"]),
    ("node*", ["bastion/dc1/rack12/node12b", "bastion/dc2/rack22/node22a"]),
    ("host:bastion/dc1/*", ["bastion/dc1/rack12"]),
    ("host:bastion/*", ["bastion/dc1", "bastion/dc2"]),
    ("host:**/rack*", ["bastion/dc1/rack12", "bastion/dc2/rack22"]),
    ("subtree:bastion/dc2", ["bastion/dc2", "bastion/dc2/rack22",
                             "bastion/dc2/rack22/node22a"]),
    ("subtree:rack12", ["bastion/dc1/rack12", "bastion/dc1/rack12/node12b"]),
    ("edge:bastion/*", ["bastion/dc1", "bastion/dc2"]),
    ("edge:bastion", ["bastion"]),
    ("role:nothing", []),
    ("host:dc1/rack12", []),  # a pattern with '/' is a full id, from the root
])
def test_selectors(dc, selector, expected):
    assert ids(dc.select(selector)) == expected


@pytest.mark.parametrize("selector", ["colour:red", "", "role:a/b", "host:a b", 5])
def test_bad_selectors_are_rejected(dc, selector):
    with pytest.raises(SelectorError):
        dc.select(selector)


def test_host_lookup_by_id_and_name(dc):
    assert dc.host("bastion/dc2").name == "dc2"
    assert dc.host("node22a").id == "bastion/dc2/rack22/node22a"
    with pytest.raises(HostNotFound, match="no host 'nowhere'"):
        dc.host("nowhere")


def test_ambiguous_names_ask_for_an_id():
    topology = parse(doc({"a": {"children": {"x": None}}, "b": {"children": {"x": None}}}))
    with pytest.raises(HostNotFound, match=r"ambiguous.*a/x, b/x"):
        topology.host("x")


def test_tree_navigation(dc):
    node = dc.host("node12b")
    assert ids(dc.ancestors(node)) == ["bastion", "bastion/dc1", "bastion/dc1/rack12"]
    assert dc.parent(dc.host("bastion")) is None
    assert ids(dc.roots()) == ["bastion"]
    assert ids(dc.children(dc.host("bastion"))) == ["bastion/dc1", "bastion/dc2"]


def test_accounts_lists_every_host_account_pair(dc):
    pairs = [(host.name, account.name) for host, account in dc.accounts()]
    assert len(pairs) == 7 + 2  # every host's login account, plus the two webapps
    assert ("node12b", "webapp") in pairs and ("node22a", "webapp") in pairs


# --------------------------------------------------------------------------------------------
# Context plans
# --------------------------------------------------------------------------------------------


def test_context_plan_follows_the_tree_then_sudo(dc):
    plan = dc.context_plan()
    assert set(plan) == {(h.id, None) for h in dc.walk()} | {
        (h.id, a.name) for h, a in dc.accounts()}
    hops = plan[("bastion/dc1/rack12/node12b", "webapp")]
    assert [hop.method for hop in hops] == ["ssh", "ssh", "ssh", "ssh", "sudo"]
    assert [hop.kwargs.get("hostname") for hop in hops[:4]] == [
        "bastion", "dc1", "rack12", "node12b"]
    assert hops[-1].kwargs["username"] == "webapp"
    assert hops[-1].label == "sudo:bastion/dc1/rack12/node12b:webapp"
    # sudo 'password' asks for the login user's own password.
    login_password = dc.host("node12b").login_account.password
    assert login_password is not None
    assert hops[-1].kwargs["password"] == login_password
    # nopasswd sudo carries no password.
    assert "password" not in plan[("bastion/dc2/rack22/node22a", "webapp")][-1].kwargs
    # Each host's chain extends its parent's; the login account is the host context itself.
    assert plan[("bastion/dc1", None)] == plan[("bastion", None)] + plan[("bastion/dc1", None)][1:]
    assert plan[("bastion/dc1", "sim")] == plan[("bastion/dc1", None)]
    assert all(hop.kwargs["python_path"] == "python3.11" for hop in hops)


def test_context_plan_for_targetpw_and_ssh_only_accounts():
    data = doc({"gw": {"children": {"h": {"accounts+": [
        {"name": "target", "sudo": "targetpw", "password": "t-pw"},
        {"name": "keyed", "keys": ["runner"]},
        {"name": "pwonly", "password": "p-pw"},
    ]}}}})
    plan = parse(data).context_plan()
    target = plan[("gw/h", "target")]
    assert [hop.method for hop in target] == ["ssh", "ssh", "sudo"]
    assert target[-1].kwargs["password"] == "t-pw"
    keyed = plan[("gw/h", "keyed")]
    assert [hop.method for hop in keyed] == ["ssh", "ssh"]
    assert keyed[0] == plan[("gw", None)][0]
    assert keyed[-1].kwargs["username"] == "keyed" and "password" not in keyed[-1].kwargs
    assert plan[("gw/h", "pwonly")][-1].kwargs["password"] == "p-pw"


def test_network_settings_reach_the_ssh_hops():
    data = doc({"h": None}, network={"keepalive_interval": "500ms", "keepalive_count": 5,
                                     "connect_timeout": "7s"})
    hop = parse(data).context_plan()[("h", None)][0]
    assert (hop.kwargs["keepalive_interval"], hop.kwargs["keepalive_count"],
            hop.kwargs["connect_timeout"]) == (0.5, 5, 7.0)


# --------------------------------------------------------------------------------------------
# Secrets
# --------------------------------------------------------------------------------------------


def test_passwords_are_masked_in_every_repr():
    data = doc({"h": {"accounts": [
        {"name": "sim", "keys": ["runner"], "password": "s3cr3t-login"},
        {"name": "app", "sudo": "password"},
        {"name": "tp", "sudo": "targetpw", "password": "s3cr3t-target"},
    ]}})
    topology = parse(data)
    host = topology.host("h")
    assert host.account("tp").password == "s3cr3t-target"  # still there to use
    shown = repr(host) + repr(topology.context_plan()) + repr(topology.accounts())
    assert "s3cr3t" not in shown
    assert "'***'" in repr(host.account("tp"))
    assert "password=None" in repr(host.account("app"))


# --------------------------------------------------------------------------------------------
# Errors name the file, the place and what was expected
# --------------------------------------------------------------------------------------------


SEED_TREE = """\
version: 1
tree:
  bastion:
    children:
      dc[1..2]:
        link:
          latency: 5ms
          latncy: 3ms
"""


def test_unknown_key_names_file_line_path_and_expected(tmp_path):
    path = write(tmp_path, SEED_TREE)
    with pytest.raises(TopologyError) as info:
        load_topology(path)
    message = str(info.value)
    assert message.startswith(f"{path}:8: tree.bastion.children.dc[1..2].link.latncy: ")
    assert "unknown key 'latncy'; expected one of: jitter, latency, loss, rate" in message
    assert info.value.line == 8
    assert info.value.path == "tree.bastion.children.dc[1..2].link.latncy"


@pytest.mark.parametrize(("where", "value", "expected"), [
    ("latency", "20 parsecs", "expected a duration with a unit"),
    ("latency", 20, "expected a duration with a unit"),
    ("latency", "-5ms", "expected a duration with a unit"),
    ("jitter", True, "expected a duration with a unit"),
    ("loss", 5, "expected a percentage like '0.1%'"),
    ("loss", "150%", "between 0% and 100%"),
    ("loss", "five%", "expected a percentage"),
    ("rate", "100mbps", "expected a rate like '512kbit'"),
    ("rate", "0bit", "at least 1bit"),
])
def test_bad_quantities_are_explained(tmp_path, where, value, expected):
    text = SEED_TREE.replace("latency: 5ms", "# the key under test is on line 8")
    text = text.replace("latncy: 3ms", f"{where}: {json.dumps(value)}")
    path = write(tmp_path, text)
    with pytest.raises(TopologyError, match=re.escape(expected)) as info:
        load_topology(path)
    assert info.value.path == f"tree.bastion.children.dc[1..2].link.{where}"
    assert str(info.value).startswith(f"{path}:8: ")


@pytest.mark.parametrize(("mutate", "path", "expected"), [
    (lambda d: d.update(colour="red"), "colour", "unknown key 'colour'"),
    (lambda d: d.pop("version"), "", "missing required key 'version'"),
    (lambda d: d.update(version=2), "version", "expected one of 1, got 2"),
    (lambda d: d.update(tree={}), "tree", "expected at least one host"),
    (lambda d: d["tree"]["h"].update(role=5), "tree.h.role", "expected a name"),
    (lambda d: d["tree"]["h"].update(untrusted="yes"), "tree.h.untrusted", "true or false"),
    (lambda d: d["tree"]["h"].update(image="gentoo"), "tree.h.image", "unknown image 'gentoo'"),
    (lambda d: d["tree"]["h"].update(python="python3.9"), "tree.h.python",
     "offers python3.11, not 'python3.9'"),
    (lambda d: d["tree"]["h"].update(profiles=["nope"]), "tree.h.profiles[0]",
     "unknown profile 'nope'"),
    (lambda d: d["tree"]["h"].update(login="root"), "tree.h",
     "login account 'root' is not among its accounts"),
    (lambda d: d["tree"]["h"].update({"accounts+": [{"sudo": "none"}]}),
     "tree.h.accounts+[0]", "missing required key 'name'"),
    (lambda d: d["tree"]["h"].update({"accounts+": [{"name": "x", "sudo": "always"}]}),
     "tree.h.accounts+[0].sudo", "expected one of nopasswd, password"),
    (lambda d: d["tree"]["h"].update({"accounts+": [{"name": "x", "sudo": "targetpw"}]}),
     "tree.h.accounts+[0].sudo", "give the account a `password`"),
    (lambda d: d["tree"]["h"].update({"accounts+": [{"name": "x", "sudo": "password"}]}),
     "tree.h.accounts+[0]", "login account 'sim' has no `password`"),
    (lambda d: d["tree"]["h"].update({"accounts+": [{"name": "x"}]}),
     "tree.h.accounts+[0]", "nothing can reach it"),
    (lambda d: d["tree"]["h"].update({"accounts+": [{"name": "x", "keys": ["lost"]}]}),
     "tree.h.accounts+[0]", "unknown key 'lost'"),
    (lambda d: d["tree"]["h"].update({"accounts+": [{"name": "sim", "sudo": "nopasswd"}]}),
     "tree.h.accounts+[0]", "account 'sim' is declared twice"),
    (lambda d: d["tree"]["h"].update(accounts=[{"name": "sim", "sudo": "nopasswd"}]),
     "tree.h.accounts[0]", "its `sudo` must be 'none'"),
    (lambda d: d["tree"]["h"].update(resources={"memory": "lots"}), "tree.h.resources.memory",
     "expected a size"),
    (lambda d: d.update(network={"supernet": "10.0.0.1/8"}), "network.supernet",
     "expected a network in CIDR form"),
    (lambda d: d.update(images={"x": {"suite": "hurd"}}), "images.x.suite",
     "list its interpreters"),
    (lambda d: d.update(defaults={"children": {}}), "defaults.children", "unknown key"),
    (lambda d: d.update(faults={"f": {"interval": "1s", "duration": "2s", "pick": ["kill"]}}),
     "faults.f", "exceeds interval"),
    (lambda d: d.update(faults={"f": {"interval": "1s", "duration": "1s", "pick": ["melt"]}}),
     "faults.f.pick[0]", "expected one of kill"),
    (lambda d: d.update(faults={"f": {"interval": "1s", "duration": "1s", "pick": ["kill"],
                                      "targets": {"kill": ["role:ghost"]}}}),
     "faults.f.targets.kill[0]", "matches no host"),
    (lambda d: d.update(faults={"f": {"interval": "1s", "duration": "1s", "pick": ["latency"],
                                      "params": {"latency": {"delay": 3}}}}),
     "faults.f.params.latency.delay", "expected a duration"),
    (lambda d: d.update(faults={"f": {"interval": "1s", "duration": "1s", "pick": ["kill"],
                                      "targets": {"kill": ["edge:h"]}}}),
     "faults.f", "selects edges"),
])
def test_invalid_documents_are_explained(mutate, path, expected):
    data = doc({"h": {"role": "node"}})
    mutate(data)
    with pytest.raises(TopologyError, match=re.escape(expected)) as info:
        parse(data, source="bad.yml")
    assert info.value.path == path
    assert str(info.value).startswith("bad.yml: ")


def test_duplicate_yaml_keys_are_errors_with_lines(tmp_path):
    path = write(tmp_path, """\
        version: 1
        tree:
          h:
            role: a
            role: b
        """)
    with pytest.raises(TopologyError, match=r"duplicate key 'role' \(first on line 4\)") as info:
        load_topology(path)
    assert info.value.line == 5


def test_broken_yaml_is_reported_with_its_line(tmp_path):
    path = write(tmp_path, "version: 1\ntree:\n  h: [unclosed\n")
    with pytest.raises(TopologyError, match="not valid YAML") as info:
        load_topology(path)
    assert info.value.line is not None and info.value.source == str(path)


def test_errors_in_inherited_values_point_where_they_were_written(tmp_path):
    path = write(tmp_path, """\
        version: 1
        defaults:
          python: python3.11
        tree:
          h:
            image: trixie
        """)
    with pytest.raises(TopologyError) as info:
        load_topology(path)
    assert (info.value.path, info.value.line) == ("defaults.python", 3)
    assert "host 'h': image 'trixie' offers python3.13, not 'python3.11'" in str(info.value)


def test_plain_dicts_parse_without_line_numbers():
    with pytest.raises(TopologyError) as info:
        parse({"version": 1, "tree": {"h": {"colour": 1}}})
    assert info.value.line is None
    assert str(info.value).startswith("t.yml: tree.h.colour: unknown key 'colour'")


# --------------------------------------------------------------------------------------------
# Units
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("parser", "text", "value"), [
    (units.parse_duration, "20ms", 0.02),
    (units.parse_duration, "2s", 2.0),
    (units.parse_duration, "1.5m", 90.0),
    (units.parse_duration, "250us", 0.00025),
    (units.parse_duration, 0, 0.0),
    (units.parse_fraction, "0.1%", 0.001),
    (units.parse_fraction, "100%", 1.0),
    (units.parse_rate, "100mbit", 100_000_000),
    (units.parse_rate, "512kbit", 512_000),
    (units.parse_size, "128m", 128 * 2**20),
    (units.parse_size, 4096, 4096),
])
def test_units_parse_to_base_units(parser, text, value):
    assert parser(text) == pytest.approx(value)


def test_bare_numbers_only_where_asked_for():
    with pytest.raises(ValueError, match="with a unit"):
        units.parse_duration(1.5)
    assert units.parse_duration(1.5, allow_bare=True) == 1.5
    assert units.parse_fraction(0.05, allow_bare=True) == 0.05
    with pytest.raises(ValueError, match="finite"):
        units.parse_duration(float("inf"), allow_bare=True)


# --------------------------------------------------------------------------------------------
# The JSON schema agrees with the Python validator
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def schema_validator():
    jsonschema = pytest.importorskip(
        "jsonschema", reason="jsonschema is not installed (add it to the test extra)")
    schema = json.loads(SCHEMA_PATH.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


@pytest.mark.parametrize("path", TOPOLOGY_FILES, ids=lambda p: p.name)
def test_shipped_files_validate_against_the_schema(schema_validator, path):
    data = yaml.safe_load(path.read_text())
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in schema_validator.iter_errors(data)]
    assert errors == []
    parse_topology(data, str(path))


def _base_document() -> dict:
    return yaml.safe_load((REPO / "topologies" / "dc.yml").read_text())


STRUCTURAL_MISTAKES = {
    "unknown top-level key": lambda d: d.update(colour="red"),
    "missing tree": lambda d: d.pop("tree"),
    "wrong version": lambda d: d.update(version=2),
    "unknown host key": lambda d: d["tree"]["bastion"].update(colour="red"),
    "unknown link key": lambda d: d["tree"]["bastion"]["link"].update(latncy="1ms"),
    "duration without unit": lambda d: d["tree"]["bastion"]["link"].update(latency=20),
    "duration in parsecs": lambda d: d["tree"]["bastion"]["link"].update(latency="20 parsecs"),
    "percentage without %": lambda d: d["tree"]["bastion"]["link"].update(loss=5),
    "rate in bytes": lambda d: d["tree"]["bastion"]["link"].update(rate="1mbps"),
    "bad range": lambda d: d["tree"]["bastion"]["children"].update({"x[1-2]": None}),
    "role not a string": lambda d: d["tree"]["bastion"].update(role=5),
    "account without name": lambda d: d["defaults"]["accounts"].append({"sudo": "nopasswd"}),
    "bad sudo mode": lambda d: d["defaults"]["accounts"].append({"name": "x", "sudo": "yes"}),
    "targetpw without password": lambda d: d["defaults"]["accounts"].append(
        {"name": "x", "sudo": "targetpw"}),
    "accounts and accounts+": lambda d: d["tree"]["bastion"].update(
        {"accounts": [], "accounts+": []}),
    "unknown fault kind": lambda d: d["faults"]["ci"]["pick"].append("melt"),
    "bad selector": lambda d: d["faults"]["ci"]["targets"].update(kill=["colour:red"]),
    "unknown fault param": lambda d: d["faults"]["ci"]["params"]["latency"].update(speed=1),
    "schedule without interval": lambda d: d["faults"]["ci"].pop("interval"),
    "final other than heal": lambda d: d["faults"]["ci"].update(final="explode"),
    "null faults": lambda d: d.update(faults=None),
    "unknown placement rule": lambda d: d.update(placement={"rule": "random"}),
    "labels rule without labels": lambda d: d.update(placement={"rule": "labels"}),
    "depth on spread": lambda d: d.update(placement={"rule": "spread", "depth": 2}),
    "empty node labels": lambda d: d.update(placement={
        "rule": "labels", "labels": [{"select": "role:rack", "node": {}}]}),
}


@pytest.mark.parametrize("mistake", sorted(STRUCTURAL_MISTAKES))
def test_schema_and_python_validator_reject_the_same_mistakes(schema_validator, mistake):
    data = _base_document()
    STRUCTURAL_MISTAKES[mistake](data)
    assert list(schema_validator.iter_errors(data)), "the schema accepted it"
    with pytest.raises(TopologyError):
        parse_topology(copy.deepcopy(data), "mutated.yml")


STRUCTURAL_VARIANTS = {
    "empty host": lambda d: d["tree"]["bastion"]["children"].update(extra=None),
    "zero-padded range": lambda d: d["tree"]["bastion"]["children"].update(
        {"n[01..12]": {"role": "node"}}),
    "zero latency": lambda d: d["tree"]["bastion"]["link"].update(latency=0, loss="0"),
    "null rate": lambda d: d["tree"]["bastion"]["link"].update(rate=None),
    "null python": lambda d: d["tree"]["bastion"].update(python=None),
    "signal fault": lambda d: d["faults"]["ci"].update(
        pick=["signal"], targets={}, params={"signal": {"process": "python", "signal": "STOP"}}),
    "subtree placement": lambda d: d.update(placement={"rule": "subtree", "depth": 2}),
    "labels placement": lambda d: d.update(placement={
        "rule": "labels", "labels": [{"select": "role:rack", "node": {"zone": "a"}}]}),
}


@pytest.mark.parametrize("variant", sorted(STRUCTURAL_VARIANTS))
def test_schema_and_python_validator_accept_the_same_variants(schema_validator, variant):
    data = _base_document()
    STRUCTURAL_VARIANTS[variant](data)
    assert [e.message for e in schema_validator.iter_errors(data)] == []
    parse_topology(data, "variant.yml")


def test_the_format_reference_example_loads(tmp_path):
    text = (REPO / "simulator" / "FORMAT.md").read_text()
    example = re.search(r"```yaml\n(.*?)```", text, re.S).group(1)
    topology = load_topology(write(tmp_path, example, "example.yml"))
    node = topology.host("bastion/dc2/node04")
    assert (node.python, node.link.latency) == ("python3.13", pytest.approx(0.0003))
    assert [a.name for a in node.accounts] == ["sim", "slow", "webapp"]
    quoted = re.search(r"```\n(example\.yml:.*)\n```", text).group(1)
    broken = example.replace("latency: 5ms", "latency: 20 parsecs")
    with pytest.raises(TopologyError) as info:
        load_topology(write(tmp_path, broken, "example.yml"))
    assert str(info.value) == str(tmp_path / quoted)


def test_placement_rules_are_read_and_typos_fail_early():
    data = _base_document()
    data["placement"] = {"rule": "labels",
                         "labels": [{"select": "role:rack", "node": {"zone": "a"}}]}
    placement = parse_topology(copy.deepcopy(data), "p.yml").placement
    assert (placement.rule, placement.labels[0][0]) == ("labels", "role:rack")
    assert dict(placement.labels[0][1]) == {"zone": "a"}
    assert parse_topology(_base_document(), "p.yml").placement.rule == "spread"
    data["placement"]["labels"][0]["select"] = "role:ghost"
    with pytest.raises(TopologyError, match=r"placement\.labels\[0\]: selector 'role:ghost' "
                                            r"matches no host"):
        parse_topology(data, "p.yml")


def test_public_names_exist():
    for name in topology_module.__all__:
        assert hasattr(topology_module, name), name
    for name in units.__all__:
        assert hasattr(units, name), name


def test_the_model_does_not_import_the_faults():
    """Faults depend on the model, not the reverse: loading topology.py pulls in no fault
    (nor any backend) module."""
    import subprocess
    import sys

    code = ("import json, sys, simulator.topology; "
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('simulator.'))))")
    root = pathlib.Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True,
                          text=True, timeout=60, check=True)
    assert json.loads(done.stdout) == ["simulator.topology", "simulator.units"]
