"""Stage 4, decide: one request's features -> fast or standard, why, and at what worst-case cost.

Order of a decision, and why:
1. features: what the request, the caller and the shared state say;
2. stickiness, then the rules (first match wins), then the policy default;
3. guardrails, which no rule overrides: the API would refuse fast, or we could not price it;
4. the per-request ceiling, then the budgets, reserved atomically in the ledger.
`Engine.settle` closes the loop with the response's usage, priced at the speed it reports.
"""

from __future__ import annotations

import asyncio
import functools
import json
import operator
import os
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, NamedTuple, SupportsIndex

from . import telemetry
from .apply import apply_headers, apply_params
from .catalog import (
    FAST_MODE_BETA,
    PLATFORMS,
    Catalog,
    ModelEntry,
    RateCard,
    IterationCounts,
    UsageCounts,
    cost_of_counts,
    cost_with_rates,
    estimate,
    estimate_with_rates,
    fallback_credit_status,
    load_catalog,
    parse_iterations,
    parse_usage,
)
from . import cel
from .cel import CelError
from .compile import CompiledBudget, CompiledPolicy, LazyVars, compile_file
from .errors import CeilingExceeded, InvalidContext, InvalidRequest, PolicyEngineError, PolicyError, PricingError
from .errors import StateUnavailable
from ._fork import ProcessIds
from ._mypyc import mypyc_attr
from ._threads import run_in_thread
from .features import FEATURE_DOCS, context_features, request_features, valid_context
from .ledger import AsyncLedger, Balance, Charge, Ledger, MemoryLedger, ReserveResult, Scope, window_bounds
from .observe import DEFAULT_STANDARD_OTPS, ThroughputObserver
from .policy import Policy, PriceAs, Rate
from .ratelimit import RateLimitStore
from .tokens import InvalidRequestParams, TokenCounter, estimate_bounds

if TYPE_CHECKING:  # the decision log's record reads this module's StepCost: imported for types only
    from .decisionlog import DecisionLog

__all__ = ["Engine", "Decision", "Settlement", "StepCost", "ConversationStore", "RuleEvaluationError", "load", "FAST_BETA"]

FAST_BETA: Final = FAST_MODE_BETA
"""The beta header fast mode launched with; the catalog says which models still need it."""
_INF: Final = float("inf")
_NO_BUDGET: Final = {"remaining_usd": _INF, "spent_usd": 0.0, "limit_usd": _INF, "fraction_left": 1.0}
_UNKNOWN_KEY: Final = "<key-error>"
_ALL_FEATURES: Final = frozenset(FEATURE_DOCS)
# Not a lambda in _decide: compiled, a lambda there makes every call build a closure environment.
_FRACTION_LEFT: Final = operator.itemgetter("fraction_left")
_MAX_FALLBACK_HOPS: Final = 3
"""The longest server-side `fallbacks` list the API takes (the refusals-and-fallback page: up to three entries)."""
CONVERSATION_MEMORY_S: Final = 3600.0
"""How long `conversation.*` remembers a conversation when the policy sets no stickiness (the longest prompt-cache TTL)."""
_reservation_ids: Final = ProcessIds()
"""Reservation ids: one next() per decision; a forked child gets a prefix of its own (see `_fork`)."""


@dataclass(slots=True, init=False)
class Decision:
    """What `decide()` answered. Serializable (`to_dict`, `to_json`) for logs."""

    speed: str
    rule: str
    outcome: str
    """`allowed`: the rule's speed stands; `downgraded`: a guardrail or ceiling forced standard; `rejected`."""
    reasons: list[str]
    guardrails: list[str]
    ceilings: list[str]
    model: str
    max_tokens: int
    input_tokens: int
    input_tokens_exact: bool
    estimate_standard_micro: int | None
    estimate_fast_micro: int | None
    policy_name: str
    policy_version: str
    reservation_id: str | None
    errors: list[str]
    forced_by: str | None
    """The guardrail or ceiling that changed the speed (or rejected), for metrics."""
    sticky_switch: dict[str, Any] | None
    fast_beta: str | None
    """The `anthropic-beta` value fast requests to this model carry; None: fast mode needs no beta."""
    at: float
    platform: str
    """Where the request goes: `claude_api`, `claude_platform_aws`, `bedrock`, `vertex` or `foundry`."""
    fast_model: str | None
    """Where fast mode is a separate model id (Microsoft Foundry): the id fast requests are sent to, without `speed`."""
    incomplete: str | None
    """Set when the response ended without its final usage (a stream cut short, a timed-out attempt): the
    `on_incomplete_stream` rule it was settled by, `worst_case` or `observed`."""
    fallback_rewrites: list[dict[str, Any]]
    """The request's `fallbacks` entries sent at standard instead of fast: {"index", "model", "guardrail", "reason"}
    each (a guardrail forbids fast on that entry, or the request itself goes at standard)."""
    _budget_charges: tuple[tuple[CompiledBudget, Scope], ...] = field(init=False)
    _plan: _ModelPlan | None = field(init=False)
    """The model plan the decision priced with: settle prices the response with the same cards."""
    _settled: bool = field(init=False)
    _rejection: tuple[str, int, int, int] | None = field(init=False)
    """(ceiling, limit, spent plus reserved, estimate) in micro-dollars, when rejected."""
    _span_context: Any = field(init=False)
    """The decide span's context when a tracer recorded it: the settle span links to it."""
    _held: bool = field(init=False)
    """The ledger holds a reservation under `reservation_id` (False when every charge was zero)."""
    _pending: tuple[Any, ...] | None = field(init=False)
    """With an `AsyncLedger`: what `adecide` still has to await (the budgets to reserve, the conversation to remember)."""
    _chain: tuple[_Hop, ...] | None = field(init=False)
    """The request's `fallbacks` entries as planned (None: no `fallbacks` list)."""
    _wire_fallbacks: list[Any] | None = field(init=False)
    """The `fallbacks` list to send in place of the caller's (some entries rewritten to standard); None: send it as it is."""
    _fast_models: frozenset[str] = field(init=False)
    """The models of the hops sent fast (or inheriting fast): settlement prices their iterations at fast rates."""
    _inputs: tuple[Mapping[str, Any], Mapping[str, Any], str, Any] | None = field(init=False)
    """(request features, context features, account, the request's `fallbacks`) as decided: what a decision-log
    record replays from. References only: the record is built off the request path."""
    _observed: Any = field(init=False)
    """What an integration saw on the wire (`decisionlog.Observed`), for the decision log; None from direct callers."""
    _logged: bool = field(init=False)

    # Written out rather than generated by @dataclass: the generated __init__ is interpreted code,
    # which a compiled build would call for every decision; this one is compiled with the class.
    # The defaults live here only; the private fields are init=False, so dataclasses.replace
    # copies just the public ones.
    def __init__(self, speed: str, rule: str, outcome: str, reasons: list[str], guardrails: list[str], ceilings: list[str],
                 model: str, max_tokens: int, input_tokens: int, input_tokens_exact: bool,
                 estimate_standard_micro: int | None, estimate_fast_micro: int | None, policy_name: str,
                 policy_version: str, reservation_id: str | None = None, errors: list[str] | None = None,
                 forced_by: str | None = None, sticky_switch: dict[str, Any] | None = None,
                 fast_beta: str | None = FAST_BETA, at: float = 0.0, platform: str = "claude_api",
                 fast_model: str | None = None, incomplete: str | None = None,
                 fallback_rewrites: list[dict[str, Any]] | None = None) -> None:
        self.speed = speed
        self.rule = rule
        self.outcome = outcome
        self.reasons = reasons
        self.guardrails = guardrails
        self.ceilings = ceilings
        self.model = model
        self.max_tokens = max_tokens
        self.input_tokens = input_tokens
        self.input_tokens_exact = input_tokens_exact
        self.estimate_standard_micro = estimate_standard_micro
        self.estimate_fast_micro = estimate_fast_micro
        self.policy_name = policy_name
        self.policy_version = policy_version
        self.reservation_id = reservation_id
        self.errors = [] if errors is None else errors
        self.forced_by = forced_by
        self.sticky_switch = sticky_switch
        self.fast_beta = fast_beta
        self.at = at
        self.platform = platform
        self.fast_model = fast_model
        self.incomplete = incomplete
        self.fallback_rewrites = [] if fallback_rewrites is None else fallback_rewrites
        self._budget_charges = ()
        self._plan = None
        self._settled = False
        self._rejection = None
        self._span_context = None
        self._held = False
        self._pending = None
        self._chain = None
        self._wire_fallbacks = None
        self._fast_models = frozenset()
        self._inputs = None
        self._observed = None
        self._logged = False

    @property
    def estimate_micro(self) -> int | None:
        """The worst-case cost reserved for the chosen speed."""
        return self.estimate_fast_micro if self.speed == "fast" else self.estimate_standard_micro

    def apply(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """New Messages API params: fast adds `speed` and the beta (or, on Foundry, names the fast model);
        standard removes `speed` (and names the standard model); `fallbacks` entries a guardrail keeps
        from fast are sent with `speed: "standard"` (`fallback_rewrites`)."""
        applied = apply_params(params, self.speed, self.fast_beta, self._wire_models())
        if self._wire_fallbacks is not None and "fallbacks" in applied:
            applied["fallbacks"] = self._wire_fallbacks
        return applied

    def _sent_standard(self) -> None:
        """A fast request went out at standard after all (a fast 429 fell back): none of its hops ran fast."""
        self._fast_models = frozenset()
        if self._chain is None:
            self._chain = ()

    def _wire_models(self) -> tuple[str, str] | None:
        """(standard id, fast id) where the platform asks for fast mode by model id, else None."""
        mp = self._plan
        if self.fast_model is None or mp is None or mp.entry is None:
            return None
        return (mp.entry.wire_id, self.fast_model)

    def apply_headers(self, headers: Mapping[str, str]) -> dict[str, str]:
        """The same for raw HTTP: merges the beta into `anthropic-beta` (the body's `speed` is `apply`'s job)."""
        return apply_headers(headers, self.speed, self.fast_beta)

    def to_dict(self) -> dict[str, Any]:
        """The public fields, as JSON-ready values (lists copied, so the dict is the caller's)."""
        data: dict[str, Any] = {}
        for name in _PUBLIC_FIELDS:
            value = getattr(self, name)
            data[name] = list(value) if type(value) is list else dict(value) if type(value) is dict else value
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, default=str)


