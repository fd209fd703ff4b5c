"""OpenTelemetry spans and metrics, through opentelemetry-api only.

Spans: `policy_engine.decide` (one per decision) and `policy_engine.settle` (one per
settlement, linked to its decision's span). Metrics: `policy_engine.decisions`
(by speed, rule and outcome), `policy_engine.downgrades` and `policy_engine.rejects`
(by reason), `policy_engine.cost` (settled USD, by speed), `policy_engine.decide.duration`
(seconds) and `policy_engine.events`.

Attributes use the GenAI semantic-convention names where they exist (`gen_ai.*`) and
`policy_engine.*` for the rest. Prompt content, user text, tenant and user ids and API
keys are never recorded: only model names, counts, costs, and names from the policy.

Until some TracerProvider or MeterProvider is installed, every call here returns after
one global read: the API's providers are module globals that stay None until an SDK
sets them. That is checked on every call, so an SDK configured after this module was
imported is picked up at once; once seen, the check is skipped for good (a global
provider cannot be unset).
"""

from __future__ import annotations

import os
from typing import Any, Final, TYPE_CHECKING

from opentelemetry import metrics, trace
from opentelemetry import trace as _trace_api
from opentelemetry.metrics import _internal as _metrics_api

if TYPE_CHECKING:
    from .decide import Decision, Settlement

__all__ = ["record_decision", "record_settlement", "record_event", "TRACER_NAME", "enabled"]

TRACER_NAME: Final = "policy_engine"

_tracer: Final = trace.get_tracer(TRACER_NAME)
_meter: Final = metrics.get_meter(TRACER_NAME)

_decisions: Final = _meter.create_counter("policy_engine.decisions", unit="{decision}", description="Decisions by speed, rule and outcome.")
_downgrades: Final = _meter.create_counter("policy_engine.downgrades", unit="{decision}", description="Fast decisions forced to standard, by reason.")
_rejects: Final = _meter.create_counter("policy_engine.rejects", unit="{request}", description="Requests refused by a ceiling, by reason.")
_cost: Final = _meter.create_counter("policy_engine.cost", unit="USD", description="Settled cost by speed.")
_decide_latency: Final = _meter.create_histogram("policy_engine.decide.duration", unit="s", description="Time spent in decide().")
_events: Final = _meter.create_counter("policy_engine.events", unit="{event}", description="Operational events (reloads, bad headers, state outages).")

if "OTEL_PYTHON_TRACER_PROVIDER" in os.environ or "OTEL_PYTHON_METER_PROVIDER" in os.environ:
    # Providers named by environment variable load on the first get_*_provider() call only.
    trace.get_tracer_provider()
    metrics.get_meter_provider()

# A future API without these private globals: always take the recording path (never drop data).
_active = not (hasattr(_trace_api, "_TRACER_PROVIDER") and hasattr(_metrics_api, "_METER_PROVIDER"))


def enabled() -> bool:
    """True once a tracer or meter provider has been installed (then for the life of the process)."""
    global _active
    if not _active:
        _active = _trace_api._TRACER_PROVIDER is not None or _metrics_api._METER_PROVIDER is not None
    return _active


def _decision_attributes(decision: Decision) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "anthropic",
        "gen_ai.request.model": decision.model,
        "gen_ai.request.max_tokens": decision.max_tokens,
        "policy_engine.policy.name": decision.policy_name,
        "policy_engine.policy.version": decision.policy_version,
        "policy_engine.rule": decision.rule,
        "policy_engine.speed": decision.speed,
        "policy_engine.outcome": decision.outcome,
        "policy_engine.input_tokens.estimated": decision.input_tokens,
        "policy_engine.input_tokens.exact": decision.input_tokens_exact,
    }
    if decision.guardrails:
        attributes["policy_engine.guardrails"] = list(decision.guardrails)
    if decision.ceilings:
        attributes["policy_engine.ceilings"] = list(decision.ceilings)
    if decision.forced_by:
        attributes["policy_engine.forced_by"] = decision.forced_by
    if decision.estimate_standard_micro is not None:
        attributes["policy_engine.cost.estimate_standard_usd"] = decision.estimate_standard_micro / 1e6
    if decision.estimate_fast_micro is not None:
        attributes["policy_engine.cost.estimate_fast_usd"] = decision.estimate_fast_micro / 1e6
    if decision.errors:
        attributes["policy_engine.errors"] = list(decision.errors)
    if decision.reservation_id:
        attributes["policy_engine.reservation_id"] = decision.reservation_id
    if decision.incomplete:
        attributes["policy_engine.incomplete_stream"] = decision.incomplete
    if decision.fallback_rewrites:
        attributes["policy_engine.fallback_rewrites.models"] = [r["model"] for r in decision.fallback_rewrites]
        attributes["policy_engine.fallback_rewrites.guardrails"] = [r["guardrail"] for r in decision.fallback_rewrites]
    if decision.sticky_switch:
        attributes["policy_engine.sticky_switch.from"] = decision.sticky_switch["from"]
        attributes["policy_engine.sticky_switch.cached_prefix_tokens"] = decision.sticky_switch["cached_prefix_tokens"]
        if "cache_miss_cost_micro" in decision.sticky_switch:
            attributes["policy_engine.sticky_switch.cache_miss_usd"] = decision.sticky_switch["cache_miss_cost_micro"] / 1e6
    return attributes


