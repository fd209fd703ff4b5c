"""Two `policy-engine serve` replicas on one Redis, in front of one emulator, share one fast budget.

Both replicas are real processes (tests/_serve.py) with `--redis URL --redis-prefix P`; a
real redis-server (tests/_redis.py) holds the budget. Threads drive both replicas at once,
alternating between them and between streaming and non-streaming requests, with the
anthropic SDK, until the fast budget is spent. The emulator's own bill is the oracle:

* no overspend: the fast requests it billed, priced, stay within the fast budget's limit
  (reservations are worst case, so not even one in-flight request may cross it);
* nothing missed: what the ledger counted, read back from Redis after both replicas
  stopped on SIGTERM (so anything journaled was flushed), is at least the bill;
* past the budget, requests still succeed, at standard speed (`x-policy-outcome: downgraded`).
"""

from __future__ import annotations

import itertools
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import anthropic
import pytest

from _redis import RedisServer, fleet_policy, redis_prefix, redis_server  # noqa: F401  (pytest fixtures)
from _serve import Server, start
from policy_engine.catalog import actual
from policy_engine.ledger import Scope, window_bounds
from policy_engine.ledger.redis import RedisLedger
from policy_engine.testing.emulator import Emulator
from tests._emulator import emulator  # noqa: F401 - fixture

FAST_USD = 0.02
FAST_LIMIT = 20_000  # micro-dollars
ALL_LIMIT = 1_000 * 1_000_000
REQUESTS = 96
WORKERS = 8
MAX_TOKENS = 64
# claude-opus-5 at fast speed: $10 / $50 per MTok in / out. A request reserves its worst case (64 tokens
# of output, ~3,300 micro-dollars) and is billed for what it generated (1 to 48 tokens here), so the
# $0.02 budget takes some 30 fast requests, while eight in flight hold up to eight reservations.


def bill(emulator: Emulator, speed: str | None = None) -> int:  # noqa: F811
    """The emulator's own bill in micro-dollars, of the steps at `speed` (all of them: None)."""
    return sum(actual(emulator.catalog.model(step["model"], platform=emulator.platform),
                      {**step["usage"], "speed": step["speed"], "inference_geo": step.get("inference_geo")})
               for step in emulator.bill() if speed is None or step["speed"] == speed)


def scopes(now: datetime) -> tuple[Scope, Scope]:
    """The fleet policy's two budgets (unkeyed: one global bucket each) in today's UTC window."""
    window, _, end = window_bounds("day", "UTC", now)
    return (Scope("fast_spend", "global", window, FAST_LIMIT, end.timestamp()),
            Scope("all_spend", "global", window, ALL_LIMIT, end.timestamp()))


def send(client: anthropic.Anthropic, index: int, stream: bool) -> dict[str, Any]:
    """One interactive request (the fleet policy's rule sends it fast); what the client saw of it."""
    params: dict[str, Any] = {
        "model": "claude-opus-5", "max_tokens": MAX_TOKENS,
        "messages": [{"role": "user", "content": f"request {index}: how fast can this go?"}],
        "extra_headers": {"x-policy-interactive": "true", "x-emulator-output-tokens": str(1 + index * 7 % 48)},
    }
    if stream:
        with client.messages.with_streaming_response.create(stream=True, **params) as response:
            events = [event.type for event in response.parse()]
            assert events[0] == "message_start" and events[-1] == "message_stop", events
            return {"status": response.status_code, "stream": True, **_policy_headers(response.headers)}
    raw = client.messages.with_raw_response.create(**params)
    message = raw.parse()
    assert message.usage.speed == raw.headers["x-policy-speed"]  # what the decision says is what was served
    return {"status": raw.status_code, "stream": False, **_policy_headers(raw.headers)}


def _policy_headers(headers: Any) -> dict[str, str]:
    return {name: headers[name] for name in ("x-policy-speed", "x-policy-decided-speed", "x-policy-outcome")}


