"""The feature schema: what policies see, extracted from real requests and read back through CEL.

Most tests put a `probe` rule first in a copy of the default policy; its reason is a
CEL string expression over the features, so what a test reads is exactly what a
policy author's expression would see.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from policy_engine import cel
from policy_engine.compile import compile_file
from policy_engine.decide import load
from policy_engine.errors import PolicyError
from policy_engine.features import (
    CONTEXT_KEYS, FEATURE_DOCS, context_features, declarations, reference_markdown, request_features,
)

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_POLICY = ROOT / "policies" / "default.yaml"
NOON = datetime(2026, 12, 3, 12, 0, tzinfo=timezone.utc)
OPUS = "claude-opus-5"
CHAT: dict[str, Any] = {"model": OPUS, "max_tokens": 4096, "messages": [{"role": "user", "content": "Hi"}]}


def probe_rule(expr: str) -> tuple[str, str]:
    rule = f'rules:\n  - name: probe\n    when: "true"\n    speed: standard\n    reason:\n      expr: >-\n        {expr}\n'
    return ("rules:\n", rule)


@pytest.fixture()
def probe(policy_variant: Any) -> Any:
    def run(expr: str, params: dict[str, Any] = CHAT, context: dict[str, Any] | None = None, **kwargs: Any) -> str:
        engine = load(policy_variant(probe_rule(expr)))
        d = engine.decide(params, context, now=kwargs.pop("now", NOON), **kwargs)
        assert d.rule == "probe" and not d.errors, (d.reasons, d.errors)
        return d.reasons[0].removeprefix("probe: ")

    return run


# --------------------------------------------------------------------------- request


def test_request_features_of_a_full_request() -> None:
    params = {
        "model": OPUS, "max_tokens": 2048, "stream": True, "service_tier": "standard_only", "inference_geo": "us",
        "betas": ["files-api-2025-04-14"],
        "thinking": {"type": "enabled", "budget_tokens": 1024},
        "tools": [{"name": "get_weather", "description": "Weather", "input_schema": {"type": "object"}}],
        "messages": [
            {"role": "user", "content": [
                {"type": "text", "text": "What is in this picture and this file?"},
                {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}},
                {"type": "document", "source": {"type": "url", "url": "https://example.com/a.pdf"}},
            ]},
            {"role": "assistant", "content": "A cat."},
            {"role": "user", "content": "Thanks"},
        ],
    }
    assert request_features(params, 1234, False, batch=True) == {
        "model": OPUS, "max_tokens": 2048, "input_tokens": 1234, "input_tokens_exact": False, "stream": True,
        "has_tools": True, "has_images": True, "has_documents": True,
        "thinking": {"enabled": True, "budget_tokens": 1024}, "service_tier": "standard_only",
        "inference_geo": "us", "batch": True, "cache_control": False, "message_count": 3,
        "betas": ["files-api-2025-04-14"],
        "platform": "claude_api",
    }


def test_request_feature_defaults() -> None:
    f = request_features(CHAT, 7, True)
    assert (f["stream"], f["has_tools"], f["has_images"], f["has_documents"], f["batch"]) == (False,) * 5
    assert f["thinking"] == {"enabled": False, "budget_tokens": 0}
    assert (f["service_tier"], f["inference_geo"], f["betas"], f["message_count"]) == ("auto", "global", [], 1)
    assert f["input_tokens_exact"] is True


@pytest.mark.parametrize("where", ["top", "system", "tools", "message"])
def test_cache_control_is_found_wherever_it_is_set(where: str) -> None:
    mark = {"type": "ephemeral"}
    params: dict[str, Any] = dict(CHAT)
    if where == "top":
        params["cache_control"] = mark
    elif where == "system":
        params["system"] = [{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Rules", "cache_control": mark}]
    elif where == "tools":
        params["tools"] = [{"name": "t", "input_schema": {"type": "object"}, "cache_control": mark}]
    else:
        params["messages"] = [{"role": "user", "content": [{"type": "text", "text": "Hi", "cache_control": mark}]}]
    assert request_features(params, 1, False)["cache_control"] is True
    assert request_features({**CHAT, "system": "Be brief."}, 1, False)["cache_control"] is False


@pytest.mark.parametrize("thinking, expected", [
    ({"type": "enabled", "budget_tokens": 2048}, {"enabled": True, "budget_tokens": 2048}),
    ({"type": "adaptive"}, {"enabled": True, "budget_tokens": 0}),
    ({"type": "disabled"}, {"enabled": False, "budget_tokens": 0}),
    (None, {"enabled": False, "budget_tokens": 0}),
])
def test_thinking_configuration(thinking: Any, expected: dict[str, Any]) -> None:
    assert request_features({**CHAT, "thinking": thinking}, 1, False)["thinking"] == expected


def test_request_features_through_cel(probe: Any) -> None:
    expr = ("request.model + ' ' + string(request.max_tokens) + ' ' + string(request.input_tokens) + ' ' + "
            "(request.input_tokens_exact ? 'exact' : 'estimated') + ' ' + (request.stream ? 'stream' : 'once') + ' ' + "
            "string(request.message_count) + ' ' + string(size(request.betas)) + ' ' + request.service_tier")
    assert probe(expr, {**CHAT, "stream": True, "betas": ["a", "b"]}, input_tokens=77) == (
        "claude-opus-5 4096 77 exact stream 1 2 auto")
    estimated = probe("string(request.input_tokens) + (request.input_tokens_exact ? '!' : '~')")
    assert estimated.endswith("~") and int(estimated[:-1]) > 0


def test_batch_is_a_request_feature(probe: Any) -> None:
    assert probe("request.batch ? 'batch' : 'interactive'", batch=True) == "batch"
    assert probe("request.batch ? 'batch' : 'interactive'") == "interactive"


# --------------------------------------------------------------------------- context


def test_context_defaults_and_values() -> None:
    assert context_features(None) == {"interactive": False, "priority": "normal", "labels": {}}
    full = {"latency_slo_ms": 800, "tenant": "acme", "user": "u-1", "conversation_id": "c-1", "interactive": True,
            "priority": "high", "labels": {"team": "search"}}
    assert context_features(full) == full
    # None means "not given": the default stays, and has() is false.
    assert context_features({"tenant": None, "interactive": None}) == {"interactive": False, "priority": "normal", "labels": {}}
    assert set(CONTEXT_KEYS) == set(full)


def test_context_through_cel(probe: Any) -> None:
    expr = ("(has(context.tenant) ? context.tenant : 'nobody') + ' ' + context.priority + ' ' + "
            "string(size(context.labels)) + ' ' + (has(context.latency_slo_ms) ? 'slo' : 'no-slo')")
    assert probe(expr) == "nobody normal 0 no-slo"
    assert probe(expr, context={"tenant": "acme", "priority": "low", "labels": {"a": "b"}, "latency_slo_ms": 5}) == (
        "acme low 1 slo")


# --------------------------------------------------------------------------- cost, throughput, budget, ratelimit, now


def test_cost_features_are_the_catalog_worst_cases(probe: Any) -> None:
    expr = "string(cost.standard_usd) + ' ' + string(cost.fast_usd) + ' ' + string(cost.premium_usd)"
    # 1000 input + 4096 output tokens: standard $0.1074, fast $0.2148 (2x), premium $0.1074.
    assert [float(x) for x in probe(expr, input_tokens=1000).split()] == pytest.approx([0.1074, 0.2148, 0.1074])
    # Unpriced or unsupported: the fields are absent, and has() says so.
    absent = "(has(cost.standard_usd) ? 's' : '-') + (has(cost.fast_usd) ? 'f' : '-') + (has(cost.premium_usd) ? 'p' : '-')"
    assert probe(absent) == "sfp"
    assert probe(absent, {**CHAT, "model": "claude-mythos-5-2"}) == "s--"  # fast mode, but no fast price
    # No price at all: on_unpriced_model (conservative by default) prices standard at the dearest rates.
    assert probe(absent, {**CHAT, "model": "claude-mythos-preview"}) == "s--"
    assert probe(absent, {**CHAT, "model": "claude-unknown"}) == "s--"


def test_throughput_features(probe: Any) -> None:
    expr = ("string(throughput.standard_otps) + ' ' + string(throughput.fast_otps) + ' ' + string(throughput.ttft_s) + "
            "' ' + string(throughput.est_standard_s) + ' ' + string(throughput.est_fast_s)")
    values = [float(x) for x in probe(expr, {**CHAT, "max_tokens": 3000}).split()]
    assert values == pytest.approx([60.0, 120.0, 1.5, 1.5 + 50.0, 1.5 + 25.0])
    no_fast = "(has(throughput.fast_otps) ? 'fast' : 'no-fast') + (has(throughput.est_fast_s) ? '' : ' no-est')"
    assert probe(no_fast, {**CHAT, "model": "claude-sonnet-4-6"}) == "no-fast no-est"


def test_budget_features(probe: Any) -> None:
    expr = ("string(budget.remaining_usd) + ' ' + string(budget.spent_usd) + ' ' + string(budget.limit_usd) + ' ' + "
            "string(budget.fraction_left) + ' ' + string(budgets.daily_fast_premium.limit_usd)")
    assert [float(x) for x in probe(expr).split()] == [200.0, 0.0, 200.0, 1.0, 200.0]


def test_without_budgets_the_short_form_is_unlimited(policy_variant: Any) -> None:
    text = DEFAULT_POLICY.read_text()
    block = text[text.index("budgets:\n"):text.index("stickiness:")]
    engine = load(policy_variant((block, ""), probe_rule("string(budget.remaining_usd) + ' ' + string(budget.fraction_left)")))
    assert engine.decide(CHAT, now=NOON).reasons[0] == "probe: +Inf 1"


def test_ratelimit_fields_are_absent_until_known(policy_variant: Any) -> None:
    expr = ("(has(ratelimit.output_tokens_remaining) ? string(ratelimit.output_tokens_remaining) : '?') + ' ' + "
            "(has(ratelimit.reset_in_s) ? string(ratelimit.reset_in_s) : '?') + ' ' + "
            "(has(ratelimit.seconds_since_429) ? string(ratelimit.seconds_since_429) : '?')")
    engine = load(policy_variant(probe_rule(expr)))
    assert engine.decide(CHAT, now=NOON).reasons[0] == "probe: ? ? ?"
    t = NOON.timestamp()
    engine.ratelimits.update("default", now=t, output_tokens_remaining=900, reset_at=t + 12, last_429_at=t - 30)
    values = engine.decide(CHAT, now=NOON).reasons[0].removeprefix("probe: ").split()
    assert [float(v) for v in values] == [900.0, 12.0, 30.0]


def test_now_is_the_decision_time(probe: Any) -> None:
    expr = "string(now.getHours()) + ' ' + string(now.getHours('America/New_York')) + ' ' + string(now.getDayOfWeek())"
    assert probe(expr) == "12 7 4"  # 2026-12-03 is a Thursday (getDayOfWeek: Sunday = 0)


def test_conversation_features_without_stickiness(policy_variant: Any) -> None:
    text = DEFAULT_POLICY.read_text()
    sticky = text[text.index("stickiness:"):text.index("tests:")]
    expr = "(has(conversation.last_speed) ? conversation.last_speed : 'new') + ' ' + string(conversation.cached_prefix_tokens)"
    engine = load(policy_variant((sticky, ""), probe_rule(expr)))
    ctx = {"conversation_id": "c-9"}
    assert engine.decide(CHAT, ctx, now=NOON, input_tokens=500).reasons[0] == "probe: new 0"
    assert engine.decide(CHAT, ctx, now=NOON + timedelta(minutes=59), input_tokens=600).reasons[0] == "probe: standard 500"
    assert engine.decide(CHAT, ctx, now=NOON + timedelta(hours=2)).reasons[0] == "probe: new 0"


def test_variables_are_visible_to_rules(policy_variant: Any) -> None:
    engine = load(policy_variant(
        ("variables:\n", "variables:\n  slo_s: double(context.latency_slo_ms) / 1000.0\n"),
        probe_rule("string(vars.slo_s) + ' ' + string(vars.standard_ms)")))
    reason = engine.decide(CHAT, {"latency_slo_ms": 2500}, now=NOON).reasons[0]
    assert [float(x) for x in reason.removeprefix("probe: ").split()] == pytest.approx([2.5, (1.5 + 4096 / 60) * 1000])


# --------------------------------------------------------------------------- declarations


def test_every_declared_field_type_checks() -> None:
    decls = declarations(["daily"], {"x": cel.INT})
    for name, (ctype, _doc) in FEATURE_DOCS.items():
        assert name in decls
        for field in getattr(ctype, "fields", {}) or {}:
            cel.compile(f"{name}.{field} == {name}.{field}", decls, expect=cel.BOOL)
    cel.compile("budgets.daily.remaining_usd > 0.0 && vars.x > 1", decls, expect=cel.BOOL)


def test_a_misspelt_feature_fails_to_compile_at_its_position(policy_variant: Any) -> None:
    path = policy_variant(('when: "!context.interactive"', 'when: "!context.interactve"'))
    with pytest.raises(PolicyError) as caught:
        compile_file(str(path))
    [diag] = caught.value.diagnostics
    assert diag.code == "PE101" and "interactve" in diag.message


# --------------------------------------------------------------------------- the README's feature reference


def test_the_reference_lists_every_declared_field() -> None:
    text = reference_markdown()
    for name, (ctype, _doc) in FEATURE_DOCS.items():
        for field, spec in (getattr(ctype, "fields", None) or {}).items():
            assert f"| `{name}.{field}` | " in text
            assert spec.description and spec.description.split("`")[0][:20] in text
    assert "| `budgets.<name>.fraction_left` | double | always |" in text
    assert "| `context.latency_slo_ms` | int | when known (`has()`) |" in text
    assert "| `now` | timestamp | always |" in text


def test_the_readme_carries_the_generated_feature_reference() -> None:
    # The README is pasted from `reference_markdown()`; this fails until it is, and whenever they drift.
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    start, end = "<!-- features:start -->", "<!-- features:end -->"
    assert start in readme and end in readme, f"README.md lacks the {start} ... {end} markers"
    assert readme.split(start, 1)[1].split(end, 1)[0].strip("\n") == reference_markdown().strip("\n")