class RuleEvaluationError(PolicyEngineError):
    """A rule failed to evaluate under a policy whose `on_error` is `raise`.

    `decision` is the (rejected, unreserved) decision, with the error in its `errors`;
    the CEL error is the `__cause__`.
    """

    def __init__(self, policy: str, rule: str, decision: Decision, cause: Exception) -> None:
        self.policy, self.rule, self.decision = policy, rule, decision
        super().__init__(f"policy {policy}: rule {rule} failed to evaluate: {cause}")


_PUBLIC_FIELDS: Final = tuple(f.name for f in fields(Decision) if not f.name.startswith("_"))


class StepCost(NamedTuple):
    """One billed step of a response (a `usage.iterations` entry), priced at its own model and speed."""

    kind: str
    """`message`, `compaction`, `advisor_message` or `fallback_message`."""
    model: str
    speed: str
    """The speed it was priced at (see `Settlement.speed_split_unknown`)."""
    cost_micro: int
    input_tokens: int
    output_tokens: int
    cache_write_tokens: int
    cache_read_tokens: int
    priced: bool = True
    """False: the catalog has no price for this model, and the step is counted at $0."""


class Settlement(NamedTuple):
    """What `settle()` recorded: the actual cost of a response, at the speed it ran.

    The token counts are the response's top-level usage. When the response has
    `usage.iterations`, `cost_micro` is the sum of `steps`, each priced at its own model."""

    cost_micro: int
    speed: str
    input_tokens: int
    output_tokens: int
    first: bool
    """False when this decision had been settled already (nothing was recorded twice)."""
    cache_write_tokens: int = 0
    cache_read_tokens: int = 0
    steps: tuple[StepCost, ...] = ()
    """The billed steps (`usage.iterations`), each with its cost; empty when the response has no iterations."""
    speed_split_unknown: bool = False
    """Steps were priced at fast rates on the conservative assumption that they ran fast: the API reports
    one speed for the whole response, not which of its steps ran fast."""
    fallback_credit: str | None = None
    """`usage.fallback_credit.status.type` (`redeemed`, `not_applied`) when the request carried a credit token."""


