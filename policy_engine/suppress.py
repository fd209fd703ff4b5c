"""Inline suppressions (`# policy-engine: ignore[PE302]`) and per-code severities for `lint`.

A suppression names the codes it silences, and silences them in one place:

* at the end of a line, that line; at the end of the first line of a rule, budget or test
  (`- name: ...`), that whole item;
* on a line of its own, the line below it (the next one that is not blank or a comment),
  or the whole item when that line starts a rule, budget or test.

A suppression without a code is an error (PE402): silencing everything on a line hides the
findings nobody has read yet. A suppression that silences nothing is a warning (PE401), so
stale ones are removed when the finding they were written for is fixed.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import yaml

from .errors import Diagnostic, did_you_mean

__all__ = ["Suppression", "find_suppressions", "apply", "SEVERITIES"]

SEVERITIES = ("error", "warning", "info", "off")
"""What a repository's config may set a code to; `off` drops its findings."""

_COMMENT = re.compile(r"#\s*policy-engine\s*:\s*ignore\b(?P<codes>\[[^\]]*\])?")
_CODE = re.compile(r"PE\d{3}")
_ITEMS = ("rules", "budgets", "tests")


@dataclass
class Suppression:
    line: int
    col: int
    codes: tuple[str, ...]
    first: int
    """First line silenced (1-based, inclusive)."""
    last: int
    used: set[str] = field(default_factory=set)

    def covers(self, d: Diagnostic) -> bool:
        return d.code in self.codes and self.first <= d.line <= self.last


def _item_spans(text: str) -> dict[int, int]:
    """First line -> last line of each item of the top-level rules, budgets and tests lists."""
    try:
        root = yaml.compose(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except (yaml.YAMLError, RecursionError):
        return {}
    spans: dict[int, int] = {}
    if not isinstance(root, yaml.MappingNode):
        return spans
    for key, value in root.value:
        if isinstance(key, yaml.ScalarNode) and key.value in _ITEMS and isinstance(value, yaml.SequenceNode):
            for item in value.value:
                # A block item's end mark is where the next token starts: its last line is the
                # last one with text before that (comments between items belong to neither).
                body = text[item.start_mark.index:item.end_mark.index].rstrip()
                spans[item.start_mark.line + 1] = item.start_mark.line + 1 + body.count("\n")
    return spans


def find_suppressions(file: str, text: str) -> tuple[list[Suppression], list[Diagnostic]]:
    """The suppressions in a file's text, and the diagnostics of malformed ones (PE402)."""
    from .check import CODES

    lines = text.splitlines()
    spans: dict[int, int] | None = None
    found: list[Suppression] = []
    problems: list[Diagnostic] = []
    for number, line in enumerate(lines, 1):
        match = _COMMENT.search(line)
        if match is None:
            continue
        col = match.start() + 1
        listed = match.group("codes")
        codes = tuple(dict.fromkeys(_CODE.findall(listed or "")))
        if not codes:
            problems.append(Diagnostic(
                file, number, col, "PE402", "a suppression must name the codes it silences",
                "write e.g. `# policy-engine: ignore[PE302]` (the code is in the finding: error[PE302])",
                CODES["PE402"][0]))  # type: ignore[arg-type]
            continue
        unknown = [c for c in codes if c not in CODES]
        for code in unknown:
            problems.append(Diagnostic(file, number, col, "PE401", f"suppression names {code}, which is not a policy-engine code",
                                       did_you_mean(code, list(CODES)), CODES["PE401"][0]))  # type: ignore[arg-type]
        codes = tuple(c for c in codes if c not in unknown)
        if not codes:
            continue
        own_line = not line[:match.start()].strip()
        target = number
        if own_line:
            target = next((n for n in range(number + 1, len(lines) + 1)
                           if lines[n - 1].strip() and not lines[n - 1].lstrip().startswith("#")), number)
        if spans is None:
            spans = _item_spans(text)
        found.append(Suppression(number, col, codes, target, spans.get(target, target)))
    return found, problems


def apply(file: str, source: str | None, diagnostics: list[Diagnostic],
          severities: Mapping[str, str] | None = None) -> list[Diagnostic]:
    """The diagnostics left once the file's suppressions and the configured severities apply.

    Adds PE401 for suppressions that silenced nothing and PE402 for ones without a code."""
    kept = list(diagnostics)
    if source is not None:
        suppressions, problems = find_suppressions(file, source)
        left = []
        for d in kept:
            hit = next((s for s in suppressions if d.file == file and s.covers(d)), None)
            if hit is None:
                left.append(d)
            else:
                hit.used.add(d.code)
        from .check import CODES

        for s in suppressions:
            for code in s.codes:
                if code not in s.used:
                    problems.append(Diagnostic(
                        file, s.line, s.col, "PE401", f"suppression of {code} silences nothing here",
                        "remove it (the finding it was written for is gone), or move it to the line of the finding",
                        CODES["PE401"][0]))  # type: ignore[arg-type]
        kept = left + problems
    if severities:
        kept = [dataclasses.replace(d, severity=severities[d.code]) if d.code in severities else d  # type: ignore[arg-type]
                for d in kept if severities.get(d.code) != "off"]
    kept.sort(key=lambda d: (d.line, d.col, d.code))
    return kept
