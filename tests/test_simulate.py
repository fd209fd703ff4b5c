"""simulate and diff: figures on a hand-built log match hand computation to the micro-dollar."""

from __future__ import annotations

import functools
import gzip
import io
import json
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policy_engine.cli import main
from policy_engine.compile import compile_file
from policy_engine.decide import load
from policy_engine.errors import CeilingExceeded
from policy_engine.ledger import MemoryLedger
from policy_engine.simulate import LogError, Replayer, diff, iter_log, open_log

ROOT = Path(__file__).parent.parent
SAMPLE = ROOT / "data" / "requests.jsonl.gz"

POLICY = """\
version: 1
name: hand
rules:
  - name: interactive
    when: context.interactive
    speed: fast
budgets:
  - name: fast_day
    window: day
    limit_usd: 0.2
    counts: fast
    on_exceed: downgrade
"""

OPUS = {"model": "claude-opus-4-6", "max_tokens": 1000, "messages": [{"role": "user", "content": "."}]}
LOG = [
    # Opus 4.6: standard $5 / $25 per MTok, fast $30 / $150.
    # 1. fast: worst case 1000 x $30 + 1000 x $150 = $0.18 fits $0.20; bills 1000 x 30 + 500 x 150 = $0.105.
    {"ts": "2026-03-02T10:00:00Z", "context": {"interactive": True}, "input_tokens": 1000,
     "usage": {"input_tokens": 1000, "output_tokens": 500}, "request": OPUS},
    # 2. $0.095 left < $0.18: downgraded; standard bills 1000 x 5 + 500 x 25 = $0.0175.
    {"ts": "2026-03-02T10:05:00Z", "context": {"interactive": True}, "input_tokens": 1000,
     "usage": {"input_tokens": 1000, "output_tokens": 500}, "request": OPUS},
    # 3. no usage: billed as estimated, 2000 in + max_tokens 2000 out at standard = $0.06.
    {"ts": "2026-03-02T10:10:00Z", "context": {"interactive": False}, "input_tokens": 2000,
     "request": dict(OPUS, max_tokens=2000)},
    # 4. a new UTC day, a new window: fast again, $0.105.
    {"ts": "2026-03-03T09:00:00Z", "context": {"interactive": True}, "input_tokens": 1000,
     "usage": {"input_tokens": 1000, "output_tokens": 500}, "request": OPUS},
    # 5. no ts (keeps the previous one); a model without fast mode: downgraded by the guardrail, unpriced.
    {"context": {"interactive": True}, "input_tokens": 10, "usage": {"input_tokens": 10, "output_tokens": 10},
     "request": dict(OPUS, model="claude-mythos-preview")},
]


def _log(tmp_path: Path, extra: list[str] = ()) -> Path:  # type: ignore[assignment]
    path = tmp_path / "log.jsonl"
    path.write_text("\n".join([json.dumps(r) for r in LOG] + list(extra)) + "\n")
    return path


