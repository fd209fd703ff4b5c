"""Errors raised by the CEL compiler and by compiled programs.

Every compile-time problem is a :class:`CelIssue` carrying an exact 0-based
character ``offset`` into the CEL source (plus 1-based ``line``/``column``), so
callers can map it back into the file the expression came from.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import PolicyEngineError, clip_line


@dataclass(frozen=True)
class CelIssue:
    """One problem found in a CEL expression (offsets are into the CEL source)."""

    offset: int
    line: int
    column: int
    message: str
    code: str
    hint: str | None = None
    end_offset: int | None = None

    def format(self, source: str | None = None) -> str:
        text = f"{self.line}:{self.column}: [{self.code}] {self.message}"
        if source is not None:
            excerpt = caret_excerpt(source, self.offset, self.end_offset)
            if excerpt:
                text += "\n" + excerpt
        if self.hint:
            text += f"\n  hint: {self.hint}"
        return text


def line_col(source: str, offset: int) -> tuple[int, int]:
    """1-based (line, column) of a 0-based character offset."""
    offset = max(0, min(offset, len(source)))
    line = source.count("\n", 0, offset) + 1
    start = source.rfind("\n", 0, offset) + 1
    return line, offset - start + 1


def caret_excerpt(source: str, offset: int, end_offset: int | None = None) -> str:
    """The source line containing ``offset`` with a caret (and tildes) under it."""
    if not source and offset == 0:
        return "    | \n    | ^"
    line_no, col = line_col(source, offset)
    lines = source.split("\n")
    if line_no > len(lines):
        return ""
    text = lines[line_no - 1].replace("\t", " ")
    width = 1
    if end_offset is not None and end_offset > offset:
        line_end = offset + (len(text) - (col - 1))
        width = max(1, min(end_offset, line_end) - offset)
    text, col, width = clip_line(text, col, width)
    gutter = f"{line_no:>4} | "
    return f"{gutter}{text}\n{' ' * (len(gutter) - 2)}| {' ' * (col - 1)}^{'~' * (width - 1)}"


class CelError(PolicyEngineError):
    """Base class of every error raised by :mod:`policy_engine.cel` (a `PolicyEngineError`, so one `except` catches all of ours)."""


class _IssuesError(CelError):
    kind = "error"

    def __init__(self, issues: list[CelIssue], source: str = "") -> None:
        self.issues: list[CelIssue] = list(issues)
        self.source = source
        super().__init__(self._render())

    def _render(self) -> str:
        head = f"{len(self.issues)} CEL {self.kind}{'s' if len(self.issues) != 1 else ''}"
        body = "\n".join(i.format(self.source) for i in self.issues)
        return f"{head}:\n{body}" if body else head


class CelSyntaxError(_IssuesError):
    """The CEL source could not be parsed."""

    kind = "syntax error"


class CelTypeError(_IssuesError):
    """The CEL expression is syntactically valid but ill-typed (or over budget)."""

    kind = "type error"


class CelEvaluationError(CelError):
    """A run-time error while evaluating a compiled CEL program."""
