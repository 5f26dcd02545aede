"""Logical-block spans of Python source: where a fill-in-the-middle hole may go.

An editor asks for the middle of code that is whole statements far more often than for three
random characters, and a hole cut at random characters teaches the model to stop mid-token. So a
hole here is always **one statement or one compound block, as whole lines**: a ``return`` line, an
assignment, an ``if``/``for``/``while``/``with``/``try`` block with all its branches, a decorated
``def`` with its decorators. ``ast`` finds the candidates; a candidate is kept only when no other
statement shares its first or last line (``a = 1; b = 2``, ``if x: return``) and it is not an
``elif`` (the ``If`` node of an ``elif`` is not a statement on its own). ``middle_parses`` is the
final check a caller applies to the span it draws (checking every candidate up front would parse
big blocks many times): the dedented middle must parse alone, which fails e.g. for blocks holding a
triple-quoted string whose lines start in column 0.

Lines here are split at ``\\n`` only (``split_lines``), as ``ast`` counts them: ``str.splitlines``
also breaks at form feeds, which the stdlib contains, and would shift every line number after one.
The corpus normalises ``\\r\\n``; ``prefix + middle + suffix`` is exactly the original text.
"""
from __future__ import annotations

import ast
import textwrap
import warnings
from dataclasses import dataclass

_FUNCTION_NODES = (ast.FunctionDef, ast.AsyncFunctionDef)
# Nodes that can hold statement lists; nothing below an expression can, so the walk stops there.
_BLOCK_HOLDERS = (ast.stmt, ast.excepthandler, ast.match_case, ast.Module)


@dataclass(frozen=True)
class LineSpan:
    """One candidate hole: lines [start_line, end_line) of a source text."""

    start_line: int  # 0-based index of the first line of the middle (a decorator's line for defs)
    end_line: int  # 0-based, exclusive: the suffix starts at this line
    kind: str  # the ast node's class name ("Return", "If", "For", ...): for eval breakdowns
    in_function: bool  # the statement sits inside a def body (eval FIM holes come only from these)

    @property
    def num_lines(self) -> int:
        return self.end_line - self.start_line


@dataclass(frozen=True)
class FimParts:
    """A text split around a hole; prefix + middle + suffix is the original text."""

    prefix: str  # everything before the hole; ends with "\n" or is empty
    middle: str  # the hole: whole lines, ending with "\n" unless it ends the file
    suffix: str  # everything after the hole; starts at a line start


def split_lines(text: str) -> list[str]:
    """``text`` as lines that keep their ``\\n``; split at ``\\n`` only, matching ``ast`` line numbers."""
    parts = text.split("\n")
    lines = [p + "\n" for p in parts[:-1]]
    if parts[-1]:
        lines.append(parts[-1])
    return lines


def _parse(text: str) -> ast.Module | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # SyntaxWarning for odd escapes is not our concern
            return ast.parse(text)
    except (SyntaxError, ValueError):
        return None


def _alone_on_its_lines(stmt: ast.stmt, first: int, lines_b: list[bytes]) -> bool:
    """No other code before the statement on its first line or after it on its last line.

    ``col_offset`` counts UTF-8 bytes, hence the byte lines.
    """
    head = lines_b[first][: _first_col(stmt)]
    tail = lines_b[stmt.end_lineno - 1][stmt.end_col_offset:].strip()  # type: ignore[operator]
    return not head.strip() and (not tail or tail.startswith(b"#"))


def _first_col(stmt: ast.stmt) -> int:
    decorators = getattr(stmt, "decorator_list", None)
    if decorators:
        return decorators[0].col_offset - 1  # the "@" sits one byte before the expression
    return stmt.col_offset


def _first_line(stmt: ast.stmt) -> int:
    decorators = getattr(stmt, "decorator_list", None)
    return (decorators[0].lineno if decorators else stmt.lineno) - 1


def _collect(node: ast.AST, in_function: bool, lines_b: list[bytes], out: list[LineSpan]) -> None:
    for _, value in ast.iter_fields(node):
        children = value if isinstance(value, list) else [value]
        for child in children:
            if not isinstance(child, _BLOCK_HOLDERS):
                continue
            if isinstance(child, ast.stmt):
                first = _first_line(child)
                is_elif = isinstance(child, ast.If) and lines_b[first].lstrip().startswith(b"elif")
                if not is_elif and _alone_on_its_lines(child, first, lines_b):
                    end = child.end_lineno or first + 1  # always set by ast.parse
                    out.append(LineSpan(first, end, type(child).__name__, in_function))
            _collect(child, in_function or isinstance(child, _FUNCTION_NODES), lines_b, out)


def statement_spans(text: str) -> list[LineSpan]:
    """Every statement or block of ``text`` that can be a hole, in source order; [] if it won't parse."""
    tree = _parse(text)
    if tree is None:
        return []
    lines_b = [line.encode("utf-8") for line in split_lines(text)]
    out: list[LineSpan] = []
    _collect(tree, False, lines_b, out)
    return sorted(out, key=lambda s: (s.start_line, -s.end_line))


def split_at_span(text: str, span: LineSpan) -> FimParts:
    """Cut ``text`` into prefix / middle / suffix at the span's line boundaries."""
    lines = split_lines(text)
    if not 0 <= span.start_line < span.end_line <= len(lines):
        raise ValueError(f"span {span} does not fit a text of {len(lines)} lines")
    return FimParts(
        prefix="".join(lines[: span.start_line]),
        middle="".join(lines[span.start_line: span.end_line]),
        suffix="".join(lines[span.end_line:]),
    )


def middle_parses(middle: str) -> bool:
    """The middle, dedented, is valid Python on its own: a complete statement or block."""
    return bool(middle.strip()) and _parse(textwrap.dedent(middle)) is not None
