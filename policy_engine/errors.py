"""The typed errors every stage raises, and the diagnostic they carry.

Every problem a person must fix in a policy file is a `Diagnostic` pointing at
file:line:col, so the CLI, the library and editors all print the same thing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Literal

Severity = Literal["error", "warning", "info"]


@dataclass(frozen=True)
class Diagnostic:
    """One finding about a policy or catalog file. Lines and columns are 1-based."""

    file: str
    line: int
    col: int
    code: str
    message: str
    hint: str | None = None
    severity: Severity = "error"
    end_line: int | None = None
    end_col: int | None = None

    def format(self, source: str | None = None) -> str:
        """`file:line:col: severity[code]: message`, then a caret excerpt and the hint."""
        text = f"{self.file}:{self.line}:{self.col}: {self.severity}[{self.code}]: {self.message}"
        excerpt = caret_excerpt(source, self.line, self.col, self.end_col if self.end_line in (None, self.line) else None)
        if excerpt:
            text += "\n" + excerpt
        if self.hint:
            text += f"\n  hint: {self.hint}"
        return text

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def caret_excerpt(source: str | None, line: int, col: int, end_col: int | None = None) -> str:
    """The source line with a caret under `col` (and tildes up to `end_col`)."""
    if source is None or line < 1:
        return ""
    lines = _lines(source)
    if line > len(lines):
        return ""
    text = lines[line - 1].expandtabs(1)
    width = max(1, (end_col - col) if end_col and end_col > col else 1)
    text, col, width = clip_line(text, col, width)
    gutter = f"{line:>5} | "
    return f"{gutter}{text}\n{' ' * (len(gutter) - 2)}| {' ' * (col - 1)}^{'~' * (width - 1)}"


@lru_cache(maxsize=8)
def _lines(source: str) -> list[str]:
    """`source.splitlines()`, once per source: a policy with thousands of findings would
    otherwise split its whole text again for each one."""
    return source.splitlines()


EXCERPT_CHARS = 120
"""Longest source line an excerpt shows; a longer one is cut around the column (a one-line,
100 KB expression would otherwise be printed whole, tildes and all)."""


def clip_line(text: str, col: int, width: int) -> tuple[str, int, int]:
    """`text` cut to at most EXCERPT_CHARS around 1-based `col`, marked with '...'; the caret's new col and width."""
    if len(text) <= EXCERPT_CHARS:
        return text, col, width
    start = max(0, min(col - 1 - EXCERPT_CHARS // 3, len(text) - EXCERPT_CHARS))
    end = start + EXCERPT_CHARS
    head = "..." if start > 0 else ""
    tail = "..." if end < len(text) else ""
    col = col - start + len(head)
    width = max(1, min(width, EXCERPT_CHARS - (col - 1 - len(head))))
    return head + text[start:end] + tail, col, width


class PolicyEngineError(Exception):
    """Base of every error this library raises on purpose."""


class PolicyError(PolicyEngineError):
    """A policy (or catalog) file could not be loaded; `diagnostics` lists every problem found."""

    def __init__(self, diagnostics: list[Diagnostic], sources: dict[str, str] | None = None) -> None:
        self.diagnostics = list(diagnostics)
        self.sources = dict(sources or {})
        super().__init__(self.format())

    def format(self) -> str:
        return "\n".join(d.format(self.sources.get(d.file)) for d in self.diagnostics)


class PricingError(PolicyEngineError):
    """A cost could not be computed because the catalog does not know a price."""


@dataclass
class CeilingExceeded(PolicyEngineError):
    """A request would break a budget or the per-request ceiling whose `on_exceed` is `reject`."""

    ceiling: str
    limit_usd: str
    spent_plus_reserved_usd: str
    estimate_usd: str
    message: str = field(default="")

    def __post_init__(self) -> None:
        if not self.message:
            self.message = (
                f"{self.ceiling}: estimate ${self.estimate_usd} on top of ${self.spent_plus_reserved_usd} "
                f"spent or reserved would exceed the limit of ${self.limit_usd}"
            )
        Exception.__init__(self, self.message)

    def __str__(self) -> str:
        return self.message


def did_you_mean(word: str, candidates: list[str] | tuple[str, ...] | set[str] | frozenset[str]) -> str | None:
    """A 'did you mean ...?' hint for a misspelt name, or None when nothing is close."""
    import difflib

    close = difflib.get_close_matches(word, sorted(candidates), n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'?" if close else None


class InvalidRequest(PolicyEngineError, ValueError):
    """The Messages API parameters or the caller's context given to `decide()` are malformed.

    The message is for the caller and may quote what it gave (`user=5150`); `redacted` says
    what was wrong without any given value, and is all that telemetry records.
    """

    def __init__(self, message: str, *, redacted: str | None = None) -> None:
        super().__init__(message)
        self.redacted = redacted or f"{type(self).__name__} (details withheld: they may quote the caller's values)"


class InvalidContext(InvalidRequest):
    """The context passed to `decide()` has an unknown key or a value of the wrong type."""


class StateUnavailable(PolicyEngineError):
    """Shared state (a Redis ledger or rate-limit store) did not answer in time.

    The engine turns it into the policy's `on_state_unavailable`: decide standard,
    or raise this error to the caller (`reject`). `decision` is set when raised by `decide()`.
    """

    decision: object | None = None
