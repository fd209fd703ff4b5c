"""What a policy's CEL expressions can see: the feature schema.

`declarations(policy)` gives the CEL type of every top-level name; the README's
feature reference is generated from the same table (`FEATURE_DOCS`), so the
documentation cannot drift from what the type checker accepts.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from .cel.types import BOOL, DOUBLE, DYN, INT, STRING, TIMESTAMP, CelType, Field, ListType, MapType, ObjectType

__all__ = ["REQUEST", "CONTEXT", "RATELIMIT", "COST", "THROUGHPUT", "CONVERSATION", "BUDGET", "declarations", "CONTEXT_KEYS"]

_LABELS_MAX = 64
_BETAS_MAX = 32
_TEXT_MAX = 256

_S = STRING.with_max(_TEXT_MAX)


def _object(name: str, fields: Mapping[str, tuple[CelType, bool, str]]) -> ObjectType:
    return ObjectType(name, {k: Field(t, optional, doc) for k, (t, optional, doc) in fields.items()})


THINKING = _object("policy_engine.Thinking", {
    "enabled": (BOOL, False, "Extended or adaptive thinking is on."),
    "budget_tokens": (INT, False, "`thinking.budget_tokens`, 0 when thinking is off or adaptive."),
})

REQUEST = _object("policy_engine.Request", {
    "model": (_S, False, "`model` as sent, e.g. `claude-opus-4-6`."),
    "max_tokens": (INT, False, "`max_tokens`: the most output tokens the response may have."),
    "input_tokens": (INT, False, "Input tokens: counted exactly when a counter is configured, else estimated (an upper bound)."),
    "input_tokens_exact": (BOOL, False, "True when `input_tokens` was counted, not estimated."),
    "stream": (BOOL, False, "`stream` is true."),
    "has_tools": (BOOL, False, "`tools` is non-empty."),
    "has_images": (BOOL, False, "Some message holds an image block."),
    "has_documents": (BOOL, False, "Some message holds a document block."),
    "thinking": (THINKING, False, "The thinking configuration."),
    "service_tier": (_S, False, "`service_tier`, or `auto` when absent."),
    "inference_geo": (_S, False, "`inference_geo`, or `global` when absent."),
    "batch": (BOOL, False, "The request goes through the Message Batches API."),
    "cache_control": (BOOL, False, "Some block (system, tools, messages) or the request sets `cache_control`."),
    "message_count": (INT, False, "Number of entries in `messages`."),
    "betas": (ListType(_S, _BETAS_MAX), False, "`betas` list (SDK) or `anthropic-beta` header values."),
})

CONTEXT = _object("policy_engine.Context", {
    "latency_slo_ms": (INT, True, "The caller's latency target for the whole response, in ms."),
    "tenant": (_S, True, "Customer, team or workspace the request is for."),
    "user": (_S, True, "End user (an opaque id; never put personal data here)."),
    "conversation_id": (_S, True, "Conversation the request belongs to (used by stickiness)."),
    "interactive": (BOOL, False, "A person is waiting for the answer. Default false."),
    "priority": (_S, False, "Caller-defined priority, e.g. `high`, `normal`, `low`. Default `normal`."),
    "labels": (MapType(_S, _S, _LABELS_MAX), False, "Free-form string labels. Default empty."),
})
CONTEXT_KEYS = tuple(CONTEXT.fields)

BUDGET = _object("policy_engine.Budget", {
    "remaining_usd": (DOUBLE, False, "Limit minus spent minus reserved in the current window (infinite when no budget applies)."),
    "spent_usd": (DOUBLE, False, "Settled spend in the current window."),
    "limit_usd": (DOUBLE, False, "The budget's limit (infinite when no budget applies)."),
    "fraction_left": (DOUBLE, False, "remaining / limit, from 1.0 (untouched) to 0.0 (exhausted)."),
})

RATELIMIT = _object("policy_engine.FastRateLimit", {
    "input_tokens_remaining": (INT, True, "Fast-mode input tokens left now (replenished continuously between responses)."),
    "output_tokens_remaining": (INT, True, "Fast-mode output tokens left now."),
    "input_tokens_limit": (INT, True, "Fast-mode input tokens per minute."),
    "output_tokens_limit": (INT, True, "Fast-mode output tokens per minute."),
    "reset_in_s": (DOUBLE, True, "Seconds until the fast limits are fully replenished."),
    "seconds_since_429": (DOUBLE, True, "Seconds since the last fast-mode 429."),
})

COST = _object("policy_engine.Cost", {
    "standard_usd": (DOUBLE, True, "Worst-case cost at standard speed (absent when the catalog has no price)."),
    "fast_usd": (DOUBLE, True, "Worst-case cost at fast speed (absent when fast is unsupported or unpriced)."),
    "premium_usd": (DOUBLE, True, "fast_usd - standard_usd."),
})

THROUGHPUT = _object("policy_engine.Throughput", {
    "standard_otps": (DOUBLE, False, "Output tokens per second at standard speed (observed, else the catalog default)."),
    "fast_otps": (DOUBLE, True, "Output tokens per second at fast speed (absent when fast is unsupported)."),
    "ttft_s": (DOUBLE, False, "Time to first token, in seconds (the same at both speeds)."),
    "est_standard_s": (DOUBLE, False, "ttft_s + max_tokens / standard_otps."),
    "est_fast_s": (DOUBLE, True, "ttft_s + max_tokens / fast_otps."),
})

CONVERSATION = _object("policy_engine.Conversation", {
    "last_speed": (_S, True, "Speed of the conversation's previous request, while stickiness remembers it."),
    "cached_prefix_tokens": (INT, False, "Input tokens of the previous request, which a speed switch would re-cache."),
})

FEATURE_DOCS: dict[str, tuple[CelType, str]] = {
    "request": (REQUEST, "Derived from the Messages API parameters."),
    "context": (CONTEXT, "Supplied by the caller: `engine.decide(params, context={...})`."),
    "budget": (BUDGET, "The tightest budget that applies (lowest `fraction_left`)."),
    "budgets": (DYN, "`budgets.<name>`: each budget of the policy, with the fields of `budget`."),
    "ratelimit": (RATELIMIT, "Fast-mode rate-limit state from response headers."),
    "cost": (COST, "Worst-case estimates from the catalog."),
    "throughput": (THROUGHPUT, "Speed model per model."),
    "conversation": (CONVERSATION, "Sticky state of `context.conversation_id`."),
    "now": (TIMESTAMP, "Decision time (UTC); use `now.getHours('Europe/Paris')` for local time."),
    "vars": (DYN, "The policy's `variables`, each evaluated at most once per decision."),
}


def declarations(budget_names: Iterable[str] = (), variables: Mapping[str, CelType] | None = None) -> dict[str, CelType]:
    """The CEL declarations a policy's expressions are checked against."""
    decls: dict[str, CelType] = {name: t for name, (t, _) in FEATURE_DOCS.items() if name not in ("budgets", "vars")}
    decls["budgets"] = ObjectType("policy_engine.Budgets", {name: Field(BUDGET) for name in budget_names})
    decls["vars"] = ObjectType("policy_engine.Vars", {name: Field(t) for name, t in (variables or {}).items()})
    return decls
