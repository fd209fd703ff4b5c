"""One decision-log record: its format (a pydantic model, exported as a JSON Schema) and how it is built.

A record is built on the log's writer thread from what the engine handed over on the request
path (the decision, its settlement, the response's usage, what the integration observed), so
the request path never serializes anything.

What a record may hold is a closed list: the features the policy language declares (the
`request` features are counts and flags; the `context` is the caller's ids and labels, hashed
and filtered as configured), the decision, the budget scopes, the usage counts, timings and the
`anthropic-fast-*` headers. Prompt text, tool inputs and API keys are never among them: the
record is built from those fields only, never from the request body.
"""

from __future__ import annotations

import hashlib
import hmac
import typing
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

__all__ = ["RECORD_KIND", "RECORD_VERSION", "DecisionRecord", "Observed", "Privacy", "build_record"]

RECORD_KIND: Final = "policy_engine.decision"
"""The `record` field of every decision-log line: how `simulate` and `diff` tell a decision log from a request log."""
RECORD_VERSION: Final = 1

_RATELIMIT_PREFIX: Final = "anthropic-fast-"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RecordPolicy(_Model):
    name: str
    version: str


class RecordDecision(_Model):
    speed: Literal["fast", "standard"]
    rule: str
    outcome: Literal["allowed", "downgraded", "rejected"]
    reasons: list[str]
    guardrails: list[str]
    ceilings: list[str]
    forced_by: str | None
    model: str
    platform: str
    fast_beta: str | None
    fast_model: str | None
    incomplete: str | None = Field(description="`worst_case` or `observed` when the response ended without its usage.")
    fallback_rewrites: list[dict[str, Any]]
    errors: list[str]
    estimate_micro: int | None = Field(description="The worst case reserved for the chosen speed, micro-dollars.")
    reservation_id: str | None


class RecordFallback(_Model):
    """One entry of the request's `fallbacks`: only what decides and prices it."""

    model: str
    max_tokens: int | None = None
    speed: str | None = None


class RecordFeatures(_Model):
    request: dict[str, Any] = Field(description="Every `request.*` feature, as the policy saw it.")
    context: dict[str, Any] = Field(description="The validated `context.*` features (ids hashed and labels filtered "
                                                "as the log is configured).")
    fallbacks: list[RecordFallback] | Literal["default"] | None = Field(
        default=None, description="The request's server-side `fallbacks` (model, max_tokens and speed of each entry).")
    account: str = Field(description="The rate-limit account (already a hash of the API key).")


class RecordScope(_Model):
    budget: str
    key: str = Field(description="The budget's key value: `#<digest>` where the ledger or the log hashes it.")
    window: str


class RecordLatency(_Model):
    stream: bool
    ttft_s: float | None = Field(default=None, description="Sending to the first content token (streams only).")
    total_s: float | None = Field(default=None, description="Sending to the last byte of the response.")
    output_tps: float | None = Field(default=None, description="Output tokens per second: after the first token for "
                                                               "a stream, over the whole response otherwise.")


class RecordAttempt(_Model):
    """One attempt on the wire: what it was sent at and what the integration did with the answer."""

    speed: str
    status: int | None = Field(description="HTTP status; None when the attempt ended without a response.")
    action: str = Field(description="`done`, `fallback`, `retry`, `fail`, `sdk_retry` or `error`.")
    wait_s: float = 0.0


class RecordRateLimit(_Model):
    status: int | None
    account: str | None = Field(default=None, description="The account the headers were recorded for (the decision's "
                                                          "`features.account` is the one known when it was made).")
    headers: dict[str, str] = Field(description="The last response's `anthropic-fast-*` headers (and `retry-after` "
                                                "of a 429).")


def _step_model() -> type[BaseModel]:
    """The record of one billed step: `decide.StepCost`'s fields, so the two cannot drift apart."""
    from ..decide import StepCost

    hints = typing.get_type_hints(StepCost)
    # The docstring is written here, not taken from StepCost: mypyc gives a compiled NamedTuple a filler one,
    # and the schema would then differ between the compiled and the pure-Python build.
    return create_model("RecordStep", __base__=_Model,
                        __doc__="One billed step of a response (a `usage.iterations` entry), priced at its own model "
                                "and speed.",
                        **{name: (hints[name], ...) for name in StepCost._fields})


