"""The decision against policies/default.yaml: rules, guardrails, ceilings, on_error, stickiness, errors.

Figures are hand-computed from the packaged catalog (claude-opus-4-6: standard $5/$25
per MTok; fast $30/$150 up to 200K input tokens, $60/$225 above; 5-minute cache
writes 1.25x input) and from the throughput defaults (60 / 150 output tokens per
second, 1.5 s to first token).
"""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from policy_engine.catalog import load_catalog
from policy_engine.decide import FAST_BETA, Decision, Engine, RuleEvaluationError, load
from policy_engine.errors import CeilingExceeded, InvalidContext, InvalidRequest, PolicyEngineError
from policy_engine.ledger import MemoryLedger, Scope, window_bounds

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_POLICY = ROOT / "policies" / "default.yaml"
NOON = datetime(2026, 3, 2, 12, 0, tzinfo=timezone.utc)

OPUS = "claude-opus-4-6"
CHAT: dict[str, Any] = {"model": OPUS, "max_tokens": 4096, "messages": [{"role": "user", "content": "Refactor this module"}]}
WAITING = {"interactive": True, "latency_slo_ms": 20_000}
"""Standard would take 1.5 s + 4096 / 60 s = 69.8 s: the SLO is missed, so the default policy picks fast."""


@pytest.fixture()
def engine() -> Engine:
    return load(DEFAULT_POLICY)


EAGER_POLICY = """\
version: 1
name: eager
default: standard
rules:
  - name: interactive-misses-slo
    when: context.interactive
    speed: fast
ceilings:
  per_request_usd: 10
  on_exceed: reject
"""
"""Asks for fast on every interactive request, whatever the model: only the guardrails stand in its way."""


@pytest.fixture()
def eager(tmp_path: Path) -> Engine:
    path = tmp_path / "eager.yaml"
    path.write_text(EAGER_POLICY)
    return load(path)


def premium_scope(when: Any = NOON) -> Scope:
    """The scope the default policy's `daily_fast_premium` budget charges on `when`'s UTC day."""
    window, _, end = window_bounds("day", "UTC", when)
    return Scope("daily_fast_premium", "global", window, 200_000_000, end.timestamp())


def spend(engine: Engine, scope: Scope, micro: int) -> None:
    """Record settled spend directly in the ledger, as earlier requests would have."""
    engine.ledger.settle(f"earlier-{micro}-{scope.key}", [(scope, micro)])


# --------------------------------------------------------------------------- rules


def test_interactive_opus_that_misses_its_slo_goes_fast(engine: Engine) -> None:
    d = engine.decide(CHAT, WAITING, now=NOON)
    assert (d.speed, d.rule, d.outcome) == ("fast", "interactive-misses-slo", "allowed")
    assert d.reasons == ["interactive-misses-slo: standard would take ~69766ms, the SLO is 20000ms"]
    assert d.guardrails == [] and d.ceilings == [] and d.errors == []
    assert d.policy_name == "default" and len(d.policy_version) == 12
    assert d.reservation_id is not None
    assert d.estimate_micro == d.estimate_fast_micro


def test_a_generous_slo_falls_to_the_default(engine: Engine) -> None:
    d = engine.decide(CHAT, {"interactive": True, "latency_slo_ms": 70_000}, now=NOON)
    assert (d.speed, d.rule, d.outcome) == ("standard", "default", "allowed")
    assert d.reasons == ["no rule matched; policy default is standard"]


@pytest.mark.parametrize("context", [None, {}, {"interactive": False, "latency_slo_ms": 1}])
def test_nobody_waiting_stays_standard(engine: Engine, context: Any) -> None:
    d = engine.decide(CHAT, context, now=NOON)
    assert (d.speed, d.rule) == ("standard", "nobody-waiting")


def test_input_bound_is_strictly_above_150k_tokens(engine: Engine) -> None:
    params = {**CHAT, "max_tokens": 512}
    ctx = {"interactive": True, "latency_slo_ms": 5000}
    assert engine.decide(params, ctx, now=NOON, input_tokens=150_001).rule == "input-bound"
    at_threshold = engine.decide(params, ctx, now=NOON, input_tokens=150_000)
    assert (at_threshold.speed, at_threshold.rule) == ("fast", "interactive-misses-slo")


def test_estimated_and_counted_input_tokens(engine: Engine) -> None:
    estimated = engine.decide(CHAT, WAITING, now=NOON)
    assert not estimated.input_tokens_exact and 4 < estimated.input_tokens < 100
    # Worst case at fast: every input token at $30/MTok plus 4096 output tokens at $150/MTok.
    assert estimated.estimate_fast_micro == estimated.input_tokens * 30 + 4096 * 150
    counted = engine.decide(CHAT, WAITING, now=NOON, input_tokens=1234)
    assert counted.input_tokens_exact and counted.input_tokens == 1234
    assert counted.estimate_standard_micro == 1234 * 5 + 4096 * 25
    assert counted.estimate_fast_micro == 1234 * 30 + 4096 * 150


def test_cache_control_is_estimated_at_the_cache_write_rate(engine: Engine) -> None:
    params = {**CHAT, "system": [{"type": "text", "text": "You are terse.", "cache_control": {"type": "ephemeral"}}]}
    d = engine.decide(params, WAITING, now=NOON, input_tokens=1000)
    assert d.estimate_standard_micro == 1000 * 5 * 5 // 4 + 4096 * 25  # 1.25 x $5/MTok
    assert d.estimate_fast_micro == 1000 * 30 * 5 // 4 + 4096 * 150