@mypyc_attr(allow_interpreted_subclasses=True)
class ConversationStore:
    """Last speed per conversation, for stickiness. In-process; entries expire with the policy's TTL."""

    def __init__(self, max_entries: int = 100_000) -> None:
        self._entries: dict[str, tuple[str, int, float]] = {}
        self._lock = threading.Lock()
        self._max = max_entries

    def get(self, key: str, now: float, ttl_s: float) -> tuple[str, int, float] | None:
        entry = self._entries.get(key)
        if entry is None or now - entry[2] > ttl_s:
            return None
        return entry

    def put(self, key: str, speed: str, prefix_tokens: int, now: float) -> None:
        with self._lock:
            if len(self._entries) >= self._max and key not in self._entries:
                self._evict_oldest()
            self._entries[key] = (speed, prefix_tokens, now)

    def _evict_oldest(self) -> None:
        # Drop the oldest tenth: cheaper than an LRU on every request, and stale entries go first.
        # (Its own method: compiled, the lambda would make every put() build a closure environment.)
        entries = self._entries
        for old in sorted(entries, key=lambda k: entries[k][2])[: self._max // 10 or 1]:
            del entries[old]


@dataclass(frozen=True, slots=True)
class _ModelPlan:
    """What a decision needs to know about one model name at one inference geo, looked up once."""

    entry: ModelEntry | None
    geo: str | None
    std_rates: tuple[tuple[int, RateCard], ...] | None
    """The catalog's standard cards for the geo (`ModelEntry.rate_table`); None: no standard price."""
    fast_rates: tuple[tuple[int, RateCard], ...] | None
    """The fast cards; None: fast is unsupported or unpriced."""
    fast_beta: str | None
    throughput: tuple[float, float, float | None]
    """(standard otps, ttft s, fast otps or None): the catalog's figures, with defaults."""
    platform: str
    fast_from: float
    fast_until: float
    """Fast mode works from `fast_from` until before `fast_until` (POSIX s); an empty window when unsupported."""
    fast_model: str | None
    """The separate fast model id, on platforms that ask for fast mode by id."""
    features: dict[str, Any]
    """The `model` features that do not depend on the time."""
    throughput_features: dict[int, dict[str, float]] = field(default_factory=dict)
    """`throughput` features by max_tokens: they depend on nothing else (rules only read them)."""
    priced_by: str | None = None
    """Set where the catalog has no standard price and `on_unpriced_model` priced the model: how."""


@dataclass(frozen=True, slots=True)
class _Hop:
    """One entry of a request's `fallbacks` chain, as the decision planned it."""

    index: int
    entry: Mapping[str, Any]
    """The caller's entry."""
    model: str
    plan: _ModelPlan
    max_tokens: int
    wants: str
    """`fast` (the entry says so), `inherit` (no `speed`: fast where the request is fast) or `standard`."""
    blocked: tuple[str, str] | None
    """The first guardrail that forbids fast on this entry (name, why); None: fast is allowed."""


@dataclass(frozen=True, slots=True)
class _Plan:
    """A compiled policy plus what the hot path can know about it in advance."""

    compiled: CompiledPolicy
    variables: dict[str, Any]
    reads: frozenset[str]
    """Top-level feature names some expression of the policy reads: the others are not computed."""
    budget_keys: tuple[tuple[CompiledBudget, Any], ...]
    """Each budget with its key when the key expression is a constant."""
    static_keys: bool
    """Every budget key is a constant: the scopes change only when a calendar period does."""
    sticky_ttl_s: float | None
    sticky_from_context: bool
    """The stickiness key is `context.conversation_id` itself: read it without evaluating CEL."""


def _plan(compiled: CompiledPolicy) -> _Plan:
    programs = [p for _, p in compiled.variables]
    for rule in compiled.rules:
        programs.append(rule.when)
        if rule.reason_expr is not None:
            programs.append(rule.reason_expr)
    programs.extend(b.key for b in compiled.budgets)
    if compiled.stickiness_key is not None:
        programs.append(compiled.stickiness_key)
    # Stand-ins for programs (the test runner's probes, a benchmark's interpreter) see every
    # feature and every key evaluation, as they would without these shortcuts.
    instrumented = any(type(p) is not cel.Program for p in programs)
    reads = _ALL_FEATURES if instrumented else frozenset(ref.split(".", 1)[0] for p in programs for ref in p.references)
    budget_keys: list[tuple[CompiledBudget, Any]] = []
    for budget in compiled.budgets:
        constant = None
        if not instrumented and not budget.key.references:
            try:
                constant = budget.key.evaluate({})
            except CelError:
                constant = None
        budget_keys.append((budget, constant))
    sticky = compiled.stickiness_key
    policy = compiled.policy
    return _Plan(
        compiled=compiled,
        variables=dict(compiled.variables),
        reads=reads,
        budget_keys=tuple(budget_keys),
        static_keys=all(key is not None for _, key in budget_keys),
        sticky_ttl_s=policy.stickiness.ttl_s if policy.stickiness is not None else None,
        sticky_from_context=sticky is None or (not instrumented and sticky.source.strip() == "context.conversation_id"),
    )


class Engine:
    """Compiled policies plus the state they decide with. Immutable after load and thread-safe.

    `counter` (a `tokens.TokenCounter`) counts input tokens exactly through the
    count_tokens endpoint (`decide` calls `count`, `adecide` awaits `acount`); without
    one, or when counting fails, input tokens are estimated from the request content.
    """

    def __init__(
        self,
        policies: Sequence[CompiledPolicy],
        catalog: Catalog | None = None,
        *,
        ledger: Ledger | AsyncLedger | None = None,
        ratelimits: RateLimitStore | None = None,
        conversations: ConversationStore | None = None,
        reservation_ttl_s: float = 600.0,
        priority_tier: bool = False,
        clock: Any = time.time,
        throughput: ThroughputObserver | None = None,
        ledger_path: str | os.PathLike[str] | None = None,
        counter: TokenCounter | None = None,
        platform: str = "claude_api",
        decision_log: DecisionLog | None = None,
    ) -> None:
        if not policies:
            raise ValueError("an Engine needs at least one policy")
        if platform not in PLATFORMS:
            raise ValueError(f"unknown platform {platform!r}; expected one of {', '.join(PLATFORMS)}")
        self.platform = platform
        """Where requests go unless `decide(platform=...)` says otherwise: prices and fast mode are that platform's."""
        self._policies = {p.name: p for p in policies}
        if len(self._policies) != len(policies):
            raise ValueError("two policy files have the same name")
        self._default = policies[0]
        self._plans = {p.name: _plan(p) for p in policies}
        self._default_plan = self._plans[self._default.name]
        self.catalog = catalog or load_catalog()
        if ledger is None and ledger_path is not None:
            from .ledger.sqlite import SqliteLedger  # the embedded persistent default

            ledger = SqliteLedger(ledger_path)
        self.ledger: Ledger | AsyncLedger = ledger or MemoryLedger()
        self._async_ledger = isinstance(self.ledger, AsyncLedger)
        """An asyncio ledger: decisions go through adecide/asettle/arelease, which await it."""
        self.throughput = throughput
        """Observed output speeds (`policy_engine.observe`); None: the catalog's figures."""
        self.ratelimits = ratelimits or RateLimitStore()
        self.conversations = conversations or ConversationStore()
        self.reservation_ttl_s = reservation_ttl_s
        self.priority_tier = priority_tier
        self.counter = counter
        self.decision_log = decision_log
        """Where a record of each request that ended goes (`policy_engine.decisionlog.DecisionLog`); None: nowhere."""
        if decision_log is not None:
            decision_log.bind(self.ledger)
        self._clock = clock
        # Caches of derived, immutable facts (the catalog and policies never change under an
        # Engine). Plain dicts: a race only computes the same value twice.
        self._models: dict[tuple[str, str, str], _ModelPlan] = {}
        self._windows: dict[tuple[str, str], tuple[float, float, str]] = {}
        self._scopes: dict[tuple[str, str, str], Scope] = {}
        self._static_scopes: dict[str, tuple[float, float, tuple[tuple[CompiledBudget, Scope], ...]]] = {}
        self._unpriced: dict[tuple[str, str, str, str], tuple[_ModelPlan, str]] = {}
        self._dearest: dict[tuple[str, str], tuple[tuple[int, RateCard], ...]] = {}
        for compiled in policies:
            choice = compiled.policy.on_unpriced_model
            if isinstance(choice, PriceAs) and self.catalog.find(choice.price_as) is None:
                raise ValueError(f"policy {compiled.name}: on_unpriced_model price_as {choice.price_as!r} is not in the catalog")

    @property
    def policies(self) -> dict[str, CompiledPolicy]:
        return dict(self._policies)

    def policy(self, name: str | None = None) -> CompiledPolicy:
        if name is None:
            return self._default
        return self._plan_of(name).compiled

    def _plan_of(self, name: str | None) -> _Plan:
        if name is None:
            return self._default_plan
        try:
            return self._plans[name]
        except KeyError:
            raise KeyError(f"no policy named {name!r}; loaded: {', '.join(self._policies)}") from None

    # -- decide ---------------------------------------------------------------------------

    def decide(
        self,
        params: Mapping[str, Any],
        context: Mapping[str, Any] | None = None,
        *,
        now: datetime | None = None,
        account: str = "default",
        batch: bool = False,
        input_tokens: SupportsIndex | None = None,
        policy: str | None = None,
        platform: str | None = None,
    ) -> Decision:
        """Decide the speed of one Messages API request and reserve its worst-case cost.

        `input_tokens` is an exact count when the caller has one (else the Engine's counter
        counts it, or it is estimated); `batch` says the request goes through the Message
        Batches API; `account` keys the fast rate-limit state; `platform` is where the request
        goes (default: the Engine's). Raises `CeilingExceeded` when a ceiling rejects the
        request, `InvalidRequest` for malformed params or context or an unknown platform,
        `RuleEvaluationError` when a rule fails under `on_error: raise`.
        """
        if self._async_ledger:
            raise _needs_await("decide")
        started = time.perf_counter_ns()
        upper, exact = self._input_tokens(params, input_tokens)
        return self._finish(params, context, now, account, batch, upper, exact, policy, started, platform=platform)

    def _input_tokens(self, params: Mapping[str, Any], input_tokens: SupportsIndex | None) -> tuple[int, bool]:
        """(upper bound, exact) of the request's input tokens: the caller's count, the counter's, or the estimate."""
        try:
            if input_tokens is not None:
                return _counted(input_tokens), True
            if self.counter is None:
                return estimate_bounds(params)[1], False
            counted = self.counter.count(params)
            return counted.upper, counted.exact
        except InvalidRequestParams as exc:
            raise InvalidRequest(str(exc)) from None

    def _decide_scanned(self, params: Mapping[str, Any], scanned: Mapping[str, object], context: Mapping[str, Any] | None,
                        now: datetime | None, account: str, batch: bool, input_tokens: int | None) -> Decision:
        """`decide` for params whose `request_features(params, 0, False)` the caller already holds.

        For the replay (simulate), whose parsed requests recur as the very same objects and are
        never changed: the same decision, without scanning every message again. Callers whose
        params may change between calls use `decide`.
        """
        if self._async_ledger:
            raise _needs_await("decide")
        started = time.perf_counter_ns()
        upper, exact = self._input_tokens(params, input_tokens)
        return self._finish(params, context, now, account, batch, upper, exact, None, started, scanned)

    async def adecide(
        self,
        params: Mapping[str, Any],
        context: Mapping[str, Any] | None = None,
        *,
        now: datetime | None = None,
        account: str = "default",
        batch: bool = False,
        input_tokens: SupportsIndex | None = None,
        policy: str | None = None,
        platform: str | None = None,
    ) -> Decision:
        """`decide` for async callers: the counter (if any) is awaited, never blocking the loop.

        With the in-memory ledger deciding does no I/O; with an `AsyncLedger` (such as
        `AsyncRedisLedger`) its calls are awaited on the caller's loop; with another shared
        ledger the decision runs in a worker thread so the event loop keeps going.
        """
        started = time.perf_counter_ns()
        if input_tokens is not None or self.counter is None:
            upper, exact = self._input_tokens(params, input_tokens)
        else:
            try:
                counted = await self.counter.acount(params)
            except InvalidRequestParams as exc:
                raise InvalidRequest(str(exc)) from None
            upper, exact = counted.upper, counted.exact
        if self._async_ledger:
            return await self._afinish(params, context, now, account, batch, upper, exact, policy, started, platform)
        if isinstance(self.ledger, MemoryLedger):
            return self._finish(params, context, now, account, batch, upper, exact, policy, started, platform=platform)
        return await asyncio.to_thread(self._finish, params, context, now, account, batch, upper, exact, policy, started,
                                       None, platform)

    def _finish(self, params: Mapping[str, Any], context: Mapping[str, Any] | None, now: datetime | None, account: str,
                batch: bool, input_tokens: int, exact: bool, policy: str | None, started: int,
                scanned: Mapping[str, object] | None = None, platform: str | None = None) -> Decision:
        try:
            decision = self._decide(params, context, now, account, batch, input_tokens, exact, self._plan_of(policy),
                                    scanned=scanned, platform=platform)
        except RuleEvaluationError as exc:
            telemetry.record_decision(exc.decision, started, time.perf_counter_ns(), exc)
            if self.decision_log is not None:
                self._log_end("rejected", exc.decision)
            raise
        if self.decision_log is not None and decision.outcome == "rejected":
            self._log_end("rejected", decision)
        return _concluded(decision, started)

    async def _afinish(self, params: Mapping[str, Any], context: Mapping[str, Any] | None, now: datetime | None,
                       account: str, batch: bool, input_tokens: int, exact: bool, policy: str | None,
                       started: int, platform: str | None = None) -> Decision:
        """`_finish` over an `AsyncLedger`: the same decision, its ledger calls awaited.

        `_decide` stops where it would call the ledger: for balances (only when an
        expression reads them) it raises `_NeedBalances` before any side effect, and is
        run again with the answer; for the reservation it leaves `decision._pending`.
        """
        plan = self._plan_of(policy)
        if now is None:
            now = datetime.fromtimestamp(self._clock(), timezone.utc)  # one instant for every pass
        prefetched: dict[str, Balance] | StateUnavailable | None = None
        try:
            while True:
                try:
                    decision = self._decide(params, context, now, account, batch, input_tokens, exact, plan, prefetched,
                                            platform=platform)
                    break
                except _NeedBalances as need:
                    if prefetched is not None:
                        # `now` is fixed, so the scopes are too: a second ask means an answer was missing.
                        prefetched = StateUnavailable(f"{type(self.ledger).__name__}.balances did not answer for every scope")
                        continue
                    try:
                        answer = await self.ledger.balances(need.scopes)  # type: ignore[misc]
                        prefetched = {s.id: b for s, b in zip(need.scopes, answer)}
                    except StateUnavailable as exc:
                        prefetched = exc
            if decision._pending is not None:
                scopes, sticky_key, sticky, sticky_ttl_s = decision._pending
                decision._pending = None
                await self._areserve(decision, scopes)
                self._remember(decision, sticky_key, sticky, sticky_ttl_s)
        except RuleEvaluationError as exc:
            telemetry.record_decision(exc.decision, started, time.perf_counter_ns(), exc)
            if self.decision_log is not None:
                self._log_end("rejected", exc.decision)
            raise
        if self.decision_log is not None and decision.outcome == "rejected":
            self._log_end("rejected", decision)
        return _concluded(decision, started)

    def _replan(self, decision: Decision, platform: str) -> None:
        """Price `decision`'s settlement on `platform` (its request turned out to go there): the model plan of the
        same model and geo on that platform. The reservation stays as it was; settlement records the cost."""
        mp = decision._plan
        geo = "global" if mp is None or mp.geo is None else mp.geo
        decision._plan = self._models.get((decision.model, geo, platform)) or self._model_plan(decision.model, geo, platform)
        decision.platform = platform

    def _model_plan(self, name: str, geo: str, platform: str) -> _ModelPlan:
        key = (name, geo, platform)
        found = self._models.get(key)
        if found is not None:
            return found
        if platform not in PLATFORMS:
            raise InvalidRequest(f"unknown platform {platform!r}; expected one of {', '.join(PLATFORMS)}")
        entry = self.catalog.find(name, platform=platform)
        geo_key = None if geo == "global" else geo
        std_rates = fast_rates = None
        beta: str | None = None
        std_otps, ttft, fast_otps = DEFAULT_STANDARD_OTPS, 0.0, None
        fast_from, fast_until = _INF, _INF
        fast_model = None
        if entry is not None:
            std_rates = _rate_table(entry, "standard", geo_key)
            fast_rates = _rate_table(entry, "fast", geo_key) if entry.fast.supported else None
            beta = entry.fast.beta_header
            if entry.fast.supported:
                fast_from, fast_until = entry.fast.window()
                fast_model = entry.fast_model_id
            figures = entry.throughput
            if figures is not None:
                std_otps = figures.standard_otps or DEFAULT_STANDARD_OTPS
                ttft = figures.ttft_s or 0.0
                fast_otps = (figures.fast_otps or None) if entry.fast.supported else None
        found = _ModelPlan(entry, geo_key, std_rates, fast_rates, beta, (std_otps, ttft, fast_otps), platform,
                           fast_from, fast_until, fast_model, _model_features(entry, name, std_rates, fast_rates))
        if len(self._models) > 4096:
            self._models.clear()  # model names come from callers: keep the cache bounded
        self._models[key] = found
        return found

    def _decide(
        self,
        params: Mapping[str, Any],
        context: Mapping[str, Any] | None,
        now: datetime | None,
        account: str,
        batch: bool,
        input_tokens: int,
        exact: bool,
        plan: _Plan,
        prefetched: dict[str, Balance] | StateUnavailable | None = None,
        scanned: Mapping[str, object] | None = None,
        platform: str | None = None,
    ) -> Decision:
        compiled = plan.compiled
        policy = compiled.policy
        reads = plan.reads
        epoch = self._clock() if now is None else now.timestamp()
        if platform is None:
            platform = self.platform
        if scanned is None:
            request = request_features(params, input_tokens, exact, batch=batch, platform=platform)
        else:  # what request_features found in these params before, with this call's own counts
            request = {**scanned, "input_tokens": input_tokens, "input_tokens_exact": exact, "batch": batch,
                       "platform": platform}
        invalid: str | None = None
        try:
            ctx = context_features(context)
        except InvalidContext as exc:
            if policy.on_invalid_context == "reject":
                raise
            # Sent, so billed: decided with what of the context is valid, at standard, and metered.
            ctx, invalid = valid_context(context), exc.redacted
            telemetry.record_event("policy_engine.invalid_context", {
                "policy_engine.policy.name": policy.name, "policy_engine.on_invalid_context": policy.on_invalid_context,
                "policy_engine.error": invalid[:200], "policy_engine.error.type": type(exc).__name__})
        model_name: str = request["model"]  # type: ignore[assignment]
        max_tokens: int = request["max_tokens"]  # type: ignore[assignment]
        geo: str = request["inference_geo"]  # type: ignore[assignment]
        mp = self._models.get((model_name, geo, platform)) or self._model_plan(model_name, geo, platform)
        unpriced: str | None = None
        if mp.std_rates is None:
            mp, unpriced = self._unpriced_plan(policy, mp, model_name, geo, platform)
        model = mp.entry
        cache_control: bool = request["cache_control"]  # type: ignore[assignment]
        std_micro = fast_micro = None
        if mp.std_rates is not None:
            std_micro = estimate_with_rates(mp.std_rates, input_tokens, max_tokens, cache_control)
        if mp.fast_rates is not None:
            fast_micro = estimate_with_rates(mp.fast_rates, input_tokens, max_tokens, cache_control)

        activation: dict[str, Any] = {"request": request, "context": ctx}
        if "model" in reads:
            activation["model"] = _timed_model_features(mp, epoch)
        if "cost" in reads:
            activation["cost"] = _cost_features(std_micro, fast_micro)
        if "throughput" in reads:
            if self.throughput is None:
                cached = mp.throughput_features.get(max_tokens)
                if cached is None:
                    if len(mp.throughput_features) >= 1024:
                        mp.throughput_features.clear()  # max_tokens come from callers: keep the cache bounded
                    cached = mp.throughput_features[max_tokens] = _throughput(mp.throughput, max_tokens)
                activation["throughput"] = cached
            else:
                activation["throughput"] = self.throughput.features(model, max_tokens, model_name)
        if "ratelimit" in reads:
            activation["ratelimit"] = self.ratelimits.snapshot(account, epoch)
        if "now" in reads:
            activation["now"] = now if now is not None else datetime.fromtimestamp(epoch, timezone.utc)
        activation["vars"] = LazyVars(plan.variables, activation)

        errors: list[str] = []
        scopes: tuple[tuple[CompiledBudget, Scope], ...] = ()
        if plan.budget_keys:
            static = self._static_scopes.get(plan.compiled.name) if plan.static_keys else None
            if static is not None and static[0] <= epoch < static[1]:
                scopes = static[2]  # constant keys, same calendar periods: the very same scopes
            else:
                scopes = self._budget_scopes(plan, activation, epoch, now, errors)
        unavailable: StateUnavailable | None = None
        balances: Sequence[Balance]
        if scopes and ("budget" in reads or "budgets" in reads):
            # Balances only when an expression reads them: the reservation checks the limits anyway.
            try:
                if not self._async_ledger:
                    balances = self.ledger.balances([s for _, s in scopes])  # type: ignore[assignment]
                elif isinstance(prefetched, StateUnavailable):
                    raise prefetched
                elif prefetched is None or any(s.id not in prefetched for _, s in scopes):
                    raise _NeedBalances([s for _, s in scopes])  # adecide awaits them and decides again
                else:
                    balances = [prefetched[s.id] for _, s in scopes]
            except StateUnavailable as exc:
                # Rules still run (on empty balances); the outage then forces the speed below.
                unavailable = exc
                balances = [Balance(0, 0, s.limit) for _, s in scopes]
            budget_features = {b.spec.name: _budget_features(bal) for (b, _), bal in zip(scopes, balances)}
            activation["budgets"] = budget_features
            activation["budget"] = min(budget_features.values(), key=_FRACTION_LEFT)
        elif "budget" in reads or "budgets" in reads:
            activation["budgets"] = {}
            activation["budget"] = _NO_BUDGET

        # Stickiness: a conversation keeps its speed while its entry is fresh.
        if plan.sticky_from_context:
            # Without stickiness, conversations are still remembered, so rules can read `conversation.*`.
            conversation_id = ctx.get("conversation_id")
            sticky_key = f"{compiled.name}\x1f{conversation_id}" if conversation_id else None
        else:
            sticky_key = self._sticky_key(plan, activation)
        sticky = None
        if sticky_key is not None:
            sticky = self.conversations.get(sticky_key, epoch, plan.sticky_ttl_s or CONVERSATION_MEMORY_S)
        if "conversation" in reads:
            activation["conversation"] = ({"last_speed": sticky[0], "cached_prefix_tokens": sticky[1]} if sticky
                                          else {"cached_prefix_tokens": 0})

        speed: str = policy.default
        rule = "default"
        if sticky is not None and plan.sticky_ttl_s is not None:
            speed, rule = sticky[0], "sticky"
            reasons = [f"conversation keeps its {speed} speed (stickiness)"]
        else:
            reasons = []
            for compiled_rule in compiled.rules:
                try:
                    matched = compiled_rule.when.evaluate(activation)
                except CelError as exc:
                    errors.append(f"rule {compiled_rule.name}: {exc}")
                    if policy.on_error == "raise":
                        failed = Decision(
                            "standard", compiled_rule.name, "rejected", [f"rule {compiled_rule.name} failed to evaluate; on_error is raise"],
                            [], [], model_name, max_tokens, input_tokens, exact, std_micro, fast_micro,
                            policy.name, compiled.version, None, errors, "on_error", None, mp.fast_beta, epoch,
                            platform, mp.fast_model)
                        failed._plan = mp
                        failed._inputs = (request, ctx, account, params.get("fallbacks"))
                        raise RuleEvaluationError(policy.name, compiled_rule.name, failed, exc) from exc
                    if policy.on_error == "standard":
                        speed, rule = "standard", compiled_rule.name
                        reasons.append(f"rule {compiled_rule.name} failed to evaluate; on_error forces standard")
                        break
                    continue
                if matched:
                    speed, rule = compiled_rule.speed, compiled_rule.name
                    reasons.append(self._reason(compiled_rule, activation, errors))
                    break
            else:
                reasons.append(f"no rule matched; policy default is {speed}")

        decision = Decision(speed, rule, "allowed", reasons, [], [], model_name, max_tokens, input_tokens, exact,
                            std_micro, fast_micro, policy.name, compiled.version, None, errors, None, None, mp.fast_beta, epoch,
                            platform, mp.fast_model)
        decision._plan = mp
        decision._inputs = (request, ctx, account, params.get("fallbacks"))
        if invalid is not None or unpriced is not None:
            scopes = self._unmetered(decision, policy, scopes, invalid, unpriced)
        if speed == "fast":
            self._guardrails(decision, mp, request, account, input_tokens, epoch)
        fallbacks = params.get("fallbacks")
        if fallbacks is not None:
            self._plan_chain(decision, fallbacks, request, account, input_tokens, epoch, geo, platform, cache_control)
        if compiled.per_request_micro is not None:
            self._per_request_ceiling(decision, compiled)
        if decision.outcome != "rejected":
            if unavailable is not None:
                self._state_unavailable(decision, scopes, next(_reservation_ids), unavailable)
            elif scopes:
                if self._async_ledger:
                    decision._pending = (scopes, sticky_key, sticky, plan.sticky_ttl_s)  # adecide awaits the rest
                    return decision
                self._reserve(decision, scopes)
        if sticky_key is not None:
            self._remember(decision, sticky_key, sticky, plan.sticky_ttl_s)
        return decision

    def _unpriced_plan(self, policy: Policy, mp: _ModelPlan, name: str, geo: str, platform: str) -> tuple[_ModelPlan, str]:
        """The plan of a model the catalog has no standard price for, priced as `on_unpriced_model` says,
        and a description of that price (`reject` and `allow_unmetered` leave it unpriced)."""
        key = (policy.name, name, geo, platform)
        found = self._unpriced.get(key)
        if found is not None:
            return found
        choice = policy.on_unpriced_model
        geo_key = None if geo == "global" else geo
        std: tuple[tuple[int, RateCard], ...] | None = None
        if isinstance(choice, PriceAs):
            entry = self.catalog.find(choice.price_as, platform=platform)
            std = _rate_table(entry, "standard", geo_key) if entry is not None else None
            how = f"priced as {choice.price_as}"
            if std is None:
                std, how = self.dearest_rates("standard", platform), f"{choice.price_as} has no price here; priced at the catalog's dearest rates"
        elif isinstance(choice, Rate):
            std, how = _stated_rates(choice), f"priced at the stated rate (${choice.rate.input_usd_per_mtok}/${choice.rate.output_usd_per_mtok} per MTok)"
        elif choice == "conservative":
            std, how = self.dearest_rates("standard", platform), "priced at the catalog's dearest rates (conservative)"
        else:
            how = str(choice)
        plan = mp if std is None else _ModelPlan(mp.entry, mp.geo, std, mp.fast_rates, mp.fast_beta, mp.throughput,
                                                 mp.platform, mp.fast_from, mp.fast_until, mp.fast_model,
                                                 _model_features(mp.entry, name, std, mp.fast_rates), {}, how)
        if len(self._unpriced) > 4096:
            self._unpriced.clear()  # model names come from callers: keep the cache bounded
        self._unpriced[key] = (plan, how)
        return plan, how

    def dearest_rates(self, speed: str, platform: str) -> tuple[tuple[int, RateCard], ...]:
        """One card of the dearest rate of each kind any catalog model has at `speed` on `platform` (any tier,
        any geo; standard's when no model runs at `speed`): the conservative price of what the catalog cannot price."""
        key = (speed, platform)
        found = self._dearest.get(key)
        if found is not None:
            return found
        cards: list[RateCard] = []
        offers: Any = self.catalog.__pydantic_private__
        entries = {id(e): e for e in offers["_offers"].get(("anthropic", platform), {}).values()}.values()
        for wanted in (speed, "standard"):
            for entry in entries:
                tables: Any = entry.__pydantic_private__
                for (card_speed, _), table in tables["_cards"].items():
                    if card_speed == wanted:
                        cards.extend(card for _, card in table)
            if cards:
                break
        if not cards:
            raise PricingError(f"the catalog prices no model on {platform}: nothing to price conservatively with")
        card = RateCard(max(c.input for c in cards), max(c.output for c in cards), max(c.cache_write_5m for c in cards),
                        max(c.cache_write_1h for c in cards), max(c.cache_read for c in cards), cards[0].speed, 0, None)
        found = self._dearest[key] = ((0, card),)
        return found

    def _unmetered(self, decision: Decision, policy: Policy, scopes: tuple[tuple[CompiledBudget, Scope], ...],
                   invalid: str | None, unpriced: str | None) -> tuple[tuple[CompiledBudget, Scope], ...]:
        """Say in the decision how an invalid context or an unpriced model was handled; the scopes it is metered on."""
        if invalid is not None:
            decision.errors.append(f"invalid context: {invalid}")
            decision.guardrails.append("invalid_context")
            decision.reasons.append(f"guardrail invalid_context: decided at standard with the valid part of the context "
                                    f"(on_invalid_context is {policy.on_invalid_context})")
            if decision.speed == "fast":
                decision.speed, decision.outcome, decision.forced_by = "standard", "downgraded", "invalid_context"
            if policy.on_invalid_context == "allow_unmetered":
                telemetry.record_event("policy_engine.unmetered", {"policy_engine.policy.name": policy.name,
                                                                   "policy_engine.reason": "invalid_context"})
                return ()
        if unpriced is not None:
            choice = policy.on_unpriced_model
            decision.reasons.append(f"model {decision.model} has no price in the catalog: {unpriced} (on_unpriced_model)")
            if choice == "reject":
                decision.outcome, decision.forced_by = "rejected", "unpriced_model"
            elif choice == "allow_unmetered":
                telemetry.record_event("policy_engine.unmetered", {"policy_engine.policy.name": policy.name,
                                                                   "policy_engine.reason": "unpriced_model"})
            else:
                telemetry.record_event("policy_engine.unpriced_model", {"policy_engine.policy.name": policy.name,
                                                                        "policy_engine.price": unpriced})
        return scopes

    def _remember(self, decision: Decision, sticky_key: str | None, sticky: tuple[str, int, float] | None,
                  sticky_ttl_s: float | None) -> None:
        """Record the conversation's speed (what stickiness and `conversation.*` read next time)."""
        if sticky_key is None or decision.outcome == "rejected":
            return
        if sticky is not None and sticky_ttl_s is not None and sticky[0] != decision.speed:
            mp = decision._plan
            decision.sticky_switch = self._switch_cost(mp.entry if mp else None, sticky, decision.speed, mp.geo if mp else None)
        self.conversations.put(sticky_key, decision.speed, decision.input_tokens, decision.at)

    def _window(self, window: str, tz: str, epoch: float, now: datetime | None) -> tuple[float, float, str]:
        """The calendar period containing `epoch`, computed once per period (not once per request)."""
        key = (window, tz)
        cached = self._windows.get(key)
        if cached is not None and cached[0] <= epoch < cached[1]:
            return cached
        when = now if now is not None else datetime.fromtimestamp(epoch, timezone.utc)
        label, start, end = window_bounds(window, tz, when)  # type: ignore[arg-type]
        cached = (start.timestamp(), end.timestamp(), label)
        self._windows[key] = cached
        return cached

    def _budget_scopes(self, plan: _Plan, activation: Mapping[str, Any], epoch: float, now: datetime | None,
                       errors: list[str]) -> tuple[tuple[CompiledBudget, Scope], ...]:
        scopes = []
        valid_from, valid_until = -_INF, _INF
        key: Any
        for budget, key in plan.budget_keys:
            if key is None:
                try:
                    key = budget.key.evaluate(activation)
                except CelError as exc:
                    # The budget still applies, to a shared bucket: an unkeyed request must not escape it.
                    errors.append(f"budget {budget.spec.name} key: {exc}")
                    key = _UNKNOWN_KEY
            spec = budget.spec
            start, end, label = self._window(spec.window, spec.timezone, epoch, now)
            valid_from, valid_until = max(valid_from, start), min(valid_until, end)
            cache_key = (spec.name, key, label)
            scope = self._scopes.get(cache_key)  # type: ignore[arg-type]
            if scope is None:
                scope = Scope(spec.name, key, label, budget.limit_micro, end)  # type: ignore[arg-type]
                if len(self._scopes) > 65_536:
                    self._scopes.clear()  # keys come from requests: keep the cache bounded
                self._scopes[cache_key] = scope  # type: ignore[index]
            scopes.append((budget, scope))
        result = tuple(scopes)
        if plan.static_keys:
            self._static_scopes[plan.compiled.name] = (valid_from, valid_until, result)
        return result

    def _sticky_key(self, plan: _Plan, activation: Mapping[str, Any]) -> str | None:
        try:
            key = plan.compiled.stickiness_key.evaluate(activation)  # type: ignore[union-attr]
        except CelError:
            return None  # no conversation id: nothing to keep sticky
        return f"{plan.compiled.name}\x1f{key}" if key else None

    def _reason(self, rule: Any, activation: Mapping[str, Any], errors: list[str]) -> str:
        if rule.reason_expr is not None:
            try:
                return f"{rule.name}: {rule.reason_expr.evaluate(activation)}"
            except CelError as exc:
                errors.append(f"rule {rule.name} reason: {exc}")
        return f"{rule.name}: {rule.reason_text}" if rule.reason_text else f"rule {rule.name} matched"

    def _guardrails(self, decision: Decision, mp: _ModelPlan, request: Mapping[str, Any], account: str,
                    input_tokens: int, now: float) -> None:
        applied = self._fast_blockers(mp, decision.model, request, account, input_tokens, now)
        if applied:
            decision.speed = "standard"
            decision.outcome = "downgraded"
            decision.forced_by = applied[0][0]
            decision.guardrails.extend(name for name, _ in applied)
            decision.reasons.extend(f"guardrail {name}: {why}" for name, why in applied)

    def _fast_blockers(self, mp: _ModelPlan, name: str, request: Mapping[str, Any], account: str, input_tokens: int,
                       now: float) -> list[tuple[str, str]]:
        """Every guardrail that forbids sending `name` (planned as `mp`) fast: (guardrail, why) each."""
        applied: list[tuple[str, str]] = []
        model = mp.entry
        if model is None:
            applied.append(("unsupported_model", f"{name} is not in the catalog, so fast mode cannot be assumed"))
        elif not model.fast.supported:
            where = "" if mp.platform == "claude_api" else f" on {mp.platform}"
            applied.append(("unsupported_model", f"{name} does not support fast mode{where}"))
        elif not mp.fast_from <= now < mp.fast_until:
            state, why = model.fast.status(now)
            applied.append(("unsupported_model" if state == "not_yet" else "retired", f"{name}: {why}"))
        elif mp.fast_rates is None:
            applied.append(("unpriced", f"the catalog has no fast price for {name}, so its cost cannot be bounded"))
        if request["batch"] and not (model is not None and model.fast.fast_with_batch):
            applied.append(("batch", "fast mode is not available with the Batch API"))
        tier = request["service_tier"]
        if (tier == "priority" or (self.priority_tier and tier == "auto")) and not (model is not None and model.fast.fast_with_priority_tier):
            applied.append(("priority_tier", "fast mode is not available with Priority Tier"))
        if self.ratelimits.exhausted(account, input_tokens, now):
            applied.append(("rate_limited", "the fast-mode rate limit is exhausted"))
        return applied

    def _plan_chain(self, decision: Decision, fallbacks: Any, request: Mapping[str, Any], account: str, input_tokens: int,
                    now: float, geo: str, platform: str, cache_control: bool) -> None:
        """Guard and price a server-side `fallbacks` chain: each entry is a hop the API may run after a refusal.

        The estimates become the chain's worst case: every hop billed in full (a hop declined after some
        output is billed for it, and the next hop may be sent that partial answer as a prefill, so its input
        is bounded by the request's plus every earlier hop's max_tokens). A hop declined before any output
        is not billed, so the worst case never counts less than the bill."""
        if not isinstance(fallbacks, list):
            if fallbacks == "default":
                self._plan_default_chain(decision, input_tokens, platform, cache_control)
            return
        hops = []
        for index, entry in enumerate(fallbacks):
            if not isinstance(entry, Mapping) or not isinstance(entry.get("model"), str):
                continue  # the API refuses the whole request (400), which bills nothing
            name: str = entry["model"]
            hop_max = entry.get("max_tokens")
            if type(hop_max) is not int or hop_max < 1:
                hop_max = decision.max_tokens
            wants = "inherit" if "speed" not in entry else "fast" if entry["speed"] == "fast" else "standard"
            hmp = self._models.get((name, geo, platform)) or self._model_plan(name, geo, platform)
            blocked = None
            if wants != "standard":
                blockers = self._fast_blockers(hmp, name, request, account, input_tokens, now)
                if blockers:
                    blocked = blockers[0]
            hops.append(_Hop(index, entry, name, hmp, hop_max, wants, blocked))
        decision._chain = tuple(hops)
        decision._wire_fallbacks = fallbacks  # `_rewrite_fallbacks` replaces it once the speed is final
        std_total, fast_total = decision.estimate_standard_micro, decision.estimate_fast_micro
        prior = decision.max_tokens
        for hop in hops:
            hop_input = input_tokens + prior
            prior += hop.max_tokens
            std_rates = hop.plan.std_rates
            if std_rates is None:
                # As settlement charges an unpriced step: the catalog's dearest rates, never less.
                decision.reasons.append(f"fallbacks[{hop.index}]: no standard price for {hop.model}; its worst case is "
                                        "priced at the catalog's dearest rates")
                std_rates = self.dearest_rates("standard", platform)
            hop_std = None if std_rates is None else estimate_with_rates(std_rates, hop_input, hop.max_tokens, cache_control)
            fast_rates = hop.plan.fast_rates if hop.wants != "standard" and hop.blocked is None else None
            hop_fast = hop_std if fast_rates is None else estimate_with_rates(fast_rates, hop_input, hop.max_tokens, cache_control)
            std_total = None if std_total is None or hop_std is None else std_total + hop_std
            fast_total = None if fast_total is None or hop_fast is None else fast_total + hop_fast
        decision.estimate_standard_micro, decision.estimate_fast_micro = std_total, fast_total

    def _plan_default_chain(self, decision: Decision, input_tokens: int, platform: str, cache_control: bool) -> None:
        """`fallbacks: "default"`: the API picks the models, so each of the longest chain's hops is reserved at the
        catalog's dearest rates, with the request's max_tokens and the prefill bound of `_plan_chain`."""
        std_rates, fast_rates = self.dearest_rates("standard", platform), self.dearest_rates("fast", platform)
        std_total, fast_total = decision.estimate_standard_micro, decision.estimate_fast_micro
        prior = decision.max_tokens
        for _ in range(_MAX_FALLBACK_HOPS):
            hop_input = input_tokens + prior
            prior += decision.max_tokens
            if std_total is not None:
                std_total += estimate_with_rates(std_rates, hop_input, decision.max_tokens, cache_control)
            if fast_total is not None:
                fast_total += estimate_with_rates(fast_rates, hop_input, decision.max_tokens, cache_control)
        decision.estimate_standard_micro, decision.estimate_fast_micro = std_total, fast_total
        decision.reasons.append(f'fallbacks "default": the API picks the models, so each of up to {_MAX_FALLBACK_HOPS} '
                                "hops is reserved at the catalog's dearest rates")

    def _per_request_ceiling(self, decision: Decision, compiled: CompiledPolicy) -> None:
        limit: int = compiled.per_request_micro  # type: ignore[assignment]
        std, fast = decision.estimate_standard_micro, decision.estimate_fast_micro
        if decision.speed == "fast" and fast is not None and fast > limit:
            if std is not None and std <= limit:
                decision.speed, decision.outcome, decision.forced_by = "standard", "downgraded", "per_request"
                decision.ceilings.append("per_request")
                decision.reasons.append(f"ceiling per_request: fast worst case {_usd(fast)} is over {_usd(limit)}; standard fits")
                return
        if decision.speed == "standard" and std is None:
            decision.ceilings.append("per_request:unpriced")
            decision.reasons.append(f"ceiling per_request not enforced: no standard price for {decision.model}")
            return
        # Past here standard does not fit either (or fast is all we could price): report the cheapest worst case.
        worst = std if std is not None else fast if decision.speed == "fast" else None
        if worst is not None and worst > limit:
            decision.ceilings.append("per_request")
            if compiled.policy.ceilings.on_exceed == "reject":
                decision.outcome, decision.forced_by = "rejected", "per_request"
                decision._rejection = ("per_request", limit, 0, worst)
                decision.reasons.append(f"ceiling per_request: worst case {_usd(worst)} is over {_usd(limit)}")
            else:
                if decision.speed == "fast" and std is not None:
                    # Over the ceiling either way: run it at the cheaper speed.
                    decision.speed, decision.outcome, decision.forced_by = "standard", "downgraded", "per_request"
                decision.reasons.append(f"ceiling per_request: worst case {_usd(worst)} is over {_usd(limit)}; allowed by policy")

    @staticmethod
    def _charges(decision: Decision, scopes: Sequence[tuple[CompiledBudget, Scope]], speed: str) -> tuple[list[Charge], bool]:
        """What to reserve against each scope at `speed`, and whether any of it is not zero."""
        std, fast = decision.estimate_standard_micro or 0, decision.estimate_fast_micro or 0
        charges = []
        some = False
        for budget, scope in scopes:
            counts = budget.spec.counts
            if speed == "fast":
                amount = fast - std if counts == "premium" else fast
            else:
                amount = std if counts == "all" else 0
            if amount > 0:
                some = True
            else:
                amount = 0
            charges.append((scope, amount))
        return charges, some

    def _reserve(self, decision: Decision, scopes: Sequence[tuple[CompiledBudget, Scope]]) -> None:
        rid = next(_reservation_ids)
        charges = self._to_hold(decision, scopes, rid, decision.speed)
        while charges is not None:
            try:
                result = self.ledger.reserve(rid, charges, ttl_s=self.reservation_ttl_s)  # type: ignore[union-attr]
            except StateUnavailable as exc:
                return self._state_unavailable(decision, scopes, rid, exc)
            charges = self._reserved(decision, scopes, rid, charges, result)  # type: ignore[arg-type]

    async def _areserve(self, decision: Decision, scopes: Sequence[tuple[CompiledBudget, Scope]]) -> None:
        """`_reserve` over an `AsyncLedger`."""
        rid = next(_reservation_ids)
        charges = self._to_hold(decision, scopes, rid, decision.speed)
        while charges is not None:
            try:
                result = await self.ledger.reserve(rid, charges, ttl_s=self.reservation_ttl_s)  # type: ignore[misc]
            except StateUnavailable as exc:
                return self._state_unavailable(decision, scopes, rid, exc)
            charges = self._reserved(decision, scopes, rid, charges, result)

    def _to_hold(self, decision: Decision, scopes: Sequence[tuple[CompiledBudget, Scope]], rid: str,
                 speed: str) -> list[Charge] | None:
        """The charges to reserve at `speed`; None when there is nothing to hold (then no ledger call)."""
        charges, some = self._charges(decision, scopes, speed)
        if some:
            return charges
        # A standard request against budgets of fast spend holds nothing; settle() still records
        # whatever the response turns out to cost these budgets.
        decision.reservation_id = rid
        decision._budget_charges = tuple(scopes)
        return None

    def _reserved(self, decision: Decision, scopes: Sequence[tuple[CompiledBudget, Scope]], rid: str,
                  charges: list[Charge], result: ReserveResult) -> list[Charge] | None:
        """Apply the ledger's answer; returns the charges to reserve next (a downgrade to standard) or None."""
        if result.ok:
            decision.reservation_id = rid
            decision._budget_charges = tuple(scopes)
            decision._held = True
            return None
        failed: int = result.failed  # type: ignore[assignment]
        budget, balance = scopes[failed][0], result.balances[failed]
        if decision.speed == "fast":
            decision.ceilings.append(budget.spec.name)
            if budget.spec.on_exceed != "reject":
                decision.speed, decision.outcome, decision.forced_by = "standard", "downgraded", budget.spec.name
                decision.reasons.append(
                    f"budget {budget.spec.name}: fast worst case does not fit ({_usd(balance.remaining)} left of {_usd(balance.limit)}); downgraded")
                return self._to_hold(decision, scopes, rid, "standard")
        elif budget.spec.name not in decision.ceilings:
            decision.ceilings.append(budget.spec.name)
        self._reject(decision, budget, balance, charges[failed][1])
        return None

    def _state_unavailable(self, decision: Decision, scopes: Sequence[tuple[CompiledBudget, Scope]], rid: str,
                           exc: StateUnavailable) -> None:
        """The shared budget state did not answer: `on_state_unavailable` decides, and never fast."""
        policy = self._policies[decision.policy_name].policy
        telemetry.record_event("policy_engine.state_unavailable", {
            "policy_engine.policy.name": decision.policy_name, "policy_engine.on_state_unavailable": policy.on_state_unavailable,
            "policy_engine.error": str(exc)})
        decision.errors.append(f"shared state unavailable: {exc}")
        decision.guardrails.append("state_unavailable")
        if policy.on_state_unavailable == "reject":
            decision.outcome, decision.forced_by = "rejected", "state_unavailable"
            decision.reasons.append("guardrail state_unavailable: budget state could not be reached; on_state_unavailable is reject")
            return
        if decision.speed == "fast":
            decision.speed, decision.outcome, decision.forced_by = "standard", "downgraded", "state_unavailable"
        decision.reasons.append("guardrail state_unavailable: budget state could not be reached; on_state_unavailable decides standard")
        # No reservation holds, but the spend must still be counted: settle() gives it to the
        # ledger, which records it (or journals it until the state answers again).
        decision.reservation_id = rid
        decision._budget_charges = tuple(scopes)

    def _reject(self, decision: Decision, budget: CompiledBudget, balance: Balance, charge: int) -> None:
        """A budget refused the request; `charge` is what the request would have cost that budget."""
        decision.outcome, decision.forced_by = "rejected", budget.spec.name
        decision.reasons.append(
            f"budget {budget.spec.name}: worst case {_usd(charge)} on top of {_usd(balance.spent + balance.reserved)} "
            f"spent or reserved exceeds {_usd(balance.limit)}")
        decision._rejection = (budget.spec.name, balance.limit, balance.spent + balance.reserved, charge)

    def _switch_cost(self, model: ModelEntry | None, sticky: tuple[str, int, float], speed: str, geo: str | None) -> dict[str, Any]:
        """A forced speed switch re-writes the conversation's cached prefix at the new speed."""
        switch: dict[str, Any] = {"from": sticky[0], "to": speed, "cached_prefix_tokens": sticky[1]}
        if model is not None:
            try:
                switch["cache_miss_cost_micro"] = estimate(model, speed=speed, input_tokens=sticky[1], max_tokens=0,  # type: ignore[arg-type]
                                                           cache_control=True, inference_geo=geo)
            except PricingError:
                pass
        return switch

    # -- settle ---------------------------------------------------------------------------

    def settle(self, decision: Decision, usage: Mapping[str, Any] | Any, *, worst_case: bool = False) -> Settlement:
        """Replace the decision's reservation with the actual cost of the response's usage.

        Billed at `usage.speed` (the speed that actually ran). Settling a decision twice
        records nothing the second time. Raises `UsageError` for a malformed usage, and
        then records nothing: the reservation stands until a good usage settles it.
        `worst_case`: `usage` stands in for a bill nobody saw (an attempt cut short, charged
        max_tokens of output); a request with `fallbacks` is then charged at least its whole
        reserved worst case, since any of its hops may have served and billed.
        """
        if self._async_ledger:
            raise _needs_await("settle")
        counts, cost, charges, steps = self._to_settle(decision, usage, worst_case)
        first = not decision._settled
        if charges is not None:
            first = self.ledger.settle(decision.reservation_id, charges)  # type: ignore[arg-type,assignment]
        settlement = self._settled(decision, counts, cost, first, steps)
        if self.decision_log is not None:
            self._log_end("settled", decision, settlement, usage)
        return settlement

    async def asettle(self, decision: Decision, usage: Mapping[str, Any] | Any, *, worst_case: bool = False) -> Settlement:
        """`settle` for async callers: an `AsyncLedger` is awaited; another shared ledger runs in a worker thread."""
        if not self._async_ledger:
            if isinstance(self.ledger, MemoryLedger):
                return self.settle(decision, usage, worst_case=worst_case)
            return await run_in_thread(functools.partial(self.settle, decision, usage, worst_case=worst_case))
        counts, cost, charges, steps = self._to_settle(decision, usage, worst_case)
        first = not decision._settled
        if charges is not None:
            first = await self.ledger.settle(decision.reservation_id, charges)  # type: ignore[arg-type,misc]
        settlement = self._settled(decision, counts, cost, first, steps)
        if self.decision_log is not None:
            self._log_end("settled", decision, settlement, usage)
        return settlement

    def _to_settle(self, decision: Decision, usage: Mapping[str, Any] | Any, worst_case: bool = False
                   ) -> tuple[UsageCounts, int, list[Charge] | None, tuple[tuple[StepCost, ...], bool, str | None] | None]:
        """The usage, its cost, what to record against each budget (None: no ledger call to make), and
        (the priced steps, whether their speeds were assumed, the fallback credit) when the response has them."""
        counts = parse_usage(usage)
        speed = counts.speed
        iterations = parse_iterations(usage)
        steps: tuple[tuple[StepCost, ...], bool, str | None] | None = None
        premium: int | None = None
        if iterations is None:
            cost_or_none = self.usage_cost(decision, counts, speed)
            cost = self._unpriced_cost(decision, counts, speed) if cost_or_none is None else cost_or_none
            credit = fallback_credit_status(usage) if type(usage) is not dict or "fallback_credit" in usage else None
            if credit is not None:
                steps = ((), False, credit)
        else:
            # Billed step by step: the top-level usage leaves compaction out and may hold another model's tokens.
            priced, cost, standard_cost, assumed = self._price_steps(decision, counts, iterations)
            premium = cost - standard_cost if cost > standard_cost else 0
            steps = (priced, assumed, fallback_credit_status(usage))
            for step in priced:
                if step.speed == "fast":
                    speed = "fast"  # a budget of fast spend counts the steps priced fast
        if worst_case:
            cost, premium = self._worst_case_floor(decision, counts.speed, cost, premium)
        if decision._settled or decision.reservation_id is None:
            return counts, cost, None, steps
        charges, owed = self._charges_of(decision, counts, cost, speed, premium)
        # Nothing held and nothing owed: no ledger call; the decision's own flag stops a second settle.
        return counts, cost, charges if owed or decision._held else None, steps

    def _charges_of(self, decision: Decision, counts: UsageCounts, cost: int, speed: str | None = None,
                    premium: int | None = None) -> tuple[list[Charge], bool]:
        """What a usage costing `cost` charges each of the decision's budgets, and whether any charge is not zero.

        `speed` is the speed budgets of fast spend count it at (default the usage's); `premium` the fast premium
        when the caller priced it already (a response billed step by step)."""
        if speed is None:
            speed = counts.speed
        charges = []
        owed = False
        for budget, scope in decision._budget_charges:
            kind = budget.spec.counts
            if kind == "all" or (kind == "fast" and speed == "fast"):
                amount = cost
            elif speed != "fast":
                amount = 0
            else:
                if premium is None:
                    # What the response cost over the same usage at standard speed.
                    at_standard = self.usage_cost(decision, counts, "standard")
                    premium = cost if at_standard is None else cost - at_standard if cost > at_standard else 0
                amount = premium
            if amount:
                owed = True
            charges.append((scope, amount))
        return charges, owed

    def charge_attempt(self, decision: Decision, usage: Mapping[str, Any] | Any, *, worst_case: bool = False) -> int:
        """Record what one abandoned attempt of a request may have cost, beside the request's reservation, which
        stays for the attempt that follows (a retry after a read timeout: the server may bill both). Returns the cost.
        `worst_case` as for `settle`."""
        if self._async_ledger:
            raise _needs_await("charge_attempt")
        counts = parse_usage(usage)
        cost_or_none = self.usage_cost(decision, counts, counts.speed)
        cost = self._unpriced_cost(decision, counts, counts.speed) if cost_or_none is None else cost_or_none
        premium: int | None = None
        if worst_case:
            cost, premium = self._worst_case_floor(decision, counts.speed, cost, premium)
        if decision.reservation_id is not None:
            charges, owed = self._charges_of(decision, counts, cost, None, premium)
            if owed:
                self.ledger.settle(next(_reservation_ids), charges)  # type: ignore[union-attr]
        telemetry.record_event("policy_engine.attempt_charged", {
            "policy_engine.policy.name": decision.policy_name, "policy_engine.cost.actual_usd": cost / 1e6})
        return cost

    @staticmethod
    def _worst_case_floor(decision: Decision, speed: str | None, cost: int, premium: int | None) -> tuple[int, int | None]:
        """(cost, fast premium) of a worst-case stand-in, raised to the worst case reserved for a request with
        `fallbacks`: the stand-in prices the requested model only, and a dearer hop may be the one that served."""
        if decision._inputs is None or decision._inputs[3] is None:
            return cost, premium
        fast = speed == "fast"
        reserved = decision.estimate_fast_micro if fast else decision.estimate_standard_micro
        if reserved is None or reserved <= cost:
            return cost, premium
        if fast:
            standard = decision.estimate_standard_micro
            premium = reserved - standard if standard is not None and reserved > standard else reserved
        return reserved, premium

    def _unpriced_cost(self, decision: Decision, counts: UsageCounts, speed: str) -> int:
        """Settlement never refuses: a usage the decision's cards cannot price is charged at the catalog's
        dearest rates for its speed, unless the policy allows it unmetered ($0)."""
        policy = self._policies[decision.policy_name].policy if decision.policy_name in self._policies else None
        if policy is not None and policy.on_unpriced_model == "allow_unmetered":
            return 0
        cost = cost_with_rates(self.dearest_rates(speed, decision.platform), counts)
        telemetry.record_event("policy_engine.unpriced_settlement", {
            "policy_engine.policy.name": decision.policy_name, "gen_ai.request.model": decision.model,
            "policy_engine.speed.actual": speed, "policy_engine.cost.actual_usd": cost / 1e6})
        return cost

    @staticmethod
    def _settled(decision: Decision, counts: UsageCounts, cost: int, first: bool,
                 steps: tuple[tuple[StepCost, ...], bool, str | None] | None = None) -> Settlement:
        decision._settled = True
        input_tokens, output_tokens, write_5m, write_1h, cache_read, speed, _ = counts
        # tuple.__new__, not Settlement(...): the NamedTuple's __new__ is a Python frame per settlement.
        if steps is None:
            settlement = tuple.__new__(Settlement, (cost, speed, input_tokens, output_tokens, first, write_5m + write_1h,
                                                    cache_read, (), False, None))
        else:
            settlement = tuple.__new__(Settlement, (cost, speed, input_tokens, output_tokens, first, write_5m + write_1h,
                                                    cache_read, steps[0], steps[1], steps[2]))
        telemetry.record_settlement(decision, settlement)
        return settlement

    def _price_steps(self, decision: Decision, counts: UsageCounts, iterations: tuple[IterationCounts, ...]
                     ) -> tuple[tuple[StepCost, ...], int, int, bool]:
        """(each step priced, their total, the same steps all at standard, whether a speed was assumed).

        Each entry is priced at its own model (`message` and `compaction` entries without one: the
        request's), on the decision's platform, at the response's inference geo, with the cache rates.
        The API reports one speed for the whole response, so a step is priced fast where its model has
        fast mode and it may have run fast: the response says fast, or its hop was sent fast (a fallback
        chain's reported speed may be the serving hop's alone)."""
        mp = decision._plan
        geo = counts.inference_geo
        geo_key = geo if geo is not None else "global" if mp is None or mp.geo is None else mp.geo
        all_fast = counts.speed == "fast"
        sent_fast = decision._fast_models if decision._chain is not None else (
            frozenset((decision.model,)) if decision.speed == "fast" else frozenset())  # no chain: the request alone
        priced: list[StepCost] = []
        total = standard_total = 0
        assumed = False
        for kind, model, step in iterations:
            name = decision.model if model is None else model
            if mp is not None and geo is None and name == decision.model:
                plan = mp
            else:
                plan = self._models.get((name, geo_key, decision.platform)) or self._model_plan(name, geo_key, decision.platform)
            may_be_fast = all_fast or name in sent_fast
            fast = may_be_fast and plan.fast_rates is not None
            rates = plan.fast_rates if fast else plan.std_rates
            if rates is None:
                # Settlement never refuses: an unpriced step is charged as settle charges an unpriced usage, and
                # counted whole as premium where it may have run fast (its premium is unknown).
                unpriced_speed = "fast" if may_be_fast else "standard"
                cost = self._unpriced_cost(decision, step, unpriced_speed)
                standard = 0 if unpriced_speed == "fast" else cost
            else:
                cost = cost_with_rates(rates, step)
                standard = cost if not fast else 0 if plan.std_rates is None else cost_with_rates(plan.std_rates, step)
            if fast and (len(iterations) > 1 or not all_fast):
                assumed = True
            total += cost
            standard_total += standard
            inp, out, write_5m, write_1h, read, _, _ = step
            priced.append(tuple.__new__(StepCost, (kind, name, "fast" if fast else "standard", cost, inp, out,
                                                   write_5m + write_1h, read, rates is not None)))
        return tuple(priced), total, standard_total, assumed

    def usage_cost(self, decision: Decision, counts: UsageCounts, speed: str) -> int | None:
        """What a parsed usage (`catalog.parse_usage`) costs at `speed` for the decision's model and geo
        (the usage's own `inference_geo` wins), in micro-dollars; None where the catalog has no price.

        `settle` bills with it; `simulate` prices the other speed of a line with it."""
        mp = decision._plan
        if mp is not None and counts.inference_geo is None:
            rates = mp.fast_rates if speed == "fast" else mp.std_rates  # the cards the decision priced with
            return None if rates is None else cost_with_rates(rates, counts)
        model = mp.entry if mp is not None else self.catalog.find(decision.model, platform=decision.platform)
        if model is None:
            return None
        try:
            return cost_of_counts(model, counts, inference_geo=None if mp is None else mp.geo, speed=speed)  # type: ignore[arg-type]
        except PricingError:
            return None

    def _log_end(self, event: str, decision: Decision, settlement: Settlement | None = None, usage: Any = None) -> None:
        """Hand the request's end to the decision log (once per decision: a second settle or release records nothing)."""
        if not decision._logged:
            decision._logged = True
            self.decision_log.emit(event, decision, settlement, usage)  # type: ignore[union-attr]

    def release(self, decision: Decision) -> bool:
        """Free the reservation of a request that was never sent. False when there was none left to free.

        A request released and then sent after all can still be settled: its spend is recorded.
        """
        if self._async_ledger:
            raise _needs_await("release")
        if self.decision_log is not None and not decision._settled:
            self._log_end("released", decision)
        if decision.reservation_id is None or decision._settled or not decision._held:
            return False
        decision._held = False
        return self.ledger.release(decision.reservation_id)  # type: ignore[return-value]

    async def arelease(self, decision: Decision) -> bool:
        """`release` for async callers."""
        if not self._async_ledger:
            if isinstance(self.ledger, MemoryLedger):
                return self.release(decision)
            return await asyncio.to_thread(self.release, decision)
        if self.decision_log is not None and not decision._settled:
            self._log_end("released", decision)
        if decision.reservation_id is None or decision._settled or not decision._held:
            return False
        decision._held = False
        return await self.ledger.release(decision.reservation_id)  # type: ignore[misc,no-any-return]


def load(
    path_or_paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
    catalog: Catalog | str | os.PathLike[str] | None = None,
    **engine_options: Any,
) -> Engine:
    """Load, check and compile policy files into an `Engine`. The first policy is the default one.

    `catalog` is a `Catalog` or the path of a catalog file extending the packaged one.
    Raises `PolicyError` listing every problem of every file.
    """
    paths = [path_or_paths] if isinstance(path_or_paths, (str, os.PathLike)) else list(path_or_paths)
    compiled, problems, sources = [], [], {}
    for path in paths:
        try:
            compiled.append(compile_file(str(Path(path))))
        except PolicyError as exc:
            problems.extend(exc.diagnostics)
            sources.update(exc.sources)
    if problems:
        raise PolicyError(problems, sources)
    if catalog is not None and not isinstance(catalog, Catalog):
        catalog = load_catalog(catalog)
    return Engine(compiled, catalog, **engine_options)


def _model_features(entry: ModelEntry | None, name: str, std: tuple[tuple[int, RateCard], ...] | None,
                    fast: tuple[tuple[int, RateCard], ...] | None) -> dict[str, Any]:
    """The `model` features of a model plan that hold at any time."""
    if entry is None:
        return {"id": name, "known": False, "family": "", "fast_priced": False, "fast_needs_beta": False}
    features: dict[str, Any] = {"id": entry.id, "known": True, "family": entry.family or "",
                                "fast_priced": fast is not None, "fast_needs_beta": entry.fast.beta_header is not None}
    if std is not None and fast is not None and std[-1][1].output > 0:
        features["fast_multiplier"] = fast[-1][1].output / std[-1][1].output
    return features


def _timed_model_features(mp: _ModelPlan, epoch: float) -> dict[str, Any]:
    """The `model` features at `epoch`: availability and days to retirement."""
    features = {**mp.features, "fast_available": mp.fast_from <= epoch < mp.fast_until}
    if mp.fast_until != _INF:
        features["fast_retires_in_days"] = (mp.fast_until - epoch) / 86400.0
    return features


def _budget_features(balance: Balance) -> dict[str, float]:
    remaining = max(balance.remaining, 0)
    return {
        "remaining_usd": remaining / 1e6,
        "spent_usd": balance.spent / 1e6,
        "limit_usd": balance.limit / 1e6,
        "fraction_left": remaining / balance.limit if balance.limit else 0.0,
    }


def _throughput(figures: tuple[float, float, float | None], max_tokens: int) -> dict[str, float]:
    std, ttft, fast = figures
    result = {"standard_otps": std, "ttft_s": ttft, "est_standard_s": ttft + max_tokens / std}
    if fast:
        result["fast_otps"] = fast
        result["est_fast_s"] = ttft + max_tokens / fast
    return result


def _cost_features(std: int | None, fast: int | None) -> dict[str, float]:
    cost: dict[str, float] = {}
    if std is not None:
        cost["standard_usd"] = std / 1e6
    if fast is not None:
        cost["fast_usd"] = fast / 1e6
        if std is not None:
            cost["premium_usd"] = (fast - std) / 1e6
    return cost


def _rate_table(model: ModelEntry, speed: str, geo: str | None) -> tuple[tuple[int, RateCard], ...] | None:
    try:
        return model.rate_table(speed, geo)  # type: ignore[arg-type]
    except PricingError:
        return None




def _stated_rates(choice: Rate) -> tuple[tuple[int, RateCard], ...]:
    """A policy's stated rate as a card: cache writes at 1.25x (5m) and 2x (1h) of input, reads at 0.1x (rounded up)."""
    inp = int(choice.rate.input_usd_per_mtok * 1_000_000)  # $/MTok -> pico-dollars per token (6 decimals: exact)
    out = int(choice.rate.output_usd_per_mtok * 1_000_000)
    return ((0, RateCard(inp, out, -(-inp * 5 // 4), inp * 2, -(-inp // 10), "standard", 0, None)),)


def _counted(input_tokens: SupportsIndex) -> int:
    # Typed SupportsIndex, not int: compiled code would refuse a float with a TypeError that names
    # no parameter; the caller gets this InvalidRequest instead.
    if type(input_tokens) is not int or input_tokens < 0:
        raise InvalidRequest(f"input_tokens must be a non-negative int, got {input_tokens!r}")
    return input_tokens  # type: ignore[return-value]


def _usd(micro: int) -> str:
    from .catalog import format_usd

    return format_usd(micro)


class _NeedBalances(Exception):
    """`_decide` over an `AsyncLedger` reached the budgets' balances: `_afinish` awaits them and decides again."""

    def __init__(self, scopes: list[Scope]) -> None:
        self.scopes = scopes


def _rewrite_fallbacks(decision: Decision) -> None:
    """With the speed final: which `fallbacks` entries go out at standard instead of fast, and which hops may run fast."""
    chain: tuple[_Hop, ...] = decision._chain  # type: ignore[assignment]
    fast = decision.speed == "fast"
    models = {decision.model} if fast else set()
    rewritten: dict[int, Any] = {}
    for hop in chain:
        reason: tuple[str, str] | None = None
        if hop.wants == "fast" and not fast:
            reason = ("standard_request", "the request itself is sent at standard speed")
        elif fast and hop.wants != "standard":
            if hop.blocked is not None:
                reason = hop.blocked
            elif hop.plan.fast_rates is not None:
                models.add(hop.model)
        if reason is not None:
            decision.fallback_rewrites.append({"index": hop.index, "model": hop.model, "guardrail": reason[0],
                                               "reason": reason[1]})
            decision.reasons.append(f"fallbacks[{hop.index}] ({hop.model}) sent at standard: {reason[0]}: {reason[1]}")
            rewritten[hop.index] = {**hop.entry, "speed": "standard"}
    decision._fast_models = frozenset(models)
    caller: list[Any] = decision._wire_fallbacks  # type: ignore[assignment]  # the caller's list, until here
    decision._wire_fallbacks = [rewritten.get(i, entry) for i, entry in enumerate(caller)] if rewritten else None


def _concluded(decision: Decision, started: int) -> Decision:
    """Record the decision; a rejection becomes its typed exception."""
    if decision._chain is not None:
        _rewrite_fallbacks(decision)
    telemetry.record_decision(decision, started, time.perf_counter_ns())
    if decision.outcome == "rejected":
        raise _rejection(decision)
    return decision


def _needs_await(method: str) -> TypeError:
    return TypeError(f"this Engine's ledger is an AsyncLedger: await engine.a{method}(...) instead of engine.{method}(...)")


def _rejection(decision: Decision) -> CeilingExceeded | StateUnavailable:
    from .catalog import to_usd

    if decision.forced_by == "unpriced_model":
        return CeilingExceeded("on_unpriced_model", "0", "0", "unknown",
                               f"policy {decision.policy_name}: the catalog has no price for model {decision.model}, "
                               f"so no budget can bound it; on_unpriced_model is reject")
    if decision.forced_by == "state_unavailable":
        unavailable = StateUnavailable(f"policy {decision.policy_name}: {decision.errors[-1]}; on_state_unavailable is reject")
        unavailable.decision = decision
        return unavailable
    name, limit, used, worst = decision._rejection or ("unknown", 0, 0, 0)
    exc = CeilingExceeded(name, str(to_usd(limit)), str(to_usd(used)), str(to_usd(worst)))
    exc.decision = decision  # type: ignore[attr-defined]
    return exc