RecordStep = _step_model()


class RecordSource(_Model):
    """Where an imported record comes from (absent: written by the engine)."""

    kind: Literal["otel"] = Field(description="`otel`: converted from an OpenTelemetry GenAI span.")
    trace_id: str | None = None
    span_id: str | None = None
    assumed: list[str] = Field(description="Features the source could not supply: the record holds documented "
                                           "defaults for them (README, `import-otel`).")


class DecisionRecord(_Model):
    """One line of a decision log (JSON Lines): one request from its decision to its end."""

    record: Literal["policy_engine.decision"]
    v: Literal[1]
    ts: str = Field(description="The decision time, RFC 3339 in UTC.")
    event: Literal["settled", "released", "rejected"]
    policy: RecordPolicy
    decision: RecordDecision
    features: RecordFeatures
    scopes: list[RecordScope]
    usage: dict[str, Any] | None = Field(description="The response's usage as the API reported it (token counts, "
                                                     "`speed`, `iterations`): what a replay bills.")
    steps: list[RecordStep] = Field(description="The billed steps when the usage had `iterations`.")  # type: ignore[valid-type]
    cost_micro: int | None = Field(description="What settlement recorded, micro-dollars (None: not settled).")
    latency: RecordLatency | None
    ratelimit: RecordRateLimit | None
    history: list[RecordAttempt] = Field(description="Every attempt, in order (retries, fast 429 fallbacks).")
    sample_rate: float = Field(description="The probability this record was kept with (1: every record).")
    dropped: int = Field(description="Records dropped (the queue was full) since the previous record written.")
    source: RecordSource | None = Field(default=None, description="Set on records imported from elsewhere "
                                                                  "(`policy-engine import-otel`).")


class Observed:
    """What an integration saw of one request on the wire; the engine's own callers leave it empty."""

    __slots__ = ("stream", "ttft_s", "total_s", "output_tps", "status", "headers", "history", "account")

    def __init__(self) -> None:
        self.stream = False
        self.ttft_s: float | None = None
        self.total_s: float | None = None
        self.output_tps: float | None = None
        self.status: int | None = None
        self.headers: dict[str, str] = {}
        self.history: list[dict[str, Any]] = []
        self.account: str | None = None

    def attempt(self, speed: str, status: int | None, headers: Mapping[str, str] | None, action: str,
                wait_s: float = 0.0) -> None:
        """One attempt ended: its status, its fast rate-limit headers, and what was done next."""
        self.history.append({"speed": speed, "status": status, "action": action, "wait_s": round(wait_s, 6)})
        if status is not None:
            self.status = status
        if headers:
            kept = {k.lower(): str(v) for k, v in headers.items() if k.lower().startswith(_RATELIMIT_PREFIX)}
            if status == 429 and "retry-after" in headers:
                kept["retry-after"] = str(headers["retry-after"])
            self.headers = kept

    def latency(self, output_tokens: int | None) -> dict[str, Any] | None:
        if self.total_s is None and self.ttft_s is None:
            return None
        tps = self.output_tps
        if tps is None and not self.stream and output_tokens and self.total_s:
            tps = output_tokens / self.total_s  # the whole response: a lower bound of the generation rate
        return {"stream": self.stream, "ttft_s": _round(self.ttft_s), "total_s": _round(self.total_s),
                "output_tps": _round(tps)}


