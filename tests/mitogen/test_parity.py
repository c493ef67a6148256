"""Every public name of Mitogen 0.3.54 exists here with a compatible signature, or
mitogen/COMPAT.md says why not.

Both sides are described by tests/support/api_surface.py, each in a process of its own:
Mitogen's in the virtual environment the bench uses for it (built by bench/envs.py when it
is missing; ``.ci/run`` builds it before the tests and passes it in
``MITOGEN_REFERENCE_PYTHON``), ours in this interpreter. A name Mitogen adds, or one we drop,
fails here until it exists or is listed with a reason.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SURFACE = REPO / "tests" / "support" / "api_surface.py"
COMPAT = REPO / "mitogen" / "COMPAT.md"

#: The modules compared, name by name.
MODULES = (
    "mitogen",
    "mitogen.core",
    "mitogen.parent",
    "mitogen.master",
    "mitogen.utils",
    "mitogen.select",
    "mitogen.fork",
    "mitogen.service",
    "mitogen.unix",
    "mitogen.fakessh",
    # the connection methods
    "mitogen.buildah",
    "mitogen.doas",
    "mitogen.docker",
    "mitogen.incus",
    "mitogen.jail",
    "mitogen.kubectl",
    "mitogen.lxc",
    "mitogen.lxd",
    "mitogen.podman",
    "mitogen.setns",
    "mitogen.ssh",
    "mitogen.su",
    "mitogen.sudo",
)

_ENTRY_RE = re.compile(r"^- ((?:`[^`]+`(?:, )?)+): (\S.*)$")


def compat_entries() -> dict[str, str]:
    """{dotted name or fnmatch pattern: reason} from COMPAT.md's bullets, which read
    ``- `name`, `name`: reason``."""
    entries: dict[str, str] = {}
    for line in COMPAT.read_text(encoding="utf-8").splitlines():
        match = _ENTRY_RE.match(line)
        if match:
            for name in re.findall(r"`([^`]+)`", match.group(1)):
                assert name.startswith("mitogen"), "COMPAT.md: %r is not a mitogen name" % name
                entries[name] = match.group(2)
    return entries


def reference_python() -> str:
    given = os.environ.get("MITOGEN_REFERENCE_PYTHON")
    if given:
        return given
    sys.path.insert(0, str(REPO))
    try:
        from bench import envs
    finally:
        sys.path.remove(str(REPO))
    return str(envs.ensure_env(envs.env_specs()["mitogen"]))


def run_surface(python: str, request: dict, cwd: Path | None = None) -> dict:
    done = subprocess.run([python, "-I", str(SURFACE)], input=json.dumps(request),
                          capture_output=True, text=True, timeout=120, check=False,
                          cwd=cwd)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def reference() -> dict:
    """Mitogen 0.3.54's public names, and the list of its modules."""
    python = reference_python()
    listing = subprocess.run(
        [python, "-I", "-c", "import mitogen, pkgutil; print(mitogen.__version__); "
         "print(' '.join(sorted(m.name for m in pkgutil.iter_modules(mitogen.__path__))))"],
        capture_output=True, text=True, timeout=60, check=True).stdout.splitlines()
    assert listing[0] == "(0, 3, 54)", "the reference is not Mitogen 0.3.54: %s" % listing[0]
    surface = run_surface(python, {name: None for name in MODULES}, cwd=Path("/"))
    return {"modules": ["mitogen." + m for m in listing[1].split()], "surface": surface}


@pytest.fixture(scope="module")
def ours(reference) -> dict:
    request = {}
    for module, desc in reference["surface"].items():
        names = desc.get("names", {})
        request[module] = {name: sorted(d.get("members", {})) if d else None
                           for name, d in names.items()}
    return run_surface(sys.executable, request, cwd=REPO)


class Listed:
    """COMPAT.md's entries, noting which ones were needed."""

    def __init__(self) -> None:
        self.entries = compat_entries()
        self.used: set[str] = set()

    def covers(self, dotted: str) -> bool:
        parts = dotted.split(".")
        candidates = {".".join(parts[:i]) for i in range(2, len(parts) + 1)}
        for entry in self.entries:
            if entry in candidates or any(fnmatch.fnmatchcase(c, entry) for c in candidates):
                self.used.add(entry)
                return True
        return False


