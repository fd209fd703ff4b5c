"""One suite, every ledger backend: memory, SQLite and Redis must not drift apart.

Each test runs against each backend through the `Ledger` interface only, with a
controllable clock, so expiry is tested without sleeping. The Redis backends run
against a real private redis-server (tests/_redis.py); SQLite against a real file.
The asyncio Redis ledger (`AsyncLedger`) runs the same tests through `OnALoop`, which
awaits each call on an event loop of its own: test threads become concurrent coroutines.
"""

from __future__ import annotations

import asyncio
import importlib.util
import random
import threading
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest

from _redis import redis_prefix, redis_server  # noqa: F401  (pytest fixtures)
from policy_engine.ledger import AsyncLedger, Balance, Charge, Ledger, MemoryLedger, ReserveResult, Scope

HAS_SQLITE = importlib.util.find_spec("policy_engine.ledger.sqlite") is not None
BACKENDS = ["memory", "sqlite", "redis", "redis-asyncio"]
T = TypeVar("T")


class EventLoopThread:
    """An event loop running in a thread of its own, for sync code to await on."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=60)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()


class OnALoop(Ledger):
    """An `AsyncLedger` behind the `Ledger` interface: each call is awaited on `loop`."""

    def __init__(self, ledger: AsyncLedger, loop: EventLoopThread) -> None:
        self.ledger, self._loop = ledger, loop

    def balances(self, scopes: Sequence[Scope]) -> list[Balance]:
        return self._loop.run(self.ledger.balances(scopes))

    def reserve(self, reservation_id: str, charges: Sequence[Charge], *, ttl_s: float) -> ReserveResult:
        return self._loop.run(self.ledger.reserve(reservation_id, charges, ttl_s=ttl_s))

    def settle(self, reservation_id: str, charges: Sequence[Charge]) -> bool:
        return self._loop.run(self.ledger.settle(reservation_id, charges))

    def release(self, reservation_id: str) -> bool:
        return self._loop.run(self.ledger.release(reservation_id))

    def expire(self, now: float | None = None) -> int:
        return self._loop.run(self.ledger.expire(now))

    def close(self) -> None:
        self._loop.run(self.ledger.close())


class Clock:
    """Near the real time: Redis also expires keys by its own clock, and must not drop live ones."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def make_sqlite(path: Path, clock: Callable[[], float]) -> Ledger:
    from policy_engine.ledger.sqlite import SqliteLedger  # imported, never skipped, once it exists

    return SqliteLedger(path, clock=clock)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Callable[[], Ledger], Clock]]:
    """A factory of ledgers sharing one store (two instances = two processes), and its clock."""
    clock = Clock()
    made: list[Ledger] = []
    if request.param == "memory":
        shared = MemoryLedger(clock=clock)

        def factory() -> Ledger:
            return shared  # one process's ledger: every "instance" is the same object
    elif request.param == "sqlite":
        if not HAS_SQLITE:
            pytest.skip("policy_engine/ledger/sqlite.py does not exist yet")

        def factory() -> Ledger:
            made.append(make_sqlite(tmp_path / "ledger.db", clock))
            return made[-1]
    elif request.param == "redis":
        server = request.getfixturevalue("redis_server")
        prefix = request.getfixturevalue("redis_prefix")
        from policy_engine.ledger.redis import RedisLedger

        def factory() -> Ledger:
            made.append(RedisLedger(url=server.url, prefix=prefix, clock=clock, timeout_s=5.0))
            return made[-1]
    else:
        server = request.getfixturevalue("redis_server")
        prefix = request.getfixturevalue("redis_prefix")
        from policy_engine.ledger.redis import AsyncRedisLedger

        loop = EventLoopThread()
        request.addfinalizer(loop.stop)  # after the ledgers are closed (finalizers run last-in first-out)

        def factory() -> Ledger:
            made.append(OnALoop(AsyncRedisLedger(url=server.url, prefix=prefix, clock=clock, timeout_s=5.0), loop))
            return made[-1]
    yield factory, clock
    for ledger in made:
        ledger.close()


@pytest.fixture()
def ledger(backend: tuple[Callable[[], Ledger], Clock]) -> Ledger:
    return backend[0]()


@pytest.fixture()
def clock(backend: tuple[Callable[[], Ledger], Clock]) -> Clock:
    return backend[1]


def scope(budget: str = "b", key: str = "k", limit: int = 1_000, window: str = "day:2026-03-02@UTC") -> Scope:
    return Scope(budget, key, window, limit, time.time() + 86_400)


def state(ledger: Ledger, *scopes: Scope) -> list[tuple[int, int]]:
    return [(b.spent, b.reserved) for b in ledger.balances(list(scopes))]