def record_decision(decision: Decision, started_ns: int, ended_ns: int, error: BaseException | None = None) -> None:
    """One span per decision, and the decision metrics. `error`: the evaluation error raised to the caller."""
    if not _active and _trace_api._TRACER_PROVIDER is None and _metrics_api._METER_PROVIDER is None:
        return  # no SDK: nothing could record this (checked each call, so a later SDK is seen)
    enabled()
    span = _tracer.start_span("policy_engine.decide", start_time=started_ns)
    if span.is_recording():
        span.set_attributes(_decision_attributes(decision))
        for message in decision.errors:
            span.add_event("policy_engine.rule_error", {"policy_engine.error": message})
        if error is not None:
            span.set_status(trace.Status(trace.StatusCode.ERROR, str(error)))
        decision._span_context = span.get_span_context()
    span.end(end_time=ended_ns)
    labels = {"policy_engine.policy.name": decision.policy_name, "policy_engine.speed": decision.speed,
              "policy_engine.rule": decision.rule, "policy_engine.outcome": decision.outcome}
    _decisions.add(1, labels)
    if decision.outcome == "downgraded":
        _downgrades.add(1, {"policy_engine.policy.name": decision.policy_name, "policy_engine.reason": decision.forced_by or "unknown"})
    elif decision.outcome == "rejected":
        _rejects.add(1, {"policy_engine.policy.name": decision.policy_name, "policy_engine.reason": decision.forced_by or "unknown"})
    _decide_latency.record((ended_ns - started_ns) / 1e9, {"policy_engine.policy.name": decision.policy_name})


def record_settlement(decision: Decision, settlement: Settlement) -> None:
    """One span per settlement (linked to the decision's span), and the cost metric."""
    if not _active and _trace_api._TRACER_PROVIDER is None and _metrics_api._METER_PROVIDER is None:
        return  # no SDK: nothing could record this (checked each call, so a later SDK is seen)
    enabled()
    context = decision._span_context
    links = [trace.Link(context)] if context is not None else None
    span = _tracer.start_span("policy_engine.settle", links=links)
    if span.is_recording():
        attributes = _decision_attributes(decision)
        attributes.update({
            "gen_ai.usage.input_tokens": settlement.input_tokens + settlement.cache_write_tokens + settlement.cache_read_tokens,
            "gen_ai.usage.output_tokens": settlement.output_tokens,
            "gen_ai.usage.cache_creation.input_tokens": settlement.cache_write_tokens,
            "gen_ai.usage.cache_read.input_tokens": settlement.cache_read_tokens,
            "policy_engine.speed.actual": settlement.speed,
            "policy_engine.cost.actual_usd": settlement.cost_micro / 1e6,
            "policy_engine.settled.first": settlement.first,
        })
        steps = settlement.steps
        if steps:
            # One entry per billed step, index for index (OTel attributes hold flat arrays, not objects).
            attributes.update({
                "policy_engine.steps.types": [s.kind for s in steps],
                "policy_engine.steps.models": [s.model for s in steps],
                "policy_engine.steps.speeds": [s.speed for s in steps],
                "policy_engine.steps.cost_usd": [s.cost_micro / 1e6 for s in steps],
                "policy_engine.steps.input_tokens": [s.input_tokens + s.cache_write_tokens + s.cache_read_tokens for s in steps],
                "policy_engine.steps.output_tokens": [s.output_tokens for s in steps],
                "policy_engine.speed.split_unknown": settlement.speed_split_unknown,
            })
        if settlement.fallback_credit is not None:
            attributes["policy_engine.fallback_credit"] = settlement.fallback_credit
        span.set_attributes(attributes)
    span.end()
    if settlement.first:
        if settlement.steps:
            # The cost metric by step: its own model and the speed it was priced at (the sum is the settled cost).
            for step in settlement.steps:
                _cost.add(step.cost_micro / 1e6, {"policy_engine.speed": step.speed, "gen_ai.request.model": decision.model,
                                                  "gen_ai.response.model": step.model, "policy_engine.step.type": step.kind})
        else:
            _cost.add(settlement.cost_micro / 1e6, {"policy_engine.speed": settlement.speed, "gen_ai.request.model": decision.model})


def record_event(name: str, attributes: dict[str, Any] | None = None) -> None:
    """An operational event: a span event on the current span and a counter."""
    if not _active and _trace_api._TRACER_PROVIDER is None and _metrics_api._METER_PROVIDER is None:
        return  # no SDK: nothing could record this (checked each call, so a later SDK is seen)
    enabled()
    attrs = dict(attributes or {})
    trace.get_current_span().add_event(name, attrs)
    _events.add(1, {"policy_engine.event": name})
