"""Fork safety, in the shapes real deployments take: a pre-forking server (gunicorn `--preload`,
4 workers) and `multiprocessing` with the fork start method, the engine built (and used) before
the fork, on a real SQLite file and a real redis-server, every request through the real anthropic
SDK and `FastModePolicy` against the emulator, which keeps its own bill.

For every run: no request fails (a repeated reservation id would), no budget is exceeded, nothing
stays reserved, and the ledger holds exactly what the emulator billed.
"""

from __future__ import annotations

import concurrent.futures
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from policy_engine._fork import ProcessIds
from policy_engine.decide import load
from policy_engine.ledger import Scope
from policy_engine.ledger.redis import RedisLedger
from policy_engine.ledger.sqlite import SqliteLedger
from policy_engine.testing.emulator import Emulator
from tests import _fork_app
from tests._emulator import emulator  # noqa: F401 - fixture
from tests._redis import RedisServer, free_port, redis_prefix, redis_server  # noqa: F401 - fixtures

ROOT = Path(__file__).resolve().parent.parent
LIMIT_MICRO = 30_000
POLICY = """\
version: 1
name: forked
default: fast
budgets:
  - name: all_spend
    window: day
    limit_usd: 0.03
    counts: all
    on_exceed: reject
"""
"""Every request fast (about $0.01 reserved, $0.003 billed): 60 requests need more than the $0.10 budget holds."""
REQUESTS = 60


@pytest.fixture(params=["sqlite", "redis"])
def ledger_spec(request: pytest.FixtureRequest, tmp_path: Path, redis_server: RedisServer, redis_prefix: str) -> str:  # noqa: F811
    return f"sqlite:{tmp_path / 'ledger.db'}" if request.param == "sqlite" else redis_server.url


def ledger_state(spec: str, prefix: str) -> tuple[int, int]:
    """(spent, reserved) in micro-dollars over every scope, read from the store itself."""
    if spec.startswith("sqlite:"):
        ledger = SqliteLedger(spec[len("sqlite:"):])
        try:
            spent = sum(ledger.totals().values())
            with ledger._lock:
                reserved = ledger._connect().execute("SELECT COALESCE(SUM(amount), 0) FROM holds WHERE expires_at > ?",
                                                     (time.time(),)).fetchone()[0]
            return spent, reserved
        finally:
            ledger.close()
    client = redis.Redis.from_url(spec)
    try:
        spent = reserved = 0
        for key in client.scan_iter(match=f"{prefix}s:*"):
            a, b = client.get(key).split()
            spent, reserved = spent + int(a), reserved + int(b)
        return spent, reserved
    finally:
        client.close()


def check_run(results: list[dict[str, Any]], emulator: Emulator, spec: str, prefix: str) -> None:  # noqa: F811
    errors = [r for r in results if r["outcome"] == "error"]
    assert not errors, f"{len(errors)} requests failed, e.g. {errors[0]['error']}"
    outcomes = [r["outcome"] for r in results]
    assert outcomes.count("ok") > 0 and outcomes.count("rejected") > 0, outcomes  # the budget did bind
    spent, reserved = ledger_state(spec, prefix)
    assert reserved == 0
    assert spent <= LIMIT_MICRO, f"the $0.03 budget was overspent: {spent} micro-dollars"
    assert spent == emulator.bill_micro(), "the ledger must hold exactly what the emulator billed"
    served = sum(1 for e in emulator.requests() if e["status"] == 200)
    assert served == outcomes.count("ok") + 1  # and the warm-up call made before the fork


def forked(work: Any, children: int) -> list[Any]:
    """Run `work()` in `children` processes forked now (multiprocessing, fork start method); their lists, joined."""
    context = multiprocessing.get_context("fork")
    queue = context.SimpleQueue()
    procs = [context.Process(target=lambda: queue.put(work())) for _ in range(children)]
    for p in procs:
        p.start()
    results = [r for _ in procs for r in queue.get()]  # read before joining: a full pipe would block a child
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    return results


# -- the shared mechanism ----------------------------------------------------------------------


