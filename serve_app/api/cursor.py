"""What the tier classifier reads around the cursor: a bounded window, lexed once, never parsed.

Only the prefix's last `TAIL_LINES` lines (at most `TAIL_CHARS` characters) and the suffix's first
`SUFFIX_LINES` lines (`SUFFIX_CHARS`) are read; the rest of a 200 KB file is touched by `len()` only.
One regex pass lexes that window (strings, comments, brackets). Limitation: a string or comment
opened above the window is read inside-out (rare: docstrings are shorter than `TAIL_LINES`).
The decision rules that use these features are in tiers.py.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

TAIL_CHARS = 4096       # prefix characters read at most: ~40 lines of code at 100 columns
TAIL_LINES = 40         # prefix lines lexed: enough for a def header, its docstring and the open block
SUFFIX_CHARS = 1024     # suffix characters read at most
SUFFIX_LINES = 8        # suffix lines read: "is there code right after the gap, at which indent?"


class TierError(ValueError):
    """An invalid request or policy value; `.param` names the field."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class CompletionContext:
    """The request as the classifier sees it; built by the API layer from any endpoint."""
    prefix: str                  # text before the cursor (completions: the prompt; chat: unused)
    suffix: str = ""             # text after the cursor (FIM); "" = end of file or no FIM
    max_tokens: int | None = None        # what the client sent; None = not sent (the tier's budget)
    kind: Literal["fim", "completion", "chat"] = "fim"
    language: str | None = None  # a hint ("python", "ts", ...); None = look at the text
    stop: tuple[str, ...] = ()   # the request's stop strings: "\n" bounds the output to one line

    def __post_init__(self) -> None:
        if self.kind not in ("fim", "completion", "chat"):
            raise TierError("kind", f"kind must be 'fim', 'completion' or 'chat', got {self.kind!r}")
        _check_max_tokens(self.max_tokens)


@dataclass(frozen=True)
class CursorFeatures:
    """What the classifier reads around the cursor, each with the reason it matters."""
    language: str                # hint as given (lowercased), else "python" / "other" / "unknown" from the text
    syntax: str                  # lexer family: "python", "braces" or "hash" (comment and block syntax)
    prefix_chars: int            # len(prefix): recorded, not a signal (prefill cost, not decode length)
    suffix_chars: int            # len(suffix): 0 = writing at the end of the file
    prefix_lines: int            # lines lexed (≤ TAIL_LINES); fewer = a short or new file
    suffix_lines: int            # non-blank lines among the suffix lines read: code to connect to
    cursor_at_line_end: bool     # only whitespace after the cursor on its line: free to run on
    mid_line: bool               # code before the cursor on its line: a statement is being finished
    indent: int                  # the cursor line's indentation (tabs = 4); 0 = top level
    after_blank_line: bool       # the line above is blank (or this is the file's first line): a new item
    opens_block: bool            # after a line ending in `:` / `{` (on it, or blank lines below): a body is due
    block_keyword: str | None    # that header's (or the typed header's) first word: def, class, if, for...
    in_header: bool              # typing a def/class header not yet closed: signature and body to come
    is_definition: bool          # the header (or docstring's owner) defines a function/class
    body_follows: bool           # the suffix's next code line is inside that block: the body exists
    after_docstring: bool        # just below a definition's docstring (doc comment): code to write to spec
    in_docstring: bool           # inside a triple-quoted string / `/** */`: prose
    in_comment: bool             # inside a comment: prose
    in_string: bool              # inside an ordinary string literal: finish it
    open_brackets: int           # unclosed ( [ (and Python's {) before the cursor: inside a call/literal
    suffix_next_indent: int | None   # indent of the next code after the cursor; None = none in view


# ---- lexing the window ---------------------------------------------------------------------------

@dataclass(frozen=True)
class _Syntax:
    name: str
    tokens: re.Pattern           # everything the lexer must stop at; other text is skipped in C
    line_comment: str
    brace_is_bracket: bool       # Python's { is a literal; elsewhere it opens a scope
    block_end: re.Pattern        # a code line (comment cut, rstripped) that opens a block
    definition: re.Pattern       # a statement that defines a function / class


_PYTHON = _Syntax("python", re.compile(r'"""|\'\'\'|\\\n|["\'#\n()\[\]{}]'), "#", True,
                  re.compile(r":$"), re.compile(r"^\s*(?:async\s+)?(?:def|class)\b"))
