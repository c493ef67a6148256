"""Shrink Python source before it travels to another context, keeping every line where it was.

A child receives :mod:`mitogen.core` (and every module it imports from us) as source text, so
docstrings and comments cost bytes on every connection and time on the first one. They are
about half of a well-documented module. Removing them lets the source stay fully documented
while the wire payload stays small.

Line numbers are preserved exactly: a traceback raised in a child then points at the line a
developer sees in the master's copy of the file. Blocks are re-indented by one space per level
and continuation lines lose their indentation: about 4% of the compressed core, which must fit
a 16 KiB payload. For the boot payload alone, :func:`squeeze_spaces` then drops the blanks
between tokens (2% more), checking the result token by token.

How it works:

* :func:`ast.parse` (C code) finds the docstrings; only statement lists are walked, never
  expressions, so the Python-level work is proportional to the number of statements.
* One compiled regular expression finds comments and complete string literals; the Python loop
  runs once per string or comment, not once per token. Only f-strings (and 3.14 t-strings) are
  scanned by hand, because since Python 3.12 they may nest quotes of their own kind.
* Comments and trailing blanks are removed only from text outside string literals.

``tokenize`` was measured as the alternative for comments and strings: it is pure Python
before 3.12 and several times slower on every version. Only the re-indentation uses it (Python's
own tokenizer is the one sure judge of where a statement starts); the master minifies the core
once per installation and keeps the result (see ``mitogen.parent.CoreImage``).

All comments go, including a shebang, ``# type:`` comments and an encoding declaration. The
result is text; whoever ships it encodes it as UTF-8, the default source encoding, so keeping a
``# -*- coding: latin-1 -*-`` line would make the receiver decode those bytes wrongly.
"""

from __future__ import annotations

import ast
import functools
import io
import itertools
import re
import tokenize
from typing import List, NamedTuple, Optional

__all__ = ["drop_module_all", "for_boot", "minimize_source", "shorten_locals", "squeeze_spaces"]

# Complete string literals without their prefix: the end of a plain string does not depend on
# the prefix (a backslash protects the next character even in a raw string).
_STRING_BODIES = (
    r"'''[^'\\]*(?:(?:\\.|'(?!''))[^'\\]*)*'''",
    r'"""[^"\\]*(?:(?:\\.|"(?!""))[^"\\]*)*"""',
    r"'[^'\\\n]*(?:\\.[^'\\\n]*)*'",
    r'"[^"\\\n]*(?:\\.[^"\\\n]*)*"',
)
_PLAIN_STRING = re.compile("|".join(_STRING_BODIES), re.DOTALL)
# A comment, a string, or (last resort) a lone quote: a 3.12+ f-string may hold a newline or its
# own quote inside a replacement field, so the plain patterns can fail to match it there.
_TOKEN = re.compile(
    r"(?P<comment>#[^\n]*)|" + "|".join(_STRING_BODIES) + r"|['\"]", re.DOTALL
)
# Outside string literals every '#' starts a comment, so it can go without looking at context.
_COMMENT = re.compile(r"#[^\n]*")
_BLANKS = " \t\f"
# What may follow a docstring on its line: blanks, continuations, and a ';' before more code.
_SEMICOLON_AFTER = re.compile(r"(?:[ \t\f]|\\\n)*;[ \t\f]*")
_PREFIX_CHARS = "rRbBuUfFtT"
_QUOTES = ("'''", '"""', "'", '"')
_FSTRING_LITERAL = {q: re.compile(r"[\\{}]|" + q) for q in _QUOTES}
_FSTRING_FIELD = re.compile(r"[\\{}()\[\]:#'\"]")
_FSTRING_SPEC = re.compile(r"[\\{}]")
_OPENERS = "([{"
_CLOSERS = ")]}"
_BODY_FIELDS = ("body", "orelse", "finalbody", "handlers", "cases")
_DOCSTRING_OWNERS = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


class _Cut(NamedTuple):
    """A slice of the source to replace: a docstring and the ';' that may follow it."""

    start: int
    end: int
    replacement: str
    blank: bool  # nothing is left on the cut's last line, so blanks before it can go


