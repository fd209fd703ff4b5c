"""Stage 1, load: YAML text -> plain data that remembers where every value came from.

pyyaml's `safe_load` throws positions away and silently keeps the last of two
duplicate keys. We compose the node graph ourselves (safe tags only), build the
data while recording the position of every key and value, and turn every
problem into a `Diagnostic` so one run reports all of them.
"""

from __future__ import annotations

import bisect
import os
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import pydantic
import yaml

from .errors import Diagnostic, PolicyError, did_you_mean

if TYPE_CHECKING:
    from .policy import Policy

__all__ = ["Document", "read_yaml", "validate", "load_policy", "parse_policy", "MAX_FILE_BYTES", "MAX_NODES", "MAX_EXPANDED_CHARS"]

MAX_FILE_BYTES = 1_048_576
"""A policy is config, not data: anything larger is a mistake or an attack."""

MAX_NODES = 100_000
"""Nodes visited while expanding aliases; a 'billion laughs' file blows past it at once."""

MAX_EXPANDED_CHARS = 4 * MAX_FILE_BYTES
"""Characters of scalar text after expanding aliases. Few values can still be huge: one long
string aliased into every rule is parsed, validated and compiled once per alias."""

Path_ = tuple[object, ...]
M = TypeVar("M", bound=pydantic.BaseModel)


@dataclass(frozen=True)
class _Span:
    start: int
    end: int
    style: str | None  # None for plain scalars and collections, else the quote or block indicator


@dataclass
class Document:
    """A parsed YAML file: its data plus the source span of every key and value."""

    file: str
    source: str
    data: Any
    values: dict[Path_, _Span] = field(default_factory=dict)
    keys: dict[Path_, _Span] = field(default_factory=dict)
    problems: list[Diagnostic] = field(default_factory=list)
    """Problems that did not stop parsing (duplicate keys); `validate` reports them with its own."""
    _line_starts: list[int] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if not self._line_starts:
            self._line_starts = [0] + [i + 1 for i, ch in enumerate(self.source) if ch == "\n"]

    def line_col(self, index: int) -> tuple[int, int]:
        """1-based line and column of a character index into the source."""
        line = bisect.bisect_right(self._line_starts, index) - 1
        return line + 1, index - self._line_starts[line] + 1

    def locate(self, path: Path_, *, key: bool = False) -> tuple[int, int]:
        """Where the value (or its key) at `path` starts; the nearest known ancestor if unknown."""
        table = self.keys if key else self.values
        for cut in range(len(path), -1, -1):
            span = table.get(path[:cut]) or self.keys.get(path[:cut])
            if span is not None:
                return self.line_col(span.start)
        return 1, 1

    def locate_in_scalar(self, path: Path_, offset: int) -> tuple[int, int]:
        """Where character `offset` of the string scalar at `path` sits in the file.

        Used to point CEL errors at the exact character, also inside quoted and
        block scalars: walk the raw text and the parsed value side by side, skipping
        what YAML removed (quotes, indentation, escapes, the block header).
        """
        span = self.values.get(path)
        value = self.get(path)
        if span is None or not isinstance(value, str):
            return self.locate(path)
        raw = self.source[span.start : span.end]
        r = 0
        if span.style in ("|", ">"):
            r = raw.find("\n") + 1  # skip the block header line
        for i, ch in enumerate(value):
            while r < len(raw) and raw[r] != ch:
                r += 1
            if i == offset:
                break
            r += 1
        return self.line_col(span.start + min(r, max(len(raw) - 1, 0)))

    def get(self, path: Path_) -> Any:
        node = self.data
        for part in path:
            node = node[part]  # type: ignore[index]
        return node

    def diagnostic(
        self, path: Path_, code: str, message: str, hint: str | None = None, *, key: bool = False, severity: str = "error"
    ) -> Diagnostic:
        line, col = self.locate(path, key=key)
        return Diagnostic(self.file, line, col, code, message, hint, severity)  # type: ignore[arg-type]


