"""The Engine over an asyncio ledger (`AsyncRedisLedger` on a real redis-server).

adecide/asettle/arelease await the ledger on the caller's loop and must decide exactly
as the threaded path does: same speeds, rules, reasons and estimates, the same budget
outcomes (fit, downgrade, reject), balances read by rules, stickiness, and the same
outage behaviour. The sync methods refuse an async ledger with an actionable error.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from _redis import RedisServer, fleet_policy, free_port, redis_prefix, redis_server  # noqa: F401  (pytest fixtures)
from policy_engine import CeilingExceeded
from policy_engine.decide import load
from policy_engine.ledger import MemoryLedger, Scope
from policy_engine.ledger.redis import AsyncRedisLedger, RedisLedger

ROOT = Path(__file__).resolve().parent.parent
DEFAULT = ROOT / "policies" / "default.yaml"

FAST_CHAT = {"model": "claude-opus-5", "max_tokens": 4096, "messages": [{"role": "user", "content": "Hello"}]}
WAITING = {"interactive": True, "latency_slo_ms": 1000}
USAGE = {"input_tokens": 20, "output_tokens": 900, "speed": "fast"}


def _scope_of(decision: Any) -> list[Scope]:
    return [scope for _, scope in decision._budget_charges]


def test_async_ledger_decides_like_the_threaded_path_and_shares_the_budget(redis_server: RedisServer, redis_prefix: str) -> None:
    reference = load(DEFAULT, ledger=MemoryLedger()).decide(FAST_CHAT, WAITING)
    threaded = RedisLedger(url=redis_server.url, prefix=redis_prefix, balances_max_age_s=0)  # an observer: no cached answers

    async def main() -> None:
        engine = load(DEFAULT, ledger=AsyncRedisLedger(url=redis_server.url, prefix=redis_prefix))
        decision = await engine.adecide(FAST_CHAT, WAITING)
        assert (decision.speed, decision.rule, decision.outcome) == (reference.speed, reference.rule, reference.outcome) == \
            ("fast", "interactive-misses-slo", "allowed")
        assert decision.reasons == reference.reasons
        assert (decision.estimate_standard_micro, decision.estimate_fast_micro) == \
            (reference.estimate_standard_micro, reference.estimate_fast_micro)
        [scope] = _scope_of(decision)
        premium = decision.estimate_fast_micro - decision.estimate_standard_micro
        # The reservation is in Redis, where a threaded worker of the fleet sees it.
        assert [(b.spent, b.reserved) for b in threaded.balances([scope])] == [(0, premium)]
        settlement = await engine.asettle(decision, USAGE)
        assert settlement.first and settlement.speed == "fast"
        spent = threaded.balances([scope])[0].spent
        assert spent > 0 and threaded.balances([scope])[0].reserved == 0
        assert not (await engine.asettle(decision, USAGE)).first  # idempotent
        assert threaded.balances([scope])[0].spent == spent
        await engine.ledger.close()

    asyncio.run(main())
    threaded.close()


def test_sync_calls_on_an_async_ledger_say_what_to_call(redis_server: RedisServer, redis_prefix: str) -> None:
    async def main() -> None:
        engine = load(DEFAULT, ledger=AsyncRedisLedger(url=redis_server.url, prefix=redis_prefix))
        with pytest.raises(TypeError, match=r"await engine\.adecide"):
            engine.decide(FAST_CHAT, WAITING)
        decision = await engine.adecide(FAST_CHAT, WAITING)
        with pytest.raises(TypeError, match=r"await engine\.asettle"):
            engine.settle(decision, USAGE)
        with pytest.raises(TypeError, match=r"await engine\.arelease"):
            engine.release(decision)
        assert await engine.arelease(decision)
        assert not await engine.arelease(decision)  # nothing left to free
        await engine.ledger.close()

    asyncio.run(main())


def test_budget_outcomes_fit_downgrade_and_reject(tmp_path: Path, redis_server: RedisServer, redis_prefix: str) -> None:
    # fast_spend fits one fast worst case and downgrades the next; all_spend rejects past $0.50.
    policy = fleet_policy(tmp_path / "fleet.yaml", fast_usd=0.07, all_usd=0.5)  # a fast worst case is ~$0.05
    params = {"model": "claude-opus-5", "max_tokens": 1000, "messages": [{"role": "user", "content": "Hi"}]}

    async def main() -> None:
        engine = load(policy, ledger=AsyncRedisLedger(url=redis_server.url, prefix=redis_prefix))
        first = await engine.adecide(params, {"interactive": True})
        assert (first.speed, first.outcome) == ("fast", "allowed")
        second = await engine.adecide(params, {"interactive": True})
        assert (second.speed, second.outcome, second.forced_by) == ("standard", "downgraded", "fast_spend")
        assert any("fast_spend" in r and "downgraded" in r for r in second.reasons)
        third = await engine.adecide(params, {"interactive": False})
        assert third.speed == "standard"
        with pytest.raises(CeilingExceeded) as raised:
            for _ in range(40):  # $0.025 worst case each at standard
                await engine.adecide(params, {"interactive": False})
        assert raised.value.decision.forced_by == "all_spend"
        await engine.ledger.close()

    asyncio.run(main())


BALANCE_POLICY = """\
version: 1
name: balance-aware
default: standard
rules:
  - name: plenty-left
    when: budget.remaining_usd > 1.0
    speed: fast