def minimize_source(source: str) -> str:
    """Return `source` without docstrings, comments and trailing blanks, with one space of
    indentation per block, lines unchanged.

    Every remaining statement and expression starts on the same line as before, and the
    result has exactly as many lines. A body that held only a docstring gets ``pass`` on the
    docstring's first line. ``\\r\\n`` and ``\\r`` line ends become ``\\n``, as Python itself
    reads them. Raises :class:`SyntaxError` if `source` does not parse: docstrings cannot be
    told apart from other strings without a parse, and shipping broken code helps nobody.
    """
    if not isinstance(source, str):
        raise TypeError(f"minimize_source() needs the source as str, not {type(source).__name__}")
    return _minimize_cached(source)


def for_boot(source: str) -> str:
    """What the boot payload carries: :func:`minimize_source`, then, in one more parse,
    :func:`drop_module_all` and :func:`shorten_locals`, and last :func:`squeeze_spaces`."""
    minified = minimize_source(source)
    tree = ast.parse(minified)
    lines = minified.split("\n")
    _blank_module_all(tree, lines)
    _shorten(tree, lines)
    return squeeze_spaces("\n".join(lines))


def drop_module_all(source: str) -> str:
    """`source` with its top-level ``__all__`` assignment blanked out, lines unchanged.

    For the boot payload, where every byte counts: ``__all__`` only steers ``from module
    import *``, which then takes every public name instead.
    """
    lines = source.split("\n")
    _blank_module_all(ast.parse(source), lines)
    return "\n".join(lines)


def _blank_module_all(tree: ast.Module, lines: List[str]) -> None:
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            for index in range(node.lineno - 1, node.end_lineno or node.lineno):
                lines[index] = ""


@functools.lru_cache(maxsize=32)
def _minimize_cached(source: str) -> str:
    """Minify once per distinct source: the master ships the same modules to every child."""
    if "\r" in source:
        source = source.replace("\r\n", "\n").replace("\r", "\n")
    tree = ast.parse(source)
    pieces: List[str] = []
    pos = 0
    for cut in _docstring_cuts(tree, source):
        _append_code(pieces, source, pos, cut.start, final=False)
        if cut.blank:
            pieces[-1] = pieces[-1].rstrip(_BLANKS)
        pieces.append(cut.replacement)
        pos = cut.end
    _append_code(pieces, source, pos, len(source), final=True)
    return _shrink_indentation("".join(pieces))


# -- indentation --------------------------------------------------------------------------------

_MULTILINE_TOKENS = {tokenize.STRING, getattr(tokenize, "FSTRING_MIDDLE", -1),
                     getattr(tokenize, "TSTRING_MIDDLE", -1)}
_STRING_STARTS = {getattr(tokenize, "FSTRING_START", -1), getattr(tokenize, "TSTRING_START", -1)}
_STRING_ENDS = {getattr(tokenize, "FSTRING_END", -1), getattr(tokenize, "TSTRING_END", -1)}


def _shrink_indentation(source: str) -> str:
    """Indent each block by one space per level, and drop the indentation of continuation
    lines (inside brackets or after a backslash), where it means nothing.

    About 4% of the compressed core. Python's own tokenizer decides which lines start a
    statement and which lie inside a string literal (those are left exactly as they are);
    it is slow, but the master caches the result (see mitogen.parent.CoreImage).
    """
    lines = source.split("\n")
    levels: dict[int, int] = {}  # line index -> block depth, for lines that start a statement
    inside_string: set[int] = set()
    depth = 0
    statement_start = True
    open_strings: list[int] = []  # lines where open f-strings began (3.12+ tokenizes them)
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        kind, (row, _), (end_row, _) = token.type, token.start, token.end
        if kind == tokenize.INDENT:
            depth += 1
        elif kind == tokenize.DEDENT:
            depth -= 1
        elif kind == tokenize.NEWLINE:
            statement_start = True
        elif kind not in (tokenize.NL, tokenize.COMMENT, tokenize.ENDMARKER):
            if statement_start:
                levels[row - 1] = depth
                statement_start = False
            if kind in _STRING_STARTS:
                open_strings.append(row)
            elif kind in _STRING_ENDS:
                start = open_strings.pop()
                if not open_strings:  # the outermost holds the inner ones
                    inside_string.update(range(start, end_row))
            elif kind in _MULTILINE_TOKENS and end_row > row:
                inside_string.update(range(row, end_row))
    out = []
    for index, line in enumerate(lines):
        if index in inside_string:
            out.append(line)
        elif index in levels:
            out.append(" " * levels[index] + line.lstrip(_BLANKS))
        else:
            out.append(line.lstrip(_BLANKS))
    return "\n".join(out)


