"""lint: each check against a broken policy, with the exact code, line and column."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from policy_engine.catalog import load_catalog
from policy_engine.check import CODES, lint_file, lint_paths, render
from policy_engine.errors import PolicyError
from policy_engine.cli import main

LINT = Path(__file__).parent / "data" / "lint"
POLICIES = Path(__file__).parent.parent / "policies"
ROOT_EXAMPLES = Path(__file__).parent.parent / "examples"

# file -> every (code, line, col) lint must report, and nothing else.
EXPECTED: dict[str, set[tuple[str, int, int]]] = {
    "01_yaml_error.yaml": {("PE001", 7, 1)},
    "02_duplicate_key.yaml": {("PE002", 4, 1)},
    "03_schema_error.yaml": {("PE012", 4, 5), ("PE010", 6, 5)},
    "04_cel_error.yaml": {("PE101", 5, 19)},
    "05_unreachable_always.yaml": {("PE301", 2, 1), ("PE201", 7, 11)},
    "06_unreachable_subsumed.yaml": {("PE301", 2, 1), ("PE202", 7, 11), ("PE203", 11, 11)},
    "07_guardrail_blocked.yaml": {("PE301", 2, 1), ("PE223", 5, 28), ("PE210", 6, 12), ("PE210", 9, 12)},
    "08_models.yaml": {("PE240", 4, 3), ("PE302", 6, 11), ("PE220", 7, 28), ("PE210", 8, 12), ("PE221", 10, 48),
                       ("PE223", 7, 28), ("PE223", 10, 29), ("PE223", 10, 48),
                       ("PE303", 15, 20), ("PE304", 17, 14)},
    "09_budget_key.yaml": {("PE301", 2, 1), ("PE230", 5, 10), ("PE230", 9, 50)},
    "10_cost_limit.yaml": {("PE104", 5, 11)},
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_broken_policy_reports_exactly_its_findings(name: str) -> None:
    result = lint_file(LINT / name)
    assert {(d.code, d.line, d.col) for d in result.diagnostics} == EXPECTED[name]
    for d in result.diagnostics:
        assert d.severity == CODES[d.code][0], d
        assert d.format(result.source).startswith(f"{LINT / name}:{d.line}:{d.col}: {d.severity}[{d.code}]")


def test_the_directory_yields_every_finding_in_one_run(capsys: pytest.CaptureFixture[str]) -> None:
    assert len(list(LINT.glob("*.yaml"))) == 10
    status = main(["lint", str(LINT), "--format", "json"])
    data = json.loads(capsys.readouterr().out)
    found = {(Path(d["file"]).name, d["code"], d["line"], d["col"]) for d in data["diagnostics"]}
    assert found == {(f, *c) for f, codes in EXPECTED.items() for c in codes}
    assert status == 1
    assert data["summary"] == {"files": 10, "errors": 12, "warnings": 16}


def test_caret_excerpt_points_at_the_misspelt_field() -> None:
    [d] = lint_file(LINT / "04_cel_error.yaml").diagnostics
    assert d.hint == "did you mean 'model'?"
    assert d.format((LINT / "04_cel_error.yaml").read_text()).splitlines()[1:3] == [
        '    5 |     when: request.modle == "claude-opus-4-6"',
        "      |                   ^~~~~",
    ]


def test_shipped_policies_are_clean_even_strict(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["lint", str(POLICIES), "--strict", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["diagnostics"] == []


def test_warnings_fail_only_with_strict(tmp_path: Path) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text((LINT / "09_budget_key.yaml").read_text())
    assert main(["lint", str(policy)]) == 0
    assert main(["lint", str(policy), "--strict"]) == 1


def _policy(tmp_path: Path, rules: str) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(f"version: 1\nname: p\nrules:\n{rules}")
    return path


def _codes(path: Path) -> list[str]:
    return [d.code for d in lint_file(path, run_tests=False).diagnostics if d.code.startswith("PE2")]


@pytest.mark.parametrize(("first", "second", "unreachable"), [
    ("request.max_tokens >= 1000", "request.max_tokens > 2000 && context.interactive", True),
    ("request.max_tokens > 1000", "request.max_tokens >= 1000", False),  # 1000 itself reaches the second
    ("request.model in ['claude-opus-4-6', 'claude-opus-4-8']", "request.model == 'claude-opus-4-6'", True),
    ("request.model.startsWith('claude-opus')", "request.model == 'claude-opus-4-6' && request.stream", True),
    ("request.model.startsWith('claude-opus-4')", "request.model.startsWith('claude-opus')", False),
    ("context.interactive || request.stream", "request.stream && request.has_tools", True),
    ("context.interactive", "context.interactive || request.stream", False),
    ("request.service_tier != 'priority'", "request.service_tier == 'auto'", True),
    ("request.max_tokens < 100 || request.max_tokens > 200", "request.max_tokens == 150", False),
    # an earlier rule reading a field the later one does not can fail alone (absent field): no claim
    ("context.latency_slo_ms > 0 && request.stream", "request.stream", False),
    ("size(request.betas) > 2", "size(request.betas) > 2 && request.stream", True),
])
def test_subsumption(tmp_path: Path, first: str, second: str, unreachable: bool) -> None:
    rules = f'  - name: a\n    when: "{first}"\n    speed: standard\n  - name: b\n    when: "{second}"\n    speed: standard\n'
    assert ("PE202" in _codes(_policy(tmp_path, rules))) is unreachable


def test_priority_tier_rule_is_blocked(tmp_path: Path) -> None:
    rules = "  - name: a\n    when: request.service_tier == 'priority'\n    speed: fast\n"
    assert _codes(_policy(tmp_path, rules)) == ["PE210"]


def test_missing_label_key_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("version: 1\nname: p\nbudgets:\n  - name: team\n    key: context.labels['team']\n"
                    "    window: day\n    limit_usd: 1\n")
    [d] = [d for d in lint_file(path, run_tests=False).diagnostics if d.code == "PE230"]
    assert (d.line, d.col) == (5, 10)
    assert "label is absent" in d.message


def test_sarif_is_2_1_0_with_rules_and_regions() -> None:
    results = lint_paths([str(LINT / "04_cel_error.yaml")])
    sarif = json.loads(render(results, "sarif"))
    assert sarif["version"] == "2.1.0"
    run = sarif["runs"][0]
    ids = [r["id"] for r in run["tool"]["driver"]["rules"]]
    assert set(CODES) <= set(ids)
    [result] = run["results"]
    assert ids[result["ruleIndex"]] == result["ruleId"] == "PE101"
    assert result["level"] == "error"
    location = result["locations"][0]["physicalLocation"]
    assert location["artifactLocation"]["uri"].endswith("tests/data/lint/04_cel_error.yaml")
    assert location["region"] == {"startLine": 5, "startColumn": 19, "endLine": 5, "endColumn": 24}


def test_github_annotations_escape_their_properties() -> None:
    text = render(lint_paths([str(LINT / "02_duplicate_key.yaml")]), "github")
    first = text.splitlines()[0]
    assert first.startswith("::error file=")
    assert ",line=4,col=1,title=PE002::duplicate key 'default' (first defined on line 3)" in first
    assert "%0A" not in first or "\n" not in first


def test_test_files_are_linted_as_test_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = ROOT_EXAMPLES / "default_test.yaml"
    assert main(["lint", str(good)]) == 0
    bad = tmp_path / "orphan_test.yaml"
    bad.write_text("tests:\n  - name: t\n    request: {}\n    expect: {}\n")
    assert main(["lint", str(bad)]) == 1
    assert "orphan.yaml, does not exist" in capsys.readouterr().out


# --- models and their dates (catalog v2) -------------------------------------------------------

RETIRING_POLICY = """\
version: 1
name: retiring
default: standard
rules:
  - name: old-opus
    when: request.model == "claude-opus-4-8"
    speed: fast
