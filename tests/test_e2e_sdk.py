"""End to end: the real anthropic SDK (sync and async clients) with `FastModePolicy`, against the emulator."""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx2
import pytest

from policy_engine.catalog import actual, load_catalog
from policy_engine.decide import Engine
from policy_engine.errors import CeilingExceeded
from policy_engine.integrations.anthropic import FastModePolicy, FastModeRateLimited, policy_context
from policy_engine.ledger import MemoryLedger
from policy_engine.observe import ThroughputObserver
from policy_engine.ratelimit import account_id
from policy_engine.testing.emulator import Emulator
from tests._emulator import Gateway, emulator, engine_for, gateway, messages_params  # noqa: F401 - fixture

CATALOG = load_catalog()
OPUS = CATALOG.model("claude-opus-5")
BUDGET = """
budgets:
  - name: daily
    window: day
    limit_usd: 100
"""
API_KEY = "sk-test-key"


class Client:
    """One API surface for the sync and the async SDK client, so every scenario runs on both."""

    def __init__(self, kind: str, url: str, middleware: FastModePolicy, **options: Any) -> None:
        self.kind, self.url, self.middleware, self.options = kind, url, middleware, options
        if kind == "sync":
            self.sync = anthropic.Anthropic(base_url=url, api_key=API_KEY, middleware=[middleware], **options)

    def _async(self) -> anthropic.AsyncAnthropic:
        return anthropic.AsyncAnthropic(base_url=self.url, api_key=API_KEY, middleware=[self.middleware], **self.options)

    @staticmethod
    def _surface(client: Any, beta: bool) -> Any:
        return client.beta.messages if beta else client.messages

    def create(self, beta: bool = False, **params: Any) -> Any:
        if self.kind == "sync":
            return self._surface(self.sync, beta).create(**params)

        async def run() -> Any:
            async with self._async() as client:
                return await self._surface(client, beta).create(**params)

        return asyncio.run(run())

    def stream(self, events: int | None = None, beta: bool = False, **params: Any) -> list[Any]:
        """Stream a message; stop and close after `events` events (None: read it all)."""
        if self.kind == "sync":
            seen = []
            stream = self._surface(self.sync, beta).create(stream=True, **params)
            for event in stream:
                seen.append(event)
                if events is not None and len(seen) >= events:
                    break
            stream.close()
            return seen

        async def run() -> list[Any]:
            async with self._async() as client:
                seen = []
                stream = await self._surface(client, beta).create(stream=True, **params)
                async for event in stream:
                    seen.append(event)
                    if events is not None and len(seen) >= events:
                        break
                await stream.close()
                return seen

        return asyncio.run(run())

    def raw(self, method: str, path: str, **options: Any) -> Any:
        if self.kind == "sync":
            return getattr(self.sync, method)(path, **options)

        async def run() -> Any:
            async with self._async() as client:
                return await getattr(client, method)(path, **options)

        return asyncio.run(run())


@pytest.fixture(params=["sync", "async"])
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    return engine_for(tmp_path, BUDGET)


@pytest.fixture
def client(kind: str, emulator: Emulator, engine: Engine) -> Iterator[Client]:  # noqa: F811
    yield Client(kind, emulator.url, FastModePolicy(engine), max_retries=2)


def spent(engine: Engine) -> int:
    ledger = engine.ledger
    assert isinstance(ledger, MemoryLedger)
    return sum(ledger.totals().values())


def reserved(engine: Engine) -> int:
    return sum(engine.ledger._reserved.values())  # type: ignore[attr-defined]


def billed(emulator: Emulator) -> int:  # noqa: F811
    return sum(actual(CATALOG.model(u["model"]), u) for u in emulator.billed())


def spans(telemetry: Any, name: str) -> list[Any]:
    return telemetry.spans(name)


def test_a_fast_decision_reaches_the_wire_and_settles_at_the_fast_price(client: Client, emulator: Emulator,  # noqa: F811
                                                                       engine: Engine, telemetry: Any) -> None:
    message = client.create(**messages_params("one two three"))
    assert message.usage.speed == "fast"
    [sent] = emulator.requests()
    assert sent["body"]["speed"] == "fast"
    assert "fast-mode-2026-02-01" in sent["headers"]["anthropic-beta"].split(",")
    usage = emulator.billed()[0]
    fast_price = actual(OPUS, usage)
    assert fast_price == (6 * 10 + 16 * 50)  # 6 input and 16 output tokens at $10 / $50 per MTok
    assert spent(engine) == fast_price and reserved(engine) == 0
    [settle] = spans(telemetry, "policy_engine.settle")
    assert settle.attributes["policy_engine.speed.actual"] == "fast"