# --------------------------------------------------------------------------- guardrails


def _assert_guarded(d: Decision, *names: str) -> None:
    assert d.speed == "standard" and d.outcome == "downgraded"
    assert d.rule == "interactive-misses-slo"  # the rule still says who wanted fast
    assert d.guardrails == list(names) and d.forced_by == names[0]
    for name in names:
        assert any(r.startswith(f"guardrail {name}:") for r in d.reasons), d.reasons


def test_guardrail_unsupported_model_not_in_catalog(eager: Engine) -> None:
    d = eager.decide({**CHAT, "model": "claude-opus-9-preview"}, WAITING, now=NOON)
    _assert_guarded(d, "unsupported_model")
    assert "not in the catalog" in d.reasons[-1] or any("not in the catalog" in r for r in d.reasons)
    # on_unpriced_model defaults to conservative: the catalog's dearest standard rates bound it, never fast.
    assert d.estimate_fast_micro is None
    card = eager.dearest_rates("standard", "claude_api")[0][1]
    assert d.estimate_standard_micro == -(-(d.input_tokens * card.input + 4096 * card.output) // 1_000_000)
    assert any("on_unpriced_model" in r and "dearest" in r for r in d.reasons), d.reasons
    assert d.ceilings == []  # priced conservatively, so the ceiling is enforced


def test_guardrail_unsupported_model_in_a_user_catalog(tmp_path: Path) -> None:
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text("""\
version: 1
providers:
  anthropic:
    models:
      claude-opus-legacy:
        standard:
          tiers: [{above_input_tokens: 0, input: 15, output: 75}]
          as_of: 2026-01-01
          source: test
        fast: {supported: false}
        cache: {write_5m: "1.25", write_1h: "2", read: "0.1", as_of: 2026-01-01, source: test}
""")
    policy = tmp_path / "eager.yaml"
    policy.write_text(EAGER_POLICY)
    engine = load(policy, catalog=catalog)
    d = engine.decide({**CHAT, "model": "claude-opus-legacy"}, WAITING, now=NOON, input_tokens=100)
    _assert_guarded(d, "unsupported_model")
    assert any("does not support fast mode" in r for r in d.reasons)
    assert d.estimate_standard_micro == 100 * 15 + 4096 * 75 and d.estimate_fast_micro is None


def test_guardrail_unpriced_fast_model(eager: Engine) -> None:
    # Mythos 5.2 supports fast mode, but no source prices it: its cost cannot be bounded.
    d = eager.decide({**CHAT, "model": "claude-mythos-5-2"}, WAITING, now=datetime(2026, 12, 3, tzinfo=timezone.utc))
    _assert_guarded(d, "unpriced")
    assert d.estimate_fast_micro is None


def test_guardrail_batch(engine: Engine) -> None:
    _assert_guarded(engine.decide(CHAT, WAITING, now=NOON, batch=True), "batch")


def test_batch_is_allowed_where_the_catalog_says_fast_works_with_batch(tmp_path: Path) -> None:
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text("version: 1\nproviders: {anthropic: {models: {claude-opus-4-6: {fast: {fast_with_batch: true}}}}}\n")
    d = load(DEFAULT_POLICY, catalog=catalog).decide(CHAT, WAITING, now=NOON, batch=True)
    assert d.speed == "fast" and d.guardrails == []


def test_guardrail_priority_tier() -> None:
    engine = load(DEFAULT_POLICY, priority_tier=True)
    # With Priority Tier on the account, service_tier "auto" (the default) may run on it.
    _assert_guarded(engine.decide(CHAT, WAITING, now=NOON), "priority_tier")
    _assert_guarded(engine.decide({**CHAT, "service_tier": "auto"}, WAITING, now=NOON), "priority_tier")
    # "standard_only" keeps the request off Priority Tier, so fast is allowed.
    assert engine.decide({**CHAT, "service_tier": "standard_only"}, WAITING, now=NOON).speed == "fast"
    # Without Priority Tier on the account, "auto" is just standard capacity.
    assert load(DEFAULT_POLICY).decide(CHAT, WAITING, now=NOON).speed == "fast"


def test_guardrail_rate_limited(engine: Engine) -> None:
    t = NOON.timestamp()
    engine.ratelimits.update("acct-a", now=t, output_tokens_remaining=0, reset_at=t + 20)
    _assert_guarded(engine.decide(CHAT, WAITING, now=NOON, account="acct-a"), "rate_limited")
    # Rate-limit state is per account.
    assert engine.decide(CHAT, WAITING, now=NOON, account="acct-b").speed == "fast"
    # Fewer input tokens left than the request needs.
    engine.ratelimits.update("acct-c", now=t, input_tokens_remaining=999, output_tokens_remaining=5000)
    _assert_guarded(engine.decide(CHAT, WAITING, now=NOON, account="acct-c", input_tokens=1000), "rate_limited")
    assert engine.decide(CHAT, WAITING, now=NOON, account="acct-c", input_tokens=999).speed == "fast"
    # After a 429, until retry-after has passed.
    engine.ratelimits.update("acct-d", now=t, retry_after_until=t + 30)
    _assert_guarded(engine.decide(CHAT, WAITING, now=NOON, account="acct-d"), "rate_limited")
    assert engine.decide(CHAT, WAITING, now=NOON + timedelta(seconds=31), account="acct-d").speed == "fast"


def test_every_guardrail_that_applies_is_named(engine: Engine) -> None:
    t = NOON.timestamp()
    engine.ratelimits.update("default", now=t, output_tokens_remaining=0)
    _assert_guarded(engine.decide(CHAT, WAITING, now=NOON, batch=True), "batch", "rate_limited")


def test_guardrails_leave_standard_decisions_alone(engine: Engine) -> None:
    d = engine.decide(CHAT, {"interactive": False}, now=NOON, batch=True)
    assert (d.speed, d.outcome, d.guardrails) == ("standard", "allowed", [])


# --------------------------------------------------------------------------- per-request ceiling and price tiers

BIG_SLO = {"interactive": True, "latency_slo_ms": 60_000}
"""10K output tokens at standard take 168 s: fast is wanted."""


def test_over_200k_input_tokens_is_priced_at_the_higher_tier_and_downgraded(engine: Engine) -> None:
    d = engine.decide({**CHAT, "max_tokens": 10_000}, BIG_SLO, now=NOON, input_tokens=250_000)
    # 250K x $60/MTok + 10K x $225/MTok = $15 + $2.25; standard 250K x $5 + 10K x $25 = $1.50.
    assert d.estimate_fast_micro == 17_250_000
    assert d.estimate_standard_micro == 1_500_000
    assert (d.speed, d.outcome, d.ceilings, d.forced_by) == ("standard", "downgraded", ["per_request"], "per_request")
    assert d.rule == "interactive-misses-slo"
    assert any("$17.25 is over $10.00; standard fits" in r for r in d.reasons), d.reasons


def test_exactly_200k_input_tokens_is_still_the_lower_tier(engine: Engine) -> None:
    params = {**CHAT, "max_tokens": 10_000}
    lower = engine.decide(params, BIG_SLO, now=NOON, input_tokens=200_000)
    assert lower.estimate_fast_micro == 200_000 * 30 + 10_000 * 150  # $7.50: fits the $10 ceiling
    assert (lower.speed, lower.outcome) == ("fast", "allowed")
    higher = engine.decide(params, BIG_SLO, now=NOON, input_tokens=200_001)
    assert higher.estimate_fast_micro == 200_001 * 60 + 10_000 * 225
    assert higher.speed == "standard" and higher.ceilings == ["per_request"]


@pytest.mark.parametrize("geo", [None, "us"])
@pytest.mark.parametrize("cache", [False, True])
def test_decision_estimates_are_the_catalogs_worst_case(engine: Engine, geo: str | None, cache: bool) -> None:
    """The engine prices from cards it looked up once per model: the figures must be `catalog.estimate`'s."""
    from policy_engine.catalog import estimate

    opus = engine.catalog.model(OPUS)
    for tokens in (0, 1, 57, 199_999, 200_000, 200_001, 1_000_000):
        for max_tokens in (1, 4096, 128_000):
            params: dict[str, Any] = {**CHAT, "max_tokens": max_tokens}
            if geo:
                params["inference_geo"] = geo
            if cache:
                params["system"] = [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}]
            try:
                d = engine.decide(params, {"interactive": False}, now=NOON, input_tokens=tokens)
            except CeilingExceeded as exc:  # over the $10 ceiling: the rejected decision has the estimates
                d = exc.decision  # type: ignore[attr-defined]
            expected = [estimate(opus, speed=speed, input_tokens=tokens, max_tokens=max_tokens, cache_control=cache,
                                 inference_geo=geo) for speed in ("standard", "fast")]
            assert [d.estimate_standard_micro, d.estimate_fast_micro] == expected, (tokens, max_tokens)