# -- spaces between tokens ----------------------------------------------------------------------

_WORDS = (tokenize.NAME, tokenize.NUMBER)


def squeeze_spaces(source: str) -> str:
    """`source` with no blanks between tokens but where two tokens would otherwise merge
    (``not x``, ``1 if``, two strings in a row), lines unchanged.

    For the boot payload: about 2 % of the compressed core. Statements keep their
    indentation, a continuation line loses it, and string literals (f-strings and t-strings
    whole) are copied as they are. The result is checked against the source token by token,
    and if any token differs the source is returned unchanged, so a case this function does
    not foresee costs bytes, never correctness.
    """
    lines = source.split("\n")
    starts = list(itertools.accumulate((len(line) + 1 for line in lines), initial=0))
    out: List[str] = []
    row = 1  # the output's current line
    prev: Optional[tokenize.TokenInfo] = None  # the last token of this statement, if any
    depth = 0  # brackets open
    nested = 0  # f-strings open, copied whole once the outermost ends
    opened_at = 0  # where the outermost one starts
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        kind = token.type
        if nested:
            nested += (kind in _STRING_STARTS) - (kind in _STRING_ENDS)
            if not nested:
                out.append(source[opened_at:starts[token.end[0] - 1] + token.end[1]])
                row, prev = token.end[0], token
            continue
        if kind in (tokenize.NEWLINE, tokenize.NL, tokenize.INDENT, tokenize.DEDENT,
                    tokenize.COMMENT, tokenize.ENDMARKER):
            if kind == tokenize.NEWLINE:
                prev = None
            continue
        if token.start[0] > row:
            out.append(("\\\n" if prev is not None and not depth else "\n")
                       * (token.start[0] - row))
            row = token.start[0]
            out.append(" " * token.start[1] if prev is None else "")
        elif prev is None:
            out.append(" " * token.start[1])
        elif _would_merge(prev, token):
            out.append(" ")
        if kind in _STRING_STARTS:
            nested, opened_at = 1, starts[token.start[0] - 1] + token.start[1]
            continue
        if kind == tokenize.OP:
            depth += token.string in _OPENERS
            depth -= token.string in _CLOSERS
        out.append(token.string)
        row, prev = token.end[0], token
    out.append("\n" * (len(lines) - row))
    squeezed = "".join(out)
    return squeezed if _same_tokens(source, squeezed) else source


def _would_merge(prev: tokenize.TokenInfo, token: tokenize.TokenInfo) -> bool:
    """Whether `prev` and `token` need a blank between them."""
    kind = token.type
    strings = kind == tokenize.STRING or kind in _STRING_STARTS
    if prev.type in _WORDS:
        return kind in _WORDS or strings or \
            (prev.type == tokenize.NUMBER and token.string[:1] == ".")
    if prev.type == tokenize.STRING or prev.type in _STRING_ENDS:
        return strings or kind in _WORDS
    return False


def _same_tokens(source: str, squeezed: str) -> bool:
    """Whether both read as the same tokens (kind and text, blanks aside), on the same lines."""
    def significant(text: str) -> list:
        return [(t.type, t.string, t.start[0]) for t in
                tokenize.generate_tokens(io.StringIO(text).readline)
                if t.type not in (tokenize.NL, tokenize.COMMENT)]

    try:
        return significant(source) == significant(squeezed)
    except (SyntaxError, tokenize.TokenError):
        return False


