"""mitogen.minify: smaller source, same program, same line numbers.

Every check compares the minified source with the original through the parser: the syntax
tree must be the original one minus its docstrings, and every node must start on the line it
started on before. Real stdlib modules give volume; hand-made snippets give the corner cases.
"""

from __future__ import annotations

import ast
import io
import os
import random
import sys
import sysconfig
import tokenize
from typing import Dict, List

import pytest

import mitogen.minify
from mitogen.minify import drop_module_all, minimize_source, shorten_locals, squeeze_spaces

STDLIB = sysconfig.get_paths()["stdlib"]
STDLIB_MODULES = [
    "typing.py", "argparse.py", "asyncio/base_events.py", "email/message.py",
    "json/decoder.py", "dataclasses.py", "inspect.py", "logging/__init__.py",
    "subprocess.py", "threading.py", "enum.py", "tokenize.py", "textwrap.py", "ast.py",
    "pickle.py", "socket.py", "unittest/case.py", "http/client.py", "shutil.py", "tarfile.py",
    "functools.py", "collections/__init__.py", "string.py", "difflib.py",
]
DOCSTRING_OWNERS = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
FSTRING_STARTS = {getattr(tokenize, name, -1) for name in ("FSTRING_START", "TSTRING_START")}
FSTRING_ENDS = {getattr(tokenize, name, -1) for name in ("FSTRING_END", "TSTRING_END")}


def read_stdlib(relative: str) -> str:
    with tokenize.open(os.path.join(STDLIB, relative)) as f:
        return f.read()


def without_docstrings(tree: ast.Module) -> ast.Module:
    """The tree we expect back: docstrings gone, a lone docstring turned into `pass`.

    Bare strings right after a docstring go too: left alone, one would become the docstring.
    """
    for node in ast.walk(tree):
        if not isinstance(node, DOCSTRING_OWNERS) or ast.get_docstring(node, clean=False) is None:
            continue
        first_lineno = node.body[0].lineno
        while node.body and ast.get_docstring(node, clean=False) is not None:
            node.body.pop(0)
        if not node.body and not isinstance(node, ast.Module):
            node.body.append(ast.Pass(lineno=first_lineno))
    return tree


def line_numbers(tree: ast.AST) -> List[int]:
    return [node.lineno for node in ast.walk(tree) if hasattr(node, "lineno")]


def assert_same_program(original: str, minified: str) -> None:
    """Check minified against original: same tree minus docstrings, same lines, no comments."""
    expected = without_docstrings(ast.parse(original))
    actual = ast.parse(minified)
    assert ast.dump(actual) == ast.dump(expected)
    assert line_numbers(actual) == line_numbers(expected)
    compile(minified, "<minified>", "exec")
    normalized = original.replace("\r\n", "\n").replace("\r", "\n")
    assert minified.count("\n") == normalized.count("\n")
    for node in ast.walk(actual):
        if isinstance(node, DOCSTRING_OWNERS):
            assert ast.get_docstring(node) is None
    assert_no_comments_or_trailing_blanks(minified)
    assert minimize_source(minified) == minified  # nothing left to remove


def assert_no_comments_or_trailing_blanks(minified: str) -> None:
    """Tokenize the result: no COMMENT token, no line ending in blanks outside a string."""
    lines_in_strings = set()
    fstring_depth = 0  # 3.12+ tokenizes f-strings; comments inside their fields are kept
    for token in tokenize.generate_tokens(io.StringIO(minified).readline):
        if token.type in FSTRING_STARTS:
            fstring_depth += 1
            fstring_start = token.start[0]
        elif token.type in FSTRING_ENDS:
            fstring_depth -= 1
            lines_in_strings.update(range(fstring_start, token.end[0]))
        elif token.type == tokenize.STRING:
            lines_in_strings.update(range(token.start[0], token.end[0]))
        assert token.type != tokenize.COMMENT or fstring_depth, token
    for lineno, line in enumerate(minified.split("\n"), 1):
        if lineno not in lines_in_strings:
            assert line == line.rstrip(" \t\f"), (lineno, line)


