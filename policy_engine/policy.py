"""The policy file format, version 1, as pydantic models.

These models are the single definition of the format: the loader validates
against them, `schemas/policy.schema.json` is generated from them, and the
README's reference table is written from their field descriptions.
CEL expressions stay strings here; `compile` turns them into code.
"""

from __future__ import annotations

import math
import re
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = [
    "Policy",
    "Rule",
    "ExprText",
    "Ceilings",
    "Budget",
    "Stickiness",
    "TestCase",
    "TestState",
    "Expectation",
    "Speed",
    "PriceAs",
    "Rate",
    "StatedRate",
    "parse_duration",
]

Speed = Literal["fast", "standard"]
Cel = Annotated[str, Field(min_length=1, description="A CEL expression.", json_schema_extra={"format": "cel"})]
MAX_USD = 1_000_000_000
"""The largest amount a policy may state: $1e9 is 1e15 micro-dollars, far inside the int64 the
ledgers store, so no sum of limits and spend can overflow or turn into a float."""
MAX_DURATION_S = 3650 * 86_400
"""The longest duration a policy may state (ten years): clocks and stores handle it exactly."""

Usd = Annotated[Decimal, Field(ge=0, le=MAX_USD, decimal_places=6, allow_inf_nan=False,
                               description="An amount in US dollars (at most 6 decimals, at most $1,000,000,000).")]
Seconds = Annotated[float, Field(ge=0, le=MAX_DURATION_S, allow_inf_nan=False)]
Name = Annotated[str, Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\- ]*$")]
Identifier = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]

_DURATION = re.compile(r"^(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")


