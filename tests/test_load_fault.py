"""Load and fault tests: many processes share one budget; Redis dies mid-run; a policy goes bad mid-run.

Workers are real processes (multiprocessing, spawn) running the real engine against
a real redis-server or a real SQLite file. Each worker reports what it settled; the
store's totals must equal the sum to the micro-dollar, and no budget may be over.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from _redis import RedisServer, fleet_policy

OPUS = "claude-opus-5"
REQUEST: dict[str, Any] = {"model": OPUS, "max_tokens": 1000, "messages": [{"role": "user", "content": "Hello"}]}


def limits(requests: int) -> tuple[int, int]:
    """Budgets (micro-dollars) that `requests` requests exhaust: fast about halfway, everything near the end.

    Half the requests want fast (worst case $0.0501, about $0.025 actual), the rest cost about $0.0125.
    """
    return requests * 6_700, requests * 12_000


PROCESSES, THREADS, REQUESTS = 4, 8, 2_000
ABANDON_EVERY, RELEASE_EVERY = 97, 89
"""Every 97th request is abandoned (never settled nor released) and every 89th released unsent."""


def make_ledger(kind: str, target: str, **options: Any) -> Any:
    if kind == "redis":
        from policy_engine.ledger.redis import RedisLedger

        return RedisLedger(url=target, timeout_s=options.get("timeout_s", 1.0), backoff_base_s=0.05, backoff_max_s=0.2)
    from policy_engine.ledger.sqlite import SqliteLedger

    return SqliteLedger(target)


def worker(kind: str, target: str, policy: str, threads: int, requests: int, seed: int, pace_s: float,
           results: Any, started: Any) -> None:
    """One API worker process: `threads` threads each deciding, sending (pretend) and settling `requests`."""
    from policy_engine.decide import load
    from policy_engine.errors import CeilingExceeded

    ledger = make_ledger(kind, target)
    engine = load(policy, ledger=ledger, reservation_ttl_s=600)
    totals: dict[str, Any] = {"fast": 0, "all": 0, "decisions": 0, "fast_decisions": 0, "rejected": 0, "abandoned": 0,
                              "abandoned_unheld": 0, "released": 0, "unavailable": 0, "unavailable_cost": 0, "downgraded": 0,
                              "errors": []}
    lock = threading.Lock()

    def run(t: int) -> None:
        rng = random.Random(seed * 1000 + t)
        mine = dict.fromkeys(("fast", "all", "decisions", "fast_decisions", "rejected", "abandoned", "abandoned_unheld",
                              "released", "unavailable", "unavailable_cost", "downgraded"), 0)
        try:
            for i in range(requests):
                try:
                    decision = engine.decide(REQUEST, {"interactive": rng.random() < 0.5}, input_tokens=10)
                except CeilingExceeded:
                    mine["rejected"] += 1
                    continue
                mine["decisions"] += 1
                mine["fast_decisions"] += decision.speed == "fast"
                unavailable = "state_unavailable" in decision.guardrails
                mine["unavailable"] += unavailable
                mine["downgraded"] += decision.forced_by == "fast_spend"
                if i % ABANDON_EVERY == 0:
                    mine["abandoned"] += 1  # the worker "crashed" mid-request: the reservation must expire
                    mine["abandoned_unheld"] += unavailable  # may hold nothing
                    continue
                if i % RELEASE_EVERY == 0:
                    engine.release(decision)
                    mine["released"] += 1
                    continue
                # The response never costs more than the worst case reserved (input counted exactly).
                usage = {"input_tokens": 10, "output_tokens": rng.randint(0, 1000), "speed": decision.speed}
                settlement = engine.settle(decision, usage)
                mine["all"] += settlement.cost_micro
                if settlement.speed == "fast":
                    mine["fast"] += settlement.cost_micro
                if t == 0 and i == requests // 4:
                    started.set()  # a quarter of the way: the test may now break things
                if unavailable:
                    mine["unavailable_cost"] += settlement.cost_micro
                if pace_s:
                    time.sleep(pace_s)
        except Exception as exc:  # reported, and the test fails on it
            import traceback

            with lock:
                totals["errors"].append(f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
            started.set()
        with lock:
            for key, value in mine.items():
                totals[key] += value

    pool = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    if kind == "redis":
        deadline = time.monotonic() + 20
        while ledger.journal_size and time.monotonic() < deadline:
            time.sleep(0.05)
        totals["journal_left"] = ledger.journal_size
        totals["journaled"] = ledger.journaled_total
        totals["journal_overflow"] = ledger.journal_overflow
    ledger.close()
    results.put(totals)


def run_workers(kind: str, target: str, policy: Path, processes: int, threads: int, requests: int,
                pace_s: float = 0.0, during: Any = None) -> list[dict[str, Any]]:
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    started = [context.Event() for _ in range(processes)]
    procs = [context.Process(target=worker, args=(kind, target, str(policy), threads, requests, p, pace_s, results, started[p]))
             for p in range(processes)]
    for proc in procs:
        proc.start()
    if during is not None:
        for event in started:
            assert event.wait(60), "a worker never got going"
        during()
    reports = [results.get(timeout=240) for _ in procs]
    for proc in procs:
        proc.join(timeout=30)
        assert proc.exitcode == 0, f"a worker process died with exit code {proc.exitcode}"
    for report in reports:
        assert report["errors"] == [], report["errors"][:5]
    return reports


def scopes(requests: int, budgets: tuple[int, int] | None = None) -> tuple[Any, Any]:
    from datetime import datetime, timezone

    from policy_engine.ledger import Scope, window_bounds

    window, _, end = window_bounds("day", "UTC", datetime.now(timezone.utc))
    fast, every = budgets or limits(requests)
    return (Scope("fast_spend", "global", window, fast, end.timestamp()),
            Scope("all_spend", "global", window, every, end.timestamp()))


def check_totals(ledger: Any, reports: list[dict[str, Any]], processes: int, threads: int, requests: int,
                 budgets: tuple[int, int] | None = None) -> None:
    fast_scope, all_scope = scopes(processes * threads * requests, budgets)
    abandoned = sum(r["abandoned"] for r in reports)
    unheld = sum(r["abandoned_unheld"] for r in reports)
    # Every reservation was settled, released or abandoned; the abandoned ones, and only they, expire.
    # (One decided during an outage may or may not hold anything: its reserve's reply was lost.)
    assert abandoned - unheld <= ledger.expire(time.time() + 601) <= abandoned
    fast, every = ledger.balances([fast_scope, all_scope])
    assert (fast.reserved, every.reserved) == (0, 0)
    assert fast.spent == sum(r["fast"] for r in reports)  # exact, to the micro-dollar
    assert every.spent == sum(r["all"] for r in reports)
    assert fast.spent <= fast.limit  # never over
    # Standard requests are never blocked while the state is unreachable (on_state_unavailable:
    # standard), so a budget counting all spend can be passed by exactly what they cost; no more.
    assert every.spent <= every.limit + sum(r["unavailable_cost"] for r in reports)
    assert sum(r["decisions"] + r["rejected"] for r in reports) == processes * threads * requests
    # The fast budget was really contended: fast requests ran until it ran out, then were downgraded.
    assert sum(r["fast_decisions"] for r in reports) > 0 and sum(r["downgraded"] for r in reports) > 0


def policy(tmp_path: Path, requests: int, budgets: tuple[int, int] | None = None) -> Path:
    fast, every = budgets or limits(requests)
    return fleet_policy(tmp_path / "shared.yaml", fast_usd=fast / 10**6, all_usd=every / 10**6)


@pytest.fixture()
def redis_store(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.cleanup()


@pytest.fixture()
def durable_redis_store(tmp_path: Path) -> Iterator[RedisServer]:
    """fsync on every write, as a deployment that must survive a crash runs it."""
    server = RedisServer(tmp_path / "redis", persistent=True).start()
    yield server
    server.cleanup()


def test_processes_share_one_budget_through_redis(redis_store: RedisServer, tmp_path: Path) -> None:
    reports = run_workers("redis", redis_store.url, policy(tmp_path, PROCESSES * THREADS * REQUESTS), PROCESSES, THREADS, REQUESTS)
    ledger = make_ledger("redis", redis_store.url)
    check_totals(ledger, reports, PROCESSES, THREADS, REQUESTS)
    assert sum(r["rejected"] for r in reports) > 0  # and then everything ran out
    assert sum(r["unavailable"] + r["journaled"] for r in reports) == 0
    ledger.close()


def test_processes_share_one_budget_through_sqlite(tmp_path: Path) -> None:
    path = str(tmp_path / "ledger.db")
    requests = PROCESSES * THREADS * SQLITE_REQUESTS
    reports = run_workers("sqlite", path, policy(tmp_path, requests), PROCESSES, THREADS, SQLITE_REQUESTS)
    ledger = make_ledger("sqlite", path)
    check_totals(ledger, reports, PROCESSES, THREADS, SQLITE_REQUESTS)
    ledger.close()


SQLITE_REQUESTS = int(os.environ.get("PE_SQLITE_LOAD_REQUESTS", REQUESTS))
"""Per thread: the full 2,000 by default (64,000 requests, about half a minute here: SqliteLedger
commits the calls of a process's threads together and processes take turns through a lock file).
PE_SQLITE_LOAD_REQUESTS=150 makes a quick run."""


def test_redis_killed_and_restarted_mid_run(durable_redis_store: RedisServer, tmp_path: Path) -> None:
    """No overspend, no crash, and every settlement journaled during the outage arrives after it."""

    def outage() -> None:
        durable_redis_store.kill()
        time.sleep(1.0)
        durable_redis_store.start()  # the append-only file brings the budgets back

    processes, threads, requests = 2, 4, 800
    # Fast runs out about halfway; the budget for all spend stays out of the way (standard requests
    # during the outage are not blocked, so it would be passed by what they cost: asserted below).
    budgets = (13_000_000, 10_000_000_000)
    shared = policy(tmp_path, 0, budgets)
    reports = run_workers("redis", durable_redis_store.url, shared, processes, threads, requests, pace_s=0.001, during=outage)
    assert sum(r["unavailable"] for r in reports) > 0  # requests ran through the outage, decided standard
    assert sum(r["journaled"] for r in reports) > 0
    assert [(r["journal_left"], r["journal_overflow"]) for r in reports] == [(0, 0)] * processes
    ledger = make_ledger("redis", durable_redis_store.url)
    check_totals(ledger, reports, processes, threads, requests, budgets)
    ledger.close()


def test_a_policy_replaced_by_an_invalid_one_while_requests_flow(tmp_path: Path) -> None:
    """The old version keeps deciding through a bad deploy; no request fails or sees the bad text."""
    from test_reload import BROKEN, policy_text, version, write

    from policy_engine.reload import ReloadingEngine

    path = tmp_path / "live.yaml"
    path.write_text(policy_text("fast"))
    seen: list[tuple[float, str]] = []
    errors: list[str] = []
    stop = threading.Event()
    engine = ReloadingEngine(path, poll_interval_s=0.02)

    def traffic() -> None:
        while not stop.is_set():
            try:
                started = time.monotonic()
                decision = engine.decide(REQUEST, {"interactive": True}, input_tokens=10)
                engine.settle(decision, {"input_tokens": 10, "output_tokens": 5, "speed": decision.speed})
                seen.append((started, decision.policy_version))
            except Exception as exc:  # noqa: BLE001 - any failure is the test failing
                errors.append(repr(exc))

    def until(predicate: Any) -> float:
        deadline = time.monotonic() + 10
        while not predicate():
            assert time.monotonic() < deadline, "timed out"
            time.sleep(0.01)
        return time.monotonic()

    pool = [threading.Thread(target=traffic) for _ in range(4)]
    for thread in pool:
        thread.start()
    try:
        time.sleep(0.2)
        write(path, policy_text("standard"))
        until(lambda: engine.versions["hot"] == version(policy_text("standard")))
        broken_at = time.monotonic()
        write(path, BROKEN)
        until(lambda: engine.last_error is not None)
        time.sleep(0.3)  # requests keep flowing on the old version
        fixed_at = time.monotonic()
        write(path, policy_text("fast", limit="50"))
        swapped_at = until(lambda: engine.versions["hot"] == version(policy_text("fast", limit="50")))
        time.sleep(0.1)
    finally:
        stop.set()
        for thread in pool:
            thread.join()
        engine.close()
    assert errors == []
    valid = {version(policy_text("fast")), version(policy_text("standard")), version(policy_text("fast", limit="50"))}
    assert {v for _, v in seen} == valid  # every version that loaded decided; the broken one never did
    during = [v for t, v in seen if broken_at < t < fixed_at]
    assert during and set(during) == {version(policy_text("standard"))}
    assert any(t > swapped_at for t, _ in seen)
