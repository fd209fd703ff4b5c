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
import itertools
import json
import os
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from . import telemetry
from .apply import apply_headers, apply_params
from .catalog import Catalog, ModelEntry, actual, estimate, load_catalog, parse_usage
from .cel import CelError
from .compile import CompiledBudget, CompiledPolicy, LazyVars, compile_file
from .errors import CeilingExceeded, InvalidRequest, PolicyEngineError, PolicyError, PricingError
from .errors import StateUnavailable
from .features import context_features, request_features
from .ledger import Balance, Charge, Ledger, MemoryLedger, Scope, window_bounds
from .observe import ThroughputObserver
from .ratelimit import RateLimitStore
from .tokens import InvalidRequestParams, TokenEstimate, estimate_input_tokens

__all__ = ["Engine", "Decision", "Settlement", "ConversationStore", "RuleEvaluationError", "load", "FAST_BETA"]

FAST_BETA = "fast-mode-2026-02-01"
_INF = float("inf")
_NO_BUDGET = {"remaining_usd": _INF, "spent_usd": 0.0, "limit_usd": _INF, "fraction_left": 1.0}
_UNKNOWN_KEY = "<key-error>"
CONVERSATION_MEMORY_S = 3600.0
"""How long `conversation.*` remembers a conversation when the policy sets no stickiness (the longest prompt-cache TTL)."""
_ids = itertools.count(1)
_ID_PREFIX = f"{os.getpid():x}-{os.urandom(4).hex()}-"


