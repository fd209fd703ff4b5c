"""Reservation and settlement against policies/default.yaml: the speed the response reports, exact totals.

claude-opus-4-6 rates per million tokens: standard $5 in / $25 out; fast $30 / $150
up to 200K total input tokens, $60 / $225 above; cache writes 1.25x and reads 0.1x
the input rate of the speed in use. The default policy's only budget,
`daily_fast_premium`, counts the fast premium (fast cost minus standard cost).
"""

from __future__ import annotations

import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from anthropic.types import Usage
from anthropic.types.beta import BetaUsage

from policy_engine.catalog import UsageError, actual, load_catalog
from policy_engine.decide import Engine, load
from policy_engine.ledger import MemoryLedger, Scope, window_bounds

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_POLICY = ROOT / "policies" / "default.yaml"
NOON = datetime(2026, 3, 2, 12, 0, tzinfo=timezone.utc)
OPUS = "claude-opus-4-6"
HELLO: dict[str, Any] = {"model": OPUS, "max_tokens": 4096, "messages": [{"role": "user", "content": "Hello"}]}
WAITING = {"interactive": True, "latency_slo_ms": 20_000, "tenant": "acme"}
IDLE = {"interactive": False, "tenant": "acme"}
RESERVED_PREMIUM = 10 * (30 - 5) + 4096 * (150 - 25)


def scope(budget: str = "daily_fast_premium", key: str = "global", window: str = "day", tz: str = "UTC",
          limit: int = 200_000_000) -> Scope:
    period, _, end = window_bounds(window, tz, NOON)  # type: ignore[arg-type]
    return Scope(budget, key, period, limit, end.timestamp())


def balance(engine: Engine, s: Scope | None = None) -> tuple[int, int]:
    [b] = engine.ledger.balances([s or scope()])
    return b.spent, b.reserved


@pytest.fixture()
def engine() -> Engine:
    return load(DEFAULT_POLICY)


def test_fast_settled_fast_charges_the_premium(engine: Engine) -> None:
    d = engine.decide(HELLO, WAITING, now=NOON, input_tokens=10)
    assert d.speed == "fast" and balance(engine) == (0, RESERVED_PREMIUM)
    s = engine.settle(d, {"input_tokens": 12, "output_tokens": 300, "speed": "fast"})
    assert (s.cost_micro, s.speed, s.input_tokens, s.output_tokens, s.first) == (12 * 30 + 300 * 150, "fast", 12, 300, True)
    # Premium: what fast cost over what standard would have: 12 x $25 + 300 x $125 per MTok.
    assert balance(engine) == (12 * 25 + 300 * 125, 0)


def test_reserved_fast_but_the_response_ran_standard_is_billed_standard(engine: Engine) -> None:
    d = engine.decide(HELLO, WAITING, now=NOON, input_tokens=10)
    assert d.speed == "fast"
    s = engine.settle(d, {"input_tokens": 12, "output_tokens": 300, "speed": "standard"})
    assert (s.cost_micro, s.speed) == (12 * 5 + 300 * 25, "standard")
    assert balance(engine) == (0, 0)  # no premium was paid, so the premium budget is not charged


def test_usage_without_speed_is_standard(engine: Engine) -> None:
    d = engine.decide(HELLO, WAITING, now=NOON, input_tokens=10)
    assert engine.settle(d, {"input_tokens": 12, "output_tokens": 300}).cost_micro == 12 * 5 + 300 * 25
    assert balance(engine) == (0, 0)


def test_reserved_standard_but_the_response_ran_fast_is_billed_fast(engine: Engine) -> None:
    d = engine.decide(HELLO, IDLE, now=NOON, input_tokens=10)
    assert d.speed == "standard" and balance(engine) == (0, 0)
    s = engine.settle(d, {"input_tokens": 12, "output_tokens": 300, "speed": "fast"})
    assert s.cost_micro == 12 * 30 + 300 * 150
    assert balance(engine) == (12 * 25 + 300 * 125, 0)


