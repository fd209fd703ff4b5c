"""The SDK middleware on today's models and on other platforms, against the emulator serving them.

The real anthropic SDK clients (`Anthropic`, `AnthropicFoundry`) talk to a local emulator that
serves the same platform's model ids and fast mode from the catalog; the emulator's request log
shows what went on the wire.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import anthropic
import pytest

from policy_engine.catalog import load_catalog
from policy_engine.decide import Engine
from policy_engine.ledger import MemoryLedger
from policy_engine.integrations.anthropic import FastModePolicy, platform_of
from policy_engine.testing.emulator import Emulator

from tests._emulator import emulator, engine_for, started  # noqa: F401 - fixture

CATALOG = load_catalog()


@pytest.fixture
def foundry() -> Iterator[Emulator]:
    yield from started(platform="foundry")


claude_api = emulator  # the Claude API's emulator, under the name these tests read best with


def last_request(emu: Emulator) -> dict:
    return [r for r in emu.requests() if r["path"].endswith("/v1/messages")][-1]


ALL_SPEND = """
budgets:
  - name: all_spend
    window: day
    limit_usd: 1000
    counts: all
    on_exceed: reject
"""


def spent(engine: Engine) -> int:
    ledger = engine.ledger
    assert isinstance(ledger, MemoryLedger)
    return sum(ledger.totals().values())


def test_opus_5_5_goes_fast_with_no_beta_header(tmp_path: Path, claude_api: Emulator) -> None:
    engine = engine_for(tmp_path)
    client = FastModePolicy.attach(anthropic.Anthropic(base_url=claude_api.url, api_key="k", max_retries=0), engine)
    message = client.messages.create(model="claude-opus-5-5", max_tokens=32, messages=[{"role": "user", "content": "Hi"}])
    assert message.usage.speed == "fast"
    sent = last_request(claude_api)
    assert sent["body"]["speed"] == "fast" and sent["body"]["model"] == "claude-opus-5-5"
    assert "fast-mode-2026-02-01" not in sent["headers"].get("anthropic-beta", "")


def test_opus_5_goes_fast_with_the_beta_header(tmp_path: Path, claude_api: Emulator) -> None:
    engine = engine_for(tmp_path)
    client = anthropic.Anthropic(base_url=claude_api.url, api_key="k", max_retries=0, middleware=[FastModePolicy(engine)])
    message = client.messages.create(model="claude-opus-5", max_tokens=32, messages=[{"role": "user", "content": "Hi"}])
    assert message.usage.speed == "fast"
    assert "fast-mode-2026-02-01" in last_request(claude_api)["headers"]["anthropic-beta"]


def test_a_retired_model_is_sent_at_standard_even_by_an_always_fast_policy(tmp_path: Path, claude_api: Emulator) -> None:
    engine = engine_for(tmp_path)
    client = anthropic.Anthropic(base_url=claude_api.url, api_key="k", max_retries=0, middleware=[FastModePolicy(engine)])
    for model in ("claude-opus-4-8", "claude-opus-4-7", "claude-opus-4-6"):
        message = client.messages.create(model=model, max_tokens=32, messages=[{"role": "user", "content": "Hi"}])
        assert message.usage.speed == "standard", model
        assert "speed" not in last_request(claude_api)["body"], model


def test_the_emulator_keeps_each_retirement_s_behaviour(claude_api: Emulator) -> None:
    raw = anthropic.Anthropic(base_url=claude_api.url, api_key="k", max_retries=0)
    params = {"max_tokens": 8, "messages": [{"role": "user", "content": "Hi"}], "speed": "fast",
              "betas": ["fast-mode-2026-02-01"]}
    served = raw.beta.messages.create(model="claude-opus-4-6", **params)  # served, and billed, at standard
    assert served.usage.speed == "standard"
    with pytest.raises(anthropic.BadRequestError, match="retired on 2026-12-01"):
        raw.beta.messages.create(model="claude-opus-4-8", **params)
    with pytest.raises(anthropic.BadRequestError, match="requires the anthropic-beta header fast-mode-2026-02-01"):
        raw.messages.create(model="claude-opus-5", max_tokens=8, messages=[{"role": "user", "content": "Hi"}], speed="fast")


def test_foundry_fast_is_the_fast_deployment_without_speed(tmp_path: Path, foundry: Emulator) -> None:
    engine = engine_for(tmp_path, ALL_SPEND)
    client = anthropic.AnthropicFoundry(base_url=foundry.url, api_key="k", max_retries=0)
    assert platform_of(client) == "foundry"
    client = FastModePolicy.attach(client, engine)
    message = client.messages.create(model="claude-opus-5-5", max_tokens=32, messages=[{"role": "user", "content": "Hi"}])
    sent = last_request(foundry)
    assert sent["body"]["model"] == "claude-opus-5-5-fast" and "speed" not in sent["body"]
    assert message.usage.speed == "fast"
    # settled at Opus 5.5's fast price ($8 / $40 per MTok), from the response's usage
    usage = message.usage
    fast = CATALOG.model("claude-opus-5-5", platform="foundry").rates("fast", usage.input_tokens)
    expected = -(-(usage.input_tokens * fast.input + usage.output_tokens * fast.output) // 1_000_000)
    assert spent(engine) == expected
    # Sonnet has no fast deployment: it stays on its own id.
    client.messages.create(model="claude-sonnet-5-5", max_tokens=8, messages=[{"role": "user", "content": "Hi"}])
    assert last_request(foundry)["body"]["model"] == "claude-sonnet-5-5"


def test_a_middleware_built_for_another_platform_learns_the_client_s(tmp_path: Path, foundry: Emulator) -> None:
    engine = engine_for(tmp_path)
    policy = FastModePolicy(engine)  # decides for the Claude API until it sees its client
    client = anthropic.AnthropicFoundry(base_url=foundry.url, api_key="k", max_retries=0, middleware=[policy])
    client.messages.create(model="claude-sonnet-5-5", max_tokens=8, messages=[{"role": "user", "content": "Hi"}])
    assert policy.runtime.platform == "foundry"
    client.messages.create(model="claude-opus-5-5", max_tokens=8, messages=[{"role": "user", "content": "Hi"}])
    assert last_request(foundry)["body"]["model"] == "claude-opus-5-5-fast"


def test_platform_of_every_sdk_client() -> None:
    assert platform_of(anthropic.Anthropic(api_key="k")) == "claude_api"
    assert platform_of(anthropic.AsyncAnthropic(api_key="k")) == "claude_api"
    assert platform_of(anthropic.AnthropicFoundry(api_key="k", resource="r")) == "foundry"
    assert platform_of(anthropic.AnthropicVertex(region="us-east5", project_id="p", access_token="t")) == "vertex"
    assert platform_of(anthropic.AnthropicBedrock(aws_access_key="a", aws_secret_key="s", aws_region="us-east-1")) == "bedrock"


def test_a_request_decided_for_another_platform_settles_at_its_client_s_prices() -> None:
    # A middleware built without attach() decides its first request for the Claude API; the response shows the
    # client is Bedrock's, whose regional endpoints cost 1.1x: that request is settled at Bedrock's prices.
    from policy_engine import load
    from policy_engine.integrations._core import Runtime

    engine = load(Path(__file__).resolve().parents[1] / "policies" / "default.yaml")
    runtime = Runtime(engine, observe=False)
    flight = runtime.flight({"model": "claude-opus-5-5", "max_tokens": 64, "messages": [{"role": "user", "content": "Hi"}]},
                            None, "k-1")
    assert flight is not None and flight.decision.platform == "claude_api"
    runtime.learn_platform("bedrock", flight)
    assert runtime.platform == "bedrock" and flight.decision.platform == "bedrock"
    usage = {"input_tokens": 1_000, "output_tokens": 1_000}
    settled = engine.settle(flight.decision, usage)
    assert settled.cost_micro == 26_400  # 1.1 x ($4 + $20) per MTok x 1,000 tokens each; the Claude API's is 24,000
