"""The example policies in policies/ load, compile, and pass their own embedded tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from policy_engine.compile import compile_file
from policy_engine.testing.runner import run_policy_tests

POLICIES = sorted((Path(__file__).parent.parent / "policies").glob("*.yaml"))


def test_there_are_example_policies() -> None:
    assert {p.name for p in POLICIES} >= {"default.yaml", "latency-first.yaml", "cost-guard.yaml"}


@pytest.mark.parametrize("path", POLICIES, ids=lambda p: p.name)
def test_example_policy_passes_its_tests(path: Path) -> None:
    compiled = compile_file(str(path))
    assert compiled.policy.tests, f"{path.name} carries no tests"
    assert path.read_text().startswith("# yaml-language-server: $schema=../schemas/policy.schema.json")
    results = run_policy_tests(compiled)
    failures = [r.describe() for r in results if not r.passed]
    assert not failures, "\n".join(failures)


def test_a_wrong_expectation_fails(tmp_path: Path) -> None:
    text = (POLICIES[0].parent / "default.yaml").read_text().replace(
        "expect: {speed: standard, rule: nobody-waiting}", "expect: {speed: fast, rule: nobody-waiting}")
    path = tmp_path / "default.yaml"
    path.write_text(text)
    results = run_policy_tests(compile_file(str(path)))
    [failed] = [r for r in results if not r.passed]
    assert failed.name == "background work stays standard"
    assert failed.failures[0] == "speed: expected 'fast', got 'standard'"