# -- docstrings ---------------------------------------------------------------------------------


def _docstring_cuts(tree: ast.Module, source: str) -> List[_Cut]:
    """Say where each docstring is and what replaces it, in source order."""
    # Line k (0-based) starts after the k lines before it and their k newlines.
    lengths_before = itertools.accumulate(map(len, source.split("\n")), initial=0)
    line_starts = [length + k for k, length in enumerate(lengths_before)]
    cuts = [_cut_for(run, source, line_starts) for run in _docstring_runs(tree)]
    cuts.sort()
    return cuts


class _Run(NamedTuple):
    """The docstring of a body, with any bare strings straight after it."""

    first: ast.stmt
    last: ast.stmt
    whole_body: bool  # nothing else is left in a body that needs a statement


def _docstring_runs(tree: ast.Module) -> List[_Run]:
    """Find every docstring, together with the bare strings that directly follow it.

    Those later strings are dead code too, and one left behind would become the new
    docstring. Only statement lists are followed: a class or function cannot be defined
    inside an expression, so skipping expressions loses nothing and saves most of the walk.
    """
    found = []
    stack: List[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, _DOCSTRING_OWNERS) and node.body and _is_docstring(node.body[0]):
            body = node.body
            count = 1
            while count < len(body) and _is_docstring(body[count]):
                count += 1
            whole_body = count == len(body) and not isinstance(node, ast.Module)
            found.append(_Run(body[0], body[count - 1], whole_body))
        for field in _BODY_FIELDS:
            children = getattr(node, field, None)
            if isinstance(children, list):
                stack.extend(children)
    return found


def _is_docstring(stmt: ast.stmt) -> bool:
    return (isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant)
            and isinstance(stmt.value.value, str))


def _cut_for(run: _Run, source: str, line_starts: List[int]) -> _Cut:
    """Plan the replacement of one docstring run so that the code around keeps its lines.

    A statement's span includes any parentheses around the string. A following ';' is
    removed with it. Code that followed on the docstring's last line stays on that line and
    is indented to stay in its block.
    """
    start = _char_offset(source, line_starts, run.first.lineno, run.first.col_offset)
    end = _char_offset(source, line_starts, run.last.end_lineno or run.last.lineno,
                       run.last.end_col_offset or 0)
    semicolon = _SEMICOLON_AFTER.match(source, end)
    if semicolon:
        end = semicolon.end()
    newlines = source.count("\n", start, end)
    if run.whole_body:
        return _Cut(start, end, "pass" + "\n" * newlines, blank=False)
    code_follows = semicolon is not None and source[end:end + 1] not in ("", "\n", "#")
    if code_follows and newlines:
        line_start = line_starts[run.first.lineno - 1]
        indent = _indent_for_moved_code(source[line_start:start])
        return _Cut(start, end, "\n" * newlines + indent, blank=True)
    return _Cut(start, end, "\n" * newlines, blank=not code_follows)


def _indent_for_moved_code(before_docstring: str) -> str:
    """Indent code that followed a multi-line docstring and now starts its own line.

    A docstring on its own line gives its block's indentation. One on a 'def ...:' line means
    that line held the whole body, so anything deeper than the 'def' is a valid block. (Joining
    lines with backslashes instead fails on 3.9: a line holding only blanks and a backslash.)
    """
    if not before_docstring.strip(_BLANKS):
        return before_docstring
    header_indent = before_docstring[:len(before_docstring) - len(before_docstring.lstrip(_BLANKS))]
    return header_indent + " "


def _char_offset(source: str, line_starts: List[int], lineno: int, col_utf8: int) -> int:
    """Turn ast's (line, UTF-8 byte column) into an index into `source`."""
    line_start = line_starts[lineno - 1]
    if source[line_start:line_start + col_utf8].isascii():
        return line_start + col_utf8
    line = source[line_start:line_starts[lineno]]
    head = line.encode("utf-8", "surrogatepass")[:col_utf8]
    return line_start + len(head.decode("utf-8", "surrogatepass"))