def test_cache_tokens_are_billed_at_the_speed_that_ran(engine: Engine) -> None:
    d = engine.decide(HELLO, WAITING, now=NOON, input_tokens=10)
    usage = {"input_tokens": 12, "output_tokens": 300, "cache_creation_input_tokens": 1000,
             "cache_read_input_tokens": 2000, "speed": "fast"}
    # fast: 12 x 30 + 1000 x 37.5 + 2000 x 3 + 300 x 150; standard: 12 x 5 + 1000 x 6.25 + 2000 x 0.5 + 300 x 25.
    assert engine.settle(d, usage).cost_micro == 360 + 37_500 + 6_000 + 45_000
    assert balance(engine) == ((360 + 37_500 + 6_000 + 45_000) - (60 + 6_250 + 1_000 + 7_500), 0)


def test_over_200k_total_input_tokens_settles_at_the_higher_fast_tier(engine: Engine) -> None:
    d = engine.decide(HELLO, WAITING, now=NOON, input_tokens=10)
    s = engine.settle(d, {"input_tokens": 250_000, "output_tokens": 10_000, "speed": "fast"})
    assert s.cost_micro == 17_250_000  # 250K x $60 + 10K x $225
    d2 = engine.decide(HELLO, WAITING, now=NOON, input_tokens=10)
    # The threshold counts cached tokens too: 150K input + 100K cache reads = 250K total.
    s2 = engine.settle(d2, {"input_tokens": 150_000, "cache_read_input_tokens": 100_000, "output_tokens": 10_000,
                            "speed": "fast"})
    assert s2.cost_micro == 150_000 * 60 + 100_000 * 6 + 10_000 * 225


@pytest.mark.parametrize("decided_geo", [None, "us"])
@pytest.mark.parametrize("usage_geo", [None, "global", "us"])
@pytest.mark.parametrize("ran", ["standard", "fast"])
def test_settled_cost_and_premium_are_the_catalogs_at_the_geo_that_ran(engine: Engine, decided_geo: str | None,
                                                                     usage_geo: str | None, ran: str) -> None:
    # The decision's geo prices the usage unless the usage names its own (the US multiplier is 1.1x).
    params = {**HELLO, "inference_geo": decided_geo} if decided_geo else HELLO
    d = engine.decide(params, WAITING, now=NOON, input_tokens=10)
    assert d.speed == "fast"
    usage = {"input_tokens": 250_000, "output_tokens": 3_000, "cache_read_input_tokens": 1_000,
             "cache_creation_input_tokens": 500, "speed": ran, "inference_geo": usage_geo}
    opus = load_catalog().model(OPUS)
    geo = usage_geo or decided_geo
    cost = actual(opus, {**usage, "inference_geo": geo})
    premium = cost - actual(opus, {**usage, "speed": "standard", "inference_geo": geo}) if ran == "fast" else 0
    assert engine.settle(d, usage).cost_micro == cost
    assert balance(engine) == (premium, 0)
    assert (geo == "us") == (cost != actual(opus, {**usage, "inference_geo": None}))


def test_settle_accepts_the_sdk_usage_objects(engine: Engine) -> None:
    for usage in (BetaUsage(input_tokens=12, output_tokens=300, speed="fast"),
                  Usage(input_tokens=12, output_tokens=300, speed="fast")):
        d = engine.decide(HELLO, WAITING, now=NOON, input_tokens=10)
        assert engine.settle(d, usage).cost_micro == 12 * 30 + 300 * 150
    assert balance(engine) == (2 * (12 * 25 + 300 * 125), 0)