# A C-family function header: type words, a name, "(" (the rest may still be typed); not a statement.
_NOT_A_TYPE = r"(?!\s*(?:\}\s*)?(?:if|else|for|while|switch|catch|do|try|return|new|throw|await|yield|case|delete)\b)"
_BRACES = _Syntax("braces", re.compile(r"/\*\*?|//|\\\n|[\"'`\n()\[\]{}]"), "//", False,
                  re.compile(r"\{$"), re.compile(
                      r"\b(?:function|fn|func|fun|def|class|struct|interface|trait|impl|enum)\b|"
                      r"^" + _NOT_A_TYPE + r"\s*(?:[\w:<>,*&\[\]]+\s+)+[*&]*\w+\s*\([^;]*$"))
_HASH = _Syntax("hash", re.compile(r"\\\n|[\"'#\n()\[\]{}]"), "#", False,
                re.compile(r"(?:\{|\bdo(?:\s*\|[^|]*\|)?|\bthen)$|^\s*(?:def|class|module)\b"),
                re.compile(r"^\s*(?:def|class|module|function)\b|^\s*\w+\s*\(\)\s*\{"))
_SYNTAX_OF = {**dict.fromkeys(("python", "py", "python3", "pyi", "ipython", "cython", "starlark"), _PYTHON),
              **dict.fromkeys(("c", "cpp", "c++", "cuda", "java", "javascript", "js", "jsx", "typescript", "ts",
                               "tsx", "go", "rust", "rs", "csharp", "c#", "kotlin", "swift", "scala", "dart",
                               "php", "zig"), _BRACES),
              **dict.fromkeys(("ruby", "rb", "shell", "sh", "bash", "zsh", "perl", "r", "julia", "elixir",
                               "powershell", "makefile", "dockerfile"), _HASH)}
# Line starts/ends that give a language family away; counted per line with str methods (no regex scan).
_PY_STARTS = ("def ", "class ", "import ", "from ", "elif ", "async def ", "@", "except", "self.")
_BRACE_STARTS = ("//", "/*", "#include", "function ", "const ", "let ", "var ", "public ", "fn ", "func ", "}")
_WORD = re.compile(r"[A-Za-z_]\w*")
_DOCSTRING_START = re.compile(r"\s*[rRuUbB]?(?:\"\"\"|\'\'\')")
_CODE, _COMMENT, _STRING, _TRIPLE, _TEMPLATE, _BLOCK, _DOC = range(7)


@dataclass
class _Scan:
    state: int                   # lexer state at the cursor
    stack: list[str]             # open brackets at the cursor
    comment_col: dict[int, int]  # line → column where its line comment starts
    in_string_at_start: set[int]     # lines that start inside a multi-line string / comment
    depth_at_start: list[int]    # open ( [ (Python: also {) at each line's start, after the last scope {
    last_doc: tuple[int, int] | None   # first and last line of the last closed docstring / doc comment


def _open_count(stack: list[str], syntax: _Syntax) -> int:
    if syntax.brace_is_bracket:
        return len(stack)
    count = 0
    for b in reversed(stack):
        if b == "{":
            break
        count += 1
    return count


_CLOSE = {q: re.compile(re.escape(q) + (r"|\n|\\[\s\S]" if len(q) == 1 and q != "`" else r"|\\[\s\S]"))
          for q in ('"', "'", "`", '"""', "'''")}
_CLOSE["/*"] = _CLOSE["/**"] = re.compile(r"\*/")
_CLOSER_OF = {")": "(", "]": "[", "}": "{"}
_OPENED = {'"': _STRING, "'": _STRING, "`": _TEMPLATE, '"""': _TRIPLE, "'''": _TRIPLE, "/*": _BLOCK, "/**": _DOC}


def _lex(text: str, syntax: _Syntax) -> _Scan:
    """Brackets, comments and strings of the window, in one pass. Code is scanned token by token;
    a comment or string is skipped to its end in one search (Python's re runs in C)."""
    stack: list[str] = []
    scan = _Scan(_CODE, stack, {}, set(), [0], None)
    depths, brace_is_bracket = scan.depth_at_start, syntax.brace_is_bracket
    line = line_start = pos = 0
    while pos is not None:
        restart, pos = pos, None
        for m in syntax.tokens.finditer(text, restart):
            tok = m.group()
            if tok in _CLOSER_OF:        # pop to the match; a closer opened above the window is ignored
                if _CLOSER_OF[tok] in stack:
                    while stack.pop() != _CLOSER_OF[tok]:
                        pass
            elif tok in "([{":
                stack.append(tok)
            elif tok == "\n" or tok == "\\\n":
                line, line_start = line + 1, m.end()
                depths.append(len(stack) if brace_is_bracket else _open_count(stack, syntax))
            elif tok == syntax.line_comment:
                scan.comment_col[line] = m.start() - line_start
                pos = text.find("\n", m.end())
                if pos < 0:
                    scan.state, pos = _COMMENT, None
                break
            else:
                line, line_start, pos = _skip_string(text, m, line, line_start, stack, syntax, scan)
                break
    return scan


