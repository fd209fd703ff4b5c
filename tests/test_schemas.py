"""The committed JSON Schemas are exactly what the models generate, and they accept the shipped files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml


def as_json(text: str) -> object:
    """YAML as an editor's language server sees it: timestamps and dates are strings."""
    return json.loads(json.dumps(yaml.safe_load(text), default=lambda v: v.isoformat()))

from policy_engine.schemas import SCHEMA_FILES, render

ROOT = Path(__file__).parent.parent


@pytest.mark.parametrize("name", sorted(SCHEMA_FILES))
def test_committed_schema_matches_the_models(name: str) -> None:
    committed = (ROOT / "schemas" / name).read_text(encoding="utf-8")
    assert committed == render(SCHEMA_FILES[name]()), f"schemas/{name} is stale: run `make schemas`"


def test_policy_schema_forbids_unknown_keys_and_names_every_top_level_key() -> None:
    schema = json.loads((ROOT / "schemas" / "policy.schema.json").read_text())
    assert schema["additionalProperties"] is False
    assert {"version", "name", "default", "on_error", "variables", "rules", "ceilings", "budgets", "stickiness", "tests"} <= set(schema["properties"])
    assert schema["required"] == ["version", "name"]


def test_examples_point_editors_at_the_schema() -> None:
    for path in (ROOT / "policies").glob("*.yaml"):
        first = path.read_text().splitlines()[0]
        assert first == "# yaml-language-server: $schema=../schemas/policy.schema.json", path
        assert isinstance(yaml.safe_load(path.read_text()), dict)


def test_editors_schema_accepts_the_examples_and_rejects_a_typo() -> None:
    import jsonschema

    schema = json.loads((ROOT / "schemas" / "policy.schema.json").read_text())
    validator = jsonschema.Draft202012Validator(schema)
    for path in (ROOT / "policies").glob("*.yaml"):
        errors = list(validator.iter_errors(as_json(path.read_text())))
        assert not errors, (path, [e.message for e in errors])
    bad = as_json((ROOT / "policies" / "default.yaml").read_text())
    bad["rules"][0]["speeed"] = "fast"
    assert any("speeed" in e.message for e in validator.iter_errors(bad))


def test_catalog_schema_accepts_the_packaged_catalog() -> None:
    import jsonschema

    from policy_engine.catalog import DEFAULT_CATALOG_PATH

    schema = json.loads((ROOT / "schemas" / "catalog.schema.json").read_text())
    data = as_json(Path(DEFAULT_CATALOG_PATH).read_text())
    errors = [e.message for e in jsonschema.Draft202012Validator(schema).iter_errors(data)]
    assert not errors