def test_standard_at_exactly_the_per_request_ceiling_fits(engine: Engine) -> None:
    params = {**CHAT, "max_tokens": 10_000}
    # 1.95M x $5/MTok + 10K x $25/MTok = $10.00 exactly: the ceiling is inclusive.
    at_limit = engine.decide(params, BIG_SLO, now=NOON, input_tokens=1_950_000)
    assert at_limit.estimate_standard_micro == 10_000_000
    assert (at_limit.speed, at_limit.outcome, at_limit.ceilings) == ("standard", "downgraded", ["per_request"])
    with pytest.raises(CeilingExceeded):
        engine.decide(params, BIG_SLO, now=NOON, input_tokens=1_950_001)


def test_per_request_ceiling_rejects_when_even_standard_is_over(engine: Engine) -> None:
    with pytest.raises(CeilingExceeded) as caught:
        engine.decide({**CHAT, "max_tokens": 10_000}, BIG_SLO, now=NOON, input_tokens=2_000_000)
    exc = caught.value
    # Standard worst case: 2M x $5/MTok + 10K x $25/MTok = $10.25 > $10.
    assert exc.ceiling == "per_request"
    assert Decimal(exc.limit_usd) == Decimal("10")
    assert Decimal(exc.spent_plus_reserved_usd) == 0
    assert Decimal(exc.estimate_usd) == Decimal("10.25")
    assert isinstance(exc, PolicyEngineError)
    d = exc.decision  # type: ignore[attr-defined]
    assert d.outcome == "rejected" and d.reservation_id is None and d.ceilings == ["per_request"]


def test_per_request_ceiling_allow_runs_over_it_at_standard(policy_variant: Any) -> None:
    engine = load(policy_variant(("on_exceed: reject", "on_exceed: allow")))
    d = engine.decide({**CHAT, "max_tokens": 10_000}, BIG_SLO, now=NOON, input_tokens=2_000_000)
    assert (d.speed, d.outcome, d.ceilings) == ("standard", "downgraded", ["per_request"])
    assert d.reservation_id is not None
    assert any("allowed by policy" in r for r in d.reasons)


