"""Issue 14 parts 3-4: settling from `usage.iterations`, and guarding and reserving `fallbacks` chains.

Through the real anthropic SDK (and raw HTTP) against the emulator, whose own bill (`bill_micro()`) is the
oracle: for complete responses the ledger must hold exactly what the emulator billed.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest
from anthropic.lib.middleware import BetaRefusalFallbackMiddleware

from policy_engine.catalog import actual, estimate_with_rates, load_catalog, parse_usage
from policy_engine.decide import Engine, load
from policy_engine.integrations.anthropic import FastModePolicy
from policy_engine.ledger import MemoryLedger
from policy_engine.testing.emulator import FAST_BETA, SERVER_FALLBACK_BETAS, Emulator

CATALOG = load_catalog()
OPUS, OPUS_55, SONNET = "claude-opus-5", "claude-opus-5-5", "claude-sonnet-5"
FALLBACK_BETA = SERVER_FALLBACK_BETAS[0]
POLICY = """
version: 1
name: billing
default: {speed}
budgets:
  - name: daily
    window: day
    limit_usd: 100
"""


def params(**extra: Any) -> dict[str, Any]:
    return {"model": OPUS, "max_tokens": 64, "messages": [{"role": "user", "content": "Hello there"}], **extra}


def engine(tmp_path: Path, speed: str = "standard", **options: Any) -> Engine:
    path = tmp_path / f"{speed}.yaml"
    path.write_text(POLICY.format(speed=speed) + "on_fast_rate_limited: fallback\n")
    return load(path, **options)


def spent(eng: Engine) -> int:
    ledger = eng.ledger
    assert isinstance(ledger, MemoryLedger)
    return sum(ledger.totals().values())


def reserved(eng: Engine) -> int:
    return sum(eng.ledger._reserved.values())  # type: ignore[attr-defined]


def price(model: str, speed: str = "standard", **usage: int) -> int:
    return actual(CATALOG.model(model), {"input_tokens": 0, "output_tokens": 0, **usage, "speed": speed})


@pytest.fixture
def emu() -> Iterator[Emulator]:
    emulator = Emulator(standard_otps=None, min_cache_tokens=0, output_tokens=16, delta_tokens=4)
    emulator.start()
    try:
        yield emulator
    finally:
        emulator.close()


def sdk(emu: Emulator, *middleware: Any) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=emu.url, api_key="k", max_retries=0, middleware=list(middleware))


def create(client: anthropic.Anthropic, stream: bool, **body: Any) -> Any:
    if stream:
        with client.beta.messages.stream(**body) as events:
            return events.get_final_message()
    return client.beta.messages.create(**body)


def raw(emu: Emulator, body: dict[str, Any], scenario: dict[str, Any] | None = None,
        betas: tuple[str, ...] = (FALLBACK_BETA, FAST_BETA)) -> dict[str, Any]:
    headers = {"x-api-key": "k", "anthropic-version": "2023-06-01", "anthropic-beta": ",".join(betas)}
    if scenario is not None:
        headers["x-emulator-scenario"] = json.dumps(scenario)
    response = httpx.post(emu.url + "/v1/messages", json=body, headers=headers, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


# -- part 3: settle from usage.iterations ------------------------------------------------------------

SCENARIOS = {
    "compaction": ({}, {"compaction": [3_000, 400]}),
    "advisor": ({}, {"advisors": [[SONNET, 500, 80]]}),
    "fallback-after-output": ({"fallbacks": [{"model": SONNET, "max_tokens": 32}]}, {"refuse": [OPUS], "refuse_after": 10}),
    "fallback-before-output": ({"fallbacks": [{"model": OPUS_55}]}, {"refuse": [OPUS]}),
    "all-of-them": ({"fallbacks": [{"model": SONNET}]}, {"refuse": [OPUS], "refuse_after": 7, "compaction": [900, 50],
                                                        "advisors": [[OPUS_55, 300, 20]]}),
}


@pytest.mark.parametrize("stream", [False, True], ids=["body", "stream"])
@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_the_ledger_equals_the_bill_step_by_step(tmp_path: Path, emu: Emulator, name: str, stream: bool) -> None:
    extra, scenario = SCENARIOS[name]
    eng = engine(tmp_path)
    client = sdk(emu, FastModePolicy(eng, observe=False))
    betas = [FALLBACK_BETA] if "fallbacks" in extra else []
    message = create(client, stream, **params(**extra), betas=betas,
                     extra_headers={"x-emulator-scenario": json.dumps(scenario)})
    assert message.usage.iterations, "the scenario has several billed steps"
    assert emu.bill_micro() > 0
    assert spent(eng) == emu.bill_micro()
    assert reserved(eng) == 0


def test_compaction_is_counted_although_the_top_level_usage_leaves_it_out(tmp_path: Path, emu: Emulator) -> None:
    eng = engine(tmp_path)
    body = raw(emu, params(), {"compaction": [3_000, 400]})
    decision = eng.decide(params())
    settlement = eng.settle(decision, body["usage"])
    compaction, answer = price(OPUS, input_tokens=3_000, output_tokens=400), price(OPUS, input_tokens=settlement.input_tokens,
                                                                                   output_tokens=16)
    assert [(s.kind, s.model, s.speed, s.cost_micro) for s in settlement.steps] == [
        ("compaction", OPUS, "standard", compaction), ("message", OPUS, "standard", answer)]
    assert settlement.cost_micro == compaction + answer == emu.bill_micro()
    # The top-level usage alone would have missed the compaction step.
    assert eng.usage_cost(decision, parse_usage(body["usage"]), "standard") == answer
    assert not settlement.speed_split_unknown


def test_each_step_is_priced_at_its_own_model(tmp_path: Path, emu: Emulator) -> None:
    eng = engine(tmp_path)
    body = raw(emu, params(fallbacks=[{"model": SONNET}]), {"refuse": [OPUS], "refuse_after": 10, "advisors": [[OPUS_55, 500, 80]]})
    settlement = eng.settle(eng.decide(params(fallbacks=[{"model": SONNET}])), body["usage"])
    assert [(s.kind, s.model) for s in settlement.steps] == [
        ("message", OPUS), ("advisor_message", OPUS_55), ("fallback_message", SONNET)]
    assert settlement.cost_micro == sum(s.cost_micro for s in settlement.steps) == emu.bill_micro()
    # Priced at the request's model from the top-level usage, it would have been counted wrong.
    top = body["usage"]
    assert price(OPUS, input_tokens=top["input_tokens"], output_tokens=top["output_tokens"]) != settlement.cost_micro


def test_a_fast_response_prices_every_step_fast_where_its_model_has_fast_mode(tmp_path: Path, emu: Emulator) -> None:
    eng = engine(tmp_path, "fast")
    body = params(speed="fast")
    usage = raw(emu, body, {"compaction": [900, 50], "advisors": [[SONNET, 300, 20]]})["usage"]
    assert usage["speed"] == "fast"
    settlement = eng.settle(eng.decide(params()), usage)
    assert [(s.kind, s.speed) for s in settlement.steps] == [
        ("compaction", "fast"), ("advisor_message", "standard"), ("message", "fast")]  # Sonnet 5 has no fast mode
    assert settlement.speed_split_unknown  # the API does not say which steps ran fast: assumed, and said so
    assert settlement.cost_micro == emu.bill_micro()


def test_a_fast_step_of_a_chain_reported_standard_is_still_priced_fast(tmp_path: Path, emu: Emulator) -> None:
    # The fast primary declines after some output; its inheriting fallback (no fast mode) serves at standard,
    # and the response reports the serving hop's speed.
    eng = engine(tmp_path, "fast")
    chain = [{"model": SONNET}]
    usage = raw(emu, params(speed="fast", fallbacks=chain), {"refuse": [OPUS], "refuse_after": 10})["usage"]
    assert usage["speed"] == "standard"
    decision = eng.decide(params(fallbacks=chain))
    settlement = eng.settle(decision, usage)
    assert [(s.model, s.speed) for s in settlement.steps] == [(OPUS, "fast"), (SONNET, "standard")]
    assert settlement.cost_micro == emu.bill_micro() == price(OPUS, "fast", input_tokens=settlement.steps[0].input_tokens,
                                                             output_tokens=10) + settlement.steps[1].cost_micro


def test_the_inference_geo_and_cache_rates_apply_to_every_step(tmp_path: Path, emu: Emulator) -> None:
    eng = engine(tmp_path)
    system = [{"type": "text", "text": "cached " * 50, "cache_control": {"type": "ephemeral"}}]
    body = params(system=system, inference_geo="us")
    usage = raw(emu, body, {"compaction": [100, 10], "advisors": [[SONNET, 40, 4]]})["usage"]
    settlement = eng.settle(eng.decide(body), usage)
    assert settlement.steps[-1].cache_write_tokens > 0
    assert settlement.cost_micro == emu.bill_micro()
    assert settlement.cost_micro > eng.settle(eng.decide(params(system=system)), {**usage, "inference_geo": None}).cost_micro


def test_a_plain_response_settles_as_before(tmp_path: Path) -> None:
    eng = engine(tmp_path)
    settlement = eng.settle(eng.decide(params()), {"input_tokens": 10, "output_tokens": 5})
    assert settlement.steps == () and not settlement.speed_split_unknown and settlement.fallback_credit is None
    assert settlement.cost_micro == price(OPUS, input_tokens=10, output_tokens=5)


def test_a_malformed_iteration_is_a_usage_error_and_records_nothing(tmp_path: Path) -> None:
    from policy_engine.catalog import UsageError

    eng = engine(tmp_path)
    decision = eng.decide(params())
    for bad in ([{"type": "thinking", "input_tokens": 1, "output_tokens": 1}],
                [{"type": "advisor_message", "input_tokens": 1, "output_tokens": 1}],
                [{"type": "message", "input_tokens": -1, "output_tokens": 1}], "all"):
        with pytest.raises(UsageError):
            eng.settle(decision, {"input_tokens": 1, "output_tokens": 1, "iterations": bad})
    assert spent(eng) == 0 and reserved(eng) > 0


def test_spans_and_metrics_record_every_step(tmp_path: Path, emu: Emulator, telemetry: Any) -> None:
    eng = engine(tmp_path)
    usage = raw(emu, params(), {"compaction": [3_000, 400], "advisors": [[SONNET, 500, 80]]})["usage"]
    settlement = eng.settle(eng.decide(params()), usage)
    [span] = telemetry.spans("policy_engine.settle")
    attributes = span.attributes
    assert list(attributes["policy_engine.steps.types"]) == ["compaction", "advisor_message", "message"]
    assert list(attributes["policy_engine.steps.models"]) == [OPUS, SONNET, OPUS]
    assert list(attributes["policy_engine.steps.speeds"]) == ["standard"] * 3
    assert list(attributes["policy_engine.steps.cost_usd"]) == [s.cost_micro / 1e6 for s in settlement.steps]
    assert attributes["policy_engine.speed.split_unknown"] is False
    assert attributes["policy_engine.cost.actual_usd"] == settlement.cost_micro / 1e6
    points = telemetry.metrics()["policy_engine.cost"]
    by_model: dict[tuple[str, str], float] = {}
    for point in points:
        key = (point.attributes.get("gen_ai.response.model"), point.attributes.get("policy_engine.step.type"))
        by_model[key] = by_model.get(key, 0.0) + point.value
    assert by_model == {(OPUS, "compaction"): pytest.approx(settlement.steps[0].cost_micro / 1e6),
                        (SONNET, "advisor_message"): pytest.approx(settlement.steps[1].cost_micro / 1e6),
                        (OPUS, "message"): pytest.approx(settlement.steps[2].cost_micro / 1e6)}


# -- part 4: fallback chains ------------------------------------------------------------------------------


@pytest.mark.parametrize("entry, guardrail", [
    ({"model": SONNET, "speed": "fast"}, "unsupported_model"),  # the API would refuse it with a 400
    ({"model": SONNET}, "unsupported_model"),  # inherited fast, on a model without it
    ({"model": "claude-opus-4-7", "speed": "fast"}, "retired"),
])
def test_a_fallback_entry_a_guardrail_forbids_is_rewritten_to_standard(tmp_path: Path, entry: dict[str, Any],
                                                                       guardrail: str) -> None:
    eng = engine(tmp_path, "fast")
    body = params(fallbacks=[{"model": OPUS_55}, entry])
    decision = eng.decide(body)
    assert decision.speed == "fast"
    assert [(r["index"], r["model"], r["guardrail"]) for r in decision.fallback_rewrites] == [(1, entry["model"], guardrail)]
    wire = decision.apply(body)
    assert wire["fallbacks"] == [{"model": OPUS_55}, {**entry, "speed": "standard"}]
    assert body["fallbacks"][1] == entry  # the caller's params are not changed
    assert "fallback_rewrites" in decision.to_dict()


@pytest.mark.parametrize("why", ["batch", "priority_tier"])
def test_batch_and_priority_tier_keep_every_entry_from_fast(tmp_path: Path, why: str) -> None:
    eng = engine(tmp_path, "fast")
    body = params(fallbacks=[{"model": OPUS_55, "speed": "fast"}], **({"service_tier": "priority"} if why == "priority_tier" else {}))
    decision = eng.decide(body, batch=why == "batch")
    assert decision.speed == "standard"
    assert [r["guardrail"] for r in decision.fallback_rewrites] == ["standard_request"]
    assert decision.apply(body)["fallbacks"] == [{"model": OPUS_55, "speed": "standard"}]


def test_a_rate_limited_account_sends_no_entry_fast(tmp_path: Path) -> None:
    eng = engine(tmp_path, "fast")
    eng.ratelimits.record("default", {"anthropic-fast-input-tokens-limit": "1000", "anthropic-fast-input-tokens-remaining": "0",
                                      "anthropic-fast-input-tokens-reset": "2999-01-01T00:00:00Z"}, rate_limited=True)
    body = params(fallbacks=[{"model": OPUS_55, "speed": "fast"}, {"model": OPUS_55}])
    decision = eng.decide(body)
    assert decision.speed == "standard" and "rate_limited" in decision.guardrails
    assert decision.apply(body)["fallbacks"] == [{"model": OPUS_55, "speed": "standard"}, {"model": OPUS_55}]


def test_the_reservation_covers_the_chains_worst_case(tmp_path: Path) -> None:
    eng = engine(tmp_path)
    plain = eng.decide(params(max_tokens=1024))
    eng.release(plain)
    body = params(max_tokens=1024, fallbacks=[{"model": OPUS_55, "max_tokens": 64_000}])
    decision = eng.decide(body)
    inp = decision.input_tokens
    # Every hop billed in full: the primary, then the fallback, sent up to the primary's partial answer as a prefill.
    hop = actual(CATALOG.model(OPUS_55), {"input_tokens": inp + 1024, "output_tokens": 64_000})
    assert decision.estimate_standard_micro == plain.estimate_standard_micro + hop
    assert reserved(eng) == decision.estimate_standard_micro
    fast = engine(tmp_path, "fast").decide(body)
    assert fast.estimate_fast_micro == plain.estimate_fast_micro + actual(
        CATALOG.model(OPUS_55), {"input_tokens": inp + 1024, "output_tokens": 64_000, "speed": "fast"})


@pytest.mark.parametrize("speed", ["standard", "fast"])
def test_a_worst_case_stand_in_charges_the_whole_chain(tmp_path: Path, speed: str) -> None:
    # An attempt cut short (a timeout, a stream cut, a usage nobody sent) is charged max_tokens at the requested
    # model; with `fallbacks` a dearer hop may have been the one that served: the whole reserved worst case counts.
    eng = engine(tmp_path, speed)
    body = params(max_tokens=1024, fallbacks=[{"model": OPUS_55, "max_tokens": 4096}])
    stand_in = lambda d: {"input_tokens": d.input_tokens, "output_tokens": d.max_tokens, "speed": d.speed}  # noqa: E731
    decision = eng.decide(body)
    assert decision.speed == speed and eng.settle(decision, stand_in(decision), worst_case=True).cost_micro == decision.estimate_micro
    assert spent(eng) == decision.estimate_micro
    beside = eng.decide(body)
    assert eng.charge_attempt(beside, stand_in(beside), worst_case=True) == beside.estimate_micro
    eng.release(beside)
    awaited = eng.decide(body)
    assert asyncio.run(eng.asettle(awaited, stand_in(awaited), worst_case=True)).cost_micro == awaited.estimate_micro
    # A bill that was seen is priced as it is, hop by hop: no floor.
    seen = eng.decide(body)
    assert eng.settle(seen, stand_in(seen)).cost_micro == price(OPUS, speed, input_tokens=seen.input_tokens,
                                                                 output_tokens=1024)


def test_an_entry_that_would_be_refused_fast_is_sent_standard_through_the_sdk(tmp_path: Path, emu: Emulator) -> None:
    body = params(fallbacks=[{"model": SONNET, "speed": "fast"}], speed="fast")
    scenario = {"extra_headers": {"x-emulator-scenario": json.dumps({"refuse": [OPUS], "refuse_after": 5})}}
    with pytest.raises(anthropic.BadRequestError):  # without the engine, the API refuses the chain
        sdk(emu).beta.messages.create(**body, betas=[FALLBACK_BETA, FAST_BETA], **scenario)
    eng = engine(tmp_path, "fast")
    message = sdk(emu, FastModePolicy(eng, observe=False)).beta.messages.create(**body, betas=[FALLBACK_BETA], **scenario)
    assert message.model == SONNET
    sent = emu.requests()[-1]["body"]
    assert sent["speed"] == "fast" and sent["fallbacks"] == [{"model": SONNET, "speed": "standard"}]
    assert spent(eng) == emu.bill_micro() > 0 and reserved(eng) == 0


# -- part 4: the SDK's BetaRefusalFallbackMiddleware, in both orders ------------------------------------------


@pytest.mark.parametrize("refuse_after", [0, 10])
@pytest.mark.parametrize("stream", [False, True], ids=["body", "stream"])
@pytest.mark.parametrize("order", ["ours-first", "theirs-first"])
def test_both_middleware_orders_decide_and_settle_every_hop(tmp_path: Path, emu: Emulator, telemetry: Any, order: str,
                                                            stream: bool, refuse_after: int) -> None:
    eng = engine(tmp_path, "fast")
    ours = FastModePolicy(eng, observe=False)
    theirs = BetaRefusalFallbackMiddleware([{"model": SONNET}])
    client = sdk(emu, *((ours, theirs) if order == "ours-first" else (theirs, ours)))
    emu.script(refuse=[OPUS], refuse_after=refuse_after)
    message = create(client, stream, **params())
    assert message.stop_reason == "end_turn" and message.model == SONNET
    sent = [entry["body"] for entry in emu.requests()]
    assert [b["model"] for b in sent] == [OPUS, SONNET]
    # Every hop was decided: the primary fast, the fallback (no fast mode) guarded to standard.
    assert [b.get("speed") for b in sent] == ["fast", None]
    decisions = telemetry.spans("policy_engine.decide")
    assert [(d.attributes["gen_ai.request.model"], d.attributes["policy_engine.speed"]) for d in decisions] == [
        (OPUS, "fast"), (SONNET, "standard")]
    # Every billed hop was settled, at its own model and speed; the credit is priced as the usage shows it.
    assert [(s["model"], s["speed"]) for s in emu.bill()] == ([(OPUS, "fast")] if refuse_after else []) + [(SONNET, "standard")]
    assert spent(eng) == emu.bill_micro() > 0
    assert reserved(eng) == 0


def test_a_redeemed_fallback_credit_is_priced_as_the_usage_reports_it(tmp_path: Path, emu: Emulator) -> None:
    eng = engine(tmp_path)
    system = [{"type": "text", "text": "cached " * 50, "cache_control": {"type": "ephemeral"}}]
    body = params(system=system)
    refused = raw(emu, body, {"refuse": [OPUS]}, betas=("fallback-credit-2026-07-01",))
    token = refused["stop_details"]["fallback_credit_token"]
    retry = {**body, "model": SONNET, "fallback_credit_token": token}
    usage = raw(emu, retry, betas=("fallback-credit-2026-07-01",))["usage"]
    assert usage["fallback_credit"]["status"]["type"] == "redeemed"
    assert usage["cache_creation_input_tokens"] == 0 and usage["cache_read_input_tokens"] > 0
    settlement = eng.settle(eng.decide(retry), usage)
    assert settlement.fallback_credit == "redeemed"
    assert settlement.cost_micro == emu.bill_micro()
    undiscounted = price(SONNET, input_tokens=usage["input_tokens"], cache_creation_input_tokens=usage["cache_read_input_tokens"],
                         output_tokens=usage["output_tokens"])
    assert settlement.cost_micro < undiscounted


@pytest.mark.parametrize("stream", [False, True], ids=["body", "stream"])
@pytest.mark.parametrize("order", ["ours-first", "theirs-first"])
def test_both_orders_with_the_async_client(tmp_path: Path, emu: Emulator, order: str, stream: bool) -> None:
    import asyncio

    eng = engine(tmp_path, "fast")
    ours = FastModePolicy(eng, observe=False)
    theirs = BetaRefusalFallbackMiddleware([{"model": SONNET}])
    emu.script(refuse=[OPUS], refuse_after=10)

    async def run() -> Any:
        async with anthropic.AsyncAnthropic(base_url=emu.url, api_key="k", max_retries=0,
                                            middleware=[ours, theirs] if order == "ours-first" else [theirs, ours]) as client:
            if stream:
                async with client.beta.messages.stream(**params()) as events:
                    return await events.get_final_message()
            return await client.beta.messages.create(**params())

    message = asyncio.run(run())
    assert message.model == SONNET
    assert [(b["model"], b.get("speed")) for b in (e["body"] for e in emu.requests())] == [(OPUS, "fast"), (SONNET, None)]
    assert spent(eng) == emu.bill_micro() > 0 and reserved(eng) == 0


@pytest.mark.parametrize("stream", [False, True], ids=["body", "stream"])
def test_the_httpx_transport_guards_the_chain_and_settles_its_steps(tmp_path: Path, emu: Emulator, stream: bool) -> None:
    from policy_engine.integrations.httpx import FastModeTransport

    eng = engine(tmp_path, "fast")
    body = params(fallbacks=[{"model": SONNET, "speed": "fast"}], stream=stream)
    headers = {"x-api-key": "k", "anthropic-version": "2023-06-01", "anthropic-beta": FALLBACK_BETA,
               "x-emulator-scenario": json.dumps({"refuse": [OPUS], "refuse_after": 5, "compaction": [200, 20]})}
    with httpx.Client(base_url=emu.url, transport=FastModeTransport(eng, observe=False), timeout=10) as client:
        response = client.post("/v1/messages", json=body, headers=headers)
        response.read()
    assert response.status_code == 200
    sent = emu.requests()[-1]["body"]
    assert sent["speed"] == "fast" and sent["fallbacks"] == [{"model": SONNET, "speed": "standard"}]
    assert [s["type"] for s in emu.bill()] == ["compaction", "message", "fallback_message"]
    assert spent(eng) == emu.bill_micro() > 0 and reserved(eng) == 0


def test_a_budget_of_the_fast_premium_counts_the_premium_of_the_steps_priced_fast(tmp_path: Path, emu: Emulator) -> None:
    path = tmp_path / "premium.yaml"
    path.write_text(POLICY.format(speed="fast") + "    counts: premium\n")
    eng = load(path)
    usage = raw(emu, params(speed="fast", fallbacks=[{"model": SONNET}]), {"refuse": [OPUS], "refuse_after": 10})["usage"]
    settlement = eng.settle(eng.decide(params(fallbacks=[{"model": SONNET}])), usage)
    opus = settlement.steps[0]
    premium = opus.cost_micro - price(OPUS, input_tokens=opus.input_tokens, output_tokens=opus.output_tokens)
    assert premium > 0 and spent(eng) == premium


def test_after_a_fast_429_falls_back_every_step_is_priced_at_standard(tmp_path: Path, emu: Emulator) -> None:
    emu.inject(429, speed="fast", retry_after="1")  # the fast request is rate limited
    eng = engine(tmp_path, "fast")
    client = sdk(emu, FastModePolicy(eng, observe=False))
    chain = [{"model": OPUS_55, "speed": "fast"}]
    message = client.beta.messages.create(**params(fallbacks=chain), betas=[FALLBACK_BETA], extra_headers={
        "x-emulator-scenario": json.dumps({"refuse": [OPUS], "refuse_after": 6, "compaction": [300, 30]})})
    assert message.model == OPUS_55
    first, second = (e["body"] for e in emu.requests())
    assert first["speed"] == "fast" and "speed" not in second
    assert second["fallbacks"] == [{"model": OPUS_55, "speed": "standard"}]  # the chain follows the request to standard
    assert {s["speed"] for s in emu.bill()} == {"standard"}
    assert spent(eng) == emu.bill_micro() > 0 and reserved(eng) == 0


def test_a_step_on_a_model_the_catalog_cannot_price_is_charged_conservatively(tmp_path: Path) -> None:
    # Settlement never refuses: an advisor hop on a model nobody prices costs the dearest rates, never $0.
    eng = engine(tmp_path)
    decision = eng.decide(params())
    usage = {"input_tokens": 10, "output_tokens": 5, "iterations": [
        {"type": "message", "input_tokens": 10, "output_tokens": 5},
        {"type": "advisor_message", "model": "claude-mystery-9", "input_tokens": 1_000, "output_tokens": 100}]}
    settlement = eng.settle(decision, usage)
    mystery = next(step for step in settlement.steps if step.model == "claude-mystery-9")
    dearest = eng.dearest_rates(mystery.speed, decision.platform)
    assert not mystery.priced and mystery.cost_micro >= -(-(1_000 * dearest[-1][1].input + 100 * dearest[-1][1].output)
                                                         // 1_000_000) > 0
    assert spent(eng) == settlement.cost_micro >= mystery.cost_micro


def test_a_default_chain_and_an_unpriced_hop_are_reserved_at_the_dearest_rates(tmp_path: Path) -> None:
    eng = engine(tmp_path)
    plain = eng.decide(params(max_tokens=1024))
    eng.release(plain)
    inp = plain.input_tokens
    dearest = eng.dearest_rates("standard", "claude_api")
    default = eng.decide(params(max_tokens=1024, fallbacks="default"))
    hops = sum(estimate_with_rates(dearest, inp + 1024 * k, 1024) for k in (1, 2, 3))  # up to three hops, prefills grow
    assert default.estimate_standard_micro == plain.estimate_standard_micro + hops
    assert any("dearest rates" in r for r in default.reasons)
    eng.release(default)
    unpriced = eng.decide(params(max_tokens=1024, fallbacks=[{"model": "claude-mystery-9"}]))
    assert unpriced.estimate_standard_micro == plain.estimate_standard_micro + estimate_with_rates(dearest, inp + 1024, 1024)


def test_a_fallback_hop_to_a_model_the_engine_cannot_price_leaves_the_ledger_at_or_above_the_bill(tmp_path: Path) -> None:
    # The emulator (the API) knows a model the engine's catalog does not: its hop is charged conservatively, at the
    # catalog's dearest rates (a model dearer than every catalog model is README's documented exception).
    prices = tmp_path / "api-prices.yaml"
    prices.write_text("version: 2\nproviders:\n  anthropic:\n    models:\n      claude-mystery-9:\n        standard:\n"
                      "          tiers: [{above_input_tokens: 0, input: 8, output: 40}]\n"
                      "          as_of: 2026-12-02\n          source: the emulator's own price\n"
                      "        cache: {write_5m: '1.25', write_1h: '2', read: '0.1', as_of: 2026-12-02, source: same}\n")
    api = Emulator(standard_otps=None, min_cache_tokens=0, output_tokens=16, catalog=load_catalog(prices))
    api.start()
    try:
        eng = engine(tmp_path)
        client = sdk(api, FastModePolicy(eng, observe=False))
        scenario = {"extra_headers": {"x-emulator-scenario": json.dumps({"refuse": [OPUS], "refuse_after": 5})}}
        message = client.beta.messages.create(**params(fallbacks=[{"model": "claude-mystery-9"}]), betas=[FALLBACK_BETA],
                                              **scenario)
        assert message.model == "claude-mystery-9"
        assert api.bill_micro() > 0 and spent(eng) >= api.bill_micro() and reserved(eng) == 0
    finally:
        api.close()
