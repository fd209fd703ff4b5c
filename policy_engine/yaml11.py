"""Plain scalars whose type depends on the YAML version the reader implements.

The project's loader (pyyaml) and most tools a team points at policy files read YAML 1.1,
where `2026-03-02T15:00:00Z` is a timestamp, `yes`/`no`/`on`/`off` are booleans, `0777`
is octal and `1:30` is base 60; a YAML 1.2 reader reads the first ones as strings and
`0777` as 777. The same file then means different things to different tools (a schema
validator fed by `yaml.safe_load` rejects a timestamp where the schema says string).
`lint` warns about each such scalar (PE006) and `fmt` quotes the ones whose quoting
leaves the policy the same.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import yaml

__all__ = ["Hazard", "hazards", "quote"]

_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

# YAML 1.2 core schema: what a 1.2 reader resolves a plain scalar to.
_CORE_BOOL = re.compile(r"true|True|TRUE|false|False|FALSE")
_CORE_INT = re.compile(r"[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+")
_CORE_FLOAT = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?|[-+]?\.(inf|Inf|INF)|\.nan|\.NaN|\.NAN")
# YAML 1.1 booleans pyyaml leaves as strings but other 1.1 readers (go-yaml v2, ...) do not.
_SHORT_BOOL = re.compile(r"y|Y|n|N")

_TAG = "tag:yaml.org,2002:"


@dataclass(frozen=True)
class Hazard:
    """One plain scalar a YAML 1.1 reader types differently from a YAML 1.2 reader."""

    line: int
    col: int
    end_col: int
    start: int
    end: int
    text: str
    kind: str
    """`timestamp`, `boolean`, `octal`, `base-60 number`, `number with underscores` or `binary`."""

    @property
    def message(self) -> str:
        if _SHORT_BOOL.fullmatch(self.text):
            return (f"unquoted `{self.text}`: some YAML 1.1 readers (go-yaml v2, ...) read it as a boolean; "
                    "pyyaml and YAML 1.2 readers as a string")
        if self.kind == "octal":
            reading = f"the octal number {_int11(self.text)}, and a YAML 1.2 reader as {_int12(self.text)}"
        else:
            noun = {"timestamp": "a timestamp", "boolean": "a boolean"}.get(self.kind, "a number")
            reading = f"{noun}, and a YAML 1.2 reader as a string"
        return f"unquoted `{self.text}`: a YAML 1.1 reader (such as pyyaml's safe_load) reads it as {reading}"

    @property
    def hint(self) -> str:
        if self.kind == "boolean":
            return f"write true or false, or quote it (\"{self.text}\") if it is text"
        if self.kind == "octal":
            return f"write {_int12(self.text)} (or 0o{self.text.lstrip('+-0')}), or quote it"
        return f"quote it: \"{self.text}\" (policy-engine fmt does so where the policy means the same)"


def _int11(text: str) -> int:
    return int(yaml.load(text, Loader=_LOADER))  # noqa: S506 - a safe loader


def _int12(text: str) -> int:
    return int(text.replace("_", ""), 10)


def _kind(node: yaml.ScalarNode) -> str | None:
    text, tag = node.value, node.tag.removeprefix(_TAG)
    if tag == "timestamp":
        return "timestamp"
    if tag == "bool":
        return None if _CORE_BOOL.fullmatch(text) else "boolean"
    if tag == "str":
        return "boolean" if _SHORT_BOOL.fullmatch(text) else None
    if tag in ("int", "float"):
        body = text.lstrip("+-")
        if ":" in text:
            return "base-60 number"
        if "_" in text:
            return "number with underscores"
        if body.startswith("0b"):
            return "binary"
        if tag == "int" and len(body) > 1 and body.startswith("0") and body[1].isdigit():
            return "octal" if _int11(text) != _int12(text) else None
        if tag == "float" and not _CORE_FLOAT.fullmatch(text):
            return "number with underscores"
    return None


def hazards(text: str) -> list[Hazard]:
    """Every plain scalar (key or value) of `text` whose type differs between YAML 1.1 and 1.2.

    Text that is not YAML has none (the loader reports it)."""
    try:
        root = yaml.compose(text, Loader=_LOADER)
    except (yaml.YAMLError, RecursionError):
        return []
    found: list[Hazard] = []
    seen: set[int] = set()
    stack = [root] if root is not None else []
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue  # an alias: reported where its anchor is
        seen.add(id(node))
        if isinstance(node, yaml.ScalarNode):
            kind = None if node.style else _kind(node)  # plain: None (pyyaml) or "" (libyaml)
            start, end = node.start_mark, node.end_mark
            if kind is not None and start.line == end.line:
                found.append(Hazard(start.line + 1, start.column + 1, end.column + 1, start.index, end.index,
                                    node.value, kind))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)
        elif isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                stack.extend((key, value))
    return sorted(found, key=lambda h: h.start)


def _with_quotes(text: str, chosen: list[Hazard]) -> str:
    for hazard in sorted(chosen, key=lambda h: -h.start):
        rest = text[hazard.end:]
        if rest.startswith("   ") and rest.lstrip(" ").startswith("#"):
            rest = rest[2:]  # an aligned trailing comment stays aligned
        text = text[:hazard.start] + f'"{hazard.text}"' + rest
    return text


def quote(text: str, same: Callable[[str, str], bool]) -> str:
    """`text` with its hazards quoted, keeping only the quotes `same(before, after)` accepts.

    `same` decides whether two texts mean the same (the policy or test file validates to
    the same model): a timestamp quoted is still the test's time, while `yes` quoted in a
    free-form context is no longer a boolean and stays as written (lint still warns).
    """
    found = hazards(text)
    if not found:
        return text
    everything = _with_quotes(text, found)
    if same(text, everything):
        return everything
    kept = [h for h in found if same(text, _with_quotes(text, [h]))]
    return _with_quotes(text, kept) if kept and same(text, _with_quotes(text, kept)) else text