# --------------------------------------------------------------------------- budgets

HELLO: dict[str, Any] = {"model": OPUS, "max_tokens": 4096, "messages": [{"role": "user", "content": "Hello"}]}
PREMIUM = 10 * (30 - 5) + 4096 * (150 - 25)
"""The fast premium of HELLO counted at 10 input tokens: 512,250 micro-dollars."""


def test_premium_budget_fits_to_the_last_micro_dollar(engine: Engine) -> None:
    spend(engine, premium_scope(), 200_000_000 - PREMIUM)
    d = engine.decide(HELLO, WAITING, now=NOON, input_tokens=10)
    assert (d.speed, d.outcome, d.ceilings) == ("fast", "allowed", [])
    [balance] = engine.ledger.balances([premium_scope()])
    assert balance.remaining == 0 and balance.reserved == PREMIUM


def test_premium_budget_one_micro_dollar_short_downgrades(engine: Engine) -> None:
    spend(engine, premium_scope(), 200_000_000 - PREMIUM + 1)
    d = engine.decide(HELLO, WAITING, now=NOON, input_tokens=10)
    assert (d.speed, d.outcome, d.ceilings, d.forced_by) == ("standard", "downgraded", ["daily_fast_premium"], "daily_fast_premium")
    assert any(r.startswith("budget daily_fast_premium: fast worst case does not fit ($0.512249 left of $200.00)") for r in d.reasons), d.reasons
    # Standard spends no premium, so the downgraded request still reserves (nothing) and goes ahead.
    assert d.reservation_id is not None
    [balance] = engine.ledger.balances([premium_scope()])
    assert balance.reserved == 0


def test_budget_windows_are_calendar_days(engine: Engine) -> None:
    spend(engine, premium_scope(), 200_000_000)  # today's premium budget is gone
    assert engine.decide(HELLO, WAITING, now=NOON, input_tokens=10).speed == "standard"
    tomorrow = NOON + timedelta(days=1)
    assert engine.decide(HELLO, WAITING, now=tomorrow, input_tokens=10).speed == "fast"


def test_outstanding_reservations_count_against_a_budget(engine: Engine) -> None:
    spend(engine, premium_scope(), 200_000_000 - 2 * PREMIUM)
    first = engine.decide(HELLO, WAITING, now=NOON, input_tokens=10)
    second = engine.decide(HELLO, WAITING, now=NOON, input_tokens=10)
    third = engine.decide(HELLO, WAITING, now=NOON, input_tokens=10)
    assert [first.speed, second.speed, third.speed] == ["fast", "fast", "standard"]
    engine.release(first)
    assert engine.decide(HELLO, WAITING, now=NOON, input_tokens=10).speed == "fast"


TENANT_BUDGET = """\
budgets:
  - name: tenant_all
    key: context.tenant
    window: month
    timezone: America/New_York
    limit_usd: 1
    counts: all
    on_exceed: reject
  - name: daily_fast_premium"""


def test_a_rejecting_budget_raises_with_name_limit_spent_and_estimate(policy_variant: Any) -> None:
    engine = load(policy_variant(("budgets:\n  - name: daily_fast_premium", TENANT_BUDGET)))
    ctx = {"interactive": True, "latency_slo_ms": 5000, "tenant": "acme"}
    small = {**HELLO, "max_tokens": 1000}
    held = engine.decide(small, ctx, now=NOON, input_tokens=10)  # fast: 10 x $30 + 1000 x $150 = $0.1503
    assert held.speed == "fast" and held.estimate_fast_micro == 150_300
    window, _, end = window_bounds("month", "America/New_York", NOON)
    scope = Scope("tenant_all", "acme", window, 1_000_000, end.timestamp())
    spend(engine, scope, 800_000)
    with pytest.raises(CeilingExceeded) as caught:
        engine.decide(small, ctx, now=NOON, input_tokens=10)
    exc = caught.value
    assert exc.ceiling == "tenant_all"
    assert Decimal(exc.limit_usd) == 1
    assert Decimal(exc.spent_plus_reserved_usd) == Decimal("0.9503")  # $0.80 spent + $0.1503 reserved
    assert Decimal(exc.estimate_usd) == Decimal("0.1503")
    assert "tenant_all" in str(exc)
    # Another tenant has its own budget; the rejected request reserved nothing.
    assert engine.decide(small, {**ctx, "tenant": "globex"}, now=NOON, input_tokens=10).speed == "fast"
    [balance] = engine.ledger.balances([scope])
    assert (balance.spent, balance.reserved) == (800_000, 150_300)


def test_a_downgrading_all_spend_budget_rejects_when_standard_does_not_fit_either(policy_variant: Any) -> None:
    engine = load(policy_variant(("budgets:\n  - name: daily_fast_premium",
                                            TENANT_BUDGET.replace("on_exceed: reject", "on_exceed: downgrade"))))
    ctx = {"interactive": True, "latency_slo_ms": 5000, "tenant": "acme"}
    small = {**HELLO, "max_tokens": 1000}
    window, _, end = window_bounds("month", "America/New_York", NOON)
    scope = Scope("tenant_all", "acme", window, 1_000_000, end.timestamp())
    spend(engine, scope, 1_000_000 - 25_050)  # standard worst case is 10 x $5 + 1000 x $25 = $0.02505
    d = engine.decide(small, ctx, now=NOON, input_tokens=10)
    assert (d.speed, d.outcome, d.ceilings) == ("standard", "downgraded", ["tenant_all"])
    with pytest.raises(CeilingExceeded) as caught:
        engine.decide(small, ctx, now=NOON, input_tokens=10)
    assert caught.value.ceiling == "tenant_all" and Decimal(caught.value.estimate_usd) == Decimal("0.02505")