def test_unknown_scopes_are_empty(ledger: Ledger) -> None:
    [balance] = ledger.balances([scope(limit=500)])
    assert (balance.spent, balance.reserved, balance.limit, balance.remaining) == (0, 0, 500, 500)


def test_reserve_is_all_or_nothing(ledger: Ledger) -> None:
    small, large = scope("small", limit=100), scope("large", limit=10_000)
    first = ledger.reserve("r1", [(large, 80), (small, 80)], ttl_s=60)
    assert first.ok and first.failed is None
    assert [(b.spent, b.reserved, b.limit) for b in first.balances] == [(0, 80, 10_000), (0, 80, 100)]
    second = ledger.reserve("r2", [(large, 30), (small, 30)], ttl_s=60)
    assert not second.ok and second.failed == 1
    # As it stood when it did not fit, for every charged scope:
    assert [(b.spent, b.reserved) for b in second.balances] == [(0, 80), (0, 80)]
    assert state(ledger, large, small) == [(0, 80), (0, 80)]  # the large scope took nothing either


def test_the_first_scope_that_does_not_fit_is_reported(ledger: Ledger) -> None:
    a, b, c = scope("a", limit=10), scope("b", limit=10), scope("c", limit=10)
    result = ledger.reserve("r1", [(a, 5), (b, 11), (c, 11)], ttl_s=60)
    assert not result.ok and result.failed == 1
    assert state(ledger, a, b, c) == [(0, 0)] * 3


def test_exactly_the_limit_fits_and_one_more_does_not(ledger: Ledger) -> None:
    s = scope(limit=1_000)
    assert ledger.reserve("r1", [(s, 600)], ttl_s=60).ok
    assert not ledger.reserve("r2", [(s, 401)], ttl_s=60).ok
    assert ledger.reserve("r3", [(s, 400)], ttl_s=60).ok
    assert ledger.balances([s])[0].remaining == 0


def test_a_zero_charge_always_fits(ledger: Ledger) -> None:
    full, empty = scope("full", limit=100), scope("empty", limit=0)
    assert ledger.reserve("r1", [(full, 100)], ttl_s=60).ok
    assert ledger.settle("r1", [(full, 150)])  # actual cost above the reservation: spend is spend
    result = ledger.reserve("r2", [(full, 0), (empty, 0)], ttl_s=60)
    assert result.ok
    assert [(b.spent, b.reserved) for b in result.balances] == [(150, 0), (0, 0)]
    assert not ledger.reserve("r3", [(full, 1)], ttl_s=60).ok


def test_settle_replaces_the_reservation_and_is_idempotent(ledger: Ledger) -> None:
    s, t = scope("s"), scope("t")
    ledger.reserve("r1", [(s, 500), (t, 300)], ttl_s=60)
    assert ledger.settle("r1", [(s, 123), (t, 45)]) is True
    assert ledger.settle("r1", [(s, 123), (t, 45)]) is False
    assert ledger.settle("r1", [(s, 999), (t, 999)]) is False  # no change, whatever the amounts
    assert state(ledger, s, t) == [(123, 0), (45, 0)]


def test_settling_without_a_reservation_still_records_the_spend(ledger: Ledger) -> None:
    s = scope()
    assert ledger.settle("never-reserved", [(s, 70)])
    assert state(ledger, s) == [(70, 0)]
    assert not ledger.settle("never-reserved", [(s, 70)])


def test_release_frees_and_reports(ledger: Ledger) -> None:
    s = scope()
    ledger.reserve("r1", [(s, 500)], ttl_s=60)
    assert ledger.release("r1") is True
    assert ledger.release("r1") is False
    assert ledger.release("unknown") is False
    assert state(ledger, s) == [(0, 0)]
    ledger.reserve("r2", [(s, 500)], ttl_s=60)
    ledger.settle("r2", [(s, 10)])
    assert ledger.release("r2") is False  # settled: nothing left to release
    assert state(ledger, s) == [(10, 0)]


def test_reusing_a_reservation_id_is_an_error(ledger: Ledger) -> None:
    s = scope()
    ledger.reserve("r1", [(s, 1)], ttl_s=60)
    with pytest.raises(ValueError, match="already used"):
        ledger.reserve("r1", [(s, 1)], ttl_s=60)
    ledger.settle("r1", [(s, 1)])
    with pytest.raises(ValueError, match="already used"):
        ledger.reserve("r1", [(s, 1)], ttl_s=60)
    assert state(ledger, s) == [(1, 0)]


