"""Run a policy's embedded `tests:` against the real engine, with the state each case sets up.

Each case gets a fresh engine whose ledger, rate-limit state and conversation
store start from the case's `state`, so cases never leak into each other.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from ..catalog import Catalog, load_catalog
from ..compile import CompiledPolicy
from ..decide import ConversationStore, Decision, Engine
from ..errors import CeilingExceeded, InvalidRequest
from ..ledger import Balance, Charge, MemoryLedger, ReserveResult, Scope
from ..policy import TestCase
from ..ratelimit import RateLimitStore

__all__ = ["CaseResult", "run_case", "run_policy_tests", "DEFAULT_TEST_TIME"]

DEFAULT_TEST_TIME = datetime(2026, 1, 1, 12, 0, tzinfo=timezone.utc)
_MICRO = 1_000_000


@dataclass
class CaseResult:
    policy: str
    name: str
    passed: bool
    failures: list[str] = field(default_factory=list)
    decision: Decision | None = None
    index: int = 0

    def describe(self) -> str:
        head = f"{'PASS' if self.passed else 'FAIL'} {self.policy}: {self.name}"
        return head if self.passed else head + "".join(f"\n    {line}" for line in self.failures)


class _SeededLedger(MemoryLedger):
    """A ledger in which each budget has already spent what the test case says, whatever its key."""

    def __init__(self, spent: dict[str, int]) -> None:
        super().__init__()
        self._seed = spent

    def _prime(self, scopes: Sequence[Scope]) -> None:
        for scope in scopes:
            if scope.budget in self._seed and scope.id not in self._spent:
                self._spent[scope.id] = self._seed[scope.budget]

    def balances(self, scopes: Sequence[Scope]) -> list[Balance]:
        self._prime(scopes)
        return super().balances(scopes)

    def reserve(self, reservation_id: str, charges: Sequence[Charge], *, ttl_s: float) -> ReserveResult:
        self._prime([s for s, _ in charges])
        return super().reserve(reservation_id, charges, ttl_s=ttl_s)


class _SeededConversations(ConversationStore):
    """The case's conversation state answers for whichever conversation the request is in."""

    def __init__(self, speed: str, prefix_tokens: int, at: float) -> None:
        super().__init__()
        self._seed = (speed, prefix_tokens, at)

    def get(self, key: str, now: float, ttl_s: float) -> tuple[str, int, float] | None:
        if key not in self._entries:
            self._entries[key] = self._seed
        return super().get(key, now, ttl_s)


def _engine_for(compiled: CompiledPolicy, case: TestCase, catalog: Catalog, now: datetime) -> Engine:
    state = case.state
    ledger = _SeededLedger({name: int(b.spent_usd * _MICRO) for name, b in state.budgets.items()})
    ratelimits = RateLimitStore()
    epoch = now.timestamp()
    if state.ratelimit is not None:
        rl = state.ratelimit
        values: dict[str, Any] = {k: getattr(rl, k) for k in (
            "input_tokens_limit", "input_tokens_remaining", "output_tokens_limit", "output_tokens_remaining")}
        if rl.reset_in_s is not None:
            values["reset_at"] = epoch + rl.reset_in_s
        if rl.seconds_since_429 is not None:
            values["last_429_at"] = epoch - rl.seconds_since_429
        ratelimits.update("default", now=epoch, **values)
    conversations: ConversationStore = ConversationStore()
    if state.conversation is not None and state.conversation.last_speed is not None:
        c = state.conversation
        conversations = _SeededConversations(c.last_speed, c.cached_prefix_tokens, epoch - c.age_s)
    return Engine([compiled], catalog, ledger=ledger, ratelimits=ratelimits, conversations=conversations)


def run_case(compiled: CompiledPolicy, case: TestCase, catalog: Catalog, index: int = 0) -> CaseResult:
    now = case.now or DEFAULT_TEST_TIME
    if now.tzinfo is None:
        now = now.replace(tzinfo=timezone.utc)
    engine = _engine_for(compiled, case, catalog, now)
    result = CaseResult(compiled.name, case.name, True, index=index)
    request = dict(case.request)
    batch = bool(request.pop("batch", False))
    try:
        decision = engine.decide(request, case.context, now=now, batch=batch, input_tokens=case.input_tokens)
    except CeilingExceeded as exc:
        decision = exc.decision  # type: ignore[attr-defined]
    except InvalidRequest as exc:
        result.passed = False
        result.failures.append(f"the case's request or context is invalid: {exc}")
        return result
    result.decision = decision
    expect = case.expect
    checks: list[tuple[str, Any, Any]] = [
        ("speed", expect.speed, decision.speed if decision.outcome != "rejected" else None),
        ("rule", expect.rule, decision.rule),
        ("outcome", expect.outcome, decision.outcome),
    ]
    for what, wanted, got in checks:
        if wanted is not None and wanted != got:
            result.failures.append(f"{what}: expected {wanted!r}, got {got!r}")
    if expect.guardrails is not None and sorted(expect.guardrails) != sorted(decision.guardrails):
        result.failures.append(f"guardrails: expected {sorted(expect.guardrails)}, got {sorted(decision.guardrails)}")
    for fragment in expect.reasons:
        if not any(fragment in reason for reason in decision.reasons):
            result.failures.append(f"reasons: none contains {fragment!r}; reasons were {decision.reasons}")
    if result.failures:
        result.passed = False
        result.failures.append(f"decision: {decision.speed} by {decision.rule} ({decision.outcome}); reasons: {decision.reasons}")
    return result


def run_policy_tests(compiled: CompiledPolicy, catalog: Catalog | None = None,
                     extra_cases: Sequence[TestCase] = ()) -> list[CaseResult]:
    """Run every embedded test case of a compiled policy (plus `extra_cases`)."""
    catalog = catalog or load_catalog()
    cases = [*compiled.policy.tests, *extra_cases]
    return [run_case(compiled, case, catalog, index) for index, case in enumerate(cases)]
