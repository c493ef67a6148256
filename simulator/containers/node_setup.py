"""Turn /etc/sim/node.json into accounts, sudo rules and sshd settings inside a simulator host.

Runs at every container start (from entrypoint.sh, with the image's own python3, 3.9 or newer),
before sshd, so one image per Debian suite serves every host of a topology: what differs between
hosts travels in node.json instead of in N images or N `docker exec` round trips. Every step is
idempotent because a restarted container runs it again over its own earlier result.

The host side imports this file too (simulator.images) and calls :func:`validate` before writing
node.json, so a bad topology fails in the runner with the offending path instead of in a
container log.

node.json (version 1)::

    {
      "version": 1,
      "root_password": "only needed for targetpw accounts",
      "host_keys": {"ed25519": "-----BEGIN OPENSSH PRIVATE KEY-----\\n..."},
      "sshd": {"MaxStartups": "200:30:400", "ClientAliveInterval": 2},
      "accounts": [
        {"name": "ops", "sudo": "nopasswd", "keys": ["ssh-ed25519 AAAA... runner"]},
        {"name": "app", "sudo": "password", "password": "app_pw"},
        {"name": "tty", "sudo": ["requiretty", "password"], "password": "tty_pw"},
        {"name": "slow", "login_delay": 2.5, "readonly_home": true, "shell": "/bin/bash"}
      ],
      "sudo_rules": [
        {"user": "ops", "runas": ["app"], "sudo": "targetpw"}
      ]
    }

An account's ``sudo`` lets that account run anything as any user; a ``sudo_rules`` entry lets
``user`` become only the ``runas`` accounts (a login user becoming a service account, as the
topology's accounts are reached). Modes: "none" (the default: no rule), "nopasswd", "password"
(the invoking user's own password), "targetpw" (the target account's password, e.g. root's
``root_password``), "requiretty" (alone: nopasswd but only from a tty; in a list with another
mode it adds the tty requirement to it). For a rule with named ``runas`` accounts, requiretty
and targetpw are set per target (``Defaults>app``), so they apply to whoever becomes that
account; for an account's own rule they are set per user (``Defaults:ops``).
"""

from __future__ import annotations

import json
import os
import pwd
import re
import subprocess
import sys
import tempfile
from typing import Any, Dict, List

__all__ = ["SUDO_MODES", "NodeConfigError", "apply", "load", "main", "sudo_rules", "sudoers_text",
           "validate"]

SUDO_MODES = ("none", "nopasswd", "password", "targetpw", "requiretty")
_AUTH_MODES = ("nopasswd", "password", "targetpw")
_NAME_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,30}$")
_SSHD_KEYWORD_RE = re.compile(r"^[A-Za-z][A-Za-z0-9]*$")
_HOST_KEY_TYPES = ("ed25519", "ecdsa", "rsa")
_TOP_KEYS = {"version", "root_password", "host_keys", "sshd", "accounts", "sudo_rules"}
_RULE_KEYS = {"user", "runas", "sudo"}
_ACCOUNT_KEYS = {"name", "uid", "password", "keys", "sudo", "shell", "groups", "login_delay",
                 "readonly_home"}
_SUDOERS_DIR = "/etc/sudoers.d"
_NODE_SSHD_CONF = "/etc/ssh/sshd_config.d/10-mitogen-sim-node.conf"
_SSH_DIR = "/etc/ssh"


class NodeConfigError(ValueError):
    """node.json is malformed; the message names the offending path, e.g. accounts[2].sudo."""


def _fail(path: str, problem: str) -> NodeConfigError:
    return NodeConfigError(f"{path}: {problem}")