def test_standard_decisions_reserve_nothing_on_the_premium_budget_and_settle_in_any_order(engine: Engine) -> None:
    fast = engine.decide(HELLO, WAITING, now=NOON, input_tokens=10)
    standard = engine.decide(HELLO, IDLE, now=NOON, input_tokens=10)
    assert (fast.speed, standard.speed) == ("fast", "standard")
    assert standard.reservation_id is not None and balance(engine) == (0, RESERVED_PREMIUM)
    engine.settle(fast, {"input_tokens": 12, "output_tokens": 300, "speed": "fast"})
    assert balance(engine) == (12 * 25 + 300 * 125, 0)
    # The standard decision held nothing; settling it after the fast one owes nothing either.
    assert engine.settle(standard, {"input_tokens": 12, "output_tokens": 300}).first
    assert not engine.settle(standard, {"input_tokens": 12, "output_tokens": 300}).first
    assert balance(engine) == (12 * 25 + 300 * 125, 0)
    again = engine.decide(HELLO, IDLE, now=NOON, input_tokens=10)
    assert engine.release(again) is False  # nothing was held
    # A standard decision whose response ran fast after all is charged its premium.
    late = engine.decide(HELLO, IDLE, now=NOON, input_tokens=10)
    assert engine.settle(late, {"input_tokens": 12, "output_tokens": 300, "speed": "fast"}).first
    assert balance(engine) == (2 * (12 * 25 + 300 * 125), 0)


def test_zero_charge_reservations_balance_against_the_memory_ledger() -> None:
    # The ledger itself: a zero charge dropped after the scope's last real charge went.
    from policy_engine.ledger import MemoryLedger

    ledger = MemoryLedger()
    s = scope()
    assert ledger.reserve("a", [(s, 100)], ttl_s=60).ok
    assert ledger.reserve("b", [(s, 0)], ttl_s=60).ok
    assert ledger.settle("a", [(s, 40)])
    assert ledger.settle("b", [(s, 0)])
    assert ledger.reserve("c", [(s, 0)], ttl_s=60).ok
    assert ledger.release("c")
    [b] = ledger.balances([s])
    assert (b.spent, b.reserved) == (40, 0)


def test_settling_twice_is_a_no_op(engine: Engine) -> None:
    d = engine.decide(HELLO, WAITING, now=NOON, input_tokens=10)
    usage = {"input_tokens": 12, "output_tokens": 300, "speed": "fast"}
    first, second = engine.settle(d, usage), engine.settle(d, usage)
    assert first.first and not second.first
    assert second.cost_micro == first.cost_micro  # it still says what the response cost
    assert balance(engine) == (12 * 25 + 300 * 125, 0)


def test_a_malformed_usage_is_refused_and_the_reservation_kept(engine: Engine) -> None:
    d = engine.decide(HELLO, WAITING, now=NOON, input_tokens=10)
    with pytest.raises(UsageError, match="usage.output_tokens must be an int"):
        engine.settle(d, {"input_tokens": 12, "output_tokens": "300"})
    assert balance(engine) == (0, RESERVED_PREMIUM)
    assert engine.settle(d, {"input_tokens": 12, "output_tokens": 300, "speed": "fast"}).first


def test_release_frees_the_reservation(engine: Engine) -> None:
    d = engine.decide(HELLO, WAITING, now=NOON, input_tokens=10)
    assert engine.release(d) is True
    assert balance(engine) == (0, 0)
    assert engine.release(d) is False


def test_a_released_request_that_ran_after_all_is_still_charged(engine: Engine) -> None:
    d = engine.decide(HELLO, WAITING, now=NOON, input_tokens=10)
    engine.release(d)
    assert engine.settle(d, {"input_tokens": 12, "output_tokens": 300, "speed": "fast"}).first
    assert balance(engine) == (12 * 25 + 300 * 125, 0)
    assert engine.release(d) is False


def test_release_after_settle_does_nothing(engine: Engine) -> None:
    d = engine.decide(HELLO, WAITING, now=NOON, input_tokens=10)
    engine.settle(d, {"input_tokens": 12, "output_tokens": 300, "speed": "fast"})
    assert engine.release(d) is False
    assert balance(engine) == (12 * 25 + 300 * 125, 0)


def test_a_decision_without_budgets_settles_without_a_reservation(policy_variant: Any) -> None:
    start = "budgets:\n  - name: daily_fast_premium"
    text = DEFAULT_POLICY.read_text()
    block = text[text.index(start):text.index("stickiness:")]
    engine = load(policy_variant((block, "")))
    d = engine.decide(HELLO, WAITING, now=NOON, input_tokens=10)
    assert d.speed == "fast" and d.reservation_id is None
    s = engine.settle(d, {"input_tokens": 12, "output_tokens": 300, "speed": "fast"})
    assert s.first and s.cost_micro == 12 * 30 + 300 * 150
    assert not engine.settle(d, {"input_tokens": 12, "output_tokens": 300, "speed": "fast"}).first
    assert engine.release(d) is False