@pytest.mark.parametrize("relative", STDLIB_MODULES)
def test_stdlib_module_keeps_program_and_lines(relative: str) -> None:
    original = read_stdlib(relative)
    minified = minimize_source(original)
    assert_same_program(original, minified)
    assert len(minified) < 0.9 * len(original)


# Each snippet is valid on Python 3.9; `expected` pins the exact output where it matters.
SNIPPETS: Dict[str, tuple] = {
    "hash in string": ('x = "#not a comment"  # real\n', 'x = "#not a comment"\n'),
    "hash in every string kind": (
        "a = '#'; b = \"#\"; c = '''#\n#'''; d = r'\\'#'; e = b'#' # c\n"
        "f = \"it's # \\\" # still\"\n",
        None,
    ),
    "only docstring": ('def f():\n    """only"""\n', "def f():\n pass\n"),
    "only docstring, multi-line": (
        'def f():\n    """a\n\n    b\n    """\n\nx = 1\n',
        "def f():\n pass\n\n\n\n\nx = 1\n",
    ),
    "one-line def": ('def f(): "doc"\n', "def f(): pass\n"),
    "one-line class with semicolon": ('class A: "doc";\n', "class A: pass\n"),
    "docstring then code after ;": ('def f(): "doc"; return 1\n', "def f(): return 1\n"),
    "multi-line docstring then code after ;": (
        'def f():\n    """a\n    b"""; return 1\n    return 2\n',
        "def f():\n\n return 1\n return 2\n",
    ),
    "multi-line docstring on the def line then code": (
        'if 1:\n\tdef f(): """a\n    b"""; return 1\n', "if 1:\n def f():\n  return 1\n",
    ),
    "continuation before ;": (
        'def f():\n    "doc" \\\n    ; x = 1\n    y = 2\n', "def f():\n\n x = 1\n y = 2\n",
    ),
    "parenthesized docstring with comment": (
        'class A:\n    (  # c\n      "a"\n      "b")\n    x = 1   \n',
        "class A:\n\n\n\n x = 1\n",
    ),
    "module docstring, shebang, coding": (
        '#!/usr/bin/env python\n# -*- coding: utf-8 -*-\n"""Mod\n\ndoc"""\n'
        "from __future__ import annotations\nx = 1  # type: int\n",
        "\n\n\n\n\nfrom __future__ import annotations\nx = 1\n",
    ),
    "non-ASCII around the docstring": (
        'def fä(): "äöü"; return "ß"  # ç\n', 'def fä(): return "ß"\n',
    ),
    "line continuation": ("x = 1 + \\\n    2  # c\n", "x = 1 + \\\n2\n"),
    "keyword glued to string": ('if"x":pass\nelif"y":pass # c\n', 'if"x":pass\nelif"y":pass\n'),
    "blank before prefixed string": ("x = 0 or b'1' or rb'2' or f'3'\n", None),
    "f-string format spec with hash": ('x = f"{255:#x}"  # hex\n', 'x = f"{255:#x}"\n'),
    "f-string escapes and nesting": (
        'x = f"\\N{LEFT CURLY BRACKET}{1}" + rf"\\{2}" + f"{{#}}" # c\n'
        "y = f\"{ {'a': 1}['a'] :>{3}}{'#'!r:{'>'}{5}}\"  # c\n",
        'x = f"\\N{LEFT CURLY BRACKET}{1}" + rf"\\{2}" + f"{{#}}"\n'
        "y = f\"{ {'a': 1}['a'] :>{3}}{'#'!r:{'>'}{5}}\"\n",
    ),
    "triple-quoted f-string": ('x = f"""{1}\n  # not a comment  \n{"#"}"""\n', None),
    "trailing blanks inside strings kept": (
        'x = """a   \nb  """  \n', 'x = """a   \nb  """\n',
    ),
    "strings right after the docstring": (
        'def f():\n    "doc"\n    """more\n    """; "and more"\n    return 1\n\n'
        'def g():\n    "a"; "b"\n',
        "def f():\n\n\n\n return 1\n\ndef g():\n pass\n",
    ),
    "multi-line docstrings joined by ;": (
        'def f():\n    """a\n    b"""; """c\n    d"""; x = 1\n    return x\n',
        "def f():\n\n\n x = 1\n return x\n",
    ),
    "not docstrings: later string, bytes, f-string": (
        'def f():\n    x = 1\n    "stays"\n\ndef g():\n    b"stays"\n\ndef h():\n    f"stays"\n',
        None,
    ),
    "nested bodies": (
        "if True:\n    class A:\n        'doc'\n        def f(self):\n            'doc'\n"
        "            try:\n                def g():\n                    'doc'\n"
        "            except Exception:\n                async def h():\n                    'doc'\n"
        "            else:\n                pass\n            finally:\n"
        "                while 0:\n                    def i(): 'doc'\n"
        "                else:\n                    with x:\n"
        "                        def j(): 'x'\n",
        None,
    ),
    "tabs and form feeds": ("if 1:\n\tx = 1\t# c\n\f\ndef f():\n\t'doc'\n\treturn x\n", None),
    "indentation shrinks, strings keep theirs": (
        'def f():\n    x = (1,\n         2)\n    s = """a\n    b"""\n    if x:\n'
        '        return s + f"""{x}\n    c"""\n',
        'def f():\n x = (1,\n2)\n s = """a\n    b"""\n if x:\n'
        '  return s + f"""{x}\n    c"""\n',
    ),
    "empty": ("", ""),
    "comment only, no newline at end": ("# just a comment", ""),
    "code without newline at end": ("x = 1  # c", "x = 1"),
    "windows line ends": ('"""doc"""\r\nx = 1  # c\r\ny = 2\r', "\nx = 1\ny = 2\n"),
    "string ending in escaped backslash": ("x = 'a\\\\'  # c\ny = \"b\\\\\"\n", None),
    "string with quotes of the other kind": ("x = '\"\"\"#'; y = \"'''#\"  # c\n", None),
}
if sys.version_info >= (3, 10):
    SNIPPETS["match statement"] = (
        "match x:\n    case 1:\n        class A:\n            'doc'\n            y = 1  # c\n"
        "    case _:\n        def f(): 'doc'\n",
        None,
    )