def test_the_beta_surface_merges_the_callers_betas(client: Client, emulator: Emulator, engine: Engine) -> None:  # noqa: F811
    message = client.create(beta=True, betas=["context-management-2025-06-27"], **messages_params())
    assert message.usage.speed == "fast"
    [sent] = emulator.requests()
    assert sent["headers"]["anthropic-beta"].split(",") == ["context-management-2025-06-27", "fast-mode-2026-02-01"]
    assert spent(engine) == billed(emulator)


def test_an_unsupported_model_never_gets_fast(client: Client, emulator: Emulator) -> None:  # noqa: F811
    params = messages_params(model="claude-sonnet-4-6")
    assert client.create(**params).usage.speed == "standard"
    # Even when the caller asks for fast itself, the policy's guardrail removes it.
    assert client.create(beta=True, betas=["fast-mode-2026-02-01"], speed="fast", **params).usage.speed == "standard"
    assert [r["status"] for r in emulator.requests()] == [200, 200]
    assert all("speed" not in r["body"] for r in emulator.requests())


def test_a_fast_429_falls_back_to_standard_with_one_reservation(client: Client, emulator: Emulator,  # noqa: F811
                                                                engine: Engine, telemetry: Any) -> None:
    emulator.configure(fast_output_tokens_per_minute=20)  # one 16-token answer fits, then 4 tokens left
    assert client.create(**messages_params("first")).usage.speed == "fast"
    second = client.create(**messages_params("second"))
    assert second.usage.speed == "standard"
    statuses = [(r["status"], r["body"].get("speed", "standard")) for r in emulator.requests()]
    assert statuses == [(200, "fast"), (429, "fast"), (200, "standard")]
    assert len(spans(telemetry, "policy_engine.decide")) == 2  # one reservation per logical request
    settles = spans(telemetry, "policy_engine.settle")
    assert [s.attributes["policy_engine.speed.actual"] for s in settles] == ["fast", "standard"]
    standard_price = actual(OPUS, emulator.billed()[1])
    assert standard_price == 4 * 5 + 16 * 25
    assert spent(engine) == actual(OPUS, emulator.billed()[0]) + standard_price and reserved(engine) == 0
    # The 429 is remembered: until its retry-after passes, decisions go standard without a round trip.
    state = engine.ratelimits.get(account_id(api_key=API_KEY))
    assert state is not None and state.last_429_at is not None and state.output_tokens_remaining == 4
    third = client.create(**messages_params("third"))
    assert third.usage.speed == "standard" and len(emulator.requests()) == 4
    decide = spans(telemetry, "policy_engine.decide")[-1]
    assert "rate_limited" in decide.attributes["policy_engine.guardrails"]


def test_retry_honours_retry_after(client: Client, emulator: Emulator, engine: Engine, tmp_path: Path) -> None:  # noqa: F811
    engine = engine_for(tmp_path, BUDGET + "on_fast_rate_limited: retry\n")
    client = Client(client.kind, emulator.url, FastModePolicy(engine), max_retries=0)
    emulator.inject(429, speed="fast", retry_after="0.3")
    started = time.perf_counter()
    assert client.create(**messages_params()).usage.speed == "fast"
    assert time.perf_counter() - started >= 0.3
    assert [r["status"] for r in emulator.requests()] == [429, 200]
    assert spent(engine) == billed(emulator) and reserved(engine) == 0


def test_fail_raises_and_releases(client: Client, emulator: Emulator, tmp_path: Path) -> None:  # noqa: F811
    engine = engine_for(tmp_path, BUDGET + "on_fast_rate_limited: fail\n")
    client = Client(client.kind, emulator.url, FastModePolicy(engine), max_retries=2)
    emulator.inject(429, speed="fast", retry_after="7")
    with pytest.raises(FastModeRateLimited, match="retry after 7s") as caught:
        client.create(**messages_params())
    assert caught.value.retry_after_s == 7.0 and caught.value.decision.speed == "fast"
    assert len(emulator.requests()) == 1  # not retried by the SDK either
    assert spent(engine) == 0 and reserved(engine) == 0