budgets:
  - name: premium
    window: day
    limit_usd: 2
    counts: premium
    on_exceed: downgrade
"""


def test_rules_read_balances_awaited_from_the_shared_ledger(tmp_path: Path, redis_server: RedisServer, redis_prefix: str) -> None:
    policy = tmp_path / "balance.yaml"
    policy.write_text(BALANCE_POLICY)
    threaded_engine = load(policy, ledger=RedisLedger(url=redis_server.url, prefix=redis_prefix, balances_max_age_s=0))
    params = {"model": "claude-opus-5", "max_tokens": 100, "messages": [{"role": "user", "content": "Hi"}]}

    async def main() -> None:
        engine = load(policy, ledger=AsyncRedisLedger(url=redis_server.url, prefix=redis_prefix, balances_max_age_s=0))
        assert (await engine.adecide(params)).rule == "plenty-left"
        # Another worker of the fleet spends $1.20 of the premium budget (fast is 2x: the premium is the standard cost).
        spender = threaded_engine.decide(params)
        threaded_engine.settle(spender, {"input_tokens": 40_000, "output_tokens": 40_000, "speed": "fast"})
        after = await engine.adecide(params)
        assert (after.speed, after.rule) == ("standard", "default")
        await engine.ledger.close()

    asyncio.run(main())
    threaded_engine.ledger.close()


def test_stickiness_is_remembered_after_the_awaited_reservation(redis_server: RedisServer, redis_prefix: str) -> None:
    async def main() -> None:
        engine = load(DEFAULT, ledger=AsyncRedisLedger(url=redis_server.url, prefix=redis_prefix))
        first = await engine.adecide(FAST_CHAT, {**WAITING, "conversation_id": "c-1"})
        assert first.speed == "fast"
        later = await engine.adecide(FAST_CHAT, {"interactive": False, "conversation_id": "c-1"})
        assert (later.speed, later.rule) == ("fast", "sticky")
        await engine.ledger.close()

    asyncio.run(main())


def test_unreachable_redis_decides_standard_and_journals_the_settlement(tmp_path: Path, telemetry: Any) -> None:
    policy = fleet_policy(tmp_path / "fleet.yaml")  # its all_spend budget counts standard spend too

    async def main() -> None:
        ledger = AsyncRedisLedger(url=f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.2, backoff_base_s=5, backoff_max_s=5)
        engine = load(policy, ledger=ledger)
        decision = await engine.adecide(FAST_CHAT, {"interactive": True})
        assert (decision.speed, decision.outcome, decision.forced_by) == ("standard", "downgraded", "state_unavailable")
        assert "state_unavailable" in decision.guardrails
        settlement = await engine.asettle(decision, {**USAGE, "speed": "standard"})
        assert settlement.first and ledger.journal_size == 1  # kept for when Redis answers again
        await ledger.close()

    asyncio.run(main())
    events = [p.attributes for p in telemetry.metrics()["policy_engine.events"]]
    assert {"policy_engine.event": "policy_engine.state_unavailable"} in events
    [span] = telemetry.spans("policy_engine.decide")[-1:]
    assert span.attributes["policy_engine.outcome"] == "downgraded"


def test_the_sdk_middleware_refuses_an_async_ledger_with_what_to_use(redis_server: RedisServer, redis_prefix: str) -> None:
    from policy_engine.integrations.anthropic import FastModePolicy
    from policy_engine.integrations.httpx import FastModeTransport

    engine = load(DEFAULT, ledger=AsyncRedisLedger(url=redis_server.url, prefix=redis_prefix))
    with pytest.raises(TypeError, match="synchronous ledger.*RedisLedger"):
        FastModePolicy(engine)
    with pytest.raises(TypeError, match="synchronous ledger.*RedisLedger"):
        FastModeTransport(engine)