# Python 3.12 (PEP 701) lets f-strings reuse their quote, span lines and hold comments.
PEP701_SNIPPETS = {
    "nested same quotes": 'x = f"{d["#"]}"  # c\n',
    "nested f-strings": 'x = f"{f"{f"{1}"}"}"  # c\n',
    "comment in replacement field": 'x = f"""{1 # }"\n}"""  # c\n',
    "newline in replacement field": 'x = f"{1 +\n 2}" # c\n',
    "format spec with string": 'x = f"{1:{"#"}>5}"  # c\n',
}


@pytest.mark.parametrize("name", sorted(SNIPPETS))
def test_snippet(name: str) -> None:
    source, expected = SNIPPETS[name]
    minified = minimize_source(source)
    assert_same_program(source, minified)
    if expected is not None:
        assert minified == expected


@pytest.mark.parametrize("name", sorted(PEP701_SNIPPETS))
def test_pep701_fstring(name: str) -> None:
    source = PEP701_SNIPPETS[name]
    if sys.version_info < (3, 12):
        pytest.skip(f"this f-string syntax needs Python 3.12; running {sys.version.split()[0]}")
    minified = minimize_source(source)
    assert_same_program(source, minified)
    assert minified == source.rsplit("  # c", 1)[0].rsplit(" # c", 1)[0] + "\n"


def test_fuzz_combinations_of_snippets() -> None:
    """Nest random snippets in random bodies, with and without docstrings, and re-check."""
    rng = random.Random(20240601)
    parts = [source for source, _ in SNIPPETS.values() if source.endswith("\n")]
    docstrings = ['"doc"', "'''multi\n#line'''", '("paren"  # c\n "doc")', "r'raw'"]
    checked = 0
    for _ in range(300):
        body = "".join(rng.choice(parts) for _ in range(rng.randint(0, 3)))
        if rng.random() < 0.5:
            body = rng.choice(docstrings) + rng.choice(["\n", "; ", "  # c\n"]) + body
        if not body.strip() or body.endswith("; "):
            body += "pass\n"
        indented = "".join("    " + line if line.strip() else line
                           for line in body.splitlines(keepends=True))
        header = rng.choice(["def f():\n", "class C:\n", "async def g():\n"])
        source = rng.choice(["", '"""module"""\n']) + header + indented
        try:
            compile(source, "<fuzz>", "exec")
        except SyntaxError:  # e.g. a __future__ import moved into a body: not our subject
            continue
        checked += 1
        assert_same_program(source, minimize_source(source))
    assert checked > 150  # the filter above must not discard most cases


