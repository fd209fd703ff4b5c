"""Benchmark: reserve+settle operations per second, per ledger backend, from one process.

Run:  .venv/bin/python benchmarks/bench_ledger.py  [--seconds S] [--repeat R] [--threads N] [--url redis://...]

One operation is what a request costs the ledger: a reservation across two budgets
(say a tenant's fast premium and the organization's daily cap) and its settlement.
Each backend runs N threads of one process for S seconds, R times (the best run counts,
as with timeit: other load on a shared machine only ever slows a run), side by side:

* memory: `MemoryLedger`, a lock around dicts: the ceiling, and the baseline ratios refer to;
* sqlite: `SqliteLedger` on a file in a temp dir (WAL);
* redis:  `RedisLedger` on a private redis-server on loopback (or --url), with 1 thread
          (every call waits for its round trip) and with N threads (calls in flight share
          round trips: the more concurrent requests a worker serves, the more each round
          trip carries, so CPU per operation falls as N grows);
* redis asyncio: `AsyncRedisLedger`, N coroutines on one event loop (for information:
          the target is about the threaded ledger).

N defaults to 32, a worker process serving 32 requests at once. Client and
redis-server CPU time per operation are printed too: unlike ops/s they hardly depend
on what else the machine is running.

The last line printed is:
    ledger: memory A/s, sqlite B/s, redis C/s
with C the N-thread Redis figure. Target: C >= 5,000/s.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import resource
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the test suite's private redis-server helper

from policy_engine.ledger import Ledger, MemoryLedger, Scope  # noqa: E402

TARGET = 5_000


CPU: dict[str, float] = {}
"""Backend -> client CPU microseconds per operation (all threads of this process)."""


def best(measure: Callable[[str], float], tag: str, repeat: int) -> float:
    """The best of `repeat` runs of `measure` (`run` or `run_async` but for the tag), as timeit does:
    other load on the machine only ever slows a run."""
    rates, cpus = [], []
    for attempt in range(repeat):
        rates.append(measure(f"{tag}-{attempt}"))
        cpus.append(CPU.pop(f"{tag}-{attempt}"))
    CPU[tag] = min(cpus)
    return max(rates)


def run(ledger: Ledger, threads: int, seconds: float, tag: str) -> float:
    """Operations (reserve + settle) per second over `seconds`, summed over `threads`."""
    expires = time.time() + 86_400
    tenant = Scope("tenant_premium", f"acme-{tag}", "day:2026-03-02@UTC", 10**15, expires)
    org = Scope("org_daily", f"global-{tag}", "day:2026-03-02@UTC", 10**15, expires)
    done = [0] * threads
    stop = threading.Event()
    ready = threading.Barrier(threads + 1)

    def work(t: int) -> None:
        ready.wait()
        i = 0
        while not stop.is_set():
            rid = f"{tag}-{t}-{i}"
            if not ledger.reserve(rid, [(tenant, 150_300), (org, 150_300)], ttl_s=600).ok:
                raise SystemExit("a reservation did not fit a limit it cannot reach")
            ledger.settle(rid, [(tenant, 45_360), (org, 45_360)])
            i += 1
        done[t] = i

    pool = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for thread in pool:
        thread.start()
    ready.wait()
    started, cpu = time.perf_counter(), _cpu()
    time.sleep(seconds)
    stop.set()
    for thread in pool:
        thread.join()
    elapsed, cpu = time.perf_counter() - started, _cpu() - cpu
    total = sum(done)
    CPU[tag] = cpu / max(total, 1) * 1e6
    [tenant_balance] = ledger.balances([tenant])
    if tenant_balance.spent != 45_360 * total or tenant_balance.reserved != 0:
        raise SystemExit(f"{tag}: totals are off: {tenant_balance} after {total} operations")
    return total / elapsed


def run_async(url: str, prefix: str, tasks: int, seconds: float, tag: str) -> float:
    """`run` for `AsyncRedisLedger`: `tasks` coroutines on one event loop."""
    import asyncio

    from policy_engine.ledger.redis import AsyncRedisLedger

    expires = time.time() + 86_400
    tenant = Scope("tenant_premium", f"acme-{tag}", "day:2026-03-02@UTC", 10**15, expires)
    org = Scope("org_daily", f"global-{tag}", "day:2026-03-02@UTC", 10**15, expires)

    async def main() -> tuple[int, float, float]:
        ledger = AsyncRedisLedger(url=url, prefix=prefix, timeout_s=5.0)
        await ledger.balances([tenant])  # connected, scripts loaded
        stop = False

        async def work(t: int) -> int:
            i = 0
            while not stop:
                rid = f"{tag}-{t}-{i}"
                if not (await ledger.reserve(rid, [(tenant, 150_300), (org, 150_300)], ttl_s=600)).ok:
                    raise SystemExit("a reservation did not fit a limit it cannot reach")
                await ledger.settle(rid, [(tenant, 45_360), (org, 45_360)])
                i += 1
            return i

        started, cpu = time.perf_counter(), _cpu()
        workers = [asyncio.ensure_future(work(t)) for t in range(tasks)]
        await asyncio.sleep(seconds)
        stop = True
        total = sum(await asyncio.gather(*workers))
        elapsed, cpu = time.perf_counter() - started, _cpu() - cpu
        [balance] = await ledger.balances([tenant])
        await ledger.close()
        if balance.spent != 45_360 * total or balance.reserved != 0:
            raise SystemExit(f"{tag}: totals are off: {balance} after {total} operations")
        return total, elapsed, cpu

    total, elapsed, cpu = asyncio.run(main())
    CPU[tag] = cpu / max(total, 1) * 1e6
    return total / elapsed


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _server_cpu(url: str) -> float:
    import redis

    client = redis.Redis.from_url(url)
    info = client.info("cpu")
    client.close()
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def _operations(url: str, prefix: str) -> int:
    """Settled operations recorded under `prefix` so far (the tenant scopes' spend / 45,360)."""
    import redis

    client = redis.Redis.from_url(url)
    total = 0
    for key in client.scan_iter(match=f"{prefix}s:tenant_premium*", count=1000):
        total += int(client.get(key).split()[0]) // 45_360
    client.close()
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=1.5, help="per run (default 1.5)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure, the best one counts (default 3)")
    parser.add_argument("--threads", type=int, default=32, help="threads of the one process (default 32)")
    parser.add_argument("--url", help="benchmark this Redis instead of a private loopback redis-server")
    args = parser.parse_args(argv)
    from policy_engine import _mypyc  # after the imports above: it names the compiled modules they loaded

    print(f"build: {_mypyc.checked_build('this would measure')}", flush=True)

    load_before = os.getloadavg()[0]
    rates: dict[str, float] = {}
    rates["memory"] = best(partial(run, MemoryLedger(), args.threads, args.seconds), "memory", args.repeat)

    if importlib.util.find_spec("policy_engine.ledger.sqlite") is not None:
        from policy_engine.ledger.sqlite import SqliteLedger

        with tempfile.TemporaryDirectory() as tmp:
            sqlite = SqliteLedger(Path(tmp) / "ledger.db")
            rates["sqlite"] = best(partial(run, sqlite, args.threads, args.seconds), "sqlite", args.repeat)
            sqlite.close()

    from policy_engine.ledger.redis import RedisLedger

    server = None
    url = args.url
    if url is None:
        from _redis import RedisServer

        server = RedisServer().start()
        url = server.url
    try:
        prefix = f"bench-{time.time_ns()}:"
        single = RedisLedger(url=url, prefix=prefix, timeout_s=5.0)
        rates["redis, 1 thread"] = best(partial(run, single, 1, args.seconds), "redis1", args.repeat)
        single.close()
        shared = RedisLedger(url=url, prefix=prefix, timeout_s=5.0)
        server_cpu, operations = _server_cpu(url), _operations(url, prefix)
        rates["redis"] = best(partial(run, shared, args.threads, args.seconds), "redisN", args.repeat)
        server_us = (_server_cpu(url) - server_cpu) / max(_operations(url, prefix) - operations, 1) * 1e6
        shared.close()
        rates["redis asyncio"] = best(partial(run_async, url, prefix, args.threads, args.seconds), "redisA", args.repeat)
    finally:
        if server is not None:
            server.cleanup()

    baseline = rates["memory"]
    tags = {"memory": "memory", "sqlite": "sqlite", "redis, 1 thread": "redis1", "redis": "redisN", "redis asyncio": "redisA"}
    print(f"reserve+settle over two budgets, {args.threads} threads of one process, best of {args.repeat} x {args.seconds:g}s "
          f"({os.cpu_count()} CPUs; load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after)")
    for name, rate in rates.items():
        threads = 1 if name == "redis, 1 thread" else args.threads
        unit = "coroutines on one loop" if name == "redis asyncio" else f"thread{'s' * (threads > 1)}"
        print(f"  {name:<16} {rate:>10,.0f} ops/s   {rate / baseline:6.3f}x memory   "
              f"client CPU {CPU[tags[name]]:6.1f} us/op   ({threads} {unit})")
    print(f"  redis-server CPU {server_us:.1f} us/op ({args.threads} threads)")
    verdict: Callable[[float], str] = lambda r: "meets" if r >= TARGET else "MISSES"  # noqa: E731
    print(f"  redis target {TARGET:,}/s: {verdict(rates['redis'])} it "
          f"({rates['redis'] / rates['redis, 1 thread']:.2f}x the 1-thread rate)")
    sqlite_text = f"{rates['sqlite']:,.0f}/s" if "sqlite" in rates else "n/a"
    print(f"ledger: memory {rates['memory']:,.0f}/s, sqlite {sqlite_text}, redis {rates['redis']:,.0f}/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