@dataclass(slots=True)
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
    reservation_id: str | None = None
    errors: list[str] = field(default_factory=list)
    forced_by: str | None = None
    """The guardrail or ceiling that changed the speed (or rejected), for metrics."""
    sticky_switch: dict[str, Any] | None = None
    fast_beta: str = FAST_BETA
    at: float = 0.0
    _budget_charges: tuple[tuple[CompiledBudget, Scope], ...] = ()
    _model: ModelEntry | None = None
    _inference_geo: str | None = None
    _settled: bool = False
    _rejection: tuple[str, int, int, int] | None = None
    """(ceiling, limit, spent plus reserved, estimate) in micro-dollars, when rejected."""
    _span_context: Any = None
    """The decide span's context when a tracer recorded it: the settle span links to it."""

    @property
    def estimate_micro(self) -> int | None:
        """The worst-case cost reserved for the chosen speed."""
        return self.estimate_fast_micro if self.speed == "fast" else self.estimate_standard_micro

    def apply(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """New Messages API params: fast adds `speed` and the beta; standard removes `speed`."""
        return apply_params(params, self.speed, self.fast_beta)

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


_PUBLIC_FIELDS = tuple(f.name for f in fields(Decision) if not f.name.startswith("_"))


@dataclass(frozen=True, slots=True)
class Settlement:
    cost_micro: int
    speed: str
    input_tokens: int
    output_tokens: int
    first: bool
    """False when this decision had been settled already (nothing was recorded twice)."""
    cache_write_tokens: int = 0
    cache_read_tokens: int = 0


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
                # Drop the oldest tenth: cheaper than an LRU on every request, and stale entries go first.
                for old in sorted(self._entries, key=lambda k: self._entries[k][2])[: self._max // 10 or 1]:
                    del self._entries[old]
            self._entries[key] = (speed, prefix_tokens, now)


class Engine:
    """Compiled policies plus the state they decide with. Immutable after load and thread-safe."""

    def __init__(
        self,
        policies: Sequence[CompiledPolicy],
        catalog: Catalog | None = None,
        *,
        ledger: Ledger | None = None,
        ratelimits: RateLimitStore | None = None,
        conversations: ConversationStore | None = None,
        reservation_ttl_s: float = 600.0,
        priority_tier: bool = False,
        clock: Any = time.time,
        throughput: ThroughputObserver | None = None,
        ledger_path: str | os.PathLike[str] | None = None,
    ) -> None:
        if not policies:
            raise ValueError("an Engine needs at least one policy")
        self._policies = {p.name: p for p in policies}
        if len(self._policies) != len(policies):
            raise ValueError("two policy files have the same name")
        self._default = policies[0]
        self.catalog = catalog or load_catalog()
        if ledger is None and ledger_path is not None:
            from .ledger.sqlite import SqliteLedger  # the embedded persistent default

            ledger = SqliteLedger(ledger_path)
        self.ledger = ledger or MemoryLedger()
        self.throughput = throughput
        """Observed output speeds (`policy_engine.observe`); None: the catalog's figures."""
        self.ratelimits = ratelimits or RateLimitStore()
        self.conversations = conversations or ConversationStore()
        self.reservation_ttl_s = reservation_ttl_s
        self.priority_tier = priority_tier
        self._clock = clock

    @property
    def policies(self) -> dict[str, CompiledPolicy]:
        return dict(self._policies)

    def policy(self, name: str | None = None) -> CompiledPolicy:
        if name is None:
            return self._default
        try:
            return self._policies[name]
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
        input_tokens: int | None = None,
        policy: str | None = None,
    ) -> Decision:
        """Decide the speed of one Messages API request and reserve its worst-case cost.

        `input_tokens` is an exact count when the caller has one (else it is estimated);
        `batch` says the request goes through the Message Batches API; `account` keys the
        fast rate-limit state. Raises `CeilingExceeded` when a ceiling rejects the request,
        `InvalidRequest` for malformed params or context.
        """
        started = time.perf_counter_ns()
        if input_tokens is None:
            try:
                tokens = estimate_input_tokens(params)
            except InvalidRequestParams as exc:
                raise InvalidRequest(str(exc)) from None
        else:
            if type(input_tokens) is not int or input_tokens < 0:
                raise InvalidRequest(f"input_tokens must be a non-negative int, got {input_tokens!r}")
            tokens = TokenEstimate(input_tokens, input_tokens, True)
        try:
            decision = self._decide(params, context, now, account, batch, tokens, self.policy(policy))
        except RuleEvaluationError as exc:
            telemetry.record_decision(exc.decision, started, time.perf_counter_ns(), exc)
            raise
        telemetry.record_decision(decision, started, time.perf_counter_ns())
        if decision.outcome == "rejected":
            raise _rejection(decision)
        return decision

    async def adecide(
        self,
        params: Mapping[str, Any],
        context: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> Decision:
        """`decide` for async callers. Deciding never blocks on I/O with the in-memory state;
        with a shared ledger it runs in a worker thread so the event loop keeps going."""
        if isinstance(self.ledger, MemoryLedger):
            return self.decide(params, context, **kwargs)
        return await asyncio.to_thread(self.decide, params, context, **kwargs)

    def _decide(
        self,
        params: Mapping[str, Any],
        context: Mapping[str, Any] | None,
        now: datetime | None,
        account: str,
        batch: bool,
        tokens: TokenEstimate,
        compiled: CompiledPolicy,
    ) -> Decision:
        policy = compiled.policy
        epoch = self._clock() if now is None else now.timestamp()
        when = now if now is not None else datetime.fromtimestamp(epoch, timezone.utc)
        request = request_features(params, tokens.upper, tokens.exact, batch=batch)
        ctx = context_features(context)
        model = self.catalog.find(request["model"])  # type: ignore[arg-type]
        geo = request["inference_geo"]
        geo_key = None if geo == "global" else geo
        max_tokens: int = request["max_tokens"]  # type: ignore[assignment]
        cost, std_micro, fast_micro = self._estimates(model, tokens.upper, max_tokens, bool(request["cache_control"]), geo_key)
        activation: dict[str, Any] = {
            "request": request,
            "context": ctx,
            "ratelimit": self.ratelimits.snapshot(account, epoch),
            "cost": cost,
            "throughput": _throughput(model, max_tokens) if self.throughput is None
            else self.throughput.features(model, max_tokens, request["model"]),  # type: ignore[arg-type]
            "now": when,
        }
        activation["vars"] = LazyVars(dict(compiled.variables), activation)

        # Budget scopes and balances come first: rules may read them.
        errors: list[str] = []
        scopes = self._scopes(compiled, activation, when, errors)
        unavailable: StateUnavailable | None = None
        try:
            balances = self.ledger.balances([s for _, s in scopes]) if scopes else []
        except StateUnavailable as exc:
            # Rules still run (on empty balances); the outage then forces the speed below.
            unavailable = exc
            balances = [Balance(0, 0, s.limit) for _, s in scopes]
        budget_features = {b.spec.name: _budget_features(bal) for (b, _), bal in zip(scopes, balances)}
        activation["budgets"] = budget_features
        activation["budget"] = min(budget_features.values(), key=lambda f: f["fraction_left"]) if budget_features else _NO_BUDGET

        # Stickiness: a conversation keeps its speed while its entry is fresh.
        sticky_key = self._sticky_key(compiled, activation)
        sticky = None
        if sticky_key is not None:
            ttl = policy.stickiness.ttl_s if policy.stickiness is not None else CONVERSATION_MEMORY_S
            sticky = self.conversations.get(sticky_key, epoch, ttl)
        activation["conversation"] = {"last_speed": sticky[0], "cached_prefix_tokens": sticky[1]} if sticky else {"cached_prefix_tokens": 0}

        reasons: list[str] = []
        speed, rule = policy.default, "default"
        if sticky is not None and policy.stickiness is not None:
            speed, rule = sticky[0], "sticky"
            reasons.append(f"conversation keeps its {speed} speed (stickiness)")
        else:
            for compiled_rule in compiled.rules:
                try:
                    matched = compiled_rule.when.evaluate(activation)
                except CelError as exc:
                    errors.append(f"rule {compiled_rule.name}: {exc}")
                    if policy.on_error == "raise":
                        failed = Decision(
                            speed="standard", rule=compiled_rule.name, outcome="rejected", reasons=[f"rule {compiled_rule.name} failed to evaluate; on_error is raise"],
                            guardrails=[], ceilings=[], model=request["model"], max_tokens=max_tokens,  # type: ignore[arg-type]
                            input_tokens=tokens.upper, input_tokens_exact=tokens.exact, estimate_standard_micro=std_micro,
                            estimate_fast_micro=fast_micro, policy_name=policy.name, policy_version=compiled.version,
                            errors=errors, forced_by="on_error", at=epoch)
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

        decision = Decision(
            speed=speed, rule=rule, outcome="allowed", reasons=reasons, guardrails=[], ceilings=[],
            model=request["model"], max_tokens=max_tokens, input_tokens=tokens.upper,  # type: ignore[arg-type]
            input_tokens_exact=tokens.exact, estimate_standard_micro=std_micro, estimate_fast_micro=fast_micro,
            policy_name=policy.name, policy_version=compiled.version, errors=errors, at=epoch,
            _model=model, _inference_geo=geo_key,
        )
        if model is not None and model.fast.beta_header:
            decision.fast_beta = model.fast.beta_header
        if speed == "fast":
            self._guardrails(decision, model, request, account, tokens.upper, epoch)
        self._per_request_ceiling(decision, compiled)
        if decision.outcome != "rejected" and unavailable is not None:
            self._state_unavailable(decision, scopes, _ID_PREFIX + str(next(_ids)), unavailable)
        elif decision.outcome != "rejected":
            self._reserve(decision, scopes, balances)
        if sticky_key is not None and decision.outcome != "rejected":
            if sticky is not None and policy.stickiness is not None and sticky[0] != decision.speed:
                decision.sticky_switch = self._switch_cost(model, sticky, decision.speed, geo_key)
            self.conversations.put(sticky_key, decision.speed, tokens.upper, epoch)
        return decision

    def _estimates(self, model: ModelEntry | None, input_tokens: int, max_tokens: int, cache_control: bool,
                   geo: str | None) -> tuple[dict[str, float], int | None, int | None]:
        std = fast = None
        if model is not None:
            try:
                std = estimate(model, speed="standard", input_tokens=input_tokens, max_tokens=max_tokens,
                               cache_control=cache_control, inference_geo=geo)
            except PricingError:
                pass
            if model.fast.supported:
                try:
                    fast = estimate(model, speed="fast", input_tokens=input_tokens, max_tokens=max_tokens,
                                    cache_control=cache_control, inference_geo=geo)
                except PricingError:
                    pass
        cost: dict[str, float] = {}
        if std is not None:
            cost["standard_usd"] = std / 1e6
        if fast is not None:
            cost["fast_usd"] = fast / 1e6
            if std is not None:
                cost["premium_usd"] = (fast - std) / 1e6
        return cost, std, fast

    def _scopes(self, compiled: CompiledPolicy, activation: Mapping[str, Any], when: datetime,
                errors: list[str]) -> list[tuple[CompiledBudget, Scope]]:
        scopes = []
        for budget in compiled.budgets:
            try:
                key = budget.key.evaluate(activation)
            except CelError as exc:
                # The budget still applies, to a shared bucket: an unkeyed request must not escape it.
                errors.append(f"budget {budget.spec.name} key: {exc}")
                key = _UNKNOWN_KEY
            window, _, end = window_bounds(budget.spec.window, budget.spec.timezone, when)
            scopes.append((budget, Scope(budget.spec.name, key, window, budget.limit_micro, end.timestamp())))
        return scopes

    def _sticky_key(self, compiled: CompiledPolicy, activation: Mapping[str, Any]) -> str | None:
        if compiled.stickiness_key is None:
            # No stickiness: conversations are still remembered, so rules can read `conversation.*`.
            key = activation["context"].get("conversation_id")
            return f"{compiled.name}\x1f{key}" if key else None
        try:
            key = compiled.stickiness_key.evaluate(activation)
        except CelError:
            return None  # no conversation id: nothing to keep sticky
        return f"{compiled.name}\x1f{key}" if key else None

    def _reason(self, rule: Any, activation: Mapping[str, Any], errors: list[str]) -> str:
        if rule.reason_expr is not None:
            try:
                return f"{rule.name}: {rule.reason_expr.evaluate(activation)}"
            except CelError as exc:
                errors.append(f"rule {rule.name} reason: {exc}")
        return f"{rule.name}: {rule.reason_text}" if rule.reason_text else f"rule {rule.name} matched"

    def _guardrails(self, decision: Decision, model: ModelEntry | None, request: Mapping[str, Any], account: str,
                    input_tokens: int, now: float) -> None:
        applied: list[tuple[str, str]] = []
        if model is None:
            applied.append(("unsupported_model", f"{decision.model} is not in the catalog, so fast mode cannot be assumed"))
        elif not model.fast.supported:
            applied.append(("unsupported_model", f"{decision.model} does not support fast mode"))
        elif decision.estimate_fast_micro is None:
            applied.append(("unpriced", f"the catalog has no fast price for {decision.model}, so its cost cannot be bounded"))
        if request["batch"] and not (model is not None and model.fast.fast_with_batch):
            applied.append(("batch", "fast mode is not available with the Batch API"))
        tier = request["service_tier"]
        if (tier == "priority" or (self.priority_tier and tier == "auto")) and not (model is not None and model.fast.fast_with_priority_tier):
            applied.append(("priority_tier", "fast mode is not available with Priority Tier"))
        if self.ratelimits.exhausted(account, input_tokens, now):
            applied.append(("rate_limited", "the fast-mode rate limit is exhausted"))
        if applied:
            decision.speed = "standard"
            decision.outcome = "downgraded"
            decision.forced_by = applied[0][0]
            decision.guardrails.extend(name for name, _ in applied)
            decision.reasons.extend(f"guardrail {name}: {why}" for name, why in applied)

    def _per_request_ceiling(self, decision: Decision, compiled: CompiledPolicy) -> None:
        limit = compiled.per_request_micro
        if limit is None:
            return
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

    def _charges(self, decision: Decision, scopes: Sequence[tuple[CompiledBudget, Scope]], speed: str) -> list[Charge]:
        std, fast = decision.estimate_standard_micro or 0, decision.estimate_fast_micro or 0
        charges = []
        for budget, scope in scopes:
            counts = budget.spec.counts
            if speed == "fast":
                amount = fast - std if counts == "premium" else fast
            else:
                amount = std if counts == "all" else 0
            charges.append((scope, max(amount, 0)))
        return charges

    def _reserve(self, decision: Decision, scopes: Sequence[tuple[CompiledBudget, Scope]], balances: Sequence[Balance]) -> None:
        if not scopes:
            return
        rid = _ID_PREFIX + str(next(_ids))
        try:
            result = self.ledger.reserve(rid, self._charges(decision, scopes, decision.speed), ttl_s=self.reservation_ttl_s)
        except StateUnavailable as exc:
            return self._state_unavailable(decision, scopes, rid, exc)
        if not result.ok and decision.speed == "fast":
            budget, _ = scopes[result.failed]  # type: ignore[index]
            balance = result.balances[result.failed]  # type: ignore[index]
            decision.ceilings.append(budget.spec.name)
            if budget.spec.on_exceed == "reject":
                return self._reject(decision, budget, balance, decision.estimate_fast_micro)
            decision.speed, decision.outcome, decision.forced_by = "standard", "downgraded", budget.spec.name
            decision.reasons.append(
                f"budget {budget.spec.name}: fast worst case does not fit ({_usd(balance.remaining)} left of {_usd(balance.limit)}); downgraded")
            try:
                result = self.ledger.reserve(rid, self._charges(decision, scopes, "standard"), ttl_s=self.reservation_ttl_s)
            except StateUnavailable as exc:
                return self._state_unavailable(decision, scopes, rid, exc)
        if not result.ok:
            budget, _ = scopes[result.failed]  # type: ignore[index]
            if budget.spec.name not in decision.ceilings:
                decision.ceilings.append(budget.spec.name)
            return self._reject(decision, budget, result.balances[result.failed], decision.estimate_standard_micro)  # type: ignore[index]
        decision.reservation_id = rid
        decision._budget_charges = tuple(scopes)

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

    def _reject(self, decision: Decision, budget: CompiledBudget, balance: Balance, estimate_micro: int | None) -> None:
        decision.outcome, decision.forced_by = "rejected", budget.spec.name
        decision.reasons.append(
            f"budget {budget.spec.name}: worst case {_usd(estimate_micro or 0)} on top of {_usd(balance.spent + balance.reserved)} "
            f"spent or reserved exceeds {_usd(balance.limit)}")
        decision._rejection = (budget.spec.name, balance.limit, balance.spent + balance.reserved, estimate_micro or 0)

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

    def settle(self, decision: Decision, usage: Mapping[str, Any] | Any) -> Settlement:
        """Replace the decision's reservation with the actual cost of the response's usage.

        Billed at `usage.speed` (the speed that actually ran). Settling a decision twice
        records nothing the second time.
        """
        counts = parse_usage(usage)
        model = decision._model
        if model is None:
            model = self.catalog.find(decision.model)
        cost = 0
        if model is not None:
            try:
                cost = actual(model, usage, inference_geo=decision._inference_geo)
            except PricingError:
                cost = 0  # unpriced model: nothing to charge, and the decision already said so
        first = not decision._settled
        if first and decision.reservation_id is not None:
            charges = self._actual_charges(decision, model, usage, counts.speed, cost)
            first = self.ledger.settle(decision.reservation_id, charges)
        decision._settled = True
        settlement = Settlement(cost, counts.speed, counts.input_tokens, counts.output_tokens, first,
                                counts.cache_write_5m_tokens + counts.cache_write_1h_tokens, counts.cache_read_tokens)
        telemetry.record_settlement(decision, settlement)
        return settlement

    def _actual_charges(self, decision: Decision, model: ModelEntry | None, usage: Any, speed: str, cost: int) -> list[Charge]:
        premium = 0
        if speed == "fast" and model is not None and any(b.spec.counts == "premium" for b, _ in decision._budget_charges):
            try:
                standard_cost = actual(model, _with_speed(usage, "standard"), inference_geo=decision._inference_geo)
                premium = max(cost - standard_cost, 0)
            except PricingError:
                premium = cost
        charges = []
        for budget, scope in decision._budget_charges:
            counts = budget.spec.counts
            amount = cost if counts == "all" else (0 if speed != "fast" else (cost if counts == "fast" else premium))
            charges.append((scope, amount))
        return charges

    def release(self, decision: Decision) -> bool:
        """Free the reservation of a request that was never sent. False when there was none left to free.

        A request released and then sent after all can still be settled: its spend is recorded.
        """
        if decision.reservation_id is None or decision._settled:
            return False
        return self.ledger.release(decision.reservation_id)


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


def _budget_features(balance: Balance) -> dict[str, float]:
    remaining = max(balance.remaining, 0)
    return {
        "remaining_usd": remaining / 1e6,
        "spent_usd": balance.spent / 1e6,
        "limit_usd": balance.limit / 1e6,
        "fraction_left": remaining / balance.limit if balance.limit else 0.0,
    }


def _throughput(model: ModelEntry | None, max_tokens: int) -> dict[str, float]:
    figures = model.throughput if model is not None else None
    std = (figures.standard_otps if figures else None) or 60.0
    ttft = (figures.ttft_s if figures else None) or 0.0
    result = {"standard_otps": std, "ttft_s": ttft, "est_standard_s": ttft + max_tokens / std}
    fast = figures.fast_otps if figures and model is not None and model.fast.supported else None
    if fast:
        result["fast_otps"] = fast
        result["est_fast_s"] = ttft + max_tokens / fast
    return result


def _with_speed(usage: Any, speed: str) -> dict[str, Any]:
    data = dict(usage) if isinstance(usage, Mapping) else usage.model_dump() if hasattr(usage, "model_dump") else dict(vars(usage))
    data["speed"] = speed
    return data


def _usd(micro: int) -> str:
    from .catalog import format_usd

    return format_usd(micro)


def _rejection(decision: Decision) -> CeilingExceeded | StateUnavailable:
    from .catalog import to_usd

    if decision.forced_by == "state_unavailable":
        unavailable = StateUnavailable(f"policy {decision.policy_name}: {decision.errors[-1]}; on_state_unavailable is reject")
        unavailable.decision = decision
        return unavailable
    name, limit, used, worst = decision._rejection or ("unknown", 0, 0, 0)
    exc = CeilingExceeded(name, str(to_usd(limit)), str(to_usd(used)), str(to_usd(worst)))
    exc.decision = decision  # type: ignore[attr-defined]
    return exc
