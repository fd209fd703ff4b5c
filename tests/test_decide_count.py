"""Exact input-token counting in decide/adecide through a TokenCounter, against the local emulator.

The emulator answers POST /v1/messages/count_tokens with its own deterministic count
(`count_request_tokens`), so a decision made on a counted request carries exactly that.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from policy_engine.decide import Engine, load
from policy_engine.errors import InvalidRequest
from policy_engine.testing.emulator import Emulator, count_request_tokens
from policy_engine.tokens import TokenCounter, estimate_input_tokens

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_POLICY = ROOT / "policies" / "default.yaml"
NOON = datetime(2026, 3, 2, 12, 0, tzinfo=timezone.utc)
PARAMS: dict[str, Any] = {
    "model": "claude-opus-4-6", "max_tokens": 4096,
    "system": "You review pull requests for a payments team.",
    "messages": [{"role": "user", "content": "Is this migration safe to run during business hours? " * 20}],
}
WAITING = {"interactive": True, "latency_slo_ms": 20_000}


@pytest.fixture()
def emulator() -> Iterator[Emulator]:
    with Emulator() as emu:
        yield emu


def adecide_once(engine: Engine, counter: TokenCounter) -> Any:
    """One `adecide` in a fresh event loop, closing the counter's async client before the loop ends."""

    async def main() -> Any:
        try:
            return await engine.adecide(PARAMS, WAITING, now=NOON)
        finally:
            await counter.aclose()

    return asyncio.run(main())


def test_decide_uses_the_exact_count(emulator: Emulator) -> None:
    counter = TokenCounter(api_key="test", base_url=emulator.url, timeout=5.0)
    engine = load(DEFAULT_POLICY, counter=counter)
    exact = count_request_tokens(PARAMS)
    assert exact != estimate_input_tokens(PARAMS).upper  # the test can tell a count from an estimate
    d = engine.decide(PARAMS, WAITING, now=NOON)
    assert d.input_tokens_exact and d.input_tokens == exact
    assert d.estimate_fast_micro == exact * 30 + 4096 * 150
    assert counter.requests_sent == 1
    # The same content again is a cache hit in the counter: no second request.
    engine.decide(PARAMS, WAITING, now=NOON)
    assert counter.requests_sent == 1 and counter.cache_hits == 1
    counter.close()


def test_adecide_awaits_the_async_count(emulator: Emulator) -> None:
    counter = TokenCounter(api_key="test", base_url=emulator.url, timeout=5.0)
    engine = load(DEFAULT_POLICY, counter=counter)

    d = adecide_once(engine, counter)
    assert d.input_tokens_exact and d.input_tokens == count_request_tokens(PARAMS)
    assert counter.requests_sent == 1 and counter._client is None  # the async client did the work


def test_a_slow_count_does_not_block_the_event_loop(emulator: Emulator) -> None:
    emulator.inject(None, hang_s=0.4, path="/v1/messages/count_tokens")
    counter = TokenCounter(api_key="test", base_url=emulator.url, timeout=5.0)
    engine = load(DEFAULT_POLICY, counter=counter)
    ticks: list[float] = []

    async def ticker() -> None:
        for _ in range(8):
            ticks.append(time.monotonic())
            await asyncio.sleep(0.02)

    async def main() -> Any:
        try:
            decision, _ = await asyncio.gather(engine.adecide(PARAMS, WAITING, now=NOON), ticker())
            return decision
        finally:
            await counter.aclose()

    started = time.monotonic()
    d = asyncio.run(main())
    assert d.input_tokens_exact
    assert time.monotonic() - started >= 0.4
    assert len(ticks) == 8 and ticks[-1] - started < 0.4  # the loop kept running while the count hung