def test_a_forked_child_makes_ids_of_its_own() -> None:
    ids = ProcessIds()
    before = [next(ids) for _ in range(3)]
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next ids and leave without running the parent's cleanup
        os.write(write, json.dumps([next(ids) for _ in range(3)]).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        child = json.loads(pipe.read())
    os.waitpid(pid, 0)
    parent = [next(ids) for _ in range(3)]
    assert len(set(before + child + parent)) == 9
    assert all(i.startswith(f"{pid:x}-") for i in child)
    assert len({i.split("-")[1] for i in before + child}) == 2 and all(len(i.split("-")[1]) == 16 for i in child)


def test_a_child_forked_while_a_lazy_cel_variant_was_being_generated_generates_its_own() -> None:
    # The lazy variant of a compiled expression (for an activation that lacks a variable) is generated on
    # first need, under a lock; a fork while another thread held it must not leave the child's copy held.
    from policy_engine import cel
    from policy_engine.cel import cache

    program = cel.compile("x > 1 || y", {"x": cel.INT, "y": cel.BOOL})
    read, write = os.pipe()
    with cache.GENERATING:  # as a thread of the parent would hold it, generating another program's
        pid = os.fork()
        if pid == 0:
            signal.alarm(10)  # a deadlocked child dies rather than hanging the test
            os.write(write, json.dumps(program.evaluate({"y": True})).encode())  # x absent: the lazy variant
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        answer = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert status == 0 and json.loads(answer) is True


def test_reservation_ids_differ_between_forked_children(tmp_path: Path) -> None:
    """The engine's reservation ids, made in children forked after import, never repeat."""
    policy = tmp_path / "p.yaml"
    policy.write_text(POLICY.replace("limit_usd: 0.03", "limit_usd: 1000"))
    engine = load(policy, ledger=SqliteLedger(tmp_path / "ledger.db"))
    params = dict(_fork_app.REQUEST)

    def child() -> list[str]:
        decisions = [engine.decide(params) for _ in range(5)]
        for decision in decisions:
            engine.release(decision)
        return [d.reservation_id for d in decisions]

    ids = forked(child, 3)
    assert len(set(ids)) == len(ids) == 15


# -- multiprocessing, fork start method ------------------------------------------------------


def test_multiprocessing_fork_children_share_one_budget_exactly(
        ledger_spec: str, redis_prefix: str, emulator: Emulator, tmp_path: Path) -> None:  # noqa: F811
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    _, client = _fork_app.build(emulator.url, str(policy), ledger_spec, redis_prefix)  # one call made: connections open

    def calls() -> list[dict[str, Any]]:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:  # two threads per child: its locks are its own
            return list(pool.map(lambda _: _fork_app.call(client), range(REQUESTS // 4)))

    results = forked(calls, 4)
    assert len({r["pid"] for r in results}) == 4
    check_run(results, emulator, ledger_spec, redis_prefix)


# -- gunicorn --preload, 4 workers ------------------------------------------------------------


@pytest.fixture()
def gunicorn(emulator: Emulator, ledger_spec: str, redis_prefix: str, tmp_path: Path) -> Iterator[str]:  # noqa: F811
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    port = free_port()
    env = {**os.environ, "PE_EMULATOR_URL": emulator.url, "PE_POLICY": str(policy), "PE_LEDGER": ledger_spec,
           "PE_REDIS_PREFIX": redis_prefix, "PYTHONPATH": str(ROOT)}
    log = tmp_path / "gunicorn.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "--preload", "--workers", "4", "--bind", f"127.0.0.1:{port}",
         "--chdir", str(ROOT), "--timeout", "60", "--error-logfile", str(log), "tests._fork_app:app"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def probe(_: int) -> int | None:
        try:
            return httpx.get(url + "/health", timeout=5).json()["pid"]
        except httpx.HTTPError:
            return None

    try:
        # Ready once concurrent probes have reached at least two workers (all four, usually).
        deadline, pids = time.monotonic() + 60, set()
        while len(pids) < 2:
            if process.poll() is not None:
                pytest.fail(f"gunicorn exited with {process.returncode}: {log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"gunicorn's workers did not answer within 60s: {log.read_text()[-3000:]}")
            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                pids |= {pid for pid in pool.map(probe, range(8)) if pid is not None}
            time.sleep(0.05)
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_gunicorn_preload_workers_share_one_budget_exactly(
        gunicorn: str, emulator: Emulator, ledger_spec: str, redis_prefix: str) -> None:  # noqa: F811
    with httpx.Client(base_url=gunicorn, timeout=60) as http:
        def one(_: int) -> dict[str, Any]:
            response = http.get("/")
            assert response.status_code == 200, response.text
            return response.json()

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            results = list(pool.map(one, range(REQUESTS)))
    assert len({r["pid"] for r in results}) >= 2, "the requests should have been served by several workers"
    check_run(results, emulator, ledger_spec, redis_prefix)


# -- what else a child renews ------------------------------------------------------------------


def test_a_redis_journal_file_is_per_child_and_adopted_once_its_child_is_gone(
        tmp_path: Path, redis_prefix: str) -> None:  # noqa: F811
    """During an outage a forked child journals to `<journal_path>.<pid>`, never into its parent's file;
    a ledger opened later adopts the file of a child that is gone and delivers it."""
    server = RedisServer(tmp_path / "redis").start()
    journal = tmp_path / "journal.jsonl"
    try:
        ledger = RedisLedger(url=server.url, prefix=redis_prefix, journal_path=journal, timeout_s=0.3)
        scope = Scope("b", "k", "day:x", 1_000_000, time.time() + 86_400)
        ledger.reserve("warm", [(scope, 0)], ttl_s=60)
        server.kill()
        pid = os.fork()
        if pid == 0:
            code = 0 if ledger.settle("child-settle", [(scope, 700)]) and ledger.journal_size == 1 else 1
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert not journal.exists(), "the child must not write its parent's journal file"
        child_file = tmp_path / f"journal.jsonl.{pid}"
        assert child_file.exists()
        server.start()
        adopter = RedisLedger(url=server.url, prefix=redis_prefix, journal_path=journal, timeout_s=0.3)
        assert not child_file.exists() and adopter.journal_size == 1
        assert adopter.flush_journal() == 1
        assert adopter.balances([scope])[0].spent == 700
        adopter.close()
        ledger.close()
    finally:
        server.cleanup()


def in_child(check: Any) -> None:
    """Run `check()` in a child forked now; it must return True (an exception or False fails the test)."""
    pid = os.fork()
    if pid == 0:
        try:
            code = 0 if check() else 1
        except BaseException:  # noqa: BLE001 - reported through the exit code
            import traceback

            traceback.print_exc()
            code = 2
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_an_asyncio_redis_ledger_made_and_used_before_the_fork_works_in_the_child(
        redis_server: RedisServer, redis_prefix: str) -> None:  # noqa: F811
    import asyncio

    from policy_engine.ledger.redis import AsyncRedisLedger

    ledger = AsyncRedisLedger(url=redis_server.url, prefix=redis_prefix)
    scope = Scope("b", "k", "day:x", 1_000_000, time.time() + 86_400)

    async def spend(rid: str) -> bool:
        assert (await ledger.reserve(rid, [(scope, 100)], ttl_s=60)).ok
        return await ledger.settle(rid, [(scope, 40)])

    asyncio.run(spend("parent"))  # the parent's pool and connection are open at the fork
    in_child(lambda: asyncio.run(spend("child")))
    ledger2 = RedisLedger(url=redis_server.url, prefix=redis_prefix)
    assert ledger2.balances([scope])[0] == (80, 0, 1_000_000)
    ledger2.close()


def test_background_threads_and_clients_are_the_childs_own(redis_server: RedisServer, redis_prefix: str,  # noqa: F811
                                                           tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from policy_engine.ledger import MemoryLedger
    from policy_engine.ledger.redis import RedisRateLimitStore
    from policy_engine.reload import ReloadingEngine
    from policy_engine.tokens import TokenCounter

    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    store = RedisRateLimitStore(url=redis_server.url, prefix=redis_prefix, refresh_s=0.05)
    store.update("acct", output_tokens_remaining=5)
    reloading = ReloadingEngine(policy, poll_interval_s=0.05)
    counter = TokenCounter(api_key="k", base_url="http://127.0.0.1:9")
    counter._client = httpx.Client()  # as if the parent had counted once
    memory = MemoryLedger()

    def check() -> bool:
        assert store._syncer is not None and store._syncer.alive and store.sync()
        assert reloading._watcher is not None and reloading._watcher.alive
        policy.write_text(POLICY.replace("limit_usd: 0.03", "limit_usd: 0.2"))
        deadline = time.monotonic() + 10
        while reloading.reloads == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert reloading.reloads == 1  # the child's own watcher saw the change
        assert counter._client is None
        seen: list[logging.LogRecord] = []
        handler = logging.Handler()
        handler.emit = seen.append  # type: ignore[method-assign]
        logging.getLogger("policy_engine.ledger").addHandler(handler)
        memory.reserve("r", [(Scope("b", "k", "w", 10, time.time() + 60), 1)], ttl_s=60)
        memory.reserve("s", [(Scope("b", "k", "w", 10, time.time() + 60), 1)], ttl_s=60)
        return len(seen) == 1 and "forked child" in seen[0].getMessage()

    in_child(check)
    store.close()
    reloading.close()