def test_sdk_retries_on_529_do_not_double_count(client: Client, emulator: Emulator, engine: Engine,  # noqa: F811
                                                telemetry: Any) -> None:
    emulator.inject(529, times=2, retry_after="0.01")
    message = client.create(**messages_params())
    assert message.usage.speed == "fast"
    received = emulator.requests()
    assert [r["status"] for r in received] == [529, 529, 200]
    assert all(r["body"]["speed"] == "fast" for r in received)
    assert [r["headers"]["x-stainless-retry-count"] for r in received] == ["0", "1", "2"]
    assert len(spans(telemetry, "policy_engine.decide")) == 1
    assert len(spans(telemetry, "policy_engine.settle")) == 1
    assert spent(engine) == billed(emulator) and reserved(engine) == 0


def test_exhausted_sdk_retries_release_the_reservation(client: Client, emulator: Emulator, engine: Engine) -> None:  # noqa: F811
    emulator.inject(529, times=3, retry_after="0.01")
    with pytest.raises(anthropic.APIStatusError) as caught:
        client.create(**messages_params())
    assert caught.value.status_code == 529
    assert len(emulator.requests()) == 3
    assert spent(engine) == 0 and reserved(engine) == 0


def test_a_client_error_releases_at_once(client: Client, emulator: Emulator, engine: Engine) -> None:  # noqa: F811
    with pytest.raises(anthropic.NotFoundError):
        client.create(**messages_params(model="claude-opus-5-nonexistent"))
    assert reserved(engine) == 0 and spent(engine) == 0


def test_a_hang_past_the_timeout_is_retried_with_the_same_decision(client: Client, emulator: Emulator,  # noqa: F811
                                                                   engine: Engine, tmp_path: Path) -> None:
    client = Client(client.kind, emulator.url, FastModePolicy(engine), max_retries=1, timeout=0.3)
    emulator.inject(None, hang_s=1.0)
    assert client.create(**messages_params()).usage.speed == "fast"
    assert reserved(engine) == 0
    # The hung attempt was served too, late: the emulator billed it, nobody saw its usage, so it is
    # charged at its worst case beside the answer's own settlement.
    for _ in range(100):
        if len(emulator.requests()) >= 2:
            break
        time.sleep(0.02)
    worst = actual(OPUS, {"input_tokens": 5, "output_tokens": 64, "speed": "fast"})
    assert spent(engine) >= actual(OPUS, emulator.billed()[-1]) + worst
    assert spent(engine) >= emulator.bill_micro()


def test_streaming_settles_from_message_start_and_the_final_delta(client: Client, emulator: Emulator,  # noqa: F811
                                                                  engine: Engine) -> None:
    emulator.configure(standard_otps=1_000)  # fast: 2,500 tokens/s, so 16 tokens take 6 ms
    events = client.stream(**messages_params("stream this"))
    assert [e.type for e in events][:2] == ["message_start", "content_block_start"]
    assert events[-1].type == "message_stop"
    assert spent(engine) == billed(emulator) == actual(OPUS, emulator.billed()[0]) and reserved(engine) == 0
    observer = engine.throughput
    assert observer is not None and observer.samples("claude-opus-5", "fast") == 1


def test_observed_speeds_show_fast_at_2_5x(emulator: Emulator, tmp_path: Path) -> None:  # noqa: F811
    emulator.configure(standard_otps=400, output_tokens=80, delta_tokens=8)  # 200 ms standard, 80 ms fast
    observer = ThroughputObserver(alpha=0.5)
    engine = engine_for(tmp_path, BUDGET, throughput=observer)
    client = anthropic.Anthropic(base_url=emulator.url, api_key=API_KEY, middleware=[FastModePolicy(engine)])
    # A new connection's first response is held back by TCP acknowledgement timing: open it first.
    client.messages.count_tokens(model="claude-opus-5", messages=[{"role": "user", "content": "warm up"}])
    for _ in range(3):
        for model in ("claude-opus-5", "claude-sonnet-4-6"):  # sonnet: standard only
            with client.messages.stream(**messages_params(model=model, max_tokens=100)) as stream:
                stream.get_final_message()
    assert engine.throughput is observer
    fast, standard = observer.otps("claude-opus-5", "fast"), observer.otps("claude-sonnet-4-6", "standard")
    assert fast is not None and standard is not None
    assert 1.8 <= fast / standard <= 3.2, (fast, standard)
    assert observer.features(CATALOG.model("claude-opus-5"), 100)["fast_otps"] == fast
    assert 0 < observer.ttft("claude-opus-5") < 0.1  # type: ignore[operator]