def read_yaml(path: str | os.PathLike[str], *, text: str | bytes | None = None, display_name: str | None = None) -> Document:
    """Parse one YAML file into a `Document`, keeping the position of every key and value.

    Fatal problems (unreadable, not UTF-8, YAML syntax, alias bombs) raise `PolicyError`
    at once; duplicate keys are kept in `Document.problems` (the first value wins) so
    that `validate` reports them together with every schema problem.

    Pass `text` to parse content that is not on disk (an editor buffer, a git blob);
    `path` then only names it in diagnostics.
    """
    name = display_name or str(path)
    if text is None:
        try:
            size = os.path.getsize(path)
            if size > MAX_FILE_BYTES:
                raise PolicyError([_too_large(name, size)])
            with open(path, "rb") as handle:
                text = handle.read(MAX_FILE_BYTES + 1)
        except OSError as exc:
            raise PolicyError([Diagnostic(name, 1, 1, "PE001", f"cannot read file: {exc.strerror or exc}")]) from None
    if isinstance(text, bytes):
        if len(text) > MAX_FILE_BYTES:
            raise PolicyError([_too_large(name, len(text))])
        text = _decode(name, text)
    elif len(text.encode("utf-8", "surrogatepass")) > MAX_FILE_BYTES:
        raise PolicyError([_too_large(name, len(text.encode("utf-8", "surrogatepass")))])
    if text.startswith("\ufeff"):
        text = text[1:]
    try:
        builder = _Builder(name, text)
    except yaml.reader.ReaderError as exc:
        # The reader refuses control characters when the loader is created, before any parsing.
        before = text[: max(exc.position, 0)]
        line, col = before.count("\n") + 1, len(before) - (before.rfind("\n") + 1) + 1
        what = f"U+{exc.character:04X}" if isinstance(exc.character, int) else repr(exc.character)
        raise PolicyError([Diagnostic(name, line, col, "PE001", f"YAML error: control character {what} is not allowed",
                                      "remove the control character")], {name: text}) from None
    return builder.build()


def _too_large(name: str, size: int) -> Diagnostic:
    return Diagnostic(
        name, 1, 1, "PE003", f"file is {size} bytes, over the {MAX_FILE_BYTES}-byte limit for policy files",
        "split the policy, or move data (such as long lists) out of it",
    )