tests:
  - name: on the default date
    request: {model: claude-opus-4-8, max_tokens: 10, messages: []}
    expect: {speed: standard}
  - name: pinned to its last day on purpose
    now: "2026-11-30T12:00:00Z"
    request: {model: claude-opus-4-8, max_tokens: 10, messages: []}
    expect: {speed: fast}
"""


def test_a_model_whose_fast_mode_is_retired_is_named_with_its_date_and_source(tmp_path: Path) -> None:
    path = tmp_path / "retiring.yaml"
    path.write_text(RETIRING_POLICY)
    found = [d for d in lint_file(path).diagnostics if d.code == "PE222"]
    assert [(d.line, d.col) for d in found] == [(6, 28), (10, 22)]  # the rule, and the test without its own `now`
    assert "fast mode was retired on 2026-12-01" in found[0].message and "code.claude.com" in found[0].message
    assert found[0].severity == "warning" and "model.fast_available" in (found[0].hint or "")


def test_a_retirement_within_the_warning_window_is_announced(tmp_path: Path) -> None:
    soon = (datetime.now(timezone.utc) + timedelta(days=10)).date()
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(f"""\
version: 2
providers:
  anthropic:
    models:
      claude-opus-5:
        fast: {{supported: true, retired_on: {soon}, after_retirement: standard, source: "our account team"}}
