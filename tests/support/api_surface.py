"""Describe the public API of some modules as JSON, for the parity test.

Run as a script, by any Python 3.9 or newer, with nothing but the standard library: the same
file describes Mitogen 0.3.54 in its own virtual environment and this package in ours, each
in a process of its own (tests/mitogen/test_parity.py compares the two).

Input on stdin, a JSON object ``{module name: request}``; output on stdout, ``{module name:
description}``. A request of ``null`` asks for every public name of the module and every
public member of its classes (the reference side); otherwise it is ``{name: [member, ...]}``
and only those are looked up, with ``getattr``, so that names a module provides on demand
(through a module-level ``__getattr__``) count as well (our side).

A description of a name: ``kind`` (``class``, ``callable`` or ``data``), ``foreign`` (defined
outside the package: a re-exported builtin or stdlib object, compared by kind only),
``signature`` (a list of ``[parameter, kind, has_default]``, as a caller sees it: without
``self``), ``value`` (ints and bools only: handles, flags, sizes) and, for classes,
``members`` described the same way. Members are those defined by the package's own classes
in the MRO, not by builtin or stdlib bases, plus a few protocol methods (``__enter__``,
``__iter__``, ...) that decide how an object can be used.
"""

from __future__ import annotations

import importlib
import inspect
import json
import sys
from typing import Any, Dict, List, Optional

PACKAGE = "mitogen"

#: Special methods that change what a caller can do with an object.
PROTOCOL_METHODS = ("__enter__", "__exit__", "__iter__", "__next__", "__len__", "__bool__",
                    "__call__", "__getitem__", "__contains__", "__await__", "__aiter__",
                    "__anext__")


def _is_ours(obj: Any) -> bool:
    module = getattr(obj, "__module__", None) or ""
    return module == PACKAGE or module.startswith(PACKAGE + ".")


def _parameters(func: Any, drop_first: bool = False) -> Optional[List[list]]:
    try:
        params = list(inspect.signature(func).parameters.values())
    except (TypeError, ValueError):
        return None
    if drop_first and params and params[0].kind in (
            inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD):
        params = params[1:]
    return [[p.name, p.kind.name, p.default is not inspect.Parameter.empty] for p in params]


def _plain_value(value: Any) -> Any:
    if type(value) in (int, bool):
        return value
    return None


def describe_member(cls: type, name: str) -> Optional[Dict[str, Any]]:
    """How `name` looks on instances of `cls`, or None when `cls` has no such member."""
    try:
        static = inspect.getattr_static(cls, name)
    except AttributeError:
        return None
    if isinstance(static, staticmethod):
        return {"kind": "callable", "signature": _parameters(static.__func__)}
    if isinstance(static, classmethod):
        return {"kind": "callable", "signature": _parameters(static.__func__, True)}
    if inspect.isfunction(static):
        return {"kind": "callable", "signature": _parameters(static, True)}
    if inspect.isclass(static):
        return {"kind": "class", "signature": None}
    if isinstance(static, property) or inspect.isdatadescriptor(static):
        return {"kind": "data", "value": None, "descriptor": True}
    if callable(static):
        return {"kind": "callable", "signature": None}
    return {"kind": "data", "value": _plain_value(static)}


def member_names(cls: type) -> List[str]:
    """The members a caller of `cls` sees, defined by the package's own classes."""
    names = set()
    for base in cls.__mro__:
        if not _is_ours(base):
            continue
        for name in vars(base):
            if not name.startswith("_") or name in PROTOCOL_METHODS:
                names.add(name)
    return sorted(names)


def describe(obj: Any, members: Optional[List[str]]) -> Dict[str, Any]:
    foreign = not _is_ours(obj) if (inspect.isclass(obj) or callable(obj)) else False
    if inspect.isclass(obj):
        desc: Dict[str, Any] = {"kind": "class", "foreign": foreign,
                                "signature": None if foreign else _parameters(obj)}
        if not foreign:
            wanted = member_names(obj) if members is None else members
            desc["members"] = {name: describe_member(obj, name) for name in wanted}
        return desc
    if callable(obj):
        return {"kind": "callable", "foreign": foreign,
                "signature": None if foreign else _parameters(obj)}
    return {"kind": "data", "foreign": False, "value": _plain_value(obj)}


def describe_module(name: str, request: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    try:
        module = importlib.import_module(name)
    except ImportError as e:
        return {"error": "%s: %s" % (type(e).__name__, e)}
    if request is None:
        wanted = {n: None for n in vars(module) if not n.startswith("_")
                  and not inspect.ismodule(getattr(module, n))}
    else:
        wanted = request
    names: Dict[str, Any] = {}
    for attr, members in sorted(wanted.items()):
        try:
            obj = getattr(module, attr)
        except AttributeError:
            names[attr] = None
            continue
        names[attr] = describe(obj, members)
    return {"names": names}


def main() -> None:
    requests = json.load(sys.stdin)
    json.dump({name: describe_module(name, request) for name, request in requests.items()},
              sys.stdout, sort_keys=True)


if __name__ == "__main__":
    main()