def _decode(name: str, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        before = data[: exc.start]
        line = before.count(b"\n") + 1
        col = len(before) - (before.rfind(b"\n") + 1) + 1
        raise PolicyError(
            [Diagnostic(name, line, col, "PE004", f"file is not valid UTF-8: byte 0x{data[exc.start]:02x} cannot be decoded",
                        "save the file as UTF-8")]
        ) from None


class _Builder:
    """Turns the composed node graph into plain data, recording spans and problems."""

    def __init__(self, name: str, text: str) -> None:
        self.name = name
        self.text = text
        self.problems: list[Diagnostic] = []
        self.values: dict[Path_, _Span] = {}
        self.keys: dict[Path_, _Span] = {}
        self.visited = 0
        self.chars = 0  # scalar text seen, counting each alias expansion again
        self.active: set[int] = set()
        self.loader = yaml.SafeLoader(text)

    def build(self) -> Document:
        doc = Document(self.name, self.text, None)
        try:
            root = self.loader.get_single_node()
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
            message = " ".join(p for p in (exc.context, exc.problem) if p) or "invalid YAML"
            raise PolicyError([Diagnostic(self.name, line, col, "PE001", f"YAML syntax error: {message}")], {self.name: self.text}) from None
        except yaml.YAMLError as exc:
            raise PolicyError([Diagnostic(self.name, 1, 1, "PE001", f"YAML error: {exc}")], {self.name: self.text}) from None
        except RecursionError:
            raise PolicyError([Diagnostic(self.name, 1, 1, "PE003", "YAML is nested too deeply to be a policy")]) from None
        finally:
            self.loader.dispose()
        if root is None:
            raise PolicyError([Diagnostic(self.name, 1, 1, "PE005", "file is empty", "a policy starts with 'version: 1'")])
        try:
            data = self._node(root, ())
        except _TooBig as exc:
            raise PolicyError([exc.diagnostic], {self.name: self.text}) from None
        except RecursionError:
            raise PolicyError([Diagnostic(self.name, 1, 1, "PE003", "YAML is nested too deeply to be a policy")]) from None
        doc.data, doc.values, doc.keys, doc.problems = data, self.values, self.keys, self.problems
        return doc

    def _node(self, node: yaml.Node, path: Path_) -> Any:
        self.visited += 1
        if self.visited > MAX_NODES:
            raise self._bomb(node, path, f"more than {MAX_NODES} values")
        if isinstance(node, yaml.ScalarNode):
            self.chars += len(node.value)
            if self.chars > MAX_EXPANDED_CHARS:
                raise self._bomb(node, path, f"more than {MAX_EXPANDED_CHARS:,} characters of text")
        if id(node) in self.active:
            raise _TooBig(self._diag(node, "PE003", "recursive alias: a value contains itself", "remove the alias that points at its own ancestor"))
        self.values[path] = _Span(node.start_mark.index, node.end_mark.index, getattr(node, "style", None) if isinstance(node, yaml.ScalarNode) else None)
        if isinstance(node, yaml.ScalarNode):
            try:
                return self.loader.construct_object(node, deep=True)
            except yaml.constructor.ConstructorError as exc:
                self.problems.append(self._diag(node, "PE001", f"invalid value: {exc.problem}"))
                return None
        self.active.add(id(node))
        try:
            if isinstance(node, yaml.SequenceNode):
                return [self._node(item, path + (i,)) for i, item in enumerate(node.value)]
            return self._mapping(node, path)
        finally:
            self.active.discard(id(node))

    def _bomb(self, node: yaml.Node, path: Path_, what: str) -> _TooBig:
        # The aliased node sits where its anchor is; the key being expanded is what to fix.
        top = self.keys.get(path[:1])
        line, col = self._line_col(top.start) if top else (node.start_mark.line + 1, node.start_mark.column + 1)
        return _TooBig(Diagnostic(self.name, line, col, "PE003",
            f"'{path[0] if path else 'document'}' expands to {what}, which looks like an alias bomb",
            "remove the anchors (&) and aliases (*) that repeat large values"))

    def _mapping(self, node: yaml.MappingNode, path: Path_) -> dict[Any, Any]:
        own = list(node.value)
        if any(k.tag == "tag:yaml.org,2002:merge" for k, _ in own):
            try:
                self.loader.flatten_mapping(node)
            except yaml.constructor.ConstructorError as exc:
                self.problems.append(self._diag(node, "PE001", f"invalid merge: {exc.problem}"))
        explicit = {id(k) for k, _ in own}
        result: dict[Any, Any] = {}
        first_seen: dict[Any, yaml.Node] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                self.problems.append(self._diag(key_node, "PE001", "mapping keys must be plain scalars", "quote the key"))
                continue
            self.chars += len(key_node.value)
            if self.chars > MAX_EXPANDED_CHARS:
                raise self._bomb(key_node, path, f"more than {MAX_EXPANDED_CHARS:,} characters of text")
            key = self.loader.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:
                self.problems.append(self._diag(key_node, "PE001", "mapping key is not hashable"))
                continue
            if key in first_seen and id(key_node) in explicit and id(first_seen[key]) in explicit:
                line = first_seen[key].start_mark.line + 1
                self.problems.append(self._diag(
                    key_node, "PE002", f"duplicate key '{key}' (first defined on line {line})",
                    "YAML keeps only the last value of a repeated key; remove or rename one of them"))
                continue
            first_seen[key] = key_node
            self.keys[path + (key,)] = _Span(key_node.start_mark.index, key_node.end_mark.index, None)
            result[key] = self._node(value_node, path + (key,))
        return result

    def _line_col(self, index: int) -> tuple[int, int]:
        line = self.text.count("\n", 0, index)
        return line + 1, index - (self.text.rfind("\n", 0, index) + 1) + 1

    def _diag(self, node: yaml.Node, code: str, message: str, hint: str | None = None) -> Diagnostic:
        return Diagnostic(self.name, node.start_mark.line + 1, node.start_mark.column + 1, code, message, hint)


class _TooBig(Exception):
    def __init__(self, diagnostic: Diagnostic) -> None:
        self.diagnostic = diagnostic


def validate(document: Document, model: type[M], *, context: Mapping[str, Any] | None = None) -> M:
    """Validate `document.data` against a pydantic model; every error becomes a positioned diagnostic."""
    problems = list(document.problems)
    try:
        result = model.model_validate(document.data, context=dict(context or {}))
    except pydantic.ValidationError as exc:
        problems.extend(_diagnostics(document, model, exc))
    if problems:
        problems.sort(key=lambda d: (d.line, d.col))
        raise PolicyError(problems, {document.file: document.source})
    return result


def _diagnostics(document: Document, model: type[pydantic.BaseModel], exc: pydantic.ValidationError) -> Iterator[Diagnostic]:
    seen: set[tuple[int, int, str]] = set()
    for error in exc.errors(include_url=False):
        path = _data_path(document.data, error["loc"])
        kind = error["type"]
        field_name = path[-1] if path else None
        if kind == "extra_forbidden":
            allowed = _allowed_keys(model, path[:-1])
            hint = did_you_mean(str(field_name), allowed) if allowed else None
            if hint is None and allowed:
                hint = "allowed keys here: " + ", ".join(sorted(allowed))
            diag = document.diagnostic(path, "PE010", f"unknown key '{field_name}'", hint, key=True)
        elif kind == "missing":
            where = f" in '{dotted(path[:-1])}'" if path[:-1] else ""
            diag = document.diagnostic(path[:-1], "PE012", f"missing required key '{field_name}'{where}",
                                       _missing_hint(model, path))
        else:
            msg = error["msg"]
            got = _short(error.get("input"))
            where = f"'{dotted(path)}'" if path else "document"
            diag = document.diagnostic(path, "PE011", f"invalid value for {where}: {msg[0].lower() + msg[1:]}{got}",
                                       _type_hint(model, path))
        key = (diag.line, diag.col, diag.message)
        if key not in seen:
            seen.add(key)
            yield diag


def _data_path(data: Any, loc: tuple[Any, ...]) -> Path_:
    """Drop the parts of a pydantic location that are not in the data (union branches, tags)."""
    path: list[object] = []
    node = data
    for part in loc:
        if isinstance(node, Mapping) and part in node:
            path.append(part)
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            path.append(part)
            node = node[part]
        elif isinstance(node, Mapping) and isinstance(part, str) and part not in node and part == loc[-1]:
            path.append(part)  # a missing or unknown key: point at its parent
            break
    return tuple(path)


def _model_at(model: type[pydantic.BaseModel], path: Path_) -> type[pydantic.BaseModel] | None:
    current: Any = model
    for part in path:
        current = _unwrap(current)
        if isinstance(current, type) and issubclass(current, pydantic.BaseModel):
            info = current.model_fields.get(str(part)) if isinstance(part, str) else None
            if info is None:
                return None
            current = info.annotation
        elif isinstance(part, int):
            args = [a for a in typing.get_args(current) if a is not type(None)]
            current = args[0] if args else None
        else:
            args = typing.get_args(current)
            current = args[-1] if args else None
    current = _unwrap(current)
    return current if isinstance(current, type) and issubclass(current, pydantic.BaseModel) else None


def _unwrap(annotation: Any) -> Any:
    """Optional[X] / Annotated[X, ...] / X | Y -> the first model among them, else the annotation."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        for arg in typing.get_args(annotation):
            if isinstance(arg, type) and issubclass(arg, pydantic.BaseModel):
                return arg
        non_none = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _unwrap(non_none[0]) if len(non_none) == 1 else annotation
    return annotation


def _allowed_keys(model: type[pydantic.BaseModel], path: Path_) -> set[str]:
    target = _model_at(model, path)
    if target is None:
        return set()
    return {info.alias or name for name, info in target.model_fields.items()}


def _missing_hint(model: type[pydantic.BaseModel], path: Path_) -> str | None:
    target = _model_at(model, path[:-1])
    if target is None:
        return None
    info = target.model_fields.get(str(path[-1]))
    return info.description if info is not None and info.description else None


def _type_hint(model: type[pydantic.BaseModel], path: Path_) -> str | None:
    if not path:
        return "a policy file is a mapping that starts with 'version: 1'"
    target = _model_at(model, path[:-1])
    if target is None or not isinstance(path[-1], str):
        return None
    info = target.model_fields.get(path[-1])
    return info.description if info is not None and info.description else None


def dotted(path: Path_) -> str:
    """('rules', 1, 'when') -> 'rules[1].when', as a person reads it."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _short(value: Any) -> str:
    if value is None or isinstance(value, (dict, list)):
        return ""
    text = repr(value)
    return f" (got {text if len(text) <= 40 else text[:37] + '...'})"



def load_policy(path: str | os.PathLike[str], *, text: str | bytes | None = None) -> Policy:
    """Read and validate one policy file, reporting every problem found in one `PolicyError`."""
    return parse_policy(path, text=text)[0]


def parse_policy(path: str | os.PathLike[str], *, text: str | bytes | None = None) -> tuple[Policy, Document]:
    """`load_policy`, also returning the `Document` that maps every value to its file position."""
    from .policy import Policy

    document = read_yaml(path, text=text)
    document.problems.extend(_duplicate_names(document))
    return validate(document, Policy), document


def _duplicate_names(document: Document) -> Iterator[Diagnostic]:
    """Names must be unique within rules, budgets and tests: the rest of the system refers to them."""
    if not isinstance(document.data, Mapping):
        return
    for section in ("rules", "budgets", "tests"):
        items = document.data.get(section)
        if not isinstance(items, list):
            continue
        first: dict[str, int] = {}
        for index, item in enumerate(items):
            name = item.get("name") if isinstance(item, Mapping) else None
            if not isinstance(name, str):
                continue
            if name in first:
                line, _ = document.locate((section, first[name], "name"))
                yield document.diagnostic(
                    (section, index, "name"), "PE020",
                    f"duplicate {section[:-1]} name '{name}' (first used on line {line})",
                    f"each {section[:-1]} needs its own name",
                )
            else:
                first[name] = index
