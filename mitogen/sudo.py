"""``router.sudo()``: a child running as another user through sudo(8).

sudo reads passwords from its controlling terminal, so the child gets a hybrid PTY (see
:mod:`mitogen.spawn`): prompts there, the bootstrap and messages on a socketpair. That also
satisfies ``Defaults requiretty``; ``targetpw`` only changes whose password is asked for.
"""

from __future__ import annotations

import shlex
from typing import Any

import mitogen.parent
import mitogen.spawn
from mitogen.core import StreamError
from mitogen.spawn import PasswordError

__all__ = ["Connection", "Options", "PasswordError", "parse_sudo_args"]

#: sudo's own prompt, set with -p so the common case needs no guessing. A PAM module that
#: asks something else (a translation, a PIN) is still recognised by mitogen.spawn.
PROMPT = "mitogen-sudo password: "

#: sudo flags that `sudo_args` may hold: flag -> (option name, takes a value).
_FLAGS = {
    "-u": ("username", True), "--user": ("username", True),
    "-E": ("preserve_env", False), "--preserve-env": ("preserve_env", False),
    "-H": ("set_home", False), "--set-home": ("set_home", False),
    "-i": ("login", False), "--login": ("login", False),
    "-r": ("selinux_role", True), "--role": ("selinux_role", True),
    "-t": ("selinux_type", True), "--type": ("selinux_type", True),
}


def _split_flags(argv: list) -> list:
    """Expand ``-HE`` into ``-H -E`` and ``--user=x`` / ``-ux`` into flag and value."""
    out: list = []
    for arg in argv:
        if arg.startswith("--") and "=" in arg:
            out.extend(arg.split("=", 1))
        elif arg.startswith("-") and not arg.startswith("--") and len(arg) > 2:
            flag = arg[:2]
            if _FLAGS.get(flag, (None, False))[1]:
                out.extend([flag, arg[2:]])
            else:
                out.extend("-" + c for c in arg[1:])
        else:
            out.append(arg)
    return out


def parse_sudo_args(sudo_args: list | str | None) -> dict:
    """Map a sudo command line (as Ansible's become_flags give it) onto our options."""
    if not sudo_args:
        return {}
    argv = shlex.split(sudo_args) if isinstance(sudo_args, str) else list(sudo_args)
    found: dict = {}
    args = iter(_split_flags(argv))
    for arg in args:
        if arg not in _FLAGS:
            raise StreamError("sudo_args: unsupported sudo flag %r; supported: %s"
                              % (arg, " ".join(sorted(_FLAGS))))
        option, takes_value = _FLAGS[arg]
        if takes_value:
            value = next(args, None)
            if value is None:
                raise StreamError("sudo_args: %s needs a value" % (arg,))
            found[option] = value
        else:
            found[option] = True
    return found


class Options(mitogen.parent.Options):
    def __init__(
        self,
        username: str | None = None,
        sudo_path: str | None = None,
        password: str | None = None,
        preserve_env: bool | None = None,
        set_home: bool | None = None,
        sudo_args: list | str | None = None,
        login: bool | None = None,
        selinux_role: str | None = None,
        selinux_type: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        parsed = parse_sudo_args(sudo_args)
        self.username = username or parsed.get("username") or "root"
        self.sudo_path = sudo_path or "sudo"
        self.password = mitogen.spawn.to_secret(password)
        self.preserve_env = bool(preserve_env or parsed.get("preserve_env"))
        self.set_home = bool(set_home or parsed.get("set_home"))
        self.login = bool(login or parsed.get("login"))
        self.selinux_role = selinux_role or parsed.get("selinux_role")
        self.selinux_type = selinux_type or parsed.get("selinux_type")


class Connection(mitogen.spawn.PtyConnection):
    options_class = Options
    name_prefix = "sudo"
    program = "sudo"

    def make_stream_name(self, pid: int) -> str:
        return "sudo.%s" % (self.options.username,)

    def get_boot_command(self) -> list:
        opts = self.options
        argv = [opts.sudo_path, "-p", PROMPT, "-u", opts.username]
        if opts.preserve_env:
            argv.append("-E")
        if opts.set_home:
            argv.append("-H")
        if opts.login:
            argv.append("-i")
        if opts.selinux_role:
            argv += ["-r", opts.selinux_role]
        if opts.selinux_type:
            argv += ["-t", opts.selinux_type]
        return [*argv, "--", *super().get_boot_command()]