def _check_keys(obj: Any, allowed: set, path: str) -> None:
    if not isinstance(obj, dict):
        raise _fail(path, f"expected an object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise _fail(path, f"unknown key(s) {unknown}; allowed: {sorted(allowed)}")


def _check_str(value: Any, path: str, pattern: re.Pattern | None = None) -> str:
    if not isinstance(value, str) or not value:
        raise _fail(path, f"expected a non-empty string, got {value!r}")
    if "\n" in value or "\0" in value:
        raise _fail(path, "must not contain newlines or NUL bytes")
    if pattern is not None and not pattern.match(value):
        raise _fail(path, f"{value!r} does not match {pattern.pattern}")
    return value


def _sudo_modes(value: Any, path: str) -> List[str]:
    modes = [value] if isinstance(value, str) else value
    if not isinstance(modes, list) or not modes:
        raise _fail(path, f"expected a mode or a list of modes from {SUDO_MODES}, got {value!r}")
    for mode in modes:
        if mode not in SUDO_MODES:
            raise _fail(path, f"unknown sudo mode {mode!r}; expected one of {SUDO_MODES}")
    if "none" in modes and len(modes) > 1:
        raise _fail(path, "'none' cannot be combined with other modes")
    if len([m for m in modes if m in _AUTH_MODES]) > 1:
        raise _fail(path, f"at most one of {_AUTH_MODES} may be given")
    return list(dict.fromkeys(modes))


def _validate_account(acct: Any, path: str) -> Dict[str, Any]:
    _check_keys(acct, _ACCOUNT_KEYS, path)
    if "name" not in acct:
        raise _fail(path, "missing 'name'")
    out: Dict[str, Any] = {"name": _check_str(acct["name"], f"{path}.name", _NAME_RE)}
    uid = acct.get("uid")
    if uid is not None and (isinstance(uid, bool) or not isinstance(uid, int)
                            or not 1000 <= uid < 60000):
        raise _fail(f"{path}.uid", f"expected an integer in [1000, 60000), got {uid!r}")
    out["uid"] = uid
    password = acct.get("password")
    out["password"] = None if password is None else _check_str(password, f"{path}.password")
    keys = acct.get("keys", [])
    if not isinstance(keys, list):
        raise _fail(f"{path}.keys", "expected a list of public key lines")
    out["keys"] = [_check_str(k, f"{path}.keys[{i}]") for i, k in enumerate(keys)]
    out["sudo"] = _sudo_modes(acct.get("sudo", "none"), f"{path}.sudo")
    out["shell"] = _check_str(acct.get("shell", "/bin/bash"), f"{path}.shell")
    if not out["shell"].startswith("/"):
        raise _fail(f"{path}.shell", f"expected an absolute path, got {out['shell']!r}")
    groups = acct.get("groups", [])
    if not isinstance(groups, list):
        raise _fail(f"{path}.groups", "expected a list of group names")
    out["groups"] = [_check_str(g, f"{path}.groups[{i}]", _NAME_RE) for i, g in enumerate(groups)]
    delay = acct.get("login_delay", 0)
    if isinstance(delay, bool) or not isinstance(delay, (int, float)) or not 0 <= delay <= 600:
        raise _fail(f"{path}.login_delay", f"expected seconds in [0, 600], got {delay!r}")
    out["login_delay"] = float(delay)
    readonly = acct.get("readonly_home", False)
    if not isinstance(readonly, bool):
        raise _fail(f"{path}.readonly_home", f"expected true or false, got {readonly!r}")
    out["readonly_home"] = readonly
    if out["name"] == "root" and (out["sudo"] != ["none"] or out["uid"] is not None):
        raise _fail(path, "the root account takes only keys, password and shell")
    return out


def validate(node: Any) -> Dict[str, Any]:
    """Check a node description and return it normalised (defaults filled in).

    Raises NodeConfigError naming the first offending path.
    """
    _check_keys(node, _TOP_KEYS, "node")
    version = node.get("version", 1)
    if version != 1:
        raise _fail("node.version", f"only version 1 is understood, got {version!r}")
    out: Dict[str, Any] = {"version": 1}
    root_pw = node.get("root_password")
    out["root_password"] = None if root_pw is None else _check_str(root_pw, "node.root_password")
    host_keys = node.get("host_keys", {})
    _check_keys(host_keys, set(_HOST_KEY_TYPES), "node.host_keys")
    for kind, text in host_keys.items():
        if not isinstance(text, str) or "PRIVATE KEY" not in text:
            raise _fail(f"node.host_keys.{kind}", "expected an OpenSSH private key text")
    out["host_keys"] = dict(host_keys)
    sshd = node.get("sshd", {})
    if not isinstance(sshd, dict):
        raise _fail("node.sshd", "expected an object of sshd_config keywords")
    for keyword, value in sshd.items():
        _check_str(keyword, f"node.sshd.{keyword}", _SSHD_KEYWORD_RE)
        if keyword.lower() == "hostkey":
            raise _fail(f"node.sshd.{keyword}", "give host keys with node.host_keys instead")
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise _fail(f"node.sshd.{keyword}", f"expected a string or integer, got {value!r}")
        _check_str(str(value), f"node.sshd.{keyword}")
    out["sshd"] = {k: str(v) for k, v in sshd.items()}
    accounts = node.get("accounts", [])
    if not isinstance(accounts, list):
        raise _fail("node.accounts", "expected a list of accounts")
    out["accounts"] = [_validate_account(a, f"node.accounts[{i}]") for i, a in enumerate(accounts)]
    names = [a["name"] for a in out["accounts"]]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise _fail("node.accounts", f"duplicate account name(s) {dupes}")
    rules = node.get("sudo_rules", [])
    if not isinstance(rules, list):
        raise _fail("node.sudo_rules", "expected a list of rules")
    out["sudo_rules"] = [_validate_rule(r, f"node.sudo_rules[{i}]", set(names) | {"root"})
                         for i, r in enumerate(rules)]
    return out


def _validate_rule(rule: Any, path: str, known: set) -> Dict[str, Any]:
    _check_keys(rule, _RULE_KEYS, path)
    missing = sorted(_RULE_KEYS - set(rule))
    if missing:
        raise _fail(path, f"missing {missing}")
    user = _check_str(rule["user"], f"{path}.user", _NAME_RE)
    if user not in known:
        raise _fail(f"{path}.user", f"{user!r} is not an account of this node ({sorted(known)})")
    runas = rule["runas"]
    if runas == "ALL":
        targets = ["ALL"]
    else:
        targets = [runas] if isinstance(runas, str) else runas
        if not isinstance(targets, list) or not targets:
            raise _fail(f"{path}.runas", f"expected 'ALL', an account or a list, got {runas!r}")
        for i, name in enumerate(targets):
            _check_str(name, f"{path}.runas[{i}]", _NAME_RE)
            if name not in known:
                raise _fail(f"{path}.runas[{i}]", f"{name!r} is not an account of this node")
    modes = _sudo_modes(rule["sudo"], f"{path}.sudo")
    if modes == ["none"]:
        raise _fail(f"{path}.sudo", "a rule needs a mode other than 'none'")
    return {"user": user, "runas": targets, "sudo": modes}


def load(path: str) -> Dict[str, Any]:
    """Read and validate node.json; a missing file means a host with no extra accounts."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except FileNotFoundError:
        return validate({})
    except ValueError as exc:
        raise NodeConfigError(f"{path}: not valid JSON: {exc}") from None
    return validate(raw)


def sudo_rules(node: Dict[str, Any]) -> Dict[str, List[Dict[str, Any]]]:
    """Every sudo rule of a validated node, grouped by the user who invokes sudo."""
    grouped: Dict[str, List[Dict[str, Any]]] = {}
    for acct in node["accounts"]:
        if acct["sudo"] != ["none"]:
            rule = {"user": acct["name"], "runas": ["ALL"], "sudo": acct["sudo"]}
            grouped.setdefault(acct["name"], []).append(rule)
    for rule in node["sudo_rules"]:
        grouped.setdefault(rule["user"], []).append(rule)
    return grouped


def sudoers_text(user: str, rules: List[Dict[str, Any]]) -> str:
    """The sudoers drop-in holding every rule that ``user`` invokes."""
    lines = [f"# written by mitogen-sim node_setup: sudo rules of {user}"]
    for rule in rules:
        modes = rule["sudo"]
        runas = ",".join(rule["runas"])
        # Defaults:user binds to who runs sudo; Defaults>target binds to whom they become.
        scope = f":{user}" if rule["runas"] == ["ALL"] else f">{runas}"
        lines.append(f"# {user} -> {runas}: {'+'.join(modes)}")
        if "requiretty" in modes:
            lines.append(f"Defaults{scope} requiretty")
        if "targetpw" in modes:
            lines.append(f"Defaults{scope} targetpw")
        tag = "" if "password" in modes or "targetpw" in modes else "NOPASSWD: "
        lines.append(f"{user} ALL=({runas}) {tag}ALL")
    return "\n".join(lines) + "\n"


def _run(argv: List[str], stdin: str | None = None) -> None:
    proc = subprocess.run(argv, input=stdin, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed ({proc.returncode}): {proc.stdout.strip()}")


def _write(path: str, text: str, mode: int, uid: int = 0, gid: int = 0) -> None:
    """Write atomically: a half-written sudoers or authorized_keys must never be read."""
    directory = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".sim-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, mode)
        os.chown(tmp, uid, gid)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _group_exists(name: str) -> bool:
    import grp
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


def _ensure_user(acct: Dict[str, Any]) -> pwd.struct_passwd:
    for group in acct["groups"]:
        if not _group_exists(group):
            _run(["groupadd", group])
    try:
        entry = pwd.getpwnam(acct["name"])
    except KeyError:
        argv = ["useradd", "--create-home", "--shell", acct["shell"]]
        if acct["uid"] is not None:
            argv += ["--uid", str(acct["uid"])]
        if acct["groups"]:
            argv += ["--groups", ",".join(acct["groups"])]
        if _group_exists(acct["name"]):
            # A system group already has the name (e.g. 'tty'): joining it would grant its
            # rights, so the user gets the shared 'users' group instead of a private one.
            argv += ["--no-user-group", "--gid", "users"]
        _run([*argv, acct["name"]])
        return pwd.getpwnam(acct["name"])
    if entry.pw_shell != acct["shell"]:
        _run(["usermod", "--shell", acct["shell"], acct["name"]])
    if acct["groups"]:
        _run(["usermod", "--append", "--groups", ",".join(acct["groups"]), acct["name"]])
    return pwd.getpwnam(acct["name"])


def _set_password(name: str, password: str | None) -> None:
    if password is None:
        # '*' allows no password, yet unlike a locked '!' it never blocks key logins.
        _run(["usermod", "--password", "*", name])
    else:
        _run(["chpasswd"], stdin=f"{name}:{password}\n")


def _install_keys(entry: pwd.struct_passwd, keys: List[str]) -> None:
    ssh_dir = os.path.join(entry.pw_dir, ".ssh")
    os.makedirs(ssh_dir, mode=0o700, exist_ok=True)
    os.chown(ssh_dir, entry.pw_uid, entry.pw_gid)
    os.chmod(ssh_dir, 0o700)
    text = "".join(k + "\n" for k in keys)
    _write(os.path.join(ssh_dir, "authorized_keys"), text, 0o600, entry.pw_uid, entry.pw_gid)


_DELAY_MARK = "# mitogen-sim login_delay"


def _set_login_delay(entry: pwd.struct_passwd, seconds: float) -> None:
    """Sleep in the startup files that both login and `ssh host cmd` shells read.

    Debian's bash reads ~/.bashrc for commands run by sshd, before its interactivity check, so
    a line at the very top delays every login, as a slow NFS home or profile script would.
    """
    for name in (".bashrc", ".profile"):
        path = os.path.join(entry.pw_dir, name)
        try:
            with open(path, encoding="utf-8") as f:
                lines = [ln for ln in f.read().splitlines(True) if _DELAY_MARK not in ln]
        except FileNotFoundError:
            if seconds <= 0:
                continue
            lines = []
        if seconds > 0:
            lines.insert(0, f"sleep {seconds:g}  {_DELAY_MARK}\n")
        _write(path, "".join(lines), 0o644, entry.pw_uid, entry.pw_gid)


def _install_sudoers(node: Dict[str, Any]) -> None:
    """Write one drop-in per invoking user, each checked by visudo, and drop stale ones."""
    # sudo skips drop-ins whose names contain '.' or end in '~'; our names have neither.
    wanted = {f"mitogen-sim-{user}": sudoers_text(user, rules)
              for user, rules in sudo_rules(node).items()}
    for name in os.listdir(_SUDOERS_DIR):
        if name.startswith("mitogen-sim-") and name not in wanted:
            os.unlink(os.path.join(_SUDOERS_DIR, name))
    for name, text in wanted.items():
        fd, tmp = tempfile.mkstemp(dir="/tmp", prefix="sudoers-check-")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            _run(["visudo", "-c", "-q", "-f", tmp])
        finally:
            os.unlink(tmp)
        _write(os.path.join(_SUDOERS_DIR, name), text, 0o440)


def _setup_account(acct: Dict[str, Any]) -> None:
    if acct["name"] == "root":
        entry = pwd.getpwnam("root")
        if entry.pw_shell != acct["shell"]:
            _run(["usermod", "--shell", acct["shell"], "root"])
    else:
        entry = _ensure_user(acct)
    _set_password(acct["name"], acct["password"])
    if acct["readonly_home"]:
        os.chown(entry.pw_dir, entry.pw_uid, entry.pw_gid)  # writable again while we edit it
        os.chmod(entry.pw_dir, 0o755)
    _install_keys(entry, acct["keys"])
    _set_login_delay(entry, acct["login_delay"])
    if acct["readonly_home"]:
        os.chown(entry.pw_dir, 0, 0)
        os.chmod(entry.pw_dir, 0o555)


def _setup_host_keys(host_keys: Dict[str, str]) -> List[str]:
    """Install given host keys, make a missing ed25519 one, return the HostKey paths.

    Keys are made here at first start rather than at image build, so each host has its own
    identity (as real hosts do, and as known_hosts checks need) while the image holds no
    private key; a restart keeps them because the container's own layer keeps the files.
    Only ed25519 is generated: it takes milliseconds even under a small CPU quota, unlike RSA.
    """
    for kind, text in host_keys.items():
        key_path = os.path.join(_SSH_DIR, f"ssh_host_{kind}_key")
        _write(key_path, text if text.endswith("\n") else text + "\n", 0o600)
        pub = subprocess.run(["ssh-keygen", "-y", "-f", key_path], capture_output=True,
                             text=True, check=False)
        if pub.returncode != 0:
            raise NodeConfigError(f"node.host_keys.{kind}: ssh-keygen rejected it: "
                                  f"{pub.stderr.strip()}")
        _write(key_path + ".pub", pub.stdout, 0o644)
    ed25519 = os.path.join(_SSH_DIR, "ssh_host_ed25519_key")
    if not os.path.exists(ed25519):
        _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "", "-f", ed25519])
    return [os.path.join(_SSH_DIR, f"ssh_host_{kind}_key") for kind in _HOST_KEY_TYPES
            if os.path.exists(os.path.join(_SSH_DIR, f"ssh_host_{kind}_key"))]


def _write_sshd_conf(host_key_paths: List[str], options: Dict[str, str]) -> None:
    # Included before 50-mitogen-sim.conf and sshd_config; sshd keeps the first value it reads.
    lines = ["# written at container start by mitogen-sim node_setup from /etc/sim/node.json"]
    lines += [f"HostKey {p}" for p in host_key_paths]
    lines += [f"{k} {v}" for k, v in options.items()]
    _write(_NODE_SSHD_CONF, "\n".join(lines) + "\n", 0o644)
    _run(["/usr/sbin/sshd", "-t"])


def apply(node: Dict[str, Any]) -> None:
    """Make this host match a validated node description."""
    if node["root_password"] is not None:
        _run(["chpasswd"], stdin=f"root:{node['root_password']}\n")
    for acct in node["accounts"]:
        _setup_account(acct)
    _install_sudoers(node)
    _write_sshd_conf(_setup_host_keys(node["host_keys"]), node["sshd"])


def main(argv: List[str]) -> int:
    path = argv[1] if len(argv) > 1 else "/etc/sim/node.json"
    try:
        node = load(path)
        apply(node)
    except (NodeConfigError, RuntimeError, OSError) as exc:
        sys.stderr.write(f"mitogen-sim: node setup failed: {exc}\n")
        return 2
    names = ", ".join(a["name"] for a in node["accounts"]) or "none"
    sys.stderr.write(f"mitogen-sim: node setup done (accounts: {names})\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
