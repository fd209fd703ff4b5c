"""What a policy's CEL expressions can see: the feature schema.

`declarations(policy)` gives the CEL type of every top-level name; the README's
feature reference is generated from the same table (`FEATURE_DOCS`), so the
documentation cannot drift from what the type checker accepts.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Final

from .cel.types import BOOL, DOUBLE, DYN, INT, STRING, TIMESTAMP, CelType, Field, ListType, MapType, ObjectType

__all__ = ["REQUEST", "MODEL", "CONTEXT", "RATELIMIT", "COST", "THROUGHPUT", "CONVERSATION", "BUDGET", "declarations", "CONTEXT_KEYS",
           "FEATURE_DOCS", "FEATURE_SOURCES", "reference_markdown", "context_features", "request_features",
           "valid_context"]

_LABELS_MAX: Final = 64
_BETAS_MAX: Final = 32
_TEXT_MAX: Final = 256

_S: Final = STRING.with_max(_TEXT_MAX)


def _object(name: str, fields: Mapping[str, tuple[CelType, bool, str]]) -> ObjectType:
    return ObjectType(name, {k: Field(t, optional, doc) for k, (t, optional, doc) in fields.items()})


THINKING = _object("policy_engine.Thinking", {
    "enabled": (BOOL, False, "Extended or adaptive thinking is on."),
    "budget_tokens": (INT, False, "`thinking.budget_tokens`, 0 when thinking is off or adaptive."),
})

REQUEST = _object("policy_engine.Request", {
    "model": (_S, False, "`model` as sent, e.g. `claude-opus-5-5`. Prefer the `model.*` features: they follow the catalog."),
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
    "betas": (ListType(_S, _BETAS_MAX), False, "The `betas` list of the params (how the SDK sends `anthropic-beta`)."),
    "platform": (_S, False, "Where the request goes: `claude_api`, `claude_platform_aws`, `bedrock`, `vertex` or `foundry`."),
})

MODEL = _object("policy_engine.Model", {
    "id": (_S, False, "The catalog's id of the requested model (the name as sent when the catalog does not know it)."),
    "known": (BOOL, False, "The catalog knows the model on this platform."),
    "family": (_S, False, "`opus`, `sonnet`, `haiku`, `fable`, `mythos`, ...; empty when unknown."),
    "fast_available": (BOOL, False, "Fast mode works for this model on this platform at the decision time (supported, "
                                    "available and not retired)."),
    "fast_priced": (BOOL, False, "The catalog can price this model at fast speed on this platform."),
    "fast_multiplier": (DOUBLE, True, "Fast over standard price (output rate, lowest tier), when both are priced."),
    "fast_needs_beta": (BOOL, False, "Fast requests carry a beta header (`fast-mode-2026-02-01`) on this model."),
    "fast_retires_in_days": (DOUBLE, True, "Days from the decision time until fast mode is retired (negative after); "
                                           "absent when no retirement is known."),
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
CONTEXT_KEYS: Final = tuple(CONTEXT.fields)

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
    "last_speed": (_S, True, "Speed of the conversation's previous request, while the conversation store remembers it."),
    "cached_prefix_tokens": (INT, False, "Input tokens of the previous request, which a speed switch would re-cache."),
})

FEATURE_DOCS: dict[str, tuple[CelType, str]] = {
    "request": (REQUEST, "Derived from the Messages API parameters."),
    "model": (MODEL, "What the catalog says of the requested model on the request's platform, at the decision time."),
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

FEATURE_SOURCES: dict[str, str] = {
    "request": "the `params` given to `decide()`",
    "request.input_tokens": "`decide(input_tokens=...)`, else the Engine's `counter` (count_tokens endpoint), else the estimator (`tokens.py`)",
    "request.input_tokens_exact": "as `request.input_tokens`",
    "request.batch": "`decide(..., batch=True)`",
    "request.betas": "`params['betas']`",
    "request.platform": "`decide(platform=...)`, else the Engine's `platform`; the SDK middleware passes its client's",
    "model": "the catalog (`policy_engine/catalog/catalog.yaml`, or yours), for the request's model and platform",
    "context": "the `context` given to `decide()`",
    "budget": "the ledger: the current calendar window of each budget, for the request's key",
    "budgets": "the ledger, as `budget`",
    "ratelimit": "`anthropic-fast-*` response headers and 429s of the request's `account` (`RateLimitStore`)",
    "cost": "the catalog's prices for the request's model, tier and `inference_geo`",
    "throughput": "the catalog's throughput figures, or observed ones (`Engine(throughput=ThroughputObserver())`)",
    "conversation": "the Engine's conversation store (kept for the policy's stickiness TTL, else an hour)",
    "now": "`decide(now=...)`, else the Engine's clock",
    "vars": "the policy's `variables`",
}
"""Where each feature comes from; a field without an entry comes from its top-level name's source."""


_TYPE_NAMES: Final = {"google.protobuf.Timestamp": "timestamp", "google.protobuf.Duration": "duration"}