def signature_problems(ref: list | None, mine: list | None,
                       by_position: bool = False) -> list[str]:
    """Why a call that works on Mitogen's signature `ref` could fail on `mine`. With
    `by_position` (``__exit__`` and other methods only Python calls), names do not count."""
    if ref is None or mine is None:
        return []
    if by_position:
        ref = [[p[0], "POSITIONAL_ONLY" if p[1] == "POSITIONAL_OR_KEYWORD" else p[1], p[2]]
               for p in ref]
    problems = []
    positional = [p for p in mine if p[1] in ("POSITIONAL_ONLY", "POSITIONAL_OR_KEYWORD")]
    by_name = {p[0]: p for p in mine}
    var_pos = any(p[1] == "VAR_POSITIONAL" for p in mine)
    var_kw = any(p[1] == "VAR_KEYWORD" for p in mine)
    index = 0
    for name, kind, _ in ref:
        if kind in ("POSITIONAL_ONLY", "POSITIONAL_OR_KEYWORD"):
            if index < len(positional):
                if kind == "POSITIONAL_OR_KEYWORD" and positional[index][0] != name and \
                        not name.startswith("_"):
                    problems.append("positional parameter %d is %r, Mitogen's is %r"
                                    % (index, positional[index][0], name))
            elif not var_pos:
                problems.append("no positional parameter %d (%r)" % (index, name))
            index += 1
        if kind in ("POSITIONAL_OR_KEYWORD", "KEYWORD_ONLY") and not name.startswith("_"):
            mine_p = by_name.get(name)
            if not (var_kw or (mine_p and mine_p[1] in ("POSITIONAL_OR_KEYWORD",
                                                         "KEYWORD_ONLY"))):
                problems.append("no keyword parameter %r" % (name,))
        if kind == "VAR_POSITIONAL" and not var_pos:
            problems.append("no *args")
        if kind == "VAR_KEYWORD" and not var_kw:
            problems.append("no **kwargs")
    ref_required = {p[0] for p in ref if not p[2] and p[1] not in ("VAR_POSITIONAL",
                                                                    "VAR_KEYWORD")}
    ref_positions = [p[0] for p in ref if p[1] in ("POSITIONAL_ONLY", "POSITIONAL_OR_KEYWORD")]
    ref_var_pos = any(p[1] == "VAR_POSITIONAL" for p in ref)
    for i, (name, _kind, has_default) in enumerate(positional):
        if ref_var_pos and i >= len(ref_positions):
            break  # Mitogen's takes *args: its real requirements are not in the signature
        if not has_default and name not in ref_required and not (
                i < len(ref_positions) and ref_positions[i] in ref_required):
            problems.append("parameter %r is required, Mitogen's is optional" % (name,))
    for name, kind, has_default in mine:
        if kind == "KEYWORD_ONLY" and not has_default and name not in ref_required:
            problems.append("keyword %r is required, Mitogen's is optional" % (name,))
    return problems


def compare(ref: dict, mine: dict | None, where: str) -> list[str]:
    if mine is None:
        return ["%s: missing" % where]
    problems = []
    if ref["kind"] == "class" and mine["kind"] != "class":
        problems.append("%s: Mitogen's is a class, ours a %s" % (where, mine["kind"]))
    elif ref["kind"] == "callable" and mine["kind"] == "data":
        problems.append("%s: Mitogen's is callable, ours is not" % where)
    if ref.get("foreign"):
        return problems
    # A class's own signature is its constructor's: reported (and listed) as __init__.
    call_where = where + ".__init__" if ref["kind"] == "class" else where
    last = where.rpartition(".")[2]
    problems += ["%s: %s" % (call_where, p) for p in signature_problems(
        ref.get("signature"), mine.get("signature"),
        by_position=last.startswith("__") and last.endswith("__"))]
    if ref.get("value") is not None and not mine.get("descriptor") and \
            mine.get("value") != ref["value"]:
        problems.append("%s: value %r, Mitogen's is %r" % (where, mine.get("value"),
                                                           ref["value"]))
    return problems


def module_problems(module: str, reference: dict, ours: dict, listed: Listed) -> list[str]:
    """The differences of `module` from Mitogen's that COMPAT.md does not cover."""
    ref = reference["surface"][module]
    assert "names" in ref, "Mitogen's %s: %s" % (module, ref.get("error"))
    mine = ours[module]
    if "names" not in mine:
        found = ["%s cannot be imported: %s" % (module, mine.get("error"))]
        return [] if listed.covers(module) else found
    problems = []

    def unless_listed(where: str, found: list[str]) -> list[str]:
        return [] if found and listed.covers(where) else found

    for name, ref_desc in sorted(ref["names"].items()):
        where = "%s.%s" % (module, name)
        my_desc = mine["names"].get(name)
        found = compare(ref_desc, my_desc, where)
        constructor = [p for p in found if p.startswith(where + ".__init__: ")]
        problems += unless_listed(where + ".__init__", constructor)
        problems += unless_listed(where, [p for p in found if p not in constructor])
        if my_desc is None or ref_desc["kind"] != "class" or ref_desc.get("foreign"):
            continue
        for member, ref_member in sorted(ref_desc.get("members", {}).items()):
            if ref_member is None:
                continue
            member_where = "%s.%s" % (where, member)
            my_member = (my_desc.get("members") or {}).get(member)
            problems += unless_listed(member_where, compare(ref_member, my_member,
                                                            member_where))
    return problems


def test_every_mitogen_module_is_compared_or_listed(reference):
    listed = Listed()
    missing = [m for m in reference["modules"] if m not in MODULES and not listed.covers(m)]
    assert not missing, "Mitogen modules neither in MODULES nor in COMPAT.md: %s" % missing


def test_compat_entries_have_reasons():
    entries = compat_entries()
    assert len(entries) > 10
    assert all(len(reason.split()) >= 3 for reason in entries.values())


@pytest.mark.parametrize("module", MODULES)
def test_names_match_mitogen(module, reference, ours):
    listed = Listed()
    problems = module_problems(module, reference, ours, listed)
    assert not problems, "%d differences from Mitogen 0.3.54 not in COMPAT.md:\n%s" % (
        len(problems), "\n".join(problems))


def test_no_stale_compat_entries(reference, ours):
    """An entry that no longer covers a difference must go, so the list stays true."""
    listed = Listed()
    for module in MODULES:
        module_problems(module, reference, ours, listed)
    for module in reference["modules"]:
        if module not in MODULES:
            listed.covers(module)
    stale = sorted(set(listed.entries) - listed.used)
    assert not stale, "COMPAT.md entries that match no difference: %s" % stale