def test_result_is_cached_and_equal() -> None:
    source = read_stdlib("json/decoder.py")
    first = minimize_source(source)
    assert minimize_source(source) is first


def test_refuses_bytes() -> None:
    with pytest.raises(TypeError, match="not bytes"):
        minimize_source(b"x = 1\n")  # type: ignore[arg-type]


def test_invalid_source_raises_syntax_error() -> None:
    with pytest.raises(SyntaxError):
        minimize_source("def f(:\n")


# -- shorten_locals and drop_module_all (the boot payload only) --------------------------------


def same_code(a, b, path="<module>") -> int:
    """Assert two code objects do the same thing: the same bytecode, constants, global and
    attribute names, arguments and line table; only the names of locals may differ. Returns
    how many local names differ."""
    assert a.co_code == b.co_code, path
    assert a.co_names == b.co_names, path
    assert (a.co_argcount, a.co_kwonlyargcount, a.co_posonlyargcount, a.co_flags) == \
        (b.co_argcount, b.co_kwonlyargcount, b.co_posonlyargcount, b.co_flags), path
    nargs = a.co_argcount + a.co_kwonlyargcount + bool(a.co_flags & 0x04) + \
        bool(a.co_flags & 0x08)  # co_argcount counts positional-only arguments too
    # Callers may use keywords, except for a method's self or cls (renamed to one letter).
    receiver = a.co_varnames[:1] in (("self",), ("cls",)) and b.co_varnames[:1] == ("s",)
    assert a.co_varnames[receiver:nargs] == b.co_varnames[receiver:nargs], path
    assert len(a.co_varnames) == len(b.co_varnames), path
    assert len(a.co_cellvars) == len(b.co_cellvars), path
    assert len(a.co_freevars) == len(b.co_freevars), path
    assert list(a.co_lines()) == list(b.co_lines()), path
    assert len(a.co_consts) == len(b.co_consts), path
    renamed = sum(x != y for x, y in zip(a.co_varnames, b.co_varnames))
    for x, y in zip(a.co_consts, b.co_consts):
        if hasattr(x, "co_code"):
            renamed += same_code(x, y, path + "." + x.co_name)
        else:
            assert type(x) is type(y) and repr(x) == repr(y), path
    return renamed


@pytest.mark.parametrize("relative", STDLIB_MODULES)
def test_shorten_locals_changes_only_the_names_of_locals(relative: str) -> None:
    minified = minimize_source(read_stdlib(relative))
    short = shorten_locals(minified)
    assert short.count("\n") == minified.count("\n")
    same_code(compile(minified, relative, "exec"), compile(short, relative, "exec"))


def test_shorten_locals_on_the_core_renames_and_keeps_behaviour() -> None:
    import mitogen.core

    with open(mitogen.core.__file__) as f:
        minified = drop_module_all(minimize_source(f.read()))
    short = shorten_locals(minified)
    renamed = same_code(compile(minified, "core", "exec"), compile(short, "core", "exec"))
    assert renamed > 100
    assert len(short) < 0.97 * len(minified)


@pytest.mark.parametrize("source", [
    "def f(a, *b, c=1, **d):\n    total = a\n    for item in b:\n        total += item\n"
    "    return g(total=total, c=c, **d)\n",
    "def f(x):\n    value = x\n    return lambda value=value: value + 1\n",
    "def f(x):\n    value = x\n    return [value for value in range(value)]\n",
    "def f(x):\n    try:\n        pass\n    except (KeyError,\n"
    "            ValueError) as problem:\n        return problem\n",
    "def f(x):\n    name = 'é'; other = x\n    return name, other\n",
    "def f():\n    it = 1\n    class K:\n        it = 2\n    return it\n",
    "def f():\n    found = 1\n    return locals()\n",
    "def f():\n    global seen\n    seen = 1\n",
])
def test_shorten_locals_corner_cases(source: str) -> None:
    short = shorten_locals(source)
    same_code(compile(source, "s", "exec"), compile(short, "s", "exec"))
    namespace: dict = {"g": lambda **kw: kw}
    exec(short, namespace)
    if "locals()" in source or "class K" in source or "global" in source:
        assert short == source


