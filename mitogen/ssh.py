"""``router.ssh()``: a child on another machine, through the system's OpenSSH client.

Without a password to type and without a host key question to answer, ssh runs in batch mode
with no PTY at all (PTYs are a limited resource: a master with hundreds of connections must
not need one each). Otherwise it gets a hybrid PTY from :mod:`mitogen.spawn`, on which the
password prompt and the "continue connecting?" question are answered.
"""

from __future__ import annotations

import re
import shlex
from typing import Any

import mitogen.parent
import mitogen.spawn
from mitogen.spawn import HostKeyError, PasswordError

__all__ = ["Connection", "HostKeyError", "Options", "PasswordError"]

CHECK_HOST_KEYS = ("enforce", "accept", "ignore")

#: ssh asking whether to trust an unknown host key (only with check_host_keys='accept').
HOSTKEY_REQ_PATTERN = re.compile(r"continue connecting.*\?\s*$", re.IGNORECASE)
#: ssh refusing a host key that changed since it was recorded.
HOSTKEY_CHANGED_PATTERN = re.compile(r"REMOTE HOST IDENTIFICATION HAS CHANGED|"
                                     r"host key .* has changed", re.IGNORECASE)
#: ssh refusing an unknown host key.
HOSTKEY_FAIL_PATTERN = re.compile(r"Host key verification failed|No .* host key is known",
                                  re.IGNORECASE)
#: The server refusing every credential offered.
PERMDENIED_PATTERN = re.compile(r"Permission denied \(|Too many authentication failures",
                                re.IGNORECASE)
#: A line of ssh's own -v output.
DEBUG_PATTERN = re.compile(r"^debug[123]:")
#: A password prompt (as recognised for every login method: mitogen.spawn).
PASSWORD_PROMPT_PATTERN = mitogen.spawn.PASSWORD_PROMPT_PATTERN

password_required_msg = "ssh asked for a password but none was given: pass password=..."
password_incorrect_msg = "ssh refused the password: check the password= given"
auth_incorrect_msg = ("the server refused every credential ssh offered: pass password=..., "
                      "or identity_file=... for a key the account accepts")
hostkey_failed_msg = ("the host key of %s is not in known_hosts and check_host_keys=%r: "
                      "verify it and add it (ssh-keyscan), or pass check_host_keys='accept' "
                      "to trust it on first use")
hostkey_changed_msg = ("the host key of %s has CHANGED since it was recorded in known_hosts: "
                       "this may be an attack, or the host was reinstalled. Verify the new "
                       "key, then remove the old one with 'ssh-keygen -R %s'")
hostkey_config_msg = ("ssh asked whether to trust an unknown host key although "
                      "check_host_keys=%r: ssh_args= probably sets StrictHostKeyChecking; "
                      "remove it, or use check_host_keys='accept'")


class Options(mitogen.parent.Options):
    hostname: str | None = None
    username: str | None = None
    ssh_path = "ssh"
    #: None: ssh's default (its config, or 22).
    port: int | None = None
    password: str | None = None
    identity_file: str | None = None
    #: Arguments for ssh itself, before ours: the caller's settings win (OpenSSH keeps the
    #: first value it sees for an option).
    ssh_args: list | None = None
    #: 1-3: ssh's -v, -vv or -vvv, its output logged.
    ssh_debug_level = 0
    python_path = "python"
    check_host_keys_msg = "check_host_keys=%r: must be one of %s"

    def __init__(
        self,
        hostname: str,
        username: str | None = None,
        ssh_path: str | None = None,
        port: int | None = None,
        check_host_keys: str = "enforce",
        password: str | None = None,
        identity_file: str | None = None,
        compression: bool = True,
        ssh_args: list | None = None,
        keepalive_enabled: bool = True,
        keepalive_count: int = 3,
        keepalive_interval: int = 15,
        identities_only: bool = True,
        ssh_debug_level: int | None = None,
        python_path: str | list | None = None,
        **kwargs: Any,
    ) -> None:
        # The target is another machine: the master's own interpreter path means nothing
        # there, so the default is the "python" on the remote PATH, as Mitogen's.
        super().__init__(python_path=python_path or "python", **kwargs)
        if check_host_keys not in CHECK_HOST_KEYS:
            raise ValueError(self.check_host_keys_msg
                             % (check_host_keys, ", ".join(CHECK_HOST_KEYS)))
        if not isinstance(hostname, str) or not hostname or hostname.startswith("-"):
            raise ValueError("hostname=%r: must be a host name or address (not empty, not "
                             "starting with '-')" % (hostname,))
        if ssh_debug_level is not None and ssh_debug_level not in (0, 1, 2, 3):
            raise ValueError("ssh_debug_level=%r: must be 0..3" % (ssh_debug_level,))
        if isinstance(ssh_args, str):
            raise TypeError("ssh_args must be a list of arguments, not a string")
        self.hostname = hostname
        self.username = username
        self.ssh_path = ssh_path or "ssh"
        self.port = None if port is None else int(port)
        self.check_host_keys = check_host_keys
        self.password = mitogen.spawn.to_secret(password)
        self.identity_file = identity_file
        self.identities_only = identities_only
        self.compression = compression
        self.ssh_args = list(ssh_args or ())
        self.keepalive_enabled = keepalive_enabled
        self.keepalive_count = keepalive_count
        self.keepalive_interval = keepalive_interval
        self.ssh_debug_level = ssh_debug_level or 0


