"""`policy-engine eval` and `policy-engine bench`: values and types from the real engine, exit codes."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import yaml

from policy_engine.cli import main

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
DEFAULT = ROOT / "policies" / "default.yaml"
REQUEST = str(EXAMPLES / "request.json")


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    status = main(argv)
    out = capsys.readouterr()
    return status, out.out, out.err


@pytest.mark.parametrize("expression, value, type_name", [
    ("request.max_tokens * 2", "8192", "int"),
    ("request.model.startsWith('claude-opus')", "true", "bool"),
    ("context.latency_slo_ms", "20000", "int"),
    ("[request.model, context.tenant]", '["claude-opus-5-5", "acme"]', "list(string)"),
    ("request.input_tokens_exact", "true", "bool"),
])
def test_eval_prints_the_value_and_its_type(expression: str, value: str, type_name: str,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = _run(["eval", expression, "--request", REQUEST, "--context", str(EXAMPLES / "context.json"),
                           "--input-tokens", "2000"], capsys)
    assert status == 0 and out == f"{value}\ntype: {type_name}\n"


def test_eval_sees_the_policys_budgets_variables_and_the_state(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["eval", "budgets.daily_fast_premium.spent_usd", "--request", REQUEST, "--policy", str(DEFAULT),
            "--state", str(EXAMPLES / "state.yaml"), "--format", "json"]
    status, out, _ = _run(argv, capsys)
    assert status == 0 and json.loads(out) == {"expression": "budgets.daily_fast_premium.spent_usd", "type": "double",
                                               "value": 150.0}
    status, out, _ = _run(["eval", "vars.misses_slo", "--request", REQUEST, "--policy", str(DEFAULT),
                           "--context", str(EXAMPLES / "context.json")], capsys)
    assert status == 0 and out == "true\ntype: bool\n"  # standard would take longer than the 20 s SLO
    status, out, _ = _run(["eval", "ratelimit.output_tokens_remaining", "--request", REQUEST,
                           "--state", str(EXAMPLES / "state.yaml"), "--policy", str(DEFAULT)], capsys)
    assert status == 0 and out == "40000\ntype: int\n"


def test_eval_reports_type_and_evaluation_errors_with_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = _run(["eval", "request.max_tokenz > 1", "--request", REQUEST], capsys)
    assert status == 1 and "no field 'max_tokenz'" in err and "did you mean 'max_tokens'?" in err and "^" in err
    status, _, err = _run(["eval", "context.labels['plan']", "--request", REQUEST], capsys)
    assert status == 1 and "evaluation failed" in err and "'plan'" in err
    status, out, _ = _run(["eval", "1 +", "--request", REQUEST, "--format", "json"], capsys)
    assert status == 1 and "error" in json.loads(out)
    status, _, err = _run(["eval", "budget.fraction_left", "--request", REQUEST, "--state", str(EXAMPLES / "state.yaml")], capsys)
    assert status == 2 and "no --policy defines them" in err


def test_eval_usage_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(["eval", "1"], capsys)[0] == 2
    assert _run(["eval", "1", "--request", str(tmp_path / "none.json")], capsys)[0] == 2
    assert _run(["eval", "--help"], capsys)[0] == 0


def test_bench_times_decide_on_the_tests_and_on_a_log(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = _run(["bench", str(DEFAULT), "--min-samples", "50"], capsys)
    assert status == 0
    cases = len(yaml.safe_load(DEFAULT.read_text())["tests"])
    assert out.startswith("policy default @") and f"on the policy's tests: {cases} requests" in out
    assert "decide per request: p50 " in out and " p99 " in out
    log = tmp_path / "log.jsonl"
    with gzip.open(ROOT / "data" / "requests.jsonl.gz", "rt") as source:
        log.write_text("".join(line for _, line in zip(range(200), source)) + "not json\n")
    status, out, _ = _run(["bench", str(DEFAULT), "--requests", str(log), "--min-samples", "300", "--format", "json"], capsys)
    data = json.loads(out)
    assert status == 0 and data["requests"] == 200 and data["invalid"] == 1 and data["samples"] == 400
    us = data["decide_us"]
    assert 0 < us["p50"] <= us["p90"] <= us["p99"] <= us["max"]


def test_bench_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("not json\n")
    status, _, err = _run(["bench", str(DEFAULT), "--requests", str(empty)], capsys)
    assert status == 1 and "could be decided" in err
    assert _run(["bench", str(DEFAULT), "--requests", str(tmp_path / "missing.jsonl")], capsys)[0] == 2
    assert _run(["bench", str(tmp_path / "missing.yaml")], capsys)[0] == 2
    assert _run(["bench", str(DEFAULT), "--limit", "0"], capsys)[0] == 2


def test_the_readme_documents_every_verb_and_option() -> None:
    import argparse

    from policy_engine.cli import build_parser

    readme = (ROOT / "README.md").read_text()
    [verbs] = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    for name, parser in verbs.choices.items():
        assert f"`{name}" in readme, name
        for action in parser._actions:
            for option in action.option_strings:
                if option.startswith("--") and option != "--help":
                    assert option in readme, f"{name} {option}"
