"""JSON Schemas of the policy and catalog files and of decision-log records, generated from their pydantic models.

Editors validate policies with them (`# yaml-language-server: $schema=...`), and a
test keeps the committed copies in `schemas/` equal to what the models generate.
"""

from __future__ import annotations

import json
import types
import typing
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

__all__ = ["policy_schema", "catalog_schema", "decision_record_schema", "serve_openapi", "write_schemas", "SCHEMA_FILES", "policy_reference_markdown"]

_BASE_ID = "https://policy-engine.dev/schemas/"


def policy_schema() -> dict[str, Any]:
    from .policy import Policy

    return _finish(Policy.model_json_schema(mode="validation"), "policy.schema.json", "policy_engine policy file (v1)")


def catalog_schema() -> dict[str, Any]:
    from .catalog import Catalog

    return _finish(Catalog.model_json_schema(mode="validation"), "catalog.schema.json", "policy_engine model catalog")


def _finish(schema: dict[str, Any], filename: str, title: str) -> dict[str, Any]:
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": _BASE_ID + filename, "title": title,
            **{k: v for k, v in schema.items() if k != "title"}}


def decision_record_schema() -> dict[str, Any]:
    """JSON Schema of one decision-log line (`policy_engine.decisionlog`)."""
    from .decisionlog import DecisionRecord

    return _finish(DecisionRecord.model_json_schema(mode="validation"), "decision-record.schema.json",
                   "policy_engine decision-log record (v1)")


def serve_openapi() -> dict[str, Any]:
    """OpenAPI description of `policy-engine serve`'s decision API."""
    from .serve.decisions import openapi

    return openapi()


SCHEMA_FILES = {"policy.schema.json": policy_schema, "catalog.schema.json": catalog_schema,
                "decision-record.schema.json": decision_record_schema, "serve-openapi.json": serve_openapi}


def render(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2, sort_keys=False) + "\n"


def write_schemas(directory: str | Path) -> list[Path]:
    """Write every schema into `directory`; returns the paths written."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, make in SCHEMA_FILES.items():
        path = out / name
        path.write_text(render(make()), encoding="utf-8")
        written.append(path)
    return written


def policy_reference_markdown() -> str:
    """The README's policy format reference: every key, its type, default and meaning, from the models."""
    from .policy import Policy

    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    _rows(Policy, "", rows, set())
    return "\n".join(rows) + "\n"


def _rows(model: Any, prefix: str, rows: list[str], seen: set[str]) -> None:
    for name, info in model.model_fields.items():
        key = f"{prefix}{name}"
        annotation = info.annotation
        nested = _nested_model(annotation)
        default = "*required*" if info.is_required() else (
            "`[]`" if info.default_factory is list else "`{}`" if info.default_factory is dict else
            "" if info.default_factory is not None else f"`{_yaml_value(info.default)}`")
        if info.default is PydanticUndefined and info.default_factory not in (None, list, dict):
            default = "(all defaults)"
        kind = "CEL" if info.json_schema_extra == {"format": "cel"} else _type_name(annotation)
        rows.append(f"| `{key}` | {kind} | {default} | {(info.description or '').replace('|', '/')} |")
        if nested is not None and nested.__name__ not in seen:
            origin = typing.get_origin(annotation)
            suffix = "[]." if origin is list or (origin is typing.Union and _is_list(annotation)) else (
                ".<name>." if origin is dict else ".")
            _rows(nested, key + suffix, rows, seen | {nested.__name__})


def _nested_model(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _nested_model(arg)
        if found is not None and found.__name__ != "ExprText":
            return found
    return None


def _is_list(annotation: Any) -> bool:
    return any(typing.get_origin(a) is list for a in typing.get_args(annotation))


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin is typing.Annotated:
        extra = args[1:]
        if any(getattr(e, "json_schema_extra", None) == {"format": "cel"} for e in extra):
            return "CEL"
        return _type_name(args[0])
    if origin in (typing.Union, getattr(types, "UnionType", None)):
        names = [_type_name(a) for a in args if a is not type(None)]
        return " \\| ".join(names) + (" \\| null" if type(None) in args else "")
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if origin is dict:
        return f"map of {_type_name(args[1])}"
    if annotation is Decimal:
        return "USD"
    if annotation is datetime:
        return "RFC 3339 time"
    if annotation is typing.Any:
        return "any"
    name = getattr(annotation, "__name__", str(annotation))
    return {"str": "string", "int": "int", "float": "number", "bool": "bool", "ExprText": "`{expr: CEL}`"}.get(name, name)


def _yaml_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
