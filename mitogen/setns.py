"""``router.setns()``: a child inside a container's namespaces, entered with setns(2).

No container tool runs inside the container: the tool (docker, lxc-info, lxc, machinectl)
only tells the PID of the container's first process, whose namespaces the child joins. That
needs root. Entering happens in a small fresh interpreter started for the purpose (never by
running Python between fork and exec in the possibly threaded master): it joins the IPC, UTS,
network, PID and mount namespaces, forks so that the new process really is in the PID
namespace, optionally becomes `username`, and execs the boot command inside.
"""

from __future__ import annotations

import re
import subprocess
from typing import Any

import mitogen.parent
from mitogen.core import StreamError

__all__ = ["GET_LEADER_BY_KIND", "KINDS", "Connection", "Error", "Options", "get_docker_pid",
           "get_lxc_pid", "get_lxd_pid", "get_machinectl_pid"]

KINDS = ("docker", "lxc", "lxd", "machinectl")

#: The namespaces joined, in this order (the mount namespace last: after it, the host's
#: files are gone).
NS_ORDER = ("ipc", "uts", "net", "pid", "mnt")


class Error(StreamError):
    """The container could not be found or its namespaces entered."""


#: argv: leader_pid username|'' command...; runs as its own single-threaded process. After
#: entering the mount namespace the master's stdlib is gone: everything is imported first.
ENTER = """\
import ctypes,os,sys,signal,pwd
pid,user=int(sys.argv[1]),sys.argv[2]
libc=ctypes.CDLL(None,use_errno=True)
for kind in NAMESPACES:
 fd=os.open('/proc/%d/ns/%s'%(pid,kind),os.O_RDONLY)
 if libc.setns(fd,0):sys.exit('setns(%s): %s'%(kind,os.strerror(ctypes.get_errno())))
 os.close(fd)
os.chdir('/')
child=os.fork()
if not child:
 if user:
  p=pwd.getpwnam(user)
  os.initgroups(user,p.pw_gid);os.setgid(p.pw_gid);os.setuid(p.pw_uid)
  os.environ.update(HOME=p.pw_dir,USER=user,LOGNAME=user)
  if os.path.isdir(p.pw_dir):os.chdir(p.pw_dir)
 a=sys.argv[3:]
 for d in ([''] if '/' in a[0] else os.environ.get('PATH','/usr/bin:/bin').split(':')):
  try:os.execv(os.path.join(d,a[0]),a)
  except OSError:pass
 sys.exit('setns: %s not found in the container'%a[0])
for s in (signal.SIGTERM,signal.SIGINT,signal.SIGHUP):signal.signal(s,lambda n,f:os.kill(child,n))
while 1:
 try:st=os.waitpid(child,0)[1];break
 except InterruptedError:pass
os._exit(os.waitstatus_to_exitcode(st)&255)
""".replace("NAMESPACES", repr(NS_ORDER))


class Options(mitogen.parent.Options):
    container: str | None = None
    #: How to find the container's first process: one of KINDS.
    kind: str | None = None
    username = "root"
    docker_path = "docker"
    lxc_path = "lxc"
    lxc_info_path = "lxc-info"
    machinectl_path = "machinectl"
    python_path = "python"

    def __init__(
        self,
        container: str,
        kind: str,
        username: str | None = None,
        docker_path: str | None = None,
        lxc_path: str | None = None,
        lxc_info_path: str | None = None,
        machinectl_path: str | None = None,
        python_path: str | list | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(python_path=python_path or "python", **kwargs)
        if kind not in KINDS:
            raise ValueError("setns: kind=%r must be one of %s" % (kind, ", ".join(KINDS)))
        self.container = container
        self.kind = kind
        self.username = username or "root"
        self.docker_path = docker_path or "docker"
        self.lxc_path = lxc_path or "lxc"
        self.lxc_info_path = lxc_info_path or "lxc-info"
        self.machinectl_path = machinectl_path or "machinectl"


def _ask(argv: list, pattern: str) -> int:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except OSError as e:
        raise Error("setns: cannot run %s: %s" % (argv[0], e.strerror)) from None
    except subprocess.TimeoutExpired:
        raise Error("setns: %s did not answer within 30 s" % (" ".join(argv),)) from None
    match = re.search(pattern, out.stdout, re.MULTILINE)
    if out.returncode or not match or int(match.group(1)) <= 0:
        raise Error("setns: cannot find the container's process with %s: %s"
                    % (" ".join(argv), (out.stderr or out.stdout).strip() or "not running"))
    return int(match.group(1))


def get_docker_pid(path: str, name: str) -> int:
    """The host PID of docker container `name`'s first process (`path`: docker)."""
    return _ask([path, "inspect", "--format", "{{.State.Pid}}", name], r"^(\d+)$")


def get_lxc_pid(path: str, name: str) -> int:
    """Likewise for an LXC container (`path`: lxc-info)."""
    return _ask([path, "--name", name, "--pid", "--no-humanize"], r"^(\d+)$")


def get_lxd_pid(path: str, name: str) -> int:
    """Likewise for an LXD container (`path`: lxc)."""
    return _ask([path, "info", name], r"^\s*P[Ii][Dd]:\s*(\d+)")


def get_machinectl_pid(path: str, name: str) -> int:
    """Likewise for a systemd-nspawn machine (`path`: machinectl)."""
    return _ask([path, "show", "--property=Leader", name], r"^Leader=(\d+)")


#: kind -> (the option naming the tool, the function asking it).
GET_LEADER_BY_KIND = {
    "docker": ("docker_path", get_docker_pid),
    "lxc": ("lxc_info_path", get_lxc_pid),
    "lxd": ("lxc_path", get_lxd_pid),
    "machinectl": ("machinectl_path", get_machinectl_pid),
}


def leader_pid(options: Options) -> int:
    """The host PID of the container's first process, asked of the container tool."""
    attribute, ask = GET_LEADER_BY_KIND[str(options.kind)]
    return ask(getattr(options, attribute), str(options.container))


class Connection(mitogen.parent.Connection):
    options_class = Options
    options: Options  # this method's own
    name_prefix = "setns"
    child_is_immediate_subprocess = False
    NS_ORDER = NS_ORDER

    def make_stream_name(self, pid: int) -> str:
        return "setns.%s" % (self.options.container,)

    def get_boot_command(self) -> list:
        pid = leader_pid(self.options)
        user = "" if self.options.username == "root" else self.options.username
        return [mitogen.parent.get_sys_executable(), "-S", "-c", ENTER, str(pid), user,
                *super().get_boot_command()]


def __getattr__(name: str) -> Any:
    """Names kept only for compatibility with Mitogen: see mitogen/parity.py."""
    if name.startswith("__"):
        raise AttributeError(name)
    import mitogen.parity

    return mitogen.parity.lookup(__name__, name)
