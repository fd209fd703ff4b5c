"""The emulator as a billing oracle: `usage.iterations` (compaction, advisor and fallback hops on other
models), server-side `fallbacks` chains, refusals (and the SDK's client-side `BetaRefusalFallbackMiddleware`
against them), and its own bill of every token it generated, streams cut short included.

Driven through the real anthropic SDK and raw HTTP; the bill is checked against prices computed here
from the catalog, step by step.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest
from anthropic.lib.middleware import BetaRefusalFallbackMiddleware

from policy_engine.catalog import actual, load_catalog
from policy_engine.testing.emulator import FAST_BETA, SERVER_FALLBACK_BETAS, Emulator, count_request_tokens

OPUS, SONNET = "claude-opus-4-6", "claude-sonnet-4-6"
FALLBACK_BETA = SERVER_FALLBACK_BETAS[0]
PARAMS: dict[str, Any] = {"model": OPUS, "max_tokens": 64, "messages": [{"role": "user", "content": "Hello there"}]}
IN = count_request_tokens(PARAMS)
SONNET_PRICES = """\
providers:
  anthropic:
    models:
      claude-sonnet-4-6:
        standard:
          tiers: [{above_input_tokens: 0, input: 3, output: 15}]
          as_of: 2026-11-22
          source: "test catalog: a price for the emulator's second model"
          source_kind: assumption
        cache:
          write_5m: "1.25"
          write_1h: "2"
          read: "0.1"
          as_of: 2026-11-22
          source: "test catalog"
          source_kind: assumption