@pytest.mark.parametrize("rule", ["worst_case", "observed"])
def test_an_abandoned_stream_settles_by_the_policys_rule(kind: str, emulator: Emulator, tmp_path: Path,  # noqa: F811
                                                         telemetry: Any, rule: str) -> None:
    # worst_case (the default): max_tokens, what the server may have billed; observed: what the client read.
    engine = engine_for(tmp_path, BUDGET if rule == "worst_case" else BUDGET + "on_incomplete_stream: observed\n")
    client = Client(kind, emulator.url, FastModePolicy(engine), max_retries=2)
    emulator.configure(standard_otps=40, output_tokens=60, delta_tokens=1)  # fast: 100 tokens/s, 0.6 s
    events = client.stream(events=6, **messages_params("abandon me", max_tokens=100))
    assert len(events) == 6
    [settle] = spans(telemetry, "policy_engine.settle")
    output = settle.attributes["gen_ai.usage.output_tokens"]
    assert settle.attributes["policy_engine.incomplete_stream"] == rule
    if rule == "worst_case":
        assert output == 100
    else:
        assert 3 <= output < 60  # the three text deltas seen, at least, and far from the whole answer
    usage = {"input_tokens": 2 + 3, "output_tokens": output, "speed": "fast"}
    assert spent(engine) == actual(OPUS, usage) and reserved(engine) == 0
    for _ in range(100):  # the emulator notices the closed connection at its next write
        if emulator.requests():
            break
        time.sleep(0.02)
    assert emulator.requests()[0].get("abandoned") is True
    if rule == "worst_case":
        assert spent(engine) >= emulator.bill_micro() > 0


def test_a_stream_dropped_without_close_settles_when_collected(emulator: Emulator, engine: Engine,  # noqa: F811
                                                               telemetry: Any) -> None:
    emulator.configure(standard_otps=40, output_tokens=60, delta_tokens=1)
    client = anthropic.Anthropic(base_url=emulator.url, api_key=API_KEY, middleware=[FastModePolicy(engine)])
    stream = client.messages.create(stream=True, **messages_params(max_tokens=100))
    iterator = iter(stream)
    [next(iterator) for _ in range(4)]
    assert spans(telemetry, "policy_engine.settle") == []
    del stream, iterator
    gc.collect()
    [settle] = spans(telemetry, "policy_engine.settle")
    assert settle.attributes["gen_ai.usage.output_tokens"] >= 1
    assert reserved(engine) == 0 and spent(engine) > 0


def test_the_messages_stream_helper_settles(emulator: Emulator, engine: Engine) -> None:  # noqa: F811
    client = anthropic.Anthropic(base_url=emulator.url, api_key=API_KEY, middleware=[FastModePolicy(engine)])
    with client.messages.stream(**messages_params()) as stream:
        final = stream.get_final_message()
    assert final.usage.speed == "fast" and spent(engine) == billed(emulator) and reserved(engine) == 0


def test_a_reject_raises_before_anything_is_sent(client: Client, emulator: Emulator, tmp_path: Path) -> None:  # noqa: F811
    engine = engine_for(tmp_path, "ceilings:\n  per_request_usd: 0.0001\n")
    client = Client(client.kind, emulator.url, FastModePolicy(engine))
    with pytest.raises(CeilingExceeded, match="per_request") as caught:
        client.create(**messages_params())
    assert caught.value.decision.outcome == "rejected"  # type: ignore[attr-defined]
    assert emulator.requests() == []


def test_other_endpoints_pass_through_untouched(client: Client, emulator: Emulator, engine: Engine) -> None:  # noqa: F811
    tokens = client.raw("post", "/v1/messages/count_tokens", cast_to=httpx2.Response,
                        body={"model": "claude-opus-5", "messages": [{"role": "user", "content": "a b c"}]})
    assert tokens.json() == {"input_tokens": 6}
    models = client.raw("get", "/v1/models", cast_to=httpx2.Response)
    assert models.json()["data"]
    [sent] = [r for r in emulator.requests() if r["path"].endswith("count_tokens")]
    assert "speed" not in sent["body"] and "anthropic-beta" not in sent["headers"]
    assert spent(engine) == 0 and reserved(engine) == 0


