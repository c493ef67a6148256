"""``router.sudo()``: a child running as another user through sudo(8).

sudo reads passwords from its controlling terminal, so the child gets a hybrid PTY (see
:mod:`mitogen.spawn`): prompts there, the bootstrap and messages on a socketpair. That also
satisfies ``Defaults requiretty``; ``targetpw`` only changes whose password is asked for.
"""

from __future__ import annotations

import optparse
import re
import shlex
from typing import Any, NoReturn

import mitogen.parent
import mitogen.spawn
from mitogen.core import StreamError
from mitogen.spawn import PasswordError

__all__ = ["PASSWORD_PROMPT", "PASSWORD_PROMPT_RE", "SUDO_OPTIONS", "Connection", "Options",
           "PasswordError", "make_sudo_parser", "option", "parse_sudo_args",
           "parse_sudo_flags"]

#: sudo's own prompt, set with -p so the common case needs no guessing. A PAM module that
#: asks something else (a translation, a PIN) is still recognised by mitogen.spawn.
PASSWORD_PROMPT = "mitogen-sudo password: "
PROMPT = PASSWORD_PROMPT

#: Our prompt as sudo prints it, and as sudo-rs does (``[sudo: PROMPT] Password:``).
PASSWORD_PROMPT_RE = re.compile(r"(?:^|\n)(?:\[sudo: )?%s(?:\] [^*\n]{0,50})?\s*$"
                                % re.escape(PASSWORD_PROMPT.strip()))

password_required_msg = "sudo asked for a password but none was given: pass password=..."
password_incorrect_msg = ("sudo refused the password: check the password= given (and the "
                          "account, which may be locked or lack the right to log in)")

#: The sudo flags `sudo_args` may hold: (our option, or None for flags that change nothing
#: here, such as Ansible's default -S and -n; 'bool' or 'str'; long flag; short flag).
SUDO_OPTIONS = [
    ("preserve_env", "bool", "--preserve-env", "-E"),
    ("set_home", "bool", "--set-home", "-H"),
    ("login", "bool", "--login", "-i"),
    ("selinux_role", "str", "--role", "-r"),
    ("selinux_type", "str", "--type", "-t"),
    (None, "bool", "--stdin", "-S"),  # prompts are answered on the terminal anyway
    (None, "bool", "--non-interactive", "-n"),
    ("username", "str", "--user", "-u"),
]


class OptionParser(optparse.OptionParser):
    """optparse for sudo command lines: a flag it does not know is a StreamError."""

    def help(self) -> None:
        self.exit()

    def error(self, msg: str) -> NoReturn:
        self.exit(msg=msg)

    def exit(self, status: int = 0, msg: str | None = None) -> NoReturn:
        raise StreamError("sudo_args: %s; supported: %s" % (
            (msg or "unsupported option").strip(),
            " ".join(short for _, _, _, short in SUDO_OPTIONS)))


def make_sudo_parser() -> OptionParser:
    parser = OptionParser(add_help_option=False)
    for name, kind, long_flag, short_flag in SUDO_OPTIONS:
        dest = name or long_flag[2:].replace("-", "_")
        if kind == "bool":
            parser.add_option(long_flag, short_flag, dest=dest, action="store_true")
        else:
            parser.add_option(long_flag, short_flag, dest=dest)
    return parser


def parse_sudo_flags(args: list) -> optparse.Values:
    """The sudo flags in `args` (an argv list), as optparse values."""
    opts, rest = make_sudo_parser().parse_args(list(args))
    if rest:
        raise StreamError("sudo_args: unsupported arguments %r" % (rest,))
    return opts


def parse_sudo_args(sudo_args: list | str | None) -> dict:
    """Map a sudo command line (as Ansible's become_flags give it) onto our options."""
    if not sudo_args:
        return {}
    argv = shlex.split(sudo_args) if isinstance(sudo_args, str) else list(sudo_args)
    values = parse_sudo_flags(argv)
    return {name: getattr(values, name) for name, _, _, _ in SUDO_OPTIONS
            if name and getattr(values, name) is not None}


def option(default: Any, *args: Any) -> Any:
    """The first of `args` that is not None, else `default`."""
    return next((arg for arg in args if arg is not None), default)


class Options(mitogen.parent.Options):
    username = "root"
    sudo_path = "sudo"
    password: str | None = None
    #: -E: keep the caller's environment.
    preserve_env = False
    #: -H: HOME of the target user.
    set_home = False
    #: -i: run the target user's login shell.
    login = False
    selinux_role: str | None = None
    selinux_type: str | None = None

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
        self.username = option("root", username, parsed.get("username"))
        self.sudo_path = sudo_path or "sudo"
        self.password = mitogen.spawn.to_secret(password)
        self.preserve_env = bool(preserve_env or parsed.get("preserve_env"))
        self.set_home = bool(set_home or parsed.get("set_home"))
        self.login = bool(login or parsed.get("login"))
        self.selinux_role = option(None, selinux_role, parsed.get("selinux_role"))
        self.selinux_type = option(None, selinux_type, parsed.get("selinux_type"))


class Connection(mitogen.spawn.PtyConnection):
    options_class = Options
    options: Options  # this method's own
    name_prefix = "sudo"
    program = "sudo"
    child_is_immediate_subprocess = False
    #: A login shell (-i) runs profile scripts, which could read the payload away.
    eager_payload = False

    def make_stream_name(self, pid: int) -> str:
        return "sudo.%s" % (self.options.username,)

    def is_prompt(self, text: str) -> bool:
        return bool(PASSWORD_PROMPT_RE.search(text)) or super().is_prompt(text)

    def missing_password_message(self) -> str:
        return password_required_msg

    def refused_message(self) -> str:
        return password_incorrect_msg

    def get_boot_command(self) -> list:
        opts = self.options
        argv = [opts.sudo_path, "-p", PASSWORD_PROMPT, "-u", opts.username]
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


def __getattr__(name: str) -> Any:
    """Names kept only for compatibility with Mitogen: see mitogen/parity.py."""
    if name.startswith("__"):
        raise AttributeError(name)
    import mitogen.parity

    return mitogen.parity.lookup(__name__, name)