def _type_name(t: CelType) -> str:
    if isinstance(t, ObjectType):
        return "object"
    if isinstance(t, ListType):
        return f"list({_type_name(t.elem)})"
    if isinstance(t, MapType):
        return f"map({_type_name(t.key)}, {_type_name(t.value)})"
    return _TYPE_NAMES.get(t.kind, t.kind)


def reference_markdown() -> str:
    """The README's feature reference: every name a policy's CEL can read, its type, meaning and source.

    Generated from `FEATURE_DOCS`, the ObjectType field descriptions and `FEATURE_SOURCES`,
    so it cannot drift from what the type checker accepts.
    """
    rows = ["| feature | CEL type | present | meaning | source |", "|---|---|---|---|---|"]

    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    def add(name: str, ctype: CelType, optional: bool, meaning: str, source: str) -> None:
        present = "when known (`has()`)" if optional else "always"
        rows.append(f"| `{name}` | {_type_name(ctype)} | {present} | {cell(meaning)} | {cell(source)} |")

    for top, (ctype, meaning) in FEATURE_DOCS.items():
        source = FEATURE_SOURCES.get(top, "")
        if top == "budgets":
            add("budgets.<name>", BUDGET, False, meaning, source)
            fields = BUDGET.fields
            prefix = "budgets.<name>"
        elif top == "vars":
            add("vars.<name>", DYN, False, meaning + " Its type is its expression's.", source)
            continue
        else:
            add(top, ctype, False, meaning, source)
            fields = ctype.fields if isinstance(ctype, ObjectType) else {}
            prefix = top
        for name, spec in fields.items():
            path = f"{prefix}.{name}"
            add(path, spec.type, spec.optional, spec.description, FEATURE_SOURCES.get(f"{top}.{name}", source))
            if isinstance(spec.type, ObjectType):
                for sub, sub_spec in spec.type.fields.items():
                    add(f"{path}.{sub}", sub_spec.type, sub_spec.optional, sub_spec.description,
                        FEATURE_SOURCES.get(f"{top}.{name}.{sub}", source))
    return "\n".join(rows) + "\n"


def declarations(budget_names: Iterable[str] = (), variables: Mapping[str, CelType] | None = None) -> dict[str, CelType]:
    """The CEL declarations a policy's expressions are checked against."""
    decls: dict[str, CelType] = {name: t for name, (t, _) in FEATURE_DOCS.items() if name not in ("budgets", "vars")}
    decls["budgets"] = ObjectType("policy_engine.Budgets", {name: Field(BUDGET) for name in budget_names})
    decls["vars"] = ObjectType("policy_engine.Vars", {name: Field(t) for name, t in (variables or {}).items()})
    return decls


_CONTEXT_TYPES: Final[dict[str, type]] = {
    "latency_slo_ms": int, "tenant": str, "user": str, "conversation_id": str,
    "interactive": bool, "priority": str, "labels": dict,
}


def context_features(context: Mapping[str, object] | None) -> dict[str, object]:
    """Validate the caller's context and fill its defaults. Unknown keys are errors, with did-you-mean.

    Raises `InvalidContext` (an `InvalidRequest`) naming the key, the expected and the given type.
    """
    if not context:
        return {"interactive": False, "priority": "normal", "labels": _NO_LABELS}
    if type(context) is not dict and not isinstance(context, Mapping):
        raise _invalid_context(f"context must be a mapping, got {type(context).__name__}", "context must be a mapping")
    # Typed dict, so compiled code iterates it in place rather than through items() tuples.
    given: dict[Any, object] = context if type(context) is dict else dict(context)
    types = _CONTEXT_TYPES
    for key, value in given.items():
        if not _as_given(types.get(key), value):
            return _checked_context(given)  # unknown keys, None (absent), subclasses; and every error
    # Every entry is valid as given: the defaults, then the entries, in one C-level merge.
    return {"interactive": False, "priority": "normal", "labels": _NO_LABELS, **given}


def _as_given(expected: type | None, value: object) -> bool:
    """A context value of exactly its key's type (labels: strings to strings), taken without further checks."""
    if expected is None or value is None or type(value) is not expected:
        return False
    if expected is dict and type(value) is dict and value:  # the second test narrows: a typed, in-place iteration
        for k, v in value.items():
            if type(k) is not str or type(v) is not str:
                return False
    return True


def _checked_context(given: dict[Any, object]) -> dict[str, object]:
    """`context_features` entry by entry, for a context the fast path could not take as it is."""
    result: dict[str, object] = {"interactive": False, "priority": "normal", "labels": _NO_LABELS}
    types = _CONTEXT_TYPES
    for key, value in given.items():
        expected = types.get(key)
        if not _as_given(expected, value) and not _context_value_ok(key, value, expected):
            continue
        result[key] = value
    return result


def valid_context(context: object) -> dict[str, object]:
    """The valid part of a context `context_features` refused: its well-typed known entries, with the defaults
    (nothing of it when it is not a mapping). Never raises."""
    result: dict[str, object] = {"interactive": False, "priority": "normal", "labels": _NO_LABELS}
    if not isinstance(context, Mapping):
        return result
    from .errors import InvalidContext

    types = _CONTEXT_TYPES
    for key, value in context.items():
        expected = types.get(key) if type(key) is str else None
        try:
            if expected is None or not (_as_given(expected, value) or _context_value_ok(key, value, expected)):
                continue
        except InvalidContext:
            continue
        result[key] = value
    return result