def _skip_string(text: str, m: re.Match, line: int, line_start: int, stack: list[str], syntax: _Syntax,
                 scan: _Scan) -> tuple[int, int, int | None]:
    """Jump over the string or block comment opened by token m; → line, line start, resume position
    (None: still open at the cursor, `scan.state` says what is open)."""
    tok, begin = m.group(), m.end()
    close = _CLOSE[tok].search(text, begin)
    while close is not None and close.group()[0] == "\\":      # an escape, not the end
        close = _CLOSE[tok].search(text, close.end())
    end = len(text) if close is None else (close.start() if close.group() == "\n" else close.end())
    inside = text.count("\n", begin, end)
    if inside:                           # lines that start inside it are not code
        scan.in_string_at_start.update(range(line + 1, line + 1 + inside))
        scan.depth_at_start.extend([_open_count(stack, syntax)] * inside)
        line_start = text.rfind("\n", begin, end) + 1
    if close is not None and tok in ('"""', "\'\'\'", "/**"):
        scan.last_doc = (line, line + inside)
    if close is None:
        scan.state = _OPENED[tok]
        return line + inside, line_start, None
    return line + inside, line_start, end


# ---- features ------------------------------------------------------------------------------------

def _syntax_and_language(hint: str | None, lines: list[str]) -> tuple[_Syntax, str]:
    name = hint.strip().lower() if hint else None
    if name in _SYNTAX_OF:
        return _SYNTAX_OF[name], name
    py = braces = 0
    for line in lines:
        code = line.strip()
        py += code.startswith(_PY_STARTS) or code.endswith(":")
        braces += code.startswith(_BRACE_STARTS) or code.endswith(("{", ";"))
    if name:                         # a language we have no table entry for: keep its name
        return (_PYTHON if py >= braces else _BRACES), name
    if py == braces == 0:            # prose or too little text: lex as Python, the default model's language
        return _PYTHON, "unknown"
    return (_PYTHON, "python") if py >= braces else (_BRACES, "other")


def _indent(line: str) -> int:
    """Leading whitespace in columns (tab = 4); a blank line's whole length (where the cursor sits)."""
    line = line.expandtabs(4)
    return len(line) - len(line.lstrip())


def _prefix_window(prefix: str) -> tuple[str, bool]:
    """The last TAIL_LINES lines of the prefix, from a line start; and whether that is all of it.
    The prefix itself is only sliced once: everything else runs on the slice."""
    start = max(0, len(prefix) - TAIL_CHARS)
    tail = prefix[start:]
    if start > 0 and "\n" in tail:
        tail = tail[tail.index("\n") + 1:]
    cut = len(tail)
    for _ in range(TAIL_LINES):      # walk back line by line: O(window), not O(prefix)
        cut = tail.rfind("\n", 0, cut)
        if cut < 0:
            return tail, start == 0
    return tail[cut + 1:], False


def _suffix_next_indent(line_before: str, suffix_lines: list[str]) -> int | None:
    """Indent of the first code after the cursor. Code on the cursor's own line counts only when the
    cursor sits in that line's indentation (then it starts at the cursor's column)."""
    if not line_before.strip() and suffix_lines[0].strip():
        return _indent(line_before + suffix_lines[0])
    return next((_indent(s) for s in suffix_lines[1:] if s.strip()), None)


class _View:
    """The lexed window, line by line."""

    def __init__(self, window: str, lines: list[str], syntax: _Syntax) -> None:
        self.syntax, self.scan, self.lines = syntax, _lex(window, syntax), lines

    def code(self, i: int) -> str:
        """Line i without its comment; "" when it starts inside a multi-line string."""
        if i in self.scan.in_string_at_start:
            return ""
        line = self.lines[i]
        return line[:self.scan.comment_col.get(i, len(line))].rstrip()

    def statement_start(self, i: int) -> int:
        """First line of the statement line i belongs to (a signature can span lines)."""
        while i > 0 and self.scan.depth_at_start[i] > 0 and i not in self.scan.in_string_at_start:
            i -= 1
        return i

    def opens_block(self, i: int, open_after: int) -> bool:
        """Line i ends by opening a block; Python's `:` only outside brackets (`{"a":` is a dict)."""
        closed = open_after == 0 or not self.syntax.brace_is_bracket
        return closed and bool(self.syntax.block_end.search(self.code(i)))

    def last_nonblank(self, i: int) -> int:
        while i >= 0 and not self.lines[i].strip():
            i -= 1
        return i