def test_ids_that_hold_nothing_can_be_used_again(ledger: Ledger) -> None:
    s = scope(limit=10)
    assert not ledger.reserve("r1", [(s, 11)], ttl_s=60).ok
    assert ledger.reserve("r1", [(s, 9)], ttl_s=60).ok  # the engine retries a downgrade under the same id
    assert ledger.release("r1")
    assert ledger.reserve("r1", [(s, 5)], ttl_s=60).ok
    assert state(ledger, s) == [(0, 5)]


def test_abandoned_reservations_expire_on_their_own(ledger: Ledger, clock: Clock) -> None:
    s = scope(limit=1_000)
    ledger.reserve("r1", [(s, 900)], ttl_s=30)
    assert not ledger.reserve("r2", [(s, 200)], ttl_s=30).ok
    clock.now += 29
    assert not ledger.reserve("r3", [(s, 200)], ttl_s=30).ok
    clock.now += 2
    assert ledger.reserve("r4", [(s, 200)], ttl_s=30).ok  # no expire() call needed
    assert state(ledger, s) == [(0, 200)]
    assert ledger.release("r1") is False


def test_expire_counts_what_it_dropped(ledger: Ledger, clock: Clock) -> None:
    s, t = scope("s"), scope("t")
    ledger.reserve("short", [(s, 100), (t, 100)], ttl_s=10)
    ledger.reserve("long", [(s, 200)], ttl_s=100)
    assert ledger.expire() == 0
    assert ledger.expire(clock.now + 11) == 1
    assert state(ledger, s, t) == [(0, 200), (0, 0)]
    clock.now += 101
    assert ledger.expire() == 1
    assert ledger.expire() == 0
    assert state(ledger, s, t) == [(0, 0), (0, 0)]


def test_a_late_settlement_after_expiry_still_counts(ledger: Ledger, clock: Clock) -> None:
    s = scope(limit=1_000)
    ledger.reserve("r1", [(s, 900)], ttl_s=30)
    clock.now += 31
    assert ledger.expire() == 1
    assert ledger.reserve("r2", [(s, 200)], ttl_s=30).ok
    assert ledger.settle("r1", [(s, 50)])  # the request finished after all: its money was spent
    assert not ledger.settle("r1", [(s, 50)])
    assert state(ledger, s) == [(50, 200)]


def test_scopes_are_independent(ledger: Ledger) -> None:
    today, tomorrow = scope(limit=100), scope(limit=100, window="day:2026-03-03@UTC")
    other_key, other_budget = scope(key="other", limit=100), scope(budget="other", limit=100)
    assert ledger.reserve("r1", [(today, 100)], ttl_s=60).ok
    for i, s in enumerate((tomorrow, other_key, other_budget)):
        assert ledger.reserve(f"r{i + 2}", [(s, 100)], ttl_s=60).ok
    assert state(ledger, today, tomorrow, other_key, other_budget) == [(0, 100)] * 4


def test_two_instances_share_one_budget(backend: tuple[Callable[[], Ledger], Clock]) -> None:
    factory, _ = backend
    first, second = factory(), factory()
    s = scope(limit=1_000)
    assert first.reserve("a", [(s, 600)], ttl_s=60).ok
    assert not second.reserve("b", [(s, 600)], ttl_s=60).ok
    assert second.settle("a", [(s, 100)])  # settled by another worker than the one that reserved
    assert not first.settle("a", [(s, 100)])
    assert second.reserve("b", [(s, 600)], ttl_s=60).ok
    assert state(second, s) == [(100, 600)]
    assert first.release("b")
    assert state(factory(), s) == [(100, 0)]


def test_exact_totals_and_no_overspend_under_threads(backend: tuple[Callable[[], Ledger], Clock]) -> None:
    factory, _ = backend
    ledger = factory()
    shared, roomy = scope("shared", limit=200_000), scope("roomy", limit=10**12)
    threads, per_thread = 8, 250
    settled = [0] * threads
    granted = [0] * threads

    def work(t: int) -> None:
        rng = random.Random(t)
        for i in range(per_thread):
            rid = f"{t}-{i}"
            worst = rng.randint(1, 2_000)
            result = ledger.reserve(rid, [(roomy, worst), (shared, worst)], ttl_s=600)
            if not result.ok:
                assert result.failed == 1
                continue
            granted[t] += 1
            if i % 10 == 0:
                assert ledger.release(rid)
                continue
            cost = rng.randint(0, worst)  # the actual cost never exceeds the worst case
            assert ledger.settle(rid, [(roomy, cost), (shared, cost)])
            settled[t] += cost

    pool = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    total = sum(settled)
    assert 0 < sum(granted) < threads * per_thread  # the shared limit was actually contended
    assert state(ledger, roomy, shared) == [(total, 0), (total, 0)]
    assert state(factory(), roomy, shared) == [(total, 0), (total, 0)]  # a fresh view agrees
    assert total <= shared.limit
