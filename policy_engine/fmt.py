"""`policy-engine fmt`: canonical key order and indentation, every comment kept.

A line-based formatter rather than a YAML round-trip library: PyYAML's node marks
say where every key and value starts, and the formatter moves whole lines (a key,
its value and the comments above it travel together) and re-indents them by a
constant per block, so scalars, block text (`|`, `>`), flow collections and
comments come out byte-for-byte as written, only shifted. What is normalized:

* key order of the policy format's mappings (top level, rules, budgets, ceilings,
  stickiness, tests and their expectations; free-form maps keep their order);
* two spaces per level, sequences indented under their key;
* trailing spaces, runs of blank lines, the final newline;
* plain scalars YAML 1.1 and 1.2 readers type differently (`2026-03-02T15:00:00Z`, `yes`,
  `0777`; see `yaml11`) are quoted wherever the file then still validates to the same
  policy or tests.

The result is checked before it is returned: it must load to the same data with the
same comment and text lines; otherwise the text is returned unchanged, so `fmt` can
never lose data.
"""

from __future__ import annotations

from typing import Any

import yaml

from .errors import PolicyError
from .load import read_yaml
from .yaml11 import quote

__all__ = ["format_text", "KEY_ORDERS"]

KEY_ORDERS: dict[str, tuple[str, ...]] = {
    "policy": ("version", "name", "description", "owner", "default", "on_error", "on_fast_rate_limited",
               "on_state_unavailable", "variables", "rules", "ceilings", "budgets", "stickiness", "tests"),
    "test_file": ("policy", "tests"),
    "rule": ("name", "description", "when", "speed", "reason"),
    "budget": ("name", "description", "key", "window", "timezone", "limit_usd", "counts", "on_exceed"),
    "ceilings": ("per_request_usd", "on_exceed"),
    "stickiness": ("ttl", "key"),
    "test": ("name", "request", "input_tokens", "context", "now", "state", "expect"),
    "expect": ("speed", "rule", "outcome", "reasons", "guardrails"),
    "state": ("budgets", "ratelimit", "conversation"),
}
INDENT = 2
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when present: same results, faster


def _kind(path: tuple[Any, ...], test_file: bool) -> str | None:
    shape = tuple("#" if isinstance(p, int) else p for p in path)
    return {
        (): "test_file" if test_file else "policy",
        ("rules", "#"): "rule",
        ("budgets", "#"): "budget",
        ("ceilings",): "ceilings",
        ("stickiness",): "stickiness",
        ("tests", "#"): "test",
        ("tests", "#", "expect"): "expect",
        ("tests", "#", "state"): "state",
    }.get(shape)


def _is_trivia(line: str) -> bool:
    stripped = line.strip()
    return not stripped or stripped.startswith("#")


class _Formatter:
    def __init__(self, text: str, test_file: bool) -> None:
        self.lines = text.split("\n")
        self.test_file = test_file

    def shift(self, start: int, end: int, delta: int) -> list[str]:
        out = []
        for line in self.lines[start:end]:
            if not line.strip():
                out.append("")
            elif delta >= 0:
                out.append(" " * delta + line)
            else:
                cut = min(-delta, len(line) - len(line.lstrip(" ")))
                out.append(line[cut:])
        return out

    def node(self, node: yaml.Node, start: int, end: int, indent: int, path: tuple[Any, ...]) -> list[str]:
        """Lines [start, end) holding `node` (a block collection), re-indented at `indent`."""
        if isinstance(node, yaml.MappingNode) and not node.flow_style and node.value:
            return self.mapping(node, start, end, indent, path)
        if isinstance(node, yaml.SequenceNode) and not node.flow_style and node.value:
            return self.sequence(node, start, end, indent, path)
        column = node.start_mark.column
        return self.shift(start, end, indent - column)

    def _segments(self, starts: list[int], end: int) -> list[tuple[int, int, int]]:
        """(lead start, own start, own end) per entry: comments just above an entry go with it."""
        bounds = starts + [end]
        result = []
        lead = starts[0]
        for i, own in enumerate(starts):
            stop = bounds[i + 1]
            if i + 1 < len(starts):
                cut = stop
                while cut - 1 > own and _is_trivia(self.lines[cut - 1]):
                    cut -= 1
                result.append((lead, own, cut))
                lead = cut
            else:
                result.append((lead, own, stop))
        return result

    def mapping(self, node: yaml.MappingNode, start: int, end: int, indent: int, path: tuple[Any, ...]) -> list[str]:
        starts = [k.start_mark.line for k, _ in node.value]
        if any(b <= a for a, b in zip(starts, starts[1:])) or starts[0] < start:
            return self.shift(start, end, indent - node.start_mark.column)  # two keys on a line: leave it be
        head = self.shift(start, starts[0], indent - node.start_mark.column) if start < starts[0] else []
        blocks = []
        for (lead, own, stop), (key, value) in zip(self._segments(starts, end), node.value):
            column = key.start_mark.column
            lines = self.shift(lead, own, indent - column)
            value_line = value.start_mark.line
            block_child = (isinstance(value, (yaml.MappingNode, yaml.SequenceNode)) and not value.flow_style
                           and value.value and value_line > own)
            if block_child:
                lines += self.shift(own, own + 1, indent - column)
                key_name = key.value if isinstance(key, yaml.ScalarNode) else None
                # Comments between the key and its value go with the value, at its indentation.
                lines += self.node(value, own + 1, stop, indent + INDENT, path + (key_name,))
            else:
                lines += self.shift(own, stop, indent - column)
            name = key.value if isinstance(key, yaml.ScalarNode) else None
            blocks.append((name, lines))
        kind = _kind(path, self.test_file)
        if kind is not None:
            order = {k: i for i, k in enumerate(KEY_ORDERS[kind])}
            blocks = [b for _, b in sorted(enumerate(blocks), key=lambda ib: (order.get(ib[1][0], len(order)), ib[0]))]
            _drop_trailing_blanks(blocks)
        return head + [line for _, lines in blocks for line in lines]

    def sequence(self, node: yaml.SequenceNode, start: int, end: int, indent: int, path: tuple[Any, ...]) -> list[str]:
        dash_lines = []
        for item in node.value:
            line = item.start_mark.line
            while line > start and not self.lines[line].lstrip().startswith("-"):
                line -= 1
            dash_lines.append(line)
        if any(b <= a for a, b in zip(dash_lines, dash_lines[1:])) or dash_lines[0] < start:
            return self.shift(start, end, indent - node.start_mark.column)
        dash_column = len(self.lines[dash_lines[0]]) - len(self.lines[dash_lines[0]].lstrip(" "))
        head = self.shift(start, dash_lines[0], indent - dash_column) if start < dash_lines[0] else []
        out = list(head)
        for index, ((lead, own, stop), item) in enumerate(zip(self._segments(dash_lines, end), node.value)):
            out += self.shift(lead, own, indent - dash_column)
            same_line = item.start_mark.line == own
            if isinstance(item, yaml.MappingNode) and not item.flow_style and item.value and same_line:
                # The dash becomes a space so the item is a plain mapping; it goes back on whichever
                # entry comes first once the entries are in order.
                text = self.lines[own]
                at = text.index("-")
                self.lines[own] = text[:at] + " " + text[at + 1:]
                body = self.mapping(item, own, stop, indent + INDENT, path + (index,))
                first = next(i for i, line in enumerate(body) if line.strip() and not line.strip().startswith("#"))
                body[first] = " " * indent + "- " + body[first].lstrip(" ")
                out += body
            else:
                out += self.shift(own, stop, indent - dash_column)
        return out