class Connection(mitogen.spawn.PtyConnection):
    options_class = Options
    options: Options  # this method's own
    name_prefix = "ssh"
    program = "ssh"
    child_is_immediate_subprocess = False
    #: The remote shell may run profile scripts, which could read the payload away.
    eager_payload = False
    sends_bytecode = False  # over a network: 16 KiB of source beats 58 KiB of bytecode
    #: Boot-command words passed to the remote shell unquoted.
    SHLEX_IGNORE = ["&&"]

    def wants_pty(self) -> bool:
        return self.options.password is not None or self.options.check_host_keys == "accept"

    def make_stream_name(self, pid: int) -> str:
        return "ssh.%s:%d" % (self.options.hostname, self.options.port or 22)

    def _host_key_options(self) -> list:
        mode = self.options.check_host_keys
        if mode == "ignore":
            return ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                    "-o", "GlobalKnownHostsFile=/dev/null"]
        return ["-o", "StrictHostKeyChecking=%s" % ("ask" if mode == "accept" else "yes")]

    def _auth_options(self) -> list:
        opts = self.options
        argv = []
        if opts.identity_file:
            argv += ["-i", opts.identity_file]
            if opts.identities_only:
                argv += ["-o", "IdentitiesOnly=yes"]
        if opts.password is not None:
            argv += ["-o", "NumberOfPasswordPrompts=1"]
            if not opts.identity_file:
                argv += ["-o", "PreferredAuthentications=password,keyboard-interactive"]
        if not self.wants_pty():
            argv += ["-o", "BatchMode=yes"]
        return argv

    def get_ssh_argv(self) -> list:
        """ssh's own arguments, up to the host name. `ssh_args` come first: OpenSSH keeps
        the first value it sees for an option, so the caller's choices win over these
        defaults."""
        opts = self.options
        argv = [opts.ssh_path, *(opts.ssh_args or ())]
        if opts.ssh_debug_level:
            argv.append("-" + "v" * opts.ssh_debug_level)
        if opts.username:
            argv += ["-l", opts.username]
        if opts.port is not None:
            argv += ["-p", str(opts.port)]
        argv += self._auth_options()
        argv += self._host_key_options()
        argv += ["-o", "Compression=%s" % ("yes" if opts.compression else "no")]
        if opts.keepalive_enabled:
            argv += ["-o", "ServerAliveInterval=%d" % (opts.keepalive_interval or 15),
                     "-o", "ServerAliveCountMax=%d" % opts.keepalive_count]
        argv += ["-o", "ConnectTimeout=%d" % max(1, int(opts.connect_timeout))]
        return argv

    def get_boot_command(self) -> list:
        """``ssh OPTIONS HOST WORD...``, as Mitogen builds it: each word of the Python
        command line quoted for the remote shell, which gets them joined by spaces. (The
        host name cannot start with '-', so it needs no ``--`` before it.)"""
        words = [arg if arg in self.SHLEX_IGNORE else shlex.quote(arg)
                 for arg in super().get_boot_command()]
        return [*self.get_ssh_argv(), self.options.hostname, *words]

    # --- questions and failures

    def check_output(self, text: str, partial: bool) -> bool:
        if not self._done and partial and HOSTKEY_REQ_PATTERN.search(text):
            if self.options.check_host_keys != "accept":
                self._boot_failed(HostKeyError, hostkey_config_msg
                                  % (self.options.check_host_keys,))
                return True
            self.answer("yes")  # StrictHostKeyChecking=ask
            return True
        return super().check_output(text, partial)

    def check_line(self, line: str) -> None:
        exc_class, reason = self.diagnose(mitogen.parent.EofError, "", [line])
        if exc_class is not mitogen.parent.EofError:
            self._boot_failed(exc_class, reason)

    def diagnose(self, exc_class: type, reason: str, lines: list) -> tuple:
        target = "%s port %s" % (self.options.hostname, self.options.port or 22)
        text = "\n".join(lines)
        if HOSTKEY_CHANGED_PATTERN.search(text):
            return HostKeyError, hostkey_changed_msg % (target, self.options.hostname)
        if HOSTKEY_FAIL_PATTERN.search(text):
            return HostKeyError, hostkey_failed_msg % (target, self.options.check_host_keys)
        if PERMDENIED_PATTERN.search(text):
            if self.options.password is not None:
                return PasswordError, self.refused_message()
            return PasswordError, "%s: %s" % (target, auth_incorrect_msg)
        return super().diagnose(exc_class, reason, lines)

    def refused_message(self) -> str:
        return password_incorrect_msg

    def missing_password_message(self) -> str:
        return password_required_msg


def __getattr__(name: str) -> Any:
    """Names kept only for compatibility with Mitogen: see mitogen/parity.py."""
    if name.startswith("__"):
        raise AttributeError(name)
    import mitogen.parity

    return mitogen.parity.lookup(__name__, name)
