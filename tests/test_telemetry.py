"""OpenTelemetry spans and metrics of decide/settle, captured with the SDK's in-memory exporter and reader.

The `telemetry` fixture (tests/conftest.py) installs the global providers once per
process and hands each test only what it recorded.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from policy_engine.decide import Engine, RuleEvaluationError, load
from policy_engine.errors import CeilingExceeded

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_POLICY = ROOT / "policies" / "default.yaml"
NOON = datetime(2026, 12, 3, 12, 0, tzinfo=timezone.utc)
OPUS = "claude-opus-5"
SECRET = "PROMPT-SECRET: the merger closes on Friday"
API_KEY = "sk-ant-api03-THIS-IS-NOT-A-REAL-KEY"
PARAMS: dict[str, Any] = {"model": OPUS, "max_tokens": 4096, "system": f"system {SECRET}",
                          "messages": [{"role": "user", "content": SECRET}]}
WAITING = {"interactive": True, "latency_slo_ms": 20_000, "tenant": "tenant-secret", "user": "user-secret",
           "conversation_id": "conversation-secret", "labels": {"team": "label-secret"}}
FAST_USAGE = {"input_tokens": 12, "output_tokens": 300, "cache_creation_input_tokens": 100,
              "cache_read_input_tokens": 1000, "speed": "fast"}


@pytest.fixture()
def engine() -> Engine:
    return load(DEFAULT_POLICY)


def test_a_decision_span_carries_the_decision(engine: Engine, telemetry: Any) -> None:
    d = engine.decide(PARAMS, WAITING, now=NOON, input_tokens=1000)
    [span] = telemetry.spans("policy_engine.decide")
    assert span.attributes == {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "anthropic",
        "gen_ai.request.model": OPUS,
        "gen_ai.request.max_tokens": 4096,
        "policy_engine.policy.name": "default",
        "policy_engine.policy.version": d.policy_version,
        "policy_engine.rule": "interactive-misses-slo",
        "policy_engine.speed": "fast",
        "policy_engine.outcome": "allowed",
        "policy_engine.input_tokens.estimated": 1000,
        "policy_engine.input_tokens.exact": True,
        "policy_engine.cost.estimate_standard_usd": pytest.approx(0.1074),
        "policy_engine.cost.estimate_fast_usd": pytest.approx(0.2148),
        "policy_engine.reservation_id": d.reservation_id,
    }
    assert span.end_time > span.start_time


def test_guardrails_and_ceilings_are_span_attributes(engine: Engine, telemetry: Any) -> None:
    engine.ratelimits.update("default", now=NOON.timestamp(), output_tokens_remaining=0)
    engine.decide(PARAMS, WAITING, now=NOON, batch=True)
    engine.decide({**PARAMS, "max_tokens": 10_000}, {"interactive": True, "latency_slo_ms": 60_000},
                  now=NOON, input_tokens=1_000_000, account="other")
    guarded, ceiling = telemetry.spans("policy_engine.decide")
    assert guarded.attributes["policy_engine.guardrails"] == ("batch", "rate_limited")
    assert guarded.attributes["policy_engine.forced_by"] == "batch"
    assert guarded.attributes["policy_engine.outcome"] == "downgraded"
    assert "policy_engine.ceilings" not in guarded.attributes
    assert ceiling.attributes["policy_engine.ceilings"] == ("per_request",)
    assert ceiling.attributes["policy_engine.cost.estimate_fast_usd"] == 10.5  # 1M in at $10 + 10K out at $50
    assert ceiling.attributes["policy_engine.speed"] == "standard"


def test_a_rejected_decision_is_traced(engine: Engine, telemetry: Any) -> None:
    with pytest.raises(CeilingExceeded):
        engine.decide({**PARAMS, "max_tokens": 10_000}, WAITING, now=NOON, input_tokens=2_000_000)
    [span] = telemetry.spans("policy_engine.decide")
    assert span.attributes["policy_engine.outcome"] == "rejected"
    assert span.attributes["policy_engine.forced_by"] == "per_request"
    assert "policy_engine.reservation_id" not in span.attributes


def test_a_failing_rule_is_recorded_on_the_span(policy_variant: Any, telemetry: Any) -> None:
    rule = 'rules:\n  - name: vip\n    when: context.labels["tier"] == "vip"\n    speed: fast\n'
    engine = load(policy_variant(("rules:\n", rule)))
    engine.decide(PARAMS, WAITING, now=NOON)
    [span] = telemetry.spans("policy_engine.decide")
    assert span.attributes["policy_engine.errors"] == ("rule vip: no such key: 'tier'",)
    [event] = span.events
    assert event.name == "policy_engine.rule_error"
    assert event.attributes == {"policy_engine.error": "rule vip: no such key: 'tier'"}


def test_on_error_raise_is_traced_as_an_error(policy_variant: Any, telemetry: Any) -> None:
    from opentelemetry.trace import StatusCode

    rule = 'rules:\n  - name: vip\n    when: context.labels["tier"] == "vip"\n    speed: fast\n'
    engine = load(policy_variant(("rules:\n", rule), ("on_error: skip", "on_error: raise")))
    with pytest.raises(RuleEvaluationError):
        engine.decide(PARAMS, WAITING, now=NOON)
    [span] = telemetry.spans("policy_engine.decide")
    assert span.status.status_code is StatusCode.ERROR
    assert "rule vip failed to evaluate" in span.status.description
    assert span.attributes["policy_engine.rule"] == "vip" and span.attributes["policy_engine.outcome"] == "rejected"


def test_a_settlement_span_carries_usage_and_actual_cost(engine: Engine, telemetry: Any) -> None:
    d = engine.decide(PARAMS, WAITING, now=NOON, input_tokens=1000)
    engine.settle(d, FAST_USAGE)
    engine.settle(d, FAST_USAGE)
    decide_span, first, second = telemetry.spans()
    assert (first.name, second.name) == ("policy_engine.settle", "policy_engine.settle")
    # fast: 12 x $10 + 100 x $12.50 + 1000 x $1 + 300 x $50 per MTok
    cost = (12 * 10 + 100 * 12.5 + 1000 * 1 + 300 * 50) / 1e6
    expected = {
        "gen_ai.usage.input_tokens": 12 + 100 + 1000,
        "gen_ai.usage.output_tokens": 300,
        "gen_ai.usage.cache_creation.input_tokens": 100,
        "gen_ai.usage.cache_read.input_tokens": 1000,
        "policy_engine.speed.actual": "fast",
        "policy_engine.cost.actual_usd": pytest.approx(cost),
        "policy_engine.settled.first": True,
        "gen_ai.request.model": OPUS,
        "policy_engine.policy.name": "default",
        "policy_engine.rule": "interactive-misses-slo",
    }
    assert {k: first.attributes[k] for k in expected} == expected
    assert second.attributes["policy_engine.settled.first"] is False
    [link] = first.links
    assert link.context.span_id == decide_span.context.span_id


def _all_attribute_values(telemetry: Any, points: dict[str, list[Any]]) -> list[str]:
    values: list[str] = []
    for span in telemetry.spans():
        sources = [span.attributes, *(e.attributes for e in span.events)]
        for attributes in sources:
            values.extend(f"{k}={v!r}" for k, v in attributes.items())
    for data_points in points.values():
        for p in data_points:
            values.extend(f"{k}={v!r}" for k, v in p.attributes.items())
    return values


def test_no_prompt_content_user_data_or_api_key_is_recorded(engine: Engine, telemetry: Any, policy_variant: Any) -> None:
    engine.decide(PARAMS, WAITING, now=NOON)
    d = engine.decide(PARAMS, {**WAITING, "latency_slo_ms": 600_000}, now=NOON, batch=True)
    engine.settle(d, FAST_USAGE)
    headers = d.apply_headers({"x-api-key": API_KEY})
    assert headers["x-api-key"] == API_KEY
    failing = load(policy_variant(("rules:\n", 'rules:\n  - name: t\n    when: context.labels["x"] == "y"\n    speed: fast\n')))
    failing.decide(PARAMS, WAITING, now=NOON)
    points = telemetry.metrics()
    values = _all_attribute_values(telemetry, points)
    assert len(telemetry.spans()) == 4 and values
    for secret in ("SECRET", "secret", API_KEY, "merger"):
        leaked = [v for v in values if secret in v]
        assert not leaked, leaked


def _points(points: dict[str, list[Any]], name: str) -> dict[tuple[tuple[str, Any], ...], Any]:
    return {tuple(sorted(p.attributes.items())): p for p in points.get(name, [])}


def test_decision_metrics_by_speed_rule_and_outcome(engine: Engine, telemetry: Any) -> None:
    waiting = {"interactive": True, "latency_slo_ms": 20_000}  # no conversation: no stickiness
    engine.decide(PARAMS, waiting, now=NOON)
    engine.decide(PARAMS, waiting, now=NOON)
    engine.decide(PARAMS, {"interactive": False}, now=NOON)
    engine.decide(PARAMS, waiting, now=NOON, batch=True)
    with pytest.raises(CeilingExceeded):
        engine.decide({**PARAMS, "max_tokens": 10_000}, waiting, now=NOON, input_tokens=2_000_000)
    points = telemetry.metrics()
    decisions = {k: p.value for k, p in _points(points, "policy_engine.decisions").items()}
    base = (("policy_engine.policy.name", "default"),)

    def key(speed: str, rule: str, outcome: str) -> tuple[tuple[str, str], ...]:
        return tuple(sorted((*base, ("policy_engine.speed", speed), ("policy_engine.rule", rule),
                             ("policy_engine.outcome", outcome))))

    assert decisions == {
        key("fast", "interactive-misses-slo", "allowed"): 2,
        key("standard", "nobody-waiting", "allowed"): 1,
        key("standard", "interactive-misses-slo", "downgraded"): 1,
        key("fast", "interactive-misses-slo", "rejected"): 1,
    }
    downgrades = {k: p.value for k, p in _points(points, "policy_engine.downgrades").items()}
    assert downgrades == {tuple(sorted((*base, ("policy_engine.reason", "batch")))): 1}
    rejects = {k: p.value for k, p in _points(points, "policy_engine.rejects").items()}
    assert rejects == {tuple(sorted((*base, ("policy_engine.reason", "per_request")))): 1}
    [latency] = points["policy_engine.decide.duration"]
    assert latency.count == 5 and 0 < latency.sum < 5 and latency.attributes == {"policy_engine.policy.name": "default"}


def test_budget_downgrades_are_counted_by_budget_name(engine: Engine, telemetry: Any) -> None:
    from policy_engine.ledger import Scope, window_bounds

    window, _, end = window_bounds("day", "UTC", NOON)
    engine.ledger.settle("earlier", [(Scope("daily_fast_premium", "global", window, 200_000_000, end.timestamp()), 200_000_000)])
    assert engine.decide(PARAMS, WAITING, now=NOON).forced_by == "daily_fast_premium"
    [point] = telemetry.metrics()["policy_engine.downgrades"]
    assert point.attributes["policy_engine.reason"] == "daily_fast_premium" and point.value == 1


def test_cost_metric_by_speed_counts_each_settlement_once(engine: Engine, telemetry: Any) -> None:
    for usage in (FAST_USAGE, FAST_USAGE, {**FAST_USAGE, "speed": "standard"}):
        d = engine.decide(PARAMS, WAITING, now=NOON)
        engine.settle(d, usage)
        engine.settle(d, usage)  # a second settle records no cost
    costs = {p.attributes["policy_engine.speed"]: p.value for p in telemetry.metrics()["policy_engine.cost"]}
    fast = (12 * 10 + 100 * 12.5 + 1000 * 1 + 300 * 50) / 1e6
    standard = (12 * 5 + 100 * 6.25 + 1000 * 0.5 + 300 * 25) / 1e6
    assert costs == {"fast": pytest.approx(2 * fast), "standard": pytest.approx(standard)}


def test_an_sdk_configured_after_import_is_used(tmp_path: Path) -> None:
    # A fresh process: decide with no SDK, then install one, then decide again.
    script = textwrap.dedent(f"""
        from policy_engine.decide import load
        from policy_engine import telemetry
        engine = load({str(DEFAULT_POLICY)!r})
        params = {{"model": "claude-opus-5", "max_tokens": 4096, "messages": [{{"role": "user", "content": "hi"}}]}}
        engine.decide(params, {{"interactive": True, "latency_slo_ms": 1000}})
        assert not telemetry.enabled()
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
        exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        trace.set_tracer_provider(provider)
        d = engine.decide(params, {{"interactive": True, "latency_slo_ms": 1000}})
        engine.settle(d, {{"input_tokens": 5, "output_tokens": 5, "speed": "fast"}})
        print(",".join(s.name + ":" + s.attributes["policy_engine.speed"] for s in exporter.get_finished_spans()))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "policy_engine.decide:fast,policy_engine.settle:fast"
