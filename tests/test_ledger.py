"""The in-memory ledger and calendar windows. Backend-neutral semantics live in the conformance suite."""

from __future__ import annotations

import threading
from datetime import datetime, timezone

import pytest

from policy_engine.ledger import MemoryLedger, Scope, window_bounds


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def scope(budget: str = "b", key: str = "k", limit: int = 1_000) -> Scope:
    return Scope(budget, key, "day:2026-03-02@UTC", limit, 2e9)


def test_reserve_is_all_or_nothing() -> None:
    ledger = MemoryLedger()
    small, large = scope("small", limit=100), scope("large", limit=10_000)
    assert ledger.reserve("r1", [(large, 80), (small, 80)], ttl_s=60).ok
    result = ledger.reserve("r2", [(large, 30), (small, 30)], ttl_s=60)
    assert not result.ok and result.failed == 1
    assert [b.reserved for b in ledger.balances([large, small])] == [80, 80]


def test_settle_replaces_the_reservation_and_is_idempotent() -> None:
    ledger = MemoryLedger()
    s = scope()
    ledger.reserve("r1", [(s, 500)], ttl_s=60)
    assert ledger.settle("r1", [(s, 123)])
    assert not ledger.settle("r1", [(s, 123)])
    [balance] = ledger.balances([s])
    assert (balance.spent, balance.reserved, balance.remaining) == (123, 0, 877)


def test_release_frees_and_reports() -> None:
    ledger = MemoryLedger()
    s = scope()
    ledger.reserve("r1", [(s, 500)], ttl_s=60)
    assert ledger.release("r1") and not ledger.release("r1")
    assert ledger.balances([s])[0].remaining == 1_000


def test_unsettled_reservations_expire_but_late_settlements_still_count() -> None:
    clock = Clock()
    ledger = MemoryLedger(clock=clock)
    s = scope()
    ledger.reserve("r1", [(s, 900)], ttl_s=30)
    assert not ledger.reserve("r2", [(s, 200)], ttl_s=30).ok
    clock.now += 31
    assert ledger.expire() == 1
    assert ledger.reserve("r2", [(s, 200)], ttl_s=30).ok
    assert ledger.settle("r1", [(s, 50)])  # the request finished after all: its money was spent
    assert ledger.balances([s])[0].spent == 50


def test_reusing_a_reservation_id_is_an_error() -> None:
    ledger = MemoryLedger()
    ledger.reserve("r1", [(scope(), 1)], ttl_s=60)
    with pytest.raises(ValueError, match="already used"):
        ledger.reserve("r1", [(scope(), 1)], ttl_s=60)


def test_exact_totals_under_threads() -> None:
    ledger = MemoryLedger()
    s = scope(limit=10**12)
    per_thread, threads = 2_000, 8

    def work(t: int) -> None:
        for i in range(per_thread):
            rid = f"{t}-{i}"
            assert ledger.reserve(rid, [(s, 997)], ttl_s=60).ok
            ledger.settle(rid, [(s, (i % 7) + 1)])

    pool = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    expected = threads * sum((i % 7) + 1 for i in range(per_thread))
    [balance] = ledger.balances([s])
    assert (balance.spent, balance.reserved) == (expected, 0)


def test_a_limit_is_never_exceeded_under_contention() -> None:
    ledger = MemoryLedger()
    s = scope(limit=10_000)
    granted = []
    lock = threading.Lock()

    def work(t: int) -> None:
        for i in range(500):
            if ledger.reserve(f"{t}-{i}", [(s, 70)], ttl_s=60).ok:
                with lock:
                    granted.append(1)

    pool = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    assert len(granted) == 10_000 // 70
    assert ledger.balances([s])[0].reserved == 70 * (10_000 // 70)


@pytest.mark.parametrize(
    ("window", "tz", "now", "label", "start", "end"),
    [
        ("day", "UTC", "2026-03-02T23:59:59+00:00", "day:2026-03-02@UTC", "2026-03-02T00:00:00+00:00", "2026-03-03T00:00:00+00:00"),
        ("day", "America/New_York", "2026-03-02T03:00:00+00:00", "day:2026-03-01@America/New_York",
         "2026-03-01T00:00:00-05:00", "2026-03-02T00:00:00-05:00"),
        # Spring forward: the New York day of 2026-03-08 has 23 hours.
        ("day", "America/New_York", "2026-03-08T12:00:00+00:00", "day:2026-03-08@America/New_York",
         "2026-03-08T00:00:00-05:00", "2026-03-09T00:00:00-04:00"),
        ("hour", "UTC", "2026-03-02T10:30:00+00:00", "hour:2026-03-02T10@UTC", "2026-03-02T10:00:00+00:00", "2026-03-02T11:00:00+00:00"),
        ("week", "UTC", "2026-03-04T10:00:00+00:00", "week:2026-W10@UTC", "2026-03-02T00:00:00+00:00", "2026-03-09T00:00:00+00:00"),
        ("month", "Europe/Paris", "2026-12-31T23:30:00+00:00", "month:2027-01@Europe/Paris",
         "2027-01-01T00:00:00+01:00", "2027-02-01T00:00:00+01:00"),
    ],
)
def test_window_bounds(window: str, tz: str, now: str, label: str, start: str, end: str) -> None:
    got_label, got_start, got_end = window_bounds(window, tz, datetime.fromisoformat(now))  # type: ignore[arg-type]
    assert got_label == label
    assert got_start == datetime.fromisoformat(start) and got_end == datetime.fromisoformat(end)
    assert got_start.tzinfo is not None and got_end > got_start
    assert datetime.fromisoformat(now) < got_end.astimezone(timezone.utc)
