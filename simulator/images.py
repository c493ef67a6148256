"""Host images for the docker backend, built locally: no registry is reachable here or in CI.

One image per Debian suite (bullseye: python3.9 + python2.7, bookworm: 3.11, trixie: 3.13,
sid: rolling). Each is a ``debootstrap --variant=minbase`` tree with the recipe's packages,
finished by ``finalize-rootfs.sh`` and turned into an image with ``docker import``. Per-host
accounts, sudo rules and keys are not in the image: the entry point applies
``/etc/sim/node.json`` at container start (see ``node_setup.py``). The recipe files are in
``simulator/containers/`` and are read by :mod:`simulator.recipes`.

An image is tagged ``mitogen-sim/<suite>:<hash>``, the hash covering every input of the build
(suite, variant, packages, the recipe files and :data:`RECIPE_VERSION`), so a tag that exists is
up to date and is never built again; editing one suite's recipe rebuilds only that suite. The
rootfs tarball is kept in the cache directory under the same hash, so a pruned engine re-imports
in seconds. Builds of one suite are serialised by a file lock across processes (pytest-xdist
workers, parallel CI steps): the first builds, the others wait and then find the tag.

Command line::

    python -m simulator images build [SUITE ...] [--jobs N] [--rebuild]
    python -m simulator images list
    python -m simulator images prune

(``python -m simulator.images`` is the same.)
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import docker
import docker.errors
from filelock import FileLock, Timeout

from simulator.dockerd import DockerdError, apt_install, ensure_dockerd
from simulator.recipes import (
    IMAGE_REPO,
    LABEL_PREFIX,
    RECIPE_DIR,
    RECIPE_VERSION,
    ImageBuildError,
    SuiteRecipe,
    UnknownSuiteError,
    image_tag,
    load_recipes,
    recipe,
)
from simulator.state import owner_alive, owner_tag

__all__ = [
    "IMAGE_REPO",
    "LABEL_PREFIX",
    "NODE_CONFIG_DIR",
    "RECIPE_DIR",
    "RECIPE_VERSION",
    "ImageBuildError",
    "SuiteRecipe",
    "UnknownSuiteError",
    "cache_dir",
    "copy_image",
    "debian_mirror",
    "ensure_image",
    "image_present",
    "image_tag",
    "list_images",
    "load_recipes",
    "main",
    "node_config_tar",
    "recipe",
    "remove_tree",
    "validate_node",
    "wait_node_ready",
    "write_node_config",
]

NODE_CONFIG_DIR = "/etc/sim"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
_ENTRYPOINT = "/usr/local/sbin/mitogen-sim-entrypoint"
_DEBOOTSTRAP_TIMEOUT = 1200.0
_LOCK_TIMEOUT = 1800.0
_MIRROR_TIMEOUT = 20.0
#: debootstrap prints one of these per package; they are shown only as a periodic heartbeat.
_NOISY = ("I: Retrieving", "I: Validating", "I: Extracting", "I: Unpacking ", "I: Configuring ")
_HEARTBEAT = 10.0

Progress = Callable[[str], None]


# --- machine facts -------------------------------------------------------------------------


def cache_dir() -> Path:
    """$MITOGEN_SIM_CACHE, else /var/cache/mitogen-sim for root, else ~/.cache/mitogen-sim."""
    configured = os.environ.get("MITOGEN_SIM_CACHE")
    if configured:
        return Path(configured)
    if os.geteuid() == 0:
        return Path("/var/cache/mitogen-sim")
    return Path.home() / ".cache" / "mitogen-sim"


def _deb822_entries(text: str) -> Iterator[Tuple[List[str], List[str]]]:
    for paragraph in text.split("\n\n"):
        fields: Dict[str, str] = {}
        for line in paragraph.splitlines():
            if line.startswith("#") or ":" not in line or line[:1].isspace():
                continue
            key, _, value = line.partition(":")
            fields[key.strip().lower()] = value.strip()
        if fields.get("enabled", "yes").lower() == "no":
            continue
        yield fields.get("types", "").split(), fields.get("uris", "").split()


def _one_line_entries(text: str) -> Iterator[Tuple[List[str], List[str]]]:
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if len(words) < 3:
            continue
        kind, rest = words[0], words[1:]
        if rest[0].startswith("["):  # options: [signed-by=... arch=...]
            while rest and not rest[0].endswith("]"):
                rest = rest[1:]
            rest = rest[1:]
        if rest:
            yield [kind], [rest[0]]


def debian_mirror(apt_dir: Path = Path("/etc/apt")) -> str:
    """The Debian archive apt uses here, so debootstrap reaches the same (allowed) mirror.

    $MITOGEN_SIM_MIRROR wins; else the first enabled ``deb`` source whose URI ends in
    ``/debian`` (not debian-security), read from sources.list and sources.list.d (``*.list``
    and deb822 ``*.sources``); else deb.debian.org.
    """
    configured = os.environ.get("MITOGEN_SIM_MIRROR")
    if configured:
        return configured.rstrip("/")
    files = [apt_dir / "sources.list"]
    files += sorted((apt_dir / "sources.list.d").glob("*.list"))
    files += sorted((apt_dir / "sources.list.d").glob("*.sources"))
    for path in files:
        try:
            text = path.read_text()
        except OSError:
            continue
        parse = _deb822_entries if path.suffix == ".sources" else _one_line_entries
        for types, uris in parse(text):
            if "deb" not in types:
                continue
            for uri in uris:
                if uri.rstrip("/").endswith("/debian"):
                    return uri.rstrip("/")
    return DEFAULT_MIRROR


def _check_mirror_serves(mirror: str, suite: str) -> None:
    url = f"{mirror}/dists/{suite}/Release"
    try:
        with urllib.request.urlopen(url, timeout=_MIRROR_TIMEOUT) as reply:
            reply.read(1)
    except urllib.error.HTTPError as exc:
        raise ImageBuildError(f"the mirror {mirror} does not serve suite {suite!r} "
                              f"(HTTP {exc.code} for {url})") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ImageBuildError(f"the Debian mirror {mirror} is unreachable ({reason}); set "
                              "MITOGEN_SIM_MIRROR to one this machine can reach") from None


# --- safe work directories -----------------------------------------------------------------


def _mounts_under(path: Path) -> List[str]:
    prefix = str(path.resolve()).rstrip("/") + "/"
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].replace("\\040", " ")
            if point.startswith(prefix):
                found.append(point)
    return sorted(found, key=len, reverse=True)


def remove_tree(path: Path) -> None:
    """rm -rf that first unmounts what a failed debootstrap may leave mounted inside.

    A chroot can hold /proc, /sys or a bind-mounted /dev; deleting through them would
    delete the build machine's own files, so removal refuses while anything stays mounted.
    """
    if not path.exists():
        return
    for point in _mounts_under(path):
        subprocess.run(["umount", "--lazy", point], check=False, capture_output=True)
    left = _mounts_under(path)
    if left:
        raise ImageBuildError(f"refusing to delete {path}: still mounted inside: {left}")
    _rmtree_gone_is_fine(path)


def _rmtree_gone_is_fine(path: Path) -> None:
    """shutil.rmtree, where an entry that vanished meanwhile is not an error (another
    sweeper removing the same dead build)."""
    def gone_is_fine(_func: Any, _path: str, exc: Any) -> None:
        error = exc[1] if isinstance(exc, tuple) else exc
        if not isinstance(error, FileNotFoundError):
            raise error

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=gone_is_fine)  # type: ignore[call-arg]
    else:
        shutil.rmtree(path, onerror=gone_is_fine)


def _work_processes(work: Path) -> List[int]:
    """Processes of a build in ``work``: with it on their command line (debootstrap, its
    wget and tar, finalize-rootfs.sh), or chrooted or sitting in it (dpkg in the chroot)."""
    prefix = str(work.resolve())
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{name}/cmdline").read_bytes().replace(b"\0", b" ")
            root = os.readlink(f"/proc/{name}/root")
            cwd = os.readlink(f"/proc/{name}/cwd")
        except OSError:  # gone, or a zombie
            continue
        if prefix.encode() in cmdline or root.startswith(prefix) or cwd.startswith(prefix):
            found.append(int(name))
    return found


def _kill_work_processes(work: Path, timeout: float = 30.0) -> None:
    """SIGKILL every process of a build in ``work`` and wait until none is left: a killed
    builder's debootstrap runs on in its own session, deleting and writing files, and a
    removal racing it fails (or leaves files it writes after)."""
    deadline = time.monotonic() + timeout
    while True:
        pids = _work_processes(work)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if time.monotonic() >= deadline:
            raise ImageBuildError(f"processes of the build in {work} do not end: {pids}")
        time.sleep(0.05)  # another process's end: /proc has no event to wait on


def _work_dir_name(suite: str, digest: str) -> str:
    """``SUITE-HASH-PID-START``: the builder's pid and start time, so a later build can tell
    a live build's directory from a dead one's even when the pid is reused."""
    return f"{suite}-{digest}-{owner_tag().replace(':', '-')}"


def _builder_alive(name: str) -> bool:
    parts = name.rsplit("-", 2)
    if len(parts) == 3 and parts[1].isdigit():
        return owner_alive(f"{parts[1]}:{parts[2]}")
    pid = name.rsplit("-", 1)[-1]  # an older name: SUITE-HASH-PID
    return pid.isdigit() and Path(f"/proc/{pid}").exists()


def _sweep_stale_work(work_root: Path) -> List[Path]:
    """Remove the work directories of every build whose builder is gone (killed, or its
    machine rebooted), after ending what that build still runs. Returns them."""
    swept: List[Path] = []
    if not work_root.is_dir():
        return swept
    for entry in sorted(work_root.iterdir()):
        if not _builder_alive(entry.name):
            _kill_work_processes(entry)
            remove_tree(entry)
            swept.append(entry)
    return swept


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    temporary.write_text(text)
    os.replace(temporary, path)


# --- the build -----------------------------------------------------------------------------


class _Stage:
    """Prints stage lines with the time since the build began."""

    def __init__(self, suite: str, progress: Progress) -> None:
        self.suite = suite
        self.progress = progress
        self.started = time.monotonic()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def __call__(self, message: str) -> None:
        self.progress(f"[{self.suite}] {message} ({self.elapsed:.1f}s)")


def _run_debootstrap(r: SuiteRecipe, rootfs: Path, mirror: str, log_path: Path,
                     stage: _Stage) -> None:
    argv = ["debootstrap", f"--variant={r.variant}", f"--include={','.join(r.packages)}",
            "--components=main", r.suite, str(rootfs), mirror]
    stage(f"debootstrap {r.suite} from {mirror} (log {log_path})")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)
        # debootstrap spawns wget, dpkg and chroots: on timeout kill its whole session.
        timer = threading.Timer(_DEBOOTSTRAP_TIMEOUT, os.killpg, (proc.pid, signal.SIGKILL))
        timer.start()
        try:
            last_shown = time.monotonic()
            assert proc.stdout is not None
            for raw in proc.stdout:
                log.write(raw)
                line = raw.decode(errors="replace").rstrip()
                now = time.monotonic()
                if not line.startswith(_NOISY) or now - last_shown >= _HEARTBEAT:
                    stage(f"debootstrap: {line}")
                    last_shown = now
            code = proc.wait()
        finally:
            timer.cancel()
            timer.join()
            if proc.poll() is None:  # interrupted here: end its whole session, then reap it
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
    if code != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
        why = f"timed out after {_DEBOOTSTRAP_TIMEOUT:.0f}s" if code == -signal.SIGKILL \
            else f"failed ({code})"
        raise ImageBuildError(f"debootstrap of {r.suite} {why}; log {log_path}:\n{tail}")


def _probe_pythons(rootfs: Path) -> Dict[str, str]:
    """The python3 version and every versioned interpreter the tree holds."""
    out = subprocess.run(
        ["chroot", str(rootfs), "python3", "-c",
         "import sys; print('%d.%d.%d' % sys.version_info[:3])"],
        capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise ImageBuildError(f"python3 does not run in the new tree: {out.stderr.strip()}")
    names = sorted(p.name for p in (rootfs / "usr" / "bin").glob("python[0-9]*.[0-9]*")
                   if p.name.replace("python", "").replace(".", "").isdigit())
    return {"python3": out.stdout.strip(), "pythons": ",".join(names)}


def _check_python(r: SuiteRecipe, found: Mapping[str, str]) -> None:
    if r.python is None:
        return
    if not (found["python3"] + ".").startswith(r.python + "."):
        raise ImageBuildError(f"{r.suite}: python3 is {found['python3']}, but the recipe "
                              f"expects {r.python}; fix 'python' in suites.json")


def _make_tarball(r: SuiteRecipe, mirror: str, tarball: Path, stage: _Stage) -> Dict[str, str]:
    """debootstrap, check, finish and pack a rootfs; returns facts recorded as labels."""
    if os.geteuid() != 0:
        raise ImageBuildError(f"building the {r.suite} image needs root (debootstrap, chroot); "
                              f"run as root: python -m simulator images build {r.suite}")
    if shutil.which("debootstrap") is None:
        stage("debootstrap is missing; installing it with apt")
        try:
            apt_install(["debootstrap"], progress=stage)
        except DockerdError as exc:
            raise ImageBuildError(f"debootstrap is missing and could not be installed: {exc}") \
                from None
    stage(f"checking that {mirror} serves {r.suite}")
    _check_mirror_serves(mirror, r.suite)
    cache = tarball.parent.parent
    work = cache / "work" / _work_dir_name(r.suite, tarball.stem.rsplit("-", 1)[-1])
    (cache / "logs").mkdir(parents=True, exist_ok=True)
    log_path = cache / "logs" / f"{tarball.stem}.log"
    try:
        work.mkdir(parents=True)
        rootfs = work / "rootfs"
        _run_debootstrap(r, rootfs, mirror, log_path, stage)
        facts = _probe_pythons(rootfs)
        stage(f"python3 is {facts['python3']} (interpreters: {facts['pythons']})")
        _check_python(r, facts)
        stage("finishing the tree (finalize-rootfs.sh)")
        fin = subprocess.run(["sh", str(r.recipe_dir / "finalize-rootfs.sh"), str(rootfs),
                              str(r.recipe_dir)], capture_output=True, text=True, check=False)
        if fin.returncode != 0:
            raise ImageBuildError(f"finalize-rootfs.sh failed ({fin.returncode}): "
                                  f"{(fin.stdout + fin.stderr).strip()}")
        packed = work / "rootfs.tar"
        stage("packing the tree")
        subprocess.run(["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "-C",
                        str(rootfs), "-cf", str(packed), "."], check=True, capture_output=True)
        tarball.parent.mkdir(parents=True, exist_ok=True)
        _write_atomically(tarball.with_suffix(".json"), json.dumps(facts))
        os.replace(packed, tarball)  # same filesystem: the cached tarball is whole or absent
        stage(f"cached {tarball} ({tarball.stat().st_size / 1e6:.0f} MB)")
        return facts
    finally:
        _kill_work_processes(work)  # an interrupted build leaves nothing running...
        remove_tree(work)  # ...and nothing half-made


def _import(client: docker.DockerClient, r: SuiteRecipe, tarball: Path, facts: Mapping[str, str],
            stage: _Stage) -> None:
    digest = r.content_hash()
    labels = {
        "suite": r.suite,
        "hash": digest,
        "recipe": str(RECIPE_VERSION),
        "python3": facts.get("python3", ""),
        "pythons": facts.get("pythons", ""),
        "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    changes = [
        f'ENTRYPOINT ["{_ENTRYPOINT}"]',
        'CMD ["/usr/sbin/sshd", "-D", "-e"]',
        "EXPOSE 22",
        "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8",
        "LABEL " + " ".join(f"{LABEL_PREFIX}{k}={json.dumps(v)}" for k, v in labels.items()),
    ]
    stage(f"docker import as {r.tag}")
    client.api.import_image(src=str(tarball), repository=r.repository, tag=digest[:16],
                            changes=changes)
    client.api.tag(r.tag, r.repository, "latest", force=True)


def image_present(client: docker.DockerClient, tag: str) -> bool:
    """Whether the engine has ``tag`` (one inspect)."""
    try:
        client.images.get(tag)
    except docker.errors.ImageNotFound:
        return False
    return True


def copy_image(source: docker.DockerClient, target: docker.DockerClient, tag: str) -> bool:
    """Stream ``tag`` from one engine into another that lacks it (``docker save`` into
    ``docker load``, through both APIs): how images reach a swarm's nodes without a
    registry. Returns whether anything was copied."""
    if image_present(target, tag):
        return False
    target.api.load_image(source.images.get(tag).save(named=True))
    if not image_present(target, tag):
        raise ImageBuildError(f"{tag} did not load into the engine at {target.api.base_url}")
    return True


def _build_locked(client: docker.DockerClient, r: SuiteRecipe, mirror: str, rebuild: bool,
                  stage: _Stage) -> None:
    for swept in _sweep_stale_work(cache_dir() / "work"):  # every build starts clean
        stage(f"removed {swept}, left by a build that was interrupted")
    tarball = cache_dir() / "rootfs" / f"{r.suite}-{r.content_hash()[:16]}.tar"
    if rebuild:
        # The image is left alone (containers may use it); the import moves the tags.
        tarball.unlink(missing_ok=True)
    elif image_present(client, r.tag):
        stage(f"{r.tag} was built by another process meanwhile")
        return
    facts_path = tarball.with_suffix(".json")
    if tarball.exists() and facts_path.exists():
        stage(f"re-importing the cached tree {tarball}")
        facts = json.loads(facts_path.read_text())
    else:
        facts = _make_tarball(r, mirror, tarball, stage)
    _import(client, r, tarball, facts, stage)
    size = client.images.get(r.tag).attrs.get("Size", 0)
    stage(f"built {r.tag}: python3 {facts.get('python3')}, {size / 1e6:.0f} MB")


def ensure_image(suite: str, progress: Progress = print, *,
                 client: Optional[docker.DockerClient] = None, mirror: Optional[str] = None,
                 rebuild: bool = False, lock_timeout: float = _LOCK_TIMEOUT,
                 recipe_dir: Path = RECIPE_DIR) -> str:
    """Return the tag of ``suite``'s current image, building it first if it is missing.

    Cheap when the image exists (one inspect). Otherwise takes the suite's build lock, so that
    concurrent callers build once; ``lock_timeout`` bounds the wait for another builder. With
    no ``client``, makes sure a Docker engine runs (see simulator.dockerd) and uses it.
    """
    r = recipe(suite, recipe_dir)
    own_client = client is None
    if client is None:
        try:
            client = ensure_dockerd()
        except DockerdError as exc:
            raise ImageBuildError(f"no Docker engine for building {suite}: {exc}") from None
    try:
        if not rebuild and image_present(client, r.tag):
            return r.tag
        stage = _Stage(suite, progress)
        locks = cache_dir() / "locks"
        locks.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(locks / f"{suite}.lock"))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            stage(f"another process is building {suite}; waiting (lock {lock.lock_file})")
            try:
                lock.acquire(timeout=lock_timeout)
            except Timeout:
                raise ImageBuildError(f"gave up after {lock_timeout:.0f}s waiting for another "
                                      f"build of {suite} (lock {lock.lock_file})") from None
        try:
            _build_locked(client, r, mirror or debian_mirror(), rebuild, stage)
        finally:
            lock.release()
        return r.tag
    finally:
        if own_client:
            client.close()


# --- per-host configuration ----------------------------------------------------------------

_node_setup: Optional[ModuleType] = None


def _node_setup_module() -> ModuleType:
    """node_setup.py, the same file the images run, imported by path."""
    global _node_setup
    if _node_setup is None:
        spec = importlib.util.spec_from_file_location("mitogen_sim_node_setup",
                                                      RECIPE_DIR / "node_setup.py")
        if spec is None or spec.loader is None:
            raise ImageBuildError(f"cannot load {RECIPE_DIR / 'node_setup.py'}")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _node_setup = module
    return _node_setup


def validate_node(node: Mapping[str, Any]) -> Dict[str, Any]:
    """Check a node.json description on the host side; raises ValueError naming the path."""
    return _node_setup_module().validate(dict(node))


def node_config_tar(node: Mapping[str, Any]) -> bytes:
    """A tar holding node.json (root-only: it may carry passwords) for put_archive at
    :data:`NODE_CONFIG_DIR`, which exists in every image. Validates first."""
    validate_node(node)
    data = json.dumps(node, indent=2, sort_keys=True).encode()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("node.json")
        info.size, info.mode, info.mtime = len(data), 0o600, int(time.time())
        tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def write_node_config(container: Any, node: Mapping[str, Any]) -> None:
    """Put node.json into a created (not yet started) container."""
    if not container.put_archive(NODE_CONFIG_DIR, node_config_tar(node)):
        raise ImageBuildError(f"could not write {NODE_CONFIG_DIR}/node.json into "
                              f"container {container.name}")


def wait_node_ready(container: Any, timeout: float = 30.0,
                    since: Optional[float] = None) -> None:
    """Wait until the entry point has applied node.json and sshd listens.

    ``since`` (Unix seconds, e.g. taken just before a restart) ignores log lines of earlier
    starts. Raises ImageBuildError with the container's log when it exits first (a bad
    node.json stops the container) or when ``timeout`` passes.
    """
    deadline = time.monotonic() + timeout
    while True:
        container.reload()
        logs = container.logs(since=since).decode(errors="replace")
        if "mitogen-sim: node ready" in logs and "Server listening" in logs:
            return
        if container.status in ("exited", "dead"):
            raise ImageBuildError(f"container {container.name} exited while starting:\n{logs}")
        if time.monotonic() >= deadline:
            raise ImageBuildError(f"container {container.name} not ready after {timeout:.0f}s:"
                                  f"\n{logs}")
        time.sleep(0.1)


# --- listing, pruning, command line --------------------------------------------------------


def list_images(client: docker.DockerClient) -> List[Dict[str, Any]]:
    """Every mitogen-sim image on the engine, with its suite, python, size and freshness.

    ``current`` means the image carries the tag the suite's present recipe builds; images that
    a rebuild or a recipe change superseded (untagged, or under an old hash) are not.
    """
    current = {s: r.tag for s, r in load_recipes().items()}
    rows = []
    for image in client.images.list(filters={"label": f"{LABEL_PREFIX}suite"}):
        labels = image.labels
        suite = labels.get(f"{LABEL_PREFIX}suite", "?")
        rows.append({
            "id": image.id,
            "tags": sorted(image.tags),
            "suite": suite,
            "python3": labels.get(f"{LABEL_PREFIX}python3", "?"),
            "pythons": labels.get(f"{LABEL_PREFIX}pythons", ""),
            "size_mb": round(image.attrs.get("Size", 0) / 1e6),
            "built": labels.get(f"{LABEL_PREFIX}built", "?"),
            "current": current.get(suite) in image.tags,
        })
    return sorted(rows, key=lambda row: (row["suite"], not row["current"]))


def _prune(client: docker.DockerClient) -> List[str]:
    """Remove images and cached tarballs that no current recipe builds."""
    removed = []
    for row in list_images(client):
        if row["current"]:
            continue
        for ref in row["tags"] or [row["id"]]:
            try:
                client.images.remove(ref)
                removed.append(ref)
            except docker.errors.APIError as exc:  # a container still uses it
                print(f"kept {ref}: {exc.explanation}", file=sys.stderr)
    wanted = {f"{s}-{r.content_hash()[:16]}" for s, r in load_recipes().items()}
    for path in sorted((cache_dir() / "rootfs").glob("*.tar")):
        if path.stem not in wanted:
            path.unlink()
            path.with_suffix(".json").unlink(missing_ok=True)
            removed.append(str(path))
    return removed


def _cmd_build(args: argparse.Namespace) -> int:
    suites = args.suites or sorted(load_recipes())
    for suite in suites:
        recipe(suite)  # unknown suites fail before anything starts
    started = time.monotonic()
    timings: Dict[str, float] = {}

    def build(suite: str) -> str:
        t0 = time.monotonic()
        tag = ensure_image(suite, progress=lambda line: print(line, flush=True),
                           rebuild=args.rebuild)
        timings[suite] = time.monotonic() - t0
        return tag

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = {suite: pool.submit(build, suite) for suite in suites}
    failed = False
    for suite, future in futures.items():
        exc = future.exception()
        if exc is None:
            print(f"{suite}: {future.result()} ({timings[suite]:.1f}s)")
        else:
            failed = True
            print(f"{suite}: FAILED: {exc}", file=sys.stderr)
    print(f"total {time.monotonic() - started:.1f}s")
    return 1 if failed else 0


def _cmd_list(_args: argparse.Namespace) -> int:
    client = ensure_dockerd()
    try:
        rows = list_images(client)
    finally:
        client.close()
    built = {row["suite"] for row in rows if row["current"]}
    for row in rows:
        state = "current" if row["current"] else "stale"
        print(f"{', '.join(row['tags']) or '<untagged>':48} python3 {row['python3']:8} "
              f"{row['size_mb']:5d} MB  {row['built']}  {state}  [{row['pythons']}]")
    for suite, r in sorted(load_recipes().items()):
        if suite not in built:
            print(f"{r.tag:48} not built")
    return 0


def _cmd_prune(_args: argparse.Namespace) -> int:
    client = ensure_dockerd()
    try:
        removed = _prune(client)
    finally:
        client.close()
    for item in removed:
        print(f"removed {item}")
    print(f"removed {len(removed)} stale image tag(s) and tarball(s)")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulator images",
                                     description="Build and list the simulator's host images.")
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build the images of SUITEs (default: every suite)")
    build.add_argument("suites", nargs="*", metavar="SUITE")
    build.add_argument("--jobs", "-j", type=int, default=1,
                       help="suites built at once (default 1)")
    build.add_argument("--rebuild", action="store_true",
                       help="build again even if the image and cached tree exist")
    build.set_defaults(func=_cmd_build)
    sub.add_parser("list", help="show built images and suites not built").set_defaults(
        func=_cmd_list)
    sub.add_parser("prune", help="remove images and cached trees of old recipes").set_defaults(
        func=_cmd_prune)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ImageBuildError, DockerdError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