class Privacy:
    """Which context values a record hides behind a digest, and which labels it keeps."""

    __slots__ = ("hashed", "labels", "_secret")

    def __init__(self, hash_context: tuple[str, ...], labels: frozenset[str] | None, secret: bytes | None) -> None:
        self.hashed = hash_context
        self.labels = labels
        self._secret = secret

    def digest(self, value: str) -> str:
        data = value.encode("utf-8", "surrogatepass")
        if self._secret is not None:
            return "#" + hmac.new(self._secret, data, hashlib.sha256).hexdigest()[:32]
        return "#" + hashlib.sha256(data).hexdigest()[:32]

    def context(self, ctx: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
        """The context as recorded, and each hidden value's digest (scopes keyed by it get the same one)."""
        recorded = dict(ctx)
        digests: dict[str, str] = {}
        for key in self.hashed:
            value = recorded.get(key)
            if type(value) is str:
                digests[value] = recorded[key] = self.digest(value)
        labels = recorded.get("labels")
        if self.labels is not None and isinstance(labels, Mapping):
            recorded["labels"] = {k: v for k, v in labels.items() if k in self.labels}
        elif isinstance(labels, Mapping):
            recorded["labels"] = dict(labels)
        return recorded, digests


def build_record(event: str, decision: Any, settlement: Any, usage: Any, privacy: Privacy, scope_digest: Any,
                 sample_rate: float, dropped: int) -> dict[str, Any]:
    """The record of one request, as a JSON-ready dict (the shape of `DecisionRecord`)."""
    inputs = decision._inputs
    if inputs is None:  # decided before its features were known (a rule failed under on_error: raise)
        request: Mapping[str, Any] = {}
        ctx: Mapping[str, Any] = {}
        account, fallbacks = "default", None
    else:
        request, ctx, account, fallbacks = inputs
    context, digests = privacy.context(ctx)
    observed = decision._observed
    return {
        "record": RECORD_KIND,
        "v": RECORD_VERSION,
        "ts": _rfc3339(decision.at),
        "event": event,
        "policy": {"name": decision.policy_name, "version": decision.policy_version},
        "decision": {
            "speed": decision.speed, "rule": decision.rule, "outcome": decision.outcome,
            "reasons": list(decision.reasons), "guardrails": list(decision.guardrails),
            "ceilings": list(decision.ceilings), "forced_by": decision.forced_by, "model": decision.model,
            "platform": decision.platform, "fast_beta": decision.fast_beta, "fast_model": decision.fast_model,
            "incomplete": decision.incomplete, "fallback_rewrites": [dict(r) for r in decision.fallback_rewrites],
            "errors": list(decision.errors), "estimate_micro": decision.estimate_micro,
            "reservation_id": decision.reservation_id,
        },
        "features": {"request": _plain(request), "context": context, "fallbacks": _fallbacks(fallbacks),
                     "account": account},
        "scopes": [{"budget": scope.budget, "key": digests.get(scope.key) or scope_digest(scope.key),
                    "window": scope.window} for _, scope in decision._budget_charges],
        "usage": _usage(usage),
        "steps": [step._asdict() for step in settlement.steps] if settlement is not None else [],
        "cost_micro": settlement.cost_micro if settlement is not None else None,
        "latency": (observed.latency(settlement.output_tokens if settlement is not None else None)
                    if observed is not None else None),
        "ratelimit": ({"status": observed.status, "account": observed.account, "headers": dict(observed.headers)}
                      if observed is not None and (observed.headers or observed.status is not None) else None),
        "history": list(observed.history) if observed is not None else [],
        "sample_rate": sample_rate,
        "dropped": dropped,
    }


_USAGE_NUMBERS: Final = ("input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")


def _usage(usage: Any) -> dict[str, Any] | None:
    """The usage as a plain dict of counts: a dict as given, the SDK's Usage through `model_dump`."""
    if usage is None:
        return None
    if not isinstance(usage, Mapping):
        dump = getattr(usage, "model_dump", None)
        if dump is None:
            return None
        usage = dump(exclude_none=True)
    return _plain(usage)


def _plain(value: Any) -> Any:
    """JSON-ready copy: mappings and sequences copied, scalars as they are, anything else as its str."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _fallbacks(fallbacks: Any) -> list[dict[str, Any]] | str | None:
    if fallbacks == "default":
        return "default"
    if not isinstance(fallbacks, (list, tuple)):
        return None
    kept = []
    for entry in fallbacks:
        if isinstance(entry, Mapping) and isinstance(entry.get("model"), str):
            item: dict[str, Any] = {"model": entry["model"]}
            if type(entry.get("max_tokens")) is int:
                item["max_tokens"] = entry["max_tokens"]
            if isinstance(entry.get("speed"), str):
                item["speed"] = entry["speed"]
            kept.append(item)
    return kept


def _rfc3339(epoch: float) -> str:
    moment = datetime.fromtimestamp(epoch, timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond:06d}Z"


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 6)
