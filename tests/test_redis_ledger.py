"""RedisLedger and AsyncRedisLedger beyond the shared semantics: key layout and TTLs, round trips,
outages and the journal, sync and asyncio workers on one budget.

Everything runs against real redis-server processes (tests/_redis.py). Outages are
real too: a private server is killed, restarted, or paused with CLIENT PAUSE.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from _redis import RedisServer, fleet_policy, redis_prefix, redis_server  # noqa: F401  (pytest fixtures)
from policy_engine.decide import Engine, load
from policy_engine.errors import StateUnavailable
from policy_engine.ledger import Scope
from policy_engine.ledger.redis import AsyncRedisLedger, RedisLedger

OPUS = "claude-opus-5"
HELLO: dict[str, Any] = {"model": OPUS, "max_tokens": 1000, "messages": [{"role": "user", "content": "Hello"}]}
FAST_USAGE = {"input_tokens": 10, "output_tokens": 200, "speed": "fast"}
STANDARD_USAGE = {"input_tokens": 10, "output_tokens": 200, "speed": "standard"}
FAST_COST = 10 * 10 + 200 * 50  # micro-dollars: $10 / $50 per MTok in/out at fast speed
STANDARD_COST = 10 * 5 + 200 * 25


def scope(budget: str = "b", limit: int = 1_000, expires_at: float | None = None) -> Scope:
    return Scope(budget, "k", "day:2026-03-02@UTC", limit, expires_at or time.time() + 3_600)


@pytest.fixture()
def private_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A server of this test's own, to kill, pause or restart."""
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.cleanup()


def policy_file(tmp_path: Path, mode: str = "standard") -> Path:
    return fleet_policy(tmp_path / f"fleet-{mode}.yaml", mode=mode)


class RoundTrips:
    """Counts the commands clients send, through MONITOR: commands scripts run inside are not round trips."""

    def __init__(self, server: RedisServer) -> None:
        self._client = server.client()
        self._monitor = self._client.monitor()
        self._monitor.__enter__()

    def stop(self) -> list[str]:
        """The commands sent since start, in order (up to a sentinel this method sends)."""
        sentinel = f"round-trips-{time.monotonic_ns()}"
        self._client.echo(sentinel)
        seen = []
        while True:
            command = self._monitor.next_command()
            if command["client_type"] == "lua":
                continue
            if sentinel in command["command"]:
                break
            seen.append((command["client_port"], command["command"].split(" ", 1)[0]))
        self._monitor.__exit__(None, None, None)
        return [name for port, name in seen if port != command["client_port"]]  # not the sentinel's connection