def test_two_replicas_on_one_redis_never_overspend_a_fast_budget(redis_server: RedisServer, redis_prefix: str,  # noqa: F811
                                                                 emulator: Emulator, tmp_path: Path) -> None:  # noqa: F811
    policy = fleet_policy(tmp_path / "fleet.yaml", fast_usd=FAST_USD)
    args = ["--redis", redis_server.url, "--redis-prefix", redis_prefix]
    with ThreadPoolExecutor(2) as pool:  # the two start at once: each takes a second or two to import
        replicas: list[Server] = list(pool.map(lambda _: start([policy], upstream=emulator.url, args=args), range(2)))
    started_at = datetime.now(timezone.utc)
    try:
        clients = [anthropic.Anthropic(base_url=r.url, api_key="sk-test", max_retries=0) for r in replicas]
        counter = itertools.count()
        lock = threading.Lock()

        def work(index: int) -> dict[str, Any]:
            with lock:
                n = next(counter)
            # Alternate replicas one request to the next, and streaming every other pair.
            return {"replica": n % 2, **send(clients[n % 2], index, stream=n // 2 % 2 == 1)}

        with ThreadPoolExecutor(WORKERS) as pool:
            seen = list(pool.map(work, range(REQUESTS)))
        # Now that nothing is in flight, the budget is spent: neither replica sends another request fast.
        after = [send(client, REQUESTS + i, stream=bool(i)) for i, client in enumerate(clients)]
    finally:
        codes = [r.stop() for r in replicas]  # SIGTERM: drain, then close the ledger (journal flushed)
    stderr = "".join(r.stderr() for r in replicas)
    assert all(code in (0, -15) for code in codes), stderr  # uvicorn re-raises the SIGTERM it handled
    assert "Traceback" not in stderr, stderr

    assert all(s["status"] == 200 for s in seen + after)  # beyond the budget nothing failed
    fast = [s for s in seen if s["x-policy-speed"] == "fast"]
    downgraded = [s for s in seen + after if s["x-policy-outcome"] == "downgraded"]
    assert fast and downgraded, seen
    assert len(fast) + len(downgraded) == len(seen) + len(after)  # every request was fast or downgraded
    assert all(s["x-policy-outcome"] == "allowed" for s in fast)
    assert all(s["x-policy-speed"] == s["x-policy-decided-speed"] == "standard" for s in downgraded)
    assert [s["x-policy-outcome"] for s in after] == ["downgraded"] * 2
    # Both replicas, both kinds of request went fast and were downgraded.
    assert {(s["replica"], s["stream"]) for s in fast} == {(0, False), (0, True), (1, False), (1, True)}
    assert {(s["replica"], s["stream"]) for s in downgraded if s in seen} == {(0, False), (0, True), (1, False), (1, True)}

    served = [r for r in emulator.requests() if r["path"].startswith("/v1/messages")]
    assert len(served) == REQUESTS + 2
    assert sum(r.get("speed") == "fast" for r in served) == len(fast)

    fast_bill, total_bill = bill(emulator, "fast"), bill(emulator)
    assert 0 < fast_bill <= FAST_LIMIT  # no overspend, not even by a request in flight
    if window_bounds("day", "UTC", datetime.now(timezone.utc))[0] != window_bounds("day", "UTC", started_at)[0]:
        pytest.skip("the run crossed midnight UTC: the spend is split between two daily windows")
    ledger = RedisLedger(url=redis_server.url, prefix=redis_prefix)
    try:
        fast_balance, all_balance = ledger.balances(list(scopes(started_at)))
    finally:
        ledger.close()
    assert fast_balance.reserved == 0 and all_balance.reserved == 0  # every reservation settled
    assert fast_bill <= fast_balance.spent <= FAST_LIMIT  # counted at least what was billed, within the limit
    assert all_balance.spent >= total_bill > fast_bill
    # The budget was used, not merely refused: what is left is less than one more fast request's reservation.
    assert FAST_LIMIT - fast_balance.spent < MAX_TOKENS * 50 + 1_000
