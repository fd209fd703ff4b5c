"""JSON Schemas of the policy and catalog files, generated from their pydantic models.

Editors validate policies with them (`# yaml-language-server: $schema=...`), and a
test keeps the committed copies in `schemas/` equal to what the models generate.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["policy_schema", "catalog_schema", "write_schemas", "SCHEMA_FILES"]

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


SCHEMA_FILES = {"policy.schema.json": policy_schema, "catalog.schema.json": catalog_schema}


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
