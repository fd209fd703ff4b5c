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


# -- CEL limits, seen from a policy file ---------------------------------------------------------


def _rule(when: str) -> str:
    return f"rules:\n  - name: big\n    when: '{when}'\n    speed: fast\n"


@pytest.mark.parametrize("terms", [201, 499, 500, 3000])
def test_a_long_allowlist_lints_and_loads(tmp_path: Path, capsys: pytest.CaptureFixture[str], terms: int) -> None:
    chain = " || ".join(f'context.tenant == "t{i}"' for i in range(terms))
    path = _policy(tmp_path, _rule(chain))
    status, out = _run(["lint", str(path)], capsys)
    assert "error[" not in out and status == 0, out[-2000:]  # was exit 3: SyntaxError, too many nested parentheses
    engine = policy_engine.load(path)  # was a raw SyntaxError (or "nested too deeply" from 500 terms)
    params = json.loads(REQUEST.read_text())
    assert engine.decide(params, {"tenant": f"t{terms - 1}", "interactive": True}).rule == "big"
    assert engine.decide(params, {"tenant": "nobody", "interactive": True}).rule == "default"


def test_nesting_past_the_limit_is_pe105_at_its_position(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    when = "!" * 70 + "context.interactive"
    path = _policy(tmp_path, _rule(when))
    status, out = _run(["lint", str(path)], capsys)
    column = 12 + 64  # the 65th level: the first '!' is at column 12 of line 6
    assert status == 1 and f"{path}:6:{column}: error[PE105]: expression is nested more than 64 levels deep" in out
    with pytest.raises(PolicyError) as info:
        policy_engine.load(path)
    assert [(d.code, d.line, d.col) for d in info.value.diagnostics] == [("PE105", 6, column)]


def test_an_expression_over_the_size_limit_is_pe106(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    when = " || ".join(f'context.tenant == "tenant-{i:06d}"' for i in range(3000))  # about 105,000 characters
    path = _policy(tmp_path, _rule(when))
    status, out = _run(["lint", str(path)], capsys)
    assert status == 1 and f"{path}:6:12: error[PE106]: expression is {len(when):,} characters long" in out
    assert len(out) < 5_000  # the excerpt is clipped around the column, not 105 KB of source


def test_one_nested_expression_of_the_maximum_size_is_refused_quickly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    when = "-(" * 33_000 + "1" + ")" * 33_000 + " > 0"
    path = _policy(tmp_path, _rule(when))
    status, out = _run(["lint", str(path)], capsys)
    assert status == 1 and "error[PE105]" in out


# -- nothing that did not change is compiled again -----------------------------------------------


def test_linting_or_reloading_an_unchanged_policy_compiles_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from policy_engine import cel
    from policy_engine.reload import ReloadingEngine

    body = ("variables:\n  slow: request.input_tokens > 76543\nrules:\n"
            "  - name: r\n    when: 'vars.slow && context.tenant == \"unique-to-this-test\"'\n    speed: fast\n"
            "budgets:\n  - name: daily\n    key: \"has(context.tenant) ? context.tenant : 'x-unique'\"\n"
            "    window: day\n    limit_usd: 10\n")
    path = _policy(tmp_path, body)
    first = cel.cache_info()
    assert _run(["lint", str(path)], capsys)[0] == 0
    compiled_once = cel.cache_info().misses
    assert compiled_once > first.misses
    assert _run(["lint", str(path)], capsys)[0] == 0
    assert cel.cache_info().misses == compiled_once  # linted again: nothing compiled
    with ReloadingEngine(path, poll_interval_s=0) as engine:
        assert cel.cache_info().misses == compiled_once  # loaded: nothing compiled
        path.write_text(path.read_text().replace("limit_usd: 10", "limit_usd: 20"))
        assert engine.reload() is True  # a new version, the same expressions
        assert cel.cache_info().misses == compiled_once
        path.write_text(path.read_text().replace("76543", "76544"))
        assert engine.reload() is True
        assert cel.cache_info().misses == compiled_once + 1  # only the changed variable


def test_an_analysis_too_large_to_finish_says_what_it_skipped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from policy_engine.check import MAX_IMPLICATION_CHECKS

    # Rules with no equality cannot be indexed: each is compared with all before it.
    n = 2 * int(MAX_IMPLICATION_CHECKS ** 0.5) + 10
    rules = "".join(f"  - name: r{i}\n    when: request.input_tokens > {i} || request.max_tokens > {10 * i}\n"
                    f"    speed: fast\n" for i in range(n))
    path = _policy(tmp_path, "rules:\n" + rules)
    status, out = _run(["lint", str(path), "--format", "json"], capsys)
    data = json.loads(out[:out.rindex("}") + 1])
    [skipped] = [d for d in data["diagnostics"] if d["code"] == "PE290"]
    assert skipped["severity"] == "warning" and "were not checked for PE202" in skipped["message"]
    stopped_at = int(skipped["message"].split("rule 'r")[1].split("'")[0])
    unreachable = [d for d in data["diagnostics"] if d["code"] == "PE202"]
    assert unreachable and all(int(d["message"].split("rule 'r")[1].split("'")[0]) < stopped_at for d in unreachable)


def test_the_indexed_unreachable_rule_search_finds_what_comparing_every_pair_finds() -> None:
    """`_Earlier.covering` looks only at candidates; on random conditions it must name the same
    earlier rule as the pairwise search it replaced (which compared every earlier rule)."""
    import random

    from policy_engine.cel.ast import parsed
    from policy_engine.check import _dnf, _Earlier, _Unknown

    rng = random.Random(15)
    fields = ["context.tenant", "request.model", "request.input_tokens", "context.interactive", "vars.v"]

    def atom() -> str:
        f = rng.choice(fields)
        if f in ("context.tenant", "request.model"):
            pick = rng.random()
            if pick < 0.4:
                return f'{f} == "{rng.choice("abc")}"'
            if pick < 0.55:
                return f'{f} != "{rng.choice("abc")}"'
            if pick < 0.8:
                return f"{f} in [{', '.join(repr(x) for x in rng.sample('abc', rng.randint(1, 3)))}]"
            return f'{f}.startsWith("{rng.choice(["a", "ab", "b"])}")'
        if f in ("context.interactive", "vars.v"):
            return rng.choice([f, "!" + f])
        return f"{f} {rng.choice(['<', '<=', '>', '>=', '==', '!='])} {rng.randint(0, 4)}"

    def condition(depth: int = 0) -> str:
        pick = rng.random()
        if depth < 2 and pick < 0.3:
            return f"({condition(depth + 1)}) || ({condition(depth + 1)})"
        if depth < 2 and pick < 0.6:
            return f"{condition(depth + 1)} && {condition(depth + 1)}"
        return atom()

    found = 0
    for _ in range(300):
        earlier, pairwise = _Earlier(), []
        for i in range(rng.randint(2, 14)):
            try:
                dnf = _dnf(parsed(condition())[0], "")
            except _Unknown:
                continue
            alive = [c for c in dnf if not c.contradictory()]
            if not alive:
                continue
            expected = next((n for n, d in pairwise if all(any(c.implies(e) for e in d) for c in alive)), None)
            assert earlier.covering(alive) == expected
            found += expected is not None
            earlier.add(f"r{i}", alive)
            pairwise.append((f"r{i}", alive))
    assert found > 100  # the random policies do have covered rules