def test_rules_read_budget_features(policy_variant: Any) -> None:
    rule = """rules:
  - name: budget-low
    when: budget.fraction_left < 0.5 && budgets.daily_fast_premium.remaining_usd < 100.0
    speed: standard
    reason: the premium budget is half gone
"""
    engine = load(policy_variant(("rules:\n", rule)))
    assert engine.decide(HELLO, WAITING, now=NOON, input_tokens=10).speed == "fast"
    spend(engine, premium_scope(), 100_000_001)
    assert engine.decide(HELLO, WAITING, now=NOON, input_tokens=10).rule == "budget-low"


# --------------------------------------------------------------------------- on_error

FAILING_RULE = """rules:
  - name: vip-label
    when: context.labels["tier"] == "vip"
    speed: fast
"""
OVERFLOW_RULE = """rules:
  - name: overflow
    when: request.max_tokens * 9223372036854775807 > 0
    speed: fast
"""


@pytest.mark.parametrize("rule, message", [(FAILING_RULE, "no such key: 'tier'"), (OVERFLOW_RULE, "int64 overflow")])
def test_on_error_skip_moves_on_to_the_next_rule(policy_variant: Any, rule: str, message: str) -> None:
    engine = load(policy_variant(("rules:\n", rule)))
    d = engine.decide(CHAT, WAITING, now=NOON)
    assert (d.speed, d.rule) == ("fast", "interactive-misses-slo")
    assert len(d.errors) == 1 and d.errors[0].startswith(f"rule {rule.split()[3]}:") and message in d.errors[0]


def test_on_error_skip_is_not_triggered_when_the_rule_evaluates(policy_variant: Any) -> None:
    engine = load(policy_variant(("rules:\n", FAILING_RULE)))
    d = engine.decide(CHAT, {"interactive": False, "labels": {"tier": "vip"}}, now=NOON)
    assert (d.speed, d.rule, d.errors) == ("fast", "vip-label", [])


@pytest.mark.parametrize("rule", [FAILING_RULE, OVERFLOW_RULE])
def test_on_error_standard_forces_standard(policy_variant: Any, rule: str) -> None:
    engine = load(policy_variant(("rules:\n", rule), ("on_error: skip", "on_error: standard")))
    d = engine.decide(CHAT, WAITING, now=NOON)
    name = rule.split()[3]
    assert (d.speed, d.rule, d.outcome) == ("standard", name, "allowed")
    assert any("failed to evaluate; on_error forces standard" in r for r in d.reasons)
    assert len(d.errors) == 1


@pytest.mark.parametrize("rule", [FAILING_RULE, OVERFLOW_RULE])
def test_on_error_raise_raises_a_typed_error_and_reserves_nothing(policy_variant: Any, rule: str) -> None:
    engine = load(policy_variant(("rules:\n", rule), ("on_error: skip", "on_error: raise")))
    with pytest.raises(RuleEvaluationError) as caught:
        engine.decide(CHAT, WAITING, now=NOON)
    exc = caught.value
    assert isinstance(exc, PolicyEngineError)
    assert exc.rule == rule.split()[3] and exc.policy == "default"
    assert exc.decision.errors and exc.decision.outcome == "rejected"
    assert exc.decision.reservation_id is None
    assert engine.ledger.balances([premium_scope()])[0].reserved == 0


def test_a_failing_variable_fails_each_rule_that_reads_it(policy_variant: Any) -> None:
    engine = load(policy_variant(
        ("variables:\n", 'variables:\n  tier: context.labels["tier"]\n'),
        ("rules:\n", 'rules:\n  - name: uses-tier\n    when: vars.tier == "vip"\n    speed: fast\n'
                     '  - name: uses-tier-again\n    when: vars.tier == "gold"\n    speed: fast\n')))
    d = engine.decide(CHAT, WAITING, now=NOON)
    assert d.rule == "interactive-misses-slo"
    assert [e.split(":")[0] for e in d.errors] == ["rule uses-tier", "rule uses-tier-again"]


def test_a_failing_reason_expression_keeps_the_decision(policy_variant: Any) -> None:
    # string(int(vars.standard_ms)) overflows int64 for an absurd max_tokens: the rule still decides.
    engine = load(policy_variant(("on_exceed: reject", "on_exceed: allow")))
    d = engine.decide({**CHAT, "max_tokens": 10**18}, {"interactive": True, "latency_slo_ms": 1}, now=NOON,
                      input_tokens=10)
    assert d.rule == "interactive-misses-slo"
    assert d.reasons[0] == "rule interactive-misses-slo matched"
    assert d.errors and d.errors[0].startswith("rule interactive-misses-slo reason:")


# --------------------------------------------------------------------------- stickiness

CONVO = {"interactive": True, "latency_slo_ms": 20_000, "conversation_id": "c-42"}
RELAXED = {"interactive": True, "latency_slo_ms": 600_000, "conversation_id": "c-42"}


def test_a_conversation_keeps_its_speed_within_the_ttl(engine: Engine) -> None:
    first = engine.decide(CHAT, CONVO, now=NOON, input_tokens=30_000)
    assert first.speed == "fast" and first.rule == "interactive-misses-slo"
    # Nine minutes later the SLO is generous, so the rules would say standard: the conversation stays fast.
    later = engine.decide(CHAT, RELAXED, now=NOON + timedelta(minutes=9))
    assert (later.speed, later.rule, later.outcome) == ("fast", "sticky", "allowed")
    assert later.reasons == ["conversation keeps its fast speed (stickiness)"]
    assert later.sticky_switch is None
    # Another conversation is not affected.
    other = engine.decide(CHAT, {**RELAXED, "conversation_id": "c-43"}, now=NOON + timedelta(minutes=9))
    assert (other.speed, other.rule) == ("standard", "default")


