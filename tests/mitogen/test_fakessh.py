"""mitogen.fakessh: local tools that speak ssh, tunnelled through the tree."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat

import pytest

import mitogen.core
import mitogen.fakessh
from tests.support import funcs

MIB = 1 << 20


@pytest.fixture
def far(router):
    """A context two hops from the master."""
    near = router.local(name="near")
    return router.local(name="far", via=near)


def _tree_digest(root):
    """{relative path: (mode, sha256)} of every file and directory under `root`."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            mode = stat.S_IMODE(os.lstat(path).st_mode)
            digest = None
            if name in filenames:
                with open(path, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
            found[os.path.relpath(path, root)] = (mode, digest)
    return found


def _make_tree(root):
    for depth in range(3):
        directory = root.joinpath(*["d%d" % i for i in range(depth + 1)])
        directory.mkdir(parents=True)
        for n in range(5):
            (directory / ("f%d.bin" % n)).write_bytes(os.urandom(n * 70000 + depth))
    (root / "big.bin").write_bytes(os.urandom(8 * MIB))
    (root / "script.sh").write_text("#!/bin/sh\necho hi\n")
    (root / "script.sh").chmod(0o750)


@pytest.mark.system
def test_rsync_syncs_a_tree_to_a_context_two_hops_away(router, far, tmp_path):
    rsync = shutil.which("rsync")
    if rsync is None:
        pytest.skip("rsync is not installed (.ci/run installs it)")
    src, dst = tmp_path / "src", tmp_path / "dst"
    _make_tree(src)
    argv = [rsync, "-a", "--delete", str(src) + "/", "anyhost:" + str(dst) + "/"]
    assert mitogen.fakessh.run(far, router, argv) == 0
    assert _tree_digest(dst) == _tree_digest(src)
    # Again after changes: a delta, a new file, a deletion. (rsync skips a file whose size
    # and mtime are unchanged: the rewritten file gets a later mtime.)
    big = src / "big.bin"
    big.write_bytes(os.urandom(8 * MIB))
    os.utime(big, (big.stat().st_atime, big.stat().st_mtime + 10))
    (src / "d0" / "new.txt").write_text("new")
    (src / "d0" / "f1.bin").unlink()
    assert mitogen.fakessh.run(far, router, argv) == 0
    assert _tree_digest(dst) == _tree_digest(src)
    # Every message found its handle: nothing was sent to a channel already closed.
    assert far.call(funcs.dropped_count) == 0


def test_the_command_runs_in_the_destination_with_its_status_and_output(router, far, tmp_path):
    out, err = tmp_path / "out", tmp_path / "err"
    script = ("ssh -p 2222 -l someone -o BatchMode=yes anyhost "
              "'echo $PPID; pwd; echo oops >&2; exit 7' > %s 2> %s" % (out, err))
    assert mitogen.fakessh.run(far, router, ["sh", "-c", script]) == 7
    ppid, cwd = out.read_text().split()
    assert int(ppid) == far.call(os.getpid)  # the shell is the destination's child
    assert cwd == far.call(os.path.expanduser, "~")
    assert err.read_text() == "oops\n"


def test_stdin_and_stdout_stream_with_bounded_windows(router, far, tmp_path):
    data = tmp_path / "data"
    data.write_bytes(os.urandom(32 * MIB))
    out = tmp_path / "out"
    script = "ssh host 'cat; echo done' < %s > %s" % (data, out)
    assert mitogen.fakessh.run(far, router, ["sh", "-c", script]) == 0
    assert out.read_bytes() == data.read_bytes() + b"done\n"
    assert far.call(funcs.dropped_count) == 0
    # Several connections, one after another and at once.
    script = "ssh h 'echo 1' > %s & ssh h 'echo 2' >> %s.2; wait; ssh h 'exit 3'" % (out, out)
    assert mitogen.fakessh.run(far, router, ["sh", "-c", script]) == 3
    assert out.read_text() == "1\n"
    assert far.call(funcs.dropped_count) == 0


def test_a_tool_past_its_deadline_is_killed(router, far):
    with pytest.raises(mitogen.core.TimeoutError, match="did not finish before the deadline"):
        mitogen.fakessh.run(far, router, ["sleep", "60"], deadline=mitogen.core.now() + 0.3)


def test_bad_arguments_are_refused(router, far, tmp_path):
    with pytest.raises(ValueError, match="must name the tool"):
        mitogen.fakessh.run(far, router, [])
    out = tmp_path / "out"
    script = "ssh onlyahost 2> %s" % (out,)
    assert mitogen.fakessh.run(far, router, ["sh", "-c", script]) == 255
    assert "only 'ssh [options] host command' is supported" in out.read_text()


def test_ssh_command_lines_are_parsed_as_openssh_does():
    parse = mitogen.fakessh.parse_ssh_args
    assert parse(["-p", "22", "-l", "u", "host", "rsync", "--server", "-a"]) == (
        "host", [("-p", "22"), ("-l", "u")], ["rsync", "--server", "-a"])
    assert parse(["host", "-x", "ls", "-l"]) == ("host", [("-x", "")], ["ls", "-l"])
    assert parse(["-T"]) == (None, [("-T", "")], [])
