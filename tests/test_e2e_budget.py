"""End to end: 1,000 requests against a small daily budget end within it, and the ledger matches the bill.

The emulator's own usage records, priced by the catalog, are the bill. Requests vary in
prompt, output length, streaming, prompt caching and data residency; a tight fast-mode
rate limit forces fallbacks, and injected 529s force SDK retries. The sync run uses the
in-memory ledger, the async one the SQLite ledger with eight requests in flight at once.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

import anthropic
import pytest

from policy_engine.catalog import actual, load_catalog
from policy_engine.decide import Engine, load
from policy_engine.errors import CeilingExceeded
from policy_engine.integrations.anthropic import FastModePolicy
from policy_engine.ledger.sqlite import SqliteLedger
from policy_engine.testing.emulator import Emulator
from tests._emulator import emulator  # noqa: F401 - fixture

CATALOG = load_catalog()
LIMIT_MICRO = 750_000
POLICY = """
version: 1
name: small-budget
default: fast
budgets:
  - name: daily
    window: day
    limit_usd: 0.75
    on_exceed: downgrade
"""
REQUESTS = 1_000


def request(rng: random.Random, index: int) -> dict[str, Any]:
    words = " ".join(rng.choice(("alpha", "beta", "gamma", "delta", "42", "!")) for _ in range(rng.randint(1, 40)))
    params: dict[str, Any] = {
        "model": "claude-opus-5",
        "max_tokens": rng.choice((16, 32, 64)),
        "messages": [{"role": "user", "content": f"request {index}: {words}"}],
        "extra_headers": {"x-emulator-output-tokens": str(rng.randint(1, 64))},
    }
    if index % 7 == 0:
        params["system"] = [{"type": "text", "text": "Shared instructions. " * 30, "cache_control": {"type": "ephemeral"}}]
    if index % 11 == 0:
        params["inference_geo"] = "us"
    return params


def check_books(engine: Engine, emulator: Emulator, served: int, rejected: int) -> None:  # noqa: F811
    billed = emulator.billed()
    bill = sum(actual(CATALOG.model(u["model"]), u) for u in billed)
    ledger_total = sum(engine.ledger.totals().values())  # type: ignore[attr-defined]
    assert ledger_total == bill  # to the micro-dollar
    assert ledger_total <= LIMIT_MICRO
    assert served + rejected == REQUESTS and len(billed) == served
    assert rejected > 0  # the budget did bind
    speeds = {u["speed"] for u in billed}
    assert speeds == {"fast", "standard"}
    assert any(r["status"] == 429 for r in emulator.requests())  # fallbacks happened
    assert any(r["status"] == 529 for r in emulator.requests())  # and SDK retries
    [balance] = engine.ledger.balances([scope for scope in _scopes(engine)])
    assert balance.reserved == 0 and balance.spent == ledger_total


def _scopes(engine: Engine) -> list[Any]:
    from datetime import datetime, timezone

    from policy_engine.ledger import Scope, window_bounds

    window, _, end = window_bounds("day", "UTC", datetime.now(timezone.utc))
    return [Scope("daily", "global", window, LIMIT_MICRO, end.timestamp())]


def configure(emulator: Emulator) -> None:  # noqa: F811
    emulator.configure(fast_output_tokens_per_minute=3_000, min_cache_tokens=50)
    emulator.inject(529, times=2, retry_after="0.001")  # the SDK retries twice by default


def test_a_thousand_sync_requests_stay_within_a_small_budget(emulator: Emulator, tmp_path: Path) -> None:  # noqa: F811
    configure(emulator)
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    engine = load(path)
    client = anthropic.Anthropic(base_url=emulator.url, api_key="sk-budget", middleware=[FastModePolicy(engine)])
    rng = random.Random(5)
    served = rejected = 0
    for index in range(REQUESTS):
        params = request(rng, index)
        try:
            if index % 5 == 0:
                with client.messages.stream(**params) as stream:
                    stream.get_final_message()
            else:
                client.messages.create(**params)
            served += 1
        except CeilingExceeded:
            rejected += 1
    check_books(engine, emulator, served, rejected)


def test_a_thousand_concurrent_async_requests_on_the_sqlite_ledger(emulator: Emulator, tmp_path: Path) -> None:  # noqa: F811
    configure(emulator)
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    engine = load(path, ledger_path=tmp_path / "ledger.db")
    assert isinstance(engine.ledger, SqliteLedger)
    rng = random.Random(6)
    params = [request(rng, index) for index in range(REQUESTS)]

    async def run() -> tuple[int, int]:
        client = anthropic.AsyncAnthropic(base_url=emulator.url, api_key="sk-budget", middleware=[FastModePolicy(engine)])
        gate = asyncio.Semaphore(8)

        async def one(index: int) -> bool:
            async with gate:
                try:
                    if index % 5 == 0:
                        stream = await client.messages.create(stream=True, **params[index])
                        async for _ in stream:
                            pass
                    else:
                        await client.messages.create(**params[index])
                    return True
                except CeilingExceeded:
                    return False

        async with client:
            results = await asyncio.gather(*(one(i) for i in range(REQUESTS)))
        return sum(results), REQUESTS - sum(results)

    served, rejected = asyncio.run(run())
    check_books(engine, emulator, served, rejected)


@pytest.mark.parametrize("limit", ["0.000001", "0"])
def test_a_budget_too_small_for_any_request_sends_nothing(emulator: Emulator, tmp_path: Path, limit: str) -> None:  # noqa: F811
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY.replace("limit_usd: 0.75", f"limit_usd: {limit}"))
    client = anthropic.Anthropic(base_url=emulator.url, api_key="k", middleware=[FastModePolicy(load(path))])
    with pytest.raises(CeilingExceeded):
        client.messages.create(model="claude-opus-5", max_tokens=16, messages=[{"role": "user", "content": "hi"}])
    assert emulator.requests() == []