@dataclass(frozen=True)
class _Anchor:
    """The block the cursor writes into, when it is a header's body, a header, or a docstring's code."""
    line: int | None             # the anchor statement's first line; its indent bounds the body
    opens_block: bool = False
    in_header: bool = False
    after_docstring: bool = False
    doc_indent: int | None = None   # braces doc comments: code at this indent or deeper follows them


def _find_anchor(view: _View, mid_line: bool) -> _Anchor:
    scan, cursor = view.scan, len(view.lines) - 1
    if scan.state != _CODE:
        return _Anchor(None)
    open_now = _open_count(scan.stack, view.syntax)
    above = view.last_nonblank(cursor - 1)
    if mid_line and view.opens_block(cursor, open_now):                         # `if x:|`
        return _Anchor(view.statement_start(cursor), opens_block=True)
    if not mid_line and open_now == 0 and above >= 0 and view.opens_block(above, scan.depth_at_start[above + 1]):
        return _Anchor(view.statement_start(above), opens_block=True)          # blank line(s) below it
    start = view.statement_start(cursor)
    closer = ":" if view.syntax is _PYTHON else "{"     # what ends a header once typed
    if (mid_line or start < cursor) and view.syntax.definition.search(view.code(start)) \
            and (open_now > 0 or closer not in view.code(cursor)):
        return _Anchor(start, in_header=True)                                   # `def merge(a, |`
    if mid_line or scan.last_doc is None or scan.last_doc[1] != above:
        return _Anchor(None)
    first = scan.last_doc[0]
    if view.syntax is not _PYTHON:       # a doc comment precedes the code it documents
        return _Anchor(None, after_docstring=True, doc_indent=_indent(view.lines[first]))
    owner = view.last_nonblank(first - 1)
    if owner >= 0 and view.opens_block(owner, scan.depth_at_start[owner + 1]):
        start = view.statement_start(owner)
        if view.syntax.definition.search(view.code(start)) and _DOCSTRING_START.match(view.lines[first]):
            return _Anchor(start, after_docstring=True)
    return _Anchor(None)


def extract_features(ctx: CompletionContext) -> CursorFeatures:
    window, whole_file = _prefix_window(ctx.prefix)
    lines = window.split("\n")
    syntax, language = _syntax_and_language(ctx.language, lines)
    view = _View(window, lines, syntax)
    cursor = len(lines) - 1
    line_before = lines[cursor]
    suffix_lines = ctx.suffix[:SUFFIX_CHARS].split("\n", SUFFIX_LINES + 1)[:SUFFIX_LINES + 1]
    next_indent = _suffix_next_indent(line_before, suffix_lines)
    mid_line = bool(line_before.strip())
    anchor = _find_anchor(view, mid_line)
    keyword, is_definition, body_follows = None, anchor.after_docstring, False
    if anchor.line is not None:
        words = _WORD.findall(view.code(anchor.line), 0, 80)[:2]
        keyword = words[1] if words[:1] == ["async"] and len(words) > 1 else (words[0] if words else None)
        is_definition = is_definition or bool(syntax.definition.search(view.code(anchor.line)))
        body_follows = next_indent is not None and next_indent > _indent(lines[anchor.line])
    elif anchor.doc_indent is not None:
        body_follows = next_indent is not None and next_indent >= anchor.doc_indent
    state = view.scan.state
    return CursorFeatures(
        language=language, syntax=syntax.name, prefix_chars=len(ctx.prefix), suffix_chars=len(ctx.suffix),
        prefix_lines=len(lines), suffix_lines=sum(1 for s in suffix_lines if s.strip()),
        cursor_at_line_end=not suffix_lines[0].strip(), mid_line=mid_line, indent=_indent(line_before),
        after_blank_line=(cursor == 0 and whole_file) or (cursor > 0 and not lines[cursor - 1].strip()),
        opens_block=anchor.opens_block, block_keyword=keyword, in_header=anchor.in_header,
        is_definition=is_definition, body_follows=body_follows, after_docstring=anchor.after_docstring,
        in_docstring=state in (_TRIPLE, _DOC), in_comment=state in (_COMMENT, _BLOCK),
        in_string=state in (_STRING, _TEMPLATE),
        open_brackets=_open_count(view.scan.stack, syntax) if state == _CODE else 0,
        suffix_next_indent=next_indent)


def _check_max_tokens(value: object) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise TierError("max_tokens", f"max_tokens must be a positive integer, got {value!r}")