def test_unsettled_reservations_expire_after_their_ttl() -> None:
    clock = [NOON.timestamp()]
    engine = load(DEFAULT_POLICY, ledger=MemoryLedger(clock=lambda: clock[0]), reservation_ttl_s=60)
    d = engine.decide(HELLO, WAITING, now=NOON, input_tokens=10)
    clock[0] += 59
    assert engine.ledger.expire() == 0 and balance(engine) == (0, RESERVED_PREMIUM)
    clock[0] += 2
    assert engine.ledger.expire() == 1 and balance(engine) == (0, 0)
    # The response came back late after all: the spend is recorded even so.
    assert engine.settle(d, {"input_tokens": 12, "output_tokens": 300, "speed": "fast"}).first
    assert balance(engine) == (12 * 25 + 300 * 125, 0)


# --------------------------------------------------------------------------- exact totals under threads

EXTRA_BUDGETS = """budgets:
  - name: tenant_all
    key: context.tenant
    window: month
    timezone: America/New_York
    limit_usd: 1000000
    counts: all
  - name: tenant_fast
    key: context.tenant
    window: week
    limit_usd: 1000000
    counts: fast
  - name: daily_fast_premium"""

TENANTS = ("acme", "globex", "initech", "umbrella")


def _usage(i: int) -> dict[str, Any]:
    return {"input_tokens": 10 + i % 40, "output_tokens": 20 + i % 100,
            "cache_read_input_tokens": (i % 7) * 100, "speed": "standard" if i % 5 == 0 else "fast"}


@pytest.mark.parametrize("extra", [False, True], ids=["default", "default+tenant-budgets"])
def test_exact_ledger_totals_after_10000_cycles_on_8_threads(policy_variant: Any, extra: bool) -> None:
    path = policy_variant(("budgets:\n  - name: daily_fast_premium", EXTRA_BUDGETS)) if extra else DEFAULT_POLICY
    engine = load(path)
    model = load_catalog().model(OPUS)
    threads, per_thread = 8, 1250
    errors: list[BaseException] = []
    barrier = threading.Barrier(threads)

    def work(t: int) -> None:
        try:
            barrier.wait()
            for n in range(per_thread):
                i = t * per_thread + n
                params = {**HELLO, "messages": [{"role": "user", "content": f"Question {i}: " + "why? " * (i % 13)}]}
                d = engine.decide(params, {**WAITING, "tenant": TENANTS[i % 4]}, now=NOON)
                if i % 10 == 9:
                    engine.release(d)  # never sent: nothing is spent
                else:
                    engine.settle(d, _usage(i))
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not errors, errors[0]

    # The same sums, computed independently: the catalog's exact cost of each settled usage.
    premium = 0
    by_tenant_all = dict.fromkeys(TENANTS, 0)
    by_tenant_fast = dict.fromkeys(TENANTS, 0)
    for i in range(threads * per_thread):
        if i % 10 == 9:
            continue
        usage = _usage(i)
        cost = actual(model, usage)
        by_tenant_all[TENANTS[i % 4]] += cost
        if usage["speed"] == "fast":
            premium += cost - actual(model, {**usage, "speed": "standard"})
            by_tenant_fast[TENANTS[i % 4]] += cost
    assert balance(engine) == (premium, 0)
    assert 50_000_000 < premium < 200_000_000  # a real load on the budget, never over it
    if extra:
        for tenant in TENANTS:
            assert balance(engine, scope("tenant_all", tenant, "month", "America/New_York", 10**12)) == (by_tenant_all[tenant], 0)
            assert balance(engine, scope("tenant_fast", tenant, "week", "UTC", 10**12)) == (by_tenant_fast[tenant], 0)