# -- comments and blanks ------------------------------------------------------------------------


def _append_code(pieces: List[str], source: str, start: int, stop: int, final: bool) -> None:
    """Append source[start:stop] to `pieces`, minus comments and trailing blanks.

    String literals are copied untouched: they may hold '#' and meaningful trailing blanks.
    The last piece appended is always code (possibly empty), never a string literal.
    """
    segment = pos = start
    while True:
        match = _TOKEN.search(source, pos, stop)
        if match is None:
            break
        pos = match.end()
        if match.lastgroup == "comment":
            continue
        quote_at = match.start()
        raw = _fstring_rawness(source, quote_at)
        if raw is not None:
            pos = _skip_fstring(source, quote_at, raw)
        elif pos - quote_at == 1:
            raise _unterminated(source, quote_at)
        pieces.append(_strip_code(source[segment:quote_at], final=False))
        pieces.append(source[quote_at:pos])
        segment = pos
    pieces.append(_strip_code(source[segment:stop], final))


def _strip_code(code: str, final: bool) -> str:
    """Drop comments and line-ending blanks from text that holds no string literal.

    Unless `code` ends the file, its last line continues with a string literal: blanks there
    are kept, as 'x or b"..."' must not become 'x orb"..."'. A comment cannot sit on that line,
    since it would have swallowed the string. Stripping line by line with str.rstrip is many
    times faster than a regular expression, which backtracks over every run of indentation.
    """
    if "#" in code:
        code = _COMMENT.sub("", code)
    lines = code.split("\n")
    last = lines.pop()
    stripped = [line.rstrip(_BLANKS) for line in lines]
    stripped.append(last.rstrip(_BLANKS) if final else last)
    return "\n".join(stripped)


def _unterminated(source: str, quote_at: int) -> SyntaxError:
    lineno = source.count("\n", 0, quote_at) + 1
    return SyntaxError(f"minimize_source: cannot find the end of the string on line {lineno}")


# -- f-strings ----------------------------------------------------------------------------------


def _fstring_rawness(source: str, quote_at: int) -> Optional[bool]:
    """Return None if the string at `quote_at` is not an f- or t-string, else whether it is raw.

    The prefix is the one or two letters just before the quote, unless they end a longer
    name: in 'elif"x"' the 'f' belongs to the keyword.
    """
    start = quote_at
    while start > quote_at - 2 and start > 0 and source[start - 1] in _PREFIX_CHARS:
        start -= 1
    if start > 0 and ("a" + source[start - 1]).isidentifier():
        return None
    prefix = source[start:quote_at].lower()
    if "f" not in prefix and "t" not in prefix:
        return None
    return "r" in prefix


def _quote_at(source: str, pos: int) -> str:
    quote = source[pos]
    triple = quote * 3
    return triple if source.startswith(triple, pos) else quote


def _skip_fstring(source: str, quote_at: int, raw: bool) -> int:
    """Return the index just past the f-string whose opening quote is at `quote_at`."""
    quote = _quote_at(source, quote_at)
    pos = quote_at + len(quote)
    finder = _FSTRING_LITERAL[quote]
    while True:
        match = finder.search(source, pos)
        if match is None:
            raise _unterminated(source, quote_at)
        found, pos = match.group(), match.end()
        if found == "\\":
            if not raw and source.startswith("N{", pos):
                pos = source.index("}", pos) + 1  # \N{NAME}: those braces are no field
            elif source[pos:pos + 1] not in ("{", "}"):
                pos += 1  # the escaped character, which may be the quote
        elif found == "{":
            if source.startswith("{", pos):
                pos += 1  # '{{' is a literal brace
            else:
                pos = _skip_field(source, pos)
        elif found == "}":
            if source.startswith("}", pos):
                pos += 1
        else:
            return pos


