"""Loading the catalog: the packaged file, a user file that extends it, or one that replaces it.

TEMPORARY: `policy_engine.load` (read_yaml/validate) did not exist when this was written, so
`_parse` reads YAML itself (PyYAML's SafeLoader, keeping node positions) and `_validate`
turns pydantic errors into positioned `Diagnostic`s. Both are private and meant to be
replaced by the project loader.
"""

from __future__ import annotations

import os
import types
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from policy_engine.errors import Diagnostic, PolicyError, did_you_mean

from ._models import Catalog

DEFAULT_CATALOG_PATH = Path(__file__).with_name("catalog.yaml")

# Blocks that carry a price and its provenance: an override replaces them whole, so a user's
# price never ends up paired with the packaged `source` (or half of the packaged tiers).
_ATOMIC_MODEL_BLOCKS = frozenset({"standard", "cache", "data_residency", "batch"})

Path_ = tuple[Union[str, int], ...]


@dataclass
class _Parsed:
    file: str
    data: Any
    source: str
    key_pos: dict[Path_, tuple[int, int]] = field(default_factory=dict)
    value_pos: dict[Path_, tuple[int, int]] = field(default_factory=dict)


def _parse(path: str | os.PathLike[str]) -> _Parsed:
    """Read a YAML file, keeping the 1-based line:col of every key and value."""
    file = os.fspath(path)
    try:
        text = Path(file).read_text(encoding="utf-8")
    except OSError as exc:
        raise PolicyError([Diagnostic(file, 1, 1, "catalog.io", f"cannot read catalog: {exc.strerror or exc}")])
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        raise PolicyError(
            [Diagnostic(file, line, col, "catalog.yaml", f"invalid YAML: {exc.problem or exc}")], {file: text}
        ) from None
    finally:
        loader.dispose()
    parsed = _Parsed(file, data, text)
    dupes: list[Diagnostic] = []
    if node is not None:
        _walk(node, (), parsed, dupes)
    if dupes:
        raise PolicyError(dupes, {file: text})
    return parsed


def _walk(node: yaml.Node, path: Path_, out: _Parsed, dupes: list[Diagnostic]) -> None:
    out.value_pos.setdefault(path, (node.start_mark.line + 1, node.start_mark.column + 1))
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key = str(key_node.value)
            sub = (*path, key)
            if key in seen:
                line, col = key_node.start_mark.line + 1, key_node.start_mark.column + 1
                dupes.append(Diagnostic(out.file, line, col, "catalog.duplicate_key", f"duplicate key {key!r}"))
            seen.add(key)
            out.key_pos.setdefault(sub, (key_node.start_mark.line + 1, key_node.start_mark.column + 1))
            _walk(value_node, sub, out, dupes)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _walk(item, (*path, i), out, dupes)


def _merge(base: Any, over: Any, path: Path_ = ()) -> Any:
    """Deep-merge `over` onto `base`: mappings key by key down to each model's blocks;
    lists, scalars and priced blocks (standard, fast.pricing, cache, data_residency, batch)
    are replaced whole."""
    if not (isinstance(base, dict) and isinstance(over, dict)):
        return over
    # path: () / providers / <p> / models / <m> / <block> / ...
    if len(path) == 5 and path[4] in _ATOMIC_MODEL_BLOCKS:
        return over
    if len(path) == 6 and path[4] == "fast" and path[5] == "pricing":
        return over
    merged = dict(base)
    for key, value in over.items():
        merged[key] = _merge(base[key], value, (*path, key)) if key in base else value
    return merged


def _locate(loc: tuple[Any, ...], parsed: _Parsed, want_key: bool) -> tuple[int, tuple[int, int]]:
    """How deep `loc` goes into `parsed`, and the position there (skipping union tags)."""
    path: Path_ = ()
    depth = 0
    for element in loc:
        for candidate in (element, str(element)):
            if (*path, candidate) in parsed.value_pos:
                path = (*path, candidate)
                depth += 1
                break
    pos = (parsed.key_pos.get(path) if want_key else None) or parsed.value_pos.get(path) or (1, 1)
    return depth, pos


def _strip_optional(tp: Any) -> Any:
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    """Field names of the model that holds the last element of `loc` (for did-you-mean)."""
    tp: Any = Catalog
    for element in loc[:-1]:
        tp = _strip_optional(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            if element not in tp.model_fields:
                return []
            tp = tp.model_fields[element].annotation
        elif get_origin(tp) in (list, dict):
            tp = get_args(tp)[-1]
        else:
            return []
    tp = _strip_optional(tp)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return list(tp.model_fields)
    return []


def _validate(data: Any, files: list[_Parsed]) -> Catalog:
    """Validate merged data; report each error at the file (user first) that wrote the path."""
    if data is None:
        data = {}
    try:
        return Catalog.model_validate(data)
    except ValidationError as exc:
        diagnostics = []
        for err in exc.errors(include_url=False):
            loc = tuple(err["loc"])
            extra = err["type"] == "extra_forbidden"
            best = max(files, key=lambda p: _locate(loc, p, extra)[0])  # max keeps the first on ties
            line, col = _locate(loc, best, extra)[1]
            dotted = ".".join(str(x) for x in loc) or "(top level)"
            hint = None
            if extra:
                message = f"unknown key {loc[-1]!r} at {dotted}"
                allowed = _allowed_keys(loc)
                hint = did_you_mean(str(loc[-1]), allowed) or (
                    f"allowed keys: {', '.join(allowed)}" if allowed else None
                )
            else:
                message = f"{dotted}: {err['msg']}"
            diagnostics.append(Diagnostic(best.file, line, col, f"catalog.{err['type']}", message, hint))
        raise PolicyError(diagnostics, {p.file: p.source for p in files}) from None


@lru_cache(maxsize=1)
def _default_parsed() -> _Parsed:
    return _parse(DEFAULT_CATALOG_PATH)


@lru_cache(maxsize=1)
def _default_catalog() -> Catalog:
    parsed = _default_parsed()
    return _validate(parsed.data, [parsed])


def load_catalog(path: str | os.PathLike[str] | None = None, *, extend: bool = True) -> Catalog:
    """Load the model and price catalog.

    * `path=None`: the packaged catalog (parsed once per process, then shared; it is immutable).
    * `path` with `extend=True` (default): the user file is deep-merged onto the packaged one.
      Providers and models merge by id and the user's entries win; within a model, keys merge
      one by one, except priced blocks (`standard`, `fast.pricing`, `cache`, `data_residency`,
      `batch`), which the user replaces whole, provenance included. So a user file can set
      just `fast.pricing` of one model, or add a model.
    * `path` with `extend=False`: the user file is the whole catalog.

    Raises PolicyError with file:line:col diagnostics for YAML or schema errors.
    """
    if path is None:
        return _default_catalog()
    user = _parse(path)
    if not extend:
        return _validate(user.data, [user])
    if user.data is None:
        return _default_catalog()
    if not isinstance(user.data, dict):
        line, col = user.value_pos.get((), (1, 1))
        raise PolicyError(
            [Diagnostic(user.file, line, col, "catalog.dict_type", "a catalog file must be a mapping")],
            {user.file: user.source},
        )
    default = _default_parsed()
    return _validate(_merge(default.data, user.data), [user, default])