def _policy(tmp_path: Path, text: str = POLICY, name: str = "hand.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_hand_built_log_matches_hand_computation(tmp_path: Path) -> None:
    compiled = compile_file(str(_policy(tmp_path)))
    with open_log(str(_log(tmp_path, ["not json", '{"ts": "2026-03-03T10:00:00Z"}']))) as stream:
        report = Replayer(compiled).run(iter_log(stream))
    data = report.to_dict()
    assert data["requests"] == {"lines": 7, "decided": 5, "invalid": 2, "with_usage": 4, "unpriced": 1,
                                "released": 0, "missing_features": {}}
    assert data["speed_mix"] == {"fast": 2, "standard": 3, "rejected": 0}
    # The Mythos Preview line has no price: on_unpriced_model (conservative) prices it at the catalog's dearest
    # standard rates, $0.000660 for its usage, rather than $0.
    assert data["cost"] == {"total_usd": "0.288160", "fast_premium_usd": "0.175000"}
    assert data["downgrades"] == {"fast_day": 1, "unsupported_model": 1}
    assert data["rejects"] == {}
    assert data["baselines"]["all_standard"]["cost_usd"] == "0.113160"  # the Mythos Preview line conservatively
    # all fast: 3 x $0.105, line 3 at fast 2000 x 30 + 2000 x 150 = $0.36, the Sonnet line $0.
    assert data["baselines"]["all_fast"]["cost_usd"] == "0.675660"
    # 500 output tokens: 1.5 + 500/60 s standard, 1.5 + 500/150 s fast: 5 s saved, twice.
    assert data["latency"]["saved_s"] == pytest.approx(10.0)
    assert data["baselines"]["all_fast"]["latency_saved_s"] == pytest.approx(35.0)  # 3 x 5 + (2000/60 - 2000/150)
    assert data["rules"] == {"interactive": {"fast": 2, "standard": 2}, "default": {"standard": 1}}
    assert data["errors"][0].startswith("line 6: invalid JSON")
    assert data["errors"][1] == "line 7: missing 'request' (the Messages API parameters)"


def test_budget_spend_is_settled_with_actual_usage(tmp_path: Path) -> None:
    # Had line 1 been settled at its $0.18 reservation, line 2 would see $0.02 left, not $0.095.
    compiled = compile_file(str(_policy(tmp_path)))
    replayer = Replayer(compiled)
    with open_log(str(_log(tmp_path))) as stream:
        replayer.run(iter_log(stream))
    assert replayer.ledger.totals() == {"fast_day\x1fglobal\x1fday:2026-03-02@UTC": 105_000,
                                        "fast_day\x1fglobal\x1fday:2026-03-03@UTC": 105_000}


def test_rejects_are_counted_and_cost_nothing(tmp_path: Path) -> None:
    text = POLICY + "ceilings:\n  per_request_usd: 0.01\n  on_exceed: reject\n"
    compiled = compile_file(str(_policy(tmp_path, text)))
    with open_log(str(_log(tmp_path))) as stream:
        report = Replayer(compiled).run(iter_log(stream))
    data = report.to_dict()
    # The unpriced Mythos Preview line is priced conservatively too, so the ceiling rejects it as well.
    assert data["speed_mix"] == {"fast": 0, "standard": 0, "rejected": 5}
    assert data["rejects"] == {"per_request": 5}
    assert data["cost"]["total_usd"] == "0.000000"


def test_replay_agrees_with_the_public_engine(tmp_path: Path) -> None:
    """The replay's decisions and spend equal Engine.decide + settle, line by line, on the sample."""
    policy = str(ROOT / "policies" / "default.yaml")
    with open_log(str(SAMPLE)) as stream:
        lines = [line for _, line in zip(range(1500), iter_log(stream))]
    replayer = Replayer(compile_file(policy))
    outcomes = []
    replayer.run(lines, on_outcome=outcomes.append)
    from datetime import datetime

    clock = [0.0]
    engine = load(policy, ledger=MemoryLedger(clock=lambda: clock[0]))
    for (number, text), outcome in zip(lines, outcomes):
        record = json.loads(text)
        now = datetime.fromisoformat(record["ts"].replace("Z", "+00:00"))
        clock[0] = now.timestamp()
        try:
            decision = engine.decide(record["request"], record.get("context"), now=now, batch=record.get("batch", False),
                                     input_tokens=record.get("input_tokens"))
        except CeilingExceeded as exc:
            decision = exc.decision  # type: ignore[attr-defined]
        speed = "rejected" if decision.outcome == "rejected" else decision.speed
        assert (speed, decision.rule, decision.outcome) == (outcome.speed, outcome.rule, outcome.outcome), number
        if decision.outcome != "rejected":
            settled = engine.settle(decision, dict(record["usage"], speed=decision.speed))
            assert settled.cost_micro == outcome.cost_micro or outcome.priced is False, number
    assert engine.ledger.totals() == replayer.ledger.totals()


def test_cli_reads_gzip_from_stdin_and_renders_every_format(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    policy = str(_policy(tmp_path))
    blob = gzip.compress(_log(tmp_path).read_bytes())
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(blob)))
    assert main(["simulate", policy, "--requests", "-", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["cost"]["total_usd"] == "0.288160"
    assert main(["simulate", policy, "--requests", str(_log(tmp_path)), "--format", "markdown"]) == 0
    markdown = capsys.readouterr().out
    assert "| this policy | $0.29 | $0.18 | 10 s |" in markdown
    assert "| downgrade | `fast_day` | 1 |" in markdown
    assert main(["simulate", policy, "--requests", str(_log(tmp_path))]) == 0
    text = capsys.readouterr()
    assert "speed mix:   fast 2 (40.0%)   standard 3 (60.0%)" in text.out
    assert text.err == ""  # no progress bar when stderr is not a terminal


def test_invalid_lines_are_reported_and_fail_only_with_strict(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policy, log = str(_policy(tmp_path)), str(_log(tmp_path, ['{"request": {"model": 3}}']))
    assert main(["simulate", policy, "--requests", log]) == 0
    assert "1 invalid log lines skipped (first: line 6: params['model'] must be a non-empty string)" in capsys.readouterr().err
    assert main(["simulate", policy, "--requests", log, "--strict"]) == 1
    assert main(["simulate", policy, "--requests", str(tmp_path / "missing.jsonl")]) == 2


def test_diff_groups_changed_decisions_with_deltas(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old = _policy(tmp_path)
    new = _policy(tmp_path, POLICY.replace("when: context.interactive", "when: 'false'"), "new.yaml")
    with open_log(str(_log(tmp_path))) as stream:
        result = diff(compile_file(str(old)), compile_file(str(new)), iter_log(stream))
    data = result.to_dict()
    assert data["changed"] == 4 and data["unchanged"] == 1
    # Lines 1 and 4 go fast -> standard: each saves $0.105 - $0.0175 and costs 5 s.
    groups = {(c["from"], c["to"], c["old_rule"], c["new_rule"]): c for c in data["changes"]}
    fast_to_std = groups[("fast", "standard", "interactive", "default")]
    assert (fast_to_std["requests"], fast_to_std["cost_delta_usd"]) == (2, "-0.175000")
    assert fast_to_std["latency_delta_s"] == pytest.approx(10.0)
    assert fast_to_std["example_lines"] == [1, 4]
    assert data["cost_delta_usd"] == "-0.175000"
    assert main(["diff", str(old), str(new), "--requests", str(_log(tmp_path)), "--format", "markdown"]) == 0
    out = capsys.readouterr().out
    assert "**4 decisions change**, cost **-$0.18**" in out
    assert "| 2 | fast → standard | `interactive` → `default` | -$0.18 | +10 s | 1, 4 |" in out


def test_all_fast_baseline_keeps_batch_and_priority_tier_at_standard(tmp_path: Path) -> None:
    lines = [
        # Batch API: never fast, even in the all-fast baseline. 1000 x $5 + 100 x $25 = $0.0075.
        {"ts": "2026-03-02T10:00:00Z", "batch": True, "input_tokens": 1000,
         "usage": {"input_tokens": 1000, "output_tokens": 100}, "request": OPUS},
        # Priority Tier: the same.
        {"ts": "2026-03-02T10:00:01Z", "input_tokens": 1000, "usage": {"input_tokens": 1000, "output_tokens": 100},
         "request": dict(OPUS, service_tier="priority")},
        # US residency: every rate x 1.1 at fast: (1000 x $30 + 100 x $150) x 1.1 = $0.0495; standard $0.00825.
        {"ts": "2026-03-02T10:00:02Z", "input_tokens": 1000, "usage": {"input_tokens": 1000, "output_tokens": 100},
         "request": dict(OPUS, inference_geo="us")},
    ]
    path = tmp_path / "log.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    with open_log(str(path)) as stream:
        data = Replayer(compile_file(str(_policy(tmp_path)))).run(iter_log(stream)).to_dict()
    assert data["baselines"]["all_standard"]["cost_usd"] == "0.023250"
    assert data["baselines"]["all_fast"]["cost_usd"] == "0.064500"
    assert Decimal(data["cost"]["total_usd"]) == Decimal("0.023250")  # nothing interactive: all standard


def test_progress_bar_draws_on_a_terminal_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from policy_engine.cli.commands import _Progress

    log = _log(tmp_path)
    with open_log(str(log)) as stream:
        bar = _Progress(stream, enabled=True)
        stream.read()
        bar(2048)
        bar.done()
        quiet = _Progress(stream, enabled=False)
        quiet(4096)
    err = capsys.readouterr().err
    assert "[##############################] 100%      2,048 requests" in err
    assert "4,096" not in err


_JSON = st.recursive(st.none() | st.booleans() | st.integers(-5, 10**7) | st.text(max_size=8),
                     lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
                     max_leaves=12)


@functools.lru_cache(maxsize=1)
def _cost_guard() -> Any:
    return compile_file(str(ROOT / "policies" / "cost-guard.yaml"))


@settings(max_examples=150, deadline=None)
@given(st.lists(st.one_of(
    st.text(max_size=30),
    st.fixed_dictionaries({"request": _JSON}, optional={"context": _JSON, "usage": _JSON, "ts": _JSON,
                                                        "input_tokens": _JSON, "batch": _JSON, "account": _JSON,
                                                        "headers": _JSON, "status": _JSON}).map(json.dumps),
    st.fixed_dictionaries({"request": st.just(OPUS), "context": st.just({"interactive": True}),
                           "headers": st.dictionaries(st.sampled_from(["anthropic-fast-output-tokens-remaining",
                                                                       "anthropic-fast-input-tokens-reset", "retry-after"]),
                                                      _JSON, max_size=3)},
                          optional={"status": st.sampled_from([200, 429]), "account": st.text(max_size=3)}).map(json.dumps),
    st.fixed_dictionaries({"request": st.just(OPUS)}, optional={
        "usage": st.fixed_dictionaries({"input_tokens": st.integers(-1, 10**6), "output_tokens": _JSON}),
        "context": st.dictionaries(st.sampled_from(["interactive", "tenant", "latency_slo_ms", "x"]), _JSON, max_size=3),
        "ts": st.one_of(st.integers(-10**12, 10**12), st.text(max_size=12))}).map(json.dumps),
), max_size=8))
def test_any_log_line_is_decided_or_counted_invalid(lines: list[str]) -> None:
    replayer = Replayer(_cost_guard())
    report = replayer.run((i, line) for i, line in enumerate(lines, 1) if line.strip())
    assert report.decided + report.invalid == report.lines
    assert all(amount >= 0 for amount in replayer.ledger.totals().values())


def _general_epoch(ts: str) -> float:
    """The decision time of a `ts` string as the general RFC 3339 parser reads it."""
    now = datetime.fromisoformat(ts[:-1] + "+00:00" if ts.endswith(("Z", "z")) else ts)
    return (now if now.tzinfo else now.replace(tzinfo=timezone.utc)).timestamp()


_STAMPS = st.datetimes(min_value=datetime(1970, 1, 2), max_value=datetime(9998, 12, 31))


@settings(max_examples=400, deadline=None)
@given(_STAMPS, st.sampled_from([0, 1, 3, 4, 6]), st.sampled_from(["Z", "z", "+00:00", "+05:30", ""]),
       st.sampled_from(["T", " "]), st.one_of(st.none(), st.tuples(st.integers(0, 26), st.characters())))
def test_timestamps_read_the_same_through_the_minute_cache(when: Any, digits: int, zone: str, sep: str,
                                                          typo: tuple[int, str] | None) -> None:
    """The log's usual `...THH:MM:SS.fffZ` shape is read with the date and minute cached; every
    string (that shape, others, broken ones) must give the general parser's time, or its error."""
    text = when.strftime(f"%Y-%m-%d{sep}%H:%M:%S") + (f".{when.microsecond:06d}"[:digits + 1] if digits else "") + zone
    if typo is not None:
        text = text[:typo[0]] + typo[1] + text[typo[0] + 1:]
    replayer = Replayer(_cost_guard())
    for ts in (text, text):  # the second read hits the minute cache
        try:
            expected: float | None = _general_epoch(ts)
        except ValueError:
            expected = None
        if expected is None:
            with pytest.raises(LogError):
                replayer._advance(1, ts)
        else:
            replayer._advance(1, ts)
            assert replayer._epoch == expected, ts


def test_rules_see_the_logged_time_to_the_millisecond(tmp_path: Path) -> None:
    policy = _policy(tmp_path, "version: 1\nname: clock\nrules:\n  - name: quarter-past\n"
                               "    when: now.getMinutes() == 15 && now.getMilliseconds() == 250\n    speed: fast\n")
    stamps = ["2026-03-02T09:15:02.250Z", "2026-03-02T09:15:02.251Z", "2026-03-02T10:15:59.250Z",
              "2026-03-02T12:15:02.250+02:00", "2026-03-02T09:15:02.25Z", 1772442902.25, 1772442902.5]
    path = tmp_path / "log.jsonl"
    path.write_text("".join(json.dumps({"ts": ts, "request": OPUS}) + "\n" for ts in stamps))
    outcomes: list[Any] = []
    with open_log(str(path)) as stream:
        Replayer(compile_file(str(policy))).run(iter_log(stream), on_outcome=outcomes.append)
    assert [o.rule for o in outcomes] == ["quarter-past", "default", "quarter-past", "quarter-past", "quarter-past", "quarter-past",
                                            "default"]


def test_a_line_with_a_bad_usage_leaves_no_state_behind(tmp_path: Path) -> None:
    policy = _policy(tmp_path, POLICY + "stickiness:\n  ttl: 10m\n")
    chat = {"interactive": True, "conversation_id": "c-1"}
    lines = [
        {"ts": "2026-03-02T10:00:00Z", "context": chat, "input_tokens": 1000, "request": OPUS,
         "usage": {"input_tokens": 1000, "output_tokens": -5}},
        # Had the bad line been decided, this turn would stick to its fast speed and spend the budget.
        {"ts": "2026-03-02T10:01:00Z", "context": dict(chat, interactive=False), "input_tokens": 1000, "request": OPUS,
         "usage": {"input_tokens": 1000, "output_tokens": 500}},
    ]
    path = tmp_path / "log.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    replayer = Replayer(compile_file(str(policy)))
    outcomes: list[Any] = []
    with open_log(str(path)) as stream:
        report = replayer.run(iter_log(stream), on_outcome=outcomes.append)
    assert report.errors == ["line 1: invalid usage: usage.output_tokens must be >= 0, got -5"]
    assert [(o.speed, o.rule) for o in outcomes] == [("standard", "default")]
    assert replayer.ledger.totals().get("fast_day\x1fglobal\x1fday:2026-03-02@UTC", 0) == 0


def test_a_logged_usage_geo_is_billed_in_every_scenario(tmp_path: Path) -> None:
    # The response says it ran in the US: every rate x 1.1 whatever the request said.
    # standard (1000 x $5 + 100 x $25) x 1.1 = $0.00825; fast (1000 x $30 + 100 x $150) x 1.1 = $0.0495.
    line = {"ts": "2026-03-02T10:00:00Z", "context": {"interactive": True}, "input_tokens": 1000, "request": OPUS,
            "usage": {"input_tokens": 1000, "output_tokens": 100, "inference_geo": "us"}}
    path = tmp_path / "log.jsonl"
    path.write_text(json.dumps(line) + "\n")
    with open_log(str(path)) as stream:
        data = Replayer(compile_file(str(_policy(tmp_path)))).run(iter_log(stream)).to_dict()
    assert data["speed_mix"]["fast"] == 1
    assert data["cost"] == {"total_usd": "0.049500", "fast_premium_usd": "0.041250"}
    assert data["baselines"]["all_standard"]["cost_usd"] == "0.008250"
    assert data["baselines"]["all_fast"]["cost_usd"] == "0.049500"


def test_logged_rate_limit_headers_drive_later_decisions(tmp_path: Path) -> None:
    """A response that says the fast output limit is spent downgrades the account's next fast request
    (the rate_limited guardrail); other accounts are not affected; a 429's retry-after holds 20 s."""
    spent = {"anthropic-fast-output-tokens-limit": "8000", "anthropic-fast-output-tokens-remaining": "0",
             "anthropic-fast-output-tokens-reset": "2026-03-02T10:00:30Z", "x-request-id": "r-1"}
    chat = {"interactive": True}
    usage = {"input_tokens": 100, "output_tokens": 100}
    small = dict(OPUS, max_tokens=100)
    lines = [
        {"ts": "2026-03-02T10:00:00Z", "context": chat, "input_tokens": 100, "usage": usage, "request": small,
         "account": "ws:a", "headers": spent},
        # The same second: nothing replenished yet (fast mode refills continuously, 8000 / 30 s here).
        {"ts": "2026-03-02T10:00:00Z", "context": chat, "input_tokens": 100, "usage": usage, "request": small, "account": "ws:a"},
        {"ts": "2026-03-02T10:00:00Z", "context": chat, "input_tokens": 100, "usage": usage, "request": small, "account": "ws:b"},
        {"ts": "2026-03-02T10:00:31Z", "context": chat, "input_tokens": 100, "usage": usage, "request": small, "account": "ws:a"},
        # A fast 429 with retry-after: 20 s of standard for that account, whatever the counts say.
        {"ts": "2026-03-02T10:01:00Z", "context": chat, "input_tokens": 100, "usage": usage, "request": small,
         "account": "ws:b", "status": 429, "headers": {"retry-after": "20"}},
        {"ts": "2026-03-02T10:01:15Z", "context": chat, "input_tokens": 100, "usage": usage, "request": small, "account": "ws:b"},
        {"ts": "2026-03-02T10:01:21Z", "context": chat, "input_tokens": 100, "usage": usage, "request": small, "account": "ws:b"},
        {"ts": "2026-03-02T10:01:22Z", "context": chat, "input_tokens": 100, "usage": usage, "request": small,
         "account": 7, "headers": spent},
    ]
    path = tmp_path / "log.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    outcomes: list[Any] = []
    with open_log(str(path)) as stream:
        report = Replayer(compile_file(str(_policy(tmp_path)))).run(iter_log(stream), on_outcome=outcomes.append)
    assert [(o.speed, o.forced_by) for o in outcomes] == [
        ("fast", None), ("standard", "rate_limited"), ("fast", None), ("fast", None),
        ("fast", None), ("standard", "rate_limited"), ("fast", None)]
    assert report.downgrades == {"rate_limited": 2}
    assert report.errors == ["line 8: 'account' must be a string"]


def test_lines_split_or_not_parse_to_the_same_records(tmp_path: Path) -> None:
    """The request-last split must read every line as json.loads does, whatever it holds."""
    tool = {"name": "fetch", "input_schema": {"type": "object", "properties": {"request": {"type": "string"}}}}
    request = dict(OPUS, tools=[tool])
    lines = [
        json.dumps({"ts": "2026-03-02T10:00:00Z", "request": request}, separators=(",", ":")),
        json.dumps({"context": {"labels": {"request": "x"}}, "request": request}, separators=(",", ":")),
        '{"request":{"model":"a"},"x":1,"request":' + json.dumps(request) + "}",  # the last key wins
        '{"ts":1,"request":' + json.dumps(request) + ',"usage":{"input_tokens":1,"output_tokens":1}}',
        '{"ts":1,"request":' + json.dumps(request) + ' }',
        '{"a":"\\",\\"request\\":{}}","request":' + json.dumps(request) + "}",
        '{"ts":1,"request":{"model":"a"}}}',
        '{"ts":1,"request":}',
    ]
    replayer = Replayer(_cost_guard())
    for number, text in enumerate(lines * 2, 1):  # twice: the second time from the request cache
        try:
            expected: Any = json.loads(text)
        except ValueError:
            with pytest.raises(LogError):
                replayer.parse(number, text)
            continue
        assert replayer.parse(number, text) == expected, text