def _skip_field(source: str, pos: int) -> int:
    """Return the index just past the '}' closing the replacement field starting at `pos`.

    Inside the expression, strings (f-strings included) are skipped whole and brackets are
    counted; a ':' outside brackets starts the format spec, where '#' is a literal.
    """
    depth = 0
    while True:
        match = _FSTRING_FIELD.search(source, pos)
        if match is None:
            raise _unterminated(source, pos)
        found, pos = match.group(), match.end()
        if found in "'\"":
            pos = _skip_nested_string(source, match.start())
        elif found == "#":
            pos = source.index("\n", pos)
        elif found == "\\":
            pos += 1
        elif found in _OPENERS:
            depth += 1
        elif found in _CLOSERS:
            if depth == 0:
                return pos
            depth -= 1
        elif found == ":" and depth == 0:
            return _skip_format_spec(source, pos)


def _skip_format_spec(source: str, pos: int) -> int:
    """Return the index just past the '}' that ends a format spec, which may nest fields."""
    while True:
        match = _FSTRING_SPEC.search(source, pos)
        if match is None:
            raise _unterminated(source, pos)
        found, pos = match.group(), match.end()
        if found == "\\":
            pos += 1
        elif found == "{":
            pos = _skip_field(source, pos)
        else:
            return pos


def _skip_nested_string(source: str, quote_at: int) -> int:
    raw = _fstring_rawness(source, quote_at)
    if raw is not None:
        return _skip_fstring(source, quote_at, raw)
    match = _PLAIN_STRING.match(source, quote_at)
    if match is None:
        raise _unterminated(source, quote_at)
    return match.end()


# -- short local names (the boot payload only) ---------------------------------------------------

#: Calls that read a function's locals by name: a function making one keeps its names.
_INTROSPECTION = frozenset(["locals", "vars", "eval", "exec", "dir"])


def shorten_locals(source: str) -> str:
    """`source` with the local variables of its functions renamed to one or two letters.

    About 2% of the compressed core. Lines and columns of statements do not move (names only
    get shorter), parameters keep their names (callers may pass them by keyword) but a
    method's ``self`` or ``cls`` (2% more), and a
    function is left as it is when renaming could change what it does: one that defines a
    class, uses ``global``/``nonlocal``, an f-string or a call that reads locals by name.
    Variables of nested functions are renamed within their own function; a variable that a
    nested function, lambda or comprehension mentions keeps its name.
    """
    lines = source.split("\n")
    _shorten(ast.parse(source), lines)
    return "\n".join(lines)


def _shorten(tree: ast.Module, lines: List[str]) -> None:
    renames: dict = {}  # (row, byte column) of a Name -> (old, new)
    keep = _module_imports(tree)
    methods = {id(f) for c in ast.walk(tree) if isinstance(c, ast.ClassDef) for f in c.body}
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            renames.update(_local_renames(node, lines, keep, id(node) in methods))
    for (row, byte_col), (old, new) in sorted(renames.items(), reverse=True):
        line = lines[row - 1]
        col = len(line.encode("utf-8")[:byte_col].decode("utf-8"))  # ast counts UTF-8 bytes
        lines[row - 1] = line[:col] + new + line[col + len(old):]


_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ListComp, ast.SetComp,
           ast.DictComp, ast.GeneratorExp)


def _own_nodes(func: ast.AST) -> tuple:
    """The nodes of `func`'s own scope, and those of the scopes nested in it (functions,
    lambdas and comprehensions; default values and decorators aside, which are `func`'s)."""
    own: List[ast.AST] = []
    nested: List[ast.AST] = []
    stack = [(n, False) for n in ast.iter_child_nodes(func)]
    while stack:
        node, inside = stack.pop()
        (nested if inside else own).append(node)
        if not inside and isinstance(node, _SCOPES):
            outer: List[ast.AST] = []
            if not isinstance(node, _SCOPES[3:]):
                outer += node.args.defaults + [d for d in node.args.kw_defaults if d]
            if isinstance(node, _SCOPES[:2]):
                outer += node.decorator_list
            stack += [(n, n not in outer) for n in ast.iter_child_nodes(node)]
            continue
        stack += [(n, inside) for n in ast.iter_child_nodes(node)]
    return own, nested