def test_stickiness_expires_after_the_ttl(engine: Engine) -> None:
    engine.decide(CHAT, CONVO, now=NOON)
    expired = engine.decide(CHAT, RELAXED, now=NOON + timedelta(minutes=10, seconds=1))
    assert (expired.speed, expired.rule) == ("standard", "default")


def test_each_decision_restarts_the_ttl(engine: Engine) -> None:
    engine.decide(CHAT, CONVO, now=NOON)
    engine.decide(CHAT, RELAXED, now=NOON + timedelta(minutes=8))
    kept = engine.decide(CHAT, RELAXED, now=NOON + timedelta(minutes=16))
    assert kept.rule == "sticky" and kept.speed == "fast"


def test_a_standard_conversation_stays_standard(engine: Engine) -> None:
    engine.decide(CHAT, RELAXED, now=NOON)
    d = engine.decide(CHAT, CONVO, now=NOON + timedelta(minutes=1))
    assert (d.speed, d.rule) == ("standard", "sticky")


def test_a_forced_switch_records_the_cache_miss_cost(engine: Engine) -> None:
    engine.decide(CHAT, CONVO, now=NOON, input_tokens=30_000)
    d = engine.decide(CHAT, RELAXED, now=NOON + timedelta(minutes=2), batch=True, input_tokens=31_000)
    assert (d.speed, d.rule, d.guardrails) == ("standard", "sticky", ["batch"])
    # Re-writing the 30K-token prefix into the standard cache: 30,000 x $5/MTok x 1.25.
    assert d.sticky_switch == {"from": "fast", "to": "standard", "cached_prefix_tokens": 30_000,
                               "cache_miss_cost_micro": 187_500}
    # The conversation now remembers standard, from this request on.
    after = engine.decide(CHAT, CONVO, now=NOON + timedelta(minutes=3))
    assert (after.speed, after.rule, after.sticky_switch) == ("standard", "sticky", None)


def test_no_conversation_id_means_no_stickiness(engine: Engine) -> None:
    engine.decide(CHAT, WAITING, now=NOON)
    d = engine.decide(CHAT, {"interactive": True, "latency_slo_ms": 600_000}, now=NOON + timedelta(seconds=1))
    assert d.rule == "default"


def test_a_rejected_request_does_not_touch_the_conversation(engine: Engine) -> None:
    engine.decide(CHAT, CONVO, now=NOON)
    with pytest.raises(CeilingExceeded):
        engine.decide({**CHAT, "max_tokens": 10_000}, CONVO, now=NOON + timedelta(minutes=1), input_tokens=2_000_000)
    d = engine.decide(CHAT, RELAXED, now=NOON + timedelta(minutes=2))
    assert (d.speed, d.rule) == ("fast", "sticky")


# --------------------------------------------------------------------------- invalid input


@pytest.fixture()
def strict(policy_variant: Any) -> Engine:
    """The default policy with `on_invalid_context: reject`."""
    return load(policy_variant(("on_error: skip ", "on_invalid_context: reject\non_error: skip ")))


def test_an_unknown_context_key_suggests_the_right_one(strict: Engine) -> None:
    engine = strict
    with pytest.raises(InvalidContext, match=r"unknown context key 'latency_slo'; did you mean 'latency_slo_ms'\?"):
        engine.decide(CHAT, {"latency_slo": 100})
    with pytest.raises(InvalidContext, match="known keys: latency_slo_ms, tenant"):
        engine.decide(CHAT, {"zzz": 1})


@pytest.mark.parametrize("context, message", [
    ({"latency_slo_ms": "100"}, "context['latency_slo_ms'] must be int, got str '100'"),
    ({"latency_slo_ms": True}, "context['latency_slo_ms'] must be int, got bool True"),
    ({"interactive": "yes"}, "context['interactive'] must be bool"),
    ({"labels": {"a": 1}}, "context['labels'] must map strings to strings"),
    (["interactive"], "context must be a mapping, got list"),
])
def test_a_context_value_of_the_wrong_type_is_refused(strict: Engine, context: Any, message: str) -> None:
    with pytest.raises(InvalidContext) as caught:
        strict.decide(CHAT, context)
    assert message in str(caught.value)