def parse_duration(text: str | int | float) -> float:
    """'90s', '15m', '1h30m', '2d' or a number of seconds -> seconds."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return _in_range(float(text) if text <= MAX_DURATION_S else math.inf)  # float(10**400) would overflow
    match = _DURATION.match(str(text).strip())
    if not match or not any(match.groups()):
        raise ValueError(f"'{text}' is not a duration; write it like '90s', '15m', '1h30m' or '2d'")
    d, h, m, s = (int(g or 0) for g in match.groups())
    return _in_range(float(((d * 24 + h) * 60 + m) * 60 + s))


def _in_range(seconds: float) -> float:
    if not seconds > 0:  # also NaN
        raise ValueError("a duration must be positive")
    if seconds > MAX_DURATION_S:
        raise ValueError(f"a duration must be at most {MAX_DURATION_S // 86_400} days")
    return seconds


Duration = Annotated[Union[str, int], Field(description="A duration such as '90s', '15m', '1h30m', '2d', or seconds.")]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class ExprText(_Model):
    """A reason computed by a CEL string expression instead of fixed text."""

    expr: Cel = Field(description="CEL expression of type string, e.g. `'SLO ' + string(context.latency_slo_ms) + 'ms'`.")


class Rule(_Model):
    name: Name = Field(description="Unique name of the rule; decisions, traces and tests refer to it.")
    when: Cel = Field(description="CEL expression of type bool; the first rule whose `when` is true decides.")
    speed: Speed = Field(description="Speed this rule chooses: `fast` or `standard`.")
    reason: Union[str, ExprText, None] = Field(
        default=None, description="Why, for logs and traces: plain text, or `{expr: <CEL string expression>}`."
    )
    description: str | None = Field(default=None, description="Free text for reviewers.")


class Ceilings(_Model):
    per_request_usd: Usd | None = Field(
        default=None,
        description="Worst-case cost ceiling for one request. Over it, fast is downgraded to standard if standard fits; "
        "otherwise `on_exceed` applies.",
    )
    on_exceed: Literal["reject", "allow"] = Field(
        default="reject", description="When even standard speed is over `per_request_usd`: `reject` the request or `allow` it."
    )


class Budget(_Model):
    name: Identifier = Field(description="Unique budget name (an identifier); decisions and errors name it, CEL reads it as `budgets.<name>`.")
    key: Cel = Field(
        default="'global'",
        description="CEL string expression naming the scope, e.g. `context.tenant`: each key value has its own budget.",
    )
    window: Literal["hour", "day", "week", "month"] = Field(description="Calendar window the budget resets on.")
    timezone: str = Field(default="UTC", description="IANA timezone whose calendar defines the window, e.g. `America/New_York`.")
    limit_usd: Usd = Field(description="Spend allowed per window and key, in USD.")
    counts: Literal["all", "fast", "premium"] = Field(
        default="all",
        description="What spends the budget: `all` spend, only `fast` requests' spend, or only the fast `premium` "
        "(fast cost minus what standard would have cost).",
    )
    on_exceed: Literal["downgrade", "reject"] = Field(
        default="downgrade",
        description="When the request's worst case does not fit: `downgrade` fast to standard (rejecting only if "
        "standard does not fit either, for budgets that count standard spend), or `reject` the request.",
    )
    description: str | None = Field(default=None, description="Free text for reviewers.")

    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, value: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown IANA timezone '{value}'") from None
        return value


class Stickiness(_Model):
    ttl: Duration = Field(description="How long a conversation keeps its last speed, e.g. `10m`.")
    key: Cel = Field(
        default="context.conversation_id",
        description="CEL string expression identifying the conversation.",
    )

    @field_validator("ttl")
    @classmethod
    def _valid_ttl(cls, value: str | int) -> str | int:
        parse_duration(value)
        return value

    @property
    def ttl_s(self) -> float:
        return parse_duration(self.ttl)


class TestBudgetState(_Model):
    spent_usd: Usd = Field(default=Decimal(0), description="Already spent in the current window for this request's key.")


class TestRateLimitState(_Model):
    input_tokens_remaining: int | None = Field(default=None, ge=0, description="Fast input tokens left (unknown when absent).")
    output_tokens_remaining: int | None = Field(default=None, ge=0, description="Fast output tokens left.")
    input_tokens_limit: int | None = Field(default=None, ge=0, description="Fast input tokens per minute.")
    output_tokens_limit: int | None = Field(default=None, ge=0, description="Fast output tokens per minute.")
    reset_in_s: Seconds | None = Field(default=None, description="Seconds until the limits are replenished.")
    seconds_since_429: Seconds | None = Field(default=None, description="Seconds since the last fast 429.")


class TestConversationState(_Model):
    last_speed: Speed | None = Field(default=None, description="Speed of the conversation's previous request.")
    cached_prefix_tokens: int = Field(default=0, ge=0, description="Input tokens of the previous request.")
    age_s: Seconds = Field(default=0, description="Seconds since the conversation's last decision.")


class TestState(_Model):
    budgets: dict[str, TestBudgetState] = Field(default_factory=dict, description="Budget name -> state.")
    ratelimit: TestRateLimitState | None = Field(default=None, description="Known fast rate-limit state.")
    conversation: TestConversationState | None = Field(default=None, description="The conversation's sticky state.")


class Expectation(_Model):
    speed: Speed | None = Field(default=None, description="Expected speed.")
    rule: str | None = Field(default=None, description="Expected deciding rule name (or `default`).")
    outcome: Literal["allowed", "downgraded", "rejected"] | None = Field(
        default=None, description="`allowed` (the rule's speed stands), `downgraded` (a guardrail or ceiling forced standard), or `rejected`."
    )
    reasons: list[str] = Field(default_factory=list, description="Substrings that must each appear in some reason.")
    guardrails: list[str] | None = Field(default=None, description="Exactly these guardrails applied.")
    beta: bool | None = Field(
        default=None,
        description="The request goes out fast WITH the fast-mode beta header (true) or without it (false: standard, "
                    "or fast where fast mode is generally available).",
    )


class TestCase(_Model):
    __test__ = False  # not a pytest class

    name: str = Field(min_length=1, max_length=200, description="Unique test name (any text).")
    request: dict[str, Any] = Field(description="Messages API parameters, as passed to `client.messages.create`.")
    input_tokens: int | None = Field(default=None, ge=0, description="Pretend the input was counted exactly at this many tokens.")
    context: dict[str, Any] = Field(default_factory=dict, description="The caller's context (tenant, latency SLO, ...).")
    state: TestState = Field(default_factory=TestState, description="Budget, rate-limit and conversation state before the request.")
    now: datetime | None = Field(default=None, description="Decision time (RFC 3339); defaults to 2026-12-01T12:00:00Z.")
    platform: Literal["claude_api", "claude_platform_aws", "bedrock", "vertex", "foundry"] = Field(
        default="claude_api", description="Where the request goes: prices and fast mode are that platform's."
    )
    expect: Expectation = Field(description="What the decision must be.")


class PriceAs(_Model):
    price_as: str = Field(min_length=1, description="Price the request as this catalog model (id or alias), at its rates.")


class StatedRate(_Model):
    input_usd_per_mtok: Usd = Field(description="Input price, USD per million tokens (cache writes bill 1.25x (5m) and "
                                                "2x (1h) of it, cache reads 0.1x).")
    output_usd_per_mtok: Usd = Field(description="Output price, USD per million tokens.")


class Rate(_Model):
    rate: StatedRate = Field(description="Price the request at this stated rate (standard speed; a fast usage bills "
                                         "the catalog's dearest fast rates).")


UnpricedModel = Union[Literal["reject", "conservative", "allow_unmetered"], PriceAs, Rate]


class Policy(_Model):
    version: Literal[1] = Field(description="Format version. Always `1`.")
    name: Name = Field(description="Policy name; traces and decisions carry it.")
    description: str | None = Field(default=None, description="What the policy is for.")
    owner: str | None = Field(default=None, description="Who to ask about it (team, email, channel).")
    default: Speed = Field(default="standard", description="Speed when no rule matches.")
    on_error: Literal["skip", "standard", "raise"] = Field(
        default="skip",
        description="When a rule's `when` fails to evaluate: `skip` the rule, force `standard` for the request, "
        "or `raise` to the caller.",
    )
    on_fast_rate_limited: Literal["fallback", "retry", "fail"] = Field(
        default="fallback",
        description="On a fast-mode 429: `fallback` to standard at once (Anthropic's recipe), `retry` after "
        "`retry-after`, or `fail`.",
    )
    on_state_unavailable: Literal["standard", "reject"] = Field(
        default="standard",
        description="When shared state (budgets, rate limits) cannot be reached: decide `standard` and go on, or `reject`.",
    )
    on_invalid_context: Literal["standard", "reject", "allow_unmetered"] = Field(
        default="standard",
        description="When the caller's context has an unknown key or a wrongly typed value: `standard` decides with "
        "the valid part of the context at standard speed, reserved and settled against every budget (a budget whose "
        "key cannot be evaluated charges the shared `<key-error>` bucket); `reject` raises `InvalidContext` (nothing "
        "is sent); `allow_unmetered` sends it at standard with no reservation and no settlement (lint warns, PE250).",
    )
    on_unpriced_model: UnpricedModel = Field(
        default="conservative",
        description="When the catalog has no standard price for the request's model (unknown model, or no price at "
        "its inference geo): `conservative` prices it at the catalog's dearest rates on the platform; `reject` "
        "refuses it; `{price_as: <model>}` prices it as that catalog model; `{rate: {input_usd_per_mtok, "
        "output_usd_per_mtok}}` at a stated rate; `allow_unmetered` reserves and settles it at $0 (lint warns, PE250).",
    )
    on_incomplete_stream: Literal["worst_case", "observed"] = Field(
        default="worst_case",
        description="A stream that ends without its final usage (closed early, dropped, cut by the server) and an "
        "attempt abandoned by a client timeout: `worst_case` settles the reservation's worst case (max_tokens of "
        "output), what the server may have billed; `observed` settles only the output tokens the client read "
        "(lint warns, PE250).",
    )
    variables: dict[Identifier, Cel] = Field(
        default_factory=dict, description="Named CEL expressions, evaluated at most once per decision, used as `vars.<name>`."
    )
    rules: list[Rule] = Field(default_factory=list, description="Ordered rules; the first match wins.")
    ceilings: Ceilings = Field(default_factory=Ceilings, description="Per-request cost ceiling.")
    budgets: list[Budget] = Field(default_factory=list, description="Spend limits per calendar window and scope key.")
    stickiness: Stickiness | None = Field(default=None, description="Keep a conversation's speed to protect its prompt cache.")
    tests: list[TestCase] = Field(default_factory=list, description="Embedded test cases, run by `policy-engine test`.")

    def expressions(self) -> list[str]:
        """Every CEL expression of the policy: its variables, each rule's `when` and `reason.expr`, the budgets'
        keys and the stickiness key."""
        found = list(self.variables.values())
        for rule in self.rules:
            found.append(rule.when)
            if isinstance(rule.reason, ExprText):
                found.append(rule.reason.expr)
        found.extend(b.key for b in self.budgets if b.key)
        if self.stickiness is not None and self.stickiness.key:
            found.append(self.stickiness.key)
        return found
