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


_CONTEXT_TYPES: dict[str, type | tuple[type, ...]] = {
    "latency_slo_ms": int, "tenant": str, "user": str, "conversation_id": str,
    "interactive": bool, "priority": str, "labels": dict,
}


def context_features(context: Mapping[str, object] | None) -> dict[str, object]:
    """Validate the caller's context and fill its defaults. Unknown keys are errors, with did-you-mean."""
    from .errors import InvalidContext, did_you_mean

    result: dict[str, object] = {"interactive": False, "priority": "normal", "labels": {}}
    if not context:
        return result
    if not isinstance(context, Mapping):
        raise InvalidContext(f"context must be a mapping, got {type(context).__name__}")
    for key, value in context.items():
        expected = _CONTEXT_TYPES.get(key)  # type: ignore[arg-type]
        if expected is None:
            hint = did_you_mean(str(key), CONTEXT_KEYS)
            raise InvalidContext(f"unknown context key {key!r}" + (f"; {hint}" if hint else f"; known keys: {', '.join(CONTEXT_KEYS)}"))
        if value is None:
            continue
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise InvalidContext(f"context[{key!r}] must be {expected.__name__}, got {type(value).__name__} {value!r}")  # type: ignore[union-attr]
        if key == "labels" and not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):  # type: ignore[union-attr]
            raise InvalidContext("context['labels'] must map strings to strings")
        result[key] = value
    return result


def request_features(params: Mapping[str, object], input_tokens: int, exact: bool, *, batch: bool = False,
                     extra_betas: Iterable[str] = ()) -> dict[str, object]:
    """The `request` features of one Messages API call (validated enough to decide on)."""
    from .errors import InvalidRequest

    if not isinstance(params, Mapping):
        raise InvalidRequest(f"params must be a mapping of Messages API parameters, got {type(params).__name__}")
    model = params.get("model")
    max_tokens = params.get("max_tokens")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("params['model'] must be a non-empty string")
    if type(max_tokens) is not int or max_tokens < 1:
        raise InvalidRequest(f"params['max_tokens'] must be a positive int, got {max_tokens!r}")
    messages = params.get("messages") or ()
    if not isinstance(messages, (list, tuple)):
        raise InvalidRequest("params['messages'] must be a list")
    has_images = has_documents = False
    cache_control = "cache_control" in params
    for message in messages:
        content = message.get("content") if isinstance(message, Mapping) else None
        if isinstance(content, (list, tuple)):
            for block in content:
                if isinstance(block, Mapping):
                    kind = block.get("type")
                    has_images = has_images or kind == "image"
                    has_documents = has_documents or kind == "document"
                    cache_control = cache_control or "cache_control" in block
    system = params.get("system")
    if not cache_control and isinstance(system, (list, tuple)):
        cache_control = any(isinstance(b, Mapping) and "cache_control" in b for b in system)
    tools = params.get("tools") or ()
    if not cache_control and tools:
        cache_control = any(isinstance(t, Mapping) and "cache_control" in t for t in tools)  # type: ignore[union-attr]
    thinking = params.get("thinking")
    thinking_on = isinstance(thinking, Mapping) and thinking.get("type") in ("enabled", "adaptive")
    budget_tokens = thinking.get("budget_tokens", 0) if thinking_on and isinstance(thinking, Mapping) else 0
    betas = params.get("betas") or ()
    return {
        "model": model,
        "max_tokens": max_tokens,
        "input_tokens": input_tokens,
        "input_tokens_exact": exact,
        "stream": params.get("stream") is True,
        "has_tools": bool(tools),
        "has_images": has_images,
        "has_documents": has_documents,
        "thinking": {"enabled": thinking_on, "budget_tokens": budget_tokens if type(budget_tokens) is int else 0},
        "service_tier": params.get("service_tier") or "auto",
        "inference_geo": params.get("inference_geo") or "global",
        "batch": batch,
        "cache_control": cache_control,
        "message_count": len(messages),
        "betas": [*betas, *extra_betas] if extra_betas else list(betas),  # type: ignore[misc]
    }
