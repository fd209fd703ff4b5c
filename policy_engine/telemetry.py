"""OpenTelemetry spans and metrics, through opentelemetry-api only.

Without an SDK configured every call here is a no-op costing well under a
microsecond. Attributes use the GenAI semantic-convention names where they exist
(`gen_ai.*`) and `policy_engine.*` for the rest. Prompt content, user text and
API keys are never recorded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from opentelemetry import metrics, trace

if TYPE_CHECKING:
    from .decide import Decision, Settlement

__all__ = ["record_decision", "record_settlement", "record_event", "TRACER_NAME"]

TRACER_NAME = "policy_engine"

_tracer = trace.get_tracer(TRACER_NAME)
_meter = metrics.get_meter(TRACER_NAME)

_decisions = _meter.create_counter("policy_engine.decisions", unit="{decision}", description="Decisions by speed, rule and outcome.")
_downgrades = _meter.create_counter("policy_engine.downgrades", unit="{decision}", description="Fast decisions forced to standard, by reason.")
_rejects = _meter.create_counter("policy_engine.rejects", unit="{request}", description="Requests refused by a ceiling, by reason.")
_cost = _meter.create_counter("policy_engine.cost", unit="USD", description="Settled cost by speed.")
_decide_latency = _meter.create_histogram("policy_engine.decide.duration", unit="s", description="Time spent in decide().")
_events = _meter.create_counter("policy_engine.events", unit="{event}", description="Operational events (reloads, bad headers, state outages).")


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
    if decision.estimate_standard_micro is not None:
        attributes["policy_engine.cost.estimate_standard_usd"] = decision.estimate_standard_micro / 1e6
    if decision.estimate_fast_micro is not None:
        attributes["policy_engine.cost.estimate_fast_usd"] = decision.estimate_fast_micro / 1e6
    if decision.errors:
        attributes["policy_engine.errors"] = list(decision.errors)
    if decision.reservation_id:
        attributes["policy_engine.reservation_id"] = decision.reservation_id
    return attributes


def record_decision(decision: Decision, started_ns: int, ended_ns: int) -> None:
    """One span per decision, and the decision metrics."""
    attributes = _decision_attributes(decision)
    span = _tracer.start_span("policy_engine.decide", attributes=attributes, start_time=started_ns)
    for error in decision.errors:
        span.add_event("policy_engine.rule_error", {"policy_engine.error": error})
    span.end(end_time=ended_ns)
    labels = {"policy_engine.speed": decision.speed, "policy_engine.rule": decision.rule, "policy_engine.outcome": decision.outcome}
    _decisions.add(1, labels)
    if decision.outcome == "downgraded":
        _downgrades.add(1, {"policy_engine.reason": decision.forced_by or "unknown"})
    elif decision.outcome == "rejected":
        _rejects.add(1, {"policy_engine.reason": decision.forced_by or "unknown"})
    _decide_latency.record((ended_ns - started_ns) / 1e9, {"policy_engine.policy.name": decision.policy_name})


def record_settlement(decision: Decision, settlement: Settlement, usage: Any) -> None:
    """One span per settlement, and the cost metric."""
    attributes = _decision_attributes(decision)
    attributes.update({
        "gen_ai.response.model": decision.model,
        "gen_ai.usage.input_tokens": settlement.input_tokens,
        "gen_ai.usage.output_tokens": settlement.output_tokens,
        "policy_engine.speed.actual": settlement.speed,
        "policy_engine.cost.actual_usd": settlement.cost_micro / 1e6,
        "policy_engine.settled.first": settlement.first,
    })
    with _tracer.start_as_current_span("policy_engine.settle", attributes=attributes):
        pass
    if settlement.first:
        _cost.add(settlement.cost_micro / 1e6, {"policy_engine.speed": settlement.speed, "gen_ai.request.model": decision.model})


def record_event(name: str, attributes: dict[str, Any] | None = None) -> None:
    """An operational event: a span event on the current span and a counter."""
    attrs = dict(attributes or {})
    trace.get_current_span().add_event(name, attrs)
    _events.add(1, {"policy_engine.event": name})