def test_drop_module_all_keeps_lines() -> None:
    source = 'import os\n__all__ = [\n    "a",\n    "b",\n]\nx = 1\n'
    assert drop_module_all(source) == "import os\n\n\n\n\nx = 1\n"


@pytest.mark.parametrize("relative", STDLIB_MODULES)
def test_squeeze_spaces_keeps_program_and_lines(relative: str) -> None:
    minified = minimize_source(read_stdlib(relative))
    squeezed = squeeze_spaces(minified)
    assert len(squeezed) < 0.99 * len(minified)  # squeezed, not handed back unchanged
    assert squeezed.count("\n") == minified.count("\n")
    assert ast.dump(ast.parse(squeezed)) == ast.dump(ast.parse(minified))
    assert line_numbers(ast.parse(squeezed)) == line_numbers(ast.parse(minified))
    same_code(compile(minified, relative, "exec"), compile(squeezed, relative, "exec"))
    assert squeeze_spaces(squeezed) == squeezed


@pytest.mark.parametrize("source,expected", [
    ("x = not y  or  z\n", "x=not y or z\n"),
    ("if a and \\\n        b:\n    pass\n", "if a and\\\nb:\n    pass\n"),
    ("f(1 .real, 1.0j, x [0] , '' 'a', b'' if c else r'')\n",
     "f(1 .real,1.0j,x[0],'' 'a',b'' if c else r'')\n"),
    ("d = {\n    'k' : 1,\n}\n\n\n", "d={\n'k':1,\n}\n\n\n"),
])
def test_squeeze_spaces_keeps_the_blanks_that_separate_tokens(source: str,
                                                              expected: str) -> None:
    assert squeeze_spaces(source) == expected


@pytest.mark.parametrize("name", sorted(PEP701_SNIPPETS))
def test_squeeze_spaces_copies_fstrings_whole(name: str) -> None:
    if sys.version_info < (3, 12):
        pytest.skip(f"this f-string syntax needs Python 3.12; running {sys.version.split()[0]}")
    source = minimize_source(PEP701_SNIPPETS[name])
    squeezed = squeeze_spaces(source)
    assert squeezed == source.replace("x = ", "x=", 1)


def test_squeeze_spaces_hands_back_the_source_when_a_token_would_change(monkeypatch) -> None:
    """The token-by-token check is what makes the pass safe: with the blank rule broken on
    purpose, the source comes back as it was."""
    monkeypatch.setattr(mitogen.minify, "_would_merge", lambda prev, token: False)
    source = "x = not y\n"
    assert squeeze_spaces(source) == source


def test_boot_core_is_squeezed_and_the_same_code() -> None:
    import mitogen.core

    with open(mitogen.core.__file__) as f:
        original = f.read()
    boot = mitogen.minify.for_boot(original)
    unsqueezed = shorten_locals(drop_module_all(minimize_source(original)))
    assert len(boot) < 0.97 * len(unsqueezed)
    same_code(compile(unsqueezed, "core", "exec"), compile(boot, "core", "exec"))


@pytest.mark.parametrize("source,renamed", [
    ("class C:\n    def m(self, x):\n        return self.y + x\n", True),
    ("class C:\n    @classmethod\n    def m(cls, x):\n        return cls.y + x\n", True),
    ("class C:\n    def m(self, x):\n        return lambda: self.y + x\n", False),  # a cell
    ("class C:\n    def m(self, x):\n        s = 1\n        return self.y + s + x\n", False),
    ("def f(self, x):\n    return self.y + x\n", False),  # not a method: a keyword may name it
])
def test_shorten_locals_renames_a_methods_receiver_to_one_name(source: str,
                                                               renamed: bool) -> None:
    short = shorten_locals(source)
    assert ("(s," in short) is renamed, short
    namespace: dict = {}
    exec(short, namespace)
    holder = namespace.get("C")
    if holder is not None:
        holder.y = 40
        result = holder.m(2) if "classmethod" in source else holder().m(2)
        assert (result() if callable(result) else result) in (42, 43)