_NO_LABELS: Final[dict[str, str]] = {}
"""Shared by every context without labels; rules only read it."""


def _invalid_context(message: str, redacted: str) -> Exception:
    from .errors import InvalidContext

    return InvalidContext(message, redacted=redacted)


def _context_value_ok(key: object, value: object, expected: type | None) -> bool:
    """Checks one context entry the fast path could not accept: False means "absent", errors raise."""
    from .errors import did_you_mean

    if expected is None:
        hint = did_you_mean(str(key), CONTEXT_KEYS)
        known = f"; {hint}" if hint else f"; known keys: {', '.join(CONTEXT_KEYS)}"
        raise _invalid_context(f"unknown context key {key!r}{known}", f"unknown context key{known}")
    if value is None:
        return False
    if expected is dict:
        if not isinstance(value, Mapping):
            raise _invalid_context(f"context[{key!r}] must be dict, got {type(value).__name__} {value!r}",
                                   f"context[{key!r}] must be dict, got {type(value).__name__}")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            raise _invalid_context("context['labels'] must map strings to strings", "context['labels'] must map strings to strings")
        return True
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise _invalid_context(f"context[{key!r}] must be {expected.__name__}, got {type(value).__name__} {value!r}",
                               f"context[{key!r}] must be {expected.__name__}, got {type(value).__name__}")
    return True


def request_features(params: Mapping[str, object], input_tokens: int, exact: bool, *, batch: bool = False,
                     extra_betas: Iterable[str] = (), platform: str = "claude_api") -> dict[str, object]:
    """The `request` features of one Messages API call (validated enough to decide on).

    Raises `InvalidRequest` for params that are not a mapping, a missing model, a
    max_tokens that is not a positive int, or messages that are not a list.
    """
    if type(params) is not dict and not isinstance(params, Mapping):
        raise _invalid_request(f"params must be a mapping of Messages API parameters, got {type(params).__name__}")
    get = params.get
    model = get("model")
    max_tokens = get("max_tokens")
    if type(model) is not str or not model:
        if not isinstance(model, str) or not model:
            raise _invalid_request("params['model'] must be a non-empty string")
    if type(max_tokens) is not int or max_tokens < 1:
        raise _invalid_request(f"params['max_tokens'] must be a positive int, got {max_tokens!r}")
    messages = get("messages") or ()
    if type(messages) is not list and not isinstance(messages, (list, tuple)):
        raise _invalid_request("params['messages'] must be a list")
    has_images = has_documents = False
    cache_control = "cache_control" in params
    for message in messages:
        if type(message) is dict:
            content = message.get("content")
        else:
            content = message.get("content") if isinstance(message, Mapping) else None
        if type(content) is str:
            continue  # the common case: nothing in a string can be an image, a document or cache_control
        if type(content) is list or isinstance(content, tuple):
            for block in content:  # type: ignore[union-attr]
                if type(block) is dict or isinstance(block, Mapping):
                    kind = block.get("type")
                    if kind == "image":
                        has_images = True
                    elif kind == "document":
                        has_documents = True
                    if not cache_control and "cache_control" in block:
                        cache_control = True
    system = get("system")
    if not cache_control and system and type(system) is not str and isinstance(system, (list, tuple)):
        for block in system:
            if (type(block) is dict or isinstance(block, Mapping)) and "cache_control" in block:
                cache_control = True
                break
    tools: Any = get("tools") or ()
    if not cache_control and tools:
        for tool in tools:
            if (type(tool) is dict or isinstance(tool, Mapping)) and "cache_control" in tool:
                cache_control = True
                break
    thinking = get("thinking")
    thinking_features = _NO_THINKING
    if thinking and isinstance(thinking, Mapping) and thinking.get("type") in ("enabled", "adaptive"):
        budget_tokens = thinking.get("budget_tokens", 0)
        thinking_features = {"enabled": True, "budget_tokens": budget_tokens if type(budget_tokens) is int else 0}
    betas: Any = get("betas")
    return {
        "model": model,
        "max_tokens": max_tokens,
        "input_tokens": input_tokens,
        "input_tokens_exact": exact,
        "stream": get("stream") is True,
        "has_tools": bool(tools),
        "has_images": has_images,
        "has_documents": has_documents,
        "thinking": thinking_features,
        "service_tier": get("service_tier") or "auto",
        "inference_geo": get("inference_geo") or "global",
        "batch": batch,
        "cache_control": cache_control,
        "message_count": len(messages),
        "betas": [*betas, *extra_betas] if extra_betas else list(betas) if betas else _NO_BETAS,
        "platform": platform,
    }


_NO_THINKING: Final = {"enabled": False, "budget_tokens": 0}
"""Shared by every request without thinking; features are only read."""
_NO_BETAS: Final[list[str]] = []
"""Shared by every request without betas, likewise."""


def _invalid_request(message: str) -> Exception:
    from .errors import InvalidRequest

    return InvalidRequest(message)