def test_a_failing_count_falls_back_to_the_estimate(emulator: Emulator) -> None:
    emulator.inject(500, path="/v1/messages/count_tokens")
    counter = TokenCounter(api_key="test", base_url=emulator.url, timeout=5.0)
    engine = load(DEFAULT_POLICY, counter=counter)
    d = engine.decide(PARAMS, WAITING, now=NOON)
    assert not d.input_tokens_exact and d.input_tokens == estimate_input_tokens(PARAMS).upper
    assert "HTTP 500" in (counter.last_error or "")
    # Failures are not cached: the next decision counts again, exactly.
    assert engine.decide(PARAMS, WAITING, now=NOON).input_tokens_exact
    counter.close()


def test_a_timed_out_async_count_falls_back_to_the_estimate(emulator: Emulator) -> None:
    emulator.inject(None, hang_s=1.0, path="/v1/messages/count_tokens")
    counter = TokenCounter(api_key="test", base_url=emulator.url, timeout=0.2)
    engine = load(DEFAULT_POLICY, counter=counter)

    d = adecide_once(engine, counter)
    assert not d.input_tokens_exact and d.input_tokens == estimate_input_tokens(PARAMS).upper
    assert "timed out" in (counter.last_error or "")


def test_a_given_count_wins_over_the_counter(emulator: Emulator) -> None:
    counter = TokenCounter(api_key="test", base_url=emulator.url)
    engine = load(DEFAULT_POLICY, counter=counter)
    d = engine.decide(PARAMS, WAITING, now=NOON, input_tokens=777)
    assert d.input_tokens == 777 and d.input_tokens_exact and counter.requests_sent == 0
    d = asyncio.run(engine.adecide(PARAMS, WAITING, now=NOON, input_tokens=778))
    assert d.input_tokens == 778 and counter.requests_sent == 0
    counter.close()


def test_malformed_params_with_a_counter_are_a_typed_error(emulator: Emulator) -> None:
    counter = TokenCounter(api_key="test", base_url=emulator.url)
    engine = load(DEFAULT_POLICY, counter=counter)
    with pytest.raises(InvalidRequest, match="params must be a mapping"):
        engine.decide("not params")  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest, match="messages"):
        asyncio.run(engine.adecide({"model": "claude-opus-4-6", "max_tokens": 5, "messages": "hi"}))
    counter.close()


def test_adecide_without_a_counter_decides_like_decide() -> None:
    engine = load(DEFAULT_POLICY)
    sync = engine.decide(PARAMS, WAITING, now=NOON)
    async_ = asyncio.run(engine.adecide(PARAMS, WAITING, now=NOON))
    assert {k: v for k, v in sync.to_dict().items() if k != "reservation_id"} == \
        {k: v for k, v in async_.to_dict().items() if k != "reservation_id"}
    assert not async_.input_tokens_exact


def test_adecide_raises_the_same_typed_errors() -> None:
    engine = load(DEFAULT_POLICY)
    with pytest.raises(InvalidRequest):
        asyncio.run(engine.adecide({"model": "claude-opus-4-6", "max_tokens": 0, "messages": []}))
    with pytest.raises(InvalidRequest, match="input_tokens must be a non-negative int"):
        asyncio.run(engine.adecide(PARAMS, input_tokens=-1))


def test_adecide_with_a_shared_ledger_runs_off_the_event_loop(tmp_path: Path) -> None:
    import threading

    from policy_engine.ledger.sqlite import SqliteLedger

    class ThreadNoting(SqliteLedger):
        """The real SQLite ledger, noting which thread reserves."""

        reserved_on: list[str] = []

        def reserve(self, *args: Any, **kwargs: Any) -> Any:
            self.reserved_on.append(threading.current_thread().name)
            return super().reserve(*args, **kwargs)

    ledger = ThreadNoting(str(tmp_path / "ledger.db"))
    engine = Engine([load(DEFAULT_POLICY).policy()], ledger=ledger)

    async def main() -> tuple[Any, str]:
        return await engine.adecide(PARAMS, WAITING, now=NOON), threading.current_thread().name

    d, loop_thread = asyncio.run(main())
    assert d.speed == "fast" and d.reservation_id is not None
    assert ledger.reserved_on and loop_thread not in ledger.reserved_on
    assert engine.settle(d, {"input_tokens": 10, "output_tokens": 10, "speed": "fast"}).first
    ledger.close()