def test_batches_never_go_fast(client: Client, emulator: Emulator, engine: Engine) -> None:  # noqa: F811
    requests = [{"custom_id": "a", "params": messages_params(speed="fast")}, {"custom_id": "b", "params": messages_params()}]
    batch = client.raw("post", "/v1/messages/batches", cast_to=httpx2.Response, body={"requests": requests},
                       options={"headers": {"anthropic-beta": "fast-mode-2026-02-01"}})
    assert batch.json()["type"] == "message_batch"
    [sent] = emulator.requests()
    assert all("speed" not in r["params"] for r in sent["body"]["requests"])
    assert reserved(engine) == 0


def test_context_comes_from_the_middleware_and_policy_context(emulator: Emulator, tmp_path: Path, kind: str,  # noqa: F811
                                                              telemetry: Any) -> None:
    policy = tmp_path / "tenants.yaml"
    policy.write_text("version: 1\nname: tenants\ndefault: standard\nrules:\n"
                      "  - name: acme-fast\n    when: has(context.tenant) && context.tenant == 'acme' && context.interactive\n"
                      "    speed: fast\n")
    from policy_engine.decide import load

    engine = load(policy)
    client = Client(kind, emulator.url, FastModePolicy(engine, context={"interactive": True}))
    assert client.create(**messages_params()).usage.speed == "standard"
    with policy_context(tenant="acme"):
        assert client.create(**messages_params()).usage.speed == "fast"
        with policy_context(interactive=False):
            assert client.create(**messages_params()).usage.speed == "standard"
    assert [s.attributes["policy_engine.rule"] for s in spans(telemetry, "policy_engine.decide")] == [
        "default", "acme-fast", "default"]


def test_rate_limit_headers_are_recorded_per_hashed_key(client: Client, emulator: Emulator, engine: Engine) -> None:  # noqa: F811
    emulator.configure(fast_input_tokens_per_minute=6_000)
    client.create(**messages_params("a b c"))
    snapshot = engine.ratelimits.snapshot(account_id(api_key=API_KEY), time.time())
    assert snapshot["input_tokens_limit"] == 6_000
    assert 6_000 - 6 <= snapshot["input_tokens_remaining"] <= 6_000
    assert all(API_KEY not in account for account in engine.ratelimits._state)  # type: ignore[attr-defined]


def test_a_gateway_5xx_is_settled_as_an_attempt_the_api_may_have_run(client: Client, emulator: Emulator,  # noqa: F811
                                                                     engine: Engine, gateway: Gateway) -> None:
    # The API served and billed the request; the client got the gateway's 504. Releasing it, as an
    # error of the API's own, would count $0 for a billed response.
    client = Client(client.kind, gateway.url, FastModePolicy(engine), max_retries=0)
    gateway.fail = 1
    with pytest.raises(anthropic.InternalServerError):
        client.create(**messages_params())
    assert emulator.bill_micro() > 0 and reserved(engine) == 0
    worst = actual(OPUS, {"input_tokens": 5, "output_tokens": 64, "speed": "fast"})
    assert spent(engine) >= worst > emulator.bill_micro()  # max_tokens of output, and the input as estimated


def test_a_gateway_5xx_then_a_retry_counts_both_attempts(client: Client, emulator: Emulator,  # noqa: F811
                                                         engine: Engine, gateway: Gateway) -> None:
    client = Client(client.kind, gateway.url, FastModePolicy(engine), max_retries=1)
    gateway.fail = 1
    assert client.create(**messages_params()).usage.speed == "fast"
    assert len(emulator.billed()) == 2 and reserved(engine) == 0
    worst = actual(OPUS, {"input_tokens": 5, "output_tokens": 64, "speed": "fast"})
    assert spent(engine) >= worst + actual(OPUS, emulator.billed()[-1]) > emulator.bill_micro()


def test_an_api_5xx_with_its_request_id_is_still_released(client: Client, emulator: Emulator,  # noqa: F811
                                                          engine: Engine, gateway: Gateway) -> None:
    client = Client(client.kind, gateway.url, FastModePolicy(engine), max_retries=0)
    emulator.inject(529)  # the API's own overload answer, passed on by the gateway with its request-id
    with pytest.raises(anthropic.APIStatusError):
        client.create(**messages_params())
    assert reserved(engine) == 0 and spent(engine) == 0 == emulator.bill_micro()
