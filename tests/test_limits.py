"""Limits that hold for any input (issue 15): each hostile or simply large policy from the issue is a
positioned diagnostic from `lint`, `explain` and `load()`, never an internal error (exit 3) or a raw
Python exception."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import policy_engine
from policy_engine.cli import main
from policy_engine.errors import PolicyError
from policy_engine.policy import MAX_DURATION_S, MAX_USD

ROOT = Path(__file__).parent.parent
REQUEST = ROOT / "examples" / "request.json"


def _policy(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text("version: 1\nname: limits\ndefault: standard\n" + body)
    return path


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    status = main(argv)
    out = capsys.readouterr()
    text = out.out + out.err
    assert "Traceback" not in text and "internal error" not in text
    return status, text


BUDGET = "budgets:\n  - name: daily\n    window: day\n    limit_usd: {}\n    counts: all\nrules: []\n"


@pytest.mark.parametrize("amount", ["1e309", ".inf", "-.inf", ".nan", "1000000001", "1" + "0" * 400])
def test_money_out_of_range_is_a_diagnostic_everywhere(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                       amount: str) -> None:
    path = _policy(tmp_path, BUDGET.format(amount))
    status, out = _run(["lint", str(path)], capsys)
    assert status == 1 and f"{path}:7:16: error[PE011]: invalid value for 'budgets[0].limit_usd'" in out
    status, out = _run(["explain", str(path), "--request", str(REQUEST)], capsys)
    assert status in (1, 2) and "PE011" in out  # was exit 3 (OverflowError)
    with pytest.raises(PolicyError) as info:
        policy_engine.load(path)  # was OverflowError from decide()
    assert [d.code for d in info.value.diagnostics] == ["PE011"]


def test_the_largest_amount_still_decides_and_counts_exactly(tmp_path: Path) -> None:
    engine = policy_engine.load(_policy(tmp_path, BUDGET.format(MAX_USD)))
    params = json.loads(REQUEST.read_text())
    decision = engine.decide(params)
    assert decision.speed == "standard" and decision.outcome == "allowed"


@pytest.mark.parametrize("ttl", ["99999999999d", str(MAX_DURATION_S + 1), "1" + "0" * 400, "3651d", "0s", "-5"])
def test_durations_out_of_range_are_diagnostics(tmp_path: Path, capsys: pytest.CaptureFixture[str], ttl: str) -> None:
    path = _policy(tmp_path, f"stickiness:\n  ttl: {ttl}\nrules: []\n")
    status, out = _run(["lint", str(path)], capsys)
    assert status == 1 and f"{path}:5:8: error[PE011]: invalid value for 'stickiness.ttl'" in out


@pytest.mark.parametrize("field", ["reset_in_s: .inf", "seconds_since_429: .nan", "reset_in_s: 1e400"])
def test_test_state_durations_must_be_finite(tmp_path: Path, capsys: pytest.CaptureFixture[str], field: str) -> None:
    path = _policy(tmp_path, "rules: []\ntests:\n  - name: t\n    request: {model: claude-opus-4-6, max_tokens: 10,"
                   " messages: [{role: user, content: hi}]}\n"
                   f"    state: {{ratelimit: {{{field}}}}}\n    expect: {{speed: standard}}\n")
    status, out = _run(["lint", str(path)], capsys)
    assert status == 1 and "error[PE011]" in out and "state.ratelimit" in out