def _drop_trailing_blanks(blocks: list[tuple[str | None, list[str]]]) -> None:
    """Blank lines between entries travel as the next entry's leading lines, not as trailing ones,
    so that reordering never leaves two entries glued or a blank line at a block's end."""
    for _, lines in blocks:
        trailing = 0
        while len(lines) > trailing and not lines[len(lines) - 1 - trailing].strip():
            trailing += 1
        if trailing:
            del lines[len(lines) - trailing:]


def _normalize(lines: list[str]) -> str:
    out: list[str] = []
    for line in lines:
        line = line.rstrip()
        if not line and (not out or not out[-1]):
            continue  # no leading blank lines, no runs of them
        out.append(line)
    while out and not out[-1]:
        out.pop()
    return "\n".join(out) + "\n"


def _content_lines(text: str) -> list[str]:
    result = []
    for line in text.split("\n"):
        stripped = line.strip()
        while stripped.startswith("- "):
            stripped = stripped[2:].lstrip()
        if stripped and stripped != "-":
            result.append(stripped)
    return sorted(result)


def format_text(text: str, name: str = "<policy>") -> str:
    """The formatted text of a policy (or `*_test.yaml`) file; raises PolicyError when it is not YAML."""
    document = read_yaml(name, text=text)  # positioned diagnostics for what cannot be parsed
    if document.problems:
        raise PolicyError(document.problems, {name: text})
    if "\t" in text or "\r" in text:
        return text  # tabs and CR line ends: not this formatter's business to guess at
    try:
        root = yaml.compose(text, Loader=_LOADER)
    except yaml.YAMLError:
        return text
    if root is None or not isinstance(root, yaml.MappingNode) or root.flow_style:
        return text
    quoted = quote(text, lambda a, b: _same_model(name, a, b))
    if quoted != text:
        text = quoted
        root = yaml.compose(text, Loader=_LOADER)
    formatter = _Formatter(text, name.endswith(("_test.yaml", "_test.yml")))
    total = len(formatter.lines)
    first = root.value[0][0].start_mark.line if root.value else 0
    header = formatter.lines[:first]  # the file's opening comments stay on top
    try:
        body = formatter.mapping(root, first, total, 0, ())
    except (StopIteration, IndexError, RecursionError):
        return text
    result = _normalize(header + body)
    return result if _same(text, result) else text


def _same(before: str, after: str) -> bool:
    try:
        if yaml.load(before, Loader=_LOADER) != yaml.load(after, Loader=_LOADER):  # noqa: S506 - a safe loader
            return False
    except yaml.YAMLError:
        return False
    return _content_lines(before) == _content_lines(after)



def _same_model(name: str, before: str, after: str) -> bool:
    """Whether two texts of one policy (or test) file validate to the same model."""
    from .load import validate
    from .policy import Policy
    from .testing.runner import TestFile

    model = TestFile if name.endswith(("_test.yaml", "_test.yml")) else Policy
    try:
        return validate(read_yaml(name, text=before), model) == validate(read_yaml(name, text=after), model)
    except PolicyError:
        return False