"""


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> Any:
    path = tmp_path_factory.mktemp("catalog") / "catalog.yaml"
    path.write_text(SONNET_PRICES)
    return load_catalog(path)


@pytest.fixture
def emu(catalog: Any) -> Iterator[Emulator]:
    emulator = Emulator(catalog=catalog, standard_otps=None, min_cache_tokens=0, output_tokens=16, delta_tokens=4)
    emulator.start()
    try:
        yield emulator
    finally:
        emulator.close()


def price(catalog: Any, model: str, speed: str = "standard", **usage: int) -> int:
    return actual(catalog.model(model), {"input_tokens": 0, "output_tokens": 0, **usage, "speed": speed})


def post(emu: Emulator, body: dict[str, Any], betas: tuple[str, ...] = (), scenario: dict[str, Any] | None = None) -> httpx.Response:
    headers = {"x-api-key": "k", "anthropic-version": "2023-06-01"}
    if betas:
        headers["anthropic-beta"] = ",".join(betas)
    if scenario is not None:
        headers["x-emulator-scenario"] = json.dumps(scenario)
    return httpx.post(emu.url + "/v1/messages", json=body, headers=headers, timeout=10)


def client(emu: Emulator, **options: Any) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=emu.url, api_key="k", max_retries=0, **options)


# -- iterations ---------------------------------------------------------------------------------


def test_compaction_is_billed_but_left_out_of_the_top_level_usage(emu: Emulator, catalog: Any) -> None:
    emu.script(compaction=(3_000, 400))
    message = client(emu).beta.messages.create(**PARAMS)
    usage = message.usage
    assert (usage.input_tokens, usage.output_tokens) == (IN, 16)
    kinds = [(i.type, i.input_tokens, i.output_tokens) for i in usage.iterations]
    assert kinds == [("compaction", 3_000, 400), ("message", IN, 16)]
    assert [s["type"] for s in emu.bill()] == ["compaction", "message"]
    assert emu.bill_micro() == price(catalog, OPUS, input_tokens=3_000, output_tokens=400) + price(
        catalog, OPUS, input_tokens=IN, output_tokens=16)


def test_advisor_steps_are_billed_at_their_own_model(emu: Emulator, catalog: Any) -> None:
    response = post(emu, PARAMS, scenario={"advisors": [[SONNET, 500, 80]]})
    usage = response.json()["usage"]
    assert usage["input_tokens"] == IN + 500 and usage["output_tokens"] == 16 + 80  # in the top-level sums
    assert [(i["type"], i["model"]) for i in usage["iterations"]] == [("advisor_message", SONNET), ("message", OPUS)]
    assert emu.bill_micro() == price(catalog, SONNET, input_tokens=500, output_tokens=80) + price(
        catalog, OPUS, input_tokens=IN, output_tokens=16)
    # Priced at the request's model from the top-level usage, the same response would cost more.
    assert price(catalog, OPUS, input_tokens=usage["input_tokens"], output_tokens=usage["output_tokens"]) > emu.bill_micro()


def test_a_plain_request_has_no_iterations_and_one_step(emu: Emulator, catalog: Any) -> None:
    usage = post(emu, PARAMS).json()["usage"]
    assert "iterations" not in usage
    assert emu.bill() == [{"request": 0, "type": "message", "model": OPUS, "speed": "standard", "inference_geo": None,
                           "usage": {"input_tokens": IN, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
                                     "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0},
                                     "output_tokens": 16}}]


# -- server-side fallbacks ----------------------------------------------------------------------


@pytest.mark.parametrize("refuse_after", [0, 10])
def test_a_declined_request_is_served_by_its_fallback(emu: Emulator, catalog: Any, refuse_after: int) -> None:
    message = client(emu).beta.messages.create(
        **PARAMS, fallbacks=[{"model": SONNET, "max_tokens": 32}], betas=[FALLBACK_BETA],
        extra_headers={"x-emulator-scenario": json.dumps({"refuse": [OPUS], "refuse_after": refuse_after})})
    assert message.model == SONNET and message.stop_reason == "end_turn"
    assert [b.type for b in message.content] == (["text", "fallback", "text"] if refuse_after else ["fallback", "text"])
    fallback = next(b for b in message.content if b.type == "fallback")
    assert (fallback.from_.model, fallback.to.model, fallback.trigger.type) == (OPUS, SONNET, "refusal")
    iterations = [(i.type, i.model, i.output_tokens) for i in message.usage.iterations]
    served = price(catalog, SONNET, input_tokens=IN, output_tokens=16)
    if refuse_after:  # the declined hop had generated output: it is billed, at its own model
        assert iterations == [("message", OPUS, 10), ("fallback_message", SONNET, 16)]
        assert emu.bill_micro() == price(catalog, OPUS, input_tokens=IN, output_tokens=10) + served
    else:  # declined before any output: not billed
        assert iterations == [("fallback_message", SONNET, 16)]
        assert emu.bill_micro() == served


def test_fallback_entries_are_validated_and_inherit_speed(emu: Emulator) -> None:
    fast = {**PARAMS, "speed": "fast"}
    betas = (FALLBACK_BETA, FAST_BETA)
    assert post(emu, {**PARAMS, "fallbacks": [{"model": SONNET}]}).status_code == 400  # no beta
    bad = post(emu, {**fast, "fallbacks": [{"model": SONNET, "speed": "fast"}]}, betas)
    assert bad.status_code == 400 and "fast mode is not supported" in bad.json()["error"]["message"]
    assert post(emu, {**PARAMS, "fallbacks": [{"model": SONNET, "top_k": 3}]}, betas).status_code == 400
    assert post(emu, {**PARAMS, "fallbacks": [{"model": "claude-nope"}]}, betas).status_code == 400
    # An entry without `speed` runs fast only where the request is fast and the model has fast mode.
    refuse = {"refuse": [OPUS]}
    to_sonnet = post(emu, {**fast, "fallbacks": [{"model": SONNET}]}, betas, refuse).json()
    assert to_sonnet["model"] == SONNET and to_sonnet["usage"]["speed"] == "standard"
    chain = [{"model": SONNET}, {"model": OPUS, "speed": None}]
    nulled = post(emu, {**fast, "model": "claude-opus-4-6", "fallbacks": chain}, betas, {"refuse": [OPUS, SONNET]}).json()
    assert nulled["stop_reason"] == "refusal"  # every hop declined
    assert [s["speed"] for s in emu.bill()] == ["standard"]


def test_fallbacks_default_uses_the_emulators_chain(emu: Emulator) -> None:
    emu.configure(default_fallbacks=(SONNET,))
    body = post(emu, {**PARAMS, "fallbacks": "default"}, (FALLBACK_BETA,), {"refuse": [OPUS]}).json()
    assert body["model"] == SONNET


def test_a_refusal_without_fallbacks_bills_only_what_was_generated(emu: Emulator, catalog: Any) -> None:
    body = post(emu, PARAMS, ("fallback-credit-2026-07-01",), {"refuse": [OPUS], "category": "cyber"}).json()
    assert body["stop_reason"] == "refusal" and body["content"] == []
    details = body["stop_details"]
    assert details["type"] == "refusal" and details["category"] == "cyber" and details["fallback_credit_token"]
    assert emu.bill() == [] and emu.bill_micro() == 0
    body = post(emu, PARAMS, (), {"refuse": ["*"], "refuse_after": 5}).json()
    assert body["stop_details"]["fallback_credit_token"] is None  # no credit beta, no token
    assert emu.bill_micro() == price(catalog, OPUS, input_tokens=IN, output_tokens=5)


# -- the SDK's client-side fallback middleware ------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_the_sdk_refusal_fallback_middleware_against_the_emulator(emu: Emulator, catalog: Any, stream: bool) -> None:
    emu.script(refuse=[OPUS])
    sdk = client(emu, middleware=[BetaRefusalFallbackMiddleware([{"model": SONNET}])])
    if stream:
        with sdk.beta.messages.stream(**PARAMS) as events:
            message = events.get_final_message()
    else:
        message = sdk.beta.messages.create(**PARAMS)
    assert message.stop_reason == "end_turn"
    retry = emu.requests()[-1]["body"]
    assert retry["model"] == SONNET and retry["fallback_credit_token"]["mode"] == "best_effort"
    assert message.usage.fallback_credit.status.type == "redeemed"
    assert [(s["model"], s["usage"]["output_tokens"]) for s in emu.bill()] == [(SONNET, 16)]  # the refusal billed nothing
    assert emu.bill_micro() == price(catalog, SONNET, input_tokens=IN, output_tokens=16)


# -- streams ----------------------------------------------------------------------------------------


def test_a_stream_carries_the_iterations_on_its_final_message_delta(emu: Emulator) -> None:
    events = []
    with client(emu).beta.messages.stream(**PARAMS, fallbacks=[{"model": SONNET}], betas=[FALLBACK_BETA],
                                          extra_headers={"x-emulator-scenario": json.dumps(
                                              {"refuse": [OPUS], "refuse_after": 8, "compaction": [100, 20]})}) as stream:
        for event in stream:
            events.append(event)
        message = stream.get_final_message()
    deltas = [e for e in events if e.type == "message_delta"]
    assert len(deltas) == 1 and [i.type for i in deltas[0].usage.iterations] == ["compaction", "message", "fallback_message"]
    assert [b.type for b in message.content] == ["text", "fallback", "text"]
    assert message.usage.output_tokens == 8 + 16  # the declined hop's output and the served one's; not compaction's


@pytest.mark.parametrize("billing", ["generated", "complete"])
def test_a_stream_cut_short_bills_what_the_server_generated(catalog: Any, billing: str) -> None:
    # Output slow enough (5 s in all) that the client leaves long before the end, on a connection it closes.
    with Emulator(catalog=catalog, standard_otps=400.0, min_cache_tokens=0, output_tokens=2_000, delta_tokens=4,
                  disconnect_billing=billing) as emu:
        sdk = client(emu)
        seen = 0
        stream = sdk.messages.create(**{**PARAMS, "max_tokens": 2_000}, stream=True)
        for event in stream:
            if event.type == "content_block_delta":
                seen += 4
                if seen >= 12:
                    break
        stream.close()
        sdk.close()
        deadline = time.monotonic() + 10
        while not emu.bill() and time.monotonic() < deadline:
            time.sleep(0.02)
        [step] = emu.bill()
        generated = step["usage"]["output_tokens"]
        if billing == "complete":
            assert generated == 2_000
        else:
            assert seen <= generated < 2_000  # at least what the client saw, and what was made after it stopped reading
        assert emu.requests()[-1]["abandoned"] is True
        assert emu.bill_micro() == price(catalog, OPUS, input_tokens=IN, output_tokens=generated)


def test_a_bad_scenario_is_a_400(emu: Emulator) -> None:
    response = post(emu, PARAMS, scenario={"refuse_after": -1})
    assert response.status_code == 400 and "refuse_after" in response.json()["error"]["message"]
    with pytest.raises(TypeError):
        emu.script(refuse_later=True)


def test_a_client_that_times_out_is_still_billed_for_the_whole_answer(catalog: Any) -> None:
    """The server does not know the client gave up on a non-streamed answer: it generates and bills all of it."""
    with Emulator(catalog=catalog, standard_otps=100.0, min_cache_tokens=0, output_tokens=50) as emu:
        with pytest.raises(anthropic.APITimeoutError):
            client(emu, timeout=0.1).messages.create(**PARAMS)
        deadline = time.monotonic() + 10
        while not emu.bill() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert [s["usage"]["output_tokens"] for s in emu.bill()] == [50]
        assert emu.bill_micro() == price(catalog, OPUS, input_tokens=IN, output_tokens=50)


def test_errors_bill_nothing(emu: Emulator) -> None:
    emu.inject(529, times=1)
    with pytest.raises(anthropic.APIStatusError):
        client(emu).messages.create(**PARAMS)
    assert post(emu, {**PARAMS, "speed": "fast"}).status_code == 400  # no fast beta
    assert emu.bill() == [] and emu.bill_micro() == 0


@pytest.mark.parametrize("billing", ["generated", "complete"])
def test_a_stream_whose_client_left_before_the_first_byte_bills_its_prompt(catalog: Any, billing: str) -> None:
    """A streamed attempt that hangs past the client's timeout is answered to nobody: its prompt was read
    (whichever write fails first, the headers' or message_start's), so its input is billed, and a
    compaction that ran before it; `complete` bills the whole answer."""
    with Emulator(catalog=catalog, standard_otps=None, min_cache_tokens=0, output_tokens=16,
                  disconnect_billing=billing) as emu:
        emu.inject(None, hang_s=0.5)
        with pytest.raises(anthropic.APITimeoutError):
            client(emu, timeout=0.1).messages.create(
                **PARAMS, stream=True, extra_headers={"x-emulator-scenario": json.dumps({"compaction": [40, 7]})})
        deadline = time.monotonic() + 10
        while not emu.requests() and time.monotonic() < deadline:
            time.sleep(0.02)
        [entry] = emu.requests()
        assert entry["abandoned"] is True
        output = 16 if billing == "complete" else 0
        assert [(s["type"], s["usage"]["output_tokens"]) for s in emu.bill()] == [("compaction", 7), ("message", output)]
        assert emu.bill_micro() == price(catalog, OPUS, input_tokens=40, output_tokens=7) + price(
            catalog, OPUS, input_tokens=IN, output_tokens=output)