def wait_for(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


# -- layout, TTLs, round trips ------------------------------------------------------------------


def test_keys_live_under_the_prefix_and_expire_after_the_window(redis_server: RedisServer, redis_prefix: str) -> None:
    ledger = RedisLedger(url=redis_server.url, prefix=redis_prefix, window_margin_s=3_600, settled_memory_s=600)
    client = redis_server.client()
    s = scope(expires_at=time.time() + 7_200)
    assert ledger.reserve("r1", [(s, 10)], ttl_s=60).ok
    ledger.reserve("r2", [(s, 10)], ttl_s=60)
    ledger.settle("r2", [(s, 4)])
    keys = {k.decode() for k in client.keys(redis_prefix + "*")}
    assert keys == {f"{redis_prefix}s:{s.id}", f"{redis_prefix}x", f"{redis_prefix}r:r1", f"{redis_prefix}r:r2",
                    f"{redis_prefix}ids"}
    assert client.get(f"{redis_prefix}ids") == b"plain"  # how scopes are named here (hash_scopes)
    assert client.get(f"{redis_prefix}s:{s.id}") == b"4 10"  # spent, reserved
    assert [m.decode() for m in client.zrange(f"{redis_prefix}x", 0, -1)] == ["r1"]  # live reservations only
    window_end_ms = (s.expires_at + 3_600) * 1000
    assert abs(client.pexpiretime(f"{redis_prefix}s:{s.id}") - window_end_ms) <= 1
    assert 0 < client.pttl(f"{redis_prefix}r:r2") <= 600_000  # settled: remembered for settled_memory_s
    # A live reservation's record lives as long as the scopes it holds amounts in, so its expiry
    # can always give them back.
    assert abs(client.pexpiretime(f"{redis_prefix}r:r1") - window_end_ms) <= 1
    other = RedisLedger(url=redis_server.url, prefix=redis_prefix + "other:")
    assert other.balances([s])[0].reserved == 0  # another prefix is another ledger
    ledger.close()
    other.close()


def test_a_window_decided_in_the_past_is_kept_for_the_margin(redis_server: RedisServer, redis_prefix: str) -> None:
    ledger = RedisLedger(url=redis_server.url, prefix=redis_prefix, window_margin_s=600)
    past = scope(expires_at=time.time() - 86_400)
    assert ledger.settle("late", [(past, 7)])
    assert 0 < redis_server.client().pttl(f"{redis_prefix}s:{past.id}") <= 600_000
    assert RedisLedger(url=redis_server.url, prefix=redis_prefix).balances([past])[0].spent == 7
    ledger.close()


def test_a_request_costs_two_round_trips(redis_server: RedisServer, redis_prefix: str, tmp_path: Path) -> None:
    ledger = RedisLedger(url=redis_server.url, prefix=redis_prefix)
    engine = load(policy_file(tmp_path), ledger=ledger)
    first = engine.decide(HELLO, {"interactive": True})  # loads the scripts, fills the cache
    engine.settle(first, FAST_USAGE)
    trips = RoundTrips(redis_server)
    for _ in range(5):
        decision = engine.decide(HELLO, {"interactive": True})
        assert decision.speed == "fast"
        engine.settle(decision, FAST_USAGE)
    assert trips.stop() == ["EVALSHA"] * 10
    spent = [b.spent for b in ledger.balances([s for _, s in decision._budget_charges])]
    assert spent == [6 * FAST_COST, 6 * FAST_COST]
    ledger.close()


def test_thousands_of_expired_reservations_never_refuse_a_reserve(redis_server: RedisServer, redis_prefix: str) -> None:
    """More reservations expire at once than one sweep takes: a reserve that does not fit sweeps them all first."""
    now = [time.time()]
    ledger = RedisLedger(url=redis_server.url, prefix=redis_prefix, clock=lambda: now[0])
    s, other = scope(limit=3_000), scope("other", limit=10**9)
    for i in range(2_500):  # more than the periodic sweep (256) and one batch of the full sweep (1,000)
        assert ledger.reserve(f"old-{i}", [(s, 1), (other, 1)], ttl_s=30).ok
    assert not ledger.reserve("big", [(s, 2_000)], ttl_s=30).ok
    now[0] += 31
    result = ledger.reserve("big", [(s, 2_000)], ttl_s=30)
    assert result.ok and [(b.spent, b.reserved) for b in result.balances] == [(0, 2_000)]
    fresh = RedisLedger(url=redis_server.url, prefix=redis_prefix, clock=lambda: now[0])
    assert [(b.spent, b.reserved) for b in fresh.balances([s, other])] == [(0, 2_000), (0, 0)]
    assert ledger.settle("old-7", [(s, 1)])  # a late settlement still counts
    assert fresh.expire(now[0] + 31) == 1 and fresh.expire(now[0] + 31) == 0
    assert redis_server.client().zcard(f"{redis_prefix}x") == 0
    ledger.close()
    fresh.close()


def test_expire_drops_more_than_one_batch(redis_server: RedisServer, redis_prefix: str) -> None:
    ledger = RedisLedger(url=redis_server.url, prefix=redis_prefix)
    s = scope(limit=10**9)
    for i in range(2_100):
        ledger.reserve(f"r{i}", [(s, 5)], ttl_s=30)
    assert ledger.expire(time.time() + 31) == 2_100
    assert ledger.balances([s])[0].reserved == 0
    assert redis_server.client().keys(f"{redis_prefix}r:*") == []  # swept records are deleted
    ledger.close()


def test_balances_are_cached_for_at_most_their_max_age(redis_server: RedisServer, redis_prefix: str) -> None:
    now = [time.time()]
    mine = RedisLedger(url=redis_server.url, prefix=redis_prefix, clock=lambda: now[0], balances_max_age_s=1.0)
    theirs = RedisLedger(url=redis_server.url, prefix=redis_prefix)
    s = scope()
    mine.reserve("a", [(s, 10)], ttl_s=600)
    theirs.reserve("b", [(s, 20)], ttl_s=600)
    assert mine.balances([s])[0].reserved == 10  # what this worker last saw, without asking
    now[0] += 1.0
    assert mine.balances([s])[0].reserved == 30
    mine.close()
    theirs.close()


def test_scripts_are_loaded_again_after_redis_forgets_them(redis_server: RedisServer, redis_prefix: str) -> None:
    ledger = RedisLedger(url=redis_server.url, prefix=redis_prefix)
    s = scope()
    assert ledger.reserve("r1", [(s, 5)], ttl_s=60).ok
    redis_server.client().script_flush()
    assert ledger.settle("r1", [(s, 3)])
    assert ledger.balances([s])[0].spent == 3
    ledger.close()


def test_a_retried_call_whose_first_attempt_ran_is_not_counted_twice(redis_server: RedisServer, redis_prefix: str) -> None:
    """Replies can be lost after the script ran; the client retries once with the same token."""
    from policy_engine.ledger.redis import _RESERVE, _SETTLE

    client = redis_server.client()
    s = scope(limit=100)
    now, exp = time.time(), time.time() + 60
    pxat = int(s.expires_at * 1000)
    reserve = [redis_prefix, "r1", repr(now), repr(exp), "tok-1", pxat, 1, 1, s.id, 60, s.limit, pxat]
    assert client.eval(_RESERVE, 0, *reserve) == [1, 0, 0, 60]
    assert client.eval(_RESERVE, 0, *reserve) == [1, 0, 0, 60]  # same token: the same success, nothing more held
    assert client.eval(_RESERVE, 0, *[*reserve[:4], "tok-2", *reserve[5:]])[0] == -1  # another call: id reused
    settle = [redis_prefix, "r1", "tok-3", 60_000, 1, s.id, 40, pxat]
    assert client.eval(_SETTLE, 0, *settle) == [1, 40, 0]
    assert client.eval(_SETTLE, 0, *settle) == [1, 40, 0]  # the retry still reports the first settle...
    assert client.eval(_SETTLE, 0, *[*settle[:2], "tok-4", *settle[3:]])[0] == 0  # ...a second settle does not
    assert client.eval(_SETTLE, 0, *settle)[0] == 1  # and the first one's token survived the second
    ledger = RedisLedger(url=redis_server.url, prefix=redis_prefix)
    [balance] = ledger.balances([s])
    assert (balance.spent, balance.reserved) == (40, 0)
    ledger.close()


def test_bad_charges_are_refused_before_anything_is_written(redis_server: RedisServer, redis_prefix: str) -> None:
    ledger = RedisLedger(url=redis_server.url, prefix=redis_prefix)
    s = scope()
    for bad in (-1, 1.5, True, "10"):
        with pytest.raises(ValueError, match="non-negative int"):
            ledger.reserve("r1", [(s, bad)], ttl_s=60)  # type: ignore[list-item]
        with pytest.raises(ValueError, match="non-negative int"):
            ledger.settle("r1", [(s, bad)])  # type: ignore[list-item]
    assert redis_server.client().keys(redis_prefix + "*") == [(redis_prefix + "ids").encode()]  # only the setting
    assert ledger.journal_size == 0
    ledger.close()


# -- outages ------------------------------------------------------------------------------------


def test_an_unreachable_redis_raises_state_unavailable_and_then_fails_fast(private_server: RedisServer) -> None:
    ledger = RedisLedger(url=private_server.url, timeout_s=0.2, backoff_base_s=0.5, backoff_max_s=0.5)
    s = scope()
    assert ledger.reserve("r1", [(s, 5)], ttl_s=60).ok
    private_server.kill()
    with pytest.raises(StateUnavailable, match="unavailable"):
        ledger.reserve("r2", [(s, 5)], ttl_s=60)
    started = time.perf_counter()
    assert ledger.balances([s])[0].reserved == 5  # what it saw a moment ago needs no connection
    for i in range(100):
        with pytest.raises(StateUnavailable, match="next attempt"):
            ledger.balances([scope(f"never-seen-{i}")])
    assert time.perf_counter() - started < 0.1  # no connection attempts while backing off
    private_server.start()
    time.sleep(0.5)
    assert ledger.reserve("r3", [(s, 5)], ttl_s=60).ok  # reconnected (the data died with the server)
    ledger.close()


def test_settlements_made_during_an_outage_arrive_after_the_restart(tmp_path: Path, telemetry: Any) -> None:
    server = RedisServer(tmp_path / "redis", persistent=True).start()
    try:
        ledger = RedisLedger(url=server.url, timeout_s=0.2, backoff_base_s=0.05, backoff_max_s=0.2)
        s = scope()
        assert ledger.reserve("r1", [(s, 500)], ttl_s=600).ok
        assert ledger.reserve("r2", [(s, 300)], ttl_s=600).ok
        server.kill()
        assert ledger.settle("r1", [(s, 120)]) is True  # journaled: the caller is never failed
        assert ledger.release("r2") is False  # journaled too: nothing freed yet
        assert ledger.settle("never-reserved", [(s, 30)])
        assert ledger.journal_size == 3
        server.start()
        wait_for(lambda: ledger.journal_size == 0)
        [balance] = RedisLedger(url=server.url).balances([s])
        assert (balance.spent, balance.reserved) == (150, 0)  # the reservations survived (AOF), then were settled
        assert not ledger.settle("r1", [(s, 120)])  # the replay counted it once
        events = [p.attributes["policy_engine.event"] for p in telemetry.metrics()["policy_engine.events"]]
        assert "policy_engine.ledger.journaled" in events
        ledger.close()
    finally:
        server.cleanup()


def test_a_full_journal_counts_and_logs_what_it_could_not_keep(private_server: RedisServer, caplog: pytest.LogCaptureFixture,
                                                               telemetry: Any) -> None:
    ledger = RedisLedger(url=private_server.url, timeout_s=0.2, journal_max=2)
    s = scope()
    private_server.kill()
    with caplog.at_level(logging.ERROR, logger="policy_engine.ledger.redis"):
        for i in range(3):
            ledger.settle(f"r{i}", [(s, 100 + i)])
    assert (ledger.journal_size, ledger.journal_overflow) == (2, 1)
    [record] = [r for r in caplog.records if "journal full" in r.message]
    assert "r2" in record.message and "b/k/day:2026-03-02@UTC=102" in record.message
    points = telemetry.metrics()["policy_engine.events"]
    assert any(p.attributes["policy_engine.event"] == "policy_engine.ledger.journal_overflow" and p.value == 1 for p in points)
    private_server.start()
    assert ledger.flush_journal() == 2
    assert ledger.balances([s])[0].spent == 100 + 101
    ledger.close()


def test_a_journal_file_outlives_the_worker(private_server: RedisServer, tmp_path: Path) -> None:
    journal = tmp_path / "ledger.journal"
    s = scope()
    worker = RedisLedger(url=private_server.url, timeout_s=0.2, journal_path=journal)
    private_server.kill()
    worker.settle("r1", [(s, 11)])
    worker.settle("r2", [(s, 22)])
    worker.close()  # Redis is still down: the entries stay in the file
    assert len(journal.read_text().splitlines()) == 2
    private_server.start()
    successor = RedisLedger(url=private_server.url, journal_path=journal)
    wait_for(lambda: successor.journal_size == 0)
    assert successor.balances([s])[0].spent == 33
    assert journal.read_text() == ""
    successor.close()


def test_a_slow_redis_times_out_into_state_unavailable(private_server: RedisServer) -> None:
    ledger = RedisLedger(url=private_server.url, timeout_s=0.1, backoff_base_s=0.05, backoff_max_s=0.05)
    s = scope(limit=1_000)
    assert ledger.balances([s])[0].reserved == 0  # connected, scripts loaded
    private_server.client().client_pause(800, all=True)
    started = time.perf_counter()
    with pytest.raises(StateUnavailable):
        ledger.reserve("r1", [(s, 600)], ttl_s=600)
    assert time.perf_counter() - started < 0.5
    ledger.settle("r1", [(s, 100)])  # the paused reserve may still run: the settle must win either way
    time.sleep(0.9)
    wait_for(lambda: ledger.journal_size == 0)
    ledger.expire()
    [balance] = RedisLedger(url=private_server.url).balances([s])
    assert (balance.spent, balance.reserved) == (100, 0)
    ledger.close()


# -- through the engine: on_state_unavailable -----------------------------------------------------


def test_the_engine_decides_standard_while_redis_is_down(tmp_path: Path, telemetry: Any) -> None:
    server = RedisServer(tmp_path / "redis", persistent=True).start()
    try:
        ledger = RedisLedger(url=server.url, timeout_s=0.2, backoff_base_s=0.05, backoff_max_s=0.2)
        engine: Engine = load(policy_file(tmp_path, "standard"), ledger=ledger)
        assert engine.decide(HELLO, {"interactive": True}).speed == "fast"  # abandoned: it will expire
        server.kill()
        decision = engine.decide(HELLO, {"interactive": True})
        assert (decision.speed, decision.outcome, decision.forced_by) == ("standard", "downgraded", "state_unavailable")
        assert "state_unavailable" in decision.guardrails and decision.errors
        assert decision.reservation_id is not None  # so its spend still reaches the ledger
        settlement = engine.settle(decision, STANDARD_USAGE)
        assert settlement.cost_micro == STANDARD_COST and ledger.journal_size == 1
        events = [p.attributes for p in telemetry.metrics()["policy_engine.events"]]
        assert {"policy_engine.event": "policy_engine.state_unavailable"} in events
        [span] = telemetry.spans("policy_engine.decide")[-1:]
        assert span.attributes["policy_engine.outcome"] == "downgraded"
        server.start()
        wait_for(lambda: ledger.journal_size == 0)
        fast_scope, all_scope = (s for _, s in decision._budget_charges)
        ledger.expire(time.time() + 3_600)
        spent = [(b.spent, b.reserved) for b in RedisLedger(url=server.url).balances([fast_scope, all_scope])]
        assert spent == [(0, 0), (STANDARD_COST, 0)]  # standard spend counted; nothing fast during the outage
        ledger.close()
    finally:
        server.cleanup()


def test_on_state_unavailable_reject_raises_a_typed_error(private_server: RedisServer, tmp_path: Path) -> None:
    ledger = RedisLedger(url=private_server.url, timeout_s=0.2)
    engine = load(policy_file(tmp_path, "reject"), ledger=ledger)
    private_server.kill()
    for context in ({"interactive": True}, {"interactive": False}):
        with pytest.raises(StateUnavailable, match="on_state_unavailable is reject") as caught:
            engine.decide(HELLO, context)
        decision = caught.value.decision
        assert decision.outcome == "rejected" and decision.forced_by == "state_unavailable"  # type: ignore[attr-defined]
        assert decision.reservation_id is None  # type: ignore[attr-defined]
    ledger.close()


@pytest.mark.parametrize("parser", ["hiredis", "redis-py"])
def test_both_wire_paths_agree(redis_server: RedisServer, redis_prefix: str, parser: str) -> None:
    ledger = RedisLedger(url=redis_server.url, prefix=redis_prefix)
    ledger._plain = parser == "redis-py"  # without hiredis installed, redis-py packs and parses
    s = scope(limit=100)
    assert ledger.reserve("r1", [(s, 60)], ttl_s=60).ok
    assert not ledger.reserve("r2", [(s, 60)], ttl_s=60).ok
    redis_server.client().script_flush()  # an error reply (NOSCRIPT) in the middle of the traffic
    with pytest.raises(ValueError, match="already used"):
        ledger.reserve("r1", [(s, 1)], ttl_s=60)
    assert ledger.settle("r1", [(s, 50)])
    assert [(b.spent, b.reserved) for b in ledger.balances([s])] == [(50, 0)]
    ledger.close()


def test_a_redis_out_of_memory_is_state_unavailable(private_server: RedisServer) -> None:
    ledger = RedisLedger(url=private_server.url, backoff_base_s=0.01, backoff_max_s=0.01)
    s = scope()
    assert ledger.reserve("r1", [(s, 5)], ttl_s=60).ok
    admin = private_server.client()
    admin.config_set("maxmemory-policy", "noeviction")
    admin.config_set("maxmemory", "1")  # every write is refused with OOM from now on
    with pytest.raises(StateUnavailable, match="OOM"):
        ledger.reserve("r2", [(s, 5)], ttl_s=60)
    assert ledger.settle("r1", [(s, 3)]) and ledger.journal_size == 1  # kept for later, not lost
    admin.config_set("maxmemory", "0")
    wait_for(lambda: ledger.journal_size == 0)
    assert ledger.balances([scope(budget="other")])[0].spent == 0
    assert RedisLedger(url=private_server.url).balances([s])[0].spent == 3
    ledger.close()


def _forked_worker(ledger: RedisLedger, s: Scope, results: Any) -> None:
    for i in range(200):
        assert ledger.reserve(f"child-{i}", [(s, 10)], ttl_s=60).ok
        ledger.settle(f"child-{i}", [(s, 3)])
    results.put("done")


def test_a_ledger_made_before_a_fork_works_in_the_child(redis_server: RedisServer, redis_prefix: str) -> None:
    """Pre-fork servers (gunicorn, multiprocessing) create the ledger once and fork workers."""
    import multiprocessing

    ledger = RedisLedger(url=redis_server.url, prefix=redis_prefix)
    s = scope(limit=10**9)
    assert ledger.reserve("parent-0", [(s, 10)], ttl_s=60).ok  # the parent's connection is open
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    child = context.Process(target=_forked_worker, args=(ledger, s, results))
    child.start()
    for i in range(1, 200):
        assert ledger.reserve(f"parent-{i}", [(s, 10)], ttl_s=60).ok
        ledger.settle(f"parent-{i}", [(s, 3)])
    assert results.get(timeout=30) == "done"
    child.join(timeout=10)
    assert child.exitcode == 0
    ledger.settle("parent-0", [(s, 3)])
    assert [(b.spent, b.reserved) for b in RedisLedger(url=redis_server.url, prefix=redis_prefix).balances([s])] == [(1200, 0)]
    ledger.close()


# -- asyncio: AsyncRedisLedger --------------------------------------------------------------------


def test_sync_and_asyncio_workers_share_one_budget(redis_server: RedisServer, redis_prefix: str) -> None:
    """One budget, a threaded worker and an asyncio worker: same scripts, same keys, one ledger."""
    threaded = RedisLedger(url=redis_server.url, prefix=redis_prefix)
    s = scope(limit=1_000)

    async def main() -> None:
        ledger = AsyncRedisLedger(url=redis_server.url, prefix=redis_prefix)
        assert (await ledger.reserve("a", [(s, 600)], ttl_s=60)).ok
        assert not threaded.reserve("b", [(s, 600)], ttl_s=60).ok  # the async reservation holds
        assert threaded.settle("a", [(s, 100)])  # settled by the other kind of worker
        assert not await ledger.settle("a", [(s, 100)])
        assert threaded.reserve("b", [(s, 600)], ttl_s=60).ok
        assert await ledger.release("b")
        assert [(b.spent, b.reserved) for b in await ledger.balances([s])] == [(100, 0)]
        await ledger.close()

    asyncio.run(main())
    threaded.close()


def test_asyncio_calls_in_flight_go_together_and_stay_exact(redis_server: RedisServer, redis_prefix: str) -> None:
    roomy, tight = scope("roomy", limit=10**12), scope("tight", limit=50_000)

    async def main() -> list[bool]:
        ledger = AsyncRedisLedger(url=redis_server.url, prefix=redis_prefix)

        async def request(i: int) -> bool:
            result = await ledger.reserve(f"r{i}", [(roomy, 1_000), (tight, 1_000)], ttl_s=60)
            if result.ok:
                assert await ledger.settle(f"r{i}", [(roomy, 400), (tight, 400)])
            return result.ok

        granted = await asyncio.gather(*(request(i) for i in range(300)))
        assert [(b.spent, b.reserved) for b in await ledger.balances([roomy, tight])] == [(400 * sum(granted), 0)] * 2
        await ledger.close()
        return granted

    granted = asyncio.run(main())
    # 300 coroutines reserved at once: the first 50 fit, the rest came while they were held.
    assert sum(granted) >= 50 and not all(granted)


def test_asyncio_outage_raises_state_unavailable_and_journals_settlements(tmp_path: Path, telemetry: Any) -> None:
    server = RedisServer(tmp_path / "redis", persistent=True).start()
    s = scope()

    async def main() -> None:
        ledger = AsyncRedisLedger(url=server.url, timeout_s=0.2, backoff_base_s=0.05, backoff_max_s=0.2)
        assert (await ledger.reserve("r1", [(s, 500)], ttl_s=600)).ok
        assert (await ledger.reserve("r2", [(s, 300)], ttl_s=600)).ok
        server.kill()
        with pytest.raises(StateUnavailable, match="unavailable"):
            await ledger.reserve("r3", [(s, 5)], ttl_s=60)
        with pytest.raises(StateUnavailable, match="next attempt"):
            await ledger.balances([scope("never-seen")])  # failing fast while backing off
        assert await ledger.settle("r1", [(s, 120)]) is True  # journaled: the caller is never failed
        assert await ledger.release("r2") is False
        assert ledger.journal_size == 2
        server.start()
        deadline = time.monotonic() + 10
        while ledger.journal_size:  # the replay task delivers it
            assert time.monotonic() < deadline, "the journal was not replayed"
            await asyncio.sleep(0.02)
        assert [(b.spent, b.reserved) for b in await AsyncRedisLedger(url=server.url).balances([s])] == [(120, 0)]
        assert not await ledger.settle("r1", [(s, 120)])  # the replay counted it once
        await ledger.close()

    try:
        asyncio.run(main())
    finally:
        server.cleanup()
    events = [p.attributes["policy_engine.event"] for p in telemetry.metrics()["policy_engine.events"]]
    assert "policy_engine.ledger.journaled" in events


def test_asyncio_slow_redis_times_out_without_blocking_the_loop(private_server: RedisServer) -> None:
    s = scope(limit=1_000)

    async def main() -> None:
        ledger = AsyncRedisLedger(url=private_server.url, timeout_s=0.1, backoff_base_s=0.05, backoff_max_s=0.05)
        assert (await ledger.balances([s]))[0].reserved == 0  # connected, scripts loaded
        private_server.client().client_pause(800, all=True)
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        beat = asyncio.create_task(ticker())
        started = time.perf_counter()
        with pytest.raises(StateUnavailable):
            await ledger.reserve("r1", [(s, 600)], ttl_s=600)
        assert time.perf_counter() - started < 0.5
        assert ticks >= 3  # the loop kept serving others while the call waited
        beat.cancel()
        await ledger.settle("r1", [(s, 100)])  # the paused reserve may still run: the settle must win either way
        await asyncio.sleep(0.9)
        while ledger.journal_size:
            await asyncio.sleep(0.02)
        await ledger.expire()
        assert [(b.spent, b.reserved) for b in await ledger.balances([scope(limit=1_000)])] == [(100, 0)]
        await ledger.close()

    asyncio.run(main())


@pytest.mark.parametrize("parser", ["hiredis", "redis-py"])
def test_both_asyncio_wire_paths_agree(redis_server: RedisServer, redis_prefix: str, parser: str) -> None:
    s = scope(limit=100)

    async def main() -> None:
        ledger = AsyncRedisLedger(url=redis_server.url, prefix=redis_prefix)
        ledger._plain = parser == "redis-py"
        assert (await ledger.reserve("r1", [(s, 60)], ttl_s=60)).ok
        assert not (await ledger.reserve("r2", [(s, 60)], ttl_s=60)).ok
        redis_server.client().script_flush()  # an error reply (NOSCRIPT) in the middle of the traffic
        with pytest.raises(ValueError, match="already used"):
            await ledger.reserve("r1", [(s, 1)], ttl_s=60)
        assert await ledger.settle("r1", [(s, 50)])
        assert [(b.spent, b.reserved) for b in await ledger.balances([s])] == [(50, 0)]
        await ledger.close()

    asyncio.run(main())


def test_an_asyncio_worker_delivers_a_journal_file_it_inherits(private_server: RedisServer, tmp_path: Path) -> None:
    """As `RedisLedger` does: entries a predecessor left in `journal_path` are replayed once Redis answers,
    without waiting for an outage or `close()`."""
    journal = tmp_path / "ledger.journal"
    s = scope()
    worker = RedisLedger(url=private_server.url, timeout_s=0.2, journal_path=journal)
    private_server.kill()
    worker.settle("r1", [(s, 11)])
    worker.close()  # Redis is still down: the entry stays in the file
    private_server.start()

    async def main() -> None:
        successor = AsyncRedisLedger(url=private_server.url, journal_path=journal)
        assert successor.journal_size == 1
        await successor.balances([scope("other")])  # the worker's first call, on its loop
        deadline = time.monotonic() + 10
        while successor.journal_size:
            assert time.monotonic() < deadline, "the inherited journal was not replayed"
            await asyncio.sleep(0.02)
        assert (await successor.balances([s]))[0].spent == 11
        await successor.close()

    asyncio.run(main())
    assert journal.read_text() == ""