""")
    path = tmp_path / "p.yaml"
    path.write_text('version: 1\nname: p\ndefault: standard\nrules:\n  - name: r\n'
                    '    when: request.model == "claude-opus-5"\n    speed: fast\n')
    [warning] = [d for d in lint_file(path, load_catalog(catalog)).diagnostics if d.code == "PE222"]
    assert f"fast mode retires on {soon}, in 10 days: fast requests will run at standard (our account team)" in warning.message
    assert not [d for d in lint_file(path, load_catalog(catalog), retirement_days=5).diagnostics if d.code == "PE222"]


def test_catalog_errors_are_positioned_with_a_hint(tmp_path: Path) -> None:
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text("""\
version: 2
providers:
  anthropic:
    models:
      my-model:
        standard:
          tiers: [{above_input_tokens: 0, input: 3, output: 15}]
        fast:
          supported: true
          available_from: 2026-05-01
          retired_on: 2026-04-01
          after_retirement: error
      other:
        standard: null
        fast: {supported: true, retired_on: 2026-04-01}
        platforms:
          azure: {model_id: x}
""")
    with pytest.raises(PolicyError) as raised:
        load_catalog(catalog)
    found = {(d.line, d.code): d for d in raised.value.diagnostics}
    assert found[(7, "PE224")].hint and "source" in found[(7, "PE224")].message  # a price without its source
    assert "ends (2026-04-01) before it starts (2026-05-01)" in found[(9, "PE011")].message
    assert "a retirement needs its behaviour" in found[(15, "PE011")].message
    assert "'claude_api', 'claude_platform_aws', 'bedrock', 'vertex' or 'foundry'" in found[(17, "PE011")].message


@pytest.mark.parametrize(("choice", "codes"), [
    ("on_invalid_context: allow_unmetered", [("PE250", 3, 21)]),  # at the value
    ("on_unpriced_model: allow_unmetered", [("PE250", 3, 20)]),
    ("on_incomplete_stream: observed", [("PE250", 3, 23)]),
    ("on_unpriced_model: {price_as: claude-mythos-preview}", [("PE251", 3, 31)]),  # in the catalog, unpriced
    ("on_unpriced_model: {price_as: claude-haiku-4-5}", []),
    ("on_unpriced_model: {rate: {input_usd_per_mtok: 3, output_usd_per_mtok: 15}}", []),
    ("on_invalid_context: reject\non_incomplete_stream: worst_case\non_unpriced_model: conservative", []),
])
def test_choices_that_leave_spend_unmetered_are_warned(tmp_path: Path, choice: str, codes: list[tuple[str, int, int]]) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(f"version: 1\nname: p\n{choice}\n")
    found = [(d.code, d.line, d.col) for d in lint_file(path, run_tests=False).diagnostics if d.code in ("PE250", "PE251")]
    assert found == codes
