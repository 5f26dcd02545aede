"""Complexity tiers for adaptive precision (DESIGN §3, seed §2.3): request → simple / medium / complex.

Why tiers: the router holds INT4/INT8 copies of every expert; full-precision experts live on the
expert shards, one network hop per MoE layer per decode step. So the classifier decides which
requests stay on the router (simple, medium) and which pay the hops for quality (complex).

Cost: runs on every request before tokenization. Only the prefix's last `TAIL_LINES` lines (at most
`TAIL_CHARS` characters) and the suffix's first `SUFFIX_LINES` lines (`SUFFIX_CHARS`) are read; the
rest of a 200 KB file is touched by `len()` only. One regex pass lexes that window (strings,
comments, brackets): a lexer, never a parse. Limitation: a string or comment opened above the
window is read inside-out (rare: docstrings are shorter than `TAIL_LINES`).

Decision rules for "fim" and "completion" (first match wins; it is `reasons[0]`):
  1 in_comment / in_docstring   medium   prose: a line or a few, INT8 keeps it fluent
  2 in_string                   simple   finish the literal
  3 typing a def/class header   complex  new_definition: signature + a body nobody wrote yet
    (the same header with its body already below: simple, edit_header)
  4 after a line opening a block (`:` / `{`), on it or on blank lines below it:
      a def/class with no body below          complex  new_definition
      anything else                           medium   opens_block: a body is coming
  5 after a def's docstring, no body below    complex  implement_docstring: write the spec'd code
  6 inside an open ( [ (Python also {)        simple   open_bracket: finish the arguments/literal
  7 code before the cursor on its line        simple   mid_line: finish the identifier/call/expression
  8 blank line at top level, blank line above, no code after the cursor
                                              complex  open_gap: a new top-level item, unbounded
  9 other blank line at top level             medium   new_top_level_statement
 10 blank line in a block, code continues at ≥ this indent below
                                              simple   next_statement: a one-line gap
 11 blank line at the end of a block          medium   block_continuation: the rest of the body
Chat has no cursor: complex ("chat"): answers are prose plus code of unknown length, and a person
reads them whole, so quality beats the last milliseconds; the budget rule below still applies.

Then an explicit max_tokens picks the tier by the policy's budgets (when the policy allows it):
  > medium budget (128) → complex; > simple budget (32) → at least medium; ≤ 32 → at most medium
  (three full-precision candidates for ≤ 32 tokens is hop latency without benefit).
Then a stop string "\n" (output ends at the line's end) makes fim/completion simple.
A huge prefix alone never moves the tier: its cost is prefill, which no tier changes.

Explicit request fields win, in `resolve` (see there). `classify_request` does both steps.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
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


class Tier(str, Enum):
    SIMPLE = "simple"
    MEDIUM = "medium"
    COMPLEX = "complex"


class Precision(str, Enum):
    """Where the experts run: INT4/INT8 copies on the router, FULL on the expert shards."""
    INT4 = "int4"
    INT8 = "int8"
    FULL = "full"


@dataclass(frozen=True)
class TierDefaults:
    """What one tier runs with when the request does not say."""
    precision: Precision
    max_tokens: int              # budget when the client sends none; an explicit value is not clipped
    temperature: float           # low: completions have one right answer more often than not
    n: int                       # candidates generated
    rank_by_mean_logprob: bool   # return the candidate with the best mean token logprob (length-fair)


@dataclass(frozen=True)
class TierPolicy:
    """All tiers (seed §2.3's values by default). Budgets must grow with the tier: the explicit
    max_tokens rule moves a request to the smallest tier whose budget holds it."""
    simple: TierDefaults = TierDefaults(Precision.INT4, 32, 0.1, 1, False)    # identifiers, brackets
    medium: TierDefaults = TierDefaults(Precision.INT8, 128, 0.3, 1, False)   # a body, a branch
    complex: TierDefaults = TierDefaults(Precision.FULL, 512, 0.4, 3, True)   # whole functions
    # Off for clients that send one large max_tokens on every keystroke: it then says nothing.
    explicit_max_tokens_sets_tier: bool = True

    def __post_init__(self) -> None:
        for tier in Tier:
            d = self.defaults(tier)
            name = f"{tier.value}"
            if not isinstance(d.precision, Precision):
                raise TierError(name, f"{name}.precision must be a Precision, got {d.precision!r}")
            if not 0.0 <= d.temperature <= 2.0:
                raise TierError(name, f"{name}.temperature must be in [0, 2], got {d.temperature!r}")
            if d.max_tokens < 1 or d.n < 1:
                raise TierError(name, f"{name}: max_tokens and n must be >= 1, got {d.max_tokens}, {d.n}")
            if d.rank_by_mean_logprob and d.n < 2:
                raise TierError(name, f"{name}: ranking needs n >= 2 candidates, got n={d.n}")
        if not self.simple.max_tokens < self.medium.max_tokens < self.complex.max_tokens:
            raise TierError("max_tokens", "tier budgets must grow simple < medium < complex, got "
                            f"{self.simple.max_tokens}, {self.medium.max_tokens}, {self.complex.max_tokens}")

    def defaults(self, tier: Tier) -> TierDefaults:
        return getattr(self, tier.value)


DEFAULT_POLICY = TierPolicy()


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


@dataclass(frozen=True)
class TierDecision:
    """classify's answer: the tier and its defaults, before the request's explicit fields."""
    tier: Tier
    precision: Precision         # the tier's precision
    max_tokens: int              # the request's max_tokens if sent, else the tier's budget
    max_tokens_explicit: bool    # the client sent max_tokens (it took part in picking the tier)
    temperature: float           # the tier's default
    n: int                       # candidates the tier generates
    rank_by_mean_logprob: bool   # return the best of n by mean token logprob
    reasons: tuple[str, ...]     # from REASONS; [0] = the context rule, then adjustments (metrics labels)
    features: CursorFeatures | None   # None for chat (no cursor to read)


@dataclass(frozen=True)
class ResolvedTier:
    """What the request runs with: tier defaults overlaid with what the client sent."""
    tier: Tier                   # label for metrics; a precision override does not change it
    precision: Precision
    max_tokens: int
    temperature: float
    n: int                       # choices returned to the client
    num_candidates: int          # sequences generated (SamplingParams.n); > n only when ranking
    rank_by_mean_logprob: bool   # keep the n best of num_candidates (needs the chosen tokens' logprobs)
    reasons: tuple[str, ...]


REASONS = frozenset({
    "chat", "in_comment", "in_docstring", "in_string", "new_definition", "edit_header", "opens_block",
    "implement_docstring", "open_bracket", "mid_line", "open_gap", "new_top_level_statement",
    "next_statement", "block_continuation",
    "explicit_max_tokens", "max_tokens_above_medium", "max_tokens_above_simple", "max_tokens_within_simple",
    "single_line_stop", "precision_override", "precision_unavailable", "explicit_temperature", "explicit_n", "greedy_unranked",
    "stream_unranked",
})


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


# ---- decision ------------------------------------------------------------------------------------

def _context_tier(f: CursorFeatures) -> tuple[Tier, str]:
    """Rules 1–11 of the module docstring, in order."""
    if f.in_comment or f.in_docstring:
        return Tier.MEDIUM, "in_comment" if f.in_comment else "in_docstring"
    if f.in_string:
        return Tier.SIMPLE, "in_string"
    if f.in_header:
        return (Tier.SIMPLE, "edit_header") if f.body_follows else (Tier.COMPLEX, "new_definition")
    if f.opens_block:
        if f.is_definition and not f.body_follows:
            return Tier.COMPLEX, "new_definition"
        return Tier.MEDIUM, "opens_block"
    if f.after_docstring and not f.body_follows:
        return Tier.COMPLEX, "implement_docstring"
    if f.open_brackets:
        return Tier.SIMPLE, "open_bracket"
    if f.mid_line:
        return Tier.SIMPLE, "mid_line"
    if f.indent == 0:
        if f.after_blank_line and f.suffix_next_indent is None:
            return Tier.COMPLEX, "open_gap"
        return Tier.MEDIUM, "new_top_level_statement"
    if f.suffix_next_indent is not None and f.suffix_next_indent >= f.indent:
        return Tier.SIMPLE, "next_statement"
    return Tier.MEDIUM, "block_continuation"


def _budget_tier(tier: Tier, max_tokens: int, policy: TierPolicy) -> tuple[Tier, str | None]:
    """The smallest tier whose budget holds an explicit max_tokens, within one step of the context's."""
    if max_tokens > policy.medium.max_tokens:
        return Tier.COMPLEX, (None if tier is Tier.COMPLEX else "max_tokens_above_medium")
    if max_tokens > policy.simple.max_tokens:
        return (Tier.MEDIUM, "max_tokens_above_simple") if tier is Tier.SIMPLE else (tier, None)
    return (Tier.MEDIUM, "max_tokens_within_simple") if tier is Tier.COMPLEX else (tier, None)


def classify(ctx: CompletionContext, policy: TierPolicy = DEFAULT_POLICY) -> TierDecision:
    """Pick the tier from the request alone; see the module docstring for the rules."""
    features = None
    if ctx.kind == "chat":
        tier, reasons = Tier.COMPLEX, ["chat"]
    else:
        features = extract_features(ctx)
        tier, reason = _context_tier(features)
        reasons = [reason]
    if ctx.max_tokens is not None:
        reasons.append("explicit_max_tokens")
        if policy.explicit_max_tokens_sets_tier:
            tier, moved = _budget_tier(tier, ctx.max_tokens, policy)
            if moved:
                reasons.append(moved)
    if ctx.kind != "chat" and tier is not Tier.SIMPLE and any(s in ("\n", "\r\n") for s in ctx.stop):
        tier = Tier.SIMPLE
        reasons.append("single_line_stop")
    d = policy.defaults(tier)
    return TierDecision(tier=tier, precision=d.precision,
                        max_tokens=ctx.max_tokens if ctx.max_tokens is not None else d.max_tokens,
                        max_tokens_explicit=ctx.max_tokens is not None, temperature=d.temperature, n=d.n,
                        rank_by_mean_logprob=d.rank_by_mean_logprob, reasons=tuple(reasons), features=features)


def resolve(decision: TierDecision, requested_precision: str = "auto", requested_max_tokens: int | None = None,
            requested_temperature: float | None = None, requested_n: int | None = None, *,
            stream: bool = False) -> ResolvedTier:
    """Overlay what the client sent on the tier's defaults; None = not sent (use the field set of
    the pydantic request: its defaults, temperature 1.0 and n 1, are not requests).

    - precision other than "auto" replaces the tier's precision; the tier label stays (metrics).
    - max_tokens: pass it in `CompletionContext.max_tokens`, where it also picks the tier; a value
      given here wins over the decision's but does not re-pick the tier.
    - temperature wins as sent. At 0 the candidates would be identical: ranking is dropped.
    - n: exactly n sequences, all returned, none hidden or ranked (the client chooses among them).
    - stream: ranking would hold every token until all candidates finish, which defeats
      streaming: one candidate is generated instead.
    Ranking by mean (not summed) token logprob, so a short candidate does not win by being short.
    """
    reasons = list(decision.reasons)
    precision = decision.precision
    if requested_precision != "auto":
        try:
            precision = Precision(requested_precision)
        except ValueError:
            raise TierError("precision", f"precision must be 'auto', 'int4', 'int8' or 'full', "
                                         f"got {requested_precision!r}") from None
        reasons.append("precision_override")
    max_tokens = decision.max_tokens
    if requested_max_tokens is not None:
        _check_max_tokens(requested_max_tokens)
        max_tokens = requested_max_tokens
        if "explicit_max_tokens" not in reasons:
            reasons.append("explicit_max_tokens")
    temperature = decision.temperature
    if requested_temperature is not None:
        temperature = requested_temperature
        reasons.append("explicit_temperature")
    n, candidates, rank = 1, decision.n, decision.rank_by_mean_logprob
    if requested_n is not None:
        n, candidates, rank = requested_n, requested_n, False
        reasons.append("explicit_n")
    elif rank and (temperature == 0 or stream):
        candidates, rank = 1, False
        reasons.append("greedy_unranked" if temperature == 0 else "stream_unranked")
    elif not rank:
        n = candidates               # an unranked tier returns every candidate it makes
    return ResolvedTier(tier=decision.tier, precision=precision, max_tokens=max_tokens, temperature=temperature,
                        n=n, num_candidates=candidates, rank_by_mean_logprob=rank, reasons=tuple(reasons))


def classify_request(ctx: CompletionContext, requested_precision: str = "auto",
                     requested_temperature: float | None = None, requested_n: int | None = None, *,
                     stream: bool = False, policy: TierPolicy = DEFAULT_POLICY) -> ResolvedTier:
    """classify + resolve: what the API layer calls once per request."""
    return resolve(classify(ctx, policy), requested_precision, None, requested_temperature, requested_n,
                   stream=stream)


def _check_max_tokens(value: object) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise TierError("max_tokens", f"max_tokens must be a positive integer, got {value!r}")