@pytest.mark.parametrize("params, message", [
    ({"max_tokens": 10, "messages": []}, "params['model'] must be a non-empty string"),
    ({"model": OPUS, "messages": []}, "params['max_tokens'] must be a positive int, got None"),
    ({"model": OPUS, "max_tokens": 0, "messages": []}, "params['max_tokens'] must be a positive int, got 0"),
    ({"model": OPUS, "max_tokens": 10, "messages": "hi"}, "messages must be a list"),
    ({"model": OPUS, "max_tokens": 10, "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ("not a mapping", "params must be a mapping"),
])
def test_malformed_params_are_refused_with_a_typed_error(engine: Engine, params: Any, message: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        engine.decide(params, WAITING)
    assert message in str(caught.value)


def test_a_bad_input_token_count_is_refused(engine: Engine) -> None:
    for bad in (-1, 1.5, True, "10"):
        with pytest.raises(InvalidRequest, match="input_tokens must be a non-negative int"):
            engine.decide(CHAT, WAITING, input_tokens=bad)  # type: ignore[arg-type]


def test_invalid_input_reserves_nothing(strict: Engine) -> None:
    with pytest.raises(InvalidContext):
        strict.decide(CHAT, {**WAITING, "tennant": "acme"}, now=NOON)
    assert strict.ledger.balances([premium_scope()])[0].reserved == 0


@pytest.mark.parametrize("context", [{**WAITING, "tennant": "acme"}, {**WAITING, "user": 5150}, ["interactive"]])
def test_an_invalid_context_is_decided_at_standard_with_its_valid_part(engine: Engine, context: Any) -> None:
    # on_invalid_context defaults to standard: the request is sent, so it is decided and metered.
    d = engine.decide(CHAT, context, now=NOON)
    assert d.speed == "standard" and "invalid_context" in d.guardrails
    assert d.reservation_id is not None  # metered: settle() will charge its budgets
    assert any(e.startswith("invalid context:") for e in d.errors) and "5150" not in " ".join(d.errors)
    if isinstance(context, dict):  # the valid part still decides: WAITING misses its SLO, so the rule wanted fast
        assert (d.rule, d.outcome, d.forced_by) == ("interactive-misses-slo", "downgraded", "invalid_context")


ALL_SPEND = """\
version: 1
name: all-spend
on_invalid_context: {invalid}
on_unpriced_model: {unpriced}
budgets:
  - name: tenant_daily
    key: context.tenant
    window: day
    limit_usd: 100
"""


def _all_spend(tmp_path: Path, invalid: str = "standard", unpriced: str = "conservative") -> Engine:
    path = tmp_path / f"all-{invalid}-{abs(hash(unpriced))}.yaml"
    path.write_text(ALL_SPEND.format(invalid=invalid, unpriced=unpriced))
    return load(path)


def test_a_budget_keyed_on_an_invalid_value_charges_the_shared_key_error_bucket(tmp_path: Path) -> None:
    engine = _all_spend(tmp_path)
    d = engine.decide({**CHAT, "model": "claude-haiku-4-5"}, {"tenant": 42}, now=NOON)
    [(budget, scope)] = d._budget_charges
    assert scope.key == "<key-error>" and d._held
    settled = engine.settle(d, {"input_tokens": 100, "output_tokens": 50})
    assert settled.cost_micro > 0 and engine.ledger.balances([scope])[0].spent == settled.cost_micro


def test_an_invalid_context_allowed_unmetered_reserves_and_settles_nothing(tmp_path: Path) -> None:
    engine = _all_spend(tmp_path, invalid="allow_unmetered")
    d = engine.decide({**CHAT, "model": "claude-haiku-4-5"}, {"tenant": 42}, now=NOON)
    assert d.reservation_id is None and "invalid_context" in d.guardrails


@pytest.mark.parametrize("unpriced, check", [
    ("conservative", lambda engine, cost: cost == _dearest_cost(engine)),
    ("{price_as: claude-haiku-4-5}", lambda engine, cost: cost == 100 * 1 + 50 * 5),  # $1/$5 per MTok
    ("{rate: {input_usd_per_mtok: 2, output_usd_per_mtok: 10}}", lambda engine, cost: cost == 100 * 2 + 50 * 10),
    ("allow_unmetered", lambda engine, cost: cost == 0),
])
def test_an_unpriced_model_is_priced_as_the_policy_says(tmp_path: Path, unpriced: str, check: Any) -> None:
    engine = _all_spend(tmp_path, unpriced=unpriced)
    d = engine.decide({**CHAT, "model": "claude-unknown-7"}, {"tenant": "acme"}, now=NOON)
    assert d.speed == "standard" and any("on_unpriced_model" in r for r in d.reasons)
    settled = engine.settle(d, {"input_tokens": 100, "output_tokens": 50})
    assert check(engine, settled.cost_micro), settled
    [(_, scope)] = d._budget_charges
    assert engine.ledger.balances([scope])[0].spent == settled.cost_micro


def _dearest_cost(engine: Engine) -> int:
    card = engine.dearest_rates("standard", "claude_api")[0][1]
    return -(-(100 * card.input + 50 * card.output) // 1_000_000)


def test_an_unpriced_model_under_reject_is_refused(tmp_path: Path) -> None:
    engine = _all_spend(tmp_path, unpriced="reject")
    with pytest.raises(CeilingExceeded, match="no price for model claude-unknown-7.*on_unpriced_model is reject"):
        engine.decide({**CHAT, "model": "claude-unknown-7"}, {"tenant": "acme"}, now=NOON)


def test_settlement_never_refuses_a_usage_it_cannot_price(tmp_path: Path, telemetry: Any) -> None:
    # A fast usage on a model without a fast price (the API served it fast after all): charged at the
    # catalog's dearest fast rates, and recorded as an event.
    engine = _all_spend(tmp_path)
    d = engine.decide({**CHAT, "model": "claude-haiku-4-5"}, {"tenant": "acme"}, now=NOON)
    settled = engine.settle(d, {"input_tokens": 100, "output_tokens": 50, "speed": "fast"})
    card = engine.dearest_rates("fast", "claude_api")[0][1]
    assert settled.cost_micro == -(-(100 * card.input + 50 * card.output) // 1_000_000) > 0
    events = [p.attributes["policy_engine.event"] for p in telemetry.metrics().get("policy_engine.events", [])]
    assert "policy_engine.unpriced_settlement" in events


def test_price_as_an_unknown_model_is_refused_at_load(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="price_as 'claude-nope' is not in the catalog"):
        _all_spend(tmp_path, unpriced="{price_as: claude-nope}")


def test_an_unknown_policy_name_is_a_clear_error(engine: Engine) -> None:
    with pytest.raises(KeyError, match="no policy named 'nope'; loaded: default"):
        engine.decide(CHAT, WAITING, policy="nope")


# --------------------------------------------------------------------------- the decision object


def test_a_decision_serializes_to_json_for_logs(engine: Engine) -> None:
    secret = "the quarterly numbers are confidential"
    d = engine.decide({**CHAT, "messages": [{"role": "user", "content": secret}]},
                      {**WAITING, "tenant": "acme", "user": "u-1"}, now=NOON)
    text = d.to_json()
    data = json.loads(text)
    assert data == d.to_dict()
    assert secret not in text
    assert {k: data[k] for k in ("speed", "rule", "outcome", "model", "policy_name", "fast_beta")} == {
        "speed": "fast", "rule": "interactive-misses-slo", "outcome": "allowed", "model": OPUS,
        "policy_name": "default", "fast_beta": FAST_BETA}
    assert data["estimate_fast_micro"] == d.estimate_fast_micro and data["reservation_id"] == d.reservation_id
    assert data["policy_version"] == d.policy_version and data["at"] == NOON.timestamp()
    assert not any(k.startswith("_") for k in data)


def test_a_decision_is_still_a_dataclass_to_copy_compare_and_rebuild(engine: Engine) -> None:
    # Its __init__ is written out (so a compiled build compiles it): the dataclass protocol must still hold.
    d = engine.decide(CHAT, WAITING, now=NOON)
    copy = dataclasses.replace(d, reasons=[*d.reasons, "logged"])
    assert copy.to_dict() == {**d.to_dict(), "reasons": [*d.reasons, "logged"]}
    assert copy._plan is None and copy.reservation_id == d.reservation_id  # private state is not copied
    rebuilt = Decision(**d.to_dict())
    assert rebuilt.to_dict() == d.to_dict() and rebuilt == dataclasses.replace(d)
    without_errors = {k: v for k, v in d.to_dict().items() if k != "errors"}
    first, second = Decision(**without_errors), Decision(**without_errors)
    assert first.errors == [] and first.errors is not second.errors  # a fresh list each time, as a default_factory gives
    assert [f.name for f in dataclasses.fields(Decision) if not f.name.startswith("_")] == list(d.to_dict())


def test_a_rejected_decision_serializes_too(engine: Engine) -> None:
    with pytest.raises(CeilingExceeded) as caught:
        engine.decide({**CHAT, "max_tokens": 10_000}, BIG_SLO, now=NOON, input_tokens=2_000_000)
    data = json.loads(caught.value.decision.to_json())  # type: ignore[attr-defined]
    assert data["outcome"] == "rejected" and data["forced_by"] == "per_request"


def test_the_policy_version_is_a_content_hash(tmp_path: Path, policy_variant: Any) -> None:
    same = tmp_path / "same.yaml"
    same.write_text(DEFAULT_POLICY.read_text())
    changed = policy_variant(("limit_usd: 200", "limit_usd: 300"))
    versions = [load(p).decide(CHAT, WAITING, now=NOON).policy_version for p in (DEFAULT_POLICY, same, changed)]
    assert versions[0] == versions[1] != versions[2]


def test_decision_apply_puts_the_speed_on_the_wire(engine: Engine) -> None:
    fast = engine.decide({**CHAT, "betas": ["files-api-2025-04-14"]}, WAITING, now=NOON)
    sent = fast.apply({**CHAT, "betas": ["files-api-2025-04-14"]})
    assert sent["speed"] == "fast" and sent["betas"] == ["files-api-2025-04-14", FAST_BETA]
    assert fast.apply_headers({"anthropic-beta": "files-api-2025-04-14"}) == {
        "anthropic-beta": f"files-api-2025-04-14,{FAST_BETA}"}
    standard = engine.decide(CHAT, {"interactive": False}, now=NOON)
    assert "speed" not in standard.apply({**CHAT, "speed": "fast"})
    assert standard.apply_headers({"x-api-key": "k"}) == {"x-api-key": "k"}


def test_the_engine_uses_an_injected_ledger_and_catalog() -> None:
    ledger = MemoryLedger()
    engine = load(DEFAULT_POLICY, catalog=load_catalog(), ledger=ledger)
    assert engine.ledger is ledger
    engine.decide(HELLO, WAITING, now=NOON, input_tokens=10)
    assert ledger.balances([premium_scope()])[0].reserved == PREMIUM


def test_a_custom_stickiness_key(policy_variant: Any) -> None:
    engine = load(policy_variant(("ttl: 10m", "ttl: 10m\n  key: context.tenant + '/' + context.conversation_id")))
    ctx = {**CONVO, "tenant": "acme"}
    engine.decide(CHAT, ctx, now=NOON)
    assert engine.decide(CHAT, {**RELAXED, "tenant": "acme"}, now=NOON + timedelta(minutes=1)).rule == "sticky"
    # Another tenant with the same conversation id is another conversation.
    assert engine.decide(CHAT, {**RELAXED, "tenant": "globex"}, now=NOON + timedelta(minutes=1)).rule == "default"
    # A key that cannot be evaluated (no tenant) means no stickiness, not an error.
    d = engine.decide(CHAT, RELAXED, now=NOON + timedelta(minutes=1))
    assert d.rule == "default" and d.errors == []
