"""Fleet rate-limit state in Redis: what one worker learns from a response, every worker decides with."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from _redis import RedisServer, redis_prefix, redis_server  # noqa: F401  (pytest fixtures)
from policy_engine.decide import load
from policy_engine.ledger.redis import RedisRateLimitStore

FAST_HEADERS = {
    "anthropic-fast-input-tokens-limit": "100000",
    "anthropic-fast-input-tokens-remaining": "0",
    "anthropic-fast-input-tokens-reset": "2099-01-01T00:00:00Z",
    "anthropic-fast-output-tokens-limit": "20000",
    "anthropic-fast-output-tokens-remaining": "15000",
    "anthropic-fast-output-tokens-reset": "2099-01-01T00:00:00Z",
}
POLICY = """\
version: 1
name: fleet
rules:
  - name: waiting
    when: context.interactive
    speed: fast
"""
REQUEST: dict[str, Any] = {"model": "claude-opus-5", "max_tokens": 1000, "messages": [{"role": "user", "content": "Hi"}]}


@pytest.fixture()
def pair(redis_server: RedisServer, redis_prefix: str) -> Iterator[tuple[RedisRateLimitStore, RedisRateLimitStore]]:
    """Two workers' stores on one Redis, synced by hand (no background thread)."""
    a = RedisRateLimitStore(url=redis_server.url, prefix=redis_prefix, start=False)
    b = RedisRateLimitStore(url=redis_server.url, prefix=redis_prefix, start=False)
    yield a, b
    a.close()
    b.close()


def test_what_one_worker_records_another_decides_with(pair: tuple[RedisRateLimitStore, RedisRateLimitStore]) -> None:
    a, b = pair
    now = time.time()
    assert b.snapshot("acct", now) == {} and not b.exhausted("acct", 10, now)  # b now follows "acct"
    assert a.record("acct", FAST_HEADERS, now=now)
    assert a.sync() and b.sync()
    assert b.exhausted("acct", 10, now)  # no input tokens left, learnt from a's response
    features = b.snapshot("acct", now)
    assert (features["input_tokens_limit"], features["output_tokens_remaining"]) == (100_000, 15_000)
    assert isinstance(features["input_tokens_limit"], int)


def test_the_newest_observation_wins_and_a_429_is_never_shortened(
        pair: tuple[RedisRateLimitStore, RedisRateLimitStore]) -> None:
    a, b = pair
    now = time.time()
    a.record("acct", {**FAST_HEADERS, "retry-after": "30"}, rate_limited=True, now=now)
    a.sync()
    # b saw a later, healthier response (and no 429): its counts win, a's 429 window stays.
    b.record("acct", {**FAST_HEADERS, "anthropic-fast-input-tokens-remaining": "90000"}, now=now + 1)
    b.sync()
    a.sync()
    for store in (a, b):
        state = store.get("acct")
        assert state is not None and state.input_tokens_remaining == 90_000 and state.observed_at == now + 1
        assert state.retry_after_until == now + 30 and state.last_429_at == now
        assert store.exhausted("acct", 10, now + 2)  # still inside retry-after
    # An older observation arriving late changes nothing.
    late = RedisRateLimitStore(url=_url(a), prefix=a.prefix, start=False)
    late.record("acct", {**FAST_HEADERS, "anthropic-fast-input-tokens-remaining": "5"}, now=now - 10)
    late.sync()
    b.sync()
    assert b.get("acct").input_tokens_remaining == 90_000  # type: ignore[union-attr]
    late.close()


def _url(store: RedisRateLimitStore) -> str:
    kwargs = store.client.connection_pool.connection_kwargs
    return f"redis://{kwargs['host']}:{kwargs['port']}/0"


def test_the_engine_downgrades_when_another_worker_saw_the_limit(pair: tuple[RedisRateLimitStore, RedisRateLimitStore],
                                                                 tmp_path: Path) -> None:
    a, b = pair
    policy = tmp_path / "fleet.yaml"
    policy.write_text(POLICY)
    engine_b = load(policy, ratelimits=b)
    assert engine_b.decide(REQUEST, {"interactive": True}, account="acct").speed == "fast"
    a.record("acct", FAST_HEADERS)
    a.sync()
    b.sync()
    decision = engine_b.decide(REQUEST, {"interactive": True}, account="acct")
    assert (decision.speed, decision.forced_by) == ("standard", "rate_limited")


def test_the_background_thread_keeps_workers_in_step(redis_server: RedisServer, redis_prefix: str) -> None:
    a = RedisRateLimitStore(url=redis_server.url, prefix=redis_prefix, refresh_s=0.02)
    b = RedisRateLimitStore(url=redis_server.url, prefix=redis_prefix, refresh_s=0.02)
    try:
        b.exhausted("acct", 10, time.time())
        a.record("acct", FAST_HEADERS)
        deadline = time.monotonic() + 5
        while not b.exhausted("acct", 10, time.time()):
            assert time.monotonic() < deadline, "b never heard of a's observation"
            time.sleep(0.01)
    finally:
        a.close()
        b.close()


def test_an_outage_keeps_the_local_view_and_catches_up(tmp_path: Path, telemetry: Any) -> None:
    server = RedisServer(tmp_path / "redis").start()
    try:
        a = RedisRateLimitStore(url=server.url, start=False, timeout_s=0.2)
        b = RedisRateLimitStore(url=server.url, start=False, timeout_s=0.2)
        b.exhausted("acct", 10, time.time())
        server.kill()
        assert a.record("acct", FAST_HEADERS)  # never raises
        assert a.sync() is False
        assert a.exhausted("acct", 10, time.time())  # this worker's own view still counts
        events = [p.attributes["policy_engine.event"] for p in telemetry.metrics()["policy_engine.events"]]
        assert "policy_engine.ratelimit.state_unavailable" in events
        server.start()
        assert a.sync() and b.sync()  # the observation kept during the outage reaches the fleet
        assert b.exhausted("acct", 10, time.time())
        a.close()
        b.close()
    finally:
        server.cleanup()


def test_bad_arguments_are_refused(redis_server: RedisServer) -> None:
    with pytest.raises(ValueError, match="refresh_s"):
        RedisRateLimitStore(url=redis_server.url, refresh_s=0)