def _module_imports(tree: ast.Module) -> set:
    """Names that imports at module level bind. CPython compiles ``name.method()`` with a
    different (equivalent) opcode when `name` is one of them, so locals neither take nor
    lose such names: the bytecode stays the same, which is how the tests check renaming."""
    names: set = set()
    stack: List[ast.AST] = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            stack.extend(ast.iter_child_nodes(node))
    return names


def _local_renames(func: ast.FunctionDef | ast.AsyncFunctionDef, source_lines: List[str],
                   keep: set, method: bool = False) -> dict:
    """{(row, col): (old, new)} for each Name node of `func`'s renamable locals: variables
    it binds that are not parameters and that no nested scope mentions (those would be
    closure cells, whose order in the code object follows their names). In a method, the
    first parameter too when it is ``self`` or ``cls``: nobody passes those by keyword."""
    own, nested = _own_nodes(func)
    if any(isinstance(n, (ast.ClassDef, ast.Global, ast.Nonlocal, ast.JoinedStr))
           or (isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
               and n.func.id in _INTROSPECTION) for n in own + nested):
        return {}
    args = func.args
    params = {a.arg for a in [*args.posonlyargs, *args.args, *args.kwonlyargs]}
    params.update(a.arg for a in (args.vararg, args.kwarg) if a is not None)
    stored = {n.id for n in own if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    handlers = [n for n in own if isinstance(n, ast.ExceptHandler) and n.name]
    stored.update(n.name for n in handlers if n.name)
    mentioned_inside = {n.id for n in nested if isinstance(n, ast.Name)}
    mentioned_inside.update(n.arg for n in nested if isinstance(n, ast.arg))
    used = mentioned_inside | params | {n.id for n in own if isinstance(n, ast.Name)}
    counts: dict = {}
    for n in own:
        if isinstance(n, ast.Name):
            counts[n.id] = counts.get(n.id, 0) + 1
    candidates = sorted((name for name in stored - params - mentioned_inside - keep
                         if len(name) > 2), key=lambda name: (-counts.get(name, 0), name))
    short = (s for s in _short_names() if s not in used and s not in keep)
    mapping = {name: next(short) for name in candidates}
    first = [*args.posonlyargs, *args.args][:1]
    receiver = first[0] if method and first and first[0].arg in ("self", "cls") else None
    if receiver is not None and receiver.arg not in mentioned_inside and \
            _RECEIVER not in used and _RECEIVER not in keep:
        mapping[receiver.arg] = _RECEIVER
    else:
        receiver = None
    renames = {}
    for node in own:
        if isinstance(node, ast.Name) and node.id in mapping:
            renames[(node.lineno, node.col_offset)] = (node.id, mapping[node.id])
    if receiver is not None and receiver.arg in mapping:
        renames[(receiver.lineno, receiver.col_offset)] = (receiver.arg, mapping[receiver.arg])
    for handler in handlers:
        if handler.name in mapping:
            renames[_handler_name_position(handler, source_lines)] = (
                handler.name, mapping[handler.name])
    return renames


def _handler_name_position(handler: ast.ExceptHandler, lines: List[str]) -> tuple:
    """Where the `x` of ``except E as x`` is (the tree does not say): after E, on E's
    last line, in UTF-8 bytes as ast counts columns."""
    name = handler.name or ""
    if handler.type is None or handler.type.end_lineno is None:
        raise ValueError("an `except ... as` without a type at line %d" % (handler.lineno,))
    row = handler.type.end_lineno
    line = lines[row - 1].encode("utf-8")
    match = re.compile(rb"\s*as\s+" + re.escape(name.encode()) + rb"\b").match(
        line, handler.type.end_col_offset or 0)
    if match is None:
        raise ValueError("cannot find the name of %s at line %d" % (ast.dump(handler), row))
    return row, match.end() - len(name)


#: What a method's ``self`` or ``cls`` becomes: one name in every method, which compresses
#: far better than whichever letter each method has free; never given to another local.
_RECEIVER = "s"


def _short_names():
    letters = "abcdefghijklmnopqrstuvwxyz".replace(_RECEIVER, "")
    yield from letters
    for first in letters:
        for second in letters:
            yield first + second
